"""`mocosfl results`: a named suite of runs (MocoSFL, baselines, ablations) at one budget, as one table.

Suites are the Python tables in ``mocosfl/experiments/suites.py``; what a row means (its config, plan,
run and costs) is ``mocosfl.experiments.rows``. This module is the edge around them: the loop with its
cache, the markdown/CSV/plots and MLflow. Each row is a method plus config overrides on top of the
chosen profile, so every row sees the same number of images (the profile's steps x batch B). A row runs
at ``Row.seeds`` seeds (seed, seed+1, ...; one each on the quick-check profiles, or ``--seeds N``), each
its own run: a finished run is cached as ``<runs_dir>/results/<run-key>.json``, keyed by its method,
resolved config (seed included), data and training-code hash, and not run again; pretrain runs resume
from their checkpoints as ``mocosfl pretrain`` does. The table shows mean ± std over a row's seeds; the
CSV has one line per (row, seed) with the row's mean and std repeated on each. Each run is an MLflow run
nested under one parent run per invocation. Output in ``report.out_dir``:
``results-<profile>.{md,csv}`` for the profile's default suite (``main``; ``paper`` on the paper profile)
and ``results-<profile>-<suite>.{md,csv}`` for any other, so a smoke run never overwrites the committed
cpu table; plus ``…-probe.png`` and ``…-knn.png``.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import platform
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from mocosfl import identity
from mocosfl.bench import cpu_line
from mocosfl.config import Config, ConfigError, portable
from mocosfl.experiments import rows
from mocosfl.experiments.rows import default_suite
from mocosfl.experiments.suites import SUITES
from mocosfl.io import atomic_path, write_json, write_text
from mocosfl.precision import resolve_precision
from mocosfl.sfl.trainer import resolve_device
from pipelines import lock, pool, privacy_table, tracking

# "MocoSFL matches centralized MoCo" when its linear probe is at most this many points below.
MATCH_POINTS = 2.0
# Per-seed numbers that the table shows as mean ± std over a row's seeds.
STAT_KEYS = ("knn_top1", "linear_probe_top1")
# Verdicts of a claim (``verdict``).
SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
NOT_RESOLVED = "not resolved at this budget"
ONE_SEED = "not resolved (one seed)"

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
    "distinct clients",
    "distinct images",
    "seeds",
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


def records_path(cfg: Config, suite: str) -> Path:
    """``<out_dir>/<stem>.runs.json``: the finished runs behind a table, one entry per run key.

    Committed beside the cpu tables, so every figure can be traced to its run's record, and a
    regeneration spread over several machines or sessions resumes from the runs already finished
    (the results cache under ``runs_dir`` is local and not versioned).
    """
    return Path(cfg.report.out_dir) / f"{output_stem(cfg, suite)}.runs.json"


def load_records(records: Path) -> dict[str, dict[str, Any]]:
    """A run-record file's ``{run key: entry}`` ({} when there is none); a clear error when it is unreadable."""
    if not records.exists():
        return {}
    try:
        saved = json.loads(records.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{records} is not a readable run-record file ({e}): fix or delete it") from e
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise ConfigError(f"{records} is not a run-record file (an object of run key -> entry): fix or delete it")
    return saved


def restore_records(records: Path, cache: Path, keys: set[str]) -> int:
    """Copy into the results cache each run of ``keys`` that the records file holds and the cache lacks.

    A record is found by its run key, which hashes the resolved config, the data and the training code,
    so a record from other code or another config is never read as this run's; a record whose own key
    differs from the one it is filed under is not read either. Returns how many were copied.
    """
    saved = load_records(records)
    copied = 0
    for key in sorted(keys & set(saved)):
        path = cache / f"{key}.json"
        if not path.exists() and saved[key].get("key") == key:
            write_json(path, saved[key])
            copied += 1
    return copied


def save_records(records: Path, cache: Path, keys: set[str], final: bool = False) -> None:
    """Write the records file from the results cache's entries of ``keys``.

    While a suite runs (``final=False``) earlier records of the same training code are kept too, so a
    partial regeneration loses nothing; the suite's last write (``final=True``) keeps exactly ``keys``,
    the runs behind the table. Records of other training code are dropped: their keys cannot match again.
    """
    code = identity.code_hash()
    kept = {} if final else {k: v for k, v in load_records(records).items() if v.get("code_hash") == code}
    for key in keys:
        path = cache / f"{key}.json"
        if path.exists():
            kept[key] = json.loads(path.read_text())
    if kept or records.exists():
        write_json(records, kept)


def _f(x: Any, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1) of one row's seeds; the std is None for a single seed."""
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(mean: float | None, std: float | None, fmt: str = ".2f") -> str:
    """``37.73 ± 0.41``; the plain mean for one seed (std unknown), ``—`` without a value."""
    if mean is None:
        return "—"
    return format(mean, fmt) if std is None else f"{mean:{fmt}} ± {std:{fmt}}"


def aggregate(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per label (first-seen order): the first seed's fields, mean ± std of the accuracies.

    ``seeds`` counts the row's runs and ``runs`` keeps them (for the curves); distinct clients/images
    and wall time are means over the seeds that report them.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        groups.setdefault(e["label"], []).append(e)
    table = []
    for runs in groups.values():
        row = {**runs[0], "seeds": len(runs), "runs": runs}
        for k in STAT_KEYS:
            row[k], row[f"{k}_std"] = mean_std([r[k] for r in runs])
        for k in ("distinct_clients", "distinct_images", "wall_seconds"):
            values = [r[k] for r in runs if r.get(k) is not None]  # cached results from before lack the counts
            row[k] = statistics.mean(values) if values else None
        table.append(row)
    return table


def _participation(e: dict[str, Any]) -> str:
    if e["method"] == "central":
        return f"B={e['batch_size']}"
    if e["clients_per_round"] is None:
        return "—"
    return f"{e['clients_per_round']} x {e['client_batch_size']}"


def table_cells(e: dict[str, Any]) -> list[str]:
    """The markdown cells of one aggregated row (``aggregate``), in ``COLUMNS`` order."""
    sync = e["sync_period"]
    if sync is None:
        sync_text = "never" if e["never_sync"] else "—"  # a plan without FedAvg (sync_period None) never syncs
    else:
        sync_text = f"{sync} (never)" if e["never_sync"] else str(sync)
    seeds = e.get("seeds", 1)
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
        _f(e.get("distinct_clients"), ",.0f"),
        _f(e.get("distinct_images"), ",.0f"),
        "1 seed" if seeds == 1 else str(seeds),
        pm(e["knn_top1"], e.get("knn_top1_std")),
        pm(e["linear_probe_top1"], e.get("linear_probe_top1_std")),
        _f(e["client_params"], ",d"),
        _f(None if e["bytes_per_client"] is None else e["bytes_per_client"] / 1e6, ".2f"),
        _f(None if e["client_flops_per_image"] is None else e["client_flops_per_image"] / 1e6, ".2f"),
        _f(None if e["wall_seconds"] is None else e["wall_seconds"] / 60, ".1f"),
    ]


CSV_KEYS = [
    "label",
    "group",
    "method",
    "seed",
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
    "distinct_clients",
    "distinct_images",
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
    # The row's aggregate over its seeds, the same on each of its lines.
    "seeds",
    "knn_top1_mean",
    "knn_top1_std",
    "linear_probe_top1_mean",
    "linear_probe_top1_std",
]


def csv_text(entries: list[dict[str, Any]]) -> str:
    """One line per (row, seed) run, plus its row's mean and std over seeds (blank std for one seed).

    ``pd.read_csv`` gives the runs; ``.drop_duplicates("label")`` the table's rows.
    """
    by_label = {a["label"]: a for a in aggregate(entries)}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        a = by_label[e["label"]]
        stats = {"seeds": a["seeds"]} | {
            f"{k}_{s}": a[k if s == "mean" else f"{k}_std"] for k in STAT_KEYS for s in ("mean", "std")
        }
        line = {**e, **stats}
        writer.writerow({k: "" if line.get(k) is None else line[k] for k in CSV_KEYS})
    return buf.getvalue()


def verdict(mean_a: float, std_a: float | None, mean_b: float, std_b: float | None, margin: float = 0.0) -> str:
    """The claim "a beats b" (``a > b - margin``) at this table's noise.

    Supported only when the difference ``mean_a - mean_b + margin`` is positive by more than
    ``std_a + std_b``; not supported when it is that large and negative; otherwise not resolved. A
    side with one seed has no std, so nothing is resolved (a lone run's noise is unknown).
    """
    if std_a is None or std_b is None:
        return ONE_SEED
    diff, noise = mean_a - mean_b + margin, std_a + std_b
    if diff > noise:
        return SUPPORTED
    if diff < -noise:
        return NOT_SUPPORTED
    return NOT_RESOLVED


def claims(table: list[dict[str, Any]]) -> list[str]:
    """The paper's qualitative claims checked on the aggregated rows' linear probe (skipped if a row is missing).

    Each row needs ``linear_probe_top1`` (mean over seeds) and ``linear_probe_top1_std`` (None for one seed).
    """
    by = {e["label"]: e for e in table}
    key = "linear_probe_top1"

    def compare(claim: str, a: dict[str, Any], b: dict[str, Any], margin: float = 0.0) -> str:
        ma, sa, mb, sb = a[key], a.get(f"{key}_std"), b[key], b.get(f"{key}_std")
        noise = "" if sa is None or sb is None else f", std sum {sa + sb:.2f}"
        return (
            f"{claim}: **{verdict(ma, sa, mb, sb, margin)}** — {a['label']} {pm(ma, sa)} vs {b['label']} "
            f"{pm(mb, sb)} (Δ {ma - mb:+.2f}{noise})."
        )

    out = []
    sfl, central, fl, rnd = (by.get(x) for x in ("MocoSFL", "centralized MoCo", "FL-MoCo", "random init"))
    if sfl and central:
        out.append(
            compare(
                f"MocoSFL matches centralized MoCo at equal budget (within {MATCH_POINTS:g} points)",
                sfl,
                central,
                MATCH_POINTS,
            )
        )
    off = by.get("MocoSFL, no feature sharing")
    if sfl and off:
        out.append(compare("Feature sharing (one shared queue) helps on this partition", sfl, off))
    frequent = [by[x] for x in ("MocoSFL, sync every step", "MocoSFL, sync every 10") if x in by]
    never = by.get("MocoSFL, never sync")
    if frequent and never:
        best = max(frequent, key=lambda e: e[key])
        out.append(compare("Frequent synchronization (the better of every step / every 10) beats never", best, never))
    iid = by.get("MocoSFL, IID")
    if sfl and iid:
        out.append(
            compare(
                f"Non-IID robustness: MocoSFL on non-IID shards within {MATCH_POINTS:g} points of IID",
                sfl,
                iid,
                MATCH_POINTS,
            )
        )
    alone = by.get("FL-MoCo, MocoSFL's clients and batch")
    if sfl and alone:
        out.append(
            compare(
                "Vector concatenation at batch 1: MocoSFL (the participants' batch-1 activations in one server "
                "batch) beats FL-MoCo on the same clients and batch (each client a batch of 1 on its own)",
                sfl,
                alone,
            )
        )
    if sfl and fl:
        out.append(compare("MocoSFL beats FL-MoCo at the same images seen", sfl, fl))
    if sfl and rnd:
        out.append(compare("Pretraining beats the random-init floor", sfl, rnd))
    if sfl and fl:
        if sfl["client_flops_per_image"] and fl["client_flops_per_image"]:
            out.append(
                f"Client compute: {sfl['client_flops_per_image'] / 1e6:.2f} MFLOPs per image for MocoSFL "
                f"vs {fl['client_flops_per_image'] / 1e6:.1f} for FL-MoCo "
                f"({fl['client_flops_per_image'] / sfl['client_flops_per_image']:.0f}x less)."
            )
        if sfl["bytes_per_client"] and fl["bytes_per_client"]:
            out.append(
                f"Communication per client over training: {sfl['bytes_per_client'] / 1e6:.2f} MB for "
                f"MocoSFL vs {fl['bytes_per_client'] / 1e6:.2f} MB for FL-MoCo."
            )
    return out


def training_code_dirty(root: Path) -> bool | None:
    """Whether ``root``'s ``mocosfl/`` has uncommitted changes (edits or new files); None outside git."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--", "mocosfl"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def code_line(root: Path = identity.PACKAGE.parent) -> str:
    """The header's provenance: git commit, a dirty marker for uncommitted training code, the code hash."""
    sha = tracking.git_commit(root).removesuffix("-dirty")[:10]
    dirty = " **dirty** (uncommitted changes under mocosfl/)" if training_code_dirty(root) else ""
    return f"git {sha}{dirty}; training-code hash {identity.code_hash()} (`mocosfl --version`)"


def run_here(
    r: rows.Resolved, log: Callable[[str], None], on_row: Callable[[dict[str, float]], None]
) -> dict[str, Any]:
    """Train and evaluate one resolved run on this machine: its entry, with the CPU it ran on and the precision
    its forward passes computed in (``auto`` resolves per machine: bf16 where the CPU has native bf16)."""
    entry = {**rows.run_row(r, log, on_row=on_row), "machine": cpu_line()}
    if r.row.method != "random":  # random init trains nothing
        entry["precision"] = resolve_precision(r.cfg.pretrain.precision, resolve_device(r.cfg.device), r.row.method)
    return entry


def measured_on(entries: list[dict[str, Any]]) -> str:
    """The CPUs the distinct runs ran on (each run records its own), with their precision where recorded and
    how many runs each."""
    runs = {}
    for x in entries:
        cpu = x.get("machine") or "not recorded (run cached before runs recorded their CPU)"
        runs[x["key"]] = f"{cpu}, {x['precision']}" if x.get("precision") else cpu
    counts = Counter(runs.values())
    return "; ".join(f"{cpu}: {n} run(s)" for cpu, n in counts.items()) if counts else "no runs"


def header_lines(cfg: Config, suite: str, entries: list[dict[str, Any]], suite_seconds: float) -> list[str]:
    """A results page's title and provenance, budget, seeds and wall-time lines."""
    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.platform()}, {cpu_line()}, torch {torch.__version__}"
    table = aggregate(entries)
    trained = [e for e in table if e["steps"]]
    budget = (
        f"{trained[0]['steps']} steps x B={trained[0]['batch_size']} = {trained[0]['images_seen']:,} images per method"
        if trained
        else "no trained rows"
    )
    runs = {x["key"]: x["wall_seconds"] for x in entries}  # rows that resolve to one run share it
    most = max(e["seeds"] for e in table) if table else 1
    e = cfg.evaluate
    return [
        f"# Results: suite `{suite}`, profile `{cfg.profile}`",
        "",
        f"- Date: {date}; written on: {machine}.",
        f"- Code: {code_line()}.",
        f"- Budget: {budget}; ResNet-18 width {cfg.model.width}.",
        f"- Seeds: a row's runs use seeds {cfg.seed}, {cfg.seed + 1}, … (column `seeds`, up to {most} here), each "
        "its own partition, sampling and initialization; kNN and linear probe are mean ± sample std (ddof=1) "
        "over them, a plain number for one seed.",
        f"- Evaluation: kNN (k={e.knn_k}) on the full train/test split, linear probe {e.linear_epochs} epochs "
        "(epoch chosen on a validation split of train).",
        f"- Runs measured on: {measured_on(entries)}.",
        f"- Wall time: {sum(runs.values()) / 60:.1f} min, the sum of the {len(runs)} distinct runs' measured "
        "training + evaluation times (each row's mean per run in the table), whenever they ran; this invocation "
        f"took {suite_seconds / 60:.1f} min (finished runs are read from the cache).",
    ]


