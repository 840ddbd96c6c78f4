"""Benchmark (not a test): MEKD step time over KD step time, and oracle throughput over a raw forward.

Both ratios are measured side by side in one process, interleaved, so machine noise hits both sides
alike, once per torch thread count. MEKD runs as a client runs it: G(T(x)) computed once for the round's
answers (`prepare`, timed on its own) and each step reading its rows. Usage:
`python experiments/bench_step.py [--device cpu|cuda] [--batch-size 64] [--repeats 30] [--threads 1 2]
[--precision fp32 bf16]`.
"""

from __future__ import annotations

import argparse

import torch

from mekd_fl.bench.step_timing import time_oracle, time_steps
from mekd_fl.config import RunConfig
from mekd_fl.data import load_dataset
from mekd_fl.device import pick_device
from mekd_fl.errors import ConfigError
from mekd_fl.precision import PRECISIONS


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
