"""Which images a client sends to the teacher: its own (with augmented views), emulator samples, or both.

Why it matters: every image sent is counted against the client's query budget, and the student is
later distilled on exactly the (query, answer) pairs, so the query set *is* the distillation set.
`local` is the paper's setting; `generated` sends samples G(z), z ~ N(0, I_C), of the client's
emulator (the data-free variant of the authors' later code: no real image leaves the device);
`mixed` sends half of each.

How many and which: a client spends `query-fraction` of its *query pool* (its local images x
`query-views`), capped by the budget the server grants; that count is the same whatever the source
(`generated` sends that many emulator samples, `mixed` half local, half generated). `query-selection`
picks which images of the pool are sent: `random` (a seeded random subset) or `kcenter` (greedy
k-center coverage, :func:`kcenter_indices`, in the features of the fixed, data-independent network of
:mod:`mekd_fl.fid`). With a small budget a random subset over-samples the client's dense modes and may
miss rare ones entirely; the distillation set is the query set, so k-center spends the same budget on
images spread over everything the client holds. It reads no label and no teacher answer, so nothing
leaks and no query is spent choosing. `uncertainty` sends the images the current global student is
least sure of (the highest entropy of its softmax, :func:`entropy_scores`): the teacher's answer
teaches the most where the student is unsure. The server sends the student in the query message (it
is what every client already receives in a round); a client that is sent none (the first lazy cohort,
before any round has trained it) chooses at random. `hybrid` spends half the budget that way and the
other half on a seeded random subset of the rest: measured at 5 % of the images, pure uncertainty lost
4.6 points to random (top-entropy images are the ambiguous and atypical ones, and the query set is the
distillation set, so the student then learns from a skewed sample); the random half keeps the query set
representative of what the client holds, the uncertain half adds the hard cases.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mekd_fl.augment import random_shift_flip, to_unit
from mekd_fl.emulator import from_gan_range
from mekd_fl.settings.run import SCORED_SELECTIONS, run_setting

SOURCES: tuple[str, ...] = run_setting("query-source").accepted()
SELECTIONS: tuple[str, ...] = run_setting("query-selection").accepted()
#: Seed of the fixed feature network k-center measures distances in (the domain FID's network and seed).
KCENTER_FEATURE_SEED = 0


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


def query_count(pool: int, fraction: float, budget: int) -> int:
    """Images a client sends: round(`fraction` x `pool`), capped by `budget` (never below 0)."""
    return max(0, min(budget, round(fraction * pool)))


@torch.no_grad()
def selection_features(
    images: torch.Tensor, device: torch.device | str = "cpu", batch_size: int = 1024
) -> torch.Tensor:
    """(N, D) float32 features k-center measures distances in, on `device`.

    The fixed, data-independent network of :func:`mekd_fl.fid.fixed_feature_net` (seed
    `KCENTER_FEATURE_SEED`): the same on every client, trained on nothing, so choosing with it reveals
    nothing. Images smaller than that network takes (H or W < 8) are compared pixel by pixel.
    """
    from mekd_fl.fid import fixed_feature_net  # torchmetrics is imported only when k-center runs

    if images.shape[-1] < 8 or images.shape[-2] < 8:
        return to_unit(images).flatten(1).to(device)
    net = fixed_feature_net(tuple(images.shape[1:]), seed=KCENTER_FEATURE_SEED).to(device)
    return torch.cat(
        [net.features(to_unit(images[i : i + batch_size].to(device))) for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def kcenter_indices(features: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """`k` distinct row indices of `features` chosen by greedy k-center (farthest-point) selection.

    Start from one seeded random row, then repeatedly add the row farthest from every row chosen so
    far: a running vector of each row's squared distance to its nearest chosen row is lowered after
    each pick (O(N x D) per pick, no N x N matrix), so 30,000 rows of 64 features take seconds. The
    greedy choice is within a factor 2 of the smallest possible covering radius (Gonzalez, 1985).
    Deterministic in `gen`'s seed on a given device (ties go to the lowest index). Returned in pick order.
    """
    n = len(features)
    k = max(0, min(k, n))
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    if k == 0:
        return chosen.cpu()
    feats = features.float()
    norms = feats.pow(2).sum(1)

    def distance_to(row: torch.Tensor | int) -> torch.Tensor:  # squared distances of every row to one row
        return (norms - 2.0 * (feats @ feats[row]) + norms[row]).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=gen))
    chosen[0] = first
    nearest = distance_to(first)
    nearest[first] = -1.0  # chosen rows are never picked again (every distance is >= 0)
    for i in range(1, k):
        pick = torch.argmax(nearest)  # stays on the device: no host sync per pick
        chosen[i] = pick
        nearest = torch.minimum(nearest, distance_to(pick))
        nearest[pick] = -1.0
    return chosen.cpu()


def entropy_scores(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per row: 0 for a certain prediction, log C for a uniform one."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def top_score_indices(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """The `k` rows with the highest scores; equal scores are ordered by a seeded shuffle, not by index."""
    shuffle = torch.randperm(len(scores), generator=gen)
    order = torch.argsort(scores.cpu()[shuffle], descending=True, stable=True)
    return shuffle[order[: max(0, min(k, len(scores)))]]


def hybrid_indices(scores: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """`k` distinct rows: the ceil(k / 2) highest scores (:func:`top_score_indices`), then a seeded random
    subset of the other rows for the rest."""
    k = max(0, min(k, len(scores)))
    top = top_score_indices(scores, (k + 1) // 2, gen)
    rest = torch.ones(len(scores), dtype=torch.bool)
    rest[top] = False
    others = rest.nonzero().flatten()
    return torch.cat([top, others[torch.randperm(len(others), generator=gen)[: k - len(top)]]])


#: Maps uint8 images (N, C, H, W) to one score per image; higher is sent first (`uncertainty`).
Scorer = Callable[[torch.Tensor], torch.Tensor]


def choose(
    pool: torch.Tensor,
    count: int,
    selection: str,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
    scorer: Scorer | None = None,
) -> torch.Tensor:
    """Sorted indices of the `count` images of `pool` to send (`query-selection`)."""
    if selection not in SELECTIONS:
        raise ValueError(f"query-selection={selection!r} is not accepted; accepted: {', '.join(SELECTIONS)}")
    if selection in SCORED_SELECTIONS and scorer is None:
        raise ValueError(f"query-selection={selection} needs a scorer (the global student); none was given")
    if count >= len(pool):
        return torch.arange(len(pool))
    if selection == "random":
        return torch.randperm(len(pool), generator=gen)[:count].sort().values
    if selection in SCORED_SELECTIONS:
        pick = top_score_indices if selection == "uncertainty" else hybrid_indices
        return pick(scorer(pool), count, gen).sort().values
    return kcenter_indices(selection_features(pool, device), count, gen).sort().values


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
    fraction: float = 1.0,
    selection: str = "random",
    device: torch.device | str = "cpu",
    scorer: Scorer | None = None,
) -> torch.Tensor:
    """The query set: `query_count(len(images) x views, fraction, budget)` images.

    The count does not depend on the source: `local` picks them from the pool (the images and their
    augmented views) by `selection`; `generated` sends that many emulator samples (with `kcenter`,
    `uncertainty` or `hybrid`, chosen from as many samples as the pool holds); `mixed` half of each.
    `uncertainty` and `hybrid` without a `scorer` (no trained student yet) choose at random.
    """
    if source not in SOURCES:
        raise ValueError(f"query-source={source!r} is not accepted; accepted: {', '.join(SOURCES)}")
    if selection not in SELECTIONS:
        raise ValueError(f"query-selection={selection!r} is not accepted; accepted: {', '.join(SELECTIONS)}")
    if source != "local" and generator is None:
        raise ValueError(
            f"query-source={source!r} needs the client's emulator, which this client has not trained (a paired "
            "emulator, the default, is trained after the queries; accepted: emulator-pairing=none, or "
            "MEKD(emulator_pairing='none'), or query-source=local)"
        )
    if selection in SCORED_SELECTIONS and scorer is None:
        selection = "random"
    gen = torch.Generator().manual_seed(seed)
    pool_size = len(images) * views
    want = query_count(pool_size, fraction, budget)
    n_local = want if source == "local" else (want // 2 if source == "mixed" else 0)
    parts = []
    if n_local:
        pool = local_views(images, views, mirror, gen)
        parts.append(pool[choose(pool, n_local, selection, gen, device, scorer)])
    if want - n_local:
        n_gen = want - n_local
        if selection == "random":
            parts.append(generated(generator, n_gen, num_classes, gen))
        else:
            candidates = generated(generator, max(n_gen, pool_size), num_classes, gen)
            parts.append(candidates[choose(candidates, n_gen, selection, gen, device, scorer)])
    return torch.cat(parts) if parts else images[:0]
