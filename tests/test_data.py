"""Dataset loading: file formats, search order, download path and error messages."""

from __future__ import annotations

import gzip
import pickle
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from mekd_fl.data import DATASETS, DEBIAN_FASHION_MNIST, check_dataset_available, class_names, load_dataset
from mekd_fl.data import datasets as datasets_module
from mekd_fl.errors import ConfigError

IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when the name ends in .gz."""
    magic = 0x0800 | array.ndim if magic is None else magic
    payload = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_idx_set(folder: Path, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny MNIST-format set (12 train, 5 test images of 28x28); returns what was written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 12, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(folder / (stem + (".gz" if gz else "")), array)
    return arrays


def check_matches_idx(ds, arrays: dict[str, np.ndarray]) -> None:
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    assert ds.train_images.is_contiguous()
    assert np.array_equal(ds.train_images[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.train_labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(ds.test_images[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(ds.test_labels.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28) and ds.channels == 1 and ds.image_size == 28
    pixels = arrays["train-images-idx3-ubyte"] / 255
    assert ds.mean == pytest.approx((pixels.mean(),)) and ds.std == pytest.approx((pixels.std(),))


def test_idx_plain_files_in_data_dir(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path, gz=False)
    check_dataset_available("mnist", str(tmp_path))
    check_matches_idx(load_dataset("mnist", str(tmp_path)), arrays)


def test_idx_gz_files_in_torchvision_raw_layout(tmp_path: Path) -> None:
    arrays = write_idx_set(tmp_path / "FashionMNIST" / "raw", gz=True)
    check_dataset_available("fashion-mnist", str(tmp_path))
    check_matches_idx(load_dataset("fashion-mnist", str(tmp_path)), arrays)


def test_default_data_dir_comes_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_idx_set(tmp_path / "MNIST" / "raw", gz=False)
    monkeypatch.setenv("MEKD_FL_DATA", str(tmp_path))
    check_matches_idx(load_dataset("mnist"), arrays)


def test_loaded_dataset_is_cached(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    assert load_dataset("mnist", str(tmp_path)) is load_dataset("mnist", str(tmp_path) + "/")


def test_corrupt_magic_number_is_a_clear_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(12, np.uint8), magic=0x0803)
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte\.gz is not an IDX file .*magic 0x00000803") as err:
        load_dataset("mnist", str(tmp_path))
    assert "\n" not in str(err.value)


def test_truncated_idx_file_is_a_clear_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ConfigError, match="truncated"):
        load_dataset("mnist", str(tmp_path))


def test_bad_gzip_is_a_clear_error(tmp_path: Path) -> None:
    write_idx_set(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match="cannot read .*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist", "cifar10", "cifar100"])
def test_missing_files_name_data_dir_and_download(tmp_path: Path, name: str) -> None:
    missing = tmp_path / "nowhere"
    for call in (check_dataset_available, load_dataset):
        with pytest.raises(ConfigError, match=r"^data-dir: .*not found in .*nowhere.*download=true") as err:
            call(name, str(missing))
        assert "\n" not in str(err.value)
    check_dataset_available(name, str(missing), download=True)  # will be fetched, so not an error


def test_missing_fashion_mnist_suggests_debian_package(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="apt-get install dataset-fashion-mnist"):
        check_dataset_available("fashion-mnist", str(tmp_path))


def test_unknown_dataset_lists_accepted_names() -> None:
    for call in (check_dataset_available, load_dataset):
        with pytest.raises(ConfigError, match=r"^dataset='foo' is not known; accepted: ") as err:
            call("foo")
        assert all(name in str(err.value) for name in DATASETS)


def write_cifar_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str) -> None:
    """A CIFAR python batch as the loader sees it (str keys, (N, 3072) uint8 rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"data": images.reshape(len(images), -1), label_key: labels.tolist()}, protocol=2))


def test_cifar10_pickles(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-10-batches-py"
    images = rng.integers(0, 256, (7, 4, 3, 32, 32), dtype=np.uint8)  # 5 train batches, test, spare
    labels = rng.integers(0, 10, (7, 4))
    for i in range(5):
        write_cifar_batch(folder / f"data_batch_{i + 1}", images[i], labels[i], "labels")
    write_cifar_batch(folder / "test_batch", images[5], labels[5], "labels")
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(images[:5].reshape(20, 3, 32, 32)))
    assert ds.train_labels.tolist() == labels[:5].ravel().tolist() and ds.test_labels.tolist() == labels[5].tolist()
    assert ds.num_classes == 10 and len(ds.mean) == 3 and len(ds.std) == 3
    assert ds.mean[1] == pytest.approx(images[:5, :, 1].mean() / 255)


