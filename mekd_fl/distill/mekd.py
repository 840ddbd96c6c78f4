"""MEKD: distillation through the emulated inverse mapping G (the paper's stage 2).

L = w_e * d(G(S(x)), G(T(x))) + w_kl * KL(T(x) || S(x)) with d = L1 (default) or L2 (mean squared).
G is frozen: its weights get no gradient and stay in eval mode (BatchNorm statistics fixed), but the
gradient of the image distance flows *through* G into the student, which is the point of the method:
the student is pulled toward outputs whose emulated pre-images look like the teacher's.

Speed (issue 9): the teacher's answers are fixed within a round, so `prepare` computes G(T(x)) once for
all of them and each step reads its rows (`index=`); and the emulator's Generator runs through
`FrozenGenerator`, the same function rewritten for a frozen G (BatchNorm folded into the weights, each
nearest-neighbour upsampling and the 3x3 convolution after it merged into one stride-2 transposed
convolution: 16 instead of 36 multiply-adds per output pixel and channel pair, and no upsampled copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.distill.base import DistillContext, Distiller, kl_divergence, register, teacher_log_probs
from mekd_fl.distill.dkd import dkd_loss
from mekd_fl.errors import ConfigError
from mekd_fl.models.gan import Generator, upsample_conv_kernel
from mekd_fl.settings.schema import Setting

_TARGET_CHUNK = 512  # images per generator forward in `prepare` (bounds its activation memory)
_SYNTHETIC_NOISE = 0.5  # std of the log-space noise around a synthesised answer (weight-synthetic)
METHOD_WEIGHT = -1.0  # weight-emulation's "the method's own" (`MEKD.own_emulation_weight`)


def _method_weight(setting: Setting, value: float) -> None:
    """A weight is >= 0, or -1 for the method's own (`MEKD.own_emulation_weight`)."""
    if value < 0 and value != METHOD_WEIGHT:
        raise ConfigError(f"{setting.name}={value} must be >= 0, or -1 (the method's own: 1 for mekd, 10 for mekd-dkd)")


def generator_input(scores: torch.Tensor, how: str, temperature: float) -> torch.Tensor:
    """What G receives: probabilities (softmax at T=1) or temperature-scaled logits (scores / T).

    G was trained on z ~ N(0, I_C); scaled logits sit closer to that range than probabilities, which
    is why the authors' later code feeds logits / T. Both are offered; probabilities are the paper's.
    `scores` are logits, or log-probabilities when the oracle answers probabilities (teacher and
    student then both go through log-softmax, so the two inputs stay comparable).
    """
    return scores.softmax(1) if how == "probs" else scores / temperature


def teacher_codes(responses: torch.Tensor, oracle_output: str, emulator_input: str, temperature: float) -> torch.Tensor:
    """What G receives for the teacher's answers, G(T(x))'s input: the one definition shared by the MEKD term
    and the paired emulator's training (which must feed G exactly what distillation will)."""
    scores = responses.float() if oracle_output == "logits" else teacher_log_probs(responses, oracle_output)
    return generator_input(scores, emulator_input, temperature)


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _layout_fits(g: nn.Module) -> bool:
    """Whether `g` is the emulator's Generator with the layer stack FrozenGenerator rewrites."""
    if not isinstance(g, Generator) or len(g.body) != 11:
        return False
    kinds = (
        nn.BatchNorm2d, nn.Upsample, nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU,
        nn.Upsample, nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU, nn.Conv2d, nn.Tanh,
    )  # fmt: skip
    if any(type(m) is not k for m, k in zip(g.body, kinds, strict=True)):
        return False
    ups = (g.body[1], g.body[5])
    if any(u.mode != "nearest" or u.size is not None or float(u.scale_factor) != 2.0 for u in ups):
        return False
    convs = (g.body[2], g.body[6], g.body[9])
    plain = all(
        c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1) and c.dilation == (1, 1)
        and c.groups == 1 and c.padding_mode == "zeros"
        for c in convs
    )  # fmt: skip
    bns = (g.body[0], g.body[3], g.body[7])
    return plain and all(bn.running_mean is not None and bn.affine for bn in bns)


