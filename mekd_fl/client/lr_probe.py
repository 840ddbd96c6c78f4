"""Choose the student's learning rate for a model of your own before a federated run (issue 20).

Why a probe: the default `lr` (0.05, SGD with momentum 0.9) is tuned for the project's ResNet8. A
foreign student (another width, depth or normalisation) may diverge at it, and a federated run
diverges in silence: the loss is only reported, the averaged student drifts, and accuracy stays near
chance. One device's data and one local round show it in seconds: the probe trains a fresh copy of
the student with `EdgeClient.distill` (the very step a client runs: the same SGD, momentum, Nesterov,
weight decay, batch size, epochs and temperature) at each candidate lr, and measures what FedAvg then
averages.

The rule (`probe_lr`), with ratio = ||theta_1 - theta_0|| / ||theta_0|| (L2 over the trainable
parameters, BatchNorm statistics excluded) and the loss = KL to the teacher on the probe's images, in
eval mode, before (theta_0) and after (theta_1) one local round. A candidate lr is
- *diverged* when a loss, a weight or a BatchNorm running statistic is not finite, when ratio >
  BLOW_UP_RATIO (10), when the largest BatchNorm running variance grew more than `bn_growth_limit`
  times over the one the smallest lr of the grid leaves (exploding activations), or when the loss
  did not fall although ratio > `max_update_ratio`;
- *too large* when the loss fell but ratio > `max_update_ratio` (default 1: as long as the weights);
- *no progress* when the loss did not fall with a moderate update (too small an lr, or noise);
- *ok* when the loss fell and ratio <= `max_update_ratio`.
The recommendation is the largest ok lr; None when no lr is ok.

Why the update's length: FedAvg averages the clients' updates, and that average is a sensible model
only while the clients stay in one basin around the global weights. An update of a length comparable
to the weights means each client has left that basin for its own; their average lies between minima,
on none, and the next round starts from there: the silent divergence of issue 20. The loss falling on
one device proves nothing about that (it falls on a client that fits its own answers; a dead network's
loss even falls a little). Measured with `experiments/calibrate_lr_probe.py` (FedAvg of KD, 5 IID
Fashion-MNIST clients of 2000 or 9600 images, 2 local epochs, the example's Net and a BatchNorm CNN,
15 runs): every lr with ratio > 1 (1.1 to 3.1) left the global student at 10-24 % after round 1 (one
at 62 %), every one above 10 at chance for good; in each series the largest lr with ratio <= 1 ended
within 0.4 points of the best final accuracy. Those clients were IID; clients with skewed data drift
apart sooner, so pass a smaller `max_update_ratio` (say 0.5) for them (not measured).

Caveats: the probe distills with KD's loss (Hinton's KL at the run's temperature) when the run's method
needs an emulator (MEKD) or labels; MEKD adds an emulation term, whose gradient can lengthen the update
(not measured): read the recommendation as an upper bound for it.
Pass one device's query set (its size sets the steps per local round) and the settings the clients run
with (`local-epochs`, `batch-size`, ...). Deterministic for a seed on the CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mekd_fl.client.edge import EdgeClient, EdgeSettings, ImageSource, ModelSource, Preprocess, as_uint8_images
from mekd_fl.distill import get_class, kl_divergence, needs_generator, teacher_log_probs

#: Candidate learning rates, largest first: a factor of 2 to 2.5 apart around the default 0.05.
DEFAULT_LRS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002)
#: An update this many times the weights' length is a blow-up, not a step (measured: both lrs past it
#: left the FedAvg student at chance).
BLOW_UP_RATIO = 10.0
#: What the teacher's answers are: the two kinds an oracle answers (`oracle-output`).
ANSWER_KINDS = ("probs", "logits")
Answers = torch.Tensor | np.ndarray | Callable[[str, torch.Tensor], Any]


@dataclass(frozen=True)
class LrTrial:
    """One candidate lr after one local round from the same start."""

    lr: float
    loss_before: float  # KL to the teacher on the probe's images, eval mode, before the round
    loss_after: float  # the same after the round
    agreement: float  # share of images where the student's argmax is the teacher's, after (nan: not finite)
    update_ratio: float  # ||theta_1 - theta_0|| / ||theta_0||, trainable parameters
    bn_growth: float | None  # largest BN running variance / the smallest lr's; None: no BatchNorm
    verdict: str  # "ok", "too large", "no progress" or "diverged"
    why: str  # what failed, "; "-separated (empty for "ok")


@dataclass(frozen=True)
class LrProbeResult:
    """The trials (largest lr first), the recommendation and what the probe ran on."""

    trials: tuple[LrTrial, ...]
    recommended: float | None
    max_update_ratio: float
    images: int
    steps: int  # optimizer steps per lr (one local round)
    method: str  # the loss trained with

    def table(self) -> str:
        """A Markdown table for people (a caption line, then one row per lr), the recommended row marked."""
        rows = [
            f"{self.images} images, {self.steps} steps per lr, loss {self.method}, "
            f"update bound {self.max_update_ratio:g}",
            "",
            "| lr | loss before -> after | agreement | update / weights | BN variance growth | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for t in self.trials:
            bn = "-" if t.bn_growth is None else f"{t.bn_growth:.3g}x"
            verdict = (
                t.verdict
                + (f" ({t.why})" if t.why else "")
                + (" **<- recommended**" if t.lr == self.recommended else "")
            )
            rows.append(
                f"| {t.lr:g} | {t.loss_before:.4g} -> {t.loss_after:.4g} | "
                f"{'-' if math.isnan(t.agreement) else f'{t.agreement:.1%}'} | "
                f"{t.update_ratio:.3g} | {bn} | {verdict} |"
            )
        return "\n".join(rows)

    def run_config(self) -> str:
        """What to pass to `flwr run --run-config` (empty when no lr is recommended)."""
        return "" if self.recommended is None else f"lr={self.recommended:g}"


def _check_lrs(lrs: Iterable[float]) -> tuple[float, ...]:
    grid = tuple(lrs)
    if not grid:
        raise ValueError("lrs: an empty grid is not accepted; accepted: one or more finite learning rates > 0")
    for lr in grid:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lrs: {lr!r} is not accepted; accepted: finite learning rates > 0")
    return tuple(sorted({float(lr) for lr in grid}, reverse=True))


def _answers(answers: Answers, images: torch.Tensor, client_key: str) -> torch.Tensor:
    """The teacher's answers as float32 (N, classes), asking the oracle when `answers` is one."""
    if callable(answers) and not isinstance(answers, (torch.Tensor, np.ndarray)):
        answers = answers(client_key, images)
    out = torch.as_tensor(np.asarray(answers) if not isinstance(answers, torch.Tensor) else answers)
    out = out.detach().cpu().float()
    if out.ndim != 2 or len(out) != len(images):
        raise ValueError(
            f"answers: shape {tuple(out.shape)} for {len(images)} images is not accepted; "
            f"accepted: one row per image, shape ({len(images)}, classes)"
        )
    return out


