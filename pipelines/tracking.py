"""MLflow at the edge: one run per pretrain, evaluation and tuning trial, in a project-local SQLite store.

The library never imports this; the CLI and the Prefect flows call it around library calls.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mocosfl.config import Config

RUN_ID_FILE = "mlflow_run_id.txt"
# History rows carry these per-epoch metrics (see MocoSFLTrainer.run).
ROW_METRICS = ("loss_mean", "lr", "steps_per_s", "bytes_per_client", "knn_top1", "epoch")


def enabled(cfg: Config) -> bool:
    return cfg.tracking.enabled and os.environ.get("MOCOSFL_TRACKING", "1") != "0"


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI so every process shares one store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.tracking.db).resolve()}"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _setup(cfg: Config) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        # Artifacts next to the store (absolute), not in whatever folder the first run started from.
        artifacts = Path(cfg.tracking.db).resolve().parent / "mlruns"
        try:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts.as_uri())
        except mlflow.exceptions.MlflowException:
            pass  # another process created it meanwhile
    exp = mlflow.set_experiment(cfg.tracking.experiment)
    return str(exp.experiment_id)


@contextmanager
def mlflow_run(
    cfg: Config,
    run_name: str,
    *,
    run_id: str | None = None,
    nested: bool = False,
    tags: dict[str, str] | None = None,
    log_params: bool = True,
) -> Iterator[Any]:
    """Start (or continue, given ``run_id``) a run tagged with git commit and profile."""
    import mlflow

    _setup(cfg)
    root = Path(cfg.tracking.db).resolve().parent
    all_tags = {"git_commit": git_commit(root), "profile": cfg.profile, **(tags or {})}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=all_tags) as run:
        if log_params and run_id is None:
            # MLflow caps a param value at 6000 chars; config values are short.
            mlflow.log_params({k: str(v) for k, v in flatten(cfg.to_dict()).items()})
        yield run


def log_row(row: dict[str, float]) -> None:
    """Per-epoch metrics of one history row at its step (one batched call, not one per metric)."""
    import mlflow

    metrics = {k: float(row[k]) for k in ROW_METRICS if k in row}
    if metrics:
        mlflow.log_metrics(metrics, step=int(row["step"]))


def run_url(cfg: Config, run_id: str) -> str:
    import mlflow

    exp_id = _setup(cfg)
    del mlflow
    return f"{cfg.report.mlflow_ui.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def read_run_id(run_dir: str | Path) -> str | None:
    path = Path(run_dir) / RUN_ID_FILE
    return path.read_text().strip() if path.exists() else None


def write_run_id(run_dir: str | Path, run_id: str) -> None:
    path = Path(run_dir) / RUN_ID_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(run_id + "\n")
    os.replace(tmp, path)


def log_encoder(run_dir: str | Path, image_size: int) -> None:
    """The trained encoder as an MLflow model (offline: explicit requirements and input example)."""
    import mlflow.pytorch
    import numpy as np
    import torch

    from mocosfl.workflow import load_encoder

    enc = load_encoder(run_dir)
    example = np.zeros((1, 3, image_size, image_size), dtype=np.float32)
    mlflow.pytorch.log_model(
        enc,
        name="encoder",
        input_example=example,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mocosfl"],
    )


def dvc_hashes(root: Path) -> dict[str, str]:
    """md5 of the data DVC recorded for the prepare/partition outputs (empty without dvc.lock)."""
    import yaml

    lock = root / "dvc.lock"
    if not lock.exists():
        return {}
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    tags = {}
    for stage in ("prepare", "partition"):
        for out in stages.get(stage, {}).get("outs", []):
            tags[f"dvc.{stage}.{out['path']}"] = str(out.get("md5", ""))
    return tags


def log_pretrain_result(cfg: Config, result: dict[str, Any]) -> None:
    """Final metrics, partition summary + heat map, metrics JSON and the encoder on the active run."""
    import mlflow

    keys = (
        "knn_top1",
        "final_loss",
        "train_seconds",
        "knn_seconds",
        "steps_per_s",
        "images_seen",
        "bytes_per_client",
        "bytes_up_total",
        "bytes_down_total",
        "client_params",
        "server_params",
    )
    mlflow.log_metrics({f"final.{k}": float(result[k]) for k in keys if result.get(k) is not None})
    tags = {"data_hash": result.get("data_hash", ""), "run_hash": Path(result["run_dir"]).name}
    tags.update(dvc_hashes(Path(cfg.tracking.db).resolve().parent))
    mlflow.set_tags(tags)
    metrics_dir = Path(cfg.metrics_dir)
    for name in ("partition.json", "partition_heatmap.png", "pretrain.json"):
        if (metrics_dir / name).exists():
            mlflow.log_artifact(str(metrics_dir / name), artifact_path="metrics")
    log_encoder(result["run_dir"], cfg.data.image_size)


def log_evaluation(cfg: Config, result: dict[str, Any]) -> str:
    """One run per evaluation; its numbers are also put on the pretrain run it evaluated."""
    import mlflow

    pretrain_run = read_run_id(result["encoder"]) if cfg.evaluate.encoder == "trained" else None
    tags = {"stage": "evaluate", "encoder": cfg.evaluate.encoder}
    if pretrain_run:
        tags["pretrain_run_id"] = pretrain_run
    numbers = {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with mlflow_run(cfg, f"evaluate-{cfg.evaluate.encoder}", tags=tags) as run:
        mlflow.log_metrics(numbers)
        name = "eval.json" if cfg.evaluate.encoder == "trained" else "eval_random.json"
        path = Path(cfg.metrics_dir) / name
        if path.exists():
            mlflow.log_artifact(str(path), artifact_path="metrics")
        run_id = str(run.info.run_id)
    if pretrain_run:
        client = mlflow.MlflowClient()
        for k in ("knn_top1", "linear_probe_top1", "linear_probe_top1_final_epoch"):
            client.log_metric(pretrain_run, f"eval.{k}", float(result[k]))
    return run_id
