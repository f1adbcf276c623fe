"""The run report: ``report.md``, ``report.html`` and PNG plots built from one config's metrics files.

Reads ``metrics/{partition,pretrain,eval}.json`` (+ ``eval_random.json`` when present); writes only ``report.out_dir``.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mocosfl import workflow
from mocosfl.config import PATH_FIELDS, Config
from mocosfl.io import atomic_path, write_text
from pipelines import tracking

CONFIG_SECTIONS = ("data", "partition", "model", "augment", "sfl", "moco", "pretrain")
# metrics file -> the stage that writes it (named in the error when it is missing)
REQUIRED = {
    "partition.json": "partition",
    "partition_heatmap.png": "partition",
    "pretrain.json": "pretrain",
    "eval.json": "evaluate",
}


# A report is a list of (heading, blocks); a block is a paragraph (str) or one of these.
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    text: str


@dataclass
class Image:
    file: str
    alt: str


@dataclass
class Link:
    text: str
    url: str


Block = str | Table | Code | Image | Link


# ----------------------------------------------------------------------------- inputs


def load_metrics(metrics_dir: Path) -> dict[str, Any]:
    """The metrics JSONs by stem; a missing one raises FileNotFoundError naming the stage to run."""
    for name, stage in REQUIRED.items():
        if not (metrics_dir / name).exists():
            raise FileNotFoundError(f"{metrics_dir / name} not found: run `mocosfl {stage}` first")
    out = {name[:-5]: json.loads((metrics_dir / name).read_text()) for name in REQUIRED if name.endswith(".json")}
    random = metrics_dir / "eval_random.json"
    out["eval_random"] = json.loads(random.read_text()) if random.exists() else None
    return out


def run_config(cfg: Config, run_dir: Path) -> dict[str, Any]:
    """The configuration the run was trained with (its ``config.json``), else the current one."""
    path = run_dir / "config.json"
    return json.loads(path.read_text()) if path.exists() else cfg.to_dict()


def dataset_name(key: str) -> str:
    return "CIFAR-10 (JPEG q75)" if key.startswith("cifar10-jpeg") else key


# ----------------------------------------------------------------------------- plots


def _atomic_copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def project_relative(path: str | Path, cfg: Config) -> str:
    """``path`` relative to the project (the folder the report directory sits in), for the report's text:
    a report pushed by DVC or copied to another machine names no absolute path of this one."""
    return Path(os.path.relpath(Path(path).resolve(), Path(cfg.report.out_dir).resolve().parent)).as_posix()


def relative_paths(conf: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A run's config with its location keys (data.source, runs_dir, ...) made project-relative."""
    out = json.loads(json.dumps(conf))
    for key in PATH_FIELDS:
        section, _, name = key.rpartition(".")
        node = out.get(section) if section else out
        if isinstance(node, dict) and isinstance(node.get(name), str) and Path(node[name]).is_absolute():
            node[name] = project_relative(node[name], cfg)
    return out


def plot_curve(path: Path, xs: list[float], ys: list[float], ylabel: str, title: str) -> None:
    """One line plot, written atomically; a Figure with its own Agg canvas leaves pyplot untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_plots(out_dir: Path, history: list[dict[str, float]], heatmap: Path) -> list[str]:
    """loss / kNN / lr / communication curves over steps, plus a copy of the partition heat map."""
    curves = {  # file: (history key, y label, title, scale)
        "loss.png": ("loss_mean", "loss (mean since last row)", "MoCo loss", 1.0),
        "knn.png": ("knn_top1", "kNN top-1 (%)", "kNN monitor (validation images)", 1.0),
        "lr.png": ("lr", "learning rate", "Learning rate (cosine)", 1.0),
        "communication.png": ("bytes_per_client", "MB per client (cumulative)", "Communication", 1e-6),
    }
    written = []
    for name, (key, ylabel, title, scale) in curves.items():
        rows = [r for r in history if key in r]
        if rows:
            plot_curve(out_dir / name, [r["step"] for r in rows], [r[key] * scale for r in rows], ylabel, title)
            written.append(name)
    _atomic_copy(heatmap, out_dir / "partition_heatmap.png")
    return written + ["partition_heatmap.png"]


# ----------------------------------------------------------------------------- content


def _num(x: Any, fmt: str = ".2f", unit: str = "") -> str:
    return "n/a" if x is None else f"{x:{fmt}}{unit}"


def _mb(x: Any) -> str:
    return "n/a" if x is None else f"{x / 1e6:,.1f} MB"


def ui_hint(cfg: Config) -> str:
    """How to open the MLflow UI, naming the project's own store relative to the project."""
    uri = tracking.tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return f"Start the UI with `make ui` (store: {project_relative(uri.removeprefix('sqlite:///'), cfg)})."
    return f"Start the UI with `mlflow server --backend-store-uri {uri}`."


