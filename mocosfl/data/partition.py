"""Split a labelled dataset's sample indices across federated clients (non-IID shards, Dirichlet, IID).
Also summarises, plots and saves/loads partitions; flwr-datasets partitioners do the assignment."""

from __future__ import annotations

import json
import operator
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mocosfl.io import atomic_path

METHODS = ("noniid-shards", "dirichlet", "iid")


class PartitionError(ValueError):
    """Impossible partition request (one-line message)."""


def _as_int(value: Any, name: str) -> int:
    # operator.index accepts numpy ints but rejects floats and strings; flwr itself insists on a Python int.
    try:
        return operator.index(value)
    except TypeError:
        raise PartitionError(f"{name} must be an integer, got {value!r}") from None


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise PartitionError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise PartitionError("labels is empty; nothing to partition")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PartitionError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _flwr_assignment(partitioner: Any, num_clients: int) -> list[np.ndarray]:
    """Read every partition's original indices (the "idx" column) from a flwr partitioner.

    Loading partitions one at a time costs ~1 ms each (a datasets.select per client), i.e. ~10 s for
    10,000 clients, so we read the index mapping the partitioner has already computed
    (`_partition_id_to_indices`, flwr-datasets 0.6.1), which refers to rows of `partitioner.dataset`
    (the label-sorted copy for ShardPartitioner). If a future flwr drops that attribute we fall back to
    the slow public path, which tests/test_partition.py checks gives the same shards.
    """
    with warnings.catch_warnings():
        # pyarrow FutureWarning from datasets' sort, flwr's per-retry Dirichlet warning: noise here.
        warnings.simplefilter("ignore")
        # Public property; computing it triggers the whole assignment.
        if partitioner.num_partitions != num_clients:
            raise RuntimeError(f"flwr made {partitioner.num_partitions} partitions, expected {num_clients}")
    mapping = getattr(partitioner, "_partition_id_to_indices", None)
    if not isinstance(mapping, dict) or len(mapping) != num_clients:
        return [np.sort(np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64)) for i in range(num_clients)]
    row_to_idx = np.asarray(partitioner.dataset["idx"], dtype=np.int64)
    return [np.sort(row_to_idx[np.asarray(mapping[i], dtype=np.int64)]) for i in range(num_clients)]


def _noniid_shards(labels: np.ndarray, num_clients: int, seed: int, shards_per_client: int) -> list[np.ndarray]:
    import datasets
    from flwr_datasets.partitioner import ShardPartitioner

    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels), dtype=np.int64)})
    # keep_incomplete_shard=False: all shards have equal size floor(n / (clients * shards_per_client)).
    # shuffle=False: it only reorders samples inside a partition after assignment, and we sort anyway.
    partitioner = ShardPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        num_shards_per_partition=shards_per_client,
        keep_incomplete_shard=False,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = ds
    return _flwr_assignment(partitioner, num_clients)


def _dirichlet(labels: np.ndarray, num_clients: int, seed: int, alpha: float) -> list[np.ndarray]:
    import datasets
    from flwr_datasets.partitioner import DirichletPartitioner

    ds = datasets.Dataset.from_dict({"label": labels, "idx": np.arange(len(labels), dtype=np.int64)})
    # min_partition_size=1: flwr redraws until every client has >= 1 sample, giving up after 11 draws
    # (it has a hard retry cap, so no infinite loop). 0 would silently allow empty clients.
    partitioner = DirichletPartitioner(
        num_partitions=num_clients,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=1,
        self_balancing=False,
        shuffle=False,
        seed=seed,
    )
    partitioner.dataset = ds
    try:
        shards = _flwr_assignment(partitioner, num_clients)
    except ValueError as exc:
        if "max number of attempts" not in str(exc):
            raise
        shards = []
    if not shards or min(len(s) for s in shards) < 1:
        raise PartitionError(
            f"dirichlet(alpha={alpha}) left some of {num_clients} clients with no samples after 11 draws; "
            "use a larger alpha or fewer clients"
        )
    return shards


