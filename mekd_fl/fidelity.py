"""How well an emulator emulates: the fidelity diagnostic of G(T(x)), measured on the server only.

Why: MEKD's emulation term compares G(S(x)) with G(T(x)), which says something only when G(T(x))
depends on what T(x) says. An unconditional GAN can produce nearly one figure for every answer (the
"collapse" of issue 11), and then the term carries little. Four numbers tell it at a glance:

- consistency: how often the teacher re-classifies G(T(x)) as T(x)'s class (chance: 1 / C on images of
  balanced classes);
- majority share: the share of the images whose T(x) is their most common class, which is the consistency
  of a G that draws one figure of that class whatever it is fed. On a skewed client it is far above 1 / C
  (the main class holds 30-55 % of the images of the Dirichlet 0.1 clients measured), so a consistency
  near it is no sign of emulation;
- class separation: the mean L1 distance per pixel (images in [-1, 1]) between the class means of
  G(T(x)), grouped by T(x)'s class, beside the same for the real images x (what a perfect inverse gives);
- student distance: the mean L1 per pixel between G(S(x)) and G(T(x)), what the emulation term sees.

Trust: the images come from the one client that returns the emulator-samples plot, the one holding the
most answers (x, G(T(x)), G(S(x)) as uint8, the `evaluate.samples` message); the teacher re-classifies
them on the server with a forward pass of its own, outside any client's budget. Nothing here is sent to
a client or used for training: it is a measurement for the summary and the benchmark reports.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

Classify = Callable[[torch.Tensor], torch.Tensor]  # uint8 images (N, C, H, W) -> scores (N, classes)


def _signed(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] (the generator's range)."""
    return torch.as_tensor(np.asarray(images)).float().div(127.5).sub(1.0)


def class_separation(images: torch.Tensor | np.ndarray, classes: torch.Tensor) -> float | None:
    """Mean over pairs of present classes of the mean |mu_a - mu_b| per pixel, images in [-1, 1].

    None with fewer than two classes present (nothing to separate).
    """
    x = _signed(images).flatten(1)
    present = torch.unique(classes)
    if len(present) < 2:
        return None
    means = torch.stack([x[classes == c].mean(0) for c in present])
    dist = torch.cdist(means, means, p=1) / x.shape[1]
    upper = torch.triu_indices(len(present), len(present), offset=1)
    return float(dist[upper[0], upper[1]].mean())


def emulator_fidelity(
    classify: Classify,
    images: torch.Tensor | np.ndarray,
    g_teacher: torch.Tensor | np.ndarray,
    g_student: torch.Tensor | np.ndarray | None = None,
) -> dict[str, float | int | None]:
    """The diagnostic on n images x with their G(T(x)) (and G(S(x))), all uint8 (n, C, H, W).

    `classify` is the teacher's forward pass (server side); T(x)'s class is its argmax on x.
    """
    x = torch.as_tensor(np.asarray(images))
    g_t = torch.as_tensor(np.asarray(g_teacher))
    if x.dtype != torch.uint8 or g_t.dtype != torch.uint8 or x.shape != g_t.shape or x.dim() != 4 or not len(x):
        raise ValueError(f"fidelity needs uint8 images and G(T(x)) of one shape, got {x.shape} and {g_t.shape}")
    with torch.no_grad():
        t_class = classify(x).argmax(1).cpu()
        g_class = classify(g_t).argmax(1).cpu()
    out: dict[str, float | int | None] = {
        "images": len(x),
        "consistency": float((t_class == g_class).float().mean()),
        "majority-share": float(torch.bincount(t_class).max() / len(t_class)),
        "class-separation": class_separation(g_t, t_class),
        "real-class-separation": class_separation(x, t_class),
        "student-distance": None,
    }
    if g_student is not None:
        g_s = torch.as_tensor(np.asarray(g_student))
        if g_s.shape != g_t.shape or g_s.dtype != torch.uint8:
            raise ValueError(f"G(S(x)) has shape {tuple(g_s.shape)}, G(T(x)) {tuple(g_t.shape)}")
        out["student-distance"] = float((_signed(g_s) - _signed(g_t)).abs().mean())
    return out