def mlflow_blocks(cfg: Config, run_dir: Path) -> list[Block]:
    run_id = workflow.read_run_id(run_dir)
    if not tracking.enabled(cfg):
        return [
            "MLflow tracking was off for this report (tracking.enabled=false or MOCOSFL_TRACKING=0)"
            + (f"; the run directory records MLflow run {run_id}." if run_id else ".")
        ]
    if run_id is None:
        return [f"No MLflow run recorded in {project_relative(run_dir, cfg)} (it was trained with tracking off)."]
    return [
        Link(f"MLflow pretrain run {run_id}", tracking.run_url(cfg, run_id)),
        ui_hint(cfg),
    ]


def build(cfg: Config, m: dict[str, Any], plots: list[str]) -> tuple[str, list[tuple[str, list[Block]]]]:
    """Title and sections of the report (no I/O beyond the MLflow lookup)."""
    part, pre, ev, rnd = m["partition"], m["pretrain"], m["eval"], m["eval_random"]
    run_dir = Path(pre["run_dir"])
    conf = relative_paths(run_config(cfg, run_dir), cfg)
    title = f"MocoSFL report: {dataset_name(part.get('dataset', ''))}, profile {pre.get('profile', cfg.profile)}"

    overview: list[Block] = [
        f"Dataset {dataset_name(part.get('dataset', ''))} (prepared as {part.get('dataset', 'n/a')}); "
        f"run {run_dir.name} in {project_relative(run_dir, cfg)}; seed {conf.get('seed', cfg.seed)}.",
    ]
    if ev.get("encoder") not in (None, str(run_dir)):
        overview.append(
            f"Warning: eval.json evaluated {project_relative(ev['encoder'], cfg)}, not this run: "
            "run `mocosfl evaluate` again."
        )

    results = Table(["metric", "trained"] + (["random init", "gain (points)"] if rnd else []), [])
    for key, label in (
        ("knn_top1", "kNN top-1 (%)"),
        ("linear_probe_top1", "linear probe top-1 (%)"),
        ("linear_probe_top1_final_epoch", "linear probe top-1, last epoch (%)"),
    ):
        row = [label, _num(ev.get(key))]
        if rnd:
            gain = ev[key] - rnd[key] if ev.get(key) is not None and rnd.get(key) is not None else None
            row += [_num(rnd.get(key)), _num(gain, "+.2f")]
        results.rows.append(row)
    results.rows.append(
        ["kNN monitor at the end of training (validation, %)", _num(pre.get("knn_top1"))] + (["", ""] if rnd else [])
    )

    partition = Table(
        ["", "min", "mean", "max"],
        [
            [
                "samples per client",
                str(part["samples_per_client_min"]),
                _num(part["samples_per_client_mean"], ".1f"),
                str(part["samples_per_client_max"]),
            ],
            [
                "classes per client",
                str(part["classes_per_client_min"]),
                _num(part["classes_per_client_mean"], ".2f"),
                str(part["classes_per_client_max"]),
            ],
        ],
    )
    partition_text = (
        f"{part['num_clients']} clients, method {part.get('method', 'n/a')}, "
        f"{part.get('num_samples', 'n/a')} training images"
        + (f", {part['unassigned_samples']} left unassigned." if part.get("unassigned_samples") else ".")
    )

    training = Table(
        ["", ""],
        [
            ["steps", f"{pre.get('steps')} of {pre.get('total_steps')} ({_num(pre.get('epochs'))} epochs)"],
            [
                "clients per round x batch",
                f"{pre.get('clients_per_round')} x {pre.get('client_batch_size')} = {pre.get('batch_size')}",
            ],
            ["final loss", _num(pre.get("final_loss"), ".4f")],
            ["train time", _num(pre.get("train_seconds"), ".1f", " s")],
            ["kNN monitor time", _num(pre.get("knn_seconds"), ".1f", " s")],
            ["speed", _num(pre.get("steps_per_s"), ".2f", " steps/s")],
            ["evaluation time", _num(ev.get("seconds"), ".1f", " s")],
        ],
    )
    communication = Table(
        ["", ""],
        [
            ["per client (up + down)", _mb(pre.get("bytes_per_client"))],
            ["all clients, up (smashed data + client models)", _mb(pre.get("bytes_up_total"))],
            ["all clients, down (gradients + global model)", _mb(pre.get("bytes_down_total"))],
            ["client / server parameters", f"{pre.get('client_params')} / {pre.get('server_params')}"],
        ],
    )
    curves: list[Block] = [Image(p, p[:-4]) for p in plots if p != "partition_heatmap.png"]
    config_yaml = yaml.safe_dump({s: conf[s] for s in CONFIG_SECTIONS if s in conf}, sort_keys=False)

    return title, [
        ("Overview", overview),
        (
            "Results",
            [
                results,
                f"Evaluated on {ev.get('train_images')} train / {ev.get('test_images')} test "
                "images; the linear probe's epoch is chosen on a validation split.",
            ],
        ),
        ("Partition", [partition_text, partition, Image("partition_heatmap.png", "class counts per client")]),
        ("Training", [training, *curves]),
        ("Communication", [communication]),
        ("MLflow", mlflow_blocks(cfg, run_dir)),
        ("Configuration", [Code(config_yaml)]),
    ]


