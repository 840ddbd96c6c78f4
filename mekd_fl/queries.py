"""Which images a client sends to the teacher: its own (with augmented views), emulator samples, or both.

Why it matters: every image sent is counted against the client's query budget, and the student is
later distilled on exactly the (query, answer) pairs, so the query set *is* the distillation set.
`local` is the paper's setting; `generated` sends samples G(z), z ~ N(0, I_C), of the client's
emulator (the data-free variant of the authors' later code: no real image leaves the device);
`mixed` sends half of each.
"""

from __future__ import annotations

import torch
from torch import nn

from mekd_fl.augment import random_shift_flip
from mekd_fl.emulator import from_gan_range

SOURCES = ("local", "generated", "mixed")


def local_views(images: torch.Tensor, views: int, mirror: bool, gen: torch.Generator) -> torch.Tensor:
    """Each image once as it is, plus `views - 1` randomly shifted (and, with `mirror`, mirrored) copies."""
    if views <= 1:
        return images
    shift = 4 if images.shape[-1] >= 32 else 2
    extra = [
        (random_shift_flip(images.float(), shift, mirror, gen)).round().clamp(0, 255).to(torch.uint8)
        for _ in range(views - 1)
    ]
    return torch.cat([images, *extra])


@torch.no_grad()
def generated(
    generator: nn.Module, count: int, num_classes: int, gen: torch.Generator, batch_size: int = 512
) -> torch.Tensor:
    """`count` emulator samples G(z), z ~ N(0, I_C), as uint8 images (what a camera would send)."""
    generator.eval()
    device = next(generator.parameters()).device
    out = []
    for start in range(0, count, batch_size):
        z = torch.randn(min(batch_size, count - start), num_classes, generator=gen).to(device)
        out.append(from_gan_range(generator(z)).cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def select_queries(
    source: str,
    images: torch.Tensor,
    *,
    views: int,
    budget: int,
    mirror: bool,
    num_classes: int,
    seed: int,
    generator: nn.Module | None = None,
) -> torch.Tensor:
    """The query set, at most `budget` images; as many as `views` x the local images otherwise."""
    if source not in SOURCES:
        raise ValueError(f"query-source={source!r} is not accepted; accepted: {', '.join(SOURCES)}")
    if source != "local" and generator is None:
        raise ValueError(f"query-source={source!r} needs the client's emulator, which this client has not trained")
    gen = torch.Generator().manual_seed(seed)
    want = min(budget, len(images) * views)
    n_local = want if source == "local" else (want // 2 if source == "mixed" else 0)
    parts = []
    if n_local:
        pool = local_views(images, views, mirror, gen)
        keep = torch.randperm(len(pool), generator=gen)[:n_local].sort().values if n_local < len(pool) else None
        parts.append(pool if keep is None else pool[keep])
    if want - n_local:
        parts.append(generated(generator, want - n_local, num_classes, gen))
    return torch.cat(parts) if parts else images[:0]
