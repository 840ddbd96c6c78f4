"""Pack what `experiments/bench_gpu.py` needs on a GPU machine that has no network (this workplace's lent one).

Why: such a machine has CUDA, PyTorch and torchvision but neither Flower nor Ray, nothing can be fetched
there, and at most 64 MiB travel with each call. So the packages that are missing there, the Fashion-MNIST
files and nothing else are packed here, in parts of at most `--max-mib` each, which
`experiments/bench_gpu_device.sh` installs there (one call per part, on one warm machine) before running
the benchmark.

What is packed:
- the distributions that mekd-fl's run actually imports (found by importing its entry points in this
  virtual environment, at their versions here), minus those the GPU image already has and whose versions
  do not matter (torch, torchvision, numpy, ...: `ON_THE_GPU_IMAGE`), as wheels for `--python-version`
  (the GPU image's Python) from PyPI;
- Ray's wheel without its Java jar and the dashboard's source maps (38 MB of 70; a Python-only
  simulation uses neither);
- the four Fashion-MNIST files from the Debian package, recompressed with xz (26 MB instead of 30).

Output: `<out>/<part>/` folders (`a`, `b`, ...; git-ignored) and the calls to make, printed.
Usage: `python experiments/gpu_bundle.py [--out .gpu-bundle] [--python-version 3.12] [--max-mib 60]`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import lzma
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

#: Imported by a run: the CLI, the simulation, the three apps and the benchmark tooling (Ray's worker too).
ENTRY_POINTS = (
    "mekd_fl.cli",
    "mekd_fl.runtime.simulation",
    "mekd_fl.server.app",
    "mekd_fl.client.app",
    "mekd_fl.teacher.app",
    "mekd_fl.bench.step_timing",
    "mekd_fl.plots",
    "flwr.simulation",
    "flwr.simulation.ray_transport.ray_actor",
    "ray._private.worker",
    "datasets",  # flwr-datasets' partitioners, imported when the server partitions the data
    "flwr_datasets.partitioner",
)
#: On the GPU image (device/KINDS.md's package list) and not packed: PyTorch and the compiled stacks built
#: with it or for that machine. Everything else a run imports is packed at this environment's version
#: (pure-Python packages weigh little, and Flower pins some of them, e.g. typer < 0.21).
ON_THE_GPU_IMAGE = {
    "torch", "torchvision", "torchmetrics", "triton", "numpy", "sympy", "mpmath", "networkx", "jinja2",
    "markupsafe", "fsspec", "filelock", "setuptools", "typing-extensions", "matplotlib", "pillow",
    "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six", "pyyaml",
    "psutil", "msgpack", "uvloop", "aiohttp", "aiosignal", "frozenlist", "multidict", "yarl", "propcache",
    "aiohappyeyeballs", "pyarrow", "pandas", "pytz", "tzdata", "hf-xet", "cuda-bindings", "cuda-pathfinder",
    "cuda-core", "cuda-toolkit", "mekd-fl",
}  # fmt: skip
#: Dropped from Ray's wheel: the Java worker's jar and the dashboard's JavaScript source maps.
RAY_DROP = re.compile(r"^ray/jars/|^ray/dashboard/client/build/.*\.map$")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions(python: str) -> dict[str, str]:
    """{distribution: version} of everything a run imports, read from `python`'s environment."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {ENTRY_POINTS!r}: importlib.import_module(m)\n"
        "from importlib.metadata import packages_distributions, version\n"
        "pd = packages_distributions()\n"
        "tops = {m.split('.')[0] for m in list(sys.modules)}\n"
        "print(json.dumps({d: version(d) for t in tops for d in pd.get(t, [])}))\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return {norm(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def download(dists: dict[str, str], python_version: str, into: Path) -> list[Path]:
    """The wheels of `dists` for the GPU image's Python and platform (no dependencies: the list is whole)."""
    into.mkdir(parents=True, exist_ok=True)
    specs = [f"{name}=={version}" for name, version in sorted(dists.items())]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python_version, "--implementation", "cp", "-d", str(into)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + specs, check=True)
    return sorted(into.glob("*.whl"))


