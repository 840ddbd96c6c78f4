"""Client partitions and the server/client split: determinism, skew, coverage, validation."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner

from mekd_fl.data import PARTITIONS, FederatedSplit, label_counts, partition_indices, split_federated
from mekd_fl.errors import ConfigError


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    """3000 labels over 10 classes in random order (balanced, like the real datasets)."""
    return np.random.default_rng(0).permutation(np.arange(3000) % 10)


def max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = label_counts(labels, parts, 10)
    return float((counts.max(1) / counts.sum(1)).mean())


def assert_disjoint_sorted_nonempty(parts: list[np.ndarray]) -> np.ndarray:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert all(len(p) > 0 and np.all(np.diff(p) > 0) for p in parts)
    return joined


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_same_seed_same_partitions_different_seed_different(labels: np.ndarray, scheme: str) -> None:
    a = partition_indices(labels, 10, scheme, seed=1)
    b = partition_indices(labels, 10, scheme, seed=1)
    c = partition_indices(labels, 10, scheme, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_partitions_are_disjoint_and_cover_everything(labels: np.ndarray, scheme: str) -> None:
    parts = partition_indices(labels, 10, scheme, alpha=0.3)
    assert len(parts) == 10 and all(p.dtype == np.int64 for p in parts)
    assert np.array_equal(np.sort(assert_disjoint_sorted_nonempty(parts)), np.arange(len(labels)))


def test_iid_sizes_and_label_proportions(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 7, "iid")
    assert all(abs(len(p) - len(labels) / 7) <= 1 for p in parts)
    shares = label_counts(labels, parts, 10) / np.array([[len(p)] for p in parts])
    assert np.abs(shares - 0.1).max() < 0.08
    assert max_class_share(labels, parts) < 0.2


def test_dirichlet_small_alpha_is_skewed(labels: np.ndarray) -> None:
    assert max_class_share(labels, partition_indices(labels, 10, "dirichlet", alpha=0.1)) > 0.5
    assert max_class_share(labels, partition_indices(labels, 10, "dirichlet", alpha=1000.0)) < 0.2


def test_dirichlet_honours_min_partition_size(labels: np.ndarray) -> None:
    parts = partition_indices(labels, 10, "dirichlet", alpha=0.3, min_partition_size=50)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_on_small_data_lowers_the_minimum(labels: np.ndarray) -> None:
    parts = partition_indices(labels[:60], 10, "dirichlet", alpha=0.5)  # 6 per client on average < 10
    assert_disjoint_sorted_nonempty(parts)


def test_dirichlet_impossible_minimum_is_a_config_error(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="alpha=0.01 with num-clients=15"):
        partition_indices(labels[:20], 15, "dirichlet", alpha=0.01)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pathological_clients_hold_k_classes(labels: np.ndarray, k: int) -> None:
    parts = partition_indices(labels, 10, "pathological", classes_per_partition=k)
    assert ((label_counts(labels, parts, 10) > 0).sum(1) == k).all()


def test_pathological_with_few_clients_warns_about_unused_classes(labels: np.ndarray) -> None:
    with pytest.warns(UserWarning, match=r"classes \[4, 5, 6, 7, 8, 9\] to no client"):
        parts = partition_indices(labels, 3, "pathological", classes_per_partition=2)
    assert set(np.unique(labels[assert_disjoint_sorted_nonempty(parts)])) == {0, 1, 2, 3}


def test_pathological_too_few_samples_is_a_config_error() -> None:
    labels = np.array([0] * 3 + [1] * 50)
    with pytest.raises(ConfigError, match="classes-per-client=2 with num-clients=10"):
        partition_indices(labels, 10, "pathological", classes_per_partition=2)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"scheme": "shards"}, r"^partition='shards' is not known; accepted: iid, dirichlet, pathological, shard$"),
        ({"scheme": "dirichlet", "alpha": 0.0}, r"^alpha=0.0 must be > 0"),
        ({"scheme": "dirichlet", "alpha": -1.0}, r"^alpha=-1.0 must be > 0"),
        ({"num_partitions": 0}, r"^num-clients=0 must be at least 1$"),
        ({"num_partitions": 3001}, r"^num-clients=3001 exceeds the 3000 samples available to clients$"),
        ({"scheme": "pathological", "classes_per_partition": 0}, r"^classes-per-client=0 must be in \[1, 10\]"),
        ({"scheme": "pathological", "classes_per_partition": 11}, r"^classes-per-client=11 must be in \[1, 10\]"),
        ({"scheme": "dirichlet", "min_partition_size": 0}, r"^min-partition-size=0 must be an integer >= 1$"),
        ({"scheme": "dirichlet", "partition_retries": -1}, r"^partition-retries=-1 must be an integer >= 0$"),
        ({"scheme": "shard", "shards_per_partition": 0}, r"^shards-per-client=0 must be in \[1, 300\]"),
        ({"scheme": "shard", "shards_per_partition": 301}, r"^shards-per-client=301 must be in \[1, 300\]"),
    ],
)
def test_bad_settings_name_the_setting(labels: np.ndarray, kwargs: dict, setting: str) -> None:
    args = {"num_partitions": 10, "scheme": "iid"} | kwargs
    with pytest.raises(ConfigError, match=setting):
        partition_indices(labels, args.pop("num_partitions"), args.pop("scheme"), **args)


def test_dirichlet_large_federation_with_min_partition_size_1() -> None:
    """Issue 9: 1000 clients of 30,000 images at alpha=0.5 need a minimum below the default 10."""
    many = np.random.default_rng(1).permutation(np.arange(30_000) % 10)
    parts = partition_indices(many, 1000, "dirichlet", alpha=0.5, min_partition_size=1, seed=3)
    assert len(parts) == 1000 and min(len(p) for p in parts) >= 1
    assert np.array_equal(np.sort(assert_disjoint_sorted_nonempty(parts)), np.arange(len(many)))


# Settings whose first Dirichlet draws leave a client short: seed 3 is accepted at the third draw
# (2 retries), seed 4 at the ninth (8 retries), found with flwr-datasets' own partitioner.
HARD = {"num_partitions": 30, "scheme": "dirichlet", "alpha": 0.5, "min_partition_size": 40}


def test_partition_retries_are_honoured_and_deterministic(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError) as info:
        partition_indices(labels, **HARD, partition_retries=1, seed=3)
    msg = str(info.value)
    assert msg.startswith("alpha=0.5 with num-clients=30: 2 Dirichlet draws (partition-retries=1)") and "\n" not in msg
    for setting in ("alpha", "num-clients", "min-partition-size", "partition-retries"):
        assert setting in msg.split(";", 1)[1], setting  # the advice names every setting that relaxes it
    parts = partition_indices(labels, **HARD, partition_retries=2, seed=3)
    assert min(len(p) for p in parts) >= 40
    # More retries allowed accept the same (first good) draw: the draws follow from the seed alone.
    for again in (
        partition_indices(labels, **HARD, partition_retries=2, seed=3),
        partition_indices(labels, **HARD, seed=3),
    ):
        assert all(np.array_equal(x, y) for x, y in zip(parts, again))


@pytest.mark.parametrize("seed", [3, 4])
def test_default_retries_give_flwr_datasets_own_partition(labels: np.ndarray, seed: int) -> None:
    """Our redraw loop reproduces DirichletPartitioner's (so earlier runs keep their partitions)."""
    reference = DirichletPartitioner(30, "label", alpha=0.5, min_partition_size=40, self_balancing=False, seed=seed)
    reference.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))}).shuffle(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns on each redraw
        expected = [np.sort(reference.load_partition(i)["idx"]) for i in range(30)]
    parts = partition_indices(labels, **HARD, seed=seed)
    assert all(np.array_equal(x, y) for x, y in zip(parts, expected))


def test_shard_clients_hold_whole_label_sorted_shards(labels: np.ndarray) -> None:
    # 7 clients x 2 shards: 14 shards of 3000 // 14 = 214 images; the last 4 in label order fit none.
    with pytest.warns(UserWarning, match="14 shards of 214 samples; the last 4 samples in label order are unused"):
        parts = partition_indices(labels, 7, "shard", shards_per_partition=2, seed=5)
    joined = assert_disjoint_sorted_nonempty(parts)
    assert all(len(p) == 2 * 214 for p in parts)
    assert len(joined) == 14 * 214 and set(labels[np.setdiff1d(np.arange(3000), joined)]) == {9}
    # Shard j holds positions [214 j, 214 (j + 1)) of the label-sorted data: its label histogram is known.
    by_label = np.sort(labels)
    shard_counts = [np.bincount(by_label[214 * j : 214 * (j + 1)], minlength=10) for j in range(14)]
    pairs = [(a, b) for a in range(14) for b in range(a + 1, 14)]
    for counts in label_counts(labels, parts, 10):
        assert any(np.array_equal(counts, shard_counts[a] + shard_counts[b]) for a, b in pairs)


def test_shard_with_pure_shards_gives_each_client_k_classes(labels: np.ndarray) -> None:
    # 10 clients x 3 shards of 100: each class is exactly 3 shards, so a client has at most 3 classes
    # and holds multiples of 100 of each.
    parts = partition_indices(labels, 10, "shard", shards_per_partition=3, seed=1)
    counts = label_counts(labels, parts, 10)
    assert (counts.sum(1) == 300).all() and (counts % 100 == 0).all() and ((counts > 0).sum(1) <= 3).all()
    assert (counts.sum(0) == 300).all()  # every image is used


def test_label_counts(labels: np.ndarray) -> None:
    parts = [np.arange(0, 10), np.arange(10, 3000)]
    counts = label_counts(labels, parts, 10)
    assert counts.shape == (2, 10) and counts.dtype == np.int64
    assert counts[0].tolist() == np.bincount(labels[:10], minlength=10).tolist()
    assert counts.sum() == 3000


def split(labels: np.ndarray, **overrides) -> FederatedSplit:
    args = (
        dict(
            num_clients=6,
            scheme="dirichlet",
            alpha=0.5,
            classes_per_partition=2,
            server_share=0.2,
            client_test_fraction=0.25,
            seed=7,
        )
        | overrides
    )
    return split_federated(labels, **args)


@pytest.mark.parametrize("scheme", PARTITIONS)
def test_split_groups_are_disjoint_and_cover_the_train_set(labels: np.ndarray, scheme: str) -> None:
    s = split(labels, scheme=scheme, num_clients=10)
    joined = np.concatenate([s.server_indices, *s.client_train, *s.client_test])
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))
    assert all(len(t) >= 1 and np.all(np.diff(t) > 0) for t in s.client_train)


