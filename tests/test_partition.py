"""Tests for mocosfl.data.partition: correctness, determinism, speed, errors and persistence.
Partitions are checked against flwr's slow public path and simple reference implementations."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mocosfl.data.partition import (
    PartitionError,
    class_counts,
    load_shards,
    partition_indices,
    partition_summary,
    plot_class_heatmap,
    save_shards,
)

CIFAR_LABELS = np.repeat(np.arange(10), 5000)


def shuffled_cifar(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).permutation(CIFAR_LABELS)


def assert_disjoint_sorted(shards: list[np.ndarray], n: int) -> np.ndarray:
    """Every shard sorted int64, no index twice, all in range; returns the assigned indices."""
    for s in shards:
        assert s.dtype == np.int64
        assert np.all(np.diff(s) > 0)
    flat = np.concatenate(shards)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < n
    return flat


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- determinism and coverage


@pytest.mark.parametrize("method,kw", [("noniid-shards", {}), ("dirichlet", {"alpha": 0.5}), ("iid", {})])
def test_deterministic_and_seed_dependent(method: str, kw: dict) -> None:
    labels = shuffled_cifar()[:5000]
    a = partition_indices(labels, method, 20, seed=1, **kw)
    b = partition_indices(labels, method, 20, seed=1, **kw)
    c = partition_indices(labels, method, 20, seed=2, **kw)
    assert same(a, b)
    assert not same(a, c)


@pytest.mark.parametrize("method", ["dirichlet", "iid"])
def test_full_coverage_methods(method: str) -> None:
    labels = shuffled_cifar()[:3001]
    shards = partition_indices(labels, method, 17, seed=0)
    flat = assert_disjoint_sorted(shards, len(labels))
    assert len(flat) == len(labels)
    assert min(len(s) for s in shards) >= 1


@pytest.mark.parametrize("n,clients,spc", [(1003, 10, 2), (1000, 10, 2), (50, 20, 1), (30, 10, 2), (1099, 7, 3)])
def test_noniid_shards_uneven_division(n: int, clients: int, spc: int) -> None:
    # Docstring: shard size s = n // (clients*spc); every client gets spc*s; n mod (clients*spc) dropped.
    labels = np.random.default_rng(n).integers(0, 10, n)
    shards = partition_indices(labels, "noniid-shards", clients, seed=3, shards_per_client=spc)
    flat = assert_disjoint_sorted(shards, n)
    s = n // (clients * spc)
    assert [len(x) for x in shards] == [spc * s] * clients
    assert n - len(flat) == n % (clients * spc)
    summary = partition_summary(labels, shards, 10)
    assert summary["unassigned_samples"] == n % (clients * spc)


def test_noniid_shards_1003_drops_highest_label_tail() -> None:
    # 1003 samples, 20 shards of 50 -> floor(1003/50) == 20 usable shards: exactly the last 3 of the
    # label-sorted order (the stable sort keeps original order within a label) are dropped.
    labels = np.random.default_rng(0).integers(0, 10, 1003)
    shards = partition_indices(labels, "noniid-shards", 10, seed=0)
    unassigned = np.setdiff1d(np.arange(1003), np.concatenate(shards))
    assert np.array_equal(np.sort(unassigned), np.sort(np.argsort(labels, kind="stable")[-3:]))


# ---------------------------------------------------------------- noniid-shards on CIFAR-like labels


def test_noniid_shards_cifar_1000_clients_two_classes() -> None:
    t = time.perf_counter()
    shards = partition_indices(CIFAR_LABELS, "noniid-shards", 1000, seed=0)
    print(f"noniid-shards 1000 clients: {time.perf_counter() - t:.2f} s")
    summary = partition_summary(CIFAR_LABELS, shards, 10)
    assert summary["classes_per_client_mean"] <= 2.0
    assert summary["classes_per_client_max"] <= 2
    assert summary["samples_per_client_min"] == summary["samples_per_client_max"] == 50
    assert summary["unassigned_samples"] == 0
    assert len(assert_disjoint_sorted(shards, len(CIFAR_LABELS))) == 50000
    # Shuffled input: shards follow labels, not positions.
    labels = shuffled_cifar()
    counts = class_counts(labels, partition_indices(labels, "noniid-shards", 1000, seed=0), 10)
    assert (counts > 0).sum(axis=1).max() <= 2


def test_noniid_shards_10000_clients_fast() -> None:
    labels = shuffled_cifar()
    t = time.perf_counter()
    shards = partition_indices(labels, "noniid-shards", 10_000, seed=0)
    elapsed = time.perf_counter() - t
    print(f"noniid-shards 10000 clients: {elapsed:.2f} s")
    assert elapsed < 10.0
    assert len(shards) == 10_000
    flat = assert_disjoint_sorted(shards, 50000)
    # shard size floor(50000/20000) = 2: 20000 shards of 2 used, 10000 samples dropped (documented).
    assert len(flat) == 40000
    assert (class_counts(labels, shards, 10) > 0).sum(axis=1).max() <= 2


def test_noniid_shards_matches_flwr_public_path() -> None:
    """Our fast read of flwr's index mapping == loading each partition via load_partition."""
    import datasets
    from flwr_datasets.partitioner import ShardPartitioner

    labels = shuffled_cifar()[:2000]
    ours = partition_indices(labels, "noniid-shards", 25, seed=5, shards_per_client=3)
    p = ShardPartitioner(num_partitions=25, partition_by="label", num_shards_per_partition=3, seed=5)
    p.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = [np.sort(np.asarray(p.load_partition(i)["idx"])) for i in range(25)]
    assert same(ours, ref)


