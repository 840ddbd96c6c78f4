"""The blind teacher oracle: what it answers, what it refuses, and how it counts each client's budget."""

import math
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mekd_fl.teacher.oracle import BudgetExceeded, QueryError, TeacherAnswerError, TeacherOracle

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
class Counting(nn.Module):
    """The tiny model, counting how many images went through it (and how many forward calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_model()
        self.seen = 0
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += len(x)
        return self.inner(x)


def _quiet(make_tensor):
    """Build a tensor whose construction warns (sparse CSR is 'beta') without the warning."""

    def build():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return make_tensor()

    return build


def _floats(value: float, dtype: torch.dtype = torch.float32, at: int | None = None) -> torch.Tensor:
    """Two float images in [0, 1]; `value` everywhere, or only in image `at` (the other stays 0.5)."""
    x = torch.full((2, *SHAPE), 0.5 if at is not None else value, dtype=dtype)
    if at is not None:
        x[at, 0, 3, 4] = value
    return x


BUDGET = 100
ACCEPTED = r"accepted: uint8 \(0\.\.255\), or float32 / float64 in \[0, 1\]"
# case -> (client key, query, expected exception, pattern its message must match)
BAD_QUERIES = {
    # not a tensor at all
    "numpy": ("a", lambda: np.zeros((2, *SHAPE), dtype=np.uint8), QueryError, "torch.Tensor, got ndarray"),
    "list": ("a", lambda: [[0.0] * 784], QueryError, "torch.Tensor, got list"),
    "none": ("a", lambda: None, QueryError, "torch.Tensor, got NoneType"),
    "int-scalar": ("a", lambda: 7, QueryError, "torch.Tensor, got int"),
    "tuple-of-tensors": ("a", lambda: tuple(images(2)), QueryError, "torch.Tensor, got tuple"),
    # layout and device
    "sparse-coo": ("a", lambda: torch.zeros(2, *SHAPE).to_sparse(), QueryError, r"layout torch\.sparse_coo.*dense"),
    "sparse-csr": (
        "a",
        _quiet(lambda: torch.zeros(2, *SHAPE).to_sparse_csr()),
        QueryError,
        r"layout torch\.sparse_csr.*dense",
    ),
    "meta": ("a", lambda: torch.zeros(2, *SHAPE, device="meta"), QueryError, "meta device"),
    "meta-uint8": ("a", lambda: torch.zeros(2, *SHAPE, dtype=torch.uint8, device="meta"), QueryError, "meta device"),
    # shape
    "ndim-0": ("a", lambda: torch.tensor(0.5), QueryError, r"shape \(\) is not accepted"),
    "ndim-2": ("a", lambda: torch.zeros(2, 784, dtype=torch.uint8), QueryError, r"shape \(2, 784\)"),
    "ndim-3": ("a", lambda: images(2)[:, 0], QueryError, r"shape \(2, 28, 28\)"),
    "ndim-5": ("a", lambda: images(2)[None], QueryError, r"shape \(1, 2, 1, 28, 28\)"),
    "channels": (
        "a",
        lambda: torch.zeros(2, 3, 28, 28, dtype=torch.uint8),
        QueryError,
        r"shape \(2, 3, 28, 28\).*\(B, 1, 28, 28\)",
    ),
    "size": ("a", lambda: torch.zeros(2, 1, 32, 32, dtype=torch.uint8), QueryError, r"shape \(2, 1, 32, 32\)"),
    "height": ("a", lambda: torch.zeros(2, 1, 27, 28, dtype=torch.uint8), QueryError, r"shape \(2, 1, 27, 28\)"),
    "width": ("a", lambda: torch.zeros(2, 1, 28, 29), QueryError, r"shape \(2, 1, 28, 29\)"),
    "channels-last-order": (
        "a",
        lambda: torch.zeros(2, 28, 28, 1, dtype=torch.uint8),
        QueryError,
        r"shape \(2, 28, 28, 1\)",
    ),
    "empty-uint8": ("a", lambda: torch.zeros(0, *SHAPE, dtype=torch.uint8), QueryError, "empty"),
    "empty-float": ("a", lambda: torch.zeros(0, *SHAPE), QueryError, "empty"),
    # dtype
    "bool": ("a", lambda: torch.ones(2, *SHAPE, dtype=torch.bool), QueryError, "dtype torch.bool.*" + ACCEPTED),
    "int8": ("a", lambda: images(2).to(torch.int8), QueryError, "dtype torch.int8.*" + ACCEPTED),
    "int16": ("a", lambda: images(2).to(torch.int16), QueryError, "dtype torch.int16"),
    "int32": ("a", lambda: images(2).to(torch.int32), QueryError, "dtype torch.int32"),
    "int64": ("a", lambda: images(2).long(), QueryError, "dtype torch.int64"),
    "uint16": ("a", lambda: torch.zeros(2, *SHAPE, dtype=torch.uint16), QueryError, "dtype torch.uint16"),
    "float16": (
        "a",
        lambda: torch.zeros(2, *SHAPE, dtype=torch.float16),
        QueryError,
        "dtype torch.float16.*" + ACCEPTED,
    ),
    "bfloat16": ("a", lambda: torch.zeros(2, *SHAPE, dtype=torch.bfloat16), QueryError, "dtype torch.bfloat16"),
    "complex64": ("a", lambda: torch.zeros(2, *SHAPE, dtype=torch.complex64), QueryError, "dtype torch.complex64"),
    "complex128": ("a", lambda: torch.zeros(2, *SHAPE, dtype=torch.complex128), QueryError, "dtype torch.complex128"),
    # values
    "above-one": ("a", lambda: torch.full((2, *SHAPE), 255.0), QueryError, r"values span \[255, 255\]"),
    "barely-above-one": ("a", lambda: _floats(1.001, at=1), QueryError, r"values span \[0\.5, 1\]"),
    "negative": ("a", lambda: torch.full((2, *SHAPE), -0.5), QueryError, r"values span \[-0.5, -0.5\]"),
    "one-negative-pixel-f64": (
        "a",
        lambda: _floats(-1e-3, torch.float64, at=0),
        QueryError,
        r"values span \[-0\.001, 0\.5\].*floats in \[0, 1\]",
    ),
    "nan": ("a", lambda: torch.zeros(2, *SHAPE).index_fill_(0, torch.tensor([1]), float("nan")), QueryError, "NaN"),
    "nan-float64": ("a", lambda: _floats(float("nan"), torch.float64, at=0), QueryError, "NaN or inf"),
    "inf": ("a", lambda: torch.zeros(2, *SHAPE).index_fill_(0, torch.tensor([0]), float("inf")), QueryError, "inf"),
    "minus-inf": ("a", lambda: _floats(float("-inf"), at=1), QueryError, "NaN or inf"),
    "nan-with-grad": ("a", lambda: _floats(float("nan"), at=0).requires_grad_(), QueryError, "NaN or inf"),
    # budget
    "over-budget": (
        "a",
        lambda: images(BUDGET - 1),
        BudgetExceeded,
        rf"client a asked for {BUDGET - 1} answers but has {BUDGET - 2} of its query-budget={BUDGET} left",
    ),
    "over-budget-float": ("a", lambda: torch.zeros(BUDGET, *SHAPE), BudgetExceeded, f"asked for {BUDGET} answers"),
    # client key
    "client-empty": ("", lambda: images(2), QueryError, r"client key must be a non-empty str, got ''"),
    "client-blank": ("  ", lambda: images(2), QueryError, "client key must be a non-empty str"),
    "client-none": (None, lambda: images(2), QueryError, "client key must be a non-empty str, got NoneType"),
    "client-bool": (True, lambda: images(2), QueryError, "client key must be a non-empty str, got bool"),
    "client-float": (1.5, lambda: images(2), QueryError, "client key must be a non-empty str, got float"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUERIES))
def test_malformed_query_refused_with_reason_never_reaches_teacher_and_costs_nothing(case: str) -> None:
    client, make_query, kind, pattern = BAD_QUERIES[case]
    model = Counting()
    oracle = make(model, budget=BUDGET)
    oracle.query("a", images(2))  # the client has used some budget already: it must stay as it is
    calls, seen, usage = model.calls, model.seen, oracle.usage()
    with pytest.raises(kind, match=pattern) as info:
        oracle.query(client, make_query())
    assert isinstance(info.value, ValueError)  # what the strategy catches to refuse one client
    if kind is not BudgetExceeded:
        assert not isinstance(info.value, BudgetExceeded)
    assert "\n" not in str(info.value)
    assert (model.calls, model.seen) == (calls, seen)  # the teacher never saw the query
    assert oracle.usage() == usage == {"a": 2}
    assert oracle.remaining("a") == BUDGET - 2


def test_at_least_thirty_malformed_query_cases() -> None:
    assert len(BAD_QUERIES) >= 30


def test_query_with_requires_grad_is_answered_without_grad(model: nn.Module) -> None:
    oracle = make(model)
    x = (images(3).float() / 255.0).requires_grad_()
    out = oracle.query("a", x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, oracle.query("a", images(3)))


def test_non_contiguous_query_is_answered(model: nn.Module) -> None:
    oracle = make(model)
    x = images(4)
    view = torch.zeros(4, 1, 28, 56, dtype=torch.uint8)[..., ::2]  # every other column: strided
    view.copy_(x)
    assert not view.is_contiguous()
    torch.testing.assert_close(oracle.query("a", view), oracle.query("a", x))


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


def test_redeliver_answers_a_paid_repeat_free_and_charges_anything_else(model: nn.Module) -> None:
    """A resumed run's re-delivery (the teacher node asks for it) costs nothing; it is no way around the budget."""
    oracle = make(model, budget=10)
    x = images(6)
    first = oracle.query("a", x)
    assert torch.equal(oracle.redeliver("a", x), first) and oracle.used("a") == 6
    assert oracle.redeliver("a", images(4, seed=1)).shape == (4, C) and oracle.used("a") == 10  # new: charged
    oracle.redeliver("b", x)  # a repeat of another client's query is no repeat of b's own: charged
    assert oracle.usage() == {"a": 10, "b": 6}
    with pytest.raises(BudgetExceeded):
        oracle.query("a", x)  # `query` charges every call, a repeat too


