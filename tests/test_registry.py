"""The encoder in MLflow's Model Registry (real MLflow, a temp SQLite store): a tracked pretrain registers it,
points the alias at it, and it loads by that alias without mocosfl's code; the run's dataset inputs and
system metrics."""

from __future__ import annotations

import json
import threading
import time

import pytest

from tests.conftest import ROOT, cli_args

pytestmark = [pytest.mark.integration]

NAME, ALIAS = "mocosfl-encoder", "good"  # params.yaml's tracking.registered_model / model_alias


def test_pretrain_registers_its_encoder_under_the_alias(prepared, tmp_path, monkeypatch, one_thread):
    import mlflow
    import mlflow.pytorch
    import torch

    from mocosfl import workflow
    from mocosfl.cli import main
    from mocosfl.config import load_config
    from pipelines.tracking import MlflowTracker

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MOCOSFL_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # MLflow's default, 10 s, outlasts the run
    # 40 steps: the test profile's 8 end at the loss of features that tell nothing apart (a "collapsed" run).
    sets = [
        *prepared,
        f"pretrain.runs_dir={tmp_path}/runs",
        f"metrics_dir={tmp_path}/metrics",
        "pretrain.steps=40",
        "pretrain.knn_every=20",
        "pretrain.num_threads=1",  # 2 threads crawl when anything else runs on the 2 cores
    ]
    t0 = time.perf_counter()
    assert main(cli_args("pretrain", sets)) == 0
    seconds = time.perf_counter() - t0
    # MLflow's sampling thread ended with the run: nothing is left to hold the process.
    assert not [t for t in threading.enumerate() if t.name == "SystemMetricsMonitor"]
    result = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert result["collapsed"] is None, f"this config should not collapse: {result['collapsed']}"
    run_id = result["tracking_run_id"]

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert str(version.version) == "1" and version.run_id == run_id
    assert version.tags["run_id"] == run_id and version.tags["profile"] == "test"
    assert version.tags["run_hash"] == result["run_id"] and version.tags["data_hash"] == result["data_hash"]
    if result.get("git_commit"):
        assert version.tags["git_commit"] == result["git_commit"]
    run = client.get_run(run_id)
    assert run.data.tags["registered_model"] == NAME and run.data.tags["registered_model_version"] == "1"

    # By alias, as on another machine: a torch.export graph, no mocosfl code; any batch size.
    model = mlflow.pytorch.load_model(f"models:/{NAME}@{ALIAS}")
    cfg = load_config(ROOT / "params.yaml", "test", sets)
    reference = workflow.load_encoder(result["run_dir"])
    for batch in (8, 1):
        x = torch.randn(batch, 3, 32, 32)
        out = model(x)
        assert tuple(out.shape) == (batch, 8 * cfg.model.width)
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)

    spec = mlflow.models.get_model_info(f"models:/{NAME}@{ALIAS}").metadata  # how to normalize, without mocosfl
    assert spec["image_size"] == 32 and spec["mean"] == list(reference.preprocess["mean"])

    # Dataset inputs: the images (digest: the first half of data_hash) and the partition (the second half).
    inputs = {t.value: i.dataset for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert set(inputs) == {"training", "partition"}
    images, shards = inputs["training"], inputs["partition"]
    assert images.digest + shards.digest == result["data_hash"]
    assert images.name == "cifar10-jpeg-32px" and json.loads(images.source)["uri"] == cfg.data.source
    profile = json.loads(images.profile)
    assert (profile["train_images"], profile["val_images"], profile["test_images"]) == (2000, 200, 400)
    assert json.loads(shards.profile)["num_clients"] == cfg.partition.num_clients
    # System metrics, sampled each second while it trained.
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in system, sorted(run.data.metrics)

    # A later good run moves the alias to its version; a collapsed one is registered but leaves the alias.
    tracker = MlflowTracker(cfg)
    tags = {"stage": "pretrain", "method": "mocosfl"}
    with tracker.run("again", tags=tags) as again:
        tracker.log_encoder(result["run_dir"], cfg.data.image_size)
    assert client.get_model_version_by_alias(NAME, ALIAS).run_id == again
    with tracker.run("collapsed", tags=tags):
        tracker.log_encoder(result["run_dir"], cfg.data.image_size, collapsed="kNN top-1 10.0% is at chance (10%)")
    assert str(client.get_model_version_by_alias(NAME, ALIAS).version) == "2"
    assert client.get_model_version(NAME, "3").tags["collapsed"].startswith("kNN top-1")
    # A baseline's encoder goes to a model of its own; registered_model="" registers nothing.
    with tracker.run("central", tags={**tags, "method": "central"}):
        tracker.log_encoder(result["run_dir"], cfg.data.image_size)
    assert str(client.get_model_version_by_alias(f"{NAME}-central", ALIAS).version) == "1"
    off = MlflowTracker(cfg.replace(**{"tracking.registered_model": ""}))
    with off.run("unregistered", tags=tags):
        off.log_encoder(result["run_dir"], cfg.data.image_size)
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3
    print(f"tracked pretrain (40 steps, export, registration) {seconds:.1f} s")
