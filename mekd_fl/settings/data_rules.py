"""The rules whose accepted values depend on the data set: its classes, its image shape, its sizes.

Why apart from `checks.py`: those rules judge settings alone, so a spec can validate every cell of a
grid without reading a file. The rules here need what only the data set says (10 or 100 classes, 28 or
32 pixel images, how many images the server and each client get), so they run once the data set is
loaded and split (`mekd_fl.server.app.prepare`, before Ray starts and before the teacher loads), in
one place: a setting found wrong here would otherwise fail deep inside the run (the oracle, the
emulator, a client's empty query) after minutes of work, with a traceback instead of a sentence.

The partition's own feasibility (num-clients against the images, shards-per-client, the Dirichlet
draws) is judged by the partitioner while it splits (`mekd_fl.data.partition`), also before any work;
it raises the same kind of one-line error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mekd_fl.errors import ConfigError


@dataclass(frozen=True)
class DataFacts:
    """What the rules read about the data: cheap numbers, never the images themselves.

    `server_images` and `client_train_sizes` are None before the split is made (the rules that read
    them are then skipped). `emulators` says whether the run trains emulators (the method distills
    through G, or the queries are G's samples) and `queries` whether clients query the teacher at all
    (the supervised reference does not): both follow from the method's registry entry, which this
    package may not import, so the caller passes them.
    """

    dataset: str
    num_classes: int
    image_shape: tuple[int, int, int]
    train_images: int
    emulators: bool = False
    queries: bool = True
    server_images: int | None = None
    largest_class: int | None = None
    client_train_sizes: tuple[int, ...] | None = None

    @property
    def shape_text(self) -> str:
        return "x".join(str(d) for d in self.image_shape)


def top_k_within_classes(v: Any, d: DataFacts) -> None:
    if v.oracle_top_k > d.num_classes:
        raise ConfigError(
            f"oracle-top-k={v.oracle_top_k} is not accepted with dataset={d.dataset} ({d.num_classes} classes); "
            f"accepted: 0 (all classes) to {d.num_classes}"
        )


def classes_per_client_within_classes(v: Any, d: DataFacts) -> None:
    if v.partition == "pathological" and v.classes_per_client > d.num_classes:
        raise ConfigError(
            f"classes-per-client={v.classes_per_client} is not accepted with dataset={d.dataset} "
            f"({d.num_classes} classes); accepted: 1 to {d.num_classes}"
        )


def emulator_fits_the_images(v: Any, d: DataFacts) -> None:
    """The DCGAN-style generator upsamples twice by 2 (`mekd_fl.models.gan`); the FID network pools 3 times."""
    if not d.emulators:
        return
    _, height, width = d.image_shape
    if height != width or height % 4:
        raise ConfigError(
            f"dataset={d.dataset} has {d.shape_text} images, but method={v.method} with "
            f"query-source={v.query_source} trains an emulator, which needs square images with a side "
            f"divisible by 4; accepted: a method that does not distill through G with query-source=local"
        )
    if v.emulator_fid and min(height, width) < 8:
        raise ConfigError(
            f"emulator-fid=true is not accepted with dataset={d.dataset} ({d.shape_text} images; the FID "
            f"network needs a side of at least 8); accepted: emulator-fid=false"
        )


def teacher_gets_images(v: Any, d: DataFacts) -> None:
    if d.server_images is None or v.teacher_epochs == 0 or d.server_images > 0:
        return
    # round(share x class size) >= 1 for the largest class first: share > 0.5 / largest class.
    least = 0.5 / max(d.largest_class or d.train_images, 1)
    raise ConfigError(
        f"server-share={v.server_share} leaves none of the {d.train_images} {d.dataset} training images on "
        f"the server to train the teacher (teacher-epochs={v.teacher_epochs}); accepted: server-share > "
        f"{least:.4g}, or teacher-epochs=0"
    )


def every_client_can_query(v: Any, d: DataFacts) -> None:
    """A client whose query count rounds to 0 sends an empty query, which the oracle refuses, every run."""
    if d.client_train_sizes is None or not d.queries or not d.client_train_sizes:
        return
    smallest = min(d.client_train_sizes)
    if round(v.query_fraction * smallest * v.query_views) >= 1:
        return
    client = d.client_train_sizes.index(smallest)
    least = 0.5 / max(smallest * v.query_views, 1)
    raise ConfigError(
        f"query-fraction={v.query_fraction} gives client {client} ({smallest} training images x "
        f"query-views={v.query_views}) no query at all; accepted: query-fraction > {least:.4g} "
        f"(or more query-views, or fewer num-clients)"
    )


def every_client_can_measure_fid(v: Any, d: DataFacts) -> None:
    if d.client_train_sizes is None or not (d.emulators and v.emulator_fid) or not d.client_train_sizes:
        return
    smallest = min(d.client_train_sizes)
    if smallest >= 2:
        return
    raise ConfigError(
        f"emulator-fid=true needs at least 2 training images on every client, but client "
        f"{d.client_train_sizes.index(smallest)} has {smallest} (num-clients={v.num_clients}, "
        f"partition={v.partition}, client-test-fraction={v.client_test_fraction}); accepted: emulator-fid=false, "
        f"or fewer num-clients"
    )


#: Every data-dependent rule, in the order the data becomes known (classes and shape, then the split).
DATA_RULES: tuple[Callable[[Any, DataFacts], None], ...] = (
    top_k_within_classes,
    classes_per_client_within_classes,
    emulator_fits_the_images,
    teacher_gets_images,
    every_client_can_query,
    every_client_can_measure_fid,
)


def check_data(values: Any, facts: DataFacts) -> None:
    """Apply every rule of `DATA_RULES` to `values` (a RunConfig); the first broken one raises ConfigError."""
    for rule in DATA_RULES:
        rule(values, facts)
