"""Query selection: what a client sends to the teacher, and how much of its budget that spends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mekd_fl.queries import local_views, select_queries

torch.set_num_threads(1)
IMAGES = (torch.arange(6 * 28 * 28) % 251).to(torch.uint8).view(6, 1, 28, 28)


class ConstantGenerator(nn.Module):
    """Maps every code to the same mid-grey image (tanh range 0 -> uint8 127/128)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(z), 1, 28, 28) + self.w


def select(source: str, views: int = 1, budget: int = 1000, generator: nn.Module | None = None) -> torch.Tensor:
    return select_queries(
        source, IMAGES, views=views, budget=budget, mirror=True, num_classes=10, seed=3, generator=generator
    )


def test_local_sends_the_images_themselves() -> None:
    assert torch.equal(select("local"), IMAGES)


def test_views_add_augmented_copies_and_keep_the_originals() -> None:
    out = select("local", views=3)
    assert out.shape == (18, 1, 28, 28) and out.dtype == torch.uint8
    assert torch.equal(out[:6], IMAGES)
    assert not torch.equal(out[6:12], IMAGES)  # shifted / mirrored copies differ


def test_budget_caps_the_query_set_with_a_seeded_subset() -> None:
    a, b = select("local", views=2, budget=5), select("local", views=2, budget=5)
    assert len(a) == 5 and torch.equal(a, b)


def test_generated_sends_emulator_samples_only() -> None:
    out = select("generated", generator=ConstantGenerator())
    assert len(out) == 6 and out.dtype == torch.uint8
    assert set(out.unique().tolist()) <= {127, 128}


def test_mixed_sends_half_local_half_generated() -> None:
    out = select("mixed", views=2, generator=ConstantGenerator())
    assert len(out) == 12
    grey = (out.flatten(1) == out.flatten(1)[:, :1]).all(1)
    assert grey.sum().item() == 6


def test_generated_without_an_emulator_is_refused() -> None:
    with pytest.raises(ValueError, match="needs the client's emulator"):
        select("generated")


def test_unknown_source_is_refused_with_the_accepted_values() -> None:
    with pytest.raises(ValueError, match="accepted: local, generated, mixed"):
        select("cloud")


def test_digits_are_never_mirrored() -> None:
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    img[..., 10:18, 3:6] = 255  # a bar on the left
    views = local_views(img.repeat(64, 1, 1, 1), 2, False, gen)[64:]
    assert (views[..., :, 20:] == 0).all()  # shifted by at most 2 px, never flipped to the right side


@pytest.mark.parametrize("source", ["local", "generated", "mixed"])
def test_zero_budget_sends_nothing(source: str) -> None:
    """A client asked for 0 queries (the supervised reference) replies with an empty uint8 batch."""
    out = select(source, budget=0, generator=ConstantGenerator())
    assert out.shape == (0, 1, 28, 28) and out.dtype == torch.uint8
