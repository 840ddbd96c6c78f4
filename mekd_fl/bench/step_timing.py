"""Timing one optimisation step per distillation method, and the oracle against a raw teacher forward.

Why a module: `experiments/bench_step.py` (CPU thread counts) and `experiments/bench_gpu.py` (the CUDA
paths, in one prepared command) measure the same two ratios, and they must mean the same thing in both
tables: MEKD/KD step time on one batch and one student, interleaved; oracle images per second over the
teacher's own forward on the same images.
"""

from __future__ import annotations

import statistics
import time

import torch

from mekd_fl.config import RunConfig
from mekd_fl.distill import DistillContext, get_distiller
from mekd_fl.emulator import build_emulator
from mekd_fl.models.classifier import build_model
from mekd_fl.precision import autocast
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