def markdown(
    cfg: Config, suite: str, entries: list[dict[str, Any]], stem: str, suite_seconds: float, plots: list[str]
) -> str:
    """The results page: header (provenance, budget, seeds, wall time), table, plots, claims, notes."""
    table = aggregate(entries)
    lines = header_lines(cfg, suite, entries, suite_seconds) + [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(table_cells(x)) + " |" for x in table]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    found = claims(table)
    if found:
        lines += [
            "",
            "## The paper's qualitative claims at this budget",
            "",
            "A claim is **supported** only when its difference of means exceeds the sum of the two rows' "
            "stds in the claimed direction, **not supported** when it exceeds it the other way, and "
            "otherwise **not resolved at this budget**; with one seed on a side its std is unknown, so "
            "**not resolved (one seed)**. Linear-probe top-1.",
            "",
        ] + [f"- {c}" for c in found]
    lines += [
        "",
        "## Notes",
        "",
        "- Distinct clients / images: how many clients and training images the run actually trained on "
        "(counted by its trainer; mean over seeds), against the images seen = steps x B.",
        "- MB per client: bytes up + down of all training divided by N (non-participants count as zero): "
        "MocoSFL sends h_q and h_k up and receives dloss/dh_q per image, plus client model and target "
        "down when a client starts from the global model and up at each sync (a client returning unsynced "
        "keeps its own); FL-MoCo moves the full model and target the same way. Counted from the tensors the "
        "trainers exchange.",
        "- Client FLOPs per image: FlopCounterMode on one client step (2 FLOPs per multiply-accumulate of "
        "convolutions and matrix products; norms and elementwise ops not counted). MocoSFL: online + target "
        "forward and online backward of the client model; FL-MoCo: the whole symmetric MoCo step.",
        "- Participants are re-sampled every pass over a shard (sfl.sample_period auto) in every row; the sync "
        "period is a separate knob. A client leaving a round unsynced keeps its own model for its next round; "
        '"never" (or a period beyond the step count) evaluates the FedAvg of every trained client\'s model.',
    ]
    if any(x["method"] == "flmoco" for x in table):
        lines.append(
            "- FL-MoCo: full encoder + head per client, local queue of K/M keys and local EMA target for "
            "target; the local queue of K/M keys lives with its client for the whole run (random keys once, "
            "at its first round), FedAvg of model and target every sync period; "
            "clients per round x batch as in the table, so the same images per step as MocoSFL."
        )
    lines.append(f"- Files: {stem}.md, {stem}.csv (one line per row and seed)" + "".join(f", {p}" for p in plots) + ".")
    return "\n".join(lines) + "\n"