def test_zero_budget_refuses_everything(model: nn.Module) -> None:
    oracle = make(model, budget=0)
    with pytest.raises(BudgetExceeded, match="has 0 of its query-budget=0 left"):
        oracle.query("a", images(1))


def test_negative_budget_rejected(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="query-budget=-1"):
        make(model, budget=-1)


# ---------------------------------------------------------------------------- answer cache
def test_repeated_query_is_answered_from_disk_and_still_counted(tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

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
    from mekd_fl.teacher.answer_cache import AnswerCache

    model, x = Counting(), images(4)
    cache = AnswerCache(tmp_path, "t", "probs")
    expected = make(model, answer_cache=cache).query("c", x)
    cache.path_for(x).write_bytes(b"half a file")
    again = AnswerCache(tmp_path, "t", "probs")
    assert torch.equal(make(model, answer_cache=again).query("c", x), expected)
    assert again.misses == 1 and model.seen == 8
    assert not list(cache.folder.glob(".*.tmp"))  # written atomically, no leftovers


# ---------------------------------------------------------------------------- charge only what is answered
class Failing(nn.Module):
    """A teacher whose forward pass breaks (out of memory, a driver error, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        raise RuntimeError("CUDA out of memory (simulated)")


def test_failing_teacher_propagates_and_charges_nothing() -> None:
    model = Failing()
    oracle = make(model, budget=10)
    with pytest.raises(RuntimeError, match="simulated") as info:
        oracle.query("a", images(4))
    assert not isinstance(info.value, ValueError)  # re-raised as it is, not turned into a refusal
    assert model.calls == 1
    assert oracle.used("a") == 0 and oracle.remaining("a") == 10
    assert oracle.usage() == {}  # as if the client had never asked


def test_failing_teacher_gives_back_only_its_own_reservation(model: nn.Module) -> None:
    oracle = make(model, budget=10)
    oracle.query("a", images(3))
    broken = nn.Sequential(nn.Flatten(), nn.Linear(5, C))  # wrong input size: the forward raises
    oracle._model = broken
    with pytest.raises(RuntimeError):
        oracle.query("a", images(6))
    assert oracle.usage() == {"a": 3}
    oracle._model = model
    assert oracle.query("a", images(7)).shape == (7, C)  # the refunded images are usable again
    assert oracle.remaining("a") == 0


def test_failing_answer_cache_propagates_and_charges_nothing(model: nn.Module, tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

    class BrokenCache(AnswerCache):
        def get(self, images, compute):
            raise OSError("disk full (simulated)")

    oracle = make(model, budget=10, answer_cache=BrokenCache(tmp_path, "t", "probs"))
    with pytest.raises(OSError, match="disk full"):
        oracle.query("a", images(5))
    assert oracle.used("a") == 0 and oracle.usage() == {}


def test_budget_used_up_exactly_then_one_more_refused() -> None:
    model = Counting()
    oracle = make(model, budget=8)
    assert oracle.query("a", images(8)).shape == (8, C)
    assert (oracle.used("a"), oracle.remaining("a")) == (8, 0)
    calls = model.calls
    with pytest.raises(BudgetExceeded, match="client a asked for 1 answers but has 0 of its query-budget=8 left"):
        oracle.query("a", images(1))
    assert model.calls == calls and oracle.used("a") == 8


def test_concurrent_queries_never_overspend(model: nn.Module) -> None:
    oracle = make(model, budget=10)
    outcomes: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        try:
            oracle.query("a", images(3))
            result = "ok"
        except BudgetExceeded:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["ok"] * 3 + ["refused"] * 5
    assert oracle.used("a") == 9


# ---------------------------------------------------------------------------- answer hardening
def test_top_k_keeps_k_largest_renormalised(model: nn.Module) -> None:
    x = images(16)
    raw = make(model).query("a", x)
    for k in (1, 3, C - 1):
        out = make(model, top_k=k).query("a", x)
        assert out.shape == (16, C) and out.dtype == torch.float32
        assert ((out > 0).sum(1) == k).all()
        torch.testing.assert_close(out.sum(1), torch.ones(16))
        assert torch.equal(out.argmax(1), raw.argmax(1))
        kept = raw.topk(k, dim=1).indices
        expected = raw.gather(1, kept) / raw.gather(1, kept).sum(1, keepdim=True)
        torch.testing.assert_close(out.gather(1, kept), expected)


def test_top_k_of_all_classes_changes_nothing(model: nn.Module) -> None:
    x = images(5)
    torch.testing.assert_close(make(model, top_k=C).query("a", x), make(model).query("a", x))


def test_decimals_round_answers_without_renormalising(model: nn.Module) -> None:
    x = images(20)
    raw = make(model).query("a", x)
    out = make(model, decimals=2).query("a", x)
    torch.testing.assert_close(out, torch.round(raw, decimals=2), rtol=0, atol=0)
    assert torch.allclose(out * 100, (out * 100).round(), atol=1e-4)  # at most two decimals
    assert not torch.allclose(out.sum(1), torch.ones(20), atol=1e-7, rtol=0)  # not renormalised


def test_decimals_apply_to_logits_too(model: nn.Module) -> None:
    x = images(4)
    raw = make(model, output="logits").query("a", x)
    out = make(model, output="logits", decimals=1).query("a", x)
    torch.testing.assert_close(out, torch.round(raw, decimals=1), rtol=0, atol=0)


def test_top_k_then_decimals(model: nn.Module) -> None:
    x = images(6)
    top = make(model, top_k=2).query("a", x)
    both = make(model, top_k=2, decimals=3).query("a", x)
    torch.testing.assert_close(both, torch.round(top, decimals=3), rtol=0, atol=0)
    assert ((both > 0).sum(1) <= 2).all()


def test_hardening_off_by_default(model: nn.Module) -> None:
    oracle = make(model)
    assert oracle.top_k == 0 and oracle.decimals is None


def test_hardening_does_not_change_what_the_cache_stores(tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

    model, x = Counting(), images(6)
    hardened = make(model, top_k=2, decimals=2, answer_cache=AnswerCache(tmp_path, "t", "probs")).query("c", x)
    assert ((hardened > 0).sum(1) <= 2).all()
    stored = torch.load(AnswerCache(tmp_path, "t", "probs").path_for(x), weights_only=True)
    assert ((stored > 0).sum(1) == C).all()  # the raw answers, every class
    with torch.no_grad():
        torch.testing.assert_close(stored, model.inner(x.float() / 255.0).softmax(1))
    # the same cache entry serves an oracle without hardening, and one with another setting
    cache = AnswerCache(tmp_path, "t", "probs")
    plain = make(model, answer_cache=cache).query("c", x)
    torch.testing.assert_close(plain, stored)
    other = make(model, top_k=5, answer_cache=cache).query("c", x)
    assert ((other > 0).sum(1) == 5).all()
    assert cache.hits == 2 and model.seen == 6


# ---------------------------------------------------------------------------- constructor refusals
CONSTRUCTOR_REFUSALS = {
    "budget-true": (dict(budget=True), r"query-budget=True is not accepted; accepted: an int >= 0"),
    "budget-nan": (dict(budget=float("nan")), r"query-budget=nan is not accepted; accepted: an int >= 0"),
    "budget-float": (dict(budget=10.0), r"query-budget=10\.0 is not accepted"),
    "budget-negative": (dict(budget=-1), r"query-budget=-1 is not accepted; accepted: an int >= 0"),
    "budget-str": (dict(budget="100"), r"query-budget='100' is not accepted"),
    "batch-size-zero": (dict(batch_size=0), r"oracle-batch-size=0 is not accepted; accepted: an int >= 1"),
    "batch-size-negative": (dict(batch_size=-8), r"oracle-batch-size=-8"),
    "batch-size-float": (dict(batch_size=64.0), r"oracle-batch-size=64\.0"),
    "batch-size-false": (dict(batch_size=False), r"oracle-batch-size=False"),
    "num-classes-zero": (dict(num_classes=0), r"num-classes=0 is not accepted; accepted: an int >= 1"),
    "num-classes-float": (dict(num_classes=10.0), r"num-classes=10\.0"),
    "image-shape-2d": (dict(image_shape=(28, 28)), r"image-shape=\(28, 28\) is not accepted; accepted: a 3-tuple"),
    "image-shape-zero": (dict(image_shape=(1, 0, 28)), r"image-shape=\(1, 0, 28\)"),
    "image-shape-float": (dict(image_shape=(1, 28.0, 28)), r"image-shape=\(1, 28\.0, 28\)"),
    "image-shape-str": (dict(image_shape="1x28x28"), r"image-shape='1x28x28'"),
    "top-k-with-logits": (dict(output="logits", top_k=3), r"oracle-top-k=3 needs oracle-output='probs'"),
    "top-k-above-classes": (dict(top_k=C + 1), rf"oracle-top-k={C + 1} is not accepted; accepted: 0\.\.{C}"),
    "top-k-negative": (dict(top_k=-1), r"oracle-top-k=-1 is not accepted"),
    "top-k-bool": (dict(top_k=True), r"oracle-top-k=True is not accepted"),
    "decimals-negative": (
        dict(decimals=-2),
        r"oracle-decimals=-2 is not accepted; accepted: None \(off\) or an int >= 0",
    ),
    "decimals-float": (dict(decimals=2.0), r"oracle-decimals=2\.0"),
}


@pytest.mark.parametrize("case", sorted(CONSTRUCTOR_REFUSALS))
def test_constructor_refuses_bad_settings(model: nn.Module, case: str) -> None:
    kw, pattern = CONSTRUCTOR_REFUSALS[case]
    kw = {"num_classes": C, "image_shape": SHAPE, **kw}
    with pytest.raises(ValueError, match=pattern):
        TeacherOracle(model, **kw)


def test_constructor_accepts_numpy_ints_and_lists(model: nn.Module) -> None:
    oracle = TeacherOracle(
        model,
        num_classes=np.int64(C),
        image_shape=[1, np.int32(28), 28],
        budget=np.int64(5),
        batch_size=np.int64(2),
        top_k=0,
        decimals=0,
    )
    assert (oracle.budget, oracle.batch_size, oracle.num_classes, oracle.image_shape) == (5, 2, C, SHAPE)
    assert all(type(v) is int for v in (oracle.budget, oracle.batch_size, oracle.num_classes, *oracle.image_shape))
    assert oracle.query("a", images(3)).shape == (3, C)


# ---------------------------------------------------------------------------- any callable as the teacher
WEIGHT = tiny_model()[1].weight.detach().numpy().T.copy()  # (784, C): the tiny model, written in NumPy
BIAS = tiny_model()[1].bias.detach().numpy().copy()


def numpy_logits(x: np.ndarray) -> np.ndarray:
    """The tiny model's logits, computed without torch (as an ONNX Runtime or JAX teacher would)."""
    return x.reshape(len(x), -1) @ WEIGHT + BIAS


def numpy_probs(x: np.ndarray) -> np.ndarray:
    z = numpy_logits(x).astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def expected_probs(x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return tiny_model()(x.float() / 255.0).softmax(1)


def test_plain_function_on_torch_tensors_is_a_teacher(model: nn.Module) -> None:
    oracle = make(lambda x: model(x), batch_size=3)  # once: AttributeError 'function' has no 'eval'
    x = images(7)
    torch.testing.assert_close(oracle.query("a", x), expected_probs(x))


def test_numpy_teacher_returning_probs_answers_within_budget() -> None:
    seen: list[np.ndarray] = []

    def teacher(x: np.ndarray) -> np.ndarray:
        seen.append(x)
        return numpy_probs(x)

    oracle = make(teacher, teacher_input="numpy", teacher_output="probs", budget=10, batch_size=4)
    x = images(6)
    out = oracle.query("a", x)
    assert out.dtype == torch.float32 and out.device.type == "cpu" and out.shape == (6, C)
    torch.testing.assert_close(out, expected_probs(x))
    # what the teacher was given: float32 NumPy arrays (B, C, H, W) in [0, 1], in batches of batch_size
    assert [type(b) for b in seen] == [np.ndarray, np.ndarray]
    assert [b.shape for b in seen] == [(4, *SHAPE), (2, *SHAPE)]
    assert all(b.dtype == np.float32 and b.min() >= 0 and b.max() <= 1 for b in seen)
    np.testing.assert_allclose(np.concatenate(seen), x.numpy() / 255.0, rtol=0, atol=1e-7)
    # budgets exactly as for a torch module
    with pytest.raises(BudgetExceeded, match=r"client a asked for 5 answers but has 4 of its query-budget=10 left"):
        oracle.query("a", images(5))
    assert len(seen) == 2  # the refused query never reached the teacher
    assert oracle.query("a", images(4)).shape == (4, C)
    assert oracle.query("b", images(10)).shape == (10, C)
    assert oracle.usage() == {"a": 10, "b": 10} and oracle.remaining("a") == 0
    with pytest.raises(BudgetExceeded):
        oracle.query("b", images(1))


def test_numpy_teacher_may_write_to_its_input_without_touching_the_query() -> None:
    def teacher(x: np.ndarray) -> np.ndarray:
        x -= 0.5  # a teacher that normalises in place
        return numpy_logits(x + 0.5)

    x = torch.full((2, *SHAPE), 0.25)
    out = make(teacher, teacher_input="numpy").query("a", x)
    assert torch.equal(x, torch.full((2, *SHAPE), 0.25))
    torch.testing.assert_close(out, expected_probs(x * 255.0))


def test_numpy_teacher_gets_preprocessed_images() -> None:
    got: list[float] = []

    def teacher(x: np.ndarray) -> np.ndarray:
        got.append(float(x.min()))
        return numpy_logits(x)

    make(teacher, teacher_input="numpy", preprocess=lambda x: x - 10).query("a", torch.zeros(2, *SHAPE))
    assert got == [-10.0]


@pytest.mark.parametrize("answer_as", ["tensor", "numpy-float64", "numpy-float16"])
def test_a_teacher_may_answer_tensors_or_numpy_arrays(answer_as: str) -> None:
    def teacher(x: np.ndarray):
        z = numpy_logits(x)
        if answer_as == "tensor":
            return torch.from_numpy(z)
        return z.astype(np.float64 if answer_as == "numpy-float64" else np.float16)

    out = make(teacher, teacher_input="numpy").query("a", images(5))
    assert out.dtype == torch.float32
    half = {"atol": 2e-3, "rtol": 0} if answer_as == "numpy-float16" else {}  # float16 logits: 3 digits
    torch.testing.assert_close(out, expected_probs(images(5)), **half)


def test_exported_program_itself_is_a_teacher(model: nn.Module) -> None:
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.rand(2, *SHAPE),), dynamic_shapes=({0: batch},))
    x = images(5)
    torch.testing.assert_close(make(program).query("a", x), expected_probs(x))  # not only program.module()


