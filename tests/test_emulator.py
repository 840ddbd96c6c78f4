"""Mapping-emulator training on a tiny toy set: runs, is reproducible, and learns, for every GAN kind."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from mekd_fl.emulator import (
    EMULATORS,
    EmulatorConfig,
    build_emulator,
    from_gan_range,
    gradient_penalty,
    to_gan_range,
    train_emulator,
)
from mekd_fl.errors import ConfigError
from mekd_fl.models import Generator

torch.set_num_threads(1)
CPU = torch.device("cpu")
CFG = EmulatorConfig(steps=30, batch_size=32, width=8, lr=1e-3, seed=3)


def toy_images(n: int, seed: int, side: int = 28) -> torch.Tensor:
    """Two simple unlabeled patterns: horizontal and vertical bars, with noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(2, 1, side, side)
    lo, hi = side * 5 // 14, side * 9 // 14
    base[0, :, lo:hi, :] = 1.0
    base[1, :, :, lo:hi] = 1.0
    pick = torch.randint(2, (n,), generator=g)
    x = base[pick] * 200 + torch.rand(n, 1, side, side, generator=g) * 55
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


def test_default_betas_are_dcgans(images: torch.Tensor) -> None:
    cfg = dataclasses.replace(CFG, steps=5)
    default = train_emulator(images, 2, cfg, CPU)
    explicit = train_emulator(images, 2, dataclasses.replace(cfg, betas=(0.5, 0.999)), CPU)
    for a, b in zip(default.generator.state_dict().values(), explicit.generator.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- every kind
NUM_CLASSES = 3


def kind_cfg(kind: str, **overrides) -> EmulatorConfig:
    return EmulatorConfig(
        **{"steps": 3, "batch_size": 16, "width": 8, "lr": 1e-3, "seed": 5, "kind": kind, "n_critic": 2, **overrides}
    )


@pytest.fixture(scope="module")
def small_images() -> torch.Tensor:
    return toy_images(128, seed=0, side=16)


@pytest.fixture(scope="module", params=EMULATORS)
def kind_run(request, small_images: torch.Tensor):
    cfg = kind_cfg(request.param)
    return cfg, train_emulator(small_images, NUM_CLASSES, cfg, CPU)


def test_emulators_listed() -> None:
    assert EMULATORS == ("dcgan", "wgan-gp", "infogan")
    assert EmulatorConfig().kind == "dcgan"


def test_every_kind_shares_the_generator_with_c_inputs(kind_run) -> None:
    cfg, result = kind_run
    gen = result.generator
    assert type(gen) is Generator and gen.fc.in_features == NUM_CLASSES
    assert result.steps == cfg.steps
    assert torch.isfinite(torch.tensor([result.d_loss, result.g_loss])).all()
    with torch.no_grad():
        out = gen(torch.randn(8, NUM_CLASSES) * 5)
    assert out.shape == (8, 1, 16, 16) and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError):
        gen(torch.randn(8, NUM_CLASSES + 1))
    # trained in channels-last layout, handed back in the default one (averaged and sent as arrays)
    for net in (gen, result.discriminator):
        assert all(t.is_contiguous() for t in net.state_dict().values())


