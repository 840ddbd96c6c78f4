"""`experiments/bench_gpu.py` on a machine without a GPU: its one-line refusal, its planning of the runs,
its time shares, its reading of finished and stopped runs, the nvidia-smi sampler (a stand-in nvidia-smi
on the PATH) and the tables; the whole command rehearsed on the CPU is a slow test."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import sys
import time
from pathlib import Path

import pytest

from mekd_fl.bench.gpu_sampler import GpuSample, GpuSampler, parse_line, summarise
from tests.helpers import write_run_folder

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_gpu.py"
_spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_gpu"] = bench  # its dataclass looks its module up while the module loads
_spec.loader.exec_module(bench)

SYNTHETIC = ["dataset=synthetic", "num-clients=2", "teacher-epochs=1"]


def _settings(command: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in command if "=" in a)


def test_without_cuda_it_refuses_in_one_line_and_writes_nothing(tmp_path: Path, capsys) -> None:
    if bench.refusal(cuda=True, rehearse=False) is not None:
        pytest.fail("a visible GPU must not be refused")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert bench.main(["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--rehearse-on-cpu" in err
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_is_refused_before_any_part_runs(tmp_path: Path, capsys) -> None:
    argv = ["--rehearse-on-cpu", "--out", str(tmp_path / "out"), "--set", "lr=-1", *SYNTHETIC]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("bench_gpu: lr") and not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        bench.parse_args(["--levels", "2"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--rounds", "1"])


def test_each_level_shares_the_gpu_among_its_clients_and_the_cpu_run_uses_the_cores(tmp_path: Path) -> None:
    plans = bench.plan_runs(list(bench.LEVELS), 3, {"seed": 7}, tmp_path, ["mekd-fl"], cpus=16)
    assert [p.label for p in plans] == ["cuda x0.125", "cuda x0.25", "cuda x0.5", "cuda x1", "cpu"]
    assert [p.concurrent for p in plans] == [8, 4, 2, 1, 10]  # 10 clients, 16 CPUs, 1 CPU each
    assert [p.command[p.command.index("--client-gpus") + 1] for p in plans] == ["0.125", "0.25", "0.5", "1", "0"]
    settings = [_settings(p.command) for p in plans]
    assert [s["device"] for s in settings] == ["cuda"] * 4 + ["cpu"]
    assert len({s["run-name"] for s in settings}) == 5 and all(s["out-dir"] == str(tmp_path / "runs") for s in settings)
    same = [{k: v for k, v in s.items() if k not in ("device", "run-name")} for s in settings]
    assert all(s == same[0] for s in same) and same[0]["answer-cache"] == "False" and same[0]["seed"] == "7"
    assert same[0]["num-rounds"] == "3"
    rehearsed = bench.plan_runs([0.25], 2, {}, tmp_path, ["mekd-fl"], cpus=2, rehearse=True)
    assert all(_settings(p.command)["device"] == "cpu" for p in rehearsed) and rehearsed[0].concurrent == 2


def test_the_runs_share_the_time_left_by_weight() -> None:
    assert bench.timeouts([1, 1, 2], 400.0) == 100.0
    assert bench.timeouts([2], 130.0) == 130.0  # the last run gets all that is left
    assert bench.timeouts([1, 2], -5.0) == 0.0


def test_a_run_stopped_at_its_share_is_reported_from_its_finished_rounds(tmp_path: Path) -> None:
    folder = tmp_path / "r"
    folder.mkdir()
    lines = [{"round": 0, "elapsed-s": 1.0}, {"round": 1, "elapsed-s": 20.0, "server/accuracy": 0.4}]
    lines.append({"round": 2, "elapsed-s": 26.0, "server/accuracy": 0.5})
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    row = bench._unfinished(folder, timed_out=True)
    assert row["status"] == "stopped at 2 rounds" and row["s-per-round"] == 6.0 and row["accuracy"] == 0.5
    assert row["window"] == (14.0, 26.0)
    assert bench._unfinished(tmp_path / "none", timed_out=False) == {"status": "failed", "accuracy": None}


def _fake_run_plan(tmp_path: Path, out: Path) -> bench.RunPlan:
    """A stand-in for `mekd-fl run` that writes a finished run folder where measure_run looks for it."""
    writer = tmp_path / "fake_run.py"
    writer.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(SCRIPT.parents[1])!r})\n"
        "from pathlib import Path\nfrom tests.helpers import write_run_folder\n"
        "folder = Path(sys.argv[1])\n"
        "write_run_folder(folder, 30.0, [(14.0, 0.2), (18.0, 0.3)])\n"
        "(folder / 'config.json').write_text('{}')\n"
        "import os; os.utime(folder / 'config.json', (1000.0, 1000.0))\n"  # the run's zero: 1000 s
    )
    command = [sys.executable, str(writer), str(out / "runs" / "cuda-x0.5"), "run-name=cuda-x0.5"]
    return bench.RunPlan("cuda x0.5", "cuda", 0.5, 2, 1.0, command)


def test_measure_run_reads_the_run_and_the_gpu_readings_of_its_rounds(tmp_path: Path) -> None:
    sampler = GpuSampler()  # not entered: no readings
    (tmp_path / "a").mkdir()
    row = bench.measure_run(_fake_run_plan(tmp_path, tmp_path / "a"), 60.0, tmp_path / "a", sampler)
    assert row["status"] == "completed" and row["s-per-round"] == 4.0 and row["accuracy"] == 0.3
    assert row["concurrent"] == 2 and row["client-gpus"] == 0.5 and "gpu-util-mean" not in row
    # readings outside the rounds (before setup-s = 10 s, after the last round at 18 s) are left out
    sampler.samples += [GpuSample(1005, 0, 90.0, 900, 1000), GpuSample(1012, 0, 50.0, 300, 1000)]
    sampler.samples += [GpuSample(1017, 0, 70.0, 200, 1000), GpuSample(1019, 0, 99.0, 999, 1000)]
    (tmp_path / "b").mkdir()
    row = bench.measure_run(_fake_run_plan(tmp_path, tmp_path / "b"), 60.0, tmp_path / "b", sampler)
    assert row["gpu-util-mean"] == 60.0 and row["gpu-util-max"] == 70.0 and row["gpu-mem-peak-mib"] == 300


def test_parse_and_summarise_nvidia_smi_readings() -> None:
    assert parse_line("0, 87, 1234, 81559\n", 1.0) == GpuSample(1.0, 0, 87.0, 1234.0, 81559.0)
    assert parse_line("0, [N/A], 1234, 81559", 1.0) is None and parse_line("", 1.0) is None
    two_gpus = [GpuSample(1.0, 0, 100.0, 10, 80), GpuSample(1.0, 1, 0.0, 30, 80), GpuSample(2.0, 0, 50.0, 5, 80)]
    two_gpus.append(GpuSample(2.0, 1, 50.0, 5, 80))
    got = summarise(two_gpus)
    assert got["gpu-util-mean"] == 50.0 and got["gpu-util-max"] == 50.0 and got["gpu-mem-peak-mib"] == 40
    assert got["gpu-mem-total-mib"] == 160 and got["gpu-samples"] == 2
    assert summarise(two_gpus, start=1.5)["gpu-mem-peak-mib"] == 10 and summarise(two_gpus, start=3.0) == {}


def test_the_sampler_reads_nvidia_smi_until_the_block_ends(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nwhile true; do echo '0, 42, 512, 81559'; sleep 0.05; done\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with GpuSampler(interval_ms=50) as sampler:
        time.sleep(0.5)
    assert sampler.available and len(sampler.samples) >= 3
    assert {(s.util, s.mem_used_mib) for s in sampler.samples} == {(42.0, 512.0)}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with GpuSampler() as none:
        pass
    assert not none.available and none.samples == []


def test_report_gives_each_gpu_runs_speed_up_over_the_cpu_run(tmp_path: Path) -> None:
    write_run_folder(tmp_path / "g", 30.0, [(14.0, 0.2), (18.0, 0.8)])
    write_run_folder(tmp_path / "c", 90.0, [(30.0, 0.2), (50.0, 0.79)])
    runs = [
        {
            "label": "cuda x0.25",
            "engine": "cuda",
            "client-gpus": 0.25,
            "concurrent": 4,
            **bench.read_run(tmp_path / "g"),
        },
        {"label": "cuda x0.125", "engine": "cuda", "client-gpus": 0.125, "concurrent": 8, "status": "failed"},
        {"label": "cpu", "engine": "cpu", "client-gpus": 0.0, "concurrent": 10, **bench.read_run(tmp_path / "c")},
    ]
    runs[0] |= {"gpu-util-mean": 61.25, "gpu-util-max": 97.0, "gpu-mem-peak-mib": 2048.0}
    steps = [{"precision": "bf16", "kd-ms": 2.0, "mekd-ms": 2.5, "mekd/kd": 1.25, "kd-steps-per-s": 500.0}]
    steps[0] |= {"mekd-steps-per-s": 400.0, "prepare-ms": 3.0}
    oracle = [{"oracle-img-per-s": 90000.0, "raw-img-per-s": 100000.0, "oracle/raw": 0.9}]
    text = bench.report(steps, oracle, runs, rehearsal=False)
    assert "| bf16 | 2.00 | 2.50 | 1.25 | 500.0 | 400.0 | 3.0 |" in text and "| 90000 | 100000 | 0.90 |" in text
    assert "| cuda x0.25 | 0.25 | 4 | completed | 10.0 | 4.0 | 5.00 | 61.2 | 97.0 | 2048 | 0.8000 |" in text
    assert "| cuda x0.125 | 0.125 | 8 | failed | - | - | - |" in text and "Rehearsal" not in text
    assert bench.report(steps, oracle, runs, rehearsal=True).startswith("**Rehearsal on the CPU")


@pytest.mark.slow
def test_the_command_rehearsed_on_the_cpu_writes_its_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = ["--rehearse-on-cpu", "--levels", "0.5", "--rounds", "2", "--repeats", "2", "--round-images", "128"]
    argv += ["--oracle-images", "256", "--budget-s", "400", "--out", str(out), "--set", *SYNTHETIC]
    argv.append(f"cache-dir={tmp_path / 'cache'}")
    assert bench.main(argv) == 0
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["part"] for r in rows] == ["machine", "step", "step", "oracle", "run", "run"]
    assert all(r["status"] == "completed" and r["s-per-round"] > 0 for r in rows if r["part"] == "run")
    text = (out / "results.md").read_text()
    assert "Rehearsal on the CPU" in text and "| cuda x0.5 | 0.5 | 2 | completed |" in text


_bundle_spec = importlib.util.spec_from_file_location("gpu_bundle", SCRIPT.with_name("gpu_bundle.py"))
bundle = importlib.util.module_from_spec(_bundle_spec)
_bundle_spec.loader.exec_module(bundle)


def test_the_bundle_parts_each_fit_one_call(tmp_path: Path) -> None:
    files = []
    for name, size in (("ray.whl", 40), ("train.xz", 22), ("flwr.whl", 2), ("grpcio.whl", 7), ("t10k.xz", 4)):
        files.append(tmp_path / name)
        files[-1].write_bytes(b"x" * size)
    parts = bundle.split(files, 60)
    assert sorted(f.name for part in parts for f in part) == sorted(f.name for f in files)
    assert all(sum(f.stat().st_size for f in part) <= 60 for part in parts) and len(parts) == 2
    with pytest.raises(SystemExit, match="ray.whl alone"):
        bundle.split(files, 30)


def test_rays_wheel_loses_its_jar_and_the_record_says_so(tmp_path: Path) -> None:
    import zipfile

    wheel = tmp_path / "src" / "ray-2.55.1-cp312-cp312-manylinux2014_x86_64.whl"
    wheel.parent.mkdir()
    record = "ray/__init__.py,sha256=a,1\nray/jars/ray_dist.jar,sha256=b,2\nray/dashboard/client/build/m.js.map,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ray/__init__.py", "x = 1\n")
        z.writestr("ray/jars/ray_dist.jar", b"\0" * 100)
        z.writestr("ray/dashboard/client/build/m.js.map", "{}")
        z.writestr("ray-2.55.1.dist-info/RECORD", record)
    with zipfile.ZipFile(bundle.slim_ray(wheel, tmp_path)) as z:
        assert sorted(z.namelist()) == ["ray-2.55.1.dist-info/RECORD", "ray/__init__.py"]
        assert z.read("ray-2.55.1.dist-info/RECORD").decode() == "ray/__init__.py,sha256=a,1\n"
