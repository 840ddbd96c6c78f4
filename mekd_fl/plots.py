"""Every figure the project draws: a run's (`results.py`) and a bench report's (`bench/figures.py`).

Why one module: the figures share their look (sizes, dpi, grids, the stacked bars of label counts) and
matplotlib is set up in one place (the Agg backend, imported on first use: a run that draws nothing never
loads it). Each function takes plain numbers and labels and a path, never a RunConfig or a bench spec, so
this module imports nothing from the project and what to draw stays with its callers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Above this many clients the label plot is a heatmap of class shares instead of one bar per client.
MAX_BARS = 100
ACCURACY_PERCENT = "student test accuracy (%)"


@dataclass(frozen=True)
class Series:
    """One line or point set: its legend label, x and y, and the y spread (a band or error bars) if any."""

    label: str | None
    x: Sequence[float]
    y: Sequence[float]
    spread: Sequence[float] | None = None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _stacked_bars(ax: Any, counts: np.ndarray, class_names: Sequence[str]) -> None:
    """One bar per client, stacked by class, one colour per class."""
    cmap = _pyplot().get_cmap("tab10" if counts.shape[1] <= 10 else "tab20")
    bottom = np.zeros(len(counts))
    for c in range(counts.shape[1]):
        ax.bar(
            range(len(counts)),
            counts[:, c],
            bottom=bottom,
            color=cmap(c % cmap.N),
            label=class_names[c] if c < 20 else None,
        )
        bottom += counts[:, c]
    ax.set_xlabel("client")
    ax.set_xticks(range(len(counts)))


# ------------------------------------------------------------------------------------- one run
def run_accuracy(rounds: list[dict], teacher_accuracy: float | None, title: str, path: Path) -> Path:
    """The global student's accuracies per round (server test set, client test splits, agreement)."""
    fig, ax = _pyplot().subplots(figsize=(6, 4))
    for key, label in (
        ("server/accuracy", "global student, server test set"),
        ("fed/accuracy", "global student, client test splits"),
        ("server/agreement", "agreement with teacher"),
    ):
        pts = [(r["round"], r[key]) for r in rounds if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    if teacher_accuracy is not None:
        ax.axhline(teacher_accuracy, color="grey", linestyle="--", label="teacher, server test set")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_xticks([r["round"] for r in rounds])
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def label_distribution(counts: np.ndarray, class_names: list[str], title: str, path: Path) -> Path:
    """Stacked bars per client, or above MAX_BARS clients a heatmap of each client's class shares:
    bars for 10,000 clients made a 550,000-pixel-wide figure (160 s and 2 GiB in bench_scale.py)."""
    plt = _pyplot()
    counts = np.asarray(counts)
    if len(counts) > MAX_BARS:
        shares = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        fig, ax = plt.subplots(figsize=(10, 4))
        image = ax.imshow(shares.T, aspect="auto", interpolation="antialiased", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(counts.shape[1]))
        ax.set_yticklabels(list(class_names[: counts.shape[1]]), fontsize=7)
        ax.set_xlabel(f"client (0-{len(counts) - 1})")
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="share of the client's images")
        return _save(fig, path)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(counts) + 2), 4))
    _stacked_bars(ax, counts, class_names)
    ax.set_ylabel("images")
    ax.set_title(title)
    if counts.shape[1] <= 20:
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)


def emulator_samples(samples: dict[str, np.ndarray], path: Path) -> Path:
    """Rows: real x, G(T(x)), G(S(x)); one column per image (uint8, channels first)."""
    rows = [("images", "x"), ("g-teacher", "G(T(x))"), ("g-student", "G(S(x))")]
    n = len(samples["images"])
    fig, axes = _pyplot().subplots(3, n, figsize=(1.2 * n, 3.9), squeeze=False)
    for r, (key, label) in enumerate(rows):
        for c in range(n):
            img = samples[key][c]
            ax = axes[r][c]
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(np.transpose(img, (1, 2, 0)))
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, fontsize=9)
    fig.suptitle("emulator samples: teacher vs student through G")
    return _save(fig, path)


# ---------------------------------------------------------------------------- a bench report
def accuracy_per_round(panels: list[tuple[str, list[Series]]], legend_title: str | None, path: Path) -> Path:
    """One panel per (title, lines): server test accuracy (%) per round, each line a mean with a ± std band."""
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels) + 1, 3.6), squeeze=False, sharey=True)
    for ax, (title, lines) in zip(axes[0], panels):
        for s in lines:
            mean, std = np.asarray(s.y), np.asarray(s.spread)
            (line,) = ax.plot(s.x, mean, marker="o", markersize=3, label=s.label)
            ax.fill_between(s.x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("server test accuracy (%)")
    drawn = [ax for ax in axes[0] if ax.get_legend_handles_labels()[0]]  # a half-run sweep has empty panels
    if drawn:
        drawn[-1].legend(fontsize=7, title=legend_title, title_fontsize=7, loc="lower right")
    return _save(fig, path)


def _accuracy_axes(ax: Any, xlabel: str, legend_title: str | None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ACCURACY_PERCENT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title=legend_title, title_fontsize=7)


def accuracy_vs_alpha(lines: list[Series], legend_title: str | None, path: Path) -> Path:
    """Student accuracy (%) against the Dirichlet alpha on a log axis, mean ± std per alpha."""
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    for s in lines:
        ax.errorbar(s.x, s.y, yerr=s.spread, marker="o", capsize=3, label=s.label)
    ax.set_xscale("log")
    _accuracy_axes(ax, "Dirichlet alpha (smaller = more skewed)", legend_title)
    return _save(fig, path)


def accuracy_scatter(points: list[Series], xlabel: str, legend_title: str | None, path: Path) -> Path:
    """Student accuracy (%) against another number (queries, FID), one colour per point set."""
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    for s in points:
        ax.scatter(s.x, s.y, label=s.label, alpha=0.8)
    _accuracy_axes(ax, xlabel, legend_title)
    return _save(fig, path)


def accuracy_vs_queries(curves: list[Series], xlabel: str, legend_title: str | None, path: Path) -> Path:
    """Query-efficiency curves: accuracy (%) ± std against teacher queries; log x when they span 10x or more."""
    fig, ax = _pyplot().subplots(figsize=(5.5, 3.8))
    for s in curves:
        ax.errorbar(s.x, s.y, yerr=s.spread, marker="o", markersize=4, capsize=3, label=s.label)
    xs = [x for s in curves for x in s.x]
    if min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        # Ticks at the budgets themselves (log-scale minor labels overlap between them).
        ticks = sorted({round(x, -1) for x in xs})
        if len(ticks) <= 8:
            ax.set_xticks(ticks, [f"{t:,.0f}" for t in ticks], fontsize=7)
            ax.minorticks_off()
    _accuracy_axes(ax, xlabel, legend_title)
    return _save(fig, path)


def partitions(panels: list[tuple[str, np.ndarray, Sequence[str]]], path: Path) -> Path:
    """One panel per (title, label counts per client, class names): stacked bars per client."""
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.5, 3.4), squeeze=False)
    for ax, (title, counts, names) in zip(axes[0], panels):
        _stacked_bars(ax, np.asarray(counts), names)
        ax.set_title(title, fontsize=9)
    axes[0][0].set_ylabel("images")
    if np.asarray(panels[-1][1]).shape[1] <= 20:
        axes[0][-1].legend(fontsize=6, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)
