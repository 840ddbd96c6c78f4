"""The teacher checkpoint cache (train once, then load; keyed by recipe; atomic) and batch augmentation."""

import dataclasses
import os
import shlex
from pathlib import Path

import pytest
import torch

import mekd_fl.teacher.training as teacher_mod
from mekd_fl.augment import random_shift_flip
from mekd_fl.errors import ConfigError
from mekd_fl.teacher.training import TeacherRecipe, load_or_train_teacher

torch.set_num_threads(1)

CPU = torch.device("cpu")
RECIPE = TeacherRecipe(
    dataset="synthetic",
    arch="resnet8",
    num_classes=3,
    image_shape=(1, 28, 28),
    mean=(0.5,),
    std=(0.25,),
    seed=0,
    epochs=1,
    lr=0.05,
    batch_size=32,
    server_share=0.3,
    num_train=64,
)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (64,), generator=g)
    return images, labels, images[:16], labels[:16]


def load(recipe: TeacherRecipe, cache, data):
    return load_or_train_teacher(recipe, cache, *data, CPU, log=lambda _: None)


def tmp_files(cache) -> list:
    return [p for p in cache.rglob("*") if p.name.endswith(".tmp")]


def test_trains_once_then_loads_from_cache(tmp_path, data, monkeypatch) -> None:
    calls = []
    real_train = teacher_mod.train_teacher

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "train_teacher", counting_train)
    model, meta = load(RECIPE, tmp_path, data)
    assert calls == [1]
    assert meta["cached"] is False
    path = tmp_path / "teachers" / f"{RECIPE.key()}.pt"
    assert meta["path"] == str(path) and path.is_file()
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert tmp_files(tmp_path) == []

    def no_training(*args, **kwargs):
        raise AssertionError("a cached teacher must not be trained again")

    monkeypatch.setattr(teacher_mod, "train_teacher", no_training)
    again, meta2 = load(RECIPE, tmp_path, data)
    assert meta2["cached"] is True
    assert meta2["test_accuracy"] == meta["test_accuracy"]
    assert not again.training
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key].cpu(), second[key]), key
    x = data[0][:4].float() / 255
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), again(x))
    assert tmp_files(tmp_path) == []


def test_key_changes_with_everything_that_changes_the_weights() -> None:
    keys = {RECIPE.key()}
    for change in (
        {"seed": 1},
        {"epochs": 2},
        {"lr": 0.1},
        {"arch": "resnet14"},
        {"num_train": 65},
        {"mean": (0.4,)},
        {"dataset": "mnist"},
    ):
        keys.add(dataclasses.replace(RECIPE, **change).key())
    assert len(keys) == 8
    assert RECIPE.key() == dataclasses.replace(RECIPE).key()  # stable for equal recipes
    assert "seed0" in RECIPE.key() and "ep1" in RECIPE.key()


def test_checkpoint_of_another_recipe_is_a_config_error(tmp_path, data, monkeypatch) -> None:
    path = tmp_path / "teachers" / f"{RECIPE.key()}.pt"
    path.parent.mkdir(parents=True)
    other = dict(dataclasses.replace(RECIPE, lr=0.3).__dict__)
    torch.save({"recipe": other, "state_dict": {}, "meta": {"test_accuracy": 0.5}}, path)
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(ConfigError, match="cache-dir: checkpoint .* was made by another recipe") as info:
        load(RECIPE, tmp_path, data)
    assert "\n" not in str(info.value)


def test_saved_checkpoint_loads_with_weights_only(tmp_path) -> None:
    path = tmp_path / "teachers" / "x.pt"
    state = {"0.mean": torch.tensor([0.5]), "1.conv.weight": torch.randn(2, 1, 3, 3)}
    meta = {"test_accuracy": float("nan"), "train_seconds": 1.5, "num_train": 64}
    teacher_mod._atomic_save({"recipe": RECIPE.__dict__, "state_dict": state, "meta": meta}, path)
    ckpt = teacher_mod.load_checkpoint(path)
    assert ckpt["recipe"] == RECIPE.__dict__
    assert ckpt["recipe"]["image_shape"] == (1, 28, 28) and type(ckpt["recipe"]["mean"]) is tuple
    assert ckpt["state_dict"].keys() == state.keys()
    for key in state:
        assert torch.equal(ckpt["state_dict"][key], state[key])
    assert ckpt["meta"]["num_train"] == 64 and ckpt["meta"]["train_seconds"] == 1.5


class _RunsCode:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def _cached_path(cache) -> "Path":
    path = cache / "teachers" / f"{RECIPE.key()}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_checkpoint_that_would_run_code_is_refused_unexecuted(tmp_path, data, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    path = _cached_path(tmp_path / "cache")
    torch.save({"recipe": RECIPE.__dict__, "state_dict": {}, "meta": {"x": _RunsCode(marker)}}, path)
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(
        ConfigError,
        match=r"^cache-dir: checkpoint .* cannot be read safely \(.*\); "
        r"delete it to retrain$",
    ) as info:
        load(RECIPE, tmp_path / "cache", data)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()
    assert path.exists()  # left for the user to look at and delete


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04 truncated zip"])
def test_damaged_checkpoint_is_a_config_error(tmp_path, data, monkeypatch, content: bytes) -> None:
    path = _cached_path(tmp_path)
    path.write_bytes(content)
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(ConfigError, match=r"^cache-dir: checkpoint .* cannot be read safely") as info:
        load(RECIPE, tmp_path, data)
    assert "\n" not in str(info.value)