class FrozenGenerator(nn.Module):
    """A frozen eval-mode Generator rewritten for speed: the same function, to float rounding.

    - BatchNorm in eval is a per-channel affine map: the first one (after the linear layer) is folded
      into the linear weights, the others into the convolution before them.
    - Nearest 2x upsampling, then a 3x3 convolution (padding 1), is a 4x4 transposed convolution of
      stride 2 (padding 1) of the small map (`upsample_conv_kernel`), as in Generator.forward.

    Its tensors are copies taken when it is built, none requiring gradient: the gradient flows to the
    input only. Build it again if the generator's weights change. It computes in channels-last memory
    layout (the values are the same).
    """

    def __init__(self, g: Generator) -> None:
        super().__init__()
        if not _layout_fits(g):
            raise ValueError("FrozenGenerator rewrites the emulator's Generator layout only")
        body = g.body
        self.latent_dim = g.latent_dim
        self._map = (g._init_channels, g._init_side, g._init_side)
        self._slopes = (body[4].negative_slope, body[8].negative_slope)
        with torch.no_grad():
            scale, shift = _bn_affine(body[0])
            per_unit = g._init_side**2  # the linear output is viewed as (channels, side, side)
            scale, shift = scale.repeat_interleave(per_unit), shift.repeat_interleave(per_unit)
            self.register_buffer("fc_w", g.fc.weight * scale[:, None])
            self.register_buffer("fc_b", g.fc.bias * scale + shift)
            for name, conv, bn in (("up1", body[2], body[3]), ("up2", body[6], body[7])):
                kernel, bias = self._upsample_conv(conv, bn)
                self.register_buffer(f"{name}_w", kernel)
                self.register_buffer(f"{name}_b", bias)
            self.register_buffer("out_w", body[9].weight.detach().clone())
            self.register_buffer("out_b", body[9].bias.detach().clone() if body[9].bias is not None else None)

    @staticmethod
    def _upsample_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """(Upsample x2, conv 3x3, BatchNorm) as a transposed-convolution kernel (in, out, 4, 4) and bias."""
        scale, shift = _bn_affine(bn)
        w = conv.weight * scale[:, None, None, None]
        bias = (conv.bias * scale if conv.bias is not None else 0.0) + shift
        return upsample_conv_kernel(w).contiguous(), bias.contiguous()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"generator expects input (B, {self.latent_dim}), got {tuple(z.shape)}")
        # Channels-last: oneDNN's (transposed) convolutions then skip a layout reorder each way (CPU: the
        # MEKD/KD step ratio at 1 thread went from about 1.25 to 1.17 with it).
        h = F.linear(z, self.fc_w, self.fc_b).view(-1, *self._map).contiguous(memory_format=torch.channels_last)
        h = F.leaky_relu(F.conv_transpose2d(h, self.up1_w, self.up1_b, stride=2, padding=1), self._slopes[0])
        h = F.leaky_relu(F.conv_transpose2d(h, self.up2_w, self.up2_b, stride=2, padding=1), self._slopes[1])
        return torch.tanh(F.conv2d(h, self.out_w, self.out_b, padding=1))


def frozen_generator(g: nn.Module) -> nn.Module:
    """The fastest form of a frozen eval-mode generator: FrozenGenerator when the layout fits, else `g`."""
    return FrozenGenerator(g) if _layout_fits(g) else g


