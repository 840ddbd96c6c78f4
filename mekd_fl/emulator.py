"""Mapping emulation: train a GAN whose generator input is the label space.

MEKD never sees the teacher's training data. Instead each client trains a
generator G with a C-dimensional input (one dim per class) as a GAN on its own
unlabeled images, with z ~ N(0, I_C). Later, G(softmax(teacher(x))) maps label
space back to image space, i.e. G emulates the inverse of the teacher's
mapping. Labels are never used here.

The paper says any GAN works and compares three (its Table 5), so three kinds
are offered, all with the same :class:`Generator` so G is interchangeable
downstream:

- ``dcgan``: non-saturating GAN loss, BatchNorm discriminator (the default);
- ``wgan-gp`` (Gulrajani et al. 2017): critic without BatchNorm, ``n_critic``
  critic steps per generator step, gradient penalty ``gp_lambda``;
- ``infogan``: DCGAN plus a Q head recovering the generator's whole C-dim input,
  which pushes G to keep every input direction visible in its images, the
  property MEKD relies on when it feeds G teacher outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mekd_fl.errors import ConfigError
from mekd_fl.models.gan import Critic, Discriminator, Generator, ImageShape, InfoDiscriminator, init_dcgan_weights
from mekd_fl.precision import autocast
from mekd_fl.settings.run import run_setting


def _from_setting(name: str) -> Any:
    """A field that is the run setting `name`: its default is the setting's, `from_settings` reads it."""
    return field(default=run_setting(name).default, metadata={"setting": name})


@dataclass
class EmulatorConfig:
    """Hyper-parameters of one emulator training phase.

    Short field names for the GAN code; each field that is a run setting names it (`_from_setting`), so
    its default is the schema's and `from_settings` fills it from a RunConfig or EdgeSettings.
    """

    steps: int = _from_setting("emulator-steps")  # generator updates
    batch_size: int = _from_setting("emulator-batch-size")
    lr: float = _from_setting("emulator-lr")
    betas: tuple[float, float] | None = None  # Adam betas; None: the kind's usual ones (see _KINDS)
    width: int = _from_setting("emulator-width")
    seed: int = 0  # not a setting: a run gives each client its own seed, derived from `seed`
    kind: str = _from_setting("emulator")  # one of EMULATORS
    n_critic: int = _from_setting("wgan-n-critic")  # wgan-gp: critic steps per generator step
    gp_lambda: float = _from_setting("wgan-gp-lambda")  # wgan-gp: gradient-penalty weight
    info_weight: float = _from_setting("infogan-weight")  # infogan: weight of the code-reconstruction (Q) loss
    pairing_weight: float = _from_setting("emulator-pairing-weight")  # paired: weight of |G(T(x)) - x|
    pairing_gan: bool = _from_setting("emulator-pairing-gan")  # paired: also the GAN term (else L1 alone, no D)
    precision: str = _from_setting("precision")  # fp32, or bf16 autocast for the GAN's forward passes

    @classmethod
    def from_settings(cls, values: Any, **overrides: Any) -> EmulatorConfig:
        """The fields that are settings read from `values` (a RunConfig or EdgeSettings), then `overrides`."""
        read = {f.name: getattr(values, f.metadata["setting"].replace("-", "_")) for f in fields(cls) if f.metadata}
        return cls(**{**read, **overrides})


@dataclass
class EmulatorResult:
    """Trained networks (in eval mode) and losses averaged over the last 10% of generator steps.

    ``d_loss``/``g_loss`` are the full objectives each network minimises (for
    wgan-gp the critic loss includes the penalty, averaged over critic steps;
    for infogan both include the weighted Q loss). ``steps`` counts generator steps.
    """

    generator: Generator
    discriminator: nn.Module
    d_loss: float
    g_loss: float
    steps: int


def to_gan_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1], matching the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)