def test_server_share_is_stratified() -> None:
    labels = np.random.default_rng(3).permutation(np.repeat(np.arange(4), [400, 200, 100, 50]))
    s = split(labels, server_share=0.3)
    assert np.bincount(labels[s.server_indices]).tolist() == [120, 60, 30, 15]
    assert len(split(labels, server_share=0.0).server_indices) == 0


def test_client_test_fraction_and_label_counts(labels: np.ndarray) -> None:
    s = split(labels, client_test_fraction=0.25)
    for train, test, counts in zip(s.client_train, s.client_test, s.label_counts):
        assert len(test) == round(0.25 * (len(train) + len(test)))
        assert counts.tolist() == np.bincount(labels[np.concatenate([train, test])], minlength=10).tolist()
    assert all(len(t) == 0 for t in split(labels, client_test_fraction=0.0).client_test)


def test_client_keeps_at_least_one_training_image() -> None:
    s = split(np.arange(4) % 2, num_clients=2, scheme="iid", server_share=0.0, client_test_fraction=0.9)
    assert [len(t) for t in s.client_train] == [1, 1] and [len(t) for t in s.client_test] == [1, 1]


def test_split_is_deterministic_for_a_seed(labels: np.ndarray) -> None:
    a, b, c = split(labels, seed=5), split(labels, seed=5), split(labels, seed=6)
    fields = lambda s: [s.server_indices, *s.client_train, *s.client_test]  # noqa: E731
    assert all(np.array_equal(x, y) for x, y in zip(fields(a), fields(b)))
    assert not all(np.array_equal(x, y) for x, y in zip(fields(a), fields(c)))