@register("mekd")
class MEKD(Distiller):
    """L = weight_emulation * d(G(S(x)), G(T(x))) + weight_kl * KL(T(x) || S(x)), G frozen (module docstring)."""

    settings = (
        Setting("distance", "l1", "MEKD image distance d(G(S(x)), G(T(x))).", "client", choices=("l1", "l2")),
        Setting(
            "emulator-input",
            "probs",
            "What G receives: probs (softmax at T=1) or logits (logits / T).",
            "client",
            choices=("probs", "logits"),
        ),
        Setting(
            "weight-emulation",
            -1.0,
            "Weight of the emulation term d(G(S(x)), G(T(x))); -1: the method's own, 1 for mekd (the "
            "paper's) and 10 for mekd-dkd (measured at convergence: docs/methods.md).",
            "client",
            rule=_method_weight,
        ),
        Setting("weight-kl", 1.0, "Weight of the KL term.", "client", within=">= 0"),
        Setting(
            "weight-synthetic",
            0.0,
            "Weight of the query-free synthesised pairs: per batch, answers p' drawn between two of the "
            "client's paid answers and around them, and the student taught p' on G(p') (0: off; needs a "
            "paired emulator).",
            "client",
            within=">= 0",
        ),
    )
    needs_generator = True
    batch_index = True
    #: weight-emulation when the run leaves it at -1: the paper's weight on KD's KL.
    own_emulation_weight = 1.0

    def __init__(self, ctx: DistillContext) -> None:
        super().__init__(ctx)
        self.generator = ctx.generator
        self.generator.eval()
        for p in self.generator.parameters():
            p.requires_grad_(False)
        self._g = frozen_generator(self.generator)
        self._targets: torch.Tensor | None = None  # G(T(x)) for the answers given to `prepare`
        #: The emulation term's weight in this run: weight-emulation, or the method's own when it is -1.
        self.emulation_weight = self.resolved_weight(ctx.weight_emulation)

    @classmethod
    def resolved_weight(cls, chosen: float) -> float:
        """weight-emulation as this method runs with it: `own_emulation_weight` for -1."""
        return cls.own_emulation_weight if chosen == METHOD_WEIGHT else chosen

    @classmethod
    def runs_with(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Distiller.runs_with, with weight-emulation's -1 resolved to the method's own weight."""
        run = super().runs_with(values)
        if "weight-emulation" in run:
            run["weight-emulation"] = cls.resolved_weight(float(run["weight-emulation"]))
        return run

    def _target(self, teacher_response: torch.Tensor) -> torch.Tensor:
        """G(T(x)), without gradient."""
        ctx = self.ctx
        codes = teacher_codes(teacher_response, ctx.oracle_output, ctx.emulator_input, ctx.temperature)
        with torch.no_grad():
            return self._g(codes)

    def prepare(self, responses: torch.Tensor) -> None:
        """G(T(x)) for all the round's answers, once, in chunks (float32: 4 bytes per pixel per answer).

        The answers are fixed within a round, so this is the per-step target read by row (`index=`);
        float32 keeps the loss equal to the per-step formula (half precision would shift it by ~1e-3).
        """
        self._targets = None
        n = len(responses)
        if n == 0:
            return
        first = self._target(responses[:_TARGET_CHUNK])
        out = first.new_empty((n, *first.shape[1:]))
        out[: len(first)] = first
        for start in range(_TARGET_CHUNK, n, _TARGET_CHUNK):
            out[start : start + _TARGET_CHUNK] = self._target(responses[start : start + _TARGET_CHUNK])
        self._targets = out

    def losses(
        self,
        student_logits: torch.Tensor,
        teacher_response: torch.Tensor,
        images: torch.Tensor,
        epoch: float,
        labels: torch.Tensor | None = None,
        index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """`index`: the batch's rows in the answers given to `prepare` (then G(T(x)) is read, not computed)."""
        ctx = self.ctx
        t_log_p = teacher_log_probs(teacher_response, ctx.oracle_output)
        raw_logits = ctx.oracle_output == "logits"
        s_scores = student_logits if raw_logits else F.log_softmax(student_logits, dim=1)
        cached = index is not None and self._targets is not None
        target = self._targets[index] if cached else self._target(teacher_response)
        # float(): under bf16 autocast G runs in bfloat16; the distance is taken in float32 like its target
        emulated = self._g(generator_input(s_scores, ctx.emulator_input, ctx.temperature)).float()
        dist = F.l1_loss(emulated, target) if ctx.distance == "l1" else F.mse_loss(emulated, target)
        parts = self.distillation(t_log_p, student_logits, epoch)
        return {**parts, "loss": self.emulation_weight * dist + parts["loss"], "emulation": dist}

    def synthetic(self, responses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Query-free pairs (issue 22, variant b): answers p' between two of the batch's answers (a uniform
        mix) and around them (log-space noise of scale `_SYNTHETIC_NOISE`), and G(p') as their images.

        Why: a paired G renders any answer vector as an image of what it names, so the student can be
        taught answers the teacher was never asked for, from what the client already paid for: nothing is
        sent and nothing new is learnt about the teacher beyond its answers. Random numbers come from
        torch's global generator, which the client seeds per round.
        """
        if self.ctx.weight_synthetic == 0 or len(responses) < 2:
            return None
        ctx = self.ctx
        p = teacher_log_probs(responses.float(), ctx.oracle_output).exp()
        lam = torch.rand(len(p), 1, device=p.device)
        mixed = lam * p + (1 - lam) * p[torch.randperm(len(p), device=p.device)]
        noisy = mixed.clamp_min(1e-8).log() + _SYNTHETIC_NOISE * torch.randn_like(mixed)
        targets = noisy.softmax(1)
        codes = generator_input(targets.log(), ctx.emulator_input, ctx.temperature)
        with torch.no_grad():
            images = self._g(codes).float().add(1.0).div(2.0).clamp(0.0, 1.0)
        return images, targets

    def synthetic_loss(self, student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """weight-synthetic x KL(p' || S(G(p'))) at the run's temperature (x T^2), as KD's term."""
        kl = kl_divergence(targets.clamp_min(1e-8).log(), student_logits, self.ctx.temperature)
        return self.ctx.weight_synthetic * kl

    def distillation(
        self, t_log_p: torch.Tensor, student_logits: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        """The term beside the emulation term ("loss": its weighted value, plus its named parts): KD's KL."""
        kl = kl_divergence(t_log_p, student_logits, self.ctx.temperature)
        return {"loss": self.ctx.weight_kl * kl, "kl": kl}


@register("mekd-dkd")
class MEKDOnDKD(MEKD):
    """L = weight_emulation * d(G(S(x)), G(T(x))) + DKD's loss (dkd-alpha, dkd-beta, dkd-warmup).

    Why: DKD leads KD on skewed splits; this asks whether the emulation term adds to the stronger
    logit loss as it does to KD's KL. weight-kl is not read (DKD's own weights replace it).
    Its own emulation weight is 10, not 1: at 1 the term's gradient is 1-5 % of DKD's loss's
    (experiments/bench_term_gradients.py) and barely moves the student; at 10 it ended above weight 1 in
    every converged cell measured and above DKD in most (docs/methods.md).
    """

    own_emulation_weight = 10.0
    reads_settings_of = ("dkd",)

    def distillation(
        self, t_log_p: torch.Tensor, student_logits: torch.Tensor, epoch: float
    ) -> dict[str, torch.Tensor]:
        return dkd_loss(t_log_p, student_logits, epoch, self.ctx)
