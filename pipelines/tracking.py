"""MLflow at the edge: the ``mocosfl.tracking.Tracker`` the stages report to, in a project-local store.

Registered as the ``mlflow`` tracker of the ``mocosfl.trackers`` entry-point group (pyproject.toml); the
library finds it there and never imports this module. The functions below are also used directly by the
other edge modules (tuning, results).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from mocosfl import identity
from mocosfl.config import Config
from mocosfl.tracking import DatasetInput, TrackingError, flatten

# History rows carry these per-epoch metrics (see TrainLoop.run).
ROW_METRICS = ("loss_mean", "lr", "steps_per_s", "bytes_per_client", "knn_top1", "epoch")
# A pretrain run's tags that a registered encoder version carries too (with the MLflow run id).
IDENTITY_TAGS = ("profile", "method", "run_hash", "code_hash", "data_hash", "git_commit")

log = logging.getLogger("mocosfl.pipelines.tracking")

__all__ = [
    "MlflowTracker",
    "enabled",
    "flatten",
    "git_commit",
    "log_row",
    "mlflow_run",
    "registered_encoder",
    "registered_name",
    "run_url",
    "tracking_uri",
]


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
    parent_run_id: str | None = None,
    log_system_metrics: bool | None = None,
) -> Iterator[Any]:
    """Start (or continue, given ``run_id``) a run tagged with the profile; the config as params.
    ``parent_run_id`` nests it under a RUNNING run of another process (a study's run, for its trials).
    ``log_system_metrics``: sample system/* metrics while it runs (None: $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING)."""
    _setup(cfg)
    all_tags = {"profile": cfg.profile, **(tags or {})}
    with mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested,
        tags=all_tags,
        parent_run_id=parent_run_id,
        log_system_metrics=log_system_metrics,
    ) as run:
        if log_params and run_id is None:
            # MLflow caps a param value at 6000 chars; config values are short.
            mlflow.log_params({k: str(v) for k, v in flatten(cfg.to_dict()).items()})
        yield run


def registered_encoder(cfg: Config) -> str | None:
    """``models:/<name>@<alias> (version N)`` when the alias exists in the registry, else None (also when the
    registry cannot be reached: this is a hint, not a record)."""
    name, alias = registered_name(cfg), cfg.tracking.model_alias
    if not name:
        return None
    try:
        _setup(cfg)
        version = mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - no such model or alias yet, or no server
        return None
    return f"models:/{name}@{alias} (version {version.version})"


def _input_spec(preprocess: dict[str, Any]) -> dict[str, Any]:
    """What the encoder expects, for a user without mocosfl (in its MLmodel: ``get_model_info(uri).metadata``)."""
    return {
        "input": "float32 [batch, 3, image_size, image_size]: RGB in [0, 1], minus mean, divided by std (per channel)",
        "image_size": int(preprocess["image_size"]),
        "mean": [float(v) for v in preprocess["mean"]],
        "std": [float(v) for v in preprocess["std"]],
    }


def _stop_system_metrics(run_id: str) -> None:
    """Stop the system-metrics thread of a run that MLflow failed to end (``end_run`` stops it only after the
    run is marked ended), so it does not sample on in this process; not joined: it may be waiting on a server
    that is down (it is a daemon thread, which never holds the process)."""
    monitors = getattr(mlflow.tracking.fluent, "run_id_to_system_metrics_monitor", {})
    monitor = monitors.pop(run_id, None)
    if monitor is not None:
        monitor._shutdown_event.set()


def _import_mlflow_pytorch() -> Any:
    """``mlflow.pytorch``, less the root log handler its first import installs (``logging.basicConfig`` in
    mlflow/pytorch/_lightning_autolog.py), through which every later ``mocosfl`` log line printed twice."""
    if "mlflow.pytorch" in sys.modules:
        return sys.modules["mlflow.pytorch"]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    import mlflow.pytorch

    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)
    return mlflow.pytorch


def registered_name(cfg: Config, method: str = "mocosfl") -> str:
    """The Model Registry name of ``method``'s encoder: ``tracking.registered_model`` for MocoSFL,
    ``<name>-<method>`` for a baseline; "" when encoders are not registered."""
    name = cfg.tracking.registered_model
    return name if not name or method == "mocosfl" else f"{name}-{method}"


class _InputDataset(MetaDataset):
    """A ``DatasetInput`` as an MLflow dataset: metadata only (no data, the digest given), with its profile."""

    def __init__(self, d: DatasetInput):
        self._profile = d.profile
        with warnings.catch_warnings():  # a local path matches MLflow's "" and "file" sources, the same class
            warnings.filterwarnings("ignore", "The specified dataset source can be interpreted in multiple ways")
            source = resolve_dataset_source(d.source)
        super().__init__(source, name=d.name, digest=d.digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return super().to_dict() | {"profile": json.dumps(self._profile)}


def log_row(row: dict[str, float]) -> None:
    """Per-epoch metrics of one history row at its step (one batched call, not one per metric)."""
    metrics = {k: float(row[k]) for k in ROW_METRICS if k in row}
    if metrics:
        mlflow.log_metrics(metrics, step=int(row["step"]))


def require_run(cfg: Config, run_id: str | None) -> None:
    """Check ``run_id`` (a parent run of another process) is in this process's tracking store: a pool's worker
    pointed at another store would otherwise fail only when it logs, after its work."""
    if not run_id or not enabled(cfg):
        return
    with _guard(cfg):
        _setup(cfg)
        mlflow.MlflowClient().get_run(run_id)


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
        system = self._system_metrics(tags)
        with _guard(self.cfg):
            context = mlflow_run(self.cfg, name, run_id=resume_id, nested=nested, tags=tags, log_system_metrics=system)
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
                _stop_system_metrics(str(run.info.run_id))
            raise
        try:
            with _guard(self.cfg):
                context.__exit__(None, None, None)
        except TrackingError:
            _stop_system_metrics(str(run.info.run_id))
            raise

    def _system_metrics(self, tags: dict[str, str] | None) -> bool | None:
        """True for a pretrain run when ``tracking.system_metrics`` (MLflow samples system/* metrics every
        $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10, in a daemon thread); None leaves it to MLflow."""
        if not (self.cfg.tracking.system_metrics and (tags or {}).get("stage") == "pretrain"):
            return None
        if importlib.util.find_spec("psutil") is None:  # MLflow would fail the run
            log.warning("system metrics are off: psutil is not installed (pip install psutil)")
            return None
        # Quiet: 4 INFO lines a run, and a warning when the server is down, which TrackingError reports already.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        return True

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

    def log_dataset(self, dataset: DatasetInput) -> None:
        """``dataset`` as an MLflow dataset input of the run (metadata only: name, source, digest, profile)."""
        if mlflow.active_run() is not None:
            with _guard(self.cfg):
                mlflow.log_input(_InputDataset(dataset), context=dataset.context)

    def log_encoder(self, run_dir: Path, image_size: int, collapsed: str | None = None) -> None:
        """The encoder as an MLflow model (offline: explicit requirements and an input example), exported with
        torch.export (pt2: only torch is needed to load it) for any batch size; registered as a new version of
        ``registered_name`` (tagged with the run's identity), which ``tracking.model_alias`` then points at
        unless the run ``collapsed``."""
        import numpy as np
        import torch

        from mocosfl.workflow import load_encoder

        mlflow_pytorch = _import_mlflow_pytorch()
        active = mlflow.active_run()
        if active is None:
            return
        run_id = active.info.run_id
        enc = load_encoder(run_dir)
        # Two images: torch.export specialises a dimension of size 1 to a constant, and the exported encoder
        # would then refuse any other batch size.
        example = np.zeros((2, 3, image_size, image_size), dtype=np.float32)
        with _guard(self.cfg):
            run = mlflow.get_run(run_id)
            name = registered_name(self.cfg, run.data.tags.get("method", "mocosfl"))
            identity = {k: run.data.tags[k] for k in IDENTITY_TAGS if k in run.data.tags} | {"run_id": run_id}
            if "final.knn_top1" in run.data.metrics:
                identity["knn_top1"] = f"{run.data.metrics['final.knn_top1']:.2f}"
            if collapsed:
                identity["collapsed"] = collapsed
            info = mlflow_pytorch.log_model(
                enc,
                name="encoder",
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata=_input_spec(enc.preprocess),
                registered_model_name=name or None,
                tags=identity,  # the logged model's and its registered version's
            )
            if not name:
                return
            version = str(info.registered_model_version)
            alias = self.cfg.tracking.model_alias
            mlflow.set_tags({"registered_model": name, "registered_model_version": version})
            if collapsed:
                log.warning(
                    "encoder registered as %s version %s; alias '%s' not moved: the run collapsed (%s)",
                    name,
                    version,
                    alias,
                    collapsed,
                )
                return
            mlflow.MlflowClient().set_registered_model_alias(name, alias, version)
        log.info("encoder registered: models:/%s@%s (version %s, in %s)", name, alias, version, tracking_uri(self.cfg))

    def add_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        with _guard(self.cfg):
            _setup(self.cfg)
            client = mlflow.MlflowClient()
            for k, v in metrics.items():
                client.log_metric(run_id, k, float(v))
