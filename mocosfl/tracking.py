"""The sink that stages report to: metrics, artifacts, tags and a run id, whatever records them.

The library never imports a tracker. A caller (the CLI, a Prefect task, a notebook) passes a
``Tracker`` to the stages; ``NullTracker`` records nothing. The MLflow implementation lives in the
MLOps edge (``pipelines/tracking.py``) and is found through the ``mocosfl.trackers`` entry-point group.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mocosfl.trackers"
EXTRA = "pip install 'mocosfl[pipeline]'  (from a checkout: pip install '.[pipeline]')"


class TrackingError(RuntimeError):
    """The tracker could not record (e.g. its server or database is down). Raised instead of retrying for
    minutes; training's checkpoints are kept, so running the command again resumes the run."""


@dataclass(frozen=True)
class DatasetInput:
    """The identity of data a run read, not the data: name, where it came from, a digest that changes when
    it does (at most 36 characters), the role it played (``context``: "training", "evaluation", ...) and a
    small ``profile`` of JSON values (sizes, the knobs that selected it)."""

    name: str
    digest: str
    source: str
    context: str
    profile: dict[str, Any] = field(default_factory=dict)


class Tracker(Protocol):
    """What a stage may report. Calls outside an open ``run`` are ignored by implementations."""

    def run(
        self,
        name: str,
        *,
        resume_id: str | None = None,
        tags: dict[str, str] | None = None,
        params: dict[str, Any] | None = None,
    ) -> AbstractContextManager[str | None]:
        """Open (or continue, given ``resume_id``) a run; yields its id (None when nothing records)."""
        ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: Path, folder: str | None = None) -> None: ...

    def log_dataset(self, dataset: DatasetInput) -> None:
        """An input of the open run (its data's identity)."""
        ...

    def log_encoder(self, run_dir: Path, image_size: int, collapsed: str | None = None) -> None:
        """The trained encoder of ``run_dir`` as a loadable model, where the tracker supports it. ``collapsed``:
        why the run counts as collapsed (``collapse_reason``), None for a usable encoder."""
        ...

    def add_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        """Metrics put on another (finished) run, e.g. evaluation numbers on their pretrain run."""
        ...


class NullTracker:
    """Records nothing: the default, and what tracking.enabled=false gives."""

    @contextmanager
    def run(self, name: str, **_: Any) -> Iterator[str | None]:
        yield None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        pass

    def log_dataset(self, dataset: DatasetInput) -> None:
        pass

    def log_encoder(self, run_dir: Path, image_size: int, collapsed: str | None = None) -> None:
        pass

    def add_to_run(self, run_id: str, metrics: dict[str, float]) -> None:
        pass


_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]+:)[^@\s]+@")


def redact(value: Any) -> Any:
    """``value`` with the password of any ``scheme://user:password@host`` URL in it replaced by ``***``
    (recursively through dicts and lists): what configs may show in run params, files and logs."""
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (a config as run params), URL passwords redacted."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = redact(v)
    return out


def load_tracker(cfg: Any, name: str = "mlflow") -> Tracker:
    """The installed tracker ``name`` for this config, or a NullTracker (with one warning) when absent.

    ``cfg.tracking.enabled`` false gives a NullTracker silently.
    """
    if not cfg.tracking.enabled:
        return NullTracker()
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    try:
        if not found:
            raise ImportError(f"no '{name}' tracker is registered")
        factory = found[0].load()
    except ImportError as e:
        log.warning("tracking is off: %s (%s); or set tracking.enabled=false", _missing(e), EXTRA)
        return NullTracker()
    return factory(cfg)  # type: ignore[no-any-return]


def _missing(e: ImportError) -> str:
    return f"{e.name} is not installed" if getattr(e, "name", None) else str(e)