def test_cifar100_pickles_with_data_dir_being_the_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    train_images, test_images = (
        rng.integers(0, 256, (6, 3, 32, 32), np.uint8),
        rng.integers(0, 256, (3, 3, 32, 32), np.uint8),
    )
    write_cifar_batch(tmp_path / "train", train_images, np.array([0, 99, 5, 42, 7, 99]), "fine_labels")
    write_cifar_batch(tmp_path / "test", test_images, np.array([1, 2, 98]), "fine_labels")
    check_dataset_available("cifar100", str(tmp_path))
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 100 and ds.train_labels.tolist() == [0, 99, 5, 42, 7, 99]
    assert torch.equal(ds.test_images, torch.from_numpy(test_images))


def test_corrupt_cifar_pickle_is_a_clear_error(tmp_path: Path) -> None:
    write_cifar_batch(
        tmp_path / "train", np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), "labels"
    )  # no fine_labels
    write_cifar_batch(tmp_path / "test", np.zeros((2, 3, 32, 32), np.uint8), np.array([0, 1]), "fine_labels")
    with pytest.raises(ConfigError, match=r"train is not a CIFAR python batch \(KeyError"):
        load_dataset("cifar100", str(tmp_path))


def test_download_writes_raw_files_that_are_then_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    written: dict[str, np.ndarray] = {}

    class FakeFashionMNIST:
        def __init__(self, root: str, download: bool) -> None:
            assert download
            calls.append(root)
            written.update(write_idx_set(Path(root) / "FashionMNIST" / "raw", gz=True, seed=3))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    with pytest.raises(ConfigError):
        load_dataset("fashion-mnist", str(tmp_path))
    check_matches_idx(load_dataset("fashion-mnist", str(tmp_path), download=True), written)
    assert calls == [str(tmp_path.resolve())]


def test_download_failure_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(root: str, download: bool) -> None:
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got:\n<urlopen error>")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(
        ConfigError, match=r"^download: fetching MNIST into .* failed \(RuntimeError: Error downloading"
    ) as err:
        load_dataset("mnist", str(tmp_path), download=True)
    assert "\n" not in str(err.value)


@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST).is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_debian_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEKD_FL_DATA", str(tmp_path))  # empty default dir: falls back to the Debian files
    check_dataset_available("fashion-mnist")
    ds = load_dataset("fashion-mnist")
    assert ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert torch.bincount(ds.train_labels).tolist() == [6000] * 10
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3) and ds.std[0] == pytest.approx(0.3530, abs=1e-3)


def test_synthetic_shapes_determinism_and_speed() -> None:
    start = time.perf_counter()
    first = datasets_module._synthetic()
    assert time.perf_counter() - start < 0.5
    second = datasets_module._synthetic()
    assert all(np.array_equal(a, b) for a, b in zip(first, second))

    ds = load_dataset("synthetic")
    assert ds.train_images.shape == (1200, 1, 28, 28) and ds.test_images.shape == (300, 1, 28, 28)
    assert ds.train_images.dtype == torch.uint8 and ds.num_classes == 10
    assert torch.bincount(ds.train_labels).tolist() == [120] * 10
    assert torch.bincount(ds.test_labels).tolist() == [30] * 10
    pixels = ds.train_images.double() / 255
    assert ds.mean[0] == pytest.approx(pixels.mean().item()) and ds.std[0] == pytest.approx(
        pixels.std(unbiased=False).item()
    )


def test_synthetic_classes_are_learnable() -> None:
    """Even a nearest-class-mean classifier separates the classes, so a tiny CNN will."""
    ds = load_dataset("synthetic")
    train, test = ds.train_images.double(), ds.test_images.double()
    centroids = torch.stack([train[ds.train_labels == k].mean(0) for k in range(10)])
    predicted = torch.cdist(test.flatten(1), centroids.flatten(1)).argmin(1)
    assert (predicted == ds.test_labels).double().mean() > 0.8


def test_class_names() -> None:
    assert class_names("fashion-mnist", 10)[0] == "T-shirt/top" and class_names("fashion-mnist", 10)[9] == "Ankle boot"
    assert class_names("mnist", 10) == [str(d) for d in range(10)]
    assert class_names("cifar10", 10)[:2] == ["airplane", "automobile"]
    assert class_names("cifar100", 100) == [f"c{i}" for i in range(100)]
    assert class_names("synthetic", 10)[-1] == "c9"
