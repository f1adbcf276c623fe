"""`mocosfl results`: a named suite of runs (MocoSFL, baselines, ablations) at one budget, as one table.

Suites are the Python tables in ``mocosfl/experiments/suites.py``; what a row means (its config, plan,
run and costs) is ``mocosfl.experiments.rows``. This module is the edge around them: the loop with its
cache, the markdown/CSV/plots and MLflow. Each row is a method plus config overrides on top of the
chosen profile, so every row sees the same number of images (the profile's steps x batch B). A finished
row is cached as ``<runs_dir>/results/<row-key>.json``, keyed by its method, resolved config, data and
training-code hash, and not run again; pretrain runs resume from their checkpoints as ``mocosfl pretrain``
does. Each row is an MLflow run nested under one parent run per invocation. Output in ``report.out_dir``:
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
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mocosfl.config import Config, ConfigError
from mocosfl.experiments import rows
from mocosfl.experiments.rows import default_suite
from mocosfl.experiments.suites import SUITES
from mocosfl.io import atomic_path, write_json, write_text
from pipelines import tracking

# "MocoSFL matches centralized MoCo" when its linear probe is at most this many points below.
MATCH_POINTS = 2.0

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


# ----------------------------------------------------------------------------- outputs


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
    with atomic_path(out_dir / name, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
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
        with atomic_path(out_dir / name, suffix=".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        written.append(name)
    return written


# ----------------------------------------------------------------------------- the suite


def _log_row_mlflow(
    r: rows.Resolved, entry: dict[str, Any], history: list[dict[str, float]], cached: bool, suite: str
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
    if "code_hash" in entry:
        tags["code_hash"] = entry["code_hash"]
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
    cache = rows.results_dir(cfg)
    resolved = [rows.resolve(cfg, row, suite) for row in SUITES[suite]]
    unique: dict[str, rows.Resolved] = {}
    for r in resolved:
        unique.setdefault(r.key, r)
    todo = [r for r in unique.values() if not (cache / f"{r.key}.json").exists()]
    log(
        f"suite '{suite}', profile '{cfg.profile}': {len(resolved)} rows, {len(unique)} distinct runs, "
        f"{len(unique) - len(todo)} already finished"
    )
    if todo:
        seconds = rows.estimate(todo, log)
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
                entry = rows.run_row(r, log, on_row=history.append)
                write_json(path, entry)
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
        write_text(md, markdown(cfg, suite, entries, stem, suite_seconds, plots))
        write_text(csv_path, csv_text(entries))
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
