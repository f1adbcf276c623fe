"""The two servers users start: `make serve` (Prefect + deployments) and `make ui` (MLflow), for real."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]
VENV_BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, timeout: float, proc: subprocess.Popen) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"server exited early with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.read().decode(errors="replace")
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} not reachable within {timeout} s")


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl-C to the whole process group, as a terminal would; then make sure it is gone."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_make_ui_serves_mlflow(tmp_path: Path) -> None:
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_PORT": str(port),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "VENV": str(VENV_BIN.parent),
    }
    proc = subprocess.Popen(
        ["bash", "scripts/ui.sh"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        page = _wait_http(f"http://127.0.0.1:{port}/", 120, proc)
        assert "mlflow" in page.lower()
    finally:
        _stop(proc)
    assert f"http://127.0.0.1:{port}" in proc.stdout.read()  # type: ignore[union-attr]


def test_prefect_deployment_run_pretrain(prepared: list[str], tmp_path: Path) -> None:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {
        **os.environ,
        "PREFECT_PORT": str(port),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "VENV": str(VENV_BIN.parent),
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MOCOSFL_TRACKING": "1",
        "MOCOSFL_NO_PROGRESS": "1",
        "PREFECT_API_URL": api,
    }
    serve = subprocess.Popen(
        ["bash", "scripts/serve.sh"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=open(tmp_path / "serve.log", "w"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_http(f"{api}/health", 180, serve)
        prefect = str(VENV_BIN / "prefect")
        deadline = time.time() + 120
        while time.time() < deadline:  # the deployments appear once `serve` has registered them
            out = subprocess.run([prefect, "deployment", "ls"], env=env, capture_output=True, text=True).stdout
            if "pretrain" in out:
                break
            time.sleep(2)
        # Own runs dir: test_cli may already have trained this config, and a finished run logs no MLflow run.
        overrides = json.dumps(
            prepared + [f"metrics_dir={tmp_path / 'metrics'}", f"pretrain.runs_dir={tmp_path / 'runs'}"]
        )
        command = [
            prefect,
            "deployment",
            "run",
            "mocosfl/pretrain",
            "-p",
            "profile=test",
            "-p",
            f"overrides={overrides}",
            "--watch",
            "--watch-timeout",
            "600",
        ]
        # Another pipeline holds the checkout: the flow run waits for it, writing nothing meanwhile.
        from pipelines.lock import exclusive

        with exclusive("test holder", ROOT):
            run = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            deadline = time.time() + 120
            while "waiting for test holder" not in (tmp_path / "serve.log").read_text():
                assert run.poll() is None and time.time() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
            time.sleep(2)
            assert not (tmp_path / "metrics").exists()  # nothing written while it waits
        out, _ = run.communicate(timeout=700)
        log = (tmp_path / "serve.log").read_text()
        assert run.returncode == 0, out + log[-3000:]
        assert "Completed" in out, out
        assert "lock acquired after" in log, log[-3000:]
    finally:
        _stop(serve)

    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["linear_probe_top1"] >= 0
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(experiment_names=["mocosfl"], output_format="list")
    stages = sorted(r.data.tags.get("stage", "") for r in runs)
    assert "pretrain" in stages and "evaluate" in stages, stages
    # Provenance describes this run: its own code and data hashes, the checkout's commit, no DVC md5s
    # (DVC did not produce its inputs).
    from mocosfl.identity import code_hash, git_commit

    pretrain_run = next(r for r in runs if r.data.tags.get("stage") == "pretrain")
    tags = pretrain_run.data.tags
    result = json.loads((tmp_path / "metrics" / "pretrain.json").read_text())
    assert tags["code_hash"] == code_hash() == result["code_hash"]
    assert tags["data_hash"] == result["data_hash"] and tags["run_hash"] == result["run_id"]
    assert tags.get("git_commit") == git_commit()
    assert not [k for k in tags if k.startswith("dvc.")]
    evaluation = next(r for r in runs if r.data.tags.get("stage") == "evaluate")
    assert evaluation.data.tags["pretrain_run_id"] == pretrain_run.info.run_id
    assert "eval.linear_probe_top1" in mlflow.get_run(pretrain_run.info.run_id).data.metrics
    # The library's log lines reach Prefect (PREFECT_LOGGING_EXTRA_LOGGERS=mocosfl).
    assert "extracting features" in log, log[-3000:]
