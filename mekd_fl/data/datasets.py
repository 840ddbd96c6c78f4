"""Image datasets as plain uint8 tensors, read straight from their standard files.

Every simulated client in a process needs the same images, so datasets are
decoded once and kept in memory (``load_dataset`` is cached); clients then
select their rows by index. The file formats (IDX for the MNIST family, the
CIFAR python pickles) are parsed here rather than through torchvision's dataset
classes, which insist on their own folder layout and on downloading; torchvision
is only used to fetch files when ``download=True``.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mekd_fl.errors import ConfigError

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100", "synthetic")
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"

_NUM_CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "cifar100": 100, "synthetic": 10}
_PRETTY = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
# Folder below data_dir that torchvision's downloader writes into.
_TORCHVISION_SUBDIR = {
    "fashion-mnist": "FashionMNIST/raw",
    "mnist": "MNIST/raw",
    "cifar10": "cifar-10-batches-py",
    "cifar100": "cifar-100-python",
}
_TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = {
    "cifar10": tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",),
    "cifar100": ("train", "test"),
}
_CLASS_NAMES = {
    "fashion-mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "mnist": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}


@dataclass(frozen=True)
class ImageDataset:
    """A train/test image set held in memory as uint8 tensors.

    Images stay uint8 (4x smaller than float) because every client of a simulation
    shares them; ``mean``/``std`` let models normalise on the fly. The tensors are
    shared through the load cache, so callers must not modify them in place.
    """

    name: str
    train_images: torch.Tensor  # uint8, (N, C, H, W), contiguous
    train_labels: torch.Tensor  # int64, (N,)
    test_images: torch.Tensor  # uint8, (M, C, H, W)
    test_labels: torch.Tensor  # int64, (M,)
    num_classes: int
    mean: tuple[float, ...]  # per-channel mean of the train images scaled to [0, 1]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[2])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_images.shape[1:]
        return int(c), int(h), int(w)


def class_names(name: str, num_classes: int) -> list[str]:
    """Human-readable class names for tables; generic ``c<i>`` where none are known."""
    known = _CLASS_NAMES.get(name)
    if known is not None and len(known) == num_classes:
        return list(known)
    return [f"c{i}" for i in range(num_classes)]


def check_dataset_available(name: str, data_dir: str = "", download: bool = False) -> None:
    """Cheap check (no decoding) used at config validation.

    Raises ConfigError if ``name`` is unknown, or if its files are missing and
    ``download`` is False, so a run fails before any work starts.
    """
    _check_name(name)
    if name == "synthetic" or download:
        return
    dirs = _search_dirs(name, _resolve_dir(data_dir), search_debian=not data_dir)
    if _find_files(name, dirs) is None:
        raise _missing_files_error(name, dirs)


def load_dataset(name: str, data_dir: str = "", download: bool = False) -> ImageDataset:
    """Load a dataset by name (see ``DATASETS``), decoding its files once per process.

    ``data_dir`` empty means ``$MEKD_FL_DATA`` or ``~/.cache/mekd-fl/data``; for
    Fashion-MNIST the Debian package location is searched as well.
    """
    _check_name(name)
    return _load_cached(name, str(_resolve_dir(data_dir)), download, not data_dir)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ConfigError(f"dataset={name!r} is not known; accepted: {', '.join(DATASETS)}")


def _resolve_dir(data_dir: str) -> Path:
    """The folder named by ``data_dir``, or the default one (read at call time so tests can set the env)."""
    raw = data_dir or os.environ.get("MEKD_FL_DATA") or "~/.cache/mekd-fl/data"
    return Path(raw).expanduser().resolve()


@functools.cache
def _load_cached(name: str, root: str, download: bool, search_debian: bool) -> ImageDataset:
    # ``search_debian`` is part of the key because the fallback applies only to an empty data_dir.
    if name == "synthetic":
        return _make_dataset(name, *_synthetic())
    dirs = _search_dirs(name, Path(root), search_debian)
    files = _find_files(name, dirs)
    if files is None and download:
        _download(name, Path(root))
        files = _find_files(name, dirs)
    if files is None:
        raise _missing_files_error(name, dirs)
    if name in ("fashion-mnist", "mnist"):
        return _make_dataset(name, *_read_idx_set(files))
    return _make_dataset(name, *_read_cifar_set(name, files))


def _search_dirs(name: str, root: Path, search_debian: bool) -> list[Path]:
    """Folders that may hold ``name``'s files, in search order."""
    sub = root / _TORCHVISION_SUBDIR[name]
    if name in _CIFAR_FILES:
        return [sub, root]  # torchvision extracts into the subfolder; also accept data_dir being it
    dirs = [root, sub]
    if name == "fashion-mnist" and search_debian:
        dirs.append(Path(DEBIAN_FASHION_MNIST))
    return dirs