def slim_ray(wheel: Path, into: Path) -> Path:
    """Ray's wheel without RAY_DROP's files (and their RECORD lines)."""
    target = into / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if RAY_DROP.search(info.filename):
                continue
            data = src.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                kept = [x for x in data.decode().splitlines() if not RAY_DROP.search(x.split(",", 1)[0])]
                data = ("\n".join(kept) + "\n").encode()
            dst.writestr(info, data)
    return target


def pack_data(into: Path) -> list[Path]:
    """Fashion-MNIST's four files, xz-compressed, in `into`."""
    into.mkdir(parents=True, exist_ok=True)
    out = []
    for gz in sorted(FASHION_MNIST.glob("*-ubyte.gz")):
        target = into / (gz.name.removesuffix(".gz") + ".xz")
        target.write_bytes(lzma.compress(gzip.decompress(gz.read_bytes()), preset=9 | lzma.PRESET_EXTREME))
        out.append(target)
    if len(out) != 4:
        raise SystemExit(f"gpu_bundle: Fashion-MNIST missing in {FASHION_MNIST}: run 'make data' first")
    return out


def split(files: list[Path], max_bytes: int) -> list[list[Path]]:
    """Files into parts of at most `max_bytes` each, largest first (first fit)."""
    parts: list[list[Path]] = []
    sizes: list[int] = []
    for f in sorted(files, key=lambda p: p.stat().st_size, reverse=True):
        size = f.stat().st_size
        if size > max_bytes:
            raise SystemExit(f"gpu_bundle: {f.name} alone is {size / 2**20:.1f} MiB, over --max-mib")
        for i, used in enumerate(sizes):
            if used + size <= max_bytes:
                parts[i].append(f)
                sizes[i] += size
                break
        else:
            parts.append([f])
            sizes.append(size)
    return parts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".gpu-bundle")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python")
    parser.add_argument("--max-mib", type=float, default=60.0, help="each part, of the 64 MiB a call carries")
    parser.add_argument("--python", default=sys.executable, help="the environment whose imports are read")
    args = parser.parse_args()
    out = Path(args.out)
    work = out / ".work"
    shutil.rmtree(out, ignore_errors=True)
    found = imported_distributions(args.python)
    dists = {k: v for k, v in found.items() if k not in ON_THE_GPU_IMAGE and not k.startswith("nvidia-")}
    print(f"[gpu-bundle] {len(dists)} distributions to pack: {', '.join(sorted(dists))}")
    wheels = download(dists, args.python_version, work / "wheels")
    files = [slim_ray(w, work) if norm(w.name.split("-")[0]) == "ray" else w for w in wheels]
    files += pack_data(work / "data")
    for i, part in enumerate(split(files, int(args.max_mib * 2**20))):
        folder = out / chr(ord("a") + i)
        for f in part:
            target = folder / ("data" if f.suffix == ".xz" else "") / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(f, target)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"[gpu-bundle] part {folder.name}: {len(part)} files, {size / 2**20:.1f} MiB")
    shutil.rmtree(work)
    names = sorted(p.name for p in out.iterdir())
    for name in names:  # each part names them all, so that the machine knows when it has every one
        (out / name / "PARTS").write_text(" ".join(names) + "\n")
    print("[gpu-bundle] on one warm GPU machine, one call per part, the last one running the benchmark:")
    for name in names[:-1]:
        print(f"  run(carry=['{out}/{name}'], command='bash experiments/bench_gpu_device.sh install')")
    print(f"  run(carry=['{out}/{names[-1]}'], command='bash experiments/bench_gpu_device.sh run')")
    return 0


if __name__ == "__main__":
    sys.exit(main())
