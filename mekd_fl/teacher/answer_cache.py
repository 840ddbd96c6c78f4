"""A disk cache of the teacher's answers, keyed by the teacher checkpoint and the exact query images.

Why: in a benchmark sweep every method of a partition sends the very same query images to the very
same (cached) teacher, and answering 27,000 Fashion-MNIST queries with a ResNet32 costs about a minute
on 2 CPU cores, as much as a round of training. The teacher is deterministic in eval mode, so the
answers are a pure function of (teacher checkpoint, output kind, images) and can be stored like the
teacher checkpoint itself. It lives on the server side, behind the oracle: clients cannot tell, and the
oracle still validates and counts every query against the client's budget before looking here.

Layout: `<cache-dir>/answers/<teacher key>/<output>-<sha256 of dtype, shape and bytes>.pt`, written to a
temporary name and renamed, so a killed run never leaves a half-written file that a later run reads. The
server's teacher key is the recipe's key plus `weights_digest` of the teacher it loaded: one recipe
trained on two machines gives two teachers, and each must get its own answers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch


def images_digest(images: torch.Tensor) -> str:
    """A fingerprint of exactly these query images (dtype, shape and bytes): the cache's file name, and how
    the oracle and the teacher node recognise a repeat of images already paid for."""
    data = images.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{data.dtype}{tuple(data.shape)}".encode())
    digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:32]


class AnswerCache:
    """Answers of one teacher (`teacher_key`: a name that changes whenever its weights do) for one output kind."""

    def __init__(self, folder: Path, teacher_key: str, output: str) -> None:
        self.folder = Path(folder) / "answers" / teacher_key
        self.output = output
        self.hits = 0
        self.misses = 0

    def path_for(self, images: torch.Tensor) -> Path:
        return self.folder / f"{self.output}-{images_digest(images)}.pt"

    def get(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The stored answers for exactly these images, or `compute(images)`, stored for next time."""
        path = self.path_for(images)
        if path.is_file():
            try:
                answers = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # noqa: BLE001  (torch raises many kinds for a damaged file)
                answers = None  # unreadable (another torch, a damaged disk): compute again and replace it
            if isinstance(answers, torch.Tensor) and answers.shape[0] == images.shape[0]:
                self.hits += 1
                return answers
        self.misses += 1
        answers = compute(images)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save(answers.cpu(), tmp)
        os.replace(tmp, path)
        return answers
