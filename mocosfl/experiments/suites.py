"""The experiment suites of ``mocosfl results``: data only, each row a method plus config overrides.

Left out of the training-code hash (``mocosfl.identity.NOT_TRAINING_CODE``): a row's overrides reach
its results-cache key through its resolved config, so editing a table never re-runs the other rows.
Keep logic out of this file; the rules that make a row a run are in ``mocosfl.experiments.rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NEVER = "never"  # sfl.sync_period of a row that never syncs: each client keeps its own model


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
    # Runs of the row at seeds seed, seed+1, ...; the table shows mean ± std over them.
    seeds: int = 1


HEADLINE_SEEDS = 3  # the rows the paper's claims rest on; ablation rows run one seed (marked in the table)
# Quick-check profiles run every row at one seed unless `mocosfl results --seeds N` says otherwise.
ONE_SEED_PROFILES = ("test", "smoke")

MAIN = [
    Row("MocoSFL", "mocosfl", "method", curve=True, seeds=HEADLINE_SEEDS),
    Row("centralized MoCo", "central", "method", curve=True, seeds=HEADLINE_SEEDS),
    Row("FL-MoCo", "flmoco", "method", fl_clients=10, curve=True, seeds=HEADLINE_SEEDS),
    Row("random init", "random", "method", seeds=HEADLINE_SEEDS),
    Row(
        "MocoSFL, no feature sharing",
        "mocosfl",
        "feature sharing",
        {"moco.feature_sharing": False},
        curve=True,
        seeds=HEADLINE_SEEDS,
    ),
    # FL-MoCo with MocoSFL's own participants and client batch (M=100, b=1 at N=1000): ~10x the step time.
    Row("FL-MoCo, MocoSFL's clients and batch", "flmoco", "method"),
    # Sync ablation on one sampling schedule (re-sampled every pass over a shard, as every row).
    Row("MocoSFL, sync every step", "mocosfl", "sync period", {"sfl.sync_period": 1}),
    Row("MocoSFL, sync every 10", "mocosfl", "sync period", {"sfl.sync_period": 10}),
    Row("MocoSFL, sync every 50", "mocosfl", "sync period", {"sfl.sync_period": 50}),
    Row("MocoSFL, never sync", "mocosfl", "sync period", {"sfl.sync_period": NEVER}),
    Row("MocoSFL, stateful client momentum", "mocosfl", "client state", {"sfl.stateful_clients": True}),
    Row("MocoSFL, IID", "mocosfl", "partition", {"partition.method": "iid"}, seeds=HEADLINE_SEEDS),
]
FULL = MAIN + [
    Row("MocoSFL-3", "mocosfl", "cut layers", {"model.cut_layers": 3}),
    Row("MocoSFL-5", "mocosfl", "cut layers", {"model.cut_layers": 5}),
    Row("MocoSFL, N=100", "mocosfl", "clients", {"partition.num_clients": 100}),
    Row("MocoSFL, N=1000", "mocosfl", "clients", {"partition.num_clients": 1000}),
]
# Does the gap to centralized close with training? >= 5 epochs of B = 100 (2,500 steps on the cpu profile).
LONG_STEPS = 2500
LONG = [
    Row("MocoSFL", "mocosfl", "method", {"pretrain.steps": LONG_STEPS}, curve=True),
    Row("centralized MoCo", "central", "method", {"pretrain.steps": LONG_STEPS}, curve=True),
    Row("FL-MoCo", "flmoco", "method", {"pretrain.steps": LONG_STEPS}, fl_clients=10, curve=True),
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
SUITES: dict[str, list[Row]] = {"main": MAIN, "full": FULL, "long": LONG, "paper": PAPER}