# ---------------------------------------------------------------------------- declared teacher output
def softmax_teacher(x: torch.Tensor) -> torch.Tensor:
    return tiny_model()(x).softmax(1)


def log_softmax_teacher(x: torch.Tensor) -> torch.Tensor:
    return tiny_model()(x).log_softmax(1)


@pytest.mark.parametrize("output", ["probs", "logits"])
@pytest.mark.parametrize("teacher_output", ["probs", "log-probs"])
def test_declared_probs_answer_like_the_logits_teacher(model: nn.Module, output: str, teacher_output: str) -> None:
    x = images(9)
    reference = make(model, output=output).query("a", x)
    teacher = softmax_teacher if teacher_output == "probs" else log_softmax_teacher
    out = make(teacher, output=output, teacher_output=teacher_output, batch_size=4).query("a", x)
    assert out.dtype == torch.float32 and out.shape == (9, C)
    if output == "probs":
        torch.testing.assert_close(out, reference)
    else:  # log p: the logits up to a per-row constant, which no softmax (at any temperature) can see
        shift = reference - out
        torch.testing.assert_close(shift, shift[:, :1].expand_as(shift))
        for t in (1.0, 4.0):
            torch.testing.assert_close((out / t).softmax(1), (reference / t).softmax(1))


def test_probs_teacher_declared_as_logits_is_refused_in_one_line() -> None:
    calls = []

    def teacher(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return softmax_teacher(x)

    oracle = make(teacher, budget=10)  # teacher_output defaults to logits
    for _ in range(2):  # refused every time, never answered with a second softmax
        with pytest.raises(QueryError, match=r"teacher_output='logits' does not fit .* probabilities") as info:
            oracle.query("a", images(3))
        message = str(info.value)
        assert "\n" not in message
        assert "accepted: teacher_output='logits', 'probs', 'log-probs'" in message
    assert calls == [3, 3]
    assert oracle.usage() == {} and oracle.remaining("a") == 10  # refused, so not charged


def test_log_probs_declared_as_logits_are_answered_correctly(model: nn.Module) -> None:
    # log p is a valid choice of logits (per-row constant = the log-normaliser), so nothing is refused
    x = images(6)
    out = make(log_softmax_teacher).query("a", x)
    torch.testing.assert_close(out, make(model).query("a", x))


def test_logits_teacher_checked_once_then_trusted() -> None:
    rows = {"n": 0}

    def teacher(x: torch.Tensor) -> torch.Tensor:
        rows["n"] += 1
        z = tiny_model()(x)
        return z if rows["n"] == 1 else z.softmax(1)  # only the first answered batch is looked at

    oracle = make(teacher)
    oracle.query("a", images(2))
    oracle.query("a", images(2))
    assert oracle.used("a") == 4


@pytest.mark.parametrize(
    ("teacher_output", "teacher", "pattern"),
    [
        ("probs", lambda x: tiny_model()(x), r"teacher_output='probs' does not fit .*a value is negative"),
        ("probs", lambda x: tiny_model()(x).softmax(1) * 2, r"teacher_output='probs' does not fit .*a row sums to 2"),
        (
            "log-probs",
            lambda x: tiny_model()(x),
            r"teacher_output='log-probs' does not fit .*exp\(answer\): a row sums",
        ),
    ],
)
def test_answers_that_are_not_the_declared_kind_are_refused(teacher_output, teacher, pattern) -> None:
    oracle = make(teacher, teacher_output=teacher_output, budget=10)
    for _ in range(2):  # probs and log-probs are checked on every batch, not only the first
        with pytest.raises(TeacherAnswerError, match=pattern) as info:
            oracle.query("a", images(3))
    assert "\n" not in str(info.value) and "accepted: teacher_output='logits', 'probs', 'log-probs'" in str(info.value)
    assert oracle.usage() == {}  # refused, so not charged


def test_probabilities_with_exact_zeros_give_finite_logits() -> None:
    def teacher(x: torch.Tensor) -> torch.Tensor:
        p = torch.zeros(len(x), C)
        p[:, 0] = 1.0
        return p

    out = make(teacher, output="logits", teacher_output="probs").query("a", images(2))
    assert torch.isfinite(out).all()
    assert (out[:, 0] == 0).all()
    torch.testing.assert_close(out[:, 1:], torch.full((2, C - 1), math.log(torch.finfo(torch.float32).tiny)))
    lp = make(lambda x: teacher(x).log(), output="logits", teacher_output="log-probs").query("a", images(2))
    torch.testing.assert_close(lp, out)  # -inf (log of a zero probability) is accepted for log-probs


# ---------------------------------------------------------------------------- the teacher's answer is checked
def _wrong_batch(x: torch.Tensor) -> torch.Tensor:
    """Right answers for the first batch of a query, NaN in the second."""
    z = tiny_model()(x)
    return z if x[0, 0, 0, 0] == 0 else z.fill_(float("nan"))


BAD_ANSWERS = {
    "too-few-classes": (lambda x: tiny_model()(x)[:, :-1], r"shape \(4, 9\) for 4 images; accepted: \(4, 10\)"),
    "too-few-rows": (lambda x: tiny_model()(x)[:-1], r"shape \(3, 10\) for 4 images"),
    "flat": (lambda x: tiny_model()(x).flatten(), r"shape \(40,\) for 4 images"),
    "labels": (lambda x: tiny_model()(x).argmax(1), r"dtype torch\.int64; accepted: a torch\.Tensor or NumPy array"),
    "numpy-int": (lambda x: np.zeros((len(x), C), dtype=np.int32), r"NumPy array of dtype int32"),
    "list": (lambda x: tiny_model()(x).tolist(), r"the teacher answered a list; accepted: a torch\.Tensor"),
    "tuple": (lambda x: (tiny_model()(x), None), r"the teacher answered a tuple"),
    "none": (lambda x: None, r"the teacher answered a NoneType"),
    "nan": (lambda x: tiny_model()(x).fill_(float("nan")), r"NaN or inf values \(teacher_output='logits'\)"),
    "inf": (lambda x: tiny_model()(x).index_fill_(0, torch.tensor([1]), float("inf")), r"NaN or inf"),
    "minus-inf-logits": (lambda x: tiny_model()(x).index_fill_(1, torch.tensor([1]), -math.inf), r"NaN or inf"),
    "float64-overflow": (lambda x: tiny_model()(x).double() * 1e300, r"NaN or inf"),
    "nan-in-second-batch": (_wrong_batch, r"NaN or inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_ANSWERS))
def test_unusable_teacher_answer_refuses_the_query_and_charges_nothing(case: str) -> None:
    teacher, pattern = BAD_ANSWERS[case]
    x = images(4)
    if case == "nan-in-second-batch":
        x[2:, 0, 0, 0] = 1  # the second batch of 2 starts with a non-zero pixel
        x[:2, 0, 0, 0] = 0
    calls: list[int] = []

    def first_good_then(q: torch.Tensor) -> object:
        calls.append(len(q))
        return tiny_model()(q) if len(calls) == 1 else teacher(q)

    oracle = make(first_good_then, budget=10, batch_size=2 if case == "nan-in-second-batch" else 1024)
    oracle.query("a", images(1))  # already paid for one answer: that stays
    with pytest.raises(TeacherAnswerError, match=pattern) as info:
        oracle.query("a", x)
    assert isinstance(info.value, QueryError) and not isinstance(info.value, BudgetExceeded)
    assert "\n" not in str(info.value)
    assert oracle.usage() == {"a": 1} and oracle.remaining("a") == 9


def test_a_refused_answer_is_not_stored_in_the_answer_cache(tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

    cache = AnswerCache(tmp_path, "t", "probs")
    with pytest.raises(TeacherAnswerError):
        make(softmax_teacher, answer_cache=cache).query("a", images(3))
    assert not cache.path_for(images(3)).exists() and not list(tmp_path.rglob("*.pt"))


# ---------------------------------------------------------------------------- the answer cache, any teacher
def test_answer_cache_serves_one_teacher_whatever_its_form(model: nn.Module, tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

    x = images(6)
    first = make(model, answer_cache=AnswerCache(tmp_path, "teacher", "probs")).query("c", x)
    calls = []

    def teacher(q: np.ndarray) -> np.ndarray:
        calls.append(len(q))
        return numpy_probs(q)

    cache = AnswerCache(tmp_path, "teacher", "probs")  # the same teacher, now a NumPy function of probs
    oracle = make(teacher, teacher_input="numpy", teacher_output="probs", budget=6, answer_cache=cache)
    assert torch.equal(oracle.query("c", x), first) and cache.hits == 1 and calls == []
    assert oracle.used("c") == 6
    with pytest.raises(BudgetExceeded):  # the cache is still no way around the budget
        oracle.query("c", x)
    # its logits are another entry (the file name carries the output kind), never the probs
    logits_cache = AnswerCache(tmp_path, "teacher", "logits")
    assert logits_cache.path_for(x) != cache.path_for(x)
    logits = make(teacher, output="logits", teacher_input="numpy", teacher_output="probs", answer_cache=logits_cache)
    out = logits.query("c", x)
    assert logits_cache.misses == 1 and calls == [6]
    torch.testing.assert_close(out.softmax(1), first)
    assert not torch.allclose(out, first)


def test_answer_cache_of_another_output_is_refused(model: nn.Module, tmp_path) -> None:
    from mekd_fl.teacher.answer_cache import AnswerCache

    with pytest.raises(ValueError, match=r"answer_cache holds 'logits' answers but oracle-output='probs'; accepted"):
        make(model, answer_cache=AnswerCache(tmp_path, "t", "logits"))
    make(model, output="logits", answer_cache=AnswerCache(tmp_path, "t", "logits"))  # the right one is fine


# ---------------------------------------------------------------------------- teacher settings refused
# case -> (teacher factory, settings, pattern the one-line refusal must match)
TEACHER_REFUSALS = {
    "input-jax": (
        tiny_model,
        dict(teacher_input="jax"),
        r"teacher_input='jax' is not accepted; accepted: torch, numpy",
    ),
    "input-none": (tiny_model, dict(teacher_input=None), r"teacher_input=None is not accepted"),
    "output-softmax": (
        tiny_model,
        dict(teacher_output="softmax"),
        r"teacher_output='softmax' is not accepted; accepted: logits, probs, log-probs",
    ),
    "module-numpy": (
        tiny_model,
        dict(teacher_input="numpy"),
        r"teacher_input='numpy' is not accepted for an nn\.Module.*accepted: torch",
    ),
    "numpy-on-gpu": (
        lambda: numpy_logits,
        dict(teacher_input="numpy", device="cuda"),
        r"device='cuda' is not accepted with teacher_input='numpy'.*accepted: cpu",
    ),
    "not-callable": (
        lambda: 42,
        {},
        r"model=int is not accepted; accepted: an nn\.Module, a torch\.export ExportedProgram, or a callable",
    ),
    "a-path": (lambda: "teacher.pt2", {}, r"model=str is not accepted"),
}


@pytest.mark.parametrize("case", sorted(TEACHER_REFUSALS))
def test_teacher_settings_refused_in_one_line(case: str) -> None:
    teacher, kw, pattern = TEACHER_REFUSALS[case]
    with pytest.raises(ValueError, match=pattern) as info:
        make(teacher(), **kw)
    assert "\n" not in str(info.value)


def test_teacher_defaults_are_torch_and_logits(model: nn.Module) -> None:
    oracle = make(model)
    assert (oracle.teacher_input, oracle.teacher_output) == ("torch", "logits")
