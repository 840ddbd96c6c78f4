"""The blind teacher oracle: what it answers, what it refuses, and how it counts each client's budget."""

import numpy as np
import pytest
import torch
from torch import nn

from mekd_fl.oracle import BudgetExceeded, QueryError, TeacherOracle

torch.set_num_threads(1)

SHAPE = (1, 28, 28)
C = 10


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, C))


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *SHAPE), generator=g, dtype=torch.uint8)


@pytest.fixture
def model() -> nn.Module:
    return tiny_model()


def make(model: nn.Module, **kw) -> TeacherOracle:
    return TeacherOracle(model, num_classes=C, image_shape=SHAPE, **kw)


# ---------------------------------------------------------------------------- answers
def test_probs_equal_softmax_of_model_on_unit_images(model: nn.Module) -> None:
    oracle = make(model, batch_size=3)  # several internal batches
    x = images(7)
    out = oracle.query("a", x)
    assert out.shape == (7, C)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    torch.testing.assert_close(out.sum(1), torch.ones(7))
    with torch.no_grad():
        expected = model(x.float() / 255.0).softmax(1)
    torch.testing.assert_close(out, expected)


def test_logits_mode_returns_logits(model: nn.Module) -> None:
    oracle = make(model, output="logits")
    x = images(5)
    out = oracle.query("a", x)
    with torch.no_grad():
        expected = model(x.float() / 255.0)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out.sum(1), torch.ones(5))  # not probabilities


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_unit_input_answers_like_uint8(model: nn.Module, dtype: torch.dtype) -> None:
    oracle = make(model)
    x = images(4)
    a = oracle.query("a", x)
    b = oracle.query("a", (x.double() / 255.0).to(dtype))
    assert b.dtype == torch.float32
    torch.testing.assert_close(a, b)


def test_unknown_output_mode_refused(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="oracle-output='features'"):
        make(model, output="features")


