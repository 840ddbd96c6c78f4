"""Train a small Fashion-MNIST teacher and save it as a `torch.export` program (the teacher's owner's side).

The MEKD example's server loads the teacher from this file and never needs its class: a blind teacher
is a file of weights and a graph, queried only through `mekd_fl.teacher.oracle.TeacherOracle`. It learns on
the t10k files, which the example's clients never hold (they split the training files).

    python examples/make_teacher.py --out teacher.pt2 [--epochs 3] [--data-dir /usr/share/datasets/fashion-mnist]
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def teacher_net() -> nn.Module:
    """A CNN wider than the example's Net; takes images in [0, 1]."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(
        block(1, 32), block(32, 64), nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("teacher.pt2"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    x = torch.from_numpy(read_idx(args.data_dir / "t10k-images-idx3-ubyte.gz").copy()).unsqueeze(1).float() / 255
    y = torch.from_numpy(read_idx(args.data_dir / "t10k-labels-idx1-ubyte.gz").astype(np.int64))
    held = torch.randperm(len(y))
    train, check = held[:9000], held[9000:]
    net = teacher_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    t0 = time.time()
    for epoch in range(args.epochs):
        net.train()
        for batch in train[torch.randperm(len(train))].split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            acc = (net(x[check]).argmax(1) == y[check]).float().mean().item()
        print(f"epoch {epoch + 1}/{args.epochs}: held-out accuracy {acc:.3f} ({time.time() - t0:.0f}s)")
    batch = torch.export.Dim("batch", min=1, max=1_000_000)
    program = torch.export.export(net.eval(), (x[:2],), dynamic_shapes=({0: batch},))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, args.out)
    print(f"teacher saved to {args.out}")


if __name__ == "__main__":
    main()
