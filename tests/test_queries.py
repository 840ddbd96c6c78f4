"""Query selection: what a client sends to the teacher, and how much of its budget that spends."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn

from mekd_fl.client.edge import EdgeSettings
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.queries import kcenter_indices, local_views, query_count, select_queries

pytestmark = pytest.mark.usefixtures("task_identity")

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


# ---------------------------------------------------------------------------- query-fraction: the budget axis
def images_of(n: int, side: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 1, side, side), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("selection", ["random", "kcenter"])
@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("fraction", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_query_fraction_sends_exactly_its_share_of_the_pool(fraction: float, views: int, selection: str) -> None:
    images = images_of(60)
    for budget in (1000, 7):
        out = select_queries(
            "local", images, views=views, budget=budget, mirror=True, num_classes=10, seed=1,
            fraction=fraction, selection=selection,
        )  # fmt: skip
        assert len(out) == min(budget, round(fraction * 60 * views)) == query_count(60 * views, fraction, budget)
        assert len(out) == len({bytes(x.numpy()) for x in out})  # no image twice


@pytest.mark.parametrize("source", ["generated", "mixed"])
def test_query_fraction_counts_the_same_for_every_source(source: str) -> None:
    out = select(source, views=2, generator=ConstantGenerator())  # 6 images x 2 views
    assert len(out) == 12
    out = select_queries(
        source, IMAGES, views=2, budget=1000, mirror=True, num_classes=10, seed=3,
        generator=ConstantGenerator(), fraction=0.5,
    )  # fmt: skip
    assert len(out) == 6


def test_default_fraction_and_selection_keep_the_seeded_random_subset() -> None:
    old = select("local", views=2, budget=5)
    new = select_queries(
        "local", IMAGES, views=2, budget=5, mirror=True, num_classes=10, seed=3, fraction=1.0, selection="random"
    )
    assert torch.equal(old, new)


def clustered(sizes: list[int], dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Points around well-separated centres, one cluster per size (the first much larger): points, cluster ids."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * 20
    ids = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return centres[ids] + torch.randn(len(ids), dim, generator=g), ids


def covering_radius(points: torch.Tensor, chosen: torch.Tensor) -> float:
    """The largest distance from a point to its nearest chosen point (what k-center minimises)."""
    return torch.cdist(points, points[chosen]).min(1).values.max().item()


def test_kcenter_picks_distinct_points_deterministically_and_covers_better_than_random() -> None:
    points, ids = clustered([500] + [5] * 9)
    picks = kcenter_indices(points, 10, torch.Generator().manual_seed(4))
    assert len(set(picks.tolist())) == 10
    assert torch.equal(picks, kcenter_indices(points, 10, torch.Generator().manual_seed(4)))
    assert set(ids[picks].tolist()) == set(range(10))  # one point of every cluster, the rare ones too
    rand = torch.randperm(len(points), generator=torch.Generator().manual_seed(4))[:10]
    assert covering_radius(points, picks) < 0.5 * covering_radius(points, rand)
    assert len(kcenter_indices(points, 10_000, torch.Generator())) == len(points)  # never more than the pool


def test_kcenter_query_selection_covers_a_clients_rare_image_kinds() -> None:
    """Five kinds of image, one common (80 %) and four rare: 5 queries by k-center reach every kind."""
    kinds = torch.zeros(5, 1, 16, 16, dtype=torch.uint8)
    for k in range(5):
        kinds[k, :, 3 * k : 3 * k + 3] = 255  # a bright band at a different height for each kind
    counts = [80, 5, 5, 5, 5]
    g = torch.Generator().manual_seed(0)
    images = torch.cat([kinds[k].expand(n, -1, -1, -1) for k, n in enumerate(counts)])
    images = (images.int() + torch.randint(-8, 9, images.shape, generator=g)).clamp(0, 255).to(torch.uint8)

    def kinds_sent(selection: str, seed: int) -> set[int]:
        out = select_queries(
            "local", images, views=1, budget=100, mirror=False, num_classes=5, seed=seed, fraction=0.05,
            selection=selection,
        )  # fmt: skip
        assert len(out) == 5
        return set(torch.cdist(out.flatten(1).float(), kinds.flatten(1).float()).argmin(1).tolist())

    assert all(kinds_sent("kcenter", seed) == set(range(5)) for seed in range(3))
    assert kinds_sent("kcenter", 1) == kinds_sent("kcenter", 1)
    assert sum(len(kinds_sent("random", seed)) for seed in range(3)) < 15  # a random subset misses some


def test_unknown_selection_is_refused_with_the_accepted_values() -> None:
    with pytest.raises(
        ValueError, match="query-selection='greedy' is not accepted; accepted: random, kcenter, uncertainty"
    ):
        select_queries("local", IMAGES, views=1, budget=3, mirror=True, num_classes=10, seed=0, selection="greedy")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("query-fraction", 0, r"^query-fraction=0(\.0)? must be in \(0, 1\]$"),
        ("query-fraction", 1.5, r"^query-fraction=1\.5 must be in \(0, 1\]$"),
        ("query-fraction", -0.1, r"^query-fraction=-0\.1 must be in \(0, 1\]$"),
        ("query-fraction", "half", r"^query-fraction='half' is not a valid float"),
        (
            "query-selection",
            "greedy",
            r"^query-selection='greedy' is not accepted; accepted: random, kcenter, uncertainty, hybrid$",
        ),
    ],
)
def test_bad_query_settings_are_one_line_config_errors(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping({key: value})
    if key == "query-selection":
        with pytest.raises(ConfigError, match="query-selection"):
            EdgeSettings.from_config({key: value})


def test_query_settings_travel_to_the_clients() -> None:
    sent = RunConfig.from_mapping({"query-fraction": 0.25, "query-selection": "kcenter"}).client_dict()
    assert (sent["query-fraction"], sent["query-selection"]) == (0.25, "kcenter")
    s = EdgeSettings.from_config(sent)
    assert (s.query_fraction, s.query_selection) == (0.25, "kcenter")


@pytest.mark.parametrize("fraction, budget, expected", [(0.25, 1000, 24), (1.0, 10, 10), (0.05, 1000, 5)])
def test_a_run_charges_exactly_the_budgeted_queries(fraction: float, budget: int, expected: int) -> None:
    """Through the strategy and a real ClientApp in process: each client's logged `sent` is round(f x 96)."""
    from flwr.app import ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from mekd_fl.teacher.oracle import TeacherOracle
    from strategies import MEKD
    from tests.test_client_api import CLASSES, SHAPE, InProcessGrid, Teacher, UserNet, users_app

    grid = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=2)  # 96 images per node
    strategy = MEKD(
        TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE),
        strategy=FedAvg(fraction_train=1.0, min_train_nodes=2, min_available_nodes=2, min_evaluate_nodes=2),
        train_emulators=False,
        query_budget=budget,
        log_fn=lambda _: None,
    )
    config = ConfigRecord({"lr": 0.05, "method": "kd", "query-fraction": fraction, "query-selection": "kcenter"})
    strategy.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=1, train_config=config)
    assert strategy.failures.entries == [], strategy.failures.entries
    assert [e["sent"] for e in strategy.ledger.log] == [expected, expected]
    assert sorted(strategy.ledger.queries_used.values()) == [expected, expected]
