"""Teacher training on the server's labeled share, with a checkpoint cache.

Why a cache: the teacher is the most expensive part of a run on a CPU, and every run of a sweep with
the same data set, architecture, seed and recipe would train the same network again. The cache key
holds everything that changes the weights; the file is written atomically, so a run killed while
saving never leaves a half-written checkpoint that a later run would trust. It is read with
`weights_only=True`: a checkpoint holds only tensors and plain containers, so a file planted in the
cache (a pickle that would run code when loaded) is refused instead of executed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mekd_fl.augment import FLIP_SAFE, random_shift_flip, to_unit
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.models.classifier import accuracy, build_model
from mekd_fl.run_data import RunData


@dataclass(frozen=True)
class TeacherRecipe:
    """Everything that determines the teacher's weights (and so the cache key)."""

    dataset: str
    arch: str
    num_classes: int
    image_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    epochs: int
    lr: float
    batch_size: int
    server_share: float
    num_train: int

    @classmethod
    def for_run(cls, data: RunData, cfg: RunConfig) -> TeacherRecipe:
        """The recipe (and so the cache key) of a run's teacher: the run and `mekd-fl evaluate` agree."""
        ds = data.dataset
        return cls(
            dataset=ds.name,
            arch=cfg.teacher_arch,
            num_classes=ds.num_classes,
            image_shape=ds.image_shape,
            mean=ds.mean,
            std=ds.std,
            seed=cfg.seed,
            epochs=cfg.teacher_epochs,
            lr=cfg.teacher_lr,
            batch_size=cfg.teacher_batch_size,
            server_share=cfg.server_share,
            num_train=len(data.split.server_indices),
        )

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True, default=list)
        digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
        return f"{self.dataset}-{self.arch}-seed{self.seed}-ep{self.epochs}-{digest}"


def train_teacher(
    recipe: TeacherRecipe,
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """SGD with momentum, multi-step LR (x0.1 at 50% and 75%), random shift (+ flip where it fits)."""
    torch.manual_seed(recipe.seed)
    model = build_model(recipe.arch, recipe.num_classes, recipe.image_shape, recipe.mean, recipe.std).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = max(1, -(-len(images) // recipe.batch_size))
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(total * 0.5), int(total * 0.75)], gamma=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    flip = recipe.dataset in FLIP_SAFE
    shift = 4 if recipe.image_shape[1] >= 32 else 2
    images_dev, labels_dev = images.to(device), labels.to(device)
    for epoch in range(recipe.epochs):
        model.train()
        t0, loss_sum, correct = time.time(), 0.0, 0
        order = torch.randperm(len(images), generator=gen).to(device)
        for start in range(0, len(images), recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            x = random_shift_flip(to_unit(images_dev[idx]), shift, flip, gen)
            y = labels_dev[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
        log(
            f"[teacher] epoch {epoch + 1}/{recipe.epochs}: loss {loss_sum / len(images):.4f}, "
            f"train acc {correct / len(images):.4f} ({time.time() - t0:.0f}s)"
        )
    model.eval()
    return model


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: Path) -> dict:
    """Read a cached checkpoint without running code: `torch.load(weights_only=True)`.

    Anything that does not load that way (a pickle naming functions or classes, a damaged or truncated
    file, a foreign format) is a ConfigError naming cache-dir and the file, never a traceback.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the file is not ours to trust
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ConfigError(
            f"cache-dir: checkpoint {path} cannot be read safely ({type(exc).__name__}: {reason}); delete it to retrain"
        ) from None
    if not isinstance(ckpt, dict) or not {"recipe", "state_dict", "meta"} <= set(ckpt):
        raise ConfigError(
            f"cache-dir: checkpoint {path} cannot be read safely (not a teacher checkpoint: "
            f"expected keys recipe, state_dict, meta); delete it to retrain"
        )
    return ckpt


def weights_digest(model: nn.Module) -> str:
    """The first 16 hex digits of a SHA-256 over the model's weights (names, shapes and values, in order).

    Why: a teacher is cached per recipe, but the same recipe trained on another machine (other CPU
    kernels) gives other weights and a test accuracy some tenths apart; results compared across cells
    must share a teacher, and a report can only check that with the teacher's identity in each summary.
    """
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_train_teacher(
    recipe: TeacherRecipe,
    cache_dir: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    device: torch.device,
    log: Callable[[str], None] = print,
) -> tuple[nn.Module, dict]:
    """Return the teacher and its metadata (test accuracy, whether it came from the cache)."""
    path = cache_dir / "teachers" / f"{recipe.key()}.pt"
    if path.exists():
        ckpt = load_checkpoint(path)
        if ckpt["recipe"] != recipe.__dict__:
            raise ConfigError(f"cache-dir: checkpoint {path} was made by another recipe; delete it or set cache-dir")
        model = build_model(recipe.arch, recipe.num_classes, recipe.image_shape, recipe.mean, recipe.std)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as exc:
            raise ConfigError(
                f"teacher-arch={recipe.arch}: checkpoint {path} does not fit this architecture "
                f"({str(exc).splitlines()[0]}); delete it to retrain"
            ) from exc
        meta = dict(ckpt["meta"], cached=True, path=str(path), digest=weights_digest(model))
        log(f"[teacher] loaded from cache {path} (test acc {meta['test_accuracy']:.4f})")
        return model.to(device).eval(), meta
    t0 = time.time()
    log(f"[teacher] training {recipe.arch} on {len(images)} labeled server images for {recipe.epochs} epochs")
    model = train_teacher(recipe, images, labels, device, log)
    acc = accuracy(model, test_images, test_labels, device)
    meta = {"test_accuracy": acc, "train_seconds": time.time() - t0, "num_train": len(images)}
    _atomic_save(
        {"recipe": recipe.__dict__, "state_dict": {k: v.cpu() for k, v in model.state_dict().items()}, "meta": meta},
        path,
    )
    log(f"[teacher] test acc {acc:.4f}, trained in {meta['train_seconds']:.0f}s, cached at {path}")
    return model, dict(meta, cached=False, path=str(path), digest=weights_digest(model))


def teacher_for_run(
    data: RunData, cfg: RunConfig, device: torch.device, log: Callable[[str], None] = print
) -> tuple[nn.Module, dict]:
    """The teacher a run with `cfg` would use, from the cache or trained on the run's server share.

    Why: scripts that study one client of a run (the emulator and loss benchmarks) must see the very
    teacher the run sees; one call keeps them from rebuilding its recipe and data arguments by hand.
    """
    ds = data.dataset
    images, labels = data.server_train()
    recipe = TeacherRecipe.for_run(data, cfg)
    return load_or_train_teacher(
        recipe, cfg.resolved_cache_dir(), images, labels, ds.test_images, ds.test_labels, device, log
    )
