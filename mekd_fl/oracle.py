"""The blind teacher: answers query images with soft outputs only, within per-client budgets.

Why a class of its own: the oracle is the only door to the teacher. Everything the source-blind
setting promises is enforced here: callers get probabilities (or logits when configured), never
weights, features or gradients; every answered image is counted against the asking client's budget;
and a malformed query is refused as a whole, before any forward pass, with a message the client can
act on.
"""

from __future__ import annotations

import numbers
import threading
from collections.abc import Callable

import torch
from torch import nn

from mekd_fl.answer_cache import AnswerCache
from mekd_fl.augment import to_unit

OUTPUTS = ("probs", "logits")
FLOAT_DTYPES = (torch.float32, torch.float64)
ACCEPTED_DTYPES = "uint8 (0..255), or float32 / float64 in [0, 1]"


class QueryError(ValueError):
    """A query the oracle refuses: wrong type, layout, device, shape, dtype, range, non-finite values,
    an unusable client key, or over budget."""


class BudgetExceeded(QueryError):
    """The client asked for more images than its remaining budget."""


def _is_int(value: object) -> bool:
    """A real integer: int or a NumPy integer, never a bool (True is 1 to Python, not a setting)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int_setting(name: str, value: object, minimum: int, accepted: str) -> int:
    if not _is_int(value) or int(value) < minimum:
        raise ValueError(f"{name}={value!r} is not accepted; accepted: {accepted}")
    return int(value)


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

    Budget: the images of a query are reserved against the client's `budget` under a lock before the
    forward pass, so concurrent queries can never overspend it, and the reservation is given back if
    answering fails (the teacher's forward or the answer cache raises): a client pays only for answers
    it gets. The exception itself propagates unchanged.

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
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        output: str = "probs",
        budget: int = 100_000,
        batch_size: int = 1024,
        device: torch.device | str = "cpu",
        answer_cache: AnswerCache | None = None,
        top_k: int = 0,
        decimals: int | None = None,
        preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"oracle-output={output!r} is not accepted; accepted: {', '.join(OUTPUTS)}")
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
        try:
            model = model.eval()
        except NotImplementedError:  # a torch.export program: its mode was fixed when it was exported
            pass
        self._model = model.to(device)
        self.preprocess = preprocess
        self._device = torch.device(device)
        self.num_classes = num_classes
        self.image_shape = image_shape
        self.output = output
        self.budget = budget
        self.batch_size = batch_size
        self.top_k = top_k
        self.decimals = None if decimals is None else int(decimals)
        self.answer_cache = answer_cache  # checked only after a query was validated and reserved
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

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
            if self.answer_cache is not None:
                answers = self.answer_cache.get(images, self._answer)
            else:
                answers = self._answer(images)
            return self.harden(answers)
        except BaseException:
            self._release(client, n)
            raise

    __call__ = query

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
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = to_unit(images[start : start + self.batch_size].to(self._device, non_blocking=True))
            logits = self._model(self.preprocess(batch) if self.preprocess is not None else batch).float()
            out.append((logits.softmax(1) if self.output == "probs" else logits).cpu())
        return torch.cat(out)
