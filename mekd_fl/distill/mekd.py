"""MEKD: distillation through the emulated inverse mapping G (the paper's stage 2).

L = w_e * d(G(S(x)), G(T(x))) + w_kl * KL(T(x) || S(x)) with d = L1 (default) or L2 (mean squared).
G is frozen: its weights get no gradient and stay in eval mode (BatchNorm statistics fixed), but the
gradient of the image distance flows *through* G into the student, which is the point of the method:
the student is pulled toward outputs whose emulated pre-images look like the teacher's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mekd_fl.distill.base import DistillContext, Distiller, kl_divergence, register, teacher_log_probs


def generator_input(scores: torch.Tensor, how: str, temperature: float) -> torch.Tensor:
    """What G receives: probabilities (softmax at T=1) or temperature-scaled logits (scores / T).

    G was trained on z ~ N(0, I_C); scaled logits sit closer to that range than probabilities, which
    is why the authors' later code feeds logits / T. Both are offered; probabilities are the paper's.
    `scores` are logits, or log-probabilities when the oracle answers probabilities (teacher and
    student then both go through log-softmax, so the two inputs stay comparable).
    """
    return scores.softmax(1) if how == "probs" else scores / temperature


@register("mekd")
class MEKD(Distiller):
    needs_generator = True

    def __init__(self, ctx: DistillContext) -> None:
        super().__init__(ctx)
        self.generator = ctx.generator
        self.generator.eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)

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
        raw_logits = ctx.oracle_output == "logits"
        t_scores = teacher_response.float() if raw_logits else t_log_p
        s_scores = student_logits if raw_logits else F.log_softmax(student_logits, dim=1)
        with torch.no_grad():
            target = self.generator(generator_input(t_scores, ctx.emulator_input, ctx.temperature))
        emulated = self.generator(generator_input(s_scores, ctx.emulator_input, ctx.temperature))
        dist = F.l1_loss(emulated, target) if ctx.distance == "l1" else F.mse_loss(emulated, target)
        kl = kl_divergence(t_log_p, student_logits, ctx.temperature)
        loss = ctx.weight_emulation * dist + ctx.weight_kl * kl
        return {"loss": loss, "emulation": dist, "kl": kl}
