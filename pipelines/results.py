"""`mocosfl results`: a named suite of runs (MocoSFL, baselines, ablations) at one budget, as one table.

Suites are the Python table ``SUITES`` below. Each row is a method plus config overrides on top of the
chosen profile, so every row sees the same number of images (the profile's steps x batch B). A finished
row is cached as ``<runs_dir>/results/<row-hash>.json``, keyed by its method, resolved config and data,
and not run again; pretrain runs resume from their checkpoints as ``mocosfl pretrain`` does. Each row is
an MLflow run nested under one parent run per invocation. Output in ``report.out_dir``:
``results-<profile>.{md,csv}`` for the profile's default suite (``main``; ``paper`` on the paper profile)
and ``results-<profile>-<suite>.{md,csv}`` for any other, so a smoke run never overwrites the committed
cpu table; plus ``…-probe.png`` and ``…-knn.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocosfl import workflow
from mocosfl.config import Config, ConfigError, config_hash
from mocosfl.costs import flmoco_client_flops, mocosfl_client_flops
from mocosfl.eval.knn import extract_features
from mocosfl.eval.linear import linear_probe
from mocosfl.models.resnet import Encoder, build_split_model, count_params, feature_dim
from mocosfl.sfl.trainer import Plan, resolve_device, resolve_plan
from pipelines import tracking

NEVER = "never"  # sfl.sync_period of a row that never syncs: one round for the whole run
ROW_SECTIONS = ("seed", "data", "partition", "model", "sfl", "moco", "pretrain", "evaluate")
# "MocoSFL matches centralized MoCo" when its linear probe is at most this many points below.
MATCH_POINTS = 2.0


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


MOCOSFL = Row("MocoSFL", "mocosfl", "method", curve=True)
MAIN = [
    MOCOSFL,
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

COLUMNS = [
    "method",
    "N",
    "clients/round x batch",
    "partition",
    "cut",
    "sync period",
    "queue",
    "steps",
    "images seen",
    "kNN top-1",
    "linear-probe top-1",
    "client params",
    "MB per client",
    "client MFLOPs per image",
    "wall (min)",
]


# ----------------------------------------------------------------------------- resolving rows


@dataclass
class Resolved:
    """A row made concrete: its config, plan (None for random init) and cache key."""

    row: Row
    cfg: Config
    plan: Plan | None
    key: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _results_dir(cfg: Config) -> Path:
    return Path(cfg.pretrain.runs_dir) / "results"


def _ensure_partition(cfg: Config) -> list[np.ndarray]:
    workflow.prepare(cfg)
    if not workflow.shards_path(cfg).exists():
        workflow.partition(cfg)
    return workflow.load_partition(cfg, workflow.Dataset(cfg))


def resolve(base: Config, row: Row, suite: str) -> Resolved:
    """Apply a row's overrides, partition its data if needed and fix its plan.

    A sync period at or beyond the run's last step is one round for the whole run, so it is set to the
    step count: "never", 500 and 50 at 8 steps are then the same run and computed once.
    """
    over = {k: v for k, v in row.overrides.items() if v != NEVER}
    over["metrics_dir"] = str(_results_dir(base) / suite / _slug(row.label))
    if row.method == "random":
        over["evaluate.encoder"] = "random"
    cfg = base.replace(**over)
    if row.method == "random":
        workflow.prepare(cfg)
        ds = workflow.Dataset(cfg)
        return Resolved(row, cfg, None, _key(cfg, row.method, ds.fingerprint()))
    shards = _ensure_partition(cfg)
    plan = resolve_plan(cfg, np.array([len(s) for s in shards]))
    if row.fl_clients is not None:
        if plan.batch_size % row.fl_clients:
            raise ConfigError(
                f"row '{row.label}': batch B={plan.batch_size} is not divisible by "
                f"{row.fl_clients} FL-MoCo clients per round"
            )
        cfg = cfg.replace(
            **{"sfl.clients_per_round": row.fl_clients, "sfl.client_batch_size": plan.batch_size // row.fl_clients}
        )
    never = row.overrides.get("sfl.sync_period") == NEVER
    cfg = cfg.replace(**{"sfl.sync_period": plan.total_steps if never else min(cfg.sfl.sync_period, plan.total_steps)})
    plan = resolve_plan(cfg, np.array([len(s) for s in shards]))
    ds = workflow.Dataset(cfg)
    return Resolved(row, cfg, plan, _key(cfg, row.method, workflow.data_hash(ds, workflow.shards_path(cfg))))


def _key(cfg: Config, method: str, data: str) -> str:
    return config_hash(cfg, ROW_SECTIONS, f"{method}:{data}")


# ----------------------------------------------------------------------------- running one row


def _queue_text(r: Resolved) -> str:
    cfg, plan = r.cfg, r.plan
    if plan is None:
        return ""
    k = cfg.moco.queue_size
    if r.row.method == "flmoco":
        return f"{max(1, k // plan.clients_per_round)} per client (local)"
    if r.row.method == "mocosfl" and not cfg.moco.feature_sharing:
        return f"{max(1, k // plan.clients_per_round)} per client"
    return f"{k} shared" if r.row.method == "mocosfl" else str(k)


def client_cost(r: Resolved) -> tuple[int | None, float | None]:
    """(client parameters, client FLOPs per image) of a row's method; None where there are no clients."""
    cfg, plan = r.cfg, r.plan
    if plan is None or r.row.method == "central":
        return None, None
    m = cfg.model
    if r.row.method == "mocosfl":
        client, _ = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
        return count_params(client), mocosfl_client_flops(cfg, plan.client_batch_size)
    client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
    local_queue = max(1, cfg.moco.queue_size // plan.clients_per_round)
    return (count_params(client) + count_params(server), flmoco_client_flops(cfg, plan.client_batch_size, local_queue))


def run_row(
    r: Resolved,
    log: Callable[[str], None],
    on_row: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Pretrain (unless random init) and evaluate one row; returns its table entry."""
    cfg, row, plan = r.cfg, r.row, r.plan
    pre: dict[str, Any] = {}
    if row.method != "random":
        assert plan is not None

        def on_step(step_row: dict[str, float]) -> None:
            if "knn_top1" in step_row:
                log(
                    f"  step {int(step_row['step'])}/{plan.total_steps}: loss {step_row['loss_mean']:.3f}, "
                    f"kNN {step_row['knn_top1']:.1f}%"
                )
            if on_row and "epoch" in step_row:
                on_row(step_row)

        pre = workflow.pretrain(cfg, on_step=on_step, method=row.method)
    ev = workflow.evaluate(cfg, log=lambda s: log("  " + s), method="mocosfl" if row.method == "random" else row.method)
    params, flops = client_cost(r)
    train_s = float(pre.get("train_seconds", 0.0)) + float(pre.get("knn_seconds", 0.0))
    return {
        "label": row.label,
        "group": row.group,
        "method": row.method,
        "key": r.key,
        "num_clients": plan.num_clients if plan and row.method != "central" else None,
        "partition": cfg.partition.method if plan and row.method != "central" else None,
        "cut_layers": cfg.model.cut_layers if row.method == "mocosfl" else None,
        "sync_period": plan.sync_period if plan and row.method in ("mocosfl", "flmoco") else None,
        "never_sync": bool(plan and plan.sync_period >= plan.total_steps),
        "clients_per_round": plan.clients_per_round if plan else None,
        "client_batch_size": plan.client_batch_size if plan else None,
        "batch_size": plan.batch_size if plan else None,
        "queue": _queue_text(r),
        "width": cfg.model.width,
        "steps": int(pre.get("steps", 0)),
        "images_seen": int(pre.get("images_seen", 0)),
        "knn_top1": ev["knn_top1"],
        "linear_probe_top1": ev["linear_probe_top1"],
        "linear_probe_top1_final_epoch": ev["linear_probe_top1_final_epoch"],
        "client_params": params,
        "bytes_per_client": pre.get("bytes_per_client"),
        "client_flops_per_image": flops,
        "train_seconds": train_s,
        "eval_seconds": float(ev["seconds"]),
        "wall_seconds": train_s + float(ev["seconds"]),
        "knn_history": [
            {"step": h["step"], "knn_top1": h["knn_top1"]} for h in pre.get("history", []) if "knn_top1" in h
        ],
        "run_dir": pre.get("run_dir"),
    }


# ----------------------------------------------------------------------------- time estimate


def _seconds_per_step(r: Resolved, ds: workflow.Dataset) -> float:
    """A quick probe: one warm-up step, then the mean of two timed steps of a fresh trainer."""
    assert r.plan is not None
    p = ds.prepared
    shards = workflow.load_partition(r.cfg, ds)
    trainer = workflow.make_trainer(
        r.row.method, r.cfg, ds.train_x(), shards, p.mean, p.std, None, resolve_device(r.cfg.device)
    )
    trainer.advance()
    t0 = time.perf_counter()
    for _ in range(2):
        trainer.advance()
    return (time.perf_counter() - t0) / 2


def _seconds_per_image(cfg: Config, ds: workflow.Dataset) -> float:
    """Feature extraction time per image of a fresh encoder of this width and cut."""
    m = cfg.model
    client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
    enc = Encoder(client, server.backbone).eval()
    images = ds.train_x()[: cfg.evaluate.batch_size]
    kw: dict[str, Any] = dict(
        mean=ds.prepared.mean, std=ds.prepared.std, image_size=cfg.data.image_size, batch_size=cfg.evaluate.batch_size
    )
    extract_features(enc, images, **kw)
    t0 = time.perf_counter()
    extract_features(enc, images, **kw)
    return (time.perf_counter() - t0) / len(images)


def _probe_seconds(cfg: Config, n_train: int, n_test: int, num_classes: int) -> float:
    """Linear-probe time: one epoch on random features of the right shape, times the epoch count."""
    e, dim = cfg.evaluate, feature_dim(cfg.model.width)
    t0 = time.perf_counter()
    linear_probe(
        torch.randn(n_train, dim),
        torch.randint(0, num_classes, (n_train,)),
        torch.randn(n_test, dim),
        torch.randint(0, num_classes, (n_test,)),
        num_classes,
        1,
        e.linear_lr,
        e.linear_batch_size,
        e.val_fraction,
        cfg.seed,
    )
    return (time.perf_counter() - t0) * e.linear_epochs


def estimate(todo: list[Resolved], log: Callable[[str], None]) -> float:
    """Estimated seconds for the rows still to run, from a few timed steps of each; logged per row."""
    total = 0.0
    for r in todo:
        cfg = r.cfg
        ds = workflow.Dataset(cfg)
        per_image = _seconds_per_image(cfg, ds)
        n_train, n_test = len(ds.train_idx), len(ds.test_idx)
        seconds = per_image * (n_train + n_test) + _probe_seconds(cfg, n_train, n_test, ds.num_classes)
        text = "evaluation only"
        if r.plan is not None:
            pc, steps = cfg.pretrain, r.plan.total_steps
            step_s = _seconds_per_step(r, ds)
            monitors = steps // pc.knn_every + (1 if steps % pc.knn_every else 0)
            monitor_images = min(pc.knn_bank_size, n_train) + min(pc.knn_test_size, n_test)
            seconds += step_s * steps + monitors * monitor_images * per_image
            text = f"{step_s:.2f} s/step x {steps} steps + {monitors} kNN monitors + evaluation"
        log(f"  {r.row.label}: ~{seconds / 60:.1f} min ({text})")
        total += seconds
    return total


# ----------------------------------------------------------------------------- outputs


def default_suite(profile: str) -> str:
    """The suite a profile runs when none is named: ``paper`` for the paper profile, ``main`` otherwise."""
    return "paper" if profile == "paper" else "main"


def output_stem(cfg: Config, suite: str) -> str:
    """``results-<profile>`` for the profile's default suite, ``results-<profile>-<suite>`` for any other.

    So the committed cpu table is ``results-cpu`` and a smoke run (``results-smoke``) never overwrites it.
    """
    name = f"results-{cfg.profile}"
    return name if suite == default_suite(cfg.profile) else f"{name}-{suite}"


def _f(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _participation(e: dict[str, Any]) -> str:
    if e["method"] == "central":
        return f"B={e['batch_size']}"
    if e["clients_per_round"] is None:
        return "—"
    return f"{e['clients_per_round']} x {e['client_batch_size']}"


def table_cells(e: dict[str, Any]) -> list[str]:
    sync = e["sync_period"]
    sync_text = "—" if sync is None else (f"{sync} (never)" if e["never_sync"] else str(sync))
    return [
        e["label"],
        _f(e["num_clients"], "d"),
        _participation(e),
        e["partition"] or "—",
        _f(e["cut_layers"], "d"),
        sync_text,
        e["queue"] or "—",
        str(e["steps"]),
        f"{e['images_seen']:,}",
        _f(e["knn_top1"], ".2f"),
        _f(e["linear_probe_top1"], ".2f"),
        _f(e["client_params"], ",d"),
        _f(None if e["bytes_per_client"] is None else e["bytes_per_client"] / 1e6, ".2f"),
        _f(None if e["client_flops_per_image"] is None else e["client_flops_per_image"] / 1e6, ".2f"),
        f"{e['wall_seconds'] / 60:.1f}",
    ]


def csv_text(entries: list[dict[str, Any]]) -> str:
    keys = [
        "label",
        "group",
        "method",
        "num_clients",
        "partition",
        "cut_layers",
        "sync_period",
        "never_sync",
        "clients_per_round",
        "client_batch_size",
        "batch_size",
        "queue",
        "width",
        "steps",
        "images_seen",
        "knn_top1",
        "linear_probe_top1",
        "linear_probe_top1_final_epoch",
        "client_params",
        "bytes_per_client",
        "client_flops_per_image",
        "train_seconds",
        "eval_seconds",
        "wall_seconds",
        "key",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        writer.writerow({k: "" if e.get(k) is None else e[k] for k in keys})
    return buf.getvalue()


def claims(entries: list[dict[str, Any]]) -> list[str]:
    """The paper's qualitative claims checked on this table's linear-probe numbers (skipped if a row is missing)."""
    by = {e["label"]: e for e in entries}

    def acc(label: str) -> float | None:
        return by[label]["linear_probe_top1"] if label in by else None

    def verdict(ok: bool) -> str:
        return "**supported**" if ok else "**not supported**"

    out = []
    sfl, central, fl, rnd = acc("MocoSFL"), acc("centralized MoCo"), acc("FL-MoCo"), acc("random init")
    if sfl is not None and central is not None:
        out.append(
            f"MocoSFL matches centralized MoCo at equal budget (within {MATCH_POINTS:g} points): "
            f"{verdict(sfl >= central - MATCH_POINTS)} — {sfl:.2f} vs {central:.2f} "
            f"({sfl - central:+.2f})."
        )
    off = acc("MocoSFL, no feature sharing")
    if sfl is not None and off is not None:
        out.append(
            f"Feature sharing (one shared queue) helps on this partition: {verdict(sfl > off)} — "
            f"{sfl:.2f} with vs {off:.2f} without ({sfl - off:+.2f})."
        )
    frequent = [a for a in (acc("MocoSFL, sync every step"), acc("MocoSFL, sync every 50")) if a is not None]
    never = acc("MocoSFL, never sync")
    if frequent and never is not None:
        out.append(
            f"Frequent synchronization beats never syncing: {verdict(max(frequent) > never)} — best of "
            f"sync 1/50 {max(frequent):.2f} vs never {never:.2f} ({max(frequent) - never:+.2f})."
        )
    if sfl is not None and fl is not None:
        out.append(
            f"MocoSFL beats FL-MoCo at the same images seen: {verdict(sfl > fl)} — {sfl:.2f} vs "
            f"{fl:.2f} ({sfl - fl:+.2f})."
        )
    if sfl is not None and rnd is not None:
        out.append(f"Pretraining beats the random-init floor: {verdict(sfl > rnd)} — {sfl:.2f} vs {rnd:.2f}.")
    if "MocoSFL" in by and "FL-MoCo" in by:
        a, b = by["MocoSFL"], by["FL-MoCo"]
        if a["client_flops_per_image"] and b["client_flops_per_image"]:
            out.append(
                f"Client compute: {a['client_flops_per_image'] / 1e6:.2f} MFLOPs per image for MocoSFL "
                f"vs {b['client_flops_per_image'] / 1e6:.1f} for FL-MoCo "
                f"({b['client_flops_per_image'] / a['client_flops_per_image']:.0f}x less)."
            )
        if a["bytes_per_client"] and b["bytes_per_client"]:
            out.append(
                f"Communication per client over training: {a['bytes_per_client'] / 1e6:.2f} MB for "
                f"MocoSFL vs {b['bytes_per_client'] / 1e6:.2f} MB for FL-MoCo."
            )
    return out


def markdown(
    cfg: Config, suite: str, entries: list[dict[str, Any]], stem: str, suite_seconds: float, plots: list[str]
) -> str:
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    trained = [e for e in entries if e["steps"]]
    budget = (
        f"{trained[0]['steps']} steps x B={trained[0]['batch_size']} = {trained[0]['images_seen']:,} images per method"
        if trained
        else "no trained rows"
    )
    e = cfg.evaluate
    lines = [
        f"# Results: suite `{suite}`, profile `{cfg.profile}`",
        "",
        f"- Date: {date}; machine: {machine}; git {tracking.git_commit(Path(cfg.tracking.db).resolve().parent)[:10]}.",
        f"- Budget: {budget}; ResNet-18 width {cfg.model.width}; seed {cfg.seed}; one run per row (no error bars).",
        f"- Evaluation: kNN (k={e.knn_k}) on the full train/test split, linear probe {e.linear_epochs} epochs "
        "(epoch chosen on a validation split of train).",
        f"- Wall time: {sum({x['key']: x['wall_seconds'] for x in entries}.values()) / 60:.1f} min of training and "
        f"evaluation over the distinct runs (each row's own in the table); this invocation took "
        f"{suite_seconds / 60:.1f} min (finished rows are read from the cache).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(table_cells(x)) + " |" for x in entries]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    found = claims(entries)
    if found:
        lines += ["", "## The paper's qualitative claims at this budget", ""] + [f"- {c}" for c in found]
    lines += [
        "",
        "## Notes",
        "",
        "- MB per client: bytes up + down of all training divided by N (non-participants count as zero): "
        "MocoSFL sends h_q and h_k up and receives dloss/dh_q per image, plus client model and target "
        "down at each round's start and up at its end; FL-MoCo moves the full model and target both ways "
        "each round. Counted from the tensors the trainers exchange.",
        "- Client FLOPs per image: FlopCounterMode on one client step (2 FLOPs per multiply-accumulate of "
        "convolutions and matrix products; norms and elementwise ops not counted). MocoSFL: online + target "
        "forward and online backward of the client model; FL-MoCo: the whole symmetric MoCo step.",
        '- A sync period at or beyond the step count is one round for the whole run ("never"); with '
        "client sampling that also means the same participants throughout.",
    ]
    if any(x["method"] == "flmoco" for x in entries):
        lines.append(
            "- FL-MoCo: full encoder + head per client, local queue of K/M keys and local EMA target for "
            "the round (fresh when a client is sampled), FedAvg of model and target every sync period; "
            "clients per round x batch as in the table, so the same images per step as MocoSFL."
        )
    lines.append(f"- Files: {stem}.md, {stem}.csv" + "".join(f", {p}" for p in plots) + ".")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_results(entries: list[dict[str, Any]], out_dir: Path, stem: str) -> list[str]:
    """Bar chart of linear-probe top-1 per row and kNN monitor vs step of the curve rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    fig = Figure(figsize=(7, 0.45 * len(entries) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [e["label"] for e in entries][::-1]
    values = [e["linear_probe_top1"] for e in entries][::-1]
    ax.barh(labels, values, color=["#888" if "random" in lab else "#3a7" for lab in labels])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
    ax.set_xlabel("linear-probe top-1 (%)")
    ax.set_xlim(0, max(values + [1.0]) * 1.15)
    ax.set_title("Linear probe per method")
    fig.tight_layout()
    name = f"{stem}-probe.png"
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out_dir / name)
    written.append(name)

    curves = [e for e in entries if e.get("curve") and e["knn_history"]]
    if curves:
        fig = Figure(figsize=(6, 3.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for e in curves:
            h = e["knn_history"]
            ax.plot([r["step"] for r in h], [r["knn_top1"] for r in h], marker="o", markersize=3, label=e["label"])
        ax.set_xlabel("step")
        ax.set_ylabel("kNN monitor top-1 (%)")
        ax.set_title("kNN monitor during training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"{stem}-knn.png"
        tmp = out_dir / f".{name}.tmp-{os.getpid()}"
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, out_dir / name)
        written.append(name)
    return written


# ----------------------------------------------------------------------------- the suite


def _log_row_mlflow(
    r: Resolved, entry: dict[str, Any], history: list[dict[str, float]], cached: bool, suite: str
) -> None:
    import mlflow

    tags = {
        "stage": "results-row",
        "suite": suite,
        "method": r.row.method,
        "row_key": r.key,
        "cached": str(cached).lower(),
        "group": r.row.group,
    }
    with tracking.mlflow_run(r.cfg, r.row.label, nested=True, tags=tags):
        mlflow.log_param("method", r.row.method)
        for h in history or entry["knn_history"]:
            tracking.log_row(h)
        numbers = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numbers)


def run_suite(cfg: Config, suite: str = "main", log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or reuse) every row of ``suite`` on ``cfg``'s profile; write the table, CSV and plots."""
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}' (known: {', '.join(SUITES)})")
    t_suite = time.perf_counter()
    cache = _results_dir(cfg)
    resolved = [resolve(cfg, row, suite) for row in SUITES[suite]]
    unique: dict[str, Resolved] = {}
    for r in resolved:
        unique.setdefault(r.key, r)
    todo = [r for r in unique.values() if not (cache / f"{r.key}.json").exists()]
    log(
        f"suite '{suite}', profile '{cfg.profile}': {len(resolved)} rows, {len(unique)} distinct runs, "
        f"{len(unique) - len(todo)} already finished"
    )
    if todo:
        seconds = estimate(todo, log)
        log(f"estimated time for {len(todo)} runs: ~{seconds / 60:.0f} min")

    track = tracking.enabled(cfg)
    entries: list[dict[str, Any]] = []
    with _parent_run(cfg, suite, track) as parent:
        done: dict[str, dict[str, Any]] = {}
        for i, r in enumerate(resolved, 1):
            path = cache / f"{r.key}.json"
            cached = r.key in done or path.exists()
            history: list[dict[str, float]] = []
            if r.key in done:
                entry = dict(done[r.key])
            elif path.exists():
                entry = json.loads(path.read_text())
            else:
                log(f"[{i}/{len(resolved)}] {r.row.label} ({r.row.method})")
                entry = run_row(r, log, on_row=history.append)
                workflow.write_json(path, entry)
            done[r.key] = entry
            entry = {**entry, "label": r.row.label, "group": r.row.group, "curve": r.row.curve}
            if cached:
                log(f"[{i}/{len(resolved)}] {r.row.label}: already finished (row {r.key})")
            if track:
                _log_row_mlflow(r, entry, history, cached, suite)
            entries.append(entry)

        out_dir = Path(cfg.report.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(cfg, suite)
        plots = plot_results(entries, out_dir, stem)
        suite_seconds = time.perf_counter() - t_suite
        md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        _write(md, markdown(cfg, suite, entries, stem, suite_seconds, plots))
        _write(csv_path, csv_text(entries))
        if track:
            import mlflow

            for p in [md, csv_path] + [out_dir / p for p in plots]:
                mlflow.log_artifact(str(p), artifact_path="results")
            mlflow.log_metric("suite_wall_seconds", suite_seconds)
    log(f"wrote {md} and {csv_path} in {suite_seconds / 60:.1f} min")
    return {
        "mlflow_run_id": parent.info.run_id if track else None,
        "suite": suite,
        "profile": cfg.profile,
        "markdown": str(md),
        "csv": str(csv_path),
        "plots": [str(out_dir / p) for p in plots],
        "rows": len(entries),
        "ran": len(todo),
        "wall_seconds": suite_seconds,
        "linear_probe_top1": {e["label"]: e["linear_probe_top1"] for e in entries},
    }


def _parent_run(cfg: Config, suite: str, track: bool) -> Any:
    if not track:
        return contextlib.nullcontext()
    return tracking.mlflow_run(cfg, f"results-{suite}", tags={"stage": "results", "suite": suite})
