"""Benchmark (not a test): does the lr probe's update ratio predict how FedAvg fares? (issue 20)

For each lr: the probe's update ratio on client 0 (`mekd_fl.client.lr_probe`), then an in-process FedAvg of KD
over 5 IID Fashion-MNIST clients (`EdgeClient.distill`, the clients' own step; no Flower, no emulator),
printing the global student's test accuracy after every round. The numbers in `mekd_fl/client/lr_probe.py`'s
docstring come from this script. Usage:
`python experiments/calibrate_lr_probe.py --teacher /tmp/teacher.pt2 --arch bn --images 2000 --rounds 4
--lrs 0.05 0.02 0.01` (teacher: `examples/make_teacher.py`; arch: the example's `net` or a BatchNorm CNN).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "quickstart-mekd"))

from mekd_fl.client.edge import EdgeClient, EdgeSettings  # noqa: E402
from mekd_fl.client.lr_probe import probe_lr  # noqa: E402
from mekd_fl.teacher.oracle import TeacherOracle  # noqa: E402
from pytorchexample.task import Net, load_split  # noqa: E402


def bn_cnn() -> nn.Module:
    """A BatchNorm CNN like the one of issue 20."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(1, 16), block(16, 32), nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--arch", choices=("net", "bn"), default="bn")
    parser.add_argument("--images", type=int, default=2000, help="per client")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.02, 0.01, 0.005])
    args = parser.parse_args()
    factory = Net if args.arch == "net" else bn_cnn
    x, y = load_split(args.data_dir)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    images = (x * 255).round().to(torch.uint8)
    teacher = torch.export.load(str(args.teacher)).module()
    oracle = TeacherOracle(teacher, num_classes=10, image_shape=(1, 28, 28), budget=10**7)
    n = args.images
    parts = [perm[i * n : (i + 1) * n] for i in range(args.clients)]
    test = perm[args.clients * n : args.clients * n + 3000]
    answers = [oracle(f"client-{i}", images[p]) for i, p in enumerate(parts)]
    for lr in args.lrs:
        t0 = time.time()
        settings = EdgeSettings.from_config({"method": "kd", "lr": lr, "num-rounds": args.rounds, "seed": 0})
        torch.manual_seed(0)
        start = factory()
        probe = probe_lr(start, images[parts[0]], answers[0], lrs=(lr,), settings=settings)
        clients = [
            EdgeClient(images[p], factory, settings=settings, num_classes=10, client_id=i) for i, p in enumerate(parts)
        ]
        weights = {k: v.clone() for k, v in start.state_dict().items()}
        accuracy = []
        for r in range(1, args.rounds + 1):
            new = [c.distill(weights, images[p], a, server_round=r)[0] for c, p, a in zip(clients, parts, answers)]
            weights = {k: (sum(w[k].double() for w in new) / len(new)).to(v.dtype) for k, v in weights.items()}
            accuracy.append((clients[0].predict(weights, images[test]).argmax(1) == y[test]).float().mean().item())
        by_round = " -> ".join(f"{a:.1%}" for a in accuracy)
        print(
            f"{args.arch} {n} images lr={lr:g}: update ratio {probe.trials[0].update_ratio:.3g}; accuracy {by_round}"
            f" ({time.time() - t0:.0f} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
