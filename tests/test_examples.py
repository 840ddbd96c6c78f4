"""`examples/`: a quickstart-style Flower app, and the same app switched to MEKD in a few lines.

The fast test holds the switch to its promise (15 changed lines or fewer); the slow one runs both
apps with `flwr run` (Flower's own CLI and local SuperLink) and checks that the MEKD app distills a
student that agrees with the blind teacher far above chance.
"""

from __future__ import annotations

import difflib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import flwr_env, stop_superlink

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FMNIST = Path("/usr/share/datasets/fashion-mnist")


def changed_lines(a: Path, b: Path) -> list[str]:
    """Lines added or removed between two app trees (source and pyproject), as a unified diff counts them."""
    out = []
    files = sorted(
        {p.relative_to(a) for p in a.rglob("*") if p.suffix in (".py", ".toml")}
        | {p.relative_to(b) for p in b.rglob("*") if p.suffix in (".py", ".toml")}
    )
    for rel in files:
        old = (a / rel).read_text().splitlines() if (a / rel).exists() else []
        new = (b / rel).read_text().splitlines() if (b / rel).exists() else []
        out += [
            line
            for line in difflib.unified_diff(old, new, lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---")) and line[1:].strip()
        ]
    return out


def test_switching_the_quickstart_app_to_mekd_takes_few_lines() -> None:
    diff = changed_lines(EXAMPLES / "quickstart-pytorch", EXAMPLES / "quickstart-mekd")
    assert 0 < len(diff) <= 15, "\n".join(diff)
    assert any("register_mekd(app" in line for line in diff) and any("MEKD(" in line for line in diff)


def test_the_readme_shows_the_real_diff() -> None:
    readme = (EXAMPLES / "README.md").read_text()
    for line in changed_lines(EXAMPLES / "quickstart-pytorch", EXAMPLES / "quickstart-mekd"):
        assert line in readme, f"examples/README.md lacks the diff line: {line}"


def _flwr(args: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    return subprocess.run(
        [str(bin_dir / "flwr"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _run(app: str, settings: str, env: dict) -> subprocess.CompletedProcess:
    return _flwr(["run", str(EXAMPLES / app), "--stream", "--run-config", settings], ROOT, env, 900)


@pytest.mark.slow
@pytest.mark.skipif(not (FMNIST / "t10k-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST files missing")
@pytest.mark.skipif(shutil.which("flwr", path=str(Path(sys.executable).parent)) is None, reason="flwr CLI missing")
def test_the_example_apps_run_and_mekd_distills_the_blind_teacher(tmp_path: Path) -> None:
    """FedAvg app, MEKD app (teacher on the server), MEKD app with the teacher on its own SuperNode."""
    env = flwr_env(tmp_path, MEKD_TEACHER_TOKEN="a-secret-only-the-server-and-the-teacher-node-share")
    teacher = tmp_path / "teacher.pt2"
    made = subprocess.run(
        [sys.executable, str(EXAMPLES / "make_teacher.py"), "--out", str(teacher), "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0 and teacher.is_file(), made.stdout + made.stderr
    out = {name: tmp_path / f"{name}.pt" for name in ("fedavg", "mekd", "node")}
    try:
        _flwr(["federation", "simulation-config", "--num-supernodes", "5"], ROOT, env, 120).check_returncode()
        procs = {
            "fedavg": _run("quickstart-pytorch", f"num-server-rounds=1 model-path='{out['fedavg']}'", env),
            "mekd": _run("quickstart-mekd", f"num-server-rounds=2 teacher='{teacher}' model-path='{out['mekd']}'", env),
            "node": _run(
                "quickstart-mekd-teacher-node",  # 4 students and the teacher's node
                f"num-server-rounds=1 teacher='{teacher}' model-path='{out['node']}'",
                env,
            ),
        }
    finally:
        stop_superlink(tmp_path / "flwr-home")
    for name, proc in procs.items():  # `flwr run --stream` exits 0 on failure: check the files it writes
        assert proc.returncode == 0 and out[name].is_file(), name + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[teacher] answered" in procs["mekd"].stdout and "[emulator]" in procs["mekd"].stdout
    assert "[teacher] answering from node" in procs["node"].stdout, procs["node"].stdout[-3000:]
    assert "[teacher] answered" in procs["node"].stdout

    sys.path.insert(0, str(EXAMPLES / "quickstart-mekd"))
    try:
        from pytorchexample.task import Net, load_split
    finally:
        sys.path.remove(str(EXAMPLES / "quickstart-mekd"))
    images = load_split(str(FMNIST), "train")[0][:3000]
    oracle = torch.export.load(str(teacher)).module()
    for name in ("mekd", "node"):
        student = Net()
        student.load_state_dict(torch.load(out[name], weights_only=True))
        with torch.no_grad():
            agree = (student(images).argmax(1) == oracle(images).argmax(1)).float().mean().item()
        assert agree > 0.6, f"{name}: the student agrees with the teacher on {agree:.1%} of images (chance 10%)"