def test_every_kind_is_deterministic_for_a_seed(kind_run, small_images: torch.Tensor) -> None:
    cfg, result = kind_run
    before = torch.get_rng_state()
    again = train_emulator(small_images, NUM_CLASSES, cfg, CPU)
    assert torch.equal(torch.get_rng_state(), before), "global RNG must be left untouched"
    for net, net_again in ((result.generator, again.generator), (result.discriminator, again.discriminator)):
        for a, b in zip(net.state_dict().values(), net_again.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_every_kind_continues_from_given_networks(kind_run, small_images: torch.Tensor) -> None:
    cfg, result = kind_run
    gen, disc = copy.deepcopy(result.generator), copy.deepcopy(result.discriminator)
    result2 = train_emulator(small_images, NUM_CLASSES, dataclasses.replace(cfg, steps=1, seed=9), CPU, gen, disc)
    assert result2.generator is gen and result2.discriminator is disc
    assert not torch.equal(result.generator.fc.weight, gen.fc.weight)
    assert not torch.equal(result.discriminator.head.weight, disc.head.weight)


@pytest.mark.parametrize("kind", EMULATORS)
def test_every_kind_state_dicts_average_across_clients(kind: str) -> None:
    """Federated emulators average G and D: keys and shapes must match across builds, values be plain tensors."""
    pairs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        pairs.append(build_emulator(NUM_CLASSES, (1, 16, 16), width=8, kind=kind))
    for i in range(2):
        a, b = pairs[0][i].state_dict(), pairs[1][i].state_dict()
        assert list(a) == list(b)
        assert all(type(v) is torch.Tensor and v.shape == b[k].shape for k, v in a.items())
        mean = {k: (v + b[k]) / 2 if v.is_floating_point() else v for k, v in a.items()}
        pairs[0][i].load_state_dict(mean)


def test_unknown_kind_is_a_one_line_config_error(images: torch.Tensor) -> None:
    expected = "emulator='bigan' is not accepted; accepted: dcgan, wgan-gp, infogan"
    with pytest.raises(ConfigError) as info:
        train_emulator(images, 2, dataclasses.replace(CFG, kind="bigan"), CPU)
    assert str(info.value) == expected
    with pytest.raises(ConfigError, match="accepted: dcgan, wgan-gp, infogan"):
        build_emulator(2, (1, 28, 28), 8, kind="bigan")


def test_rejects_discriminator_of_another_kind(small_images: torch.Tensor) -> None:
    gen, disc = build_emulator(NUM_CLASSES, (1, 16, 16), 8, kind="dcgan")
    with pytest.raises(ValueError, match="InfoDiscriminator"):
        train_emulator(small_images, NUM_CLASSES, kind_cfg("infogan"), CPU, gen, disc)


# ---------------------------------------------------------------- WGAN-GP
def linear_critic(scale: float) -> nn.Module:
    """x -> <w, flatten(x)> with ||w||_2 = scale: its gradient norm is `scale` everywhere."""
    critic = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 1, bias=False))
    w = torch.randn(1, 3 * 8 * 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        critic[1].weight.copy_(w / w.norm() * scale)
    return critic


def test_gradient_penalty_zero_for_unit_gradient_norm() -> None:
    real, fake = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    assert gradient_penalty(linear_critic(1.0), real, fake).item() < 1e-4


def test_gradient_penalty_of_scaled_linear_critic_is_squared_excess() -> None:
    critic = linear_critic(3.0)
    penalty = gradient_penalty(critic, torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8))
    assert penalty.item() == pytest.approx((3.0 - 1.0) ** 2, rel=1e-4)
    penalty.backward()  # the penalty is differentiable in the critic's weights
    assert critic[1].weight.grad.abs().sum() > 0


def test_gradient_penalty_interpolates_follow_the_given_rng() -> None:
    critic = build_emulator(2, (1, 16, 16), 8, kind="wgan-gp")[1]
    real, fake = torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16)
    values = [gradient_penalty(critic, real, fake, torch.Generator().manual_seed(s)).item() for s in (1, 1, 2)]
    assert values[0] == values[1] != values[2]


def test_wgan_critic_has_no_batchnorm_or_dropout() -> None:
    critic = build_emulator(2, (1, 28, 28), 8, kind="wgan-gp")[1]
    kinds = {type(m) for m in critic.modules()}
    assert not any(issubclass(k, (nn.modules.batchnorm._BatchNorm, nn.Dropout2d)) for k in kinds)


# ---------------------------------------------------------------- InfoGAN
def test_infogan_q_head_recovers_the_code(small_images: torch.Tensor) -> None:
    cfg = EmulatorConfig(steps=150, batch_size=32, width=8, lr=1e-3, seed=1, kind="infogan")
    result = train_emulator(small_images, 2, cfg, CPU)
    z = torch.randn(512, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        code = result.discriminator.q(result.generator(z))
    assert code.shape == (512, 2)
    for i in range(2):
        assert torch.corrcoef(torch.stack([code[:, i], z[:, i]]))[0, 1] > 0.8
    assert (code - z).square().mean() < 0.3
    # Control: without the Q loss the same head does not recover the code.
    untrained = train_emulator(small_images, 2, dataclasses.replace(cfg, info_weight=0.0), CPU)
    with torch.no_grad():
        assert (untrained.discriminator.q(untrained.generator(z)) - z).square().mean() > 0.5
