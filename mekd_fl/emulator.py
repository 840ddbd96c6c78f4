"""Mapping emulation: train a GAN whose generator input is the label space.

MEKD never sees the teacher's training data. Instead each client trains a
generator G with a C-dimensional input (one dim per class) as a GAN on its own
unlabeled images, with z ~ N(0, I_C). Later, G(softmax(teacher(x))) maps label
space back to image space, i.e. G emulates the inverse of the teacher's
mapping. Labels are never used here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from mekd_fl.models.gan import Discriminator, Generator, ImageShape, init_dcgan_weights


@dataclass
class EmulatorConfig:
    """Hyper-parameters of one emulator training phase."""

    steps: int = 300  # generator updates
    batch_size: int = 64
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    width: int = 32
    seed: int = 0


@dataclass
class EmulatorResult:
    """Trained networks (in eval mode) and losses averaged over the last 10% of steps."""

    generator: Generator
    discriminator: Discriminator
    d_loss: float
    g_loss: float
    steps: int


def to_gan_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float in [-1, 1], matching the generator's tanh."""
    return images_uint8.float().div(127.5).sub(1.0)


def from_gan_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_gan_range`; clamps so any generator output is a valid image."""
    return x.clamp(-1.0, 1.0).add(1.0).mul(127.5).round().to(torch.uint8)


def build_emulator(num_classes: int, image_shape: ImageShape, width: int) -> tuple[Generator, Discriminator]:
    """Fresh DCGAN pair with DCGAN init; the generator takes exactly ``num_classes`` inputs."""
    generator = Generator(num_classes, image_shape, width)
    discriminator = Discriminator(image_shape, width)
    generator.apply(init_dcgan_weights)
    discriminator.apply(init_dcgan_weights)
    return generator, discriminator


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def train_emulator(
    images: torch.Tensor,
    num_classes: int,
    cfg: EmulatorConfig,
    device: torch.device,
    generator: Generator | None = None,
    discriminator: Discriminator | None = None,
    log_every: int = 0,
    log: Callable[[str], None] = print,
) -> EmulatorResult:
    """Train (or continue training) the emulator GAN on unlabeled uint8 images (N, C, H, W).

    Passing ``generator``/``discriminator`` continues from them, so a strategy can
    average the networks across clients between phases. Optimiser state is fresh
    each call. Everything random (init, minibatches, noise, dropout) derives from
    ``cfg.seed`` without disturbing the caller's global RNG state.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"emulator expects uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if cfg.steps < 1:
        raise ValueError(f"emulator steps must be >= 1, got {cfg.steps}")
    if generator is not None and generator.latent_dim != num_classes:
        raise ValueError(f"generator input has {generator.latent_dim} dims, expected {num_classes} (one per class)")

    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(cfg.seed)
        if generator is None or discriminator is None:
            fresh_g, fresh_d = build_emulator(num_classes, tuple(images.shape[1:]), cfg.width)
            generator = fresh_g if generator is None else generator
            discriminator = fresh_d if discriminator is None else discriminator
        d_loss, g_loss = _run_gan(images, num_classes, cfg, device, generator, discriminator, log_every, log)

    generator.eval()
    discriminator.eval()
    return EmulatorResult(generator, discriminator, d_loss, g_loss, cfg.steps)


def _run_gan(
    images: torch.Tensor,
    num_classes: int,
    cfg: EmulatorConfig,
    device: torch.device,
    generator: nn.Module,
    discriminator: nn.Module,
    log_every: int,
    log: Callable[[str], None],
) -> tuple[float, float]:
    """Non-saturating GAN loop; returns (d_loss, g_loss) averaged over the last 10% of steps."""
    data = images.to(device)  # kept uint8 on device: 4x smaller than floats
    generator.to(device).train()
    discriminator.to(device).train()
    opt_g = torch.optim.Adam(generator.parameters(), lr=cfg.lr, betas=cfg.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=cfg.lr, betas=cfg.betas)
    # Batches and noise come from a CPU generator so runs match across devices.
    rng = torch.Generator().manual_seed(cfg.seed)
    tail_start = cfg.steps - max(1, cfg.steps // 10)
    d_tail = torch.zeros((), device=device)
    g_tail = torch.zeros((), device=device)

    for step in range(cfg.steps):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=rng)
        real = to_gan_range(data[idx.to(device)])
        z = torch.randn(cfg.batch_size, num_classes, generator=rng).to(device)
        fake = generator(z)

        opt_d.zero_grad(set_to_none=True)
        d_loss = _bce(discriminator(real), 1.0) + _bce(discriminator(fake.detach()), 0.0)
        d_loss.backward()
        opt_d.step()

        opt_g.zero_grad(set_to_none=True)
        g_loss = _bce(discriminator(fake), 1.0)
        g_loss.backward()
        opt_g.step()

        if step >= tail_start:
            d_tail += d_loss.detach()
            g_tail += g_loss.detach()
        if log_every and (step + 1) % log_every == 0:
            log(f"emulator step {step + 1}/{cfg.steps}: d_loss={d_loss.item():.4f} g_loss={g_loss.item():.4f}")

    n_tail = cfg.steps - tail_start
    return d_tail.item() / n_tail, g_tail.item() / n_tail