# ---------------------------------------------------------------------------- refusals
BAD_QUERIES = {
    "ndim": (lambda: images(2)[:, 0], r"shape \(2, 28, 28\)"),
    "channels": (lambda: torch.zeros(2, 3, 28, 28, dtype=torch.uint8), r"shape \(2, 3, 28, 28\).*\(B, 1, 28, 28\)"),
    "size": (lambda: torch.zeros(2, 1, 32, 32, dtype=torch.uint8), r"shape \(2, 1, 32, 32\)"),
    "int32": (lambda: images(2).to(torch.int32), "dtype torch.int32"),
    "float16": (lambda: torch.zeros(2, *SHAPE, dtype=torch.float16), "dtype torch.float16"),
    "above-one": (lambda: torch.full((2, *SHAPE), 255.0), r"values span \[255, 255\]"),
    "negative": (lambda: torch.full((2, *SHAPE), -0.5), r"values span \[-0.5, -0.5\]"),
    "nan": (lambda: torch.zeros(2, *SHAPE).index_fill_(0, torch.tensor([1]), float("nan")), "NaN"),
    "inf": (lambda: torch.zeros(2, *SHAPE).index_fill_(0, torch.tensor([0]), float("inf")), "inf"),
    "empty-uint8": (lambda: torch.zeros(0, *SHAPE, dtype=torch.uint8), "empty"),
    "empty-float": (lambda: torch.zeros(0, *SHAPE), "empty"),
    "numpy": (lambda: np.zeros((2, *SHAPE), dtype=np.uint8), "torch.Tensor, got ndarray"),
    "list": (lambda: [[0.0] * 784], "torch.Tensor, got list"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_malformed_query_refused_with_reason_and_costs_nothing(model: nn.Module, case: str) -> None:
    make_query, pattern = BAD_QUERIES[case]
    oracle = make(model, budget=100)
    with pytest.raises(QueryError, match=pattern) as info:
        oracle.query("a", make_query())
    assert not isinstance(info.value, BudgetExceeded)
    assert "\n" not in str(info.value)
    assert oracle.used("a") == 0
    assert oracle.remaining("a") == 100


def test_query_error_is_a_value_error() -> None:
    # The strategy catches ValueError to refuse a client's query without crashing the run.
    assert issubclass(QueryError, ValueError)
    assert issubclass(BudgetExceeded, QueryError)


# ---------------------------------------------------------------------------- budget
def test_budget_counted_per_client(model: nn.Module) -> None:
    oracle = make(model, budget=10)
    oracle.query("a", images(6))
    oracle.query("b", images(3))
    oracle.query("a", images(1))
    assert (oracle.used("a"), oracle.remaining("a")) == (7, 3)
    assert (oracle.used("b"), oracle.remaining("b")) == (3, 7)
    assert oracle.usage() == {"a": 7, "b": 3}


def test_client_keys_are_normalised_to_str(model: nn.Module) -> None:
    oracle = make(model, budget=10)
    oracle.query(3, images(2))
    assert oracle.used("3") == 2
    assert oracle.used(3) == 2


def test_over_budget_query_refused_whole_and_others_unaffected(model: nn.Module) -> None:
    oracle = make(model, budget=10)
    oracle.query("a", images(6))
    with pytest.raises(BudgetExceeded, match=r"client a asked for 5 answers but has 4 of its query-budget=10 left"):
        oracle.query("a", images(5))
    assert oracle.used("a") == 6  # nothing of the refused query was counted
    assert oracle.query("a", images(4)).shape == (4, C)  # exactly the rest still fits
    assert oracle.remaining("a") == 0
    with pytest.raises(BudgetExceeded):
        oracle.query("a", images(1))
    # Another client has its own, full budget.
    assert oracle.query("b", images(10)).shape == (10, C)
    assert oracle.usage() == {"a": 10, "b": 10}


def test_zero_budget_refuses_everything(model: nn.Module) -> None:
    oracle = make(model, budget=0)
    with pytest.raises(BudgetExceeded, match="has 0 of its query-budget=0 left"):
        oracle.query("a", images(1))


def test_negative_budget_rejected(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="query-budget=-1"):
        make(model, budget=-1)


# ---------------------------------------------------------------------------- answer cache
class Counting(nn.Module):
    """The tiny model, counting how many images went through it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model()
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += len(x)
        return self.inner(x)


def test_repeated_query_is_answered_from_disk_and_still_counted(tmp_path) -> None:
    from mekd_fl.answer_cache import AnswerCache

    model = Counting()
    x = images(6)
    first = make(model, budget=10, answer_cache=AnswerCache(tmp_path, "teacher-a", "probs"))
    expected = first.query("c", x)
    assert model.seen == 6
    # another run (a new oracle and cache object) with the same teacher and the same images
    cache = AnswerCache(tmp_path, "teacher-a", "probs")
    second = make(model, budget=10, answer_cache=cache)
    assert torch.equal(second.query("c", x), expected) and model.seen == 6 and cache.hits == 1
    assert second.used("c") == 6
    with pytest.raises(BudgetExceeded):  # a cached answer is no way around the budget
        second.query("c", x)
    # other images, or another teacher, are computed
    second.query("d", images(6, seed=1))
    make(model, answer_cache=AnswerCache(tmp_path, "teacher-b", "probs")).query("c", x)
    assert model.seen == 18


def test_damaged_cache_file_is_recomputed_and_replaced(tmp_path) -> None:
    from mekd_fl.answer_cache import AnswerCache

    model, x = Counting(), images(4)
    cache = AnswerCache(tmp_path, "t", "probs")
    expected = make(model, answer_cache=cache).query("c", x)
    cache.path_for(x).write_bytes(b"half a file")
    again = AnswerCache(tmp_path, "t", "probs")
    assert torch.equal(make(model, answer_cache=again).query("c", x), expected)
    assert again.misses == 1 and model.seen == 8
    assert not list(cache.folder.glob(".*.tmp"))  # written atomically, no leftovers
