"""Run-time checks of the machine a run is about to use, made before Ray starts and before a run folder is claimed.

Why apart from `RunConfig.validate()`: validation judges the settings alone and must stay cheap and
side-effect free (a spec validates every cell of a grid up front). Whether CUDA is present, whether
`out-dir` and the teacher cache can be written, and whether the run folder already exists depend on
the machine and the file system at launch time. Found after Ray has started, or after the teacher
has trained for an hour, each of these would cost the run; found here, each is one line naming the
setting and what is accepted.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from mekd_fl.config import RunConfig
from mekd_fl.data import load_dataset
from mekd_fl.device import pick_device
from mekd_fl.errors import ConfigError
from mekd_fl.run_data import RunData, run_data
from mekd_fl.settings.data_rules import DataFacts, check_data


def check_environment(cfg: RunConfig, *, resume: bool = False) -> None:
    """Refuse, with a one-line ConfigError, a run this machine cannot carry out.

    - `device=cuda` without a visible CUDA device;
    - an `out-dir` that cannot be created or written;
    - the run folder `out-dir/run-name` (when run-name is set) that exists already, or, with
      `resume=True`, that does not exist (nothing to resume);
    - a teacher cache (`cache-dir`, resolved) that cannot be created or written.

    Creates `out-dir` and the cache folder when missing (as the run would); writes nothing else.
    """
    pick_device(cfg.device)
    out_dir = Path(cfg.out_dir)  # as RunResults.claim uses it
    _check_writable("out-dir", out_dir)
    _check_run_folder(cfg, out_dir, resume)
    _check_writable("cache-dir", cfg.resolved_cache_dir())


def _check_writable(setting: str, folder: Path) -> None:
    """Create `folder` (with parents) when missing, then create and delete a file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".mekd-fl-write-check-")
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ConfigError(
            f"{setting}={str(folder)!r} is not writable: {reason}; accepted: a folder this user can write"
        ) from None


def _check_run_folder(cfg: RunConfig, out_dir: Path, resume: bool) -> None:
    if not cfg.run_name:
        if resume:
            raise ConfigError(
                "run-name='' cannot be resumed; accepted: the run-name of an existing run folder "
                f"under out-dir={str(out_dir)!r}"
            )
        return  # a fresh timestamped name is chosen when the folder is claimed
    folder = out_dir / cfg.run_name
    if not resume and (folder.exists() or folder.is_symlink()):
        raise ConfigError(
            f"run-name={cfg.run_name!r}: {folder} already exists; choose another run-name "
            f"(results are never overwritten)"
        )
    if resume and not folder.is_dir():
        raise ConfigError(
            f"run-name={cfg.run_name!r}: {folder} does not exist, nothing to resume; "
            f"accepted: the run-name of an existing run folder under out-dir={str(out_dir)!r}"
        )


def check_data_settings(cfg: RunConfig, *, emulators: bool, queries: bool) -> RunData:
    """Load the data set and split it as the run will, judging every data-dependent setting
    (`mekd_fl.settings.data_rules`) as soon as the facts it reads are known; returns the run's data.

    Why here and not in `RunConfig.validate()`: the accepted range of oracle-top-k, classes-per-client,
    server-share or query-fraction depends on the data set's classes and sizes, which validation (cheap,
    file-free) cannot know. Both loads are cached per process, so the run reuses them.
    """
    ds = load_dataset(cfg.dataset, cfg.data_dir, cfg.download)
    facts = DataFacts(
        dataset=cfg.dataset,
        num_classes=ds.num_classes,
        image_shape=ds.image_shape,
        train_images=len(ds.train_labels),
        emulators=emulators,
        queries=queries,
    )
    check_data(cfg, facts)  # classes and image shape: before the split, whose own errors are less precise
    data = run_data(cfg)
    split = data.split
    check_data(
        cfg,
        replace(
            facts,
            server_images=len(split.server_indices),
            largest_class=int(torch.bincount(ds.train_labels).max()) if len(ds.train_labels) else 0,
            client_train_sizes=tuple(len(p) for p in split.client_train),
        ),
    )
    return data


#: Why `mekd-fl run` (and the other in-process simulations) refuse client-data=node-config.
IN_PROCESS_NODE_CONFIG = (
    "client-data=node-config is not accepted by an in-process simulation (mekd-fl run, compare, bench): its "
    "nodes are not given the run's settings to cut their own partition; accepted: client-data=shard, or "
    "node-config under Flower's Deployment Engine (mekd-fl deploy-local, flwr run)"
)


def check_engine(cfg: RunConfig, *, in_process: bool) -> None:
    """Refuse the settings the runtime that will carry the run cannot honour (one line)."""
    if in_process and cfg.client_data == "node-config":
        raise ConfigError(IN_PROCESS_NODE_CONFIG)
