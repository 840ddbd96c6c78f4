"""`query-selection=uncertainty`: a client spends its budget on the images the global student is least sure of
(`hybrid`: half of it, and the other half on a random subset of the rest).

What must hold: the score is the softmax entropy; the images with the highest scores are sent and no more
than the budget; the server sends the student only to clients that query after a round has trained it,
and a resumed run sends a client the very student that chose its queries, so it re-sends what it paid
for and is not charged twice.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg
from torch import nn

from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.queries import choose, entropy_scores, hybrid_indices, select_queries, top_score_indices
from mekd_fl.teacher.oracle import TeacherOracle
from strategies import MEKD
from strategies import protocol as P
from tests.test_client_api import CLASSES, SHAPE, InProcessGrid, Teacher, UserNet, users_app

pytestmark = pytest.mark.usefixtures("task_identity")

torch.set_num_threads(1)


def test_entropy_is_the_softmax_entropy() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [30.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    p = logits.softmax(1)
    assert torch.allclose(entropy_scores(logits), -(p * p.log()).sum(1).nan_to_num(), atol=1e-6)
    assert entropy_scores(logits)[0].item() == pytest.approx(math.log(4))
    assert entropy_scores(logits)[1].item() == pytest.approx(0.0, abs=1e-6)


def test_the_highest_scores_are_chosen_and_ties_follow_the_seed() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.9, 0.2, 0.7])
    top = top_score_indices(scores, 3, torch.Generator().manual_seed(0))
    assert sorted(top.tolist()) == [1, 3, 5]
    tied = torch.zeros(50)
    picks = {tuple(top_score_indices(tied, 5, torch.Generator().manual_seed(s)).tolist()) for s in range(4)}
    assert len(picks) > 1  # equal scores: a seeded draw, not always the first rows


def brightness(pool: torch.Tensor) -> torch.Tensor:
    return pool.float().mean((1, 2, 3))


def test_choose_sends_the_most_uncertain_images_of_the_pool() -> None:
    pool = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    chosen = choose(pool, 10, "uncertainty", torch.Generator().manual_seed(0), scorer=brightness)
    assert chosen.tolist() == sorted(torch.argsort(brightness(pool), descending=True)[:10].tolist())
    with pytest.raises(ValueError, match="needs a scorer"):
        choose(pool, 10, "uncertainty", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("k", [0, 1, 7, 10, 40])
def test_hybrid_sends_the_top_half_and_a_seeded_random_rest(k: int) -> None:
    scores = torch.randperm(40, generator=torch.Generator().manual_seed(5)).float()
    picks = hybrid_indices(scores, k, torch.Generator().manual_seed(0))
    assert len(picks) == k == len(set(picks.tolist()))  # exactly the budget, no image twice
    top = set(torch.argsort(scores, descending=True)[: (k + 1) // 2].tolist())
    assert top <= set(picks.tolist())
    if 2 < k < 40:  # the rest is not simply the next-highest scores, and it follows the seed
        assert set(picks.tolist()) != set(torch.argsort(scores, descending=True)[:k].tolist())
        draws = {tuple(sorted(hybrid_indices(scores, k, torch.Generator().manual_seed(s)).tolist())) for s in range(6)}
        assert len(draws) > 1
    assert torch.equal(picks, hybrid_indices(scores, k, torch.Generator().manual_seed(0)))


def test_choose_hybrid_needs_a_scorer_and_sends_the_most_uncertain_half() -> None:
    pool = torch.randint(0, 256, (40, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    chosen = set(choose(pool, 10, "hybrid", torch.Generator().manual_seed(0), scorer=brightness).tolist())
    assert len(chosen) == 10 and set(torch.argsort(brightness(pool), descending=True)[:5].tolist()) <= chosen
    with pytest.raises(ValueError, match="hybrid needs a scorer"):
        choose(pool, 10, "hybrid", torch.Generator().manual_seed(0))


@pytest.mark.parametrize("selection", ["uncertainty", "hybrid"])
def test_without_a_student_scored_selections_are_the_seeded_random_subset(selection: str) -> None:
    images = torch.randint(0, 256, (30, 1, 8, 8), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    kwargs = dict(views=2, budget=1000, mirror=True, num_classes=10, seed=4, fraction=0.25)
    assert torch.equal(
        select_queries("local", images, selection=selection, **kwargs),
        select_queries("local", images, selection="random", **kwargs),
    )


class SureOfBright(nn.Module):
    """A student certain of bright images and unsure of dark ones: its logits scale with brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean((1, 2, 3))[:, None]
        return self.scale * b * torch.tensor([1.0, 0.0, 0.0])


def test_an_edge_client_queries_the_images_its_student_is_least_sure_of() -> None:
    images = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    settings = EdgeSettings(query_selection="uncertainty", query_fraction=0.25)
    edge = EdgeClient(images, SureOfBright, settings=settings, num_classes=CLASSES, device="cpu")
    sent = edge.query_images(budget=1000, student_state=SureOfBright().state_dict())
    assert len(sent) == 16
    darkest = torch.sort(edge.images.float().mean((1, 2, 3))).values[:16]
    assert torch.equal(torch.sort(sent.float().mean((1, 2, 3))).values, darkest)
    assert not torch.equal(edge.query_images(budget=1000), sent)  # no student: the random subset


