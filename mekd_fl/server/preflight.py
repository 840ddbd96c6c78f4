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
from pathlib import Path

from mekd_fl.config import RunConfig
from mekd_fl.device import pick_device
from mekd_fl.errors import ConfigError


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
