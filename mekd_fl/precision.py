"""Mixed precision for the clients' training: one place that turns the `precision` setting into autocast.

Why a module: the student's distillation step and the emulator's GAN steps both run under it, and each
must keep the same rule: matrix products and convolutions in bfloat16 (what a GPU's tensor cores run
fast), losses, optimiser state and weights in float32. bfloat16 has float32's exponent range, so no
loss scaling is needed (float16 would need a GradScaler, and is not offered).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from mekd_fl.errors import ConfigError

PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager[object]:
    """The context a training step runs in: bfloat16 autocast on `device` for bf16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ConfigError(f"precision={precision!r} is not accepted; accepted: {', '.join(PRECISIONS)}")