def _mean_curve(runs: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and std (0 for one seed) of the kNN monitor over a row's seeds, at the steps they share."""
    values: dict[float, list[float]] = {}
    for r in runs:
        for h in r["knn_history"]:
            values.setdefault(h["step"], []).append(h["knn_top1"])
    steps = sorted(s for s, v in values.items() if len(v) == len(runs))
    stats = [mean_std(values[s]) for s in steps]
    return steps, [m for m, _ in stats], [sd or 0.0 for _, sd in stats]


def plot_results(entries: list[dict[str, Any]], out_dir: Path, stem: str) -> list[str]:
    """Bar chart of linear-probe top-1 per row and kNN monitor vs step of the curve rows, ± std over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = aggregate(entries)
    written = []
    fig = Figure(figsize=(7, 0.45 * len(table) + 1.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [e["label"] for e in table][::-1]
    values = [e["linear_probe_top1"] for e in table][::-1]
    errors = [e["linear_probe_top1_std"] or 0.0 for e in table][::-1]
    ax.barh(
        labels,
        values,
        xerr=errors,
        capsize=3,
        color=["#888" if "random" in lab else "#3a7" for lab in labels],
    )
    for y, (v, err) in enumerate(zip(values, errors, strict=True)):
        ax.text(v + err, y, f" {v:.1f}" + (f" ± {err:.1f}" if err else ""), va="center", fontsize=8)
    ax.set_xlabel("linear-probe top-1 (%), mean ± std over seeds")
    ax.set_xlim(0, max([v + err for v, err in zip(values, errors, strict=True)] + [1.0]) * 1.2)
    ax.set_title("Linear probe per method")
    fig.tight_layout()
    name = f"{stem}-probe.png"
    with atomic_path(out_dir / name, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    written.append(name)

    curves = [e for e in table if e.get("curve") and e["knn_history"]]
    if curves:
        fig = Figure(figsize=(6, 3.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for e in curves:
            steps, means, stds = _mean_curve(e["runs"])
            ax.errorbar(steps, means, yerr=stds, marker="o", markersize=3, capsize=2, label=e["label"])
        ax.set_xlabel("step")
        ax.set_ylabel("kNN monitor top-1 (%)")
        ax.set_title("kNN monitor during training (± std over seeds)")
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
    r: rows.Resolved,
    entry: dict[str, Any],
    history: list[dict[str, float]],
    cached: bool,
    suite: str,
    name: str,
    parent_run_id: str | None = None,
    entry_file: Path | None = None,
) -> None:
    """The row's nested run: its kNN curve and numbers; ``entry_file`` (a run on the work pool) goes along as
    an artifact, which is how the suite's process, on another host, gets the entry."""
    import mlflow

    tags = {
        "stage": "results-row",
        "suite": suite,
        "method": r.row.method,
        "row_key": r.key,
        "cached": str(cached).lower(),
        "group": r.row.group,
        "seed": str(r.cfg.seed),
    }
    if "code_hash" in entry:
        tags["code_hash"] = entry["code_hash"]
    nested = parent_run_id is None
    with tracking.mlflow_run(r.cfg, name, nested=nested, parent_run_id=parent_run_id, tags=tags):
        mlflow.log_param("method", r.row.method)
        for h in history or entry["knn_history"]:
            tracking.log_row(h)
        numbers = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        mlflow.log_metrics(numbers)
        if entry_file is not None:
            mlflow.log_artifact(str(entry_file), artifact_path=ENTRY_ARTIFACTS)


# ----------------------------------------------------------------------------- runs on the work pool

ENTRY_ARTIFACTS = "entry"  # where a pool run's row run keeps the row's entry (<key>.json)


def _row_name(r: rows.Resolved, count: int) -> str:
    return r.row.label if count == 1 else f"{r.row.label}, seed {r.cfg.seed}"


def run_on_pool_worker(
    cfg: Config,
    suite: str,
    label: str,
    seed_offset: int,
    name: str,
    key: str,
    parent_run_id: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """One run of a suite, as a flow run on the work pool: train and evaluate the row at ``seed + seed_offset``
    unless its entry is cached, write the entry to this host's results folder and, with tracking, log the row's
    run (nested under the suite's run ``parent_run_id``) with the entry as an artifact."""
    found = [row for row in SUITES.get(suite, []) if row.label == label]
    if not found:
        raise ConfigError(f"suite '{suite}' has no row '{label}' on this worker (is its checkout up to date?)")
    tracking.require_run(cfg, parent_run_id)
    with lock.exclusive(f"results: data for '{label}'", log=log):  # another run on this host may be preparing it
        r = rows.resolve(cfg, found[0], suite, seed_offset)
    if r.key != key:  # the key hashes the training code and the data: this host's differ from the suite's
        raise ConfigError(
            f"row '{label}' is run {r.key} on this worker but {key} for the suite: its training code or data differ "
            f"(training code {identity.code_hash()}): check out the suite's commit and data on this host"
        )
    path = rows.results_dir(cfg) / f"{r.key}.json"
    history: list[dict[str, float]] = []
    if path.exists():
        entry, cached = json.loads(path.read_text()), True
    else:
        log(f"{label}, seed {r.cfg.seed} ({r.row.method})")
        entry, cached = run_here(r, log, history.append), False
        write_json(path, entry)
    if tracking.enabled(cfg):
        _log_row_mlflow(r, entry, history, cached, suite, name, parent_run_id=parent_run_id, entry_file=path)
    return {"key": r.key, "label": label, "seed": r.cfg.seed, "linear_probe_top1": entry["linear_probe_top1"]}


def _fetch_entry(key: str, parent_run_id: str | None, path: Path) -> None:
    """A pool run's entry from its MLflow row run into this host's results folder (a run on another host)."""
    where = f"{path.parent} on this host"
    if parent_run_id is None:
        raise pool.PoolError(
            f"run {key} finished on the work pool but its entry is not in {where}: share that folder between "
            "the hosts, or turn tracking on so entries travel through MLflow"
        )
    import mlflow

    found = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.row_key = '{key}' and tags.mlflow.parentRunId = '{parent_run_id}'",
        output_format="list",
    )
    if not found:
        raise pool.PoolError(f"run {key} finished on the work pool but neither {where} nor MLflow holds its entry")
    local = mlflow.artifacts.download_artifacts(
        run_id=found[0].info.run_id, artifact_path=f"{ENTRY_ARTIFACTS}/{key}.json"
    )
    write_text(path, Path(local).read_text())


def _run_on_pool(
    cfg: Config,
    suite: str,
    todo: list[rows.Resolved],
    names: dict[str, str],
    parent_run_id: str | None,
    log: Callable[[str], None],
) -> set[str]:
    """Each missing run as a flow run on the work pool; waits for them all; their entries into the results
    folder. Returns their keys (their row runs are logged already, by the workers)."""
    online = pool.online_workers()
    if not online:
        raise pool.PoolError(f"no worker is online on work pool {pool.POOL}: start one on each host (`make worker`)")
    config = portable(cfg, lock.ROOT)
    ids = []
    for r in todo:
        parameters = {
            "config": config,
            "suite": suite,
            "label": r.row.label,
            "seed_offset": r.cfg.seed - cfg.seed,
            "name": names[r.key],
            "key": r.key,
            "parent_run_id": parent_run_id,
        }
        ids += pool.submit(pool.RESULTS_RUN, parameters, 1, name=f"{suite}-{r.key}")
    log(
        f"submitted {len(ids)} run(s) to work pool {pool.POOL} as flow runs of {pool.RESULTS_RUN} "
        f"({len(online)} worker(s) online)"
    )
    try:
        counts = pool.finish(ids, log, cancel_unstarted_runs=False)
    except KeyboardInterrupt:
        n = pool.cancel_unstarted(ids)
        log(f"interrupted: {n} flow run(s) not yet started cancelled; those running finish and keep their entries")
        raise
    log(f"work pool: {counts['completed']} run(s) completed")
    cache = rows.results_dir(cfg)
    for r in todo:
        if not (cache / f"{r.key}.json").exists():
            _fetch_entry(r.key, parent_run_id, cache / f"{r.key}.json")
    return {r.key for r in todo}


def run_suite(
    cfg: Config,
    suite: str = "main",
    log: Callable[[str], None] = print,
    seeds: int | None = None,
    executor: str = "local",
    estimate: bool = True,
) -> dict[str, Any]:
    """Run (or reuse) every row of ``suite`` at its seeds on ``cfg``'s profile; write the table, CSV and plots.

    ``seeds`` (``--seeds``) sets every row's seed count instead of the suite's (``rows.seed_count``).
    ``executor="pool"`` (``--executor pool``) runs the missing runs as flow runs on the Prefect work pool.
    ``estimate=False`` (``--no-estimate``) skips timing a few steps of each missing run before starting.
    """
    if executor not in ("local", "pool"):
        raise ConfigError(f"executor {executor!r} is invalid: local or pool")
    if executor == "pool":
        pool.api_url()
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}' (known: {', '.join(SUITES)})")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds {seeds} is invalid: must be >= 1")
    t_suite = time.perf_counter()
    cache = rows.results_dir(cfg)
    counts = {row.label: rows.seed_count(row, cfg.profile, seeds) for row in SUITES[suite]}
    if suite == "privacy" and max(counts.values()) > 1:
        raise ConfigError(
            f"--seeds {seeds} is invalid for the privacy suite: a row is one trained model, its spread the attack's"
        )
    resolved = [rows.resolve(cfg, row, suite, i) for row in SUITES[suite] for i in range(counts[row.label])]
    unique: dict[str, rows.Resolved] = {}
    for r in resolved:
        unique.setdefault(r.key, r)
    records = records_path(cfg, suite)
    restored = restore_records(records, cache, set(unique))
    if restored:
        log(f"{restored} finished run(s) restored from {records}")
    todo = [r for r in unique.values() if not (cache / f"{r.key}.json").exists()]
    log(
        f"suite '{suite}', profile '{cfg.profile}': {len(counts)} rows, {len(resolved)} runs over their seeds, "
        f"{len(unique)} distinct, {len(unique) - len(todo)} already finished"
    )
    if todo and estimate:
        seconds = rows.estimate(todo, log)
        log(f"estimated time for {len(todo)} runs: ~{seconds / 60:.0f} min")

    track = tracking.enabled(cfg)
    entries: list[dict[str, Any]] = []
    with _parent_run(cfg, suite, track) as parent:
        pooled: set[str] = set()
        if executor == "pool" and todo:
            names = {r.key: _row_name(r, counts[r.row.label]) for r in reversed(resolved)}  # a key's first row
            try:
                pooled = _run_on_pool(cfg, suite, todo, names, parent.info.run_id if track else None, log)
            finally:  # what the pool finished is recorded even when a run failed or the wait was interrupted
                save_records(records, cache, set(unique))
        done: dict[str, dict[str, Any]] = {}
        for i, r in enumerate(resolved, 1):
            path = cache / f"{r.key}.json"
            cached = r.key in done or path.exists()
            history: list[dict[str, float]] = []
            name = _row_name(r, counts[r.row.label])
            if r.key in done:
                entry = dict(done[r.key])
            elif path.exists():
                entry = json.loads(path.read_text())
            else:
                log(f"[{i}/{len(resolved)}] {name} ({r.row.method})")
                entry = run_here(r, log, history.append)
                write_json(path, entry)
                save_records(records, cache, {r.key})
            done[r.key] = entry
            # The seed from the resolved config: cached entries from before seeds were recorded lack it.
            entry = {**entry, "label": r.row.label, "group": r.row.group, "curve": r.row.curve, "seed": r.cfg.seed}
            ran_on_pool = r.key in pooled
            pooled.discard(r.key)  # its row run is logged by the worker; a repeat of the key is a cached row
            if ran_on_pool:
                log(f"[{i}/{len(resolved)}] {name}: ran on the work pool (run {r.key})")
            elif cached:
                log(f"[{i}/{len(resolved)}] {name}: already finished (run {r.key})")
            if track and not ran_on_pool:
                _log_row_mlflow(r, entry, history, cached, suite, name)
            entries.append(entry)

        save_records(records, cache, set(unique), final=True)
        out_dir = Path(cfg.report.out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = output_stem(cfg, suite)
        plots = plot_results(entries, out_dir, stem)
        if suite == "privacy":
            plots += privacy_table.plot(aggregate(entries), out_dir, stem)
        suite_seconds = time.perf_counter() - t_suite
        md, csv_path = out_dir / f"{stem}.md", out_dir / f"{stem}.csv"
        if suite == "privacy":
            header = header_lines(cfg, suite, entries, suite_seconds)
            write_text(md, privacy_table.markdown(header, aggregate(entries), stem, plots, verdict))
            write_text(csv_path, privacy_table.csv_text(entries))
        else:
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
        "rows": len(counts),
        "runs": len(entries),
        "ran": len(todo),
        "wall_seconds": suite_seconds,
        "linear_probe_top1": {e["label"]: e["linear_probe_top1"] for e in aggregate(entries)},  # mean over seeds
    }


def _parent_run(cfg: Config, suite: str, track: bool) -> Any:
    if not track:
        return contextlib.nullcontext()
    return tracking.mlflow_run(cfg, f"results-{suite}", tags={"stage": "results", "suite": suite})
