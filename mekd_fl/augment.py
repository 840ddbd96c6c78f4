"""Batch augmentation and normalisation on tensors.

Why hand-written: torchvision's v2 transforms draw one random crop per call, so a batch either shares
one crop or costs a Python loop per image. Random translation (the "pad and random crop" of the
CIFAR recipe) and horizontal flip are a single `grid_sample` over the batch here, on whatever device
the batch lives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Data sets whose classes survive a horizontal mirror (digits do not: a mirrored 2 is no 2).
FLIP_SAFE = frozenset({"fashion-mnist", "cifar10", "cifar100", "synthetic"})


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1]; float input is assumed to be in [0, 1] already."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def random_shift_flip(
    x: torch.Tensor, max_shift: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels (zero fill) and mirror half of them."""
    b, _, h, w = x.shape
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator).to(x.device, x.dtype)
    theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if flip:
        signs = torch.randint(0, 2, (b,), generator=generator).to(x.device, x.dtype) * 2 - 1
        theta[:, 0, 0] = signs
    theta[:, 0, 2] = shifts[:, 0] * 2.0 / w
    theta[:, 1, 2] = shifts[:, 1] * 2.0 / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class Normalize(nn.Module):
    """Per-channel standardisation as the first layer, so models take images in [0, 1].

    Keeping it inside the model means the oracle, the students and the evaluation all feed the
    same kind of input and no caller can forget the statistics.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
