"""`mocosfl tune` end to end on the test profile: results, nested MLflow runs, pruning, extending a study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import cli_args

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def _tune(overrides: list[str], tmp: Path, *extra: str) -> dict:
    from mocosfl.cli import main

    sets = [
        *overrides,
        f"tune.storage={tmp}/optuna.db",
        f"tune.out_dir={tmp}/tune",
        f"metrics_dir={tmp}/metrics",
        *extra,
    ]
    assert main(cli_args("tune", sets)) == 0
    return json.loads((tmp / "metrics" / "tune.json").read_text())


@pytest.fixture(scope="module")
def study(prepared, tmp_path_factory, one_thread):
    """A 3-trial study logged to a temp MLflow store; test_extend_study adds to it."""
    tmp = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOCOSFL_TRACKING", "1")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        result = _tune(prepared, tmp, "tune.n_trials=3")
    return tmp, uri, result


def test_study_with_mlflow(study):
    import mlflow

    tmp_path, uri, result = study
    assert result["n_trials"] == 3 and result["n_complete"] + result["n_pruned"] == 3
    assert set(result["best_params"]) == {"sync_period", "queue_size"}
    assert 0 <= result["best_value"] <= 100
    for name in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "tune" / name).stat().st_size > 0
    best = json.loads((tmp_path / "tune" / "best_params.json").read_text())
    assert best["overrides"] == [
        f"sfl.sync_period={result['best_params']['sync_period']}",
        f"moco.queue_size={result['best_params']['queue_size']}",
    ]
    assert best["best_value"] == result["best_value"]

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["stage"] == "tune" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "tune")} >= {
        "tune/tune.json",
        "tune/best_params.json",
        "tune/optimization_history.png",
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 3
    for run in children:
        assert run.data.tags["stage"] == "tune-trial"
        assert run.data.tags["trial_state"] in ("COMPLETE", "PRUNED")
        assert run.info.status in ("FINISHED", "KILLED")
        assert {"sync_period", "queue_size", "sfl.sync_period"} <= set(run.data.params)
        assert client.get_metric_history(run.info.run_id, "knn_top1")  # intermediate values
        if run.data.tags["trial_state"] == "COMPLETE":
            assert "objective_val_knn_top1" in run.data.metrics


def test_every_trial_pruned(prepared, tmp_path, monkeypatch, one_thread):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MOCOSFL_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # kNN top-1 is a percentage: no trial can clear 101, so each is pruned at its first report.
    result = _tune(prepared, tmp_path, "tune.n_trials=2", "tune.pruner=threshold", "tune.threshold_knn=101")
    assert result["n_pruned"] == result["n_trials"] == 2
    assert result["n_complete"] == 0
    assert result["best_value"] is None and result["best_params"] == {}
    assert all(t["last_step"] == 2 for t in result["trials"])  # tune.knn_every of the test profile
    best = json.loads((tmp_path / "tune" / "best_params.json").read_text())
    assert best == {"overrides": [], "best_value": None, "study_name": "mocosfl"}
    assert (tmp_path / "tune" / "param_importances.png").exists()

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted((r.info.status, r.data.tags["trial_state"]) for r in children) == [("KILLED", "PRUNED")] * 2


def test_extend_study(prepared, study, one_thread):
    tmp, _, first = study
    assert first["n_trials"] == 3
    again = _tune(prepared, tmp)  # the test profile's tune.n_trials=3 is already reached: no new trial
    assert len(again["trials"]) == 3
    extended = _tune(prepared, tmp, "tune.n_trials=4")
    assert extended["n_trials"] == 4 and len(extended["trials"]) == 4
    assert [t["number"] for t in extended["trials"]] == [0, 1, 2, 3]
    assert extended["trials"][:3] == first["trials"]


def _fake_test_images(cfg, root: Path, noise: bool):
    """``cfg`` on a copy of its prepared data whose test images are noise with shuffled labels (or the real ones)."""
    import numpy as np

    from mocosfl.data.prepare import prepared_path

    src = prepared_path(cfg.data.source, cfg.data.prepared_dir, cfg.data.image_size)
    dst = prepared_path(cfg.data.source, root / "prepared", cfg.data.image_size)
    dst.mkdir(parents=True)
    keep = ("train_x.npy", "train_y.npy", "meta.json") + (() if noise else ("test_x.npy", "test_y.npy"))
    for name in keep:
        (dst / name).symlink_to(src / name)
    if noise:
        g = np.random.default_rng(7)
        shape = np.load(src / "test_x.npy", mmap_mode="r").shape
        np.save(dst / "test_x.npy", g.integers(0, 256, shape, dtype=np.uint8))
        np.save(dst / "test_y.npy", g.permutation(np.load(src / "test_y.npy")))
    where = {"data.prepared_dir": root / "prepared", "partition.out_dir": root / "partitions"}
    where |= {"pretrain.runs_dir": root / "runs", "metrics_dir": root / "metrics", "tune.out_dir": root / "tune"}
    return cfg.replace(**{k: str(v) for k, v in where.items()})


def test_objective_never_reads_test_images(prepared, tmp_path, one_thread):
    """The same trial scores the same with the test images replaced by noise; the test numbers do move."""
    import optuna

    from mocosfl import workflow
    from mocosfl.config import load_config
    from pipelines.tune import make_objective, trial_config
    from tests.conftest import PARAMS

    base = load_config(PARAMS, "test", prepared)
    values, test_knn, runs = [], [], set()
    for noise in (False, True):
        cfg = _fake_test_images(base, tmp_path / str(noise), noise)
        workflow.ensure_partition(cfg)  # what run_study does before the trials
        trial = optuna.trial.FixedTrial({"sync_period": 2, "queue_size": 256})
        values.append(make_objective(cfg)(trial))
        trial_cfg = trial_config(cfg, trial)
        runs.add(workflow.run_dir(trial_cfg, workflow.Dataset(trial_cfg), workflow.shards_path(trial_cfg)).name)
        test_knn.append(workflow.evaluate(trial_cfg)["knn_top1"])
    assert len(runs) == 2  # other test data, other run: the second trial trained afresh, not from cache
    assert test_knn[0] != test_knn[1]  # the swap reached the test set ...
    assert values[0] == values[1]  # ... and not the objective
