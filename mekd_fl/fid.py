"""Domain FID: how close an emulator's samples are to a client's real images, measured on the client.

The paper reports that a better-FID emulator gives a better student (its
Table 6). Each client scores its own emulator: the Frechet distance between
the features of its real images and of as many generated ones. The score
needs a feature network, and the choice of that network decides what leaks.

**The features are random and data-independent.** :func:`fixed_feature_net`
builds a small CNN whose weights are drawn from a seeded generator and never
trained, so the network encodes nothing about anyone's data: it reveals
nothing about the server's images or labels, needs no download, and every
client rebuilds the very same network (bit-identical weights on any machine)
from the image shape and the seed alone; nothing has to be sent. It has no
classifier head and nothing to fit: no biases, no normalisation statistics
(no BatchNorm), no buffers. Random convolutional features still separate the
main modes of image data well enough to rank emulators (random-filter CNNs
are a classic baseline for that). Measured on Fashion-MNIST (seeds 0-2,
against the FID between the two 5000-image halves of its test set, ~0.4-0.9):
a half missing three classes scores 21-36x that floor, one class alone
170-380x, Gaussian pixel noise of sigma 16/255 9-21x and 48/255 120-350x,
a +20/255 brightness shift ~100x and a 3x3 blur 90-125x. Noise of sigma
4/255 stays near the floor (1.2-1.4x); a trained classifier sees it barely
better (2.4x).

**Not comparable to published (Inception) FIDs**, nor across feature networks
(another seed or image shape, or a change to the architecture or the init):
the scale is set by the network. Compare domain FIDs only between emulators
scored with the same ``fixed_feature_net(image_shape, seed)``; within one run
all clients use the same one, so their FIDs are comparable with each other.

Alternatives, and what they would reveal:

(a) A feature network trained on the server's labeled data and sent to the
    clients (what this module used to do): it is a classifier of the server's
    data (82 % accurate on Fashion-MNIST), handed to every client without a
    single teacher query. The project's rule is that a client never receives
    a network trained on server data.
(b) The FID computed on the server: the client would have to send its
    generator or its samples, which emulate its private data distribution.
(c) Features learned by each client on its own data, without labels: reveals
    nothing, but every client then measures with its own ruler, so the FIDs
    are not comparable between clients (nor averaged meaningfully).

The Frechet distance itself is torchmetrics' ``FrechetInceptionDistance`` with
this network as a custom feature extractor (accumulated in float64).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mekd_fl.augment import to_unit
from mekd_fl.models.gan import ImageShape

# Multiplies the random projection so Fashion-MNIST-like FIDs come out in units to hundreds rather than
# below 1 (reports round FIDs to one decimal); a fixed constant, so it changes no ranking.
_FEATURE_SCALE = 10.0


class FeatureNet(nn.Module):
    """Fixed random CNN embedding (C, H, W) images in [0, 1] into ``num_features`` features; no classifier.

    Three conv(3x3, no bias)-ReLU-pool blocks (16, 32, 64 channels; max pool
    after the first, which keeps sharp strokes and pixel noise visible, average
    pool after the others, which keeps where and how bright things are), then a
    linear projection of the whole flattened map to ``num_features`` units. The
    projection sees the whole map, not a global average, so the features keep
    *where* things are in the image, which a generator must reproduce too.
    Images are centred to [-1, 1] first, so the bias-free random filters
    respond to structure rather than mostly to the mean brightness.

    Weights are Kaiming-uniform (gain sqrt(2) for the ReLU layers), drawn in
    float64 from a ``torch.Generator`` seeded with ``seed`` and rounded to
    float32: integer Mersenne-Twister draws and exact IEEE arithmetic, so the
    same seed gives the same bits on any machine, and the caller's global RNG
    is never touched (the layers are built on the meta device, so even their
    default init never runs). All parameters are frozen; there are no buffers.
    Build it with :func:`fixed_feature_net`.
    """

    num_features = 64  # read by torchmetrics, which then skips probing the network

    def __init__(self, image_shape: ImageShape, seed: int = 0) -> None:
        super().__init__()
        if len(image_shape) != 3 or min(image_shape) < 1 or min(image_shape[1:]) < 8:
            raise ValueError(f"feature net needs an image shape (C, H, W) with H, W >= 8, got {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.seed = int(seed)
        chans = [self.image_shape[0], 16, 32, 64]
        blocks: list[nn.Module] = []
        side = self.image_shape[1:]
        for i, (c_in, c_out) in enumerate(zip(chans, chans[1:])):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, device="meta"),
                nn.ReLU(),
                nn.MaxPool2d(2) if i == 0 else nn.AvgPool2d(2),
            ]
            side = (side[0] // 2, side[1] // 2)
        projection = nn.Linear(chans[-1] * side[0] * side[1], self.num_features, bias=False, device="meta")
        self.body = nn.Sequential(*blocks, nn.Flatten(), projection)
        self.to_empty(device="cpu")
        self._init_weights()
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def _init_weights(self) -> None:
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        layers = [m for m in self.body if isinstance(m, (nn.Conv2d, nn.Linear))]
        for layer in layers:
            w = layer.weight
            gain = _FEATURE_SCALE if layer is layers[-1] else math.sqrt(2.0)
            bound = gain * math.sqrt(3.0 / w[0].numel())
            u = torch.rand(w.shape, generator=gen, dtype=torch.float64)
            w.copy_(((2.0 * u - 1.0) * bound).to(torch.float32))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features) features of images in [0, 1]."""
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`features`: this network has no other output."""
        return self.features(x)


def fixed_feature_net(image_shape: tuple[int, int, int], seed: int = 0) -> FeatureNet:
    """The data-independent domain-FID feature network for ``image_shape`` (C, H, W): CPU, eval mode, frozen.

    Depends only on its arguments: the same (image_shape, seed) gives
    bit-identical weights on any machine, so every client builds its own copy
    and nothing is sent. Leaves the caller's global RNG untouched.
    """
    return FeatureNet(image_shape, seed).eval()


class _Features(nn.Module):
    """Adapter handing torchmetrics the FeatureNet's features.

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
def domain_fid(
    net: FeatureNet,
    real_uint8: torch.Tensor,
    fake_uint8: torch.Tensor,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> float:
    """Frechet distance between the FeatureNet features of two uint8 image sets (N, C, H, W).

    ``net`` is normally ``fixed_feature_net(image_shape, seed)``; it is moved
    to ``device`` and put in eval mode. Both sets need at least 2 images; with
    fewer images than features (64) the covariances are singular and the
    estimate is biased upwards, as any FID on small sets.
    """
    for name, images in (("real", real_uint8), ("fake", fake_uint8)):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != net.image_shape or len(images) < 2:
            raise ValueError(
                f"domain FID needs >= 2 uint8 {name} images of shape {net.image_shape}, "
                f"got {images.dtype} {tuple(images.shape)}"
            )
    net.eval()
    # Imported here, not with the module: torchmetrics pulls in torchvision and torch._dynamo (seconds, and a
    # circular-import race when two threads of one process load them at once, as Flower's app loading can),
    # while every ClientApp imports this module and most runs never measure a FID.
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Features(net), input_img_size=net.image_shape, normalize=True)
    metric.to(device)
    for images, real in ((real_uint8, True), (fake_uint8, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start : start + batch_size].to(device), real=real)
    # A squared distance: clamp the tiny negative round-off of a set compared with itself.
    return max(0.0, float(metric.compute()))
