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
    attack: bool = False  # also run the model-inversion attack on its client model (the privacy suite)
    # More overrides on the named profiles only (applied before ``overrides``), e.g. a budget for the cpu profile.
    profile_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)


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
    # FL-MoCo with MocoSFL's own participants and client batch (M=100, b=1 at N=1000): ~4x MocoSFL's run time.
    # Three seeds: the paper's vector-concatenation claim (batch 1) rests on it.
    Row("FL-MoCo, MocoSFL's clients and batch", "flmoco", "method", seeds=HEADLINE_SEEDS),
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
# The accuracy / privacy / client-cost trade-off of the cut (README "Privacy"). On the cpu profile a row takes
# minutes on 2 cores: it trains on data.train_limit's 40,000 training images (35,000 after validation), so the
# 10,000 left out are the TAResSFL expert's own images, and the attack is res_normN1C16 for 15 epochs. On a
# profile that uses every training image (paper) the TAResSFL rows need taressfl.aux_source.
PRIVACY_STEPS = 300
PRIVACY_CPU: dict[str, Any] = {
    "data.train_limit": 40000,
    "pretrain.steps": PRIVACY_STEPS,
    "taressfl.steps": PRIVACY_STEPS,
    "attack.aux_fraction": 0.015,  # 525 of the 35,000 training images
    "attack.decoder_width": 16,
    "attack.decoder_blocks": 1,
    "attack.epochs": 15,
}
# TAResSFL as the reference's main phase-1 runs (MocoSFL-3, C4S2, alpha 2 vs the alpha 0 control, tau 0.6,
# 1 % of the clients' images), then phase 2 with the clients frozen at the expert.
TARESSFL: dict[str, Any] = {
    "model.cut_layers": 3,
    "model.bottleneck": "C4S2",
    "taressfl.enabled": True,
    "taressfl.target_fraction": 0.01,
}
PRIVACY = [
    Row(
        f"MocoSFL-{cut}{', C4S2' if squeeze != 'none' else ''}",
        "mocosfl",
        "cut layers" if squeeze == "none" else "cut layers, bottleneck C4S2",
        {"model.cut_layers": cut, "model.bottleneck": squeeze},
        attack=True,
        profile_overrides={"cpu": PRIVACY_CPU},
    )
    for squeeze in ("none", "C4S2")
    for cut in (1, 3, 5)
] + [
    Row(
        f"TAResSFL-3, C4S2, alpha {alpha:g}",
        "mocosfl",
        "TAResSFL",
        {**TARESSFL, "taressfl.alpha": alpha},
        attack=True,
        profile_overrides={"cpu": PRIVACY_CPU},
    )
    for alpha in (2.0, 0.0)
]
# Two rows in minutes: for trying a set-up (a profile, a work pool: `mocosfl results --suite check --executor pool`).
CHECK = [Row("MocoSFL", "mocosfl", "method", curve=True), Row("random init", "random", "method")]
SUITES: dict[str, list[Row]] = {
    "main": MAIN,
    "full": FULL,
    "long": LONG,
    "paper": PAPER,
    "privacy": PRIVACY,
    "check": CHECK,
}
