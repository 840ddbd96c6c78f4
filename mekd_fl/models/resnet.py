"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) used as teachers and students.

Depth is 6n+2: a 3x3 stem, three stages of n BasicBlocks (widths 16/32/64,
strides 1/2/2) and a linear head. Global average pooling is adaptive so the
same network accepts 28x28 (MNIST-like), 32x32 (CIFAR) and 64x64 inputs.
Shortcuts use a 1x1 conv + BN projection whenever the shape changes.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from mekd_fl.errors import ConfigError

ARCHITECTURES: tuple[str, ...] = (
    "resnet8",
    "resnet14",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
)

_STAGE_WIDTHS = (16, 32, 64)
_STAGE_STRIDES = (1, 2, 2)


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) returning class logits."""

    def __init__(self, blocks_per_stage: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            _conv3x3(in_channels, _STAGE_WIDTHS[0]),
            nn.BatchNorm2d(_STAGE_WIDTHS[0]),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_ch = _STAGE_WIDTHS[0]
        for width, stride in zip(_STAGE_WIDTHS, _STAGE_STRIDES):
            for i in range(blocks_per_stage):
                layers.append(BasicBlock(in_ch, width, stride if i == 0 else 1))
                in_ch = width
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        return self.fc(torch.flatten(self.pool(out), 1))


def parse_depth(arch: str, setting: str = "teacher-arch/student-arch") -> int:
    """Return the depth of a ``resnet{6n+2}`` name, or raise a one-line ConfigError naming `setting`."""
    match = re.fullmatch(r"resnet(\d+)", arch.strip().lower())
    depth = int(match.group(1)) if match else 0
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ConfigError(
            f"{setting}={arch!r} is not a CIFAR ResNet; accepted: {', '.join(ARCHITECTURES)} (depth 6n+2)"
        )
    return depth


def resnet(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """Build a CIFAR ResNet from its name, e.g. ``resnet("resnet20", 10, 3)``."""
    return CifarResNet((parse_depth(arch) - 2) // 6, num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN running stats are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
