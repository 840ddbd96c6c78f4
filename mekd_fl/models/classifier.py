"""The classifier every party uses: a CIFAR ResNet behind its own input normalisation, and batched inference.

Why its own module: the teacher, the students and the benchmarks build the same network from a data set's
shape and statistics, and all of them predict in batches on a device; keeping that here means the server,
the clients and the teacher's training cannot disagree on what a model is.
"""

from __future__ import annotations

import torch
from torch import nn

from mekd_fl.augment import Normalize, to_unit
from mekd_fl.models.resnet import resnet


def build_model(
    arch: str, num_classes: int, image_shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...]
) -> nn.Module:
    """A CIFAR ResNet that takes images in [0, 1] (normalisation is its first layer)."""
    return nn.Sequential(Normalize(mean, std), resnet(arch, num_classes, image_shape[0]))


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 1024
) -> torch.Tensor:
    """Logits for uint8 (or [0, 1] float) images, computed in batches on `device`, returned on the CPU."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        batch = to_unit(images[start : start + batch_size].to(device, non_blocking=True))
        out.append(model(batch).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predict_logits(model, images, device).argmax(1) == labels).float().mean().item()
