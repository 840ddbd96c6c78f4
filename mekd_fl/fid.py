"""Domain FID: how close an emulator's samples are to a client's real images, measured offline.

The paper reports that a better-FID emulator gives a better student (its
Table 6). The usual FID embeds images with an ImageNet Inception-v3, which
would mean a download and 299x299 upsampling of 28x28 images. Instead the
embedding here is the 64-dim penultimate layer of a small CNN classifier
(:class:`FeatureNet`) trained on labeled data the caller chooses, e.g. the
server's share, independently of the teacher: the setting is source-blind, so
the teacher's internals are not available to measure with.

The Frechet distance itself is torchmetrics' ``FrechetInceptionDistance`` with
this network as a custom feature extractor (accumulated in float64).

This "domain FID" is NOT comparable to published (Inception) FIDs, nor across
runs whose FeatureNets differ (another data set, seed or recipe): its scale is
set by the feature network. Compare it only between emulators scored by the
same FeatureNet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from mekd_fl.augment import to_unit
from mekd_fl.models.gan import ImageShape


class FeatureNet(nn.Module):
    """Small CNN classifier for (C, H, W) images in [0, 1]; its 64-dim hidden layer gives the FID features.

    Three conv-BN-ReLU-maxpool blocks (16, 32, 64 channels), then a hidden
    linear layer of ``num_features`` units and the linear classifier. The
    hidden layer sees the whole flattened map, not a global average, so the
    features keep *where* things are in the image (a digit's strokes, a blob's
    position), which a generator must reproduce too. Small enough to train in
    seconds on a CPU.
    """

    num_features = 64  # read by torchmetrics, which then skips probing the network

    def __init__(self, num_classes: int, image_shape: ImageShape) -> None:
        super().__init__()
        self.image_shape = tuple(image_shape)
        chans = [image_shape[0], 16, 32, 64]
        blocks: list[nn.Module] = []
        side = image_shape[1:]
        for c_in, c_out in zip(chans, chans[1:]):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            side = (side[0] // 2, side[1] // 2)
        self.body = nn.Sequential(*blocks, nn.Flatten(), nn.Linear(chans[-1] * side[0] * side[1], self.num_features),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Linear(self.num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features) penultimate activations of images in [0, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_feature_net(images_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int,
                      epochs: int = 1, batch_size: int = 128,
                      device: torch.device = torch.device("cpu")) -> FeatureNet:
    """Train a :class:`FeatureNet` with Adam (lr 2e-3) and cross-entropy; returned in eval mode on ``device``.

    Features only need to separate the data's main modes, not to win on
    accuracy, so one or two epochs suffice. Deterministic for a seed and
    leaves the caller's global RNG untouched.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise ValueError(f"feature net expects uint8 images (N, C, H, W), got {images_uint8.dtype} "
                         f"{tuple(images_uint8.shape)}")
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        net = FeatureNet(num_classes, tuple(images_uint8.shape[1:])).to(device).train()
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        order_rng = torch.Generator().manual_seed(seed)
        images_dev, labels_dev = images_uint8.to(device), labels.to(device)
        for _ in range(epochs):
            order = torch.randperm(len(images_uint8), generator=order_rng).to(device)
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(net(to_unit(images_dev[idx])), labels_dev[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    return net.eval()


class _Features(nn.Module):
    """Adapter handing torchmetrics the FeatureNet's penultimate features.

    With a custom extractor torchmetrics passes ``update``'s images through
    unchanged (its ``normalize`` flag only picks the dtype of a probe input,
    which ``num_features`` makes it skip), so the conversion lives here:
    uint8 becomes [0, 1], float is taken as [0, 1] already.
    """

    def __init__(self, net: FeatureNet) -> None:
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(to_unit(x))


@torch.no_grad()
def domain_fid(net: FeatureNet, real_uint8: torch.Tensor, fake_uint8: torch.Tensor,
               device: torch.device = torch.device("cpu"), batch_size: int = 256) -> float:
    """Frechet distance between the FeatureNet features of two uint8 image sets (N, C, H, W).

    Both sets need at least 2 images; with fewer images than features (64)
    the covariances are singular and the estimate is biased upwards, as any
    FID on small sets. Puts ``net`` in eval mode.
    """
    for name, images in (("real", real_uint8), ("fake", fake_uint8)):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != net.image_shape or len(images) < 2:
            raise ValueError(f"domain FID needs >= 2 uint8 {name} images of shape {net.image_shape}, "
                             f"got {images.dtype} {tuple(images.shape)}")
    net.eval()
    metric = FrechetInceptionDistance(feature=_Features(net), input_img_size=net.image_shape, normalize=True)
    metric.to(device)
    for images, real in ((real_uint8, True), (fake_uint8, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size].to(device), real=real)
    # A squared distance: clamp the tiny negative round-off of a set compared with itself.
    return max(0.0, float(metric.compute()))