def test_truncated_real_checkpoint_is_a_config_error(tmp_path) -> None:
    path = _cached_path(tmp_path)
    teacher_mod._atomic_save({"recipe": RECIPE.__dict__, "state_dict": {"w": torch.randn(64, 64)}, "meta": {}}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConfigError, match=r"^cache-dir: checkpoint .* cannot be read safely"):
        teacher_mod.load_checkpoint(path)


def test_checkpoint_that_is_not_a_teacher_is_a_config_error(tmp_path) -> None:
    path = _cached_path(tmp_path)
    torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match=r"^cache-dir: checkpoint .* cannot be read safely \(not a teacher"):
        teacher_mod.load_checkpoint(path)


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "teachers" / "x.pt"

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(teacher_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        teacher_mod._atomic_save({"a": 1}, path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


# ---------------------------------------------------------------------------- augmentation
def batch(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g)


def test_no_shift_no_flip_is_identity() -> None:
    x = batch()
    out = random_shift_flip(x, 0, False, torch.Generator().manual_seed(0))
    assert torch.equal(out, x)


def test_flip_mirrors_some_images_exactly() -> None:
    x = batch(32)
    out = random_shift_flip(x, 0, True, torch.Generator().manual_seed(0))
    flipped = torch.flip(x, [3])
    mirrored = [torch.equal(o, f) for o, f in zip(out, flipped)]
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(m or s for m, s in zip(mirrored, same))
    assert 0 < sum(mirrored) < len(x)


def test_shift_translates_with_zero_fill() -> None:
    x = batch(32) + 0.5  # no zeros inside the images
    out = random_shift_flip(x, 2, False, torch.Generator().manual_seed(0))
    for o, i in zip(out, x):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if torch.equal(o, shifted(i, dy, dx))]
        assert len(matches) == 1
    assert not torch.equal(out, x)


def shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`img` moved by (dy, dx) pixels in either direction, with zeros coming in (by hand)."""
    out = torch.zeros_like(img)
    h, w = img.shape[-2:]
    for r in range(h):
        for c in range(w):
            sr, sc = r + dy, c + dx
            if 0 <= sr < h and 0 <= sc < w:
                out[..., r, c] = img[..., sr, sc]
    return out


def test_teacher_for_run_is_the_runs_cached_teacher(tmp_path, monkeypatch) -> None:
    from mekd_fl.config import RunConfig
    from mekd_fl.run_data import run_data

    settings = {"dataset": "synthetic", "teacher-arch": "resnet8", "teacher-epochs": 1, "server-share": 0.05}
    cfg = RunConfig.from_mapping({**settings, "cache-dir": str(tmp_path)})
    data = run_data(cfg)
    first, meta = teacher_mod.teacher_for_run(data, cfg, CPU, log=lambda _: None)
    recipe = TeacherRecipe.for_run(data, cfg)
    assert not meta["cached"] and Path(meta["path"]) == tmp_path / "teachers" / f"{recipe.key()}.pt"
    monkeypatch.setattr(teacher_mod, "train_teacher", lambda *a, **k: pytest.fail("trained again"))
    trained_digest = meta["digest"]
    again, meta = teacher_mod.teacher_for_run(data, cfg, CPU, log=lambda _: None)
    assert meta["cached"]
    for key, value in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    # The digest names the weights: the same teacher loaded gives it, one changed weight does not.
    assert meta["digest"] == trained_digest == teacher_mod.weights_digest(first)
    with torch.no_grad():
        next(again.parameters()).view(-1)[0] += 1e-3
    assert teacher_mod.weights_digest(again) != trained_digest


def test_a_retrained_teacher_is_never_answered_from_the_old_teachers_cache(tmp_path) -> None:
    """One recipe trained on two machines gives two teachers. A cache dir that keeps its answers while the
    checkpoint is replaced (copied between machines) must answer with the teacher the run loaded."""
    from mekd_fl.config import RunConfig
    from mekd_fl.models.classifier import predict_logits
    from mekd_fl.run_data import run_data
    from mekd_fl.server.app import ServerRun

    settings = {"dataset": "synthetic", "teacher-arch": "resnet8", "teacher-epochs": 1, "server-share": 0.05}
    cfg = RunConfig.from_mapping({**settings, "cache-dir": str(tmp_path), "answer-cache": True, "device": "cpu"})

    def built() -> ServerRun:
        run = ServerRun(None, cfg, log=lambda _: None)  # type: ignore[arg-type]
        run.data = run_data(cfg)
        run.build_teacher()
        return run

    first = built()
    checkpoint = Path(first.teacher_meta["path"])
    ckpt = torch.load(checkpoint, weights_only=True)
    # "Another machine's" teacher: the same recipe, other weights. Its last layer's bias now favours
    # whichever class the first teacher predicts least, so that their answers differ.
    name = [k for k in ckpt["state_dict"] if k.endswith("bias")][-1]
    least = torch.bincount(first.teacher_test_pred, minlength=len(ckpt["state_dict"][name])).argmin()
    ckpt["state_dict"][name][least] += 1000.0
    torch.save(ckpt, checkpoint)
    second = built()
    own = predict_logits(second.teacher, first.data.dataset.test_images, CPU).argmax(1)
    assert torch.equal(second.teacher_test_pred, own)
    assert not torch.equal(second.teacher_test_pred, first.teacher_test_pred)  # the old answers were not served
    assert len(list((tmp_path / "answers").iterdir())) == 2  # one answer folder per teacher
