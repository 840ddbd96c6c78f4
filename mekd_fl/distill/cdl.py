"""Class-distance loss (Kim & Kim 2017), adapted to a student that sees only the teacher's responses.

What the paper pins down, and what it does not. Only the paper's idea could be checked (its abstract,
ICLR 2017 workshop track; no public implementation exists): a "class-distance loss" makes output vectors
form dense class clusters that lie apart, and the paper applies it while training the *teacher*, so that
its output space is easier for a student to learn from, with KD as the transfer. The exact formula (which
vectors, which norm, whether squared, how centres are estimated, the margin form, the weighting) could not
be recovered. Here the teacher is a fixed black box and cannot be retrained, so the same idea is put on
the student's side, with these choices, all ours:

- classes are the teacher's argmax (the student has no labels);
- vectors are the softened probabilities q = softmax(z / T), the same space as the KD term;
- intra  = mean_i ||q_S,i - c_T[y_i]||^2, c_T[k] the mean teacher vector of class k in the batch: the
  student's outputs cluster around the teacher's class centres (the teacher's structure, not the
  student's own, so the term cannot be met by collapsing);
- inter  = mean over class pairs j < k present in the batch of relu(margin - ||c_S[j] - c_S[k]||)^2,
  c_S[k] the student's class means: a hinge that keeps class centres at least `margin` apart;
- L = KD + cdl_weight * (intra + inter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mekd_fl.distill.base import Distiller, kl_divergence, register, teacher_log_probs
from mekd_fl.settings.schema import Setting


def class_centres(vectors: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Mean vector of each class over the batch: one row per class, zeros for a class absent from it."""
    return onehot.T @ vectors / onehot.sum(0).clamp_min(1).unsqueeze(1)


def cdl_parts(
    t_log_p: torch.Tensor, s_logits: torch.Tensor, temperature: float, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(intra, inter) as defined in the module docstring; inter is 0 when one class fills the batch."""
    y = t_log_p.argmax(1)
    q_s = F.softmax(s_logits / temperature, dim=1)
    q_t = F.softmax(t_log_p / temperature, dim=1).to(q_s.dtype)
    onehot = F.one_hot(y, q_s.shape[1]).to(q_s.dtype)

    intra = ((q_s - class_centres(q_t, onehot)[y]) ** 2).sum(1).mean()

    centres_s = class_centres(q_s, onehot)[onehot.sum(0) > 0]
    j, k = torch.triu_indices(len(centres_s), len(centres_s), offset=1, device=q_s.device)
    gaps = torch.linalg.vector_norm(centres_s[j] - centres_s[k], dim=1)
    inter = F.relu(margin - gaps).pow(2).sum() / max(len(j), 1)
    return intra, inter


@register("cdl")
class CDL(Distiller):
    """L = KL(T || S) * T^2 + cdl_weight * (intra + inter); see the module docstring for the definition."""

    settings = (
        Setting("cdl-weight", 1.0, "CDL weight of the class-distance term (added to KD).", "client", within=">= 0"),
        Setting(
            "cdl-margin", 0.5, "CDL margin between class centres of the student's outputs.", "client", within=">= 0"
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
        ctx = self.ctx
        t_log_p = teacher_log_probs(teacher_response, ctx.oracle_output)
        kl = kl_divergence(t_log_p, student_logits, ctx.temperature)
        intra, inter = cdl_parts(t_log_p, student_logits, ctx.temperature, ctx.cdl_margin)
        loss = kl + ctx.cdl_weight * (intra + inter)
        return {"loss": loss, "kl": kl, "intra": intra, "inter": inter}