# ----------------------------------------------------------------------------- rendering


def to_markdown(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    lines = [f"# {title}", ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for b in blocks:
            if isinstance(b, Table):
                lines += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
                lines += ["| " + " | ".join(r) + " |" for r in b.rows]
            elif isinstance(b, Code):
                lines += ["```yaml", b.text.rstrip(), "```"]
            elif isinstance(b, Image):
                lines.append(f"![{b.alt}]({b.file})")
            elif isinstance(b, Link):
                lines.append(f"[{b.text}]({b.url})")
            else:
                lines.append(b)
            lines.append("")
    return "\n".join(lines)


def to_html(title: str, sections: list[tuple[str, list[Block]]]) -> str:
    e = html.escape
    parts = [
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{e(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}"
        "img{max-width:100%;margin:.5em 0}pre{background:#f4f4f4;padding:.8em}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    for heading, blocks in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for b in blocks:
            if isinstance(b, Table):
                head = "".join(f"<th>{e(h)}</th>" for h in b.header)
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b.rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif isinstance(b, Code):
                parts.append(f"<pre>{e(b.text)}</pre>")
            elif isinstance(b, Image):
                parts.append(f"<img src='{e(b.file)}' alt='{e(b.alt)}'>")
            elif isinstance(b, Link):
                parts.append(f"<p><a href='{e(b.url)}'>{e(b.text)}</a></p>")
            else:
                parts.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", e(b)) + "</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def make_report(cfg: Config) -> dict[str, Any]:
    """Write report.md, report.html and the PNG plots into ``cfg.report.out_dir``; return their paths."""
    metrics_dir = Path(cfg.metrics_dir)
    m = load_metrics(metrics_dir)
    out = Path(cfg.report.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, m["pretrain"].get("history", []), metrics_dir / "partition_heatmap.png")
    title, sections = build(cfg, m, plots)
    write_text(out / "report.md", to_markdown(title, sections))
    write_text(out / "report.html", to_html(title, sections))
    return {"report": str(out / "report.md"), "html": str(out / "report.html"), "plots": [str(out / p) for p in plots]}
