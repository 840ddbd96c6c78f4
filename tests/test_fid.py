"""Domain FID: the feature network learns, and the distance is ~0 for equal sets and grows with a shift."""

import pytest
import torch

from mekd_fl.data import load_dataset
from mekd_fl.fid import FeatureNet, domain_fid, train_feature_net

torch.set_num_threads(1)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def net(data) -> FeatureNet:
    return train_feature_net(data.train_images, data.train_labels, data.num_classes, seed=0, epochs=2)


def brighten(images: torch.Tensor, delta: int) -> torch.Tensor:
    return (images.int() + delta).clamp(0, 255).to(torch.uint8)


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


def test_feature_net_beats_chance(net: FeatureNet, data) -> None:
    with torch.no_grad():
        pred = net(data.test_images.float() / 255).argmax(1)
        feats = net.features(data.test_images[:5].float() / 255)
    assert (pred == data.test_labels).float().mean() > 0.5  # chance is 0.1
    assert feats.shape == (5, FeatureNet.num_features) and not net.training


def test_feature_net_training_is_deterministic(data) -> None:
    images, labels = data.train_images[:256], data.train_labels[:256]
    before = torch.get_rng_state()
    a = train_feature_net(images, labels, data.num_classes, seed=3, batch_size=64)
    b = train_feature_net(images, labels, data.num_classes, seed=3, batch_size=64)
    assert torch.equal(torch.get_rng_state(), before)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_fid_of_a_set_with_itself_is_zero(net: FeatureNet, data) -> None:
    real = data.test_images
    assert domain_fid(net, real, real, CPU) < 1e-3 * domain_fid(net, real, brighten(real, 30), CPU)


def test_fid_grows_with_the_shift(net: FeatureNet, data) -> None:
    real = data.test_images
    fids = [domain_fid(net, real, brighten(real, d), CPU) for d in (0, 10, 30, 60)]
    assert fids == sorted(fids) and fids[1] > 0
    # Two halves of the same distribution are closer than a visibly shifted copy.
    assert domain_fid(net, data.train_images[:600], data.train_images[600:], CPU) < fids[2]


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
    net = train_feature_net(images, labels, 4, seed=0, batch_size=64)
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