@pytest.mark.parametrize(
    ("setting", "value"),
    [("server_share", 1.0), ("server_share", -0.1), ("client_test_fraction", 1.0), ("client_test_fraction", -0.5)],
)
def test_bad_fractions_name_the_setting(labels: np.ndarray, setting: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"^{setting.replace('_', '-')}={value} must be in \[0, 1\)$"):
        split(labels, **{setting: value})


def test_too_many_clients_for_what_the_server_leaves(labels: np.ndarray) -> None:
    with pytest.raises(ConfigError, match=r"num-clients=100 exceeds the 3\d samples available to clients"):
        split(labels[:100], num_clients=100, server_share=0.7)


def test_summary_table_lists_every_client(labels: np.ndarray) -> None:
    s = split(labels, num_clients=12)
    names = [f"class{i}" for i in range(10)]
    lines = s.summary_table(names).splitlines()
    assert lines[0].split() == ["client", "train", "test", *names]
    assert [line.split()[0] for line in lines[1:13]] == [str(i) for i in range(12)]
    assert lines[1].split()[3:] == [str(n) for n in s.label_counts[0]]
    assert lines[-1] == f"server: {len(s.server_indices)} labeled images (teacher data)"


def test_summary_table_with_many_classes_shows_a_digest() -> None:
    labels = np.random.default_rng(4).permutation(np.arange(2000) % 100)
    s = split(labels, num_clients=4, scheme="iid")
    lines = s.summary_table().splitlines()
    assert lines[0].split() == ["client", "train", "test", "classes", "largest", "classes"]
    assert len(lines) == 6 and all(
        line.split()[3] == str((s.label_counts[i] > 0).sum()) for i, line in enumerate(lines[1:5])
    )


@pytest.mark.parametrize("n,parts", [(30, 7), (3000, 1000), (1000, 1)])
def test_iid_fast_path_equals_flwr_datasets_iid_partitioner(n: int, parts: int) -> None:
    """The iid split is cut with numpy; it must be exactly IidPartitioner's contiguous shards of the same
    seeded shuffle (so results made before the fast path stay the same)."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = np.arange(n) % 10
    ours = partition_indices(labels, parts, "iid", seed=5)
    partitioner = IidPartitioner(parts)
    partitioner.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(n)}).shuffle(seed=5)
    theirs = [np.sort(partitioner.load_partition(i).with_format("numpy")["idx"][:]) for i in range(parts)]
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))
