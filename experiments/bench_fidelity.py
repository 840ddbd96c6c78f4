"""Benchmark (not a test): does the emulator invert the teacher? Unpaired vs paired, side by side.

For one client of the run's split (default: client 0 of 10, IID Fashion-MNIST, the cached default
teacher), it queries the teacher on the client's images, trains each emulator variant on the same
data with the same seed, and prints the fidelity diagnostic (`mekd_fl.fidelity`) of G(T(x)) on held-out
test images: consistency (the teacher re-classifies G(T(x)) as T(x)'s class), class separation of
G(T(x)) beside the real images', and the seconds each emulator took.

What the emulator costs a client against steps, width and local data size (issue 22): `--widths` and
`--client-images` (the client's first N images; 0: all of them) multiply the variants, and `--pairings`
picks the unpaired GAN, the paired emulator or both; `--threads` pins torch's threads (default 1, as a
simulated client has), so the seconds compare across rows.

Usage: `python experiments/bench_fidelity.py [--steps 200] [--pairing-weights 0] [--kinds dcgan]
[--widths 8] [--client-images 0] [--pairings none paired] [--set partition=iid num-clients=10]
[--images 1000] [--seed 42] [--threads 1] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.config import RunConfig
from mekd_fl.distill import teacher_codes
from mekd_fl.emulator import from_gan_range
from mekd_fl.fidelity import emulator_fidelity
from mekd_fl.models.classifier import build_model, predict_logits
from mekd_fl.run_data import run_data
from mekd_fl.teacher.training import teacher_for_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200])
    parser.add_argument("--kinds", nargs="+", default=["dcgan"])
    parser.add_argument(
        "--pairing-weights", type=float, nargs="+", default=[0.0], help="paired: L1 weights (0: the setting's)"
    )
    parser.add_argument("--pairings", nargs="+", choices=("none", "paired"), default=["none", "paired"])
    parser.add_argument("--widths", type=int, nargs="+", default=[0], help="emulator widths (0: the setting's)")
    parser.add_argument("--client-images", type=int, nargs="+", default=[0], help="the client's first N images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--client", type=int, default=0)
    parser.add_argument("--images", type=int, default=1000, help="held-out test images the diagnostic uses")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", nargs="*", default=["partition=iid", "num-clients=10"], metavar="KEY=VALUE")
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = RunConfig.from_mapping({**overrides, "seed": args.seed, "device": "cpu"})
    data = run_data(cfg)
    ds = data.dataset
    device = torch.device("cpu")
    teacher, meta = teacher_for_run(data, cfg, device)
    teacher.eval()

    def answer(images: torch.Tensor) -> torch.Tensor:
        return predict_logits(teacher, images, device).softmax(1)

    all_images = data.client_images(args.client)
    all_responses = answer(all_images)
    test = ds.test_images[: args.images]
    test_answers = answer(test)
    print(
        f"client {args.client}: {len(all_images)} images, teacher {meta['test_accuracy']:.4f}; "
        f"diagnostic on {len(test)} test images"
    )
    student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
    rows = []
    header = (
        f"{'emulator':<8} {'images':>6} {'width':>5} {'steps':>5} {'pairing':<12} {'consistency':>11} "
        f"{'separation':>10} {'real':>6} {'s':>6}"
    )
    print(header)
    weights = {"none": [None], "paired": args.pairing_weights}
    variants = [
        (kind, n, width, steps, pairing, weight)
        for kind in args.kinds
        for n in args.client_images
        for width in args.widths
        for steps in args.steps
        for pairing in args.pairings
        for weight in weights[pairing]
    ]
    for kind, n, width, steps, pairing, weight in variants:
        images, responses = (all_images[:n], all_responses[:n]) if n else (all_images, all_responses)
        settings = EdgeSettings.from_config(
            cfg.client_dict(),
            emulator=kind,
            emulator_steps=steps,
            device="cpu",
            **({"emulator_pairing_weight": weight} if weight else {}),
            **({"emulator_width": width} if width else {}),
        )
        edge = EdgeClient(images, student, settings=settings, num_classes=ds.num_classes, client_id=args.client)
        t0 = time.perf_counter()
        g_state, _, _ = edge.train_emulator(pairs=(images, responses) if pairing == "paired" else None)
        seconds = time.perf_counter() - t0
        gen = edge.load_generator(g_state)
        with torch.no_grad():
            codes = teacher_codes(test_answers, settings.oracle_output, settings.emulator_input, settings.temperature)
            g_t = from_gan_range(gen(codes))
        fid = emulator_fidelity(answer, test, g_t)
        label = f"paired w={weight:g}" if weight else pairing
        row = {
            "emulator": kind,
            "client-images": len(images),
            "width": settings.emulator_width,
            "steps": steps,
            "pairing": pairing,
            "pairing-weight": settings.emulator_pairing_weight if pairing == "paired" else None,
            "seconds": seconds,
            **fid,
        }
        rows.append(row)
        print(
            f"{kind:<8} {len(images):>6} {settings.emulator_width:>5} {steps:>5} {label:<12} "
            f"{fid['consistency']:>11.3f} {fid['class-separation']:>10.3f} {fid['real-class-separation']:>6.3f} "
            f"{seconds:>6.1f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
