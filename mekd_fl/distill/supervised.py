"""Supervised training on the true labels: a reference point, not a source-blind method.

It ignores the teacher and reads the labels of the client's data, which the source-blind setting says a
student never has; it breaks the rule on purpose, to show how far the distillation methods stay from a
student that could see the labels (an upper bound for students trained on the same images).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mekd_fl.distill.base import Distiller, register


@register("supervised")
class Supervised(Distiller):
    """L = cross-entropy(student logits, true labels)."""

    uses_labels = True

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        if labels is None:
            raise ValueError(
                "method='supervised' trains on the true labels, but none were passed "
                "(the caller must pass labels to methods with uses_labels=True)"
            )
        ce = F.cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce}
