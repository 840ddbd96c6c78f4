"""`precision=bf16`: the clients' training under bfloat16 autocast (meant for GPUs; checked here on the CPU).

What must hold: the student's and the emulator's products really run in bfloat16, the losses stay float32
and finite, every method and emulator still learns, and fp32 (the default) is untouched by the setting.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.config import RunConfig
from mekd_fl.emulator import EmulatorConfig, train_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.precision import autocast
from mekd_fl.teacher.oracle import TeacherOracle

torch.set_num_threads(1)
SHAPE = (1, 28, 28)
CLASSES = 4


class Student(nn.Module):
    """A small student that records the dtype its classifier's product ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4 * 14 * 14, CLASSES)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.relu(self.conv(x)).flatten(1))
        if self.training:  # the training steps, not the shape probe or evaluation
            self.seen.add(out.dtype)
        return out


class Teacher(nn.Module):
    """A fixed function of the image that the student can learn: which quadrant is brightest."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quadrants = x.unfold(2, 14, 14).unfold(3, 14, 14).mean((1, 4, 5)).flatten(1)  # (B, 4)
        return (quadrants - 0.5) * 12


def images(seed: int, n: int) -> torch.Tensor:
    """Noise with one brighter quadrant per image (floats in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, *SHAPE, generator=g) * 0.6
    bright = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(bright.tolist()):
        r, c = divmod(q, 2)
        x[i, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] += 0.4
    return x


def agreement(state: dict, x: torch.Tensor) -> float:
    net = Student()
    net.load_state_dict(state)
    with torch.no_grad():
        return (net(x).argmax(1) == Teacher()(x).argmax(1)).float().mean().item()


def test_the_setting_is_checked_with_one_line() -> None:
    with pytest.raises(ConfigError, match=r"precision='fp16' is not accepted; accepted: fp32, bf16"):
        RunConfig(precision="fp16").validate()
    with pytest.raises(ConfigError, match="precision"):
        autocast("cpu", "half")
    assert "precision" in RunConfig().client_dict()  # the clients are told it


def test_fp32_leaves_every_product_in_float32() -> None:
    net = Student()
    with autocast("cpu", "fp32"):
        net(images(0, 2))
    assert net.seen == {torch.float32}


@pytest.mark.parametrize(
    ("method", "emulator", "pairing"),
    [
        ("kd", "dcgan", False),
        ("dkd", "dcgan", False),
        ("mekd", "dcgan", False),
        ("mekd", "wgan-gp", False),
        ("mekd", "infogan", False),
        ("mekd", "dcgan", True),
        ("can", "dcgan", False),
        ("cdl", "dcgan", False),
    ],
)
def test_bf16_distillation_runs_in_bfloat16_and_still_learns(method: str, emulator: str, pairing: bool) -> None:
    x = images(1, 256)
    settings = EdgeSettings(
        method=method,
        precision="bf16",
        local_epochs=2,
        lr=0.1,
        batch_size=32,
        num_rounds=1,
        emulator=emulator,
        emulator_steps=4,
        emulator_width=8,
        dkd_warmup=0.0,
    )
    edge = EdgeClient(x, Student, settings=settings, device="cpu")
    queries = edge.query_images(budget=256)
    answers = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE).query("me", queries)
    g_state = None
    if method == "mekd":
        g_state, _, g_metrics = edge.train_emulator(pairs=(queries, answers) if pairing else None)
        assert all(torch.isfinite(torch.as_tensor(v)) for v in g_metrics.values() if isinstance(v, float))
        assert all(v.dtype == torch.float32 for v in g_state.values() if v.is_floating_point())
    torch.manual_seed(0)
    start = Student().state_dict()
    state, metrics, _ = edge.distill(start, queries, answers, g_state=g_state)
    assert all(v.dtype == torch.float32 for v in state.values())  # weights stay float32
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if k.startswith("train-"))
    held = images(2, 512)
    assert agreement(state, held) > agreement(start, held) + 0.15


def test_bf16_puts_the_students_products_in_bfloat16() -> None:
    seen: list[set[torch.dtype]] = []

    class Probe(Student):
        def __init__(self) -> None:
            super().__init__()
            seen.append(self.seen)

    x = images(3, 64)
    answers = TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE).query("me", x.mul(255).round().byte())
    for precision in ("fp32", "bf16"):
        seen.clear()
        edge = EdgeClient(x, Probe, settings=EdgeSettings(method="kd", precision=precision), device="cpu")
        edge.distill(Student().state_dict(), x.mul(255).round().byte(), answers)
        assert set().union(*seen) == {torch.float32 if precision == "fp32" else torch.bfloat16}


def test_bf16_emulator_trains_with_finite_float32_losses_and_differs_from_fp32() -> None:
    data = images(4, 128).mul(255).round().byte()
    results = {
        p: train_emulator(
            data, CLASSES, EmulatorConfig(steps=6, batch_size=16, width=8, seed=1, precision=p), torch.device("cpu")
        )
        for p in ("fp32", "bf16")
    }
    for result in results.values():
        assert torch.isfinite(torch.tensor([result.d_loss, result.g_loss])).all()
        assert all(p.dtype == torch.float32 for p in result.generator.parameters())
    g32, g16 = (dict(results[p].generator.state_dict()) for p in ("fp32", "bf16"))
    assert any(not torch.equal(g32[k], g16[k]) for k in g32)  # autocast did change the arithmetic
