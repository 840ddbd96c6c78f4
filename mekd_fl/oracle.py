"""The blind teacher: answers query images with soft outputs only, within per-client budgets.

Why a class of its own: the oracle is the only door to the teacher. Everything the source-blind
setting promises is enforced here: callers get probabilities (or logits when configured), never
weights, features or gradients; every image is counted against the asking client's budget; and a
malformed query is refused as a whole, before any forward pass, with a message the client can act on.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from mekd_fl.answer_cache import AnswerCache
from mekd_fl.augment import to_unit

OUTPUTS = ("probs", "logits")


class QueryError(ValueError):
    """A query the oracle refuses: wrong shape, dtype, range, non-finite values or over budget."""


class BudgetExceeded(QueryError):
    """The client asked for more images than its remaining budget."""


class TeacherOracle:
    """Soft outputs of a hidden teacher for batches of query images.

    Accepted queries: a 4-D tensor (B, C, H, W) matching the data set's image shape, either uint8
    (0..255) or float32/float64 in [0, 1] with no NaN or inf. Answers are float32 on the CPU,
    shape (B, num_classes). With an `answer_cache`, an exact repeat of an earlier query (another
    run of a sweep) is answered from disk, after the same validation and budget accounting.
    """

    def __init__(self, model: nn.Module, *, num_classes: int, image_shape: tuple[int, int, int],
                 output: str = "probs", budget: int = 100_000, batch_size: int = 1024,
                 device: torch.device | str = "cpu", answer_cache: AnswerCache | None = None) -> None:
        if output not in OUTPUTS:
            raise ValueError(f"oracle-output={output!r} is not accepted; accepted: {', '.join(OUTPUTS)}")
        if budget < 0:
            raise ValueError(f"query-budget={budget} must be >= 0")
        self._model = model.eval().to(device)
        self._device = torch.device(device)
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.output = output
        self.budget = budget
        self.batch_size = batch_size
        self.answer_cache = answer_cache  # checked only after a query was validated and counted
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ accounting
    def used(self, client: str) -> int:
        return self._used.get(str(client), 0)

    def remaining(self, client: str) -> int:
        return self.budget - self.used(client)

    def usage(self) -> dict[str, int]:
        return dict(self._used)

    # ------------------------------------------------------------------ queries
    def validate(self, images: object) -> torch.Tensor:
        """Return the query as a tensor, or raise QueryError naming what is wrong."""
        if not isinstance(images, torch.Tensor):
            raise QueryError(f"query must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise QueryError(f"query shape {tuple(images.shape)} is not accepted; accepted: (B, "
                             f"{', '.join(map(str, self.image_shape))})")
        if images.shape[0] == 0:
            raise QueryError("query is empty; send at least one image")
        if images.dtype == torch.uint8:
            return images
        if images.dtype not in (torch.float32, torch.float64):
            raise QueryError(f"query dtype {images.dtype} is not accepted; accepted: uint8 (0..255) or float32 in [0, 1]")
        if not torch.isfinite(images).all():
            raise QueryError("query contains NaN or inf values")
        lo, hi = images.min().item(), images.max().item()
        if lo < 0.0 or hi > 1.0:
            raise QueryError(f"query values span [{lo:.3g}, {hi:.3g}]; accepted: floats in [0, 1] or uint8")
        return images

    def query(self, client: str, images: torch.Tensor) -> torch.Tensor:
        """Answer `images` for `client`; refuse the whole query if it is malformed or over budget."""
        images = self.validate(images)
        client = str(client)
        with self._lock:
            left = self.remaining(client)
            if len(images) > left:
                raise BudgetExceeded(f"client {client} asked for {len(images)} answers but has {max(left, 0)} of its "
                                     f"query-budget={self.budget} left")
            self._used[client] = self.used(client) + len(images)
        if self.answer_cache is not None:
            return self.answer_cache.get(images, self._answer)
        return self._answer(images)

    __call__ = query

    @torch.no_grad()
    def _answer(self, images: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = to_unit(images[start:start + self.batch_size].to(self._device, non_blocking=True))
            logits = self._model(batch).float()
            out.append((logits.softmax(1) if self.output == "probs" else logits).cpu())
        return torch.cat(out)
