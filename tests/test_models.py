"""Shape, size and init checks for the ResNets and the GAN emulator networks."""

import pytest
import torch
from torch import nn

from mekd_fl.errors import ConfigError
from mekd_fl.models import (
    ARCHITECTURES,
    Critic,
    Discriminator,
    Generator,
    InfoDiscriminator,
    count_parameters,
    init_dcgan_weights,
    parse_depth,
    resnet,
)

torch.set_num_threads(1)
INPUTS = [(1, 28, 28), (3, 32, 32), (3, 64, 64)]


@pytest.mark.parametrize("depth", [8, 20, 32, 56, 110])
@pytest.mark.parametrize("shape", INPUTS)
def test_resnet_output_shape(depth: int, shape: tuple[int, int, int]) -> None:
    model = resnet(f"resnet{depth}", num_classes=7, in_channels=shape[0])
    assert model(torch.randn(2, *shape)).shape == (2, 7)


@pytest.mark.parametrize(
    "arch, expected",
    [("resnet8", 0.08e6), ("resnet20", 0.27e6), ("resnet32", 0.47e6), ("resnet56", 0.86e6), ("resnet110", 1.7e6)],
)
def test_resnet_parameter_counts(arch: str, expected: float) -> None:
    assert count_parameters(resnet(arch, 10, 3)) == pytest.approx(expected, rel=0.10)


def test_parse_depth_accepts_any_6n_plus_2() -> None:
    assert [parse_depth(a) for a in ARCHITECTURES] == [8, 14, 20, 32, 44, 56, 110]
    assert parse_depth("resnet26") == 26


@pytest.mark.parametrize("arch", ["resnet9", "resnet2", "resnet", "vgg16", "resnet20x"])
def test_bad_arch_raises_one_line_config_error(arch: str) -> None:
    with pytest.raises(ConfigError) as info:
        resnet(arch, 10, 3)
    message = str(info.value)
    assert "\n" not in message and repr(arch) in message
    assert ", ".join(ARCHITECTURES) in message


def test_resnet_gradient_reaches_stem() -> None:
    model = resnet("resnet8", 10, 3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.stem[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", INPUTS[:2])
def test_generator_shape_and_range(shape: tuple[int, int, int]) -> None:
    gen = Generator(10, shape, width=8)
    out = gen(torch.randn(4, 10) * 10)
    assert out.shape == (4, *shape)
    assert out.min() >= -1 and out.max() <= 1


def test_generator_input_is_exactly_num_classes() -> None:
    gen = Generator(10, (1, 28, 28), width=8)
    with pytest.raises(ValueError):
        gen(torch.randn(4, 11))


def test_generator_rejects_side_not_divisible_by_4() -> None:
    with pytest.raises(ValueError):
        Generator(10, (3, 30, 30))


@pytest.mark.parametrize("shape", INPUTS)
@pytest.mark.parametrize("train", [True, False])
def test_generator_is_its_layer_stack_with_upsample_and_conv_merged(shape: tuple[int, int, int], train: bool) -> None:
    """forward computes each (Upsample, Conv2d) as one transposed convolution: the same outputs and the same
    weight gradients as running `body` layer by layer, in training (batch statistics) and eval mode."""
    torch.manual_seed(0)
    gen = Generator(10, shape, width=8)
    gen.apply(init_dcgan_weights)
    for bn in (gen.body[0], gen.body[3], gen.body[7]):  # eval mode: statistics that are not the identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    gen.train(train)
    z = torch.randn(6, 10)
    target = torch.rand(6, *shape) * 2 - 1
    side = shape[1] // 4

    def grads(out: torch.Tensor) -> list[torch.Tensor]:
        gen.zero_grad()
        (out - target).abs().mean().backward()
        return [p.grad.clone() for p in gen.parameters()]

    merged = gen(z)
    merged_grads = grads(merged)
    reference = gen.body(gen.fc(z).view(-1, 16, side, side))
    reference_grads = grads(reference)
    assert torch.allclose(merged, reference, atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(merged_grads, reference_grads, strict=True))


@pytest.mark.parametrize("shape", INPUTS)
def test_discriminator_one_logit_per_image(shape: tuple[int, int, int]) -> None:
    disc = Discriminator(shape, width=8)
    assert disc(torch.randn(3, *shape)).shape == (3, 1)


def test_dcgan_init_statistics() -> None:
    torch.manual_seed(0)
    gen = Generator(10, (3, 32, 32), width=64)
    gen.apply(init_dcgan_weights)
    conv = gen.body[2]
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert conv.bias.abs().max() == 0
    bn = gen.body[3]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn.eps == 1e-5 and bn.momentum == 0.1


@pytest.mark.parametrize("shape", INPUTS)
def test_critic_one_linear_score_per_image_without_batchnorm(shape: tuple[int, int, int]) -> None:
    critic = Critic(shape, width=8)
    assert critic(torch.randn(3, *shape)).shape == (3, 1)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())
    assert isinstance(critic.head, nn.Linear)


def test_critic_scores_each_sample_on_its_own() -> None:
    """No BatchNorm: a sample's score does not depend on the rest of the batch (what the penalty assumes)."""
    critic = Critic((1, 28, 28), width=8).train()
    x = torch.randn(4, 1, 28, 28)
    assert torch.allclose(critic(x)[:1], critic(x[:1]), atol=1e-6)


@pytest.mark.parametrize("shape", INPUTS[:2])
def test_info_discriminator_heads(shape: tuple[int, int, int]) -> None:
    disc = InfoDiscriminator(shape, code_dim=7, width=8).eval()
    x = torch.randn(3, *shape)
    logit, code = disc.heads(x)
    assert logit.shape == (3, 1) and code.shape == (3, 7)
    assert torch.equal(disc(x), logit) and torch.equal(disc.q(x), code)


def test_info_discriminator_extends_dcgan_state_dict() -> None:
    info, plain = InfoDiscriminator((1, 28, 28), 10, width=8), Discriminator((1, 28, 28), width=8)
    extra = set(info.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(info.state_dict()) and extra == {"q_head.weight", "q_head.bias"}