def _iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    # flwr's IidPartitioner is Dataset.shard(num_clients, i, contiguous=True) over the dataset order, so
    # it is only IID (and only seed-dependent) on a shuffled dataset: we permute with the seed first.
    # Loading 10,000 partitions through it took 6.7 s (1,000: 1.0 s) on 50,000 labels, so we cut the
    # same contiguous blocks with np.array_split, which uses the identical rule (the first n % N blocks
    # get one extra sample); a test checks equality with IidPartitioner.
    perm = np.random.default_rng(seed).permutation(len(labels)).astype(np.int64)
    return [np.sort(block) for block in np.array_split(perm, num_clients)]


def partition_indices(
    labels: np.ndarray,
    method: str,
    num_clients: int,
    seed: int,
    shards_per_client: int = 2,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Split sample indices 0..len(labels)-1 into num_clients shards (each a sorted int64 array).

    Shards are disjoint; the same arguments always give the same shards.

    - "noniid-shards" (MocoSFL / FedAvg paper): flwr `ShardPartitioner` sorts by label, cuts the sorted
      data into equal shards of size s = floor(n / (num_clients * shards_per_client)) and gives every
      client shards_per_client shards chosen at random, so each client holds exactly
      shards_per_client * s samples (~shards_per_client classes). Uneven division: exactly
      n mod (num_clients * shards_per_client) samples are left unassigned (dropped) - the last n mod s
      samples of the label-sorted order (highest labels) plus, when floor(n / s) exceeds
      num_clients * shards_per_client, that many whole shards picked at random by the seed.
      Only shards_per_client is used.
    - "dirichlet": flwr `DirichletPartitioner` (per class, client proportions ~ Dir(alpha)), every
      sample assigned; every client must get >= 1 sample or PartitionError (flwr redraws up to 11
      times first, so a hopeless request such as 10,000 clients on 50,000 samples takes ~20 s to fail).
      Only alpha is used.
    - "iid": a seeded permutation cut into contiguous blocks exactly as flwr `IidPartitioner` does;
      every sample assigned, sizes differ by at most 1.

    Raises PartitionError for: empty/non-integer labels, unknown method, num_clients < 1, more clients
    than samples, shards_per_client < 1 or more shards than samples (noniid-shards), alpha <= 0 (dirichlet).
    """
    labels = _check_labels(labels)
    if method not in METHODS:
        raise PartitionError(f"unknown partition method {method!r}; allowed: {', '.join(METHODS)}")
    num_clients = _as_int(num_clients, "num_clients")
    seed = _as_int(seed, "seed")
    n = len(labels)
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > n:
        raise PartitionError(f"more clients ({num_clients}) than samples ({n})")

    if method == "noniid-shards":
        shards_per_client = _as_int(shards_per_client, "shards_per_client")
        if shards_per_client < 1:
            raise PartitionError(f"shards_per_client must be >= 1, got {shards_per_client}")
        if num_clients * shards_per_client > n:
            raise PartitionError(
                f"more shards ({num_clients} clients x {shards_per_client} = "
                f"{num_clients * shards_per_client}) than samples ({n})"
            )
        return _noniid_shards(labels, num_clients, seed, shards_per_client)
    if method == "dirichlet":
        # `not alpha > 0` also rejects NaN.
        if not float(alpha) > 0:
            raise PartitionError(f"alpha must be > 0, got {alpha}")
        return _dirichlet(labels, num_clients, seed, float(alpha))
    return _iid(labels, num_clients, seed)


def class_counts(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """[num_clients, num_classes] int64 matrix of how many samples of each class every client holds."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    sizes = np.array([len(s) for s in shards], dtype=np.int64)
    flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in shards]) if shards else np.zeros(0, np.int64)
    client = np.repeat(np.arange(len(shards), dtype=np.int64), sizes)
    # One bincount over (client, class) pairs instead of a Python loop: 10,000 clients stay fast.
    counts = np.bincount(client * num_classes + labels[flat], minlength=len(shards) * num_classes)
    return counts.reshape(len(shards), num_classes).astype(np.int64)


