"""Benchmark (not a test): how much of the student's gradient does MEKD's emulation term make?

Why (issue 22): at convergence the emulation term moved the accuracy by less than a point either way.
A term whose gradient is a few per cent of the logit loss's, in much the same direction, can only act as a
slightly larger learning rate; this measures that before spending CPU hours on loss-weight sweeps.

For each chosen client of the run's split it queries the teacher (the cached one, as the run would) on
the client's first `--queries` images, trains the paired emulator on those pairs (as a client does), and,
for each MEKD method (`mekd`: the term beside KD's KL; `mekd-dkd`: beside DKD's loss) and each student
(a freshly initialised one, and `--student`, e.g. a finished cell's `student.pt`), takes one batch
through the method's own loss (`Distiller.losses`, as training does, DKD's warm-up complete) and prints
the norms of the gradients of the emulation term (at weight 1) and of the rest of the loss with respect
to the student's weights, their ratio, their cosine, and the weight-emulation that would make the two
norms equal.

Usage: `python experiments/bench_term_gradients.py [--set partition=pathological classes-per-client=2]
[--student experiments/runs/<spec>/<cell>/student.pt] [--clients 0 3 7] [--queries 270] [--batch 64]
[--methods mekd mekd-dkd] [--seed 42] [--threads 1] [--json out.json]`.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from mekd_fl.augment import to_unit
from mekd_fl.client.edge import EdgeClient, EdgeSettings
from mekd_fl.config import RunConfig
from mekd_fl.distill import DistillContext, Distiller, get_distiller
from mekd_fl.models.classifier import build_model, predict_logits
from mekd_fl.run_data import run_data
from mekd_fl.teacher.training import teacher_for_run

# the converged pathological protocol's federation (experiments/converged-pathological-fmnist.yaml)
_DEFAULT_SET = [
    "partition=pathological",
    "classes-per-client=2",
    "num-clients=10",
    "server-share=0.5",
    "teacher-arch=resnet20",
    "teacher-epochs=5",
    "student-arch=resnet8",
]


def _flat_grad(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def term_gradients(
    distiller: Distiller, logits: torch.Tensor, responses: torch.Tensor, x: torch.Tensor, epoch: float, params: list
) -> dict[str, float]:
    """Gradient norms (w.r.t. `params`) of an MEKD method's emulation term, as its setting weighs it, and of
    the rest of its loss, from one batch through the method's own `losses`; their ratio and cosine."""
    parts = distiller.losses(logits, responses, x, epoch)
    emulation = distiller.emulation_weight * parts["emulation"]
    g_emulation = _flat_grad(emulation, params)
    g_rest = _flat_grad(parts["loss"] - emulation, params)
    ratio = float(g_emulation.norm() / g_rest.norm())
    return {
        "grad-emulation": float(g_emulation.norm()),
        "grad-rest": float(g_rest.norm()),
        "ratio": ratio,
        "cosine": float(F.cosine_similarity(g_emulation, g_rest, dim=0)),
        "parity-weight": distiller.emulation_weight / ratio if ratio > 0 else float("inf"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", nargs="*", default=_DEFAULT_SET, metavar="KEY=VALUE")
    parser.add_argument("--student", default="", help="a student state dict (student.pt) beside the fresh one")
    parser.add_argument("--clients", type=int, nargs="+", default=[0, 3, 7])
    parser.add_argument("--queries", type=int, default=270, help="the client's first N images (0: all)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", nargs="+", choices=("mekd", "mekd-dkd"), default=["mekd", "mekd-dkd"])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="also write the rows to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    overrides = dict(item.split("=", 1) for item in args.set)
    cfg = RunConfig.from_mapping({**overrides, "seed": args.seed, "device": "cpu"})
    data = run_data(cfg)
    ds = data.dataset
    device = torch.device("cpu")
    teacher, _ = teacher_for_run(data, cfg, device)
    teacher.eval()
    fresh = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std).state_dict()
    students = {"fresh": fresh}  # one initialisation, so both methods see the same student
    if args.student:
        students["given"] = torch.load(args.student, map_location="cpu", weights_only=True)
    print(
        f"{'client':>6} {'student':<7} {'method':<8} {'|g emulation|':>13} {'|g rest|':>9} {'ratio':>6} "
        f"{'cosine':>6} {'parity weight':>13}"
    )
    rows = []
    for client in args.clients:
        images = data.client_images(client)
        images = images[: args.queries] if args.queries else images
        responses = predict_logits(teacher, images, device).softmax(1)
        base = EdgeSettings.from_config(cfg.client_dict(), device="cpu")
        model = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
        edge = EdgeClient(images, model, settings=base, num_classes=ds.num_classes, client_id=client)
        g_state, _, _ = edge.train_emulator(pairs=(images, responses))
        batch = torch.arange(min(args.batch, len(images)))
        x = to_unit(images[batch])
        for student_name, state in students.items():
            student = build_model(cfg.student_arch, ds.num_classes, ds.image_shape, ds.mean, ds.std)
            student.load_state_dict(state)
            student.train()
            params = [p for p in student.parameters() if p.requires_grad]
            logits = student(edge.preprocess(x))  # one forward: each method's gradients keep the graph
            for method in args.methods:
                settings = base.updated(method=method, weight_emulation=1.0)
                ctx = DistillContext.from_config(settings, ds.num_classes, edge.load_generator(g_state), device)
                distiller = get_distiller(method, ctx)
                grads = term_gradients(distiller, logits, responses[batch], x, settings.dkd_warmup + 1, params)
                row = {"client": client, "student": student_name, "method": method, **grads}
                rows.append(row)
                print(
                    f"{client:>6} {student_name:<7} {method:<8} {row['grad-emulation']:>13.4f} "
                    f"{row['grad-rest']:>9.4f} {row['ratio']:>6.3f} {row['cosine']:>6.3f} "
                    f"{row['parity-weight']:>13.1f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
