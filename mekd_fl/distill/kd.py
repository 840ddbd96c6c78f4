"""Classic knowledge distillation (Hinton et al. 2015) on the teacher's responses only."""

from __future__ import annotations

import torch

from mekd_fl.distill.base import Distiller, kl_divergence, register, teacher_log_probs


@register("kd")
class KD(Distiller):
    """L = KL(softmax(t_T/T) || softmax(t_S/T)) * T^2."""

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        kl = kl_divergence(
            teacher_log_probs(teacher_response, self.ctx.oracle_output), student_logits, self.ctx.temperature
        )
        return {"loss": kl, "kl": kl}