def partition_summary(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> dict:
    """JSON-ready statistics of a partition (plain ints/floats; independent of the method used)."""
    counts = class_counts(labels, shards, num_classes)
    sizes = counts.sum(axis=1)
    classes = (counts > 0).sum(axis=1)
    assigned = int(sizes.sum())
    return {
        "num_clients": len(shards),
        "num_samples": assigned,
        "samples_per_client_min": int(sizes.min()),
        "samples_per_client_mean": float(sizes.mean()),
        "samples_per_client_max": int(sizes.max()),
        "classes_per_client_mean": float(classes.mean()),
        "classes_per_client_min": int(classes.min()),
        "classes_per_client_max": int(classes.max()),
        "unassigned_samples": int(len(labels) - assigned),
    }


def plot_class_heatmap(counts: np.ndarray, class_names: list[str], path: Path, max_clients: int = 200) -> None:
    """Write a PNG heat map of class counts per client (rows: clients, columns: classes)."""
    # Figure + Agg canvas directly, not pyplot: no global backend switch and no figure leaks.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != len(class_names):
        raise ValueError(f"counts shape {counts.shape} does not match {len(class_names)} class names")
    path = Path(path)
    total = counts.shape[0]
    shown = counts[:max_clients]
    title = "Class counts per client"
    if total > max_clients:
        title += f" (showing first {max_clients} of {total} clients)"

    fig = Figure(figsize=(max(6.0, 0.5 * len(class_names) + 2), min(12.0, 3 + 0.05 * len(shown))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(shown, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="samples")
    fig.tight_layout()

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def save_shards(shards: list[np.ndarray], path: Path, meta: dict) -> None:
    """Atomically write one .npz: `indices` (concatenated), `offsets` [num_clients+1], `meta` (JSON)."""
    path = Path(path)
    meta_json = json.dumps(meta)  # fail on unserialisable meta before touching the disk
    sizes = np.array([len(s) for s in shards], dtype=np.int64)
    offsets = np.concatenate([np.zeros(1, np.int64), np.cumsum(sizes)])
    indices = np.concatenate([np.asarray(s, dtype=np.int64) for s in shards]) if shards else np.zeros(0, np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        # A file object stops numpy from appending ".npz" to the temp name.
        np.savez(fh, indices=indices, offsets=offsets, meta=np.array(meta_json))


def load_shards(path: Path) -> tuple[list[np.ndarray], dict]:
    """Read shards saved by save_shards; PartitionError (naming the file) if missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise PartitionError(f"shard file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            indices = np.asarray(data["indices"])
            offsets = np.asarray(data["offsets"])
            meta = json.loads(str(data["meta"]))
    # Truncated zip, damaged member, plain .npy (no keys / context manager), bad JSON: all "corrupt".
    except (OSError, ValueError, KeyError, EOFError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise PartitionError(f"corrupt shard file {path}: {reason}") from None
    ok = (
        indices.ndim == 1
        and offsets.ndim == 1
        and np.issubdtype(indices.dtype, np.integer)
        and np.issubdtype(offsets.dtype, np.integer)
        and len(offsets) >= 1
        and offsets[0] == 0
        and offsets[-1] == len(indices)
        and bool(np.all(np.diff(offsets) >= 0))
        and isinstance(meta, dict)
    )
    if not ok:
        raise PartitionError(f"corrupt shard file {path}: inconsistent indices/offsets/meta")
    indices = indices.astype(np.int64, copy=False)
    # np.split of an empty offsets list would yield one empty shard instead of none.
    shards = [s.copy() for s in np.split(indices, offsets[1:-1])] if len(offsets) > 1 else []
    return shards, meta
