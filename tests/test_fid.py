"""Domain FID: a fixed random feature network (no data, no head), ~0 for equal sets, growing with corruption."""

import hashlib
import inspect

import pytest
import torch
from torch import nn

from mekd_fl.data import load_dataset
from mekd_fl.fid import FeatureNet, domain_fid, fixed_feature_net

torch.set_num_threads(1)
CPU = torch.device("cpu")

# sha256 of fixed_feature_net(shape, seed=0)'s state dict (names, then float32 bytes): every client, on any
# machine, must rebuild exactly these weights. A change here makes new FIDs incomparable with old ones.
WEIGHT_DIGESTS = {
    (1, 28, 28): "8e3ca70978ab845b53b313b5b84dc1731f7ae36f7171c0feb3401aa42564f695",
    (3, 32, 32): "aef1fec0eaa1ebe25eecb686aca3120c27b24120bf229fb3bfc2645d7c13831c",
}


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def net(data) -> FeatureNet:
    return fixed_feature_net(data.image_shape, seed=0)


def digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for name, value in net.state_dict().items():
        h.update(name.encode())
        h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def brighten(images: torch.Tensor, delta: int) -> torch.Tensor:
    return (images.int() + delta).clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def frechet_float64(a: torch.Tensor, b: torch.Tensor) -> float:
    """Reference Frechet distance of two feature sets, via eigh-based matrix square roots (no scipy)."""
    a, b = a.double(), b.double()

    def sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
        vals, vecs = torch.linalg.eigh(m)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = sqrtm_psd(cov_a)
    cross = sqrtm_psd(root_a @ cov_b @ root_a)
    return ((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross.trace()).item()


# ---------------------------------------------------------------- the network: fixed, data-free, head-less
@pytest.mark.parametrize("shape", sorted(WEIGHT_DIGESTS))
def test_same_seed_gives_bit_identical_weights_and_seeds_differ(shape) -> None:
    a, b = fixed_feature_net(shape, seed=0), fixed_feature_net(shape, seed=0)
    assert digest(a) == digest(b) == WEIGHT_DIGESTS[shape]
    other = fixed_feature_net(shape, seed=1)
    assert all(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), other.state_dict().values(), strict=True))
    assert digest(fixed_feature_net(shape)) == digest(a)  # seed defaults to 0


def test_building_leaves_the_callers_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    fixed_feature_net((1, 28, 28), seed=7)
    FeatureNet((3, 32, 32), seed=8)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(torch.rand(5), expected)


def test_weights_depend_on_no_data(data) -> None:
    # The factory takes no data, and using the network on images changes nothing in it.
    assert list(inspect.signature(fixed_feature_net).parameters) == ["image_shape", "seed"]
    net = fixed_feature_net(data.image_shape, seed=0)
    digest_before = digest(net)
    domain_fid(net, data.train_images, data.test_images, CPU)
    net(data.train_images[:64].float() / 255)
    assert digest(net) == digest_before == digest(fixed_feature_net(data.image_shape, seed=0))
    # Nothing that could be fitted to data: no buffers (no BatchNorm running stats), no biases, all frozen.
    assert list(net.buffers()) == []
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in net.modules())
    assert all(not p.requires_grad for p in net.parameters())
    assert all(name.endswith("weight") for name, _ in net.named_parameters())


def test_has_no_classifier_head(net: FeatureNet, data) -> None:
    assert not hasattr(net, "classifier") and not net.training
    x = data.test_images[:5].float() / 255
    with torch.no_grad():
        feats = net.features(x)
        assert torch.equal(net(x), feats)  # its only output is the features
    assert feats.shape == (5, FeatureNet.num_features) == (5, net.num_features)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].out_features == net.num_features  # the projection, nothing after


def test_rejects_too_small_image_shapes() -> None:
    with pytest.raises(ValueError):
        fixed_feature_net((1, 4, 28))
    with pytest.raises(ValueError):
        fixed_feature_net((28, 28))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the distance
def test_fid_of_a_set_with_itself_is_zero(net: FeatureNet, data) -> None:
    real = data.test_images
    assert domain_fid(net, real, real, CPU) < 1e-3 * domain_fid(net, real, brighten(real, 30), CPU)


def test_fid_grows_with_the_noise_level(net: FeatureNet, data) -> None:
    real = data.test_images
    fids = [domain_fid(net, real, add_noise(real, sigma), CPU) for sigma in (2, 12, 40)]
    print("domain FID vs Gaussian noise sigma 2 / 12 / 40:", [round(f, 3) for f in fids])
    assert 0 < fids[0] < fids[1] < fids[2]
    assert fids[1] > 3 * fids[0] and fids[2] > 3 * fids[1]


def test_fid_grows_with_the_shift_and_sees_dropped_modes(net: FeatureNet, data) -> None:
    real = data.test_images
    fids = [domain_fid(net, real, brighten(real, d), CPU) for d in (0, 10, 30, 60)]
    assert fids == sorted(fids) and fids[1] > 0
    first, second = data.train_images[:600], data.train_images[600:]
    same_distribution = domain_fid(net, first, second, CPU)
    # Two halves of the same distribution are closer than a visibly shifted copy ...
    assert same_distribution < fids[2]
    # ... and than a half that lacks half of the classes (a mode-collapsed emulator).
    half_the_modes = second[data.train_labels[600:] < 5]
    assert domain_fid(net, first, half_the_modes, CPU) > 3 * same_distribution


def test_fid_is_symmetric_and_batching_independent(net: FeatureNet, data) -> None:
    real, fake = data.test_images, brighten(data.test_images, 30)
    forward = domain_fid(net, real, fake, CPU)
    assert domain_fid(net, fake, real, CPU, batch_size=7) == pytest.approx(forward, rel=1e-4)


def test_fid_matches_a_float64_reference(net: FeatureNet, data) -> None:
    """Checks torchmetrics' custom-extractor path, including our uint8 -> [0, 1] conversion."""
    real, fake = data.test_images, brighten(data.train_images[:400], 20)
    with torch.no_grad():
        expected = frechet_float64(net.features(real.float() / 255), net.features(fake.float() / 255))
    assert domain_fid(net, real, fake, CPU) == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_fid_works_for_rgb_32x32() -> None:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (200,), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 50 + torch.randint(0, 60, (200, 3, 32, 32), generator=g)).to(torch.uint8)
    net = fixed_feature_net((3, 32, 32), seed=0)
    assert net.features(images[:2].float() / 255).shape == (2, FeatureNet.num_features)
    assert domain_fid(net, images, images, CPU) < 1e-3
    assert domain_fid(net, images, brighten(images, 40), CPU) > 0.01


def test_fid_rejects_wrong_images(net: FeatureNet, data) -> None:
    real = data.test_images
    with pytest.raises(ValueError):
        domain_fid(net, real, real.float(), CPU)
    with pytest.raises(ValueError):
        domain_fid(net, real, torch.zeros(4, 3, 28, 28, dtype=torch.uint8), CPU)
    with pytest.raises(ValueError):
        domain_fid(net, real, real[:1], CPU)
