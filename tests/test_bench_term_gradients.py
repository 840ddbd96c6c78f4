"""`experiments/bench_term_gradients.py`'s measurement: the gradient of MEKD's emulation term and of the
rest of the loss, on a tiny student and generator where both can be written out by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.distill import DistillContext, get_distiller
from mekd_fl.distill.base import kl_divergence
from mekd_fl.distill.dkd import dkd_loss

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_term_gradients.py"
_spec = importlib.util.spec_from_file_location("bench_term_gradients", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

C = 4


class TinyGen(nn.Module):
    """C scores -> a (B, 1, 4, 4) image through one fixed linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, 16)
        with torch.no_grad():
            self.fc.weight.copy_(torch.linspace(-1.0, 1.0, 16 * C).view(16, C) ** 3 + 0.1)
            self.fc.bias.copy_(torch.linspace(0.2, -0.3, 16))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc(z).view(-1, 1, 4, 4)


def _case(method: str, weight: float) -> tuple:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, C))
    x = torch.rand(8, 1, 4, 4)
    responses = torch.randn(8, C).mul(2).softmax(1)
    ctx = DistillContext(num_classes=C, temperature=4.0, generator=TinyGen(), weight_emulation=weight, dkd_warmup=1.0)
    distiller = get_distiller(method, ctx)
    params = list(student.parameters())
    return distiller, student, x, responses, params


def _norm_of_grad(loss: torch.Tensor, params: list) -> float:
    return float(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm())


@pytest.mark.parametrize("method", ["mekd", "mekd-dkd"])
def test_the_two_gradients_are_those_of_the_two_terms_written_out(method: str) -> None:
    distiller, student, x, responses, params = _case(method, 1.0)
    grads = bench.term_gradients(distiller, student(x), responses, x, 2.0, params)
    gen = TinyGen()
    logits = student(x)
    # emulator-input=probs (the default): G receives the probabilities of both, softmax at T=1
    emulated = gen(F.softmax(logits, 1))
    target = gen(responses)
    by_hand = F.l1_loss(emulated, target)
    assert grads["grad-emulation"] == pytest.approx(_norm_of_grad(by_hand, params), rel=1e-5)
    t_log_p = responses.log()
    rest = (
        kl_divergence(t_log_p, student(x), 4.0)
        if method == "mekd"
        else dkd_loss(t_log_p, student(x), 2.0, distiller.ctx)["loss"]
    )
    assert grads["grad-rest"] == pytest.approx(_norm_of_grad(rest, params), rel=1e-5)
    assert grads["ratio"] == pytest.approx(grads["grad-emulation"] / grads["grad-rest"], rel=1e-6)
    assert -1.0 <= grads["cosine"] <= 1.0


def test_the_emulation_gradient_scales_with_its_weight_and_parity_does_not() -> None:
    one = bench.term_gradients(*_bound("mekd-dkd", 1.0))
    ten = bench.term_gradients(*_bound("mekd-dkd", 10.0))
    assert ten["grad-emulation"] == pytest.approx(10 * one["grad-emulation"], rel=1e-5)
    assert ten["grad-rest"] == pytest.approx(one["grad-rest"], rel=1e-6)
    assert ten["parity-weight"] == pytest.approx(one["parity-weight"], rel=1e-5)
    assert one["parity-weight"] == pytest.approx(1 / one["ratio"], rel=1e-6)


def _bound(method: str, weight: float) -> tuple:
    distiller, student, x, responses, params = _case(method, weight)
    return distiller, student(x), responses, x, 2.0, params
