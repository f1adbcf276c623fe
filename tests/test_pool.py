"""tune.executor=pool before anything is submitted: the config that travels to other hosts, and the one-line
errors for a pool that cannot be used. (The study on a real pool: tests/test_scaleout.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from mocosfl.config import ConfigError, from_portable, load_config, portable
from tests.conftest import PARAMS


def test_a_config_travels_to_a_checkout_elsewhere(tmp_path: Path) -> None:
    """Paths in the checkout or beside it follow the checkout (another depth included); others stay as they are."""
    here, there = tmp_path / "here" / "mocosfl", tmp_path / "elsewhere" / "deeper" / "checkout"
    moved_keys = {
        "data.source": str(here.parent / "shared" / "cifar.tar.gz"),
        "pretrain.runs_dir": str(here / "runs"),
    }
    cfg = load_config(PARAMS, "test", ["tune.storage=postgresql://mocosfl@db:5432/optuna"]).replace(
        **moved_keys, **{"metrics_dir": "/srv/mocosfl/metrics"}
    )
    raw = portable(cfg, here)
    assert raw["data"]["source"] == "../shared/cifar.tar.gz" and raw["pretrain"]["runs_dir"] == "runs"
    assert raw["metrics_dir"] == "/srv/mocosfl/metrics"  # outside the checkout's folder: the same on every host
    assert raw["tune"]["storage"] == "postgresql://mocosfl@db:5432/optuna"  # a URL is left alone
    moved = from_portable(raw, there)
    assert moved.pretrain.runs_dir == str(there / "runs")
    assert moved.data.source == str(there.parent / "shared" / "cifar.tar.gz")
    assert moved.metrics_dir == "/srv/mocosfl/metrics"
    assert moved.replace(**moved_keys) == cfg


def test_pool_settings_are_validated() -> None:
    with pytest.raises(ConfigError, match="tune.executor"):
        load_config(PARAMS, "test", ["tune.executor=cluster"])
    with pytest.raises(ConfigError, match="tune.pool_runs"):
        load_config(PARAMS, "test", ["tune.pool_runs=0"])


def test_a_pool_that_cannot_be_used_says_why_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import pool
    from pipelines.tune import _check_pool_config

    with_password = load_config(PARAMS, "test", ["tune.executor=pool", "tune.storage=postgresql://u:s3cret@db/optuna"])
    with pytest.raises(pool.PoolError, match="PGPASSWORD") as e:
        _check_pool_config(with_password)
    assert "s3cret" not in str(e.value)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_PROFILES_PATH", "/nonexistent/profiles.toml")  # no profile supplies a URL
    no_server = load_config(PARAMS, "test", ["tune.executor=pool", "tune.storage=postgresql://u@db/optuna"])
    with pytest.raises(pool.PoolError, match="PREFECT_API_URL is not set: start the services"):
        _check_pool_config(no_server)


def test_a_password_never_goes_into_flow_run_parameters() -> None:
    from pipelines import pool

    with pytest.raises(pool.PoolError, match="PGPASSWORD") as e:
        pool.submit(pool.TUNE_TRIALS, {"config": {"tune": {"storage": "postgresql://u:s3cret@db/optuna"}}}, 1, "x")
    assert "s3cret" not in str(e.value)


def test_a_worker_does_not_create_a_private_study(tmp_path: Path) -> None:
    """A flow run joining a study that its storage does not hold (another host's SQLite file) fails in one line
    instead of running the whole study on its own."""
    from pipelines import pool
    from pipelines.tune import load_study

    cfg = load_config(PARAMS, "test", [f"tune.storage={tmp_path}/optuna.db", "tune.study_name=elsewhere"])
    with pytest.raises(pool.PoolError, match="study elsewhere is not in sqlite:///.*this worker does not share"):
        load_study(cfg, create=False)
    load_study(cfg)  # the starter creates it
    assert load_study(cfg, create=False).study_name == "elsewhere"