def test_a_hybrid_edge_client_sends_its_most_uncertain_half_and_others() -> None:
    images = torch.rand(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    settings = EdgeSettings(query_selection="hybrid", query_fraction=0.25)
    edge = EdgeClient(images, SureOfBright, settings=settings, num_classes=CLASSES, device="cpu")
    sent = torch.sort(edge.query_images(budget=1000, student_state=SureOfBright().state_dict()).float().mean((1, 2, 3)))
    darkest = torch.sort(edge.images.float().mean((1, 2, 3))).values
    assert len(sent.values) == 16 and torch.equal(sent.values[:8], darkest[:8])
    assert not torch.equal(sent.values, darkest[:16])  # the other half is not simply the next darkest


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"query-selection": "uncertainty"}, "with emulator-phase=upfront"),
        ({"query-selection": "uncertainty", "emulator-phase": "lazy"}, "with fraction-train=1"),
        ({"query-selection": "hybrid", "fraction-train": 0.5}, "query-selection=hybrid is not accepted with emulator"),
        ({"query-selection": "entropy"}, "accepted: random, kcenter, uncertainty, hybrid"),
    ],
)
def test_settings_where_no_student_could_score_are_refused_in_one_line(settings: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        RunConfig.from_mapping(settings)
    assert "\n" not in str(info.value)
    RunConfig.from_mapping({"query-selection": "uncertainty", "emulator-phase": "lazy", "fraction-train": 0.5})


def strategy(budget: int = 1000) -> MEKD:
    return MEKD(
        TeacherOracle(Teacher(), num_classes=CLASSES, image_shape=SHAPE),
        strategy=FedAvg(fraction_train=0.5, min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1),
        train_emulators=False,
        query_budget=budget,
        emulator_phase="lazy",
        fraction_train=0.5,
        min_train_nodes=1,
        seed=3,
        log_fn=lambda _: None,
    )


CONFIG = {"lr": 0.05, "method": "kd", "query-fraction": 0.25, "query-selection": "uncertainty"}


def queries_sent(grid: InProcessGrid) -> list:
    return [m for m in grid.sent if m.metadata.message_type == P.QUERY]


@pytest.mark.parametrize("selection", ["uncertainty", "hybrid"])
def test_later_cohorts_are_sent_the_trained_student_and_pay_only_their_budget(selection: str) -> None:
    grid = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=4)  # 96 images per node
    s = strategy()
    config = ConfigRecord({**CONFIG, "query-selection": selection})
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=4, train_config=config, num_nodes=4)
    assert s.failures.entries == [], s.failures.entries
    asked = queries_sent(grid)
    first = [m for m in asked if P.ARRAYS not in m.content.array_records]
    later = [m for m in asked if P.ARRAYS in m.content.array_records]
    assert first and later  # the first cohort had no trained student; later newcomers did
    log = {e["node"]: e for e in s.ledger.log}
    for m in later:
        entry = log[m.metadata.dst_node_id]
        assert entry["scored-by-round"] >= 1 and entry["sent"] == 24 == entry["charged"]  # 0.25 x 96
        scorer = s.ledger.query_scorers[entry["scored-by-round"]]
        assert all((m.content[P.ARRAYS][k].numpy() == scorer[k].numpy()).all() for k in scorer.keys())
    assert all("scored-by-round" not in log[m.metadata.dst_node_id] for m in first)
    assert sorted(s.ledger.queries_used.values()) == [24] * len(asked)


def test_a_resumed_run_resends_the_student_that_chose_and_charges_nothing_twice() -> None:
    grid = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=4)
    s = strategy(budget=24)
    s.start(grid, ArrayRecord(UserNet().state_dict()), num_rounds=4, train_config=ConfigRecord(CONFIG), num_nodes=4)
    scored = {e["partition"] for e in s.ledger.log if "scored-by-round" in e}
    assert scored
    saved, used = s.state(), dict(s.ledger.queries_used)
    # The simulation restarts: fresh client processes (no state), a new strategy loaded from the checkpoint.
    fresh = InProcessGrid(users_app({"train": 0, "evaluate": 0}), nodes=4)
    resumed = strategy(budget=24)
    resumed.load_state(saved)
    resumed.start(
        fresh, ArrayRecord(UserNet().state_dict()), num_rounds=8, train_config=ConfigRecord(CONFIG), num_nodes=4,
        start_round=5,
    )  # fmt: skip
    assert resumed.failures.entries == [], resumed.failures.entries
    again = {e["partition"]: e for e in resumed.ledger.log}
    assert scored & set(again)  # some client whose queries a student chose came back
    for partition in scored & set(again):
        assert again[partition]["redelivered"] and again[partition]["charged"] == 0
    assert resumed.ledger.queries_used == used  # the budget of 24 each was never spent twice
