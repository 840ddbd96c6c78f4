"""KD with an adversarial discriminator on output vectors (after Xu et al. 2017, CAN).

Why a discriminator on top of KD: KD matches each output to its teacher output one by one; the
discriminator judges whether the student's outputs, as a distribution, look like the teacher's (their
sharpness, how mass spreads over the other classes), which the per-sample KL does not constrain.

Simplifications from the paper, which conditions the discriminator on labels and adds an auxiliary
classifier: the student has no labels here, so D sees only the probability vector. D is an MLP
C -> 512 -> 256 -> 1 (LeakyReLU 0.2) trained with its own Adam inside `losses`, one step per batch; the
student then gets KD + can_weight * BCE(D(S(x)), real). D's weights travel between rounds through
`extra_state`; its Adam moments start afresh each round.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.distill.base import DistillContext, Distiller, kl_divergence, register, teacher_log_probs
from mekd_fl.settings.schema import Setting

# D is initialised from a fixed seed (without touching the global RNG) so a run is reproducible whatever
# else drew random numbers before the first batch.
DISCRIMINATOR_SEED = 0


def make_discriminator(num_classes: int) -> nn.Sequential:
    """MLP on probability vectors -> one logit (real = teacher)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DISCRIMINATOR_SEED)
        return nn.Sequential(
            nn.Linear(num_classes, 512), nn.LeakyReLU(0.2), nn.Linear(512, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1)
        )


def _bce(scores: torch.Tensor, real: bool) -> torch.Tensor:
    target = torch.ones_like(scores) if real else torch.zeros_like(scores)
    return F.binary_cross_entropy_with_logits(scores, target)


@register("can")
class CAN(Distiller):
    """L = KL(T || S) * T^2 + can_weight * BCE(D(softmax(z_S)), 1), after one update of D."""

    settings = (
        Setting(
            "can-weight", 1.0, "CAN weight of the student's adversarial term (added to KD).", "client", within=">= 0"
        ),
        Setting("can-lr", 1e-4, "CAN discriminator Adam learning rate.", "client", within="> 0"),
    )

    def __init__(self, ctx: DistillContext) -> None:
        super().__init__(ctx)
        self.discriminator: nn.Sequential | None = None
        self.optimizer: torch.optim.Adam | None = None

    def _build(self, device: torch.device | str) -> nn.Sequential:
        """D on `device`, created with its optimizer on first use (the batch's device is known only then).

        Moving an existing D keeps its Parameter objects, so the optimizer still holds the right ones
        (this matters when `load_extra_state` built D on ctx.device before the first batch).
        """
        if self.discriminator is None:
            self.discriminator = make_discriminator(self.ctx.num_classes)
            self.optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=self.ctx.can_lr, betas=(0.5, 0.999))
        return self.discriminator.to(device)

    def _update_discriminator(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """One Adam step of D on teacher (real) vs student (fake) vectors; returns D's loss."""
        disc = self.discriminator
        disc.requires_grad_(True)
        d_loss = _bce(disc(real), True) + _bce(disc(fake), False)
        self.optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # Frozen until the next update, so the student's backward pass never reaches D.
        disc.requires_grad_(False)
        return d_loss.detach()

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        ctx = self.ctx
        disc = self._build(student_logits.device)
        t_log_p = teacher_log_probs(teacher_response, ctx.oracle_output)
        s_probs = F.softmax(student_logits, dim=1)
        d_loss = self._update_discriminator(t_log_p.exp().to(s_probs.dtype), s_probs.detach())
        adv = _bce(disc(s_probs), True)
        kl = kl_divergence(t_log_p, student_logits, ctx.temperature)
        loss = kl + ctx.can_weight * adv
        return {"loss": loss, "kl": kl, "adv": adv, "d_loss": d_loss}

    def extra_state(self) -> dict[str, torch.Tensor] | None:
        """A copy of D's weights (None before the first batch built it)."""
        if self.discriminator is None:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.discriminator.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self._build(self.ctx.device).load_state_dict(state)