def test_noniid_shards_matches_obvious_numpy() -> None:
    """Slow obvious implementation: sort by label, equal shards, each client gets shards_per_client."""
    labels = shuffled_cifar(3)[:1000]
    clients, spc = 10, 2
    shards = partition_indices(labels, "noniid-shards", clients, seed=0, shards_per_client=spc)
    order = np.argsort(labels, kind="stable")
    size = len(labels) // (clients * spc)
    blocks = {tuple(np.sort(order[i * size : (i + 1) * size])) for i in range(clients * spc)}
    for shard in shards:
        # Each client's shard is a union of exactly spc whole blocks of the sorted order.
        owned = [b for b in blocks if set(b) <= set(shard.tolist())]
        assert len(owned) == spc
        assert sum(len(b) for b in owned) == len(shard)


# ---------------------------------------------------------------- dirichlet and iid


def test_dirichlet_small_alpha_more_skewed() -> None:
    labels = shuffled_cifar()[:10000]

    def mean_classes(alpha: float) -> float:
        shards = partition_indices(labels, "dirichlet", 20, seed=0, alpha=alpha)
        return partition_summary(labels, shards, 10)["classes_per_client_mean"]

    def mean_max_share(alpha: float) -> float:
        counts = class_counts(labels, partition_indices(labels, "dirichlet", 20, seed=0, alpha=alpha), 10)
        return float((counts.max(axis=1) / counts.sum(axis=1)).mean())

    assert mean_classes(0.1) < mean_classes(100.0)
    assert mean_max_share(0.1) > mean_max_share(100.0) + 0.3


def test_dirichlet_matches_flwr_public_path() -> None:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    labels = shuffled_cifar()[:2000]
    ours = partition_indices(labels, "dirichlet", 12, seed=4, alpha=0.3)
    p = DirichletPartitioner(12, "label", 0.3, min_partition_size=1, seed=4)
    p.dataset = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels))})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = [np.sort(np.asarray(p.load_partition(i)["idx"])) for i in range(12)]
    assert same(ours, ref)


def test_dirichlet_empty_clients_raise() -> None:
    # 100 clients on 120 samples with tiny alpha: some client always ends up empty.
    labels = np.repeat(np.arange(2), 60)
    with pytest.raises(PartitionError, match="larger alpha or fewer clients"):
        partition_indices(labels, "dirichlet", 100, seed=0, alpha=0.01)


def test_iid_sizes_balanced() -> None:
    labels = shuffled_cifar()[:1003]
    shards = partition_indices(labels, "iid", 10, seed=0)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1003
    # Sorted labels in, yet every client sees (almost) every class.
    sorted_shards = partition_indices(np.sort(labels), "iid", 10, seed=0)
    assert partition_summary(np.sort(labels), sorted_shards, 10)["classes_per_client_min"] >= 9