def _required_files(name: str) -> tuple[str, ...]:
    return _CIFAR_FILES.get(name, _IDX_FILES)


def _find_files(name: str, dirs: list[Path]) -> dict[str, Path] | None:
    """The first folder holding all of ``name``'s files, as {file stem: path}; None if none does."""
    variants = ("",) if name in _CIFAR_FILES else ("", ".gz")  # plain first: no decompression
    for folder in dirs:
        found = {}
        for stem in _required_files(name):
            path = next((folder / (stem + v) for v in variants if (folder / (stem + v)).is_file()), None)
            if path is None:
                break
            found[stem] = path
        else:
            return found
    return None


def _missing_files_error(name: str, dirs: list[Path]) -> ConfigError:
    suffix = "" if name in _CIFAR_FILES else "[.gz]"
    need = ", ".join(stem + suffix for stem in _required_files(name))
    where = " or ".join(str(d) for d in dirs)
    fix = "set download=true"
    if name == "fashion-mnist":
        fix = "install them with 'apt-get install dataset-fashion-mnist' or " + fix
    return ConfigError(f"data-dir: {_PRETTY[name]} files not found in {where} (need {need}); {fix}")


def _download(name: str, root: Path) -> None:
    """Fetch ``name`` with torchvision's downloader, which writes the raw files below ``root``."""
    import torchvision.datasets  # deferred: only needed for downloads, and slow to import

    try:
        getattr(torchvision.datasets, _TORCHVISION_CLASS[name])(root=str(root), download=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision wraps failures in RuntimeError
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise ConfigError(
            f"download: fetching {_PRETTY[name]} into {root} failed ({reason}); "
            f"put the files there yourself or set data-dir to where they are"
        ) from err


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (magic 0x0000080<ndim>), gzipped or plain."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip.BadGzipFile is an OSError
        raise ConfigError(
            f"data-dir: cannot read {path} ({err}); delete it and fetch it again with download=true"
        ) from err
    expected_magic = 0x0800 | ndim
    header = 4 + 4 * ndim
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != expected_magic or len(raw) < header:
        found = "too short" if magic is None else f"magic {magic:#010x}"
        raise ConfigError(
            f"data-dir: {path} is not an IDX file of {ndim}-d unsigned bytes ({found}, expected magic "
            f"{expected_magic:#010x}); delete it and fetch it again with download=true"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    data = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ConfigError(
            f"data-dir: {path} is truncated or corrupt ({data.size} bytes of data for shape {dims}); "
            f"delete it and fetch it again with download=true"
        )
    return data.reshape(dims)


def _read_idx_set(files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for split in ("train", "t10k"):
        images = _read_idx(files[f"{split}-images-idx3-ubyte"], 3)
        labels = _read_idx(files[f"{split}-labels-idx1-ubyte"], 1)
        out += [images[:, None], labels]  # add the channel axis: (N, 1, H, W)
    return out[0], out[1], out[2], out[3]


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # latin1 decodes the python-2 pickles' byte keys to str and keeps numpy payloads intact.
            entry = pickle.load(f, encoding="latin1")
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[label_key])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, TypeError, ValueError) as err:
        raise ConfigError(
            f"data-dir: {path} is not a CIFAR python batch ({type(err).__name__}: {err}); "
            f"delete it and fetch it again with download=true"
        ) from err
    return images, labels


def _read_cifar_set(name: str, files: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    label_key = "labels" if name == "cifar10" else "fine_labels"
    *train_stems, test_stem = _CIFAR_FILES[name]
    train = [_read_cifar_batch(files[stem], label_key) for stem in train_stems]
    test_images, test_labels = _read_cifar_batch(files[test_stem], label_key)
    return (
        np.concatenate([images for images, _ in train]),
        np.concatenate([labels for _, labels in train]),
        test_images,
        test_labels,
    )


def _synthetic() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A tiny, fixed 10-class problem for end-to-end tests: no files, learnable in a few epochs.

    Class k is a Gaussian blob at its own spot on a circle, textured with stripes
    at its own angle; samples are randomly shifted by up to 2 px, scaled and noised
    so the task is not trivially memorised but a tiny CNN still separates it.
    """
    rng = np.random.default_rng(0)
    size, num_classes, pad = 28, 10, 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) - (size - 1) / 2
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    templates = np.stack(
        [
            np.exp(-((xx - 8 * np.cos(a)) ** 2 + (yy - 8 * np.sin(a)) ** 2) / (2 * 3.0**2))
            * (0.7 + 0.3 * np.cos(1.2 * (xx * np.cos(a / 2) + yy * np.sin(a / 2))))
            for a in angles
        ]
    )
    padded = np.pad(templates, ((0, 0), (pad, pad), (pad, pad)))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.permutation(np.arange(n) % num_classes)
        dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
        images = np.stack([padded[k, y : y + size, x : x + size] for k, y, x in zip(labels, dy, dx)])
        images = images * rng.uniform(0.6, 1.0, size=(n, 1, 1)) + rng.normal(0, 0.1, size=images.shape)
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)[:, None], labels

    train_images, train_labels = draw(1200)
    test_images, test_labels = draw(300)
    return train_images, train_labels, test_images, test_labels


_CHUNK = 1 << 18  # pixels per bincount call in `_channel_stats`


def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean/std in [0, 1] from 256-bin histograms (no float copy of the images)."""
    values = np.arange(256, dtype=np.float64) / 255
    means, stds = [], []
    for c in range(images.shape[1]):
        # bincount casts its input to int64 first: on all 47M Fashion-MNIST pixels at once that cast took
        # 1.4 s of the 3 s a data set load took, paid by every ClientApp process under the Deployment
        # Engine. Chunks that fit the cache give the same counts in 0.07 s.
        flat = images[:, c].reshape(-1)
        counts = sum(
            (np.bincount(flat[i : i + _CHUNK], minlength=256) for i in range(0, flat.size, _CHUNK)),
            np.zeros(256, dtype=np.int64),
        ).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ values)
        means.append(mean)
        stds.append(float(np.sqrt(max(p @ values**2 - mean**2, 0.0))))
    return tuple(means), tuple(stds)


def _make_dataset(
    name: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, test_labels: np.ndarray
) -> ImageDataset:
    num_classes = _NUM_CLASSES[name]
    for split, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        if len(images) != len(labels) or (labels.size and not 0 <= labels.min() <= labels.max() < num_classes):
            raise ConfigError(
                f"data-dir: {_PRETTY.get(name, name)} {split} files disagree ({len(images)} images, "
                f"{len(labels)} labels, labels must be in [0, {num_classes})); fetch them again with download=true"
            )
    mean, std = _channel_stats(train_images)
    # np.require copies only arrays torch cannot share: the read-only views of IDX file buffers.
    return ImageDataset(
        name=name,
        train_images=torch.from_numpy(np.require(train_images, requirements=("C", "W"))),
        train_labels=torch.from_numpy(train_labels.astype(np.int64)),
        test_images=torch.from_numpy(np.require(test_images, requirements=("C", "W"))),
        test_labels=torch.from_numpy(test_labels.astype(np.int64)),
        num_classes=num_classes,
        mean=mean,
        std=std,
    )