def from_gan_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_gan_range`; clamps so any generator output is a valid image."""
    return x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def gradient_penalty(
    critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """WGAN-GP penalty E[(||grad_x critic(x_hat)||_2 - 1)^2] at random interpolates of real and fake.

    One uniform weight per sample (drawn from ``generator``, on its device,
    for runs that match across devices). The graph is kept (create_graph) so
    the penalty can be back-propagated into the critic's weights.
    """
    eps_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps_device = generator.device if generator is not None else real.device
    eps = torch.rand(eps_shape, generator=generator, device=eps_device).to(real.device)
    # float32 interpolates, also when G ran under bf16 autocast (lerp needs one dtype)
    x_hat = torch.lerp(fake.detach().float(), real.detach().float(), eps).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return (grad.flatten(1).norm(2, dim=1) - 1.0).square().mean()


@dataclass
class _Loop:
    """What one generator step needs. Batches and noise come from one CPU RNG so runs match across devices."""

    data: torch.Tensor  # uint8 on device: 4x smaller than floats
    generator: Generator
    discriminator: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    cfg: EmulatorConfig
    rng: torch.Generator
    device: torch.device
    codes: torch.Tensor | None = None  # paired: G's input for each image (the teacher's answer), on device

    def real_batch(self) -> torch.Tensor:
        return self.batch()[0]

    def noise(self) -> torch.Tensor:
        return torch.randn(self.cfg.batch_size, self.generator.latent_dim, generator=self.rng).to(self.device)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real images, G's inputs): unpaired, noise independent of the images; paired, each image's own
        answer, so that G(code) can be compared with its image."""
        idx = torch.randint(len(self.data), (self.cfg.batch_size,), generator=self.rng).to(self.device)
        real = to_gan_range(self.data[idx])
        return real, (self.codes[idx] if self.codes is not None else self.noise())

    def generator_input(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """For a generator update: (the images the codes belong to, or None when unpaired, codes)."""
        if self.codes is None:
            return None, self.noise()
        return self.batch()

    def reconstruction(self, fake: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
        """Paired: pairing_weight * mean |G(T(x)) - x| (what makes G invert the teacher); unpaired: 0."""
        if real is None:
            return torch.zeros((), device=fake.device)
        return self.cfg.pairing_weight * F.l1_loss(fake, real)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def _update(opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _dcgan_step(loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """One discriminator and one generator update with the non-saturating GAN loss (plus, paired, the
    reconstruction of each image from its own answer)."""
    real, z = loop.batch()
    fake = loop.generator(z)
    disc = loop.discriminator
    d_loss = _bce(disc(real), 1.0) + _bce(disc(fake.detach()), 0.0)
    _update(loop.opt_d, d_loss)
    g_loss = _bce(disc(fake), 1.0) + loop.reconstruction(fake, real if loop.codes is not None else None)
    _update(loop.opt_g, g_loss)
    return d_loss.detach(), g_loss.detach()


def _infogan_step(loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """DCGAN step plus the Q loss: MSE between q(G(z)) and z (unit-variance Gaussian NLL up to scale).

    The Q loss enters the discriminator update (training the Q head and the
    shared trunk on detached fakes) and the generator update (training G to
    keep its code recoverable).
    """
    real, z = loop.batch()
    fake = loop.generator(z)
    disc: InfoDiscriminator = loop.discriminator  # type: ignore[assignment]
    weight = loop.cfg.info_weight
    logit_fake, code_fake = disc.heads(fake.detach())
    d_loss = _bce(disc(real), 1.0) + _bce(logit_fake, 0.0) + weight * F.mse_loss(code_fake, z)
    _update(loop.opt_d, d_loss)
    logit, code = disc.heads(fake)
    g_loss = _bce(logit, 1.0) + weight * F.mse_loss(code, z)
    g_loss = g_loss + loop.reconstruction(fake, real if loop.codes is not None else None)
    _update(loop.opt_g, g_loss)
    return d_loss.detach(), g_loss.detach()


def _regression_step(loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """Paired without the GAN term: one generator update on the reconstruction alone; D is not used.

    Why it is offered (and the default): with the reconstruction weighted 100x, the GAN term hardly moves
    G, yet it costs the discriminator's passes and makes the fidelity swing from step to step. Measured on
    one client of 4,063 Fashion-MNIST images (batch 32, lr 3e-3, one thread): 100 steps in 1.9 s with a
    consistency of 0.94, against 2.9 s and 0.80 with the GAN term (0.95 at 150 steps).
    """
    real, z = loop.batch()
    g_loss = loop.reconstruction(loop.generator(z), real)
    _update(loop.opt_g, g_loss)
    return torch.zeros((), device=g_loss.device), g_loss.detach()


def _wgan_gp_step(loop: _Loop) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_critic`` critic updates on D(fake) - D(real) + lambda * GP, then one generator update on -D(G(z))."""
    critic, cfg = loop.discriminator, loop.cfg
    c_sum = torch.zeros((), device=loop.device)
    for _ in range(cfg.n_critic):
        real, z = loop.batch()
        with torch.no_grad():
            fake = loop.generator(z)
        penalty = gradient_penalty(critic, real, fake, loop.rng)
        c_loss = critic(fake).mean() - critic(real).mean() + cfg.gp_lambda * penalty
        _update(loop.opt_d, c_loss)
        c_sum += c_loss.detach()
    paired_real, z = loop.generator_input()
    fake = loop.generator(z)
    g_loss = -critic(fake).mean() + loop.reconstruction(fake, paired_real)
    _update(loop.opt_g, g_loss)
    return c_sum / cfg.n_critic, g_loss.detach()


@dataclass(frozen=True)
class _Kind:
    """How one emulator kind builds its discriminator and trains; ``discriminator`` is the type a given D must have."""

    discriminator: type[nn.Module]
    build_discriminator: Callable[[int, ImageShape, int], nn.Module]  # (num_classes, image_shape, width)
    step: Callable[[_Loop], tuple[torch.Tensor, torch.Tensor]]  # one generator step -> (d_loss, g_loss)
    betas: tuple[float, float]


_KINDS: dict[str, _Kind] = {
    "dcgan": _Kind(Discriminator, lambda c, shape, w: Discriminator(shape, w), _dcgan_step, (0.5, 0.999)),
    "wgan-gp": _Kind(Critic, lambda c, shape, w: Critic(shape, w), _wgan_gp_step, (0.5, 0.9)),
    "infogan": _Kind(
        InfoDiscriminator, lambda c, shape, w: InfoDiscriminator(shape, c, w), _infogan_step, (0.5, 0.999)
    ),
}
EMULATORS: tuple[str, ...] = tuple(_KINDS)


def _kind(name: str) -> _Kind:
    if name not in _KINDS:
        raise ConfigError(f"emulator={name!r} is not accepted; accepted: {', '.join(EMULATORS)}")
    return _KINDS[name]


def build_emulator(
    num_classes: int, image_shape: ImageShape, width: int, kind: str = "dcgan"
) -> tuple[Generator, nn.Module]:
    """Fresh (generator, discriminator) pair of ``kind`` with DCGAN init; G takes exactly ``num_classes`` inputs.

    The construction is deterministic in shape, so every client's networks of
    one kind have identical state_dict keys and shapes and can be averaged.
    """
    spec = _kind(kind)
    generator = Generator(num_classes, image_shape, width)
    discriminator = spec.build_discriminator(num_classes, image_shape, width)
    generator.apply(init_dcgan_weights)
    discriminator.apply(init_dcgan_weights)
    return generator, discriminator


def train_emulator(
    images: torch.Tensor,
    num_classes: int,
    cfg: EmulatorConfig,
    device: torch.device,
    generator: Generator | None = None,
    discriminator: nn.Module | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
    codes: torch.Tensor | None = None,
) -> EmulatorResult:
    """Train (or continue training) the emulator GAN of ``cfg.kind`` on unlabeled uint8 images (N, C, H, W).

    Passing ``generator``/``discriminator`` continues from them, so a strategy can
    average the networks across clients between phases. Optimiser state is fresh
    each call. Everything random (init, minibatches, noise, dropout, interpolates)
    derives from ``cfg.seed`` without disturbing the caller's global RNG state.

    ``codes`` (N, num_classes), one per image, makes the emulator *paired*: G is fed each image's own
    code (the teacher's answer to it, as G will receive it when distilling) instead of noise, and its
    update adds ``cfg.pairing_weight * |G(code) - image|``; unless ``cfg.pairing_gan``, that reconstruction
    is G's whole loss and the discriminator is returned untrained. Why: an unconditional GAN on
    z ~ N(0, I_C) ties no input direction to a class, so G(T(x)) collapses to one figure whatever T(x)
    says; trained on the pairs, G inverts the teacher's mapping, which is what the emulation term assumes.
    """
    spec = _kind(cfg.kind)
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"emulator expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if cfg.steps < 1 or cfg.n_critic < 1:
        raise ValueError(f"emulator steps and n_critic must be >= 1, got {cfg.steps} and {cfg.n_critic}")
    if generator is not None and generator.latent_dim != num_classes:
        raise ValueError(f"generator input has {generator.latent_dim} dims, expected {num_classes} (one per class)")
    if codes is not None and (
        codes.dim() != 2 or codes.shape != (len(images), num_classes) or not torch.isfinite(codes).all()
    ):
        raise ValueError(
            f"paired emulator: codes must be finite, shape ({len(images)}, {num_classes}) (one per image); "
            f"got {tuple(codes.shape)}"
        )
    if discriminator is not None and not isinstance(discriminator, spec.discriminator):
        raise ValueError(
            f"emulator {cfg.kind!r} needs a {spec.discriminator.__name__}, got {type(discriminator).__name__}"
        )

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        if generator is None or discriminator is None:
            fresh_g, fresh_d = build_emulator(num_classes, tuple(images.shape[1:]), cfg.width, cfg.kind)
            generator = fresh_g if generator is None else generator
            discriminator = fresh_d if discriminator is None else discriminator
        d_loss, g_loss = _run_gan(images, cfg, spec, device, generator, discriminator, log_every, log, codes)

    # back to the default layout: the weights are averaged with other clients' and sent in messages
    generator.to(memory_format=torch.contiguous_format).eval()
    discriminator.to(memory_format=torch.contiguous_format).eval()
    return EmulatorResult(generator, discriminator, d_loss, g_loss, cfg.steps)


def _run_gan(
    images: torch.Tensor,
    cfg: EmulatorConfig,
    spec: _Kind,
    device: torch.device,
    generator: Generator,
    discriminator: nn.Module,
    log_every: int,
    log: Callable[[str], None],
    codes: torch.Tensor | None = None,
) -> tuple[float, float]:
    """``cfg.steps`` generator steps of ``spec`` (paired without the GAN term: `_regression_step`); returns
    (d_loss, g_loss) averaged over the last 10% of steps.

    The networks train in channels-last memory layout (the same function, to float rounding), as
    FrozenGenerator computes: a paired step at the default width 8, batch 32, took 8.8 ms instead of 12.9
    on one CPU thread (interleaved, 200 steps each), and the emulators are most of MEKD's extra cost.
    """
    generator.to(device, memory_format=torch.channels_last).train()
    discriminator.to(device, memory_format=torch.channels_last).train()
    betas = spec.betas if cfg.betas is None else cfg.betas
    loop = _Loop(
        data=images.to(device),
        generator=generator,
        discriminator=discriminator,
        opt_g=torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=betas),
        opt_d=torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=betas),
        cfg=cfg,
        rng=torch.Generator().manual_seed(cfg.seed),
        device=device,
        codes=codes.to(device=device, dtype=torch.float32) if codes is not None else None,
    )
    tail_start = cfg.steps - max(1, cfg.steps // 10)
    d_tail = torch.zeros((), device=device)
    g_tail = torch.zeros((), device=device)
    step = spec.step if codes is None or cfg.pairing_gan else _regression_step

    for i in range(cfg.steps):
        with autocast(device, cfg.precision):
            d_loss, g_loss = step(loop)
        if i >= tail_start:
            d_tail += d_loss
            g_tail += g_loss
        if log_every and (i + 1) % log_every == 0:
            log(f"emulator step {i + 1}/{cfg.steps}: d_loss={d_loss.item():.4f} g_loss={g_loss.item():.4f}")

    n_tail = cfg.steps - tail_start
    return d_tail.item() / n_tail, g_tail.item() / n_tail