def test_iid_matches_flwr_iid_partitioner() -> None:
    """Our np.array_split == flwr IidPartitioner over the same seeded permutation."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    labels = shuffled_cifar()[:1003]
    ours = partition_indices(labels, "iid", 7, seed=9)
    perm = np.random.default_rng(9).permutation(len(labels))
    p = IidPartitioner(7)
    p.dataset = datasets.Dataset.from_dict({"label": labels[perm], "idx": perm})
    ref = [np.sort(np.asarray(p.load_partition(i)["idx"])) for i in range(7)]
    assert same(ours, ref)


def test_iid_10000_clients_fast() -> None:
    t = time.perf_counter()
    shards = partition_indices(shuffled_cifar(), "iid", 10_000, seed=0)
    print(f"iid 10000 clients: {time.perf_counter() - t:.2f} s")
    assert {len(s) for s in shards} == {5}


# ---------------------------------------------------------------- summary and counts


def test_summary_hand_computed() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2, 1])
    shards = [np.array([0, 1, 2]), np.array([3]), np.array([4, 6])]  # index 5 unassigned
    counts = class_counts(labels, shards, 3)
    assert counts.dtype == np.int64
    assert counts.tolist() == [[2, 1, 0], [0, 0, 1], [0, 1, 1]]
    summary = partition_summary(labels, shards, 3)
    assert summary == {
        "num_clients": 3,
        "num_samples": 6,
        "samples_per_client_min": 1,
        "samples_per_client_mean": 2.0,
        "samples_per_client_max": 3,
        "classes_per_client_mean": 5 / 3,
        "classes_per_client_min": 1,
        "classes_per_client_max": 2,
        "unassigned_samples": 1,
    }
    json.dumps(summary)
    assert all(type(v) in (int, float) for v in summary.values())


def test_class_counts_matches_loop() -> None:
    labels = shuffled_cifar()[:3000]
    shards = partition_indices(labels, "dirichlet", 30, seed=0, alpha=0.5)
    ref = np.array([[int((labels[s] == k).sum()) for k in range(10)] for s in shards])
    assert np.array_equal(class_counts(labels, shards, 10), ref)


def test_class_counts_label_out_of_range() -> None:
    with pytest.raises(PartitionError):
        class_counts(np.array([0, 5]), [np.array([0, 1])], 3)


# ---------------------------------------------------------------- plotting and persistence


def test_heatmap_png(tmp_path: Path) -> None:
    counts = class_counts(CIFAR_LABELS, partition_indices(CIFAR_LABELS, "noniid-shards", 300, seed=0), 10)
    out = tmp_path / "sub" / "heat.png"
    plot_class_heatmap(counts, [f"c{i}" for i in range(10)], out, max_clients=200)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["heat.png"]  # no temp files left


def test_save_load_roundtrip(tmp_path: Path) -> None:
    labels = shuffled_cifar()[:2000]
    shards = partition_indices(labels, "dirichlet", 15, seed=0, alpha=0.5)
    meta = {"method": "dirichlet", "alpha": 0.5, "seed": 0, "num_clients": 15}
    path = tmp_path / "shards.npz"
    save_shards(shards, path, meta)
    loaded, loaded_meta = load_shards(path)
    assert same(loaded, shards) and all(s.dtype == np.int64 for s in loaded)
    assert loaded_meta == meta
    with np.load(path) as raw:  # documented on-disk layout
        assert raw["offsets"].tolist() == [0, *np.cumsum([len(s) for s in shards]).tolist()]
        assert raw["indices"].dtype == np.int64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards.npz"]


def test_save_empty_and_empty_shard(tmp_path: Path) -> None:
    save_shards([], tmp_path / "a.npz", {})
    assert load_shards(tmp_path / "a.npz") == ([], {})
    shards = [np.array([3, 4], dtype=np.int64), np.zeros(0, np.int64), np.array([0], dtype=np.int64)]
    save_shards(shards, tmp_path / "b.npz", {"k": 1})
    assert same(load_shards(tmp_path / "b.npz")[0], shards)


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="nope.npz"):
        load_shards(tmp_path / "nope.npz")


@pytest.mark.parametrize("kind", ["garbage", "truncated", "npy", "no_meta", "bad_offsets", "bad_json"])
def test_load_corrupt(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "bad.npz"
    good = tmp_path / "good.npz"
    save_shards([np.array([0, 1]), np.array([2])], good, {"a": 1})
    if kind == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif kind == "truncated":
        path.write_bytes(good.read_bytes()[:100])
    elif kind == "npy":
        with path.open("wb") as fh:
            np.save(fh, np.arange(3))
    elif kind == "no_meta":
        np.savez(path, indices=np.arange(3), offsets=np.array([0, 3]))
    elif kind == "bad_offsets":
        np.savez(path, indices=np.arange(3), offsets=np.array([0, 5]), meta=np.array("{}"))
    else:
        np.savez(path, indices=np.arange(3), offsets=np.array([0, 3]), meta=np.array("{oops"))
    with pytest.raises(PartitionError, match="bad.npz") as info:
        load_shards(path)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "labels,method,clients,kw,match",
    [
        (np.arange(10) % 2, "kmeans", 2, {}, "allowed: noniid-shards, dirichlet, iid"),
        (np.arange(10) % 2, "iid", 0, {}, "num_clients must be >= 1"),
        (np.arange(10) % 2, "dirichlet", -3, {}, "num_clients must be >= 1"),
        (np.arange(10) % 2, "iid", 11, {}, "more clients"),
        (np.arange(10) % 2, "noniid-shards", 6, {"shards_per_client": 2}, "more shards"),
        (np.arange(10) % 2, "noniid-shards", 2, {"shards_per_client": 0}, "shards_per_client must be >= 1"),
        (np.arange(10) % 2, "dirichlet", 2, {"alpha": 0.0}, "alpha must be > 0"),
        (np.arange(10) % 2, "dirichlet", 2, {"alpha": -1.0}, "alpha must be > 0"),
        (np.array([], dtype=np.int64), "iid", 1, {}, "empty"),
        (np.arange(10) % 2, "iid", 2.5, {}, "num_clients must be an integer"),
        (np.linspace(0, 1, 10), "iid", 2, {}, "integers"),
    ],
)
def test_errors(labels: np.ndarray, method: str, clients: int, kw: dict, match: str) -> None:
    with pytest.raises(PartitionError, match=match) as info:
        partition_indices(labels, method, clients, seed=0, **kw)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_numpy_int_arguments_accepted() -> None:
    shards = partition_indices(
        np.arange(100) % 10, "noniid-shards", np.int64(5), seed=np.int64(0), shards_per_client=np.int32(2)
    )
    assert len(shards) == 5
