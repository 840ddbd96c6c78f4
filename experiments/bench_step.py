"""Benchmark (not a test): MEKD step time over KD step time, and oracle throughput over a raw forward.

Both ratios are measured side by side in one process, interleaved, so machine noise hits both sides
alike, once per torch thread count. MEKD runs as a client runs it: G(T(x)) computed once for the round's
answers (`prepare`, timed on its own) and each step reading its rows. Usage:
`python experiments/bench_step.py [--device cpu|cuda] [--batch-size 64] [--repeats 30] [--threads 1 2]
[--precision fp32 bf16]`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mekd_fl.config import RunConfig
from mekd_fl.data import load_dataset
from mekd_fl.device import pick_device
from mekd_fl.distill import DistillContext, get_distiller
from mekd_fl.emulator import build_emulator
from mekd_fl.errors import ConfigError
from mekd_fl.models.classifier import build_model
from mekd_fl.precision import PRECISIONS, autocast
from mekd_fl.teacher.oracle import TeacherOracle


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(
    cfg: RunConfig,
    images: torch.Tensor,
    device: torch.device,
    repeats: int,
    batch_size: int,
    reference: bool = False,
    precision: str = "fp32",
) -> dict[str, float]:
    """Median seconds of one optimisation step per method on the same batch and the same student, and the
    seconds of MEKD's once-per-round `prepare` on all `images` (the client's query set, whose answers
    the steps index). `reference` adds "mekd-per-step": the code before issue 9 (G(T(x)) every step, by
    the generator as trained, not FrozenGenerator)."""
    c, shape = 10, tuple(images.shape[1:])
    ds_mean, ds_std = (0.5,) * shape[0], (0.5,) * shape[0]
    teacher = build_model(cfg.teacher_arch, c, shape, ds_mean, ds_std).to(device).eval()
    generator = build_emulator(c, shape, cfg.emulator_width)[0].to(device)
    with torch.no_grad():
        response = torch.cat(
            [teacher(images[s : s + 1024].to(device).float().div(255)).softmax(1) for s in range(0, len(images), 1024)]
        )
    index = torch.arange(batch_size, device=device)
    x = images[:batch_size].to(device).float().div(255)
    students, distillers, optims = {}, {}, {}
    for method in ("kd", "mekd", "mekd-per-step") if reference else ("kd", "mekd"):
        torch.manual_seed(0)
        students[method] = build_model(cfg.student_arch, c, shape, ds_mean, ds_std).to(device).train()
        ctx = DistillContext(num_classes=c, temperature=cfg.temperature, generator=generator)
        distillers[method] = get_distiller(method.removesuffix("-per-step"), ctx)
        if method == "mekd-per-step":
            distillers[method]._g = generator  # the generator module itself, and no prepare/index below
        optims[method] = torch.optim.SGD(students[method].parameters(), lr=0.01, momentum=0.9)
    prepare_t = []
    for _ in range(3):
        _sync(device)
        t0 = time.perf_counter()
        distillers["mekd"].prepare(response)
        _sync(device)
        prepare_t.append(time.perf_counter() - t0)
    times: dict[str, list[float]] = {m: [] for m in students}
    for i in range(repeats + 3):
        for method in students:  # interleaved: both methods see the same machine state
            d = distillers[method]
            _sync(device)
            t0 = time.perf_counter()
            by_index = {"index": index} if d.batch_index and method != "mekd-per-step" else {}
            with autocast(device, precision):  # as EdgeClient.distill runs a step
                loss = d.losses(students[method](x).float(), response[index], x, i, **by_index)["loss"]
            optims[method].zero_grad(set_to_none=True)
            loss.backward()
            optims[method].step()
            _sync(device)
            if i >= 3:  # warm-up excluded
                times[method].append(time.perf_counter() - t0)
    out = {m: statistics.median(v) for m, v in times.items()}
    out["prepare"] = min(prepare_t)
    return out


def time_oracle(cfg: RunConfig, images: torch.Tensor, device: torch.device, repeats: int) -> dict[str, float]:
    """Images per second: oracle.query (validation, budget, conversion, softmax) vs teacher forward."""
    c, shape = 10, tuple(images.shape[1:])
    teacher = build_model(cfg.teacher_arch, c, shape, (0.5,) * shape[0], (0.5,) * shape[0]).to(device).eval()
    oracle = TeacherOracle(
        teacher, num_classes=c, image_shape=shape, budget=10**12, batch_size=cfg.oracle_batch_size, device=device
    )
    ready = [
        images[s : s + cfg.oracle_batch_size].to(device).float().div(255)
        for s in range(0, len(images), cfg.oracle_batch_size)
    ]
    oracle_t, raw_t = [], []
    for i in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        oracle.query("bench", images)
        _sync(device)
        t1 = time.perf_counter()
        with torch.no_grad():
            for batch in ready:
                teacher(batch)
        _sync(device)
        t2 = time.perf_counter()
        if i:
            oracle_t.append(t1 - t0)
            raw_t.append(t2 - t1)
    n = len(images)
    return {"oracle": n / statistics.median(oracle_t), "raw": n / statistics.median(raw_t)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--round-images", type=int, default=2048, help="query images whose G(T(x)) prepare computes")
    parser.add_argument("--oracle-images", type=int, default=4096, help="0: no oracle benchmark")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--reference", action="store_true", help="also time MEKD as computed before issue 9")
    parser.add_argument(
        "--precision", nargs="+", default=["fp32"], choices=PRECISIONS, help="each measured (bf16: autocast)"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts, each measured (0: default)"
    )
    args = parser.parse_args()
    cfg = RunConfig(dataset=args.dataset, batch_size=args.batch_size)
    device = pick_device(args.device)
    try:
        ds = load_dataset(cfg.dataset)
    except ConfigError as exc:
        raise SystemExit(f"bench: {exc}") from None
    images = ds.train_images[: max(args.batch_size, args.oracle_images, args.round_images)]
    default_threads = torch.get_num_threads()
    print(
        f"device {device} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'}), "
        f"{cfg.dataset} {tuple(images.shape[1:])}, batch {args.batch_size}, {cfg.student_arch} student, "
        f"emulator width {cfg.emulator_width}, {cfg.local_epochs} local epochs"
    )
    for threads in args.threads:
        torch.set_num_threads(threads or default_threads)
        n = max(args.batch_size, args.round_images)
        for precision in args.precision:
            steps = time_steps(cfg, images[:n], device, args.repeats, args.batch_size, args.reference, precision)
            # prepare runs once per round: spread over the round's steps (local epochs x batches).
            per_step_prepare = steps["prepare"] / (cfg.local_epochs * -(-n // args.batch_size))
            print(
                f"threads {torch.get_num_threads()}, {precision}: KD {steps['kd'] * 1e3:.2f} ms, "
                f"MEKD {steps['mekd'] * 1e3:.2f} ms per step, MEKD/KD = {steps['mekd'] / steps['kd']:.2f}; "
                f"prepare G(T(x)) for {n} answers {steps['prepare'] * 1e3:.0f} ms once per round "
                f"(+{per_step_prepare * 1e3:.2f} ms a step: {(steps['mekd'] + per_step_prepare) / steps['kd']:.2f} "
                "with it)"
            )
            if args.reference:
                old = steps["mekd-per-step"]
                print(
                    f"threads {torch.get_num_threads()}, {precision}: before issue 9 (G(T(x)) every step, "
                    f"unrewritten G): MEKD {old * 1e3:.2f} ms, MEKD/KD = {old / steps['kd']:.2f}"
                )
        if args.oracle_images:
            rates = time_oracle(cfg, images[: args.oracle_images], device, max(3, args.repeats // 5))
            print(
                f"threads {torch.get_num_threads()}: teacher {cfg.teacher_arch} on {args.oracle_images} uint8 images: "
                f"oracle {rates['oracle']:.0f} img/s, raw forward {rates['raw']:.0f} img/s, "
                f"oracle/raw = {rates['oracle'] / rates['raw']:.2f}"
            )


if __name__ == "__main__":
    main()
