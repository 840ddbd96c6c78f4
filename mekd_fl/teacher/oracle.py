"""The blind teacher: answers query images with soft outputs only, within per-client budgets.

Why a class of its own: the oracle is the only door to the teacher. Everything the source-blind
setting promises is enforced here: callers get probabilities (or logits when configured), never
weights, features or gradients; every answered image is counted against the asking client's budget;
and a malformed query is refused as a whole, before any forward pass, with a message the client can
act on. The teacher behind it may be any callable (a torch module, an exported program, a function on
NumPy arrays) returning logits, probabilities or log-probabilities, as its owner declares; its answers
are checked too, so a teacher that answers something else is refused in one line instead of
distilled from in silence.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.export import ExportedProgram

from mekd_fl.augment import to_unit
from mekd_fl.settings.run import run_setting
from mekd_fl.teacher.answer_cache import AnswerCache, images_digest

__all__ = ["BudgetExceeded", "QueryError", "TeacherAnswerError", "TeacherOracle"]

#: The run settings the oracle's defaults are (declared once, in the settings schema).
DEFAULTS = {
    name: run_setting(name).default for name in ("oracle-output", "query-budget", "oracle-batch-size", "oracle-top-k")
}

OUTPUTS = ("probs", "logits")
FLOAT_DTYPES = (torch.float32, torch.float64)
ACCEPTED_DTYPES = "uint8 (0..255), or float32 / float64 in [0, 1]"
#: What a teacher callable takes: torch tensors on `device`, or float32 NumPy arrays on the CPU.
TEACHER_INPUTS = ("torch", "numpy")
#: What a teacher callable returns, one row per image.
TEACHER_OUTPUTS = ("logits", "probs", "log-probs")
#: How far a row of probabilities may sum from 1: float16 or lightly rounded answers still pass, while
#: logits that happen to be non-negative and sum to 1 in every row of a batch are not a real risk.
PROB_SUM_TOL = 1e-2
#: The floor for log(p) of a probability teacher, as `mekd_fl.distill.base.teacher_log_probs` uses:
#: only an exact zero (what float32 cannot represent) is lifted, to log(tiny) = -87.3, never a real p.
PROB_FLOOR = torch.finfo(torch.float32).tiny
LOG_PROB_FLOOR = math.log(PROB_FLOOR)


class QueryError(ValueError):
    """A query the oracle refuses: wrong type, layout, device, shape, dtype, range, non-finite values,
    an unusable client key, or over budget."""


class BudgetExceeded(QueryError):
    """The client asked for more images than its remaining budget."""


class TeacherAnswerError(QueryError):
    """The teacher's own answer is unusable: not a float tensor or array, the wrong shape, NaN or inf,
    or not the kind `teacher_output` declares.

    Why a QueryError: the query is refused like any other (the strategy records it for that client and
    the run goes on) and the client is not charged; why a class of its own: the fault is the teacher
    owner's, so a caller can tell it from a client's malformed query.
    """


def _is_int(value: object) -> bool:
    """A real integer: int or a NumPy integer, never a bool (True is 1 to Python, not a setting)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_setting(name: str, value: object, minimum: int, accepted: str) -> int:
    if not _is_int(value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; accepted: {accepted}")
    return int(value)


def _choice(name: str, value: object, accepted: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name}={value!r} is not accepted; accepted: {', '.join(accepted)}")
    return value


def _not_probs(rows: torch.Tensor) -> str | None:
    """Why `rows` are not probabilities (a negative value, or a row summing away from 1), or None."""
    if bool((rows < 0).any()):
        return f"a value is negative ({rows.min().item():.4g})"
    sums = rows.double().sum(1)
    worst = int((sums - 1).abs().argmax())
    if abs(sums[worst].item() - 1) > PROB_SUM_TOL:
        return f"a row sums to {sums[worst].item():.4g}, not 1 (+-{PROB_SUM_TOL})"
    return None


def _numpy_input(x: object) -> np.ndarray:
    """The teacher's input as a float32 NumPy array of its own (a copy: the teacher may write to it)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.array(x, dtype=np.float32, order="C")


class TeacherOracle:
    """Soft outputs of a hidden teacher for batches of query images.

    Accepted queries: a dense (strided), non-meta 4-D tensor (B, C, H, W) with B >= 1 matching the
    data set's image shape, either uint8 (0..255) or float32/float64 in [0, 1] with no NaN or inf; a
    tensor that requires grad is detached. Anything else (NumPy arrays, lists, bool, other integer,
    half-precision or complex dtypes, sparse or meta tensors) is refused with a `QueryError`, as is an
    empty client key. Answers are float32 on the CPU, shape (B, num_classes). With an `answer_cache`, an
    exact repeat of an earlier query (another run of a sweep) is answered from disk, after the same
    validation and budget accounting. The teacher is fed the queries as floats in [0, 1], through
    `preprocess` when given (the teacher's own normalisation, e.g. torchvision's Normalize).

    The teacher (`model`) is any callable from a batch of images to one row of `num_classes` outputs
    per image: an `nn.Module` (put in eval mode and moved to `device`), a `torch.export`
    ExportedProgram (its `.module()` is called), or a plain function. What it takes is declared, never
    guessed: `teacher_input="torch"` (default) passes a float32 tensor (B, C, H, W) on `device`;
    `teacher_input="numpy"` passes a float32 NumPy array of its own, on the CPU (so `device` must be
    "cpu"), for a teacher that is not written in torch (ONNX Runtime, JAX, scikit-learn, a remote
    endpoint). Trying torch first and falling back would call the teacher twice and hide the real
    error of the first call. It may return a tensor or a NumPy array of floats, shape
    (B, num_classes), on any device. What it returns is declared too, by `teacher_output`: "logits"
    (default), "probs" or "log-probs"; the oracle converts to `output`. Probabilities become logits as
    log p, which are the logits up to a per-row constant, so `softmax(log p / T)` equals
    `softmax(logits / T)` and every distillation loss reads them the same (see
    `mekd_fl.distill.base.teacher_log_probs`); an exact zero is lifted to float32's smallest
    probability first, as there. Each batch the teacher answers is checked before anything is
    answered: a wrong type, dtype or shape, NaN or inf (log-probs may be -inf, a zero probability),
    or answers that are not the declared kind raise `TeacherAnswerError` (a `QueryError`: the query is
    refused and not charged). Declared "probs" and "log-probs" are checked on every batch (rows of p
    non-negative and summing to 1 within `PROB_SUM_TOL`): a logits teacher declared as probabilities
    would otherwise answer log(logits), garbage. Declared "logits" are checked once, on the first batch
    the teacher answers: if every row is already a probability vector, the teacher returns
    probabilities, and a softmax over them would flatten every answer towards uniform in silence.
    Log-probabilities declared as "logits" are not refused: they are logits (the per-row constant is
    the log-normaliser), so every answer is right either way.

    Budget: the images of a query are reserved against the client's `budget` under a lock before the
    forward pass, so concurrent queries can never overspend it, and the reservation is given back if
    answering fails (the teacher's forward or the answer cache raises): a client pays only for answers
    it gets. The exception itself propagates unchanged. `query` charges every call, a repeat too;
    `redeliver` answers an exact repeat of a query already charged to the same client without a second
    charge (a resumed run's re-delivery, which reveals nothing new).

    Answer hardening (off by default): `top_k > 0` (probs only) keeps the k largest probabilities of
    each row, zeroes the rest and renormalises each row to sum 1; `decimals >= 0` then rounds every
    answer to that many decimals (`torch.round`). Rounded probabilities are deliberately NOT
    renormalised, so a row may sum to slightly more or less than 1 (or, with few decimals, to 0):
    the coarseness is the point. Why: every exact soft output tells a querying party something about
    the teacher's function, and full-precision probability vectors are what model-extraction and
    membership-inference attacks feed on; truncating and coarsening the answers limits how much each
    query reveals. It cannot make answers reveal nothing (the top-1 label alone still leaks the
    decision function, and distillation itself depends on what is left), and it costs the students
    some of the dark knowledge they learn from. Hardening is applied after the answer cache, which
    always stores the raw answers, so a cache filled under one setting stays valid under any other.
    The cache must be one made for this `output` (its file names carry the output kind, and probs and
    logits must never answer for each other). Its teacher key must name the teacher and its
    `preprocess`; it need not name `teacher_output` or `teacher_input`, which change no answer: a
    teacher returns one kind, and any other declaration is refused before an answer is stored (the one
    accepted alternative, log-probs declared as logits, answers the same).
    """

    def __init__(
        self,
        model: nn.Module | ExportedProgram | Callable[[Any], Any],
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        output: str = DEFAULTS["oracle-output"],
        budget: int = DEFAULTS["query-budget"],
        batch_size: int = DEFAULTS["oracle-batch-size"],
        device: torch.device | str = "cpu",
        answer_cache: AnswerCache | None = None,
        top_k: int = DEFAULTS["oracle-top-k"],
        decimals: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
        teacher_input: str = "torch",
        teacher_output: str = "logits",
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"oracle-output={output!r} is not accepted; accepted: {', '.join(OUTPUTS)}")
        teacher_input = _choice("teacher_input", teacher_input, TEACHER_INPUTS)
        teacher_output = _choice("teacher_output", teacher_output, TEACHER_OUTPUTS)
        budget = _int_setting("query-budget", budget, 0, "an int >= 0 (images per client)")
        batch_size = _int_setting("oracle-batch-size", batch_size, 1, "an int >= 1")
        num_classes = _int_setting("num-classes", num_classes, 1, "an int >= 1")
        image_shape = self._check_image_shape(image_shape)
        if not _is_int(top_k) or int(top_k) < 0:
            raise ValueError(f"oracle-top-k={top_k!r} is not accepted; accepted: an int >= 0 (0 = all classes)")
        top_k = int(top_k)
        if top_k > 0 and output != "probs":
            raise ValueError(
                f"oracle-top-k={top_k} needs oracle-output='probs' (got {output!r}); "
                f"accepted with logits: 0 (all classes)"
            )
        if top_k > num_classes:
            raise ValueError(
                f"oracle-top-k={top_k} is not accepted; accepted: 0..{num_classes} (num-classes={num_classes})"
            )
        if decimals is not None and (not _is_int(decimals) or int(decimals) < 0):
            raise ValueError(f"oracle-decimals={decimals!r} is not accepted; accepted: None (off) or an int >= 0")
        if preprocess is not None and not callable(preprocess):
            raise ValueError("preprocess: a callable (images as floats in [0, 1]) -> the teacher's input is accepted")
        cache_output = getattr(answer_cache, "output", output)
        if answer_cache is not None and cache_output != output:
            raise ValueError(
                f"answer_cache holds {cache_output!r} answers but oracle-output={output!r}; "
                f"accepted: None or an AnswerCache made with output={output!r}"
            )
        self._device = torch.device(device)
        self._model = self._prepare_teacher(model, teacher_input, self._device)
        self.teacher_input = teacher_input
        self.teacher_output = teacher_output
        self._kind_checked = teacher_output != "logits"  # probs and log-probs are checked every batch
        self.preprocess = preprocess
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.output = output
        self.budget = budget
        self.batch_size = batch_size
        self.top_k = top_k
        self.decimals = None if decimals is None else int(decimals)
        self.answer_cache = answer_cache  # checked only after a query was validated and reserved
        self._used: dict[str, int] = {}
        self._paid: dict[str, set[str]] = {}  # client -> fingerprints of the queries it was charged for
        self._lock = threading.Lock()

    @staticmethod
    def _prepare_teacher(model: object, teacher_input: str, device: torch.device) -> Callable[[Any], Any]:
        """The callable the oracle will ask: an nn.Module in eval mode on `device`, or `model` itself."""
        if isinstance(model, ExportedProgram):  # it refuses to be called itself; its module answers
            model = model.module()
        if isinstance(model, nn.Module):
            if teacher_input != "torch":
                raise ValueError(
                    f"teacher_input={teacher_input!r} is not accepted for an nn.Module, which takes torch "
                    f"tensors; accepted: torch (numpy is for a plain function)"
                )
            try:
                model = model.eval()
            except NotImplementedError:  # a torch.export module: its mode was fixed when it was exported
                pass
            return model.to(device)
        if not callable(model):
            raise ValueError(
                f"model={type(model).__name__} is not accepted; accepted: an nn.Module, a torch.export "
                f"ExportedProgram, or a callable (images) -> (B, num_classes) answers"
            )
        if teacher_input == "numpy" and device.type != "cpu":
            raise ValueError(
                f"device={str(device)!r} is not accepted with teacher_input='numpy' (NumPy arrays live on the "
                f"CPU); accepted: cpu"
            )
        return model

    @staticmethod
    def _check_image_shape(image_shape: object) -> tuple[int, int, int]:
        ok = (
            isinstance(image_shape, (tuple, list, torch.Size))
            and len(image_shape) == 3
            and all(_is_int(v) and int(v) >= 1 for v in image_shape)
        )
        if not ok:
            raise ValueError(
                f"image-shape={image_shape!r} is not accepted; accepted: a 3-tuple of positive ints "
                f"(channels, height, width)"
            )
        c, h, w = (int(v) for v in image_shape)  # type: ignore[union-attr]
        return c, h, w

    # ------------------------------------------------------------------ accounting
    def used(self, client: str) -> int:
        with self._lock:
            return self._used.get(str(client), 0)

    def remaining(self, client: str) -> int:
        return self.budget - self.used(client)

    def usage(self) -> dict[str, int]:
        with self._lock:
            return dict(self._used)

    def _reserve(self, client: str, n: int) -> None:
        with self._lock:
            left = self.budget - self._used.get(client, 0)
            if n > left:
                raise BudgetExceeded(
                    f"client {client} asked for {n} answers but has {max(left, 0)} of its "
                    f"query-budget={self.budget} left"
                )
            self._used[client] = self._used.get(client, 0) + n

    def _release(self, client: str, n: int) -> None:
        with self._lock:
            left = self._used.get(client, 0) - n
            if left > 0:
                self._used[client] = left
            else:  # back to never having asked: usage() no longer lists the client
                self._used.pop(client, None)

    # ------------------------------------------------------------------ queries
    @staticmethod
    def client_key(client: object) -> str:
        """The budget key of `client`: a non-empty str (an int is taken as its decimal string)."""
        if isinstance(client, bool) or not isinstance(client, (str, numbers.Integral)):
            raise QueryError(f"client key must be a non-empty str, got {type(client).__name__}")
        key = str(client)
        if not key.strip():
            raise QueryError(f"client key must be a non-empty str, got {key!r}")
        return key

    def validate(self, images: object) -> torch.Tensor:
        """Return the query as a dense tensor without grad, or raise QueryError naming what is wrong."""
        if not isinstance(images, torch.Tensor):
            raise QueryError(f"query must be a torch.Tensor, got {type(images).__name__}")
        if images.layout != torch.strided:
            raise QueryError(
                f"query layout {images.layout} is not accepted; accepted: a dense tensor "
                f"(torch.strided), e.g. .to_dense()"
            )
        if images.device.type == "meta":
            raise QueryError("query is on the meta device and holds no values; send a tensor with data")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise QueryError(
                f"query shape {tuple(images.shape)} is not accepted; accepted: (B, "
                f"{', '.join(map(str, self.image_shape))})"
            )
        if images.shape[0] == 0:
            raise QueryError("query is empty; send at least one image")
        images = images.detach()
        if images.dtype == torch.uint8:
            return images
        if images.dtype not in FLOAT_DTYPES:
            raise QueryError(f"query dtype {images.dtype} is not accepted; accepted: {ACCEPTED_DTYPES}")
        if not torch.isfinite(images).all():
            raise QueryError("query contains NaN or inf values")
        lo, hi = images.min().item(), images.max().item()
        if lo < 0.0 or hi > 1.0:
            raise QueryError(f"query values span [{lo:.3g}, {hi:.3g}]; accepted: floats in [0, 1] or uint8")
        return images

    def query(self, client: str, images: torch.Tensor) -> torch.Tensor:
        """Answer `images` for `client`; refuse the whole query if it is malformed or over budget.

        The images are reserved against the budget first and given back if answering raises; the
        exception propagates as it is.
        """
        client = self.client_key(client)
        images = self.validate(images)
        n = len(images)
        self._reserve(client, n)
        try:
            answers = self._serve(images)
        except BaseException:
            self._release(client, n)
            raise
        with self._lock:
            self._paid.setdefault(client, set()).add(images_digest(images))
        return answers

    __call__ = query

    def redeliver(self, client: str, images: torch.Tensor) -> torch.Tensor:
        """Answer an exact repeat of a query this oracle already charged `client` for, without a second
        charge; anything else is charged as `query` charges it.

        Why: a resumed run re-delivers the answers a client paid for by sending the same images again
        (the teacher node calls this for what its ledger knows as paid). The same images under the same
        key get the same answers, so the repeat reveals nothing the client does not hold already.
        """
        key = self.client_key(client)
        checked = self.validate(images)
        with self._lock:
            paid = images_digest(checked) in self._paid.get(key, ())
        return self._serve(checked) if paid else self.query(key, checked)

    def _serve(self, images: torch.Tensor) -> torch.Tensor:
        """The hardened answers to validated images, from the answer cache when it holds them."""
        if self.answer_cache is not None:
            return self.harden(self.answer_cache.get(images, self._answer))
        return self.harden(self._answer(images))

    def harden(self, answers: torch.Tensor) -> torch.Tensor:
        """Apply top-k truncation and rounding to raw answers (a new tensor; `answers` is left as it is)."""
        if self.top_k and self.top_k < answers.shape[1]:
            idx = answers.topk(self.top_k, dim=1).indices
            kept = torch.zeros_like(answers).scatter_(1, idx, answers.gather(1, idx))
            answers = kept / kept.sum(1, keepdim=True)
        if self.decimals is not None:
            answers = torch.round(answers, decimals=self.decimals)
        return answers

    @torch.no_grad()
    def _answer(self, images: torch.Tensor) -> torch.Tensor:
        """Ask the teacher in batches of `batch_size`; check each answer and convert it to `output`."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = to_unit(images[start : start + self.batch_size].to(self._device, non_blocking=True))
            x = self.preprocess(batch) if self.preprocess is not None else batch
            raw = self._model(_numpy_input(x) if self.teacher_input == "numpy" else x)
            out.append(self._convert(self._check_answer(raw, len(batch))).cpu())
        return torch.cat(out)

    def _check_answer(self, raw: object, n: int) -> torch.Tensor:
        """The teacher's answer to `n` images as a float32 tensor, or TeacherAnswerError saying what is wrong."""
        accepted = "accepted: a torch.Tensor or NumPy array of floats, shape (images, num-classes)"
        if isinstance(raw, np.ndarray):
            if raw.dtype.kind != "f":
                raise TeacherAnswerError(f"the teacher answered a NumPy array of dtype {raw.dtype}; {accepted}")
            raw = torch.from_numpy(np.array(raw, dtype=np.float32))
        elif not isinstance(raw, torch.Tensor):
            raise TeacherAnswerError(f"the teacher answered a {type(raw).__name__}; {accepted}")
        elif not raw.dtype.is_floating_point:
            raise TeacherAnswerError(f"the teacher answered dtype {raw.dtype}; {accepted}")
        if tuple(raw.shape) != (n, self.num_classes):
            raise TeacherAnswerError(
                f"the teacher answered shape {tuple(raw.shape)} for {n} images; accepted: ({n}, {self.num_classes}) "
                f"(images, num-classes={self.num_classes})"
            )
        raw = raw.detach().float()
        declared = f"teacher_output={self.teacher_output!r}"
        log_probs = self.teacher_output == "log-probs"
        bad = raw.isnan() | (raw == math.inf) if log_probs else ~raw.isfinite()
        if bool(bad.any()):
            allowed = "finite values, or -inf for a zero probability" if log_probs else "finite values"
            raise TeacherAnswerError(f"the teacher answered NaN or inf values ({declared}); accepted: {allowed}")
        kinds = ", ".join(repr(k) for k in TEACHER_OUTPUTS)
        if self.teacher_output != "logits":
            why = _not_probs(raw.exp() if log_probs else raw)
            if why is not None:
                of = "exp(answer): " if log_probs else ""
                raise TeacherAnswerError(
                    f"{declared} does not fit the teacher's answers ({of}{why}); accepted: teacher_output={kinds}, "
                    f"whichever the teacher returns"
                )
        elif not self._kind_checked:
            if _not_probs(raw) is None:
                raise TeacherAnswerError(
                    f"{declared} does not fit the teacher's answers: every row is non-negative and sums to 1, so "
                    f"they are probabilities, which a softmax would flatten; accepted: teacher_output={kinds}, "
                    f"here 'probs'"
                )
            self._kind_checked = True
        return raw

    def _convert(self, raw: torch.Tensor) -> torch.Tensor:
        """The teacher's checked answer in the oracle's `output` kind (see the class docstring)."""
        if self.teacher_output == "logits":
            return raw.softmax(1) if self.output == "probs" else raw
        if self.teacher_output == "probs":
            return raw if self.output == "probs" else raw.clamp_min(PROB_FLOOR).log()
        return raw.exp() if self.output == "probs" else raw.clamp_min(LOG_PROB_FLOOR)
