"""MLflow at the edge: the ``mocosfl.tracking.Tracker`` the stages report to, in a project-local store.

Registered as the ``mlflow`` tracker of the ``mocosfl.trackers`` entry-point group (pyproject.toml); the
library finds it there and never imports this module. The functions below are also used directly by the
other edge modules (tuning, results).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow

from mocosfl import identity
from mocosfl.config import Config
from mocosfl.tracking import TrackingError, flatten

# History rows carry these per-epoch metrics (see TrainLoop.run).
ROW_METRICS = ("loss_mean", "lr", "steps_per_s", "bytes_per_client", "knn_top1", "epoch")

__all__ = ["MlflowTracker", "enabled", "flatten", "git_commit", "log_row", "mlflow_run", "run_url", "tracking_uri"]


def enabled(cfg: Config) -> bool:
    return cfg.tracking.enabled and os.environ.get("MOCOSFL_TRACKING", "1") != "0"


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an absolute SQLite URI so every process shares one store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(cfg.tracking.db).resolve()}"


def git_commit(root: Path) -> str:
    """HEAD's commit, ``-dirty`` when tracked files differ from it; ``unknown`` outside git."""
    return identity.git_commit(root) or "unknown"


# A tracking server that stops answering fails a call within ~20 s instead of MLflow's default minutes of
# retries; a user's own MLFLOW_HTTP_REQUEST_* settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _setup(cfg: Config) -> str:
    uri = tracking_uri(cfg)
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.tracking.experiment) is None:
        # A local store keeps artifacts next to it (absolute), not in whatever folder the first run started
        # from; a tracking server chooses (``make services``: uploaded through it to its artifact store).
        remote = uri.startswith(("http://", "https://"))
        artifacts = None if remote else (Path(cfg.tracking.db).resolve().parent / "mlruns").as_uri()
        try:
            mlflow.create_experiment(cfg.tracking.experiment, artifact_location=artifacts)
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
    """Start (or continue, given ``run_id``) a run tagged with the profile; the config as params."""
    _setup(cfg)
    all_tags = {"profile": cfg.profile, **(tags or {})}
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested, tags=all_tags) as run:
        if log_params and run_id is None:
            # MLflow caps a param value at 6000 chars; config values are short.
            mlflow.log_params({k: str(v) for k, v in flatten(cfg.to_dict()).items()})
        yield run


def log_row(row: dict[str, float]) -> None:
    """Per-epoch metrics of one history row at its step (one batched call, not one per metric)."""
    metrics = {k: float(row[k]) for k in ROW_METRICS if k in row}
    if metrics:
        mlflow.log_metrics(metrics, step=int(row["step"]))


def run_url(cfg: Config, run_id: str) -> str:
    exp_id = _setup(cfg)
    return f"{cfg.report.mlflow_ui.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


@contextmanager
def _guard(cfg: Config) -> Iterator[None]:
    """MLflow and connection errors as one ``TrackingError`` line (the caller's checkpoints are kept)."""
    import requests

    try:
        yield
    except (mlflow.exceptions.MlflowException, requests.exceptions.RequestException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise TrackingError(
            f"MLflow at {tracking_uri(cfg)} did not record ({first}); checkpoints are kept: "
            "run the command again to resume once it is back"
        ) from e


class MlflowTracker:
    """``mocosfl.tracking.Tracker`` on MLflow: one MLflow run per ``run``; nested when one is active.

    A tracking server or database that fails raises ``TrackingError`` (one line at the CLI) within seconds."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @contextmanager
    def run(
        self,
        name: str,
        *,
        resume_id: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Iterator[str | None]:
        nested = mlflow.active_run() is not None
        with _guard(self.cfg):
            context = mlflow_run(self.cfg, name, run_id=resume_id, nested=nested, tags=tags)
            run = context.__enter__()
        try:
            if params and resume_id is None:
                with _guard(self.cfg):
                    mlflow.log_params({k: str(v) for k, v in params.items()})
            yield str(run.info.run_id)
        except BaseException as e:
            try:  # end the run as failed; when MLflow itself is what failed, that may fail too
                context.__exit__(type(e), e, e.__traceback__)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
            raise
        with _guard(self.cfg):
            context.__exit__(None, None, None)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if metrics and mlflow.active_run() is not None:
            with _guard(self.cfg):
                mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def set_tags(self, tags: dict[str, str]) -> None:
        if mlflow.active_run() is not None:
            with _guard(self.cfg):
                mlflow.set_tags(tags)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        if mlflow.active_run() is not None and Path(path).exists():
            with _guard(self.cfg):
                mlflow.log_artifact(str(path), artifact_path=folder)

    def log_encoder(self, run_dir: Path, image_size: int) -> None:
        """The encoder as an MLflow model (offline: explicit requirements and an input example), exported with
        torch.export (pt2: no mocosfl code needed to load it) for any batch size."""
        import mlflow.pytorch
        import numpy as np
        import torch

        from mocosfl.workflow import load_encoder

        if mlflow.active_run() is None:
            return
        enc = load_encoder(run_dir)
        # Two images: torch.export specialises a dimension of size 1 to a constant, and the exported encoder
        # would then refuse any other batch size.
        example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)
        with _guard(self.cfg):
            mlflow.pytorch.log_model(
                enc,
                name="encoder",
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "mocosfl"],
            )

    def add_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        with _guard(self.cfg):
            _setup(self.cfg)
            client = mlflow.MlflowClient()
            for k, v in metrics.items():
                client.log_metric(run_id, k, float(v))
