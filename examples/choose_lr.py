"""Choose the student's learning rate for quickstart-mekd's `Net` with `mekd_fl.client.lr_probe` (issue 20).

Run it once before `flwr run`, on one client's share: it loads that partition's images the way the
app's `task.py` does (labels are never read), asks the teacher the app's server loads for its answers,
trains a fresh `Net` for one local round at each candidate lr and prints the table and the setting to run
with. Why beside the app and not in it: the app stays the quickstart plus its MEKD switch.

    python examples/make_teacher.py --out /tmp/teacher.pt2
    python examples/choose_lr.py --teacher /tmp/teacher.pt2 [--images 2000] [--partition-id 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Subset

APP = Path(__file__).resolve().parent / "quickstart-mekd"
sys.path.insert(0, str(APP))  # the app's own package, as `flwr run` would load it

from mekd_fl.client.lr_probe import DEFAULT_LRS, probe_lr  # noqa: E402
from mekd_fl.teacher import TeacherOracle  # noqa: E402
from pytorchexample.task import Net, load_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, default=Path("teacher.pt2"), help="the app's `teacher` setting")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist", help="the app's `data-dir`")
    parser.add_argument("--partition-id", type=int, default=0)
    parser.add_argument("--num-partitions", type=int, default=5, help="the federation's SuperNodes")
    parser.add_argument("--images", type=int, default=0, help="use the partition's first N images (0: all)")
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not args.teacher.is_file():
        sys.exit(f"--teacher {args.teacher}: no such file; make one with examples/make_teacher.py --out {args.teacher}")
    if not (Path(args.data_dir) / "train-images-idx3-ubyte.gz").is_file():
        sys.exit(f"--data-dir {args.data_dir}: no Fashion-MNIST files there (train-images-idx3-ubyte.gz, ...)")

    trainloader, _ = load_data(args.partition_id, args.num_partitions, 32, args.data_dir)
    dataset = trainloader.dataset
    images = Subset(dataset, range(min(args.images, len(dataset)))) if args.images > 0 else dataset
    # The server's oracle, as quickstart-mekd/pytorchexample/server_app.py builds it.
    teacher = torch.export.load(str(args.teacher)).module()
    oracle = TeacherOracle(teacher, num_classes=10, image_shape=(1, 28, 28))

    t0 = time.time()
    # settings=None: the app's server sends only `lr`, so its clients run with the defaults of EdgeSettings.
    result = probe_lr(Net, images, oracle, lrs=args.lrs, seed=args.seed)
    print(result.table())
    print(f"\n({time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s))")
    if result.recommended is None:
        print("No lr of the grid is safe for this model: try smaller ones with --lrs.")
        return
    print(f"flwr run examples/quickstart-mekd --stream --run-config \"teacher='{args.teacher}' {result.run_config()}\"")


if __name__ == "__main__":
    main()
