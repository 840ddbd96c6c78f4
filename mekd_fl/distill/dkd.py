"""Decoupled knowledge distillation (Zhao et al. 2022), with the teacher's argmax as the target class.

DKD splits Hinton's KL into a target-class part (TCKD: does the student agree with the teacher on *how
sure* it is of the top class) and a non-target part (NCKD: the "dark knowledge" among the other classes),
and weights them separately: KD = TCKD + (1 - p_t^T) * NCKD, so plain KD under-weights NCKD exactly when
the teacher is confident. The original uses the ground-truth class as target; a source-blind student has
no labels, so the target is the class the teacher ranks first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mekd_fl.distill.base import DistillContext, Distiller, register, teacher_log_probs
from mekd_fl.settings.schema import Setting

# Added below the target's scaled logit to drop it from the non-target softmax; as in the reference
# implementation (mdistiller), large enough that its softmax weight underflows to 0 in float32.
_MASK = 1000.0


def _binary_log_probs(log_p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log [p_t, 1 - p_t] from log-probabilities, with 1 - p_t as a log-sum-exp (exact when p_t -> 1)."""
    log_target = (log_p * mask).sum(1)
    log_rest = torch.logsumexp(log_p - _MASK * mask, dim=1)
    return torch.stack([log_target, log_rest], dim=1)


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(1)


def dkd_parts(
    t_log_p: torch.Tensor, s_logits: torch.Tensor, temperature: float, reduce: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD), each * T^2, per sample or averaged over the batch.

    `t_log_p` is the teacher's log p (or logits: only their softmax at T matters); the target is its
    argmax, which the temperature does not change.
    """
    t = temperature
    t_scaled = t_log_p / t
    s_scaled = s_logits / t
    mask = F.one_hot(t_log_p.argmax(1), t_log_p.shape[1]).to(s_scaled.dtype)
    tckd = _kl_rows(
        _binary_log_probs(F.log_softmax(t_scaled, dim=1), mask), _binary_log_probs(F.log_softmax(s_scaled, dim=1), mask)
    ) * (t * t)
    nckd = _kl_rows(F.log_softmax(t_scaled - _MASK * mask, dim=1), F.log_softmax(s_scaled - _MASK * mask, dim=1)) * (
        t * t
    )
    if reduce:
        return tckd.mean(), nckd.mean()
    return tckd, nckd


def warmup_weight(epoch: float, warmup: float) -> float:
    """Linear ramp min(epoch / warmup, 1): DKD's large NCKD weight destabilises the first epochs."""
    return min(epoch / warmup, 1.0) if warmup > 0 else 1.0


@register("dkd")
class DKD(Distiller):
    """L = min(epoch / warmup, 1) * (alpha * TCKD + beta * NCKD)."""

    settings = (
        Setting("dkd-alpha", 1.0, "DKD weight of the target-class term TCKD.", "client", within=">= 0"),
        Setting("dkd-beta", 8.0, "DKD weight of the non-target term NCKD.", "client", within=">= 0"),
        Setting(
            "dkd-warmup",
            20.0,
            "DKD linear warm-up length in local epochs (weight min(epoch / warmup, 1)).",
            "client",
            within=">= 0",
        ),
    )

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        return dkd_loss(teacher_log_probs(teacher_response, self.ctx.oracle_output), student_logits, epoch, self.ctx)


def dkd_loss(
    t_log_p: torch.Tensor, student_logits: torch.Tensor, epoch: float, ctx: DistillContext
) -> dict[str, torch.Tensor]:
    """DKD's loss and its parts, from the teacher's log p and the settings in `ctx` (dkd-alpha, dkd-beta,
    dkd-warmup, temperature): shared by DKD and MEKD on DKD."""
    tckd, nckd = dkd_parts(t_log_p, student_logits, ctx.temperature)
    warm = warmup_weight(epoch, ctx.dkd_warmup)
    loss = warm * (ctx.dkd_alpha * tckd + ctx.dkd_beta * nckd)
    return {"loss": loss, "tckd": tckd, "nckd": nckd, "warmup": torch.tensor(warm, device=student_logits.device)}
