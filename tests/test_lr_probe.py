"""`mekd_fl.client.lr_probe`: the learning-rate probe flags a diverging lr, recommends a moderate one, is
deterministic for a seed, and refuses bad arguments in one line (issue 20).

A tiny BatchNorm CNN distills a known teacher (a fixed linear map of the pixels) on synthetic images.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mekd_fl.client.lr_probe import LrProbeResult, probe_lr

torch.set_num_threads(1)

CLASSES, N = 3, 192
SETTINGS = {"batch-size": 32, "local-epochs": 1}
GRID = (50.0, 0.05, 0.01, 0.002)


def images() -> torch.Tensor:
    return torch.randint(0, 256, (N, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def teacher(x: torch.Tensor) -> torch.Tensor:
    """The known teacher's probabilities: a fixed linear map of the centred pixels."""
    w = torch.randn(64, CLASSES, generator=torch.Generator().manual_seed(2))
    return ((x.float() / 255 - 0.5).flatten(1) @ w).mul(0.5).softmax(1)


def student() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, CLASSES)
    )


def probe(**kwargs) -> LrProbeResult:
    x = images()
    args = {"lrs": GRID, "settings": SETTINGS, **kwargs}
    return probe_lr(args.pop("model", student), x, args.pop("answers", teacher(x)), **args)


@pytest.fixture(scope="module")
def result() -> LrProbeResult:
    return probe()


def test_a_huge_lr_is_flagged_as_diverging_and_not_recommended(result: LrProbeResult) -> None:
    huge = next(t for t in result.trials if t.lr == 50.0)
    assert huge.verdict == "diverged", result.table()
    assert result.recommended != 50.0


def test_it_recommends_the_largest_moderate_lr_whose_loss_fell(result: LrProbeResult) -> None:
    assert [t.lr for t in result.trials] == sorted(GRID, reverse=True)
    assert result.recommended is not None and result.recommended < 50.0, result.table()
    chosen = next(t for t in result.trials if t.lr == result.recommended)
    assert chosen.verdict == "ok" and chosen.loss_after < chosen.loss_before
    assert chosen.update_ratio <= result.max_update_ratio and chosen.bn_growth is not None
    assert all(t.verdict != "ok" for t in result.trials if t.lr > chosen.lr), result.table()
    assert result.run_config() == f"lr={result.recommended:g}"
    rows = [line for line in result.table().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(GRID) and sum("recommended" in row for row in rows) == 1


def test_the_same_seed_gives_the_same_table(result: LrProbeResult) -> None:
    again = probe()
    assert again.table() == result.table() and again.recommended == result.recommended
    assert [t.update_ratio for t in again.trials] == [t.update_ratio for t in result.trials]


def test_an_oracle_callable_answers_like_its_answers() -> None:
    asked: list[str] = []

    def oracle(key: str, x: torch.Tensor) -> torch.Tensor:
        asked.append(key)
        assert x.dtype == torch.uint8
        return teacher(x).numpy()

    assert probe(answers=oracle, lrs=(0.01,)).table() == probe(lrs=(0.01,)).table()
    assert asked == ["lr-probe"]


def test_a_model_without_batchnorm_reports_no_bn_growth() -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, CLASSES))
    assert all(t.bn_growth is None for t in probe(model=linear, lrs=(0.01,)).trials)


@pytest.mark.parametrize(
    ("kwargs", "argument", "accepted"),
    [
        ({"lrs": ()}, "lrs", "one or more finite learning rates > 0"),
        ({"lrs": (0.01, 0.0)}, "lrs", "finite learning rates > 0"),
        ({"lrs": (-0.1,)}, "lrs", "finite learning rates > 0"),
        ({"lrs": (float("nan"),)}, "lrs", "finite learning rates > 0"),
        ({"answers": teacher(images())[:-1]}, "answers", f"shape ({N}, classes)"),
        ({"answer_kind": "log-probs"}, "answer_kind", "probs, logits"),
        ({"max_update_ratio": 20.0}, "max_update_ratio", "(0, 10]"),
    ],
)
def test_bad_arguments_give_one_line_naming_the_argument_and_what_is_accepted(
    kwargs: dict, argument: str, accepted: str
) -> None:
    with pytest.raises(ValueError) as info:
        probe(**kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{argument}:") and "accepted" in message, message
    assert accepted in message, message