def _norm(tensors: Iterable[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def probe_lr(
    model: ModelSource,
    images: ImageSource,
    answers: Answers,
    *,
    answer_kind: str | None = None,
    lrs: Iterable[float] = DEFAULT_LRS,
    settings: EdgeSettings | Mapping[str, Any] | None = None,
    preprocess: Preprocess | None = None,
    max_update_ratio: float = 1.0,
    bn_growth_limit: float = 100.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    client_key: str = "lr-probe",
) -> LrProbeResult:
    """Run one local round at every lr of `lrs` from the same start and recommend one (see the module).

    model: your student, an nn.Module (its weights are the start, as your `initial_arrays`) or a factory
        (called once, after seeding with `seed`). images: one device's images, unlabeled (anything
        `mekd_fl.client.edge.as_uint8_images` accepts). answers: the teacher's answers to them, a tensor or array
        (N, classes), or an oracle `(key, uint8 images) -> answers` (a `TeacherOracle`; asked once under
        `client_key`). answer_kind: "probs" or "logits" (default: the oracle's `output`, else "probs").
    settings: the clients' settings (an EdgeSettings or a mapping; default RunConfig's); `lr`, `seed` and
        `oracle-output` are the probe's. The other arguments are those of the module docstring's rule.
    """
    grid = _check_lrs(lrs)
    kind = answer_kind if answer_kind is not None else getattr(answers, "output", "probs")
    if kind not in ANSWER_KINDS:
        raise ValueError(f"answer_kind: {kind!r} is not accepted; accepted: {', '.join(ANSWER_KINDS)}")
    if not (isinstance(max_update_ratio, (int, float)) and 0 < max_update_ratio <= BLOW_UP_RATIO):
        raise ValueError(
            f"max_update_ratio: {max_update_ratio!r} is not accepted; accepted: a number in (0, {BLOW_UP_RATIO:g}]"
        )
    if not (isinstance(bn_growth_limit, (int, float)) and 1 <= bn_growth_limit < math.inf):
        raise ValueError(f"bn_growth_limit: {bn_growth_limit!r} is not accepted; accepted: a finite number >= 1")
    uint8 = as_uint8_images(images)
    responses = _answers(answers, uint8, client_key)
    base = settings if isinstance(settings, EdgeSettings) else EdgeSettings.from_config(settings)
    method = base.method if not (needs_generator(base.method) or get_class(base.method).uses_labels) else "kd"
    start = base.updated(method=method, oracle_output=kind, seed=seed)
    torch.manual_seed(seed)
    edge = EdgeClient(
        uint8, model, settings=start, preprocess=preprocess, num_classes=responses.shape[1], device=device
    )
    student = edge.new_student()
    initial = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    trainable = [name for name, _ in student.named_parameters()]
    teacher_log_p, teacher_top = teacher_log_probs(responses, kind), responses.argmax(1)

    def score(state: Mapping[str, torch.Tensor]) -> tuple[float, float]:
        """KL to the teacher and argmax agreement, in eval mode (what the server's evaluation sees)."""
        logits = edge.predict(state, uint8)
        return float(kl_divergence(teacher_log_p, logits, start.temperature)), float(
            (logits.argmax(1) == teacher_top).float().mean()
        )

    loss_before, _ = score(initial)
    raw: list[tuple[float, float, float, float, float | None, bool]] = []
    steps = 0
    for lr in grid:
        state, metrics, _ = edge.with_settings(start.updated(lr=lr)).distill(initial, uint8, responses)
        steps = int(metrics["steps"])
        finite = all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
        finite = finite and all(math.isfinite(v) for v in metrics.values())
        loss_after, agreement = score(state) if finite else (math.inf, math.nan)
        ratio = _norm(state[k] - initial[k] for k in trainable) / max(_norm(initial[k] for k in trainable), 1e-12)
        variances = [v.max() for k, v in state.items() if k.endswith("running_var")]
        bn = float(torch.stack(variances).max()) if variances else None
        raw.append((lr, loss_after, agreement, ratio, bn, finite and math.isfinite(loss_after)))
    reference = raw[-1][4]  # the smallest lr's largest BN variance
    trials = []
    for lr, loss_after, agreement, ratio, bn, finite in raw:
        growth = None if bn is None or reference is None else bn / max(reference, 1e-12)
        fell, large = loss_after < loss_before, ratio > max_update_ratio
        reasons = [
            why
            for bad, why in (
                (not finite or (growth is not None and not math.isfinite(growth)), "non-finite loss or weights"),
                (finite and not fell, "loss did not fall"),
                (finite and ratio > BLOW_UP_RATIO, f"update > {BLOW_UP_RATIO:g} x weights"),
                (finite and large and ratio <= BLOW_UP_RATIO, f"update > {max_update_ratio:g} x weights"),
                (growth is not None and math.isfinite(growth) and growth > bn_growth_limit, "BN variance blew up"),
            )
            if bad
        ]
        if (
            not finite
            or ratio > BLOW_UP_RATIO
            or (growth is not None and not growth <= bn_growth_limit)
            or (large and not fell)
        ):
            verdict = "diverged"
        else:
            verdict = "too large" if large else "ok" if fell else "no progress"
        trials.append(LrTrial(lr, loss_before, loss_after, agreement, ratio, growth, verdict, "; ".join(reasons)))
    recommended = next((t.lr for t in trials if t.verdict == "ok"), None)
    return LrProbeResult(tuple(trials), recommended, float(max_update_ratio), len(uint8), steps, method)
