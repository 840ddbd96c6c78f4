"""Distillation methods behind one interface; importing this package registers them all."""

from mekd_fl.distill import can, cdl, dkd, kd, mekd, supervised  # noqa: F401  (registration side effect)
from mekd_fl.distill.base import (
    DistillContext,
    Distiller,
    get_class,
    get_distiller,
    kl_divergence,
    methods,
    needs_generator,
    teacher_log_probs,
)
from mekd_fl.distill.mekd import generator_input, teacher_codes

__all__ = [
    "DistillContext",
    "Distiller",
    "generator_input",
    "teacher_codes",
    "get_class",
    "get_distiller",
    "kl_divergence",
    "methods",
    "needs_generator",
    "teacher_log_probs",
]
