"""`check_environment`: device, writable out-dir and cache, and the run folder, refused before any work starts."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import mekd_fl.device as device_mod
from mekd_fl.config import RunConfig
from mekd_fl.errors import ConfigError
from mekd_fl.server.preflight import check_environment


def config(tmp_path: Path, **settings) -> RunConfig:
    base = {"out-dir": str(tmp_path / "runs"), "cache-dir": str(tmp_path / "cache"), "device": "cpu"}
    return RunConfig.from_mapping({**base, **settings})


def unwritable(tmp_path: Path) -> Path:
    """A folder path this process cannot write under (root ignores permissions: go under a regular file)."""
    if os.geteuid() == 0:
        blocker = tmp_path / "file.txt"
        blocker.write_text("a file, not a folder")
        return blocker / "runs"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    return locked / "runs"


@pytest.fixture(autouse=True)
def unlock(tmp_path):
    yield
    locked = tmp_path / "locked"
    if locked.exists():
        locked.chmod(0o700)


def one_line(info: pytest.ExceptionInfo) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_good_environment_passes_and_creates_the_folders(tmp_path) -> None:
    cfg = config(tmp_path, **{"run-name": "first"})
    check_environment(cfg)
    assert (tmp_path / "runs").is_dir() and (tmp_path / "cache").is_dir()
    assert not (tmp_path / "runs" / "first").exists()  # the run folder is claimed later, not here
    assert list((tmp_path / "runs").iterdir()) == [] and list((tmp_path / "cache").iterdir()) == []


def test_cuda_without_cuda_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(device_mod.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^device='cuda' but no CUDA device is visible") as info:
        check_environment(config(tmp_path, device="cuda"))
    one_line(info)
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_cuda_passes(tmp_path) -> None:
    check_environment(config(tmp_path, device="cuda"))


def test_unwritable_out_dir_is_refused(tmp_path) -> None:
    bad = unwritable(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_environment(config(tmp_path, **{"out-dir": str(bad)}))
    msg = one_line(info)
    assert msg.startswith(f"out-dir={str(bad)!r} is not writable: ")
    assert msg.endswith("; accepted: a folder this user can write")


def test_out_dir_that_is_a_file_is_refused(tmp_path) -> None:
    (tmp_path / "runs").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"^out-dir=.* is not writable: .*; accepted: a folder this user can write$"):
        check_environment(config(tmp_path))


def test_unwritable_cache_dir_is_refused(tmp_path) -> None:
    bad = unwritable(tmp_path)
    with pytest.raises(ConfigError) as info:
        check_environment(config(tmp_path, **{"cache-dir": str(bad)}))
    msg = one_line(info)
    assert msg.startswith(f"cache-dir={str(bad)!r} is not writable: ")
    assert msg.endswith("; accepted: a folder this user can write")


def test_empty_cache_dir_checks_the_resolved_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MEKD_FL_CACHE", str(tmp_path / "env-cache"))
    check_environment(config(tmp_path, **{"cache-dir": ""}))
    assert (tmp_path / "env-cache").is_dir()
    monkeypatch.setenv("MEKD_FL_CACHE", str(unwritable(tmp_path)))
    with pytest.raises(ConfigError, match=r"^cache-dir=.* is not writable"):
        check_environment(config(tmp_path, **{"cache-dir": ""}))


def test_existing_run_folder_is_refused_unless_resuming(tmp_path) -> None:
    cfg = config(tmp_path, **{"run-name": "done"})
    folder = tmp_path / "runs" / "done"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{}")
    with pytest.raises(ConfigError) as info:
        check_environment(cfg)
    msg = one_line(info)
    assert re.fullmatch(
        rf"run-name='done': {re.escape(str(folder))} already exists; choose another run-name "
        r"\(results are never overwritten\)",
        msg,
    ), msg
    check_environment(cfg, resume=True)
    assert (folder / "summary.json").read_text() == "{}"


def test_resume_needs_an_existing_run_folder(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^run-name='missing': .* does not exist, nothing to resume") as info:
        check_environment(config(tmp_path, **{"run-name": "missing"}), resume=True)
    one_line(info)
    (tmp_path / "runs" / "missing").write_text("a file, not a run folder")
    with pytest.raises(ConfigError, match=r"^run-name='missing': .* does not exist"):
        check_environment(config(tmp_path, **{"run-name": "missing"}), resume=True)


def test_resume_needs_a_run_name(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"^run-name='' cannot be resumed; accepted: ") as info:
        check_environment(config(tmp_path), resume=True)
    one_line(info)


def test_no_run_name_passes_without_resume(tmp_path) -> None:
    check_environment(config(tmp_path))  # a timestamped name is chosen when the folder is claimed
