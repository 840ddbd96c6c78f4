"""Mapping-emulator training on a tiny toy set: runs, is reproducible, and learns."""

import pytest
import torch

from mekd_fl.emulator import (
    EmulatorConfig,
    build_emulator,
    from_gan_range,
    to_gan_range,
    train_emulator,
)

CPU = torch.device("cpu")
CFG = EmulatorConfig(steps=30, batch_size=32, width=8, lr=1e-3, seed=3)


def toy_images(n: int, seed: int) -> torch.Tensor:
    """Two simple unlabeled patterns: horizontal and vertical bars, with noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(2, 1, 28, 28)
    base[0, :, 10:18, :] = 1.0
    base[1, :, :, 10:18] = 1.0
    pick = torch.randint(2, (n,), generator=g)
    x = base[pick] * 200 + torch.rand(n, 1, 28, 28, generator=g) * 55
    return x.to(torch.uint8)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return toy_images(256, seed=0)


@pytest.fixture(scope="module")
def trained(images: torch.Tensor):
    return train_emulator(images, num_classes=2, cfg=CFG, device=CPU)


def test_gan_range_round_trip() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_gan_range(x)
    assert y.min() == -1 and y.max() == 1
    assert torch.equal(from_gan_range(y), x)
    assert from_gan_range(torch.tensor([-5.0, 5.0])).tolist() == [0, 255]


def test_build_emulator_latent_is_num_classes() -> None:
    gen, _ = build_emulator(5, (1, 28, 28), width=8)
    assert gen.fc.in_features == 5


def test_training_runs_and_losses_finite(trained) -> None:
    assert trained.steps == CFG.steps
    assert torch.isfinite(torch.tensor([trained.d_loss, trained.g_loss])).all()
    assert not trained.generator.training and not trained.discriminator.training


def test_same_seed_same_generator(images: torch.Tensor, trained) -> None:
    before = torch.get_rng_state()
    again = train_emulator(images, num_classes=2, cfg=CFG, device=CPU)
    assert torch.equal(torch.get_rng_state(), before), "global RNG must be left untouched"
    for a, b in zip(trained.generator.state_dict().values(), again.generator.state_dict().values()):
        assert torch.equal(a, b)


def test_discriminator_separates_real_from_fake(trained) -> None:
    held_out = to_gan_range(toy_images(128, seed=1))
    with torch.no_grad():
        fake = trained.generator(torch.randn(128, 2, generator=torch.Generator().manual_seed(9)))
        real_logit = trained.discriminator(held_out).mean()
        fake_logit = trained.discriminator(fake).mean()
    assert real_logit > fake_logit


def test_continue_training_from_given_networks(images: torch.Tensor, trained) -> None:
    gen, disc = trained.generator, trained.discriminator
    start = {k: v.clone() for k, v in gen.state_dict().items()}
    cfg = EmulatorConfig(steps=5, batch_size=32, width=8, seed=4)
    result = train_emulator(images, 2, cfg, CPU, generator=gen, discriminator=disc)
    assert result.generator is gen and result.discriminator is disc
    assert not torch.equal(start["fc.weight"], gen.state_dict()["fc.weight"])


def test_rejects_wrong_generator_latent(images: torch.Tensor) -> None:
    gen, disc = build_emulator(3, (1, 28, 28), width=8)
    with pytest.raises(ValueError):
        train_emulator(images, 2, CFG, CPU, generator=gen, discriminator=disc)


def test_rejects_float_images(images: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        train_emulator(images.float(), 2, CFG, CPU)


def test_logs_progress(images: torch.Tensor) -> None:
    lines: list[str] = []
    cfg = EmulatorConfig(steps=4, batch_size=8, width=8)
    train_emulator(images, 2, cfg, CPU, log_every=2, log=lines.append)
    assert len(lines) == 2 and "step 4/4" in lines[-1]
