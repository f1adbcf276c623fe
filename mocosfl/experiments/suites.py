"""The experiment suites of ``mocosfl results``: data only, each row a method plus config overrides.

Left out of the training-code hash (``mocosfl.identity.NOT_TRAINING_CODE``): a row's overrides reach
its results-cache key through its resolved config, so editing a table never re-runs the other rows.
Keep logic out of this file; the rules that make a row a run are in ``mocosfl.experiments.rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEVER = "never"  # sfl.sync_period of a row that never syncs: one round for the whole run


@dataclass(frozen=True)
class Row:
    """One run of a suite: ``method`` with ``overrides`` (dotted keys, as ``--set``) on the profile."""

    label: str
    method: str  # mocosfl | central | flmoco | random
    group: str  # the comparison it belongs to
    overrides: dict[str, Any] = field(default_factory=dict)
    # FL-MoCo: this many participants per round, each with batch B / fl_clients (B of the profile's plan).
    fl_clients: int | None = None
    curve: bool = False  # drawn in the kNN-vs-step plot


MAIN = [
    Row("MocoSFL", "mocosfl", "method", curve=True),
    Row("centralized MoCo", "central", "method", curve=True),
    Row("FL-MoCo", "flmoco", "method", fl_clients=10, curve=True),
    Row("random init", "random", "method"),
    Row("MocoSFL, no feature sharing", "mocosfl", "feature sharing", {"moco.feature_sharing": False}, curve=True),
    Row("MocoSFL, sync every step", "mocosfl", "sync period", {"sfl.sync_period": 1}),
    Row("MocoSFL, sync every 50", "mocosfl", "sync period", {"sfl.sync_period": 50}),
    Row("MocoSFL, sync every 500", "mocosfl", "sync period", {"sfl.sync_period": 500}),
    Row("MocoSFL, never sync", "mocosfl", "sync period", {"sfl.sync_period": NEVER}),
]
FULL = MAIN + [
    Row("MocoSFL-3", "mocosfl", "cut layers", {"model.cut_layers": 3}),
    Row("MocoSFL-5", "mocosfl", "cut layers", {"model.cut_layers": 5}),
    Row("MocoSFL, IID", "mocosfl", "partition", {"partition.method": "iid"}),
    Row("MocoSFL, N=100", "mocosfl", "clients", {"partition.num_clients": 100}),
    Row("MocoSFL, N=1000", "mocosfl", "clients", {"partition.num_clients": 1000}),
    # FL-MoCo with MocoSFL's own participants and client batch (M=100, b=1 at N=1000): ~10x the step time.
    Row("FL-MoCo, MocoSFL's clients and batch", "flmoco", "method"),
]
# The paper's Table 3 (linear probe, ResNet-18, non-IID = 2 classes per client), for a GPU: --profile paper.
PAPER = [
    Row(
        f"MocoSFL-{cut}, {'IID' if part == 'iid' else 'non-IID'}, N={n}",
        "mocosfl",
        f"table 3, N={n}",
        {"model.cut_layers": cut, "partition.method": part, "partition.num_clients": n},
    )
    for n in (100, 200, 1000)
    for cut, part in ((1, "iid"), (1, "noniid-shards"), (3, "noniid-shards"))
] + [Row("centralized MoCo", "central", "reference"), Row("random init", "random", "reference")]
SUITES: dict[str, list[Row]] = {"main": MAIN, "full": FULL, "paper": PAPER}
