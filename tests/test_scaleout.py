"""Scale-out against a real PostgreSQL server (a throw-away cluster per module): an Optuna study shared through
it, and a worker killed with SIGKILL mid-trial whose trial is marked failed, run again, and whose MLflow runs
are ended by the worker that carries on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.services import Postgres, ServiceError, free_port
from tests.conftest import ROOT, cli_args

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster in a temp folder on a free port, stopped and deleted at the end."""
    root = Path(tempfile.mkdtemp(prefix="mocosfl-pg-"))
    root.chmod(0o755)  # the server runs as 'postgres' when the tests run as root
    pg = Postgres(root / "pg", port=free_port())
    try:
        pg.start()
    except ServiceError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"no PostgreSQL server here: {e}")
    yield pg
    pg.stop("immediate")
    shutil.rmtree(root, ignore_errors=True)


def test_url_passwords_are_redacted() -> None:
    from mocosfl.tracking import flatten, redact

    url = "postgresql://mocosfl:s3cr%t@db.example:5432/optuna"
    assert redact(url) == "postgresql://mocosfl:***@db.example:5432/optuna"
    assert redact("sqlite:////abs/optuna.db") == "sqlite:////abs/optuna.db"
    assert redact("postgresql://mocosfl@db:5432/optuna") == "postgresql://mocosfl@db:5432/optuna"  # no password
    assert flatten({"tune": {"storage": url, "n": 3}}) == {"tune.storage": redact(url), "tune.n": 3}


def _sets(prepared: list[str], tmp: Path, url: str, *extra: str) -> list[str]:
    return [
        *prepared,
        f"tune.storage={url}",
        f"tune.out_dir={tmp}/tune",
        f"metrics_dir={tmp}/metrics",
        "pretrain.num_threads=1",
        *extra,
    ]


def _states(url: str) -> list[str]:
    import optuna

    study = optuna.load_study(study_name="mocosfl", storage=url)
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_study_lives_in_postgresql(prepared, postgres, tmp_path, monkeypatch, one_thread):
    from mocosfl.cli import main

    postgres.create_database("shared_study")
    url = postgres.url("shared_study")
    monkeypatch.setenv("MOCOSFL_TRACKING", "0")
    assert main(cli_args("tune", _sets(prepared, tmp_path, url, "tune.n_trials=3"))) == 0
    result = json.loads((tmp_path / "metrics" / "tune.json").read_text())
    assert result["n_trials"] == 3 and postgres.password() not in json.dumps(result)  # the URL is shown redacted
    assert result["storage"].startswith("postgresql://mocosfl:***@")
    states = _states(url)
    assert len(states) == 3 and set(states) <= {"COMPLETE", "PRUNED"}


def test_killed_worker_trial_is_failed_rerun_and_its_runs_ended(prepared, postgres, tmp_path, monkeypatch):
    import mlflow
    import optuna

    postgres.create_database("killed_worker")
    url = postgres.url("killed_worker")
    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    sets = _sets(prepared, tmp_path, url, "tune.n_trials=3", "tune.heartbeat_s=1", "tune.steps=60")
    env = {**os.environ, "MOCOSFL_TRACKING": "1", "MLFLOW_TRACKING_URI": mlflow_uri, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "mocosfl", *cli_args("tune", sets)]
    worker = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:  # kill it once its first trial runs and has opened its MLflow run
            assert worker.poll() is None, "the worker ended before it could be killed"
            assert time.monotonic() < deadline, "no trial started within 120 s"
            try:
                study = optuna.load_study(study_name="mocosfl", storage=url)
                running = [t for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"]
            except KeyError:  # the study is not created yet
                running = []
            if running and "mlflow_run_id" in running[0].user_attrs:
                break
            time.sleep(0.3)
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
    killed = running[0]
    time.sleep(4)  # beyond the grace period of 3 heartbeats

    from mocosfl.cli import main

    monkeypatch.setenv("MOCOSFL_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    # The second worker's trials may be short: only the first had to live long enough to be killed.
    assert main(cli_args("tune", [*sets[:-1], "tune.steps=8"])) == 0
    study = optuna.load_study(study_name="mocosfl", storage=url)
    trials = study.get_trials(deepcopy=False)
    assert study.trials[killed.number].state.name == "FAIL"
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 3
    retried = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    retries = [t for t in trials if retried(t) == killed.number]
    assert len(retries) == 1 and retries[0].params == killed.params  # the same point, run again

    mlflow.set_tracking_uri(mlflow_uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs and not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    dead = mlflow.MlflowClient().get_run(killed.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED"


def test_logged_encoder_embeds_any_batch_size(prepared, tmp_path, monkeypatch, one_thread):
    """The encoder MLflow logs loads with mlflow.pytorch.load_model (no mocosfl code) and embeds 1 or 8 images."""
    import mlflow
    import mlflow.pytorch
    import torch

    from mocosfl import workflow
    from mocosfl.cli import main
    from mocosfl.config import load_config
    from pipelines.tracking import MlflowTracker

    sets = [*prepared, f"pretrain.runs_dir={tmp_path}/runs", f"metrics_dir={tmp_path}/metrics"]  # its own run
    assert main(cli_args("pretrain", sets)) == 0
    cfg = load_config(ROOT / "params.yaml", "test", sets)
    run_dir = workflow.finished_run(cfg)
    assert run_dir is not None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    tracker = MlflowTracker(cfg)
    with tracker.run("encoder"):
        tracker.log_encoder(run_dir, cfg.data.image_size)
    logged = mlflow.last_logged_model()
    assert logged is not None
    model = mlflow.pytorch.load_model(logged.model_uri)
    reference = workflow.load_encoder(run_dir)
    for batch in (1, 8):
        x = torch.randn(batch, 3, 32, 32)
        out = model(x)
        assert tuple(out.shape) == (batch, 8 * cfg.model.width)
        torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def services():
    """`make services` (python -m pipelines.services) on free ports; stopped at the end (asserting nothing is left
    listening). Yields (settings, the environment that selects them, the first start's output and seconds)."""
    from pipelines.services import Settings, pg_bin, port_open

    try:
        pg_bin("initdb")
    except ServiceError as e:
        pytest.skip(f"no PostgreSQL server here: {e}")
    root = Path(tempfile.mkdtemp(prefix="mocosfl-services-"))
    root.chmod(0o755)  # PostgreSQL runs as 'postgres' when the tests run as root
    ports = {"PG_PORT": free_port(), "MLFLOW_PORT": free_port(), "PREFECT_PORT": free_port()}
    env = {**os.environ, "SERVICES_DIR": str(root / "svc"), **{k: str(v) for k, v in ports.items()}}
    command = [sys.executable, "-m", "pipelines.services"]
    try:
        t0 = time.monotonic()
        first = subprocess.run([*command, "start"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
        assert first.returncode == 0, first.stderr
        s = Settings(root / "svc", "127.0.0.1", ports["PG_PORT"], ports["MLFLOW_PORT"], ports["PREFECT_PORT"])
        yield s, env, first.stdout, time.monotonic() - t0
    finally:
        stopped = subprocess.run([*command, "stop"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not any(port_open("127.0.0.1", p) for p in ports.values())


def _pretrain(prepared: list[str], tmp: Path, mlflow_url: str, *extra: str, timeout: float = 300) -> subprocess.Popen:
    env = {**os.environ, "MOCOSFL_TRACKING": "1", "MLFLOW_TRACKING_URI": mlflow_url, "OMP_NUM_THREADS": "1"}
    sets = [*prepared, f"pretrain.runs_dir={tmp}/runs", f"metrics_dir={tmp}/metrics", *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "mocosfl", *cli_args("pretrain", sets)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_services_serve_a_tracked_run(prepared, services, tmp_path):
    """Healthy services; a second start finds them running; a pretrain logs to the MLflow server (PostgreSQL
    behind it) and its artifacts, the encoder included, land in the server's store; the encoder is registered and
    loads from the server by its alias."""
    import mlflow
    import mlflow.pytorch
    import torch

    from pipelines.services import http_ok

    s, env, first, seconds = services
    assert http_ok(f"{s.mlflow_url}/health") and http_ok(f"{s.prefect_api}/health")
    assert f"export MLFLOW_TRACKING_URI={s.mlflow_url}" in first, first
    again = subprocess.run(
        [sys.executable, "-m", "pipelines.services", "start"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0 and "mlflow already running" in again.stdout
    # 40 steps: the test profile's 8 end "collapsed", and a collapsed run's encoder does not get the alias.
    proc = _pretrain(
        prepared, tmp_path, s.mlflow_url, "pretrain.steps=40", "pretrain.knn_every=20", "pretrain.num_threads=1"
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["collapsed"] is None, result["collapsed"]
    mlflow.set_tracking_uri(s.mlflow_url)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].info.artifact_uri.startswith("mlflow-artifacts:/")  # uploaded through the server
    assert list((s.root / "mlflow-artifacts").rglob("model.pt2"))  # the encoder, in the server's store
    digests = {i.dataset.digest for i in runs[0].inputs.dataset_inputs}
    assert digests == {result["data_hash"][:16], result["data_hash"][16:]}  # the images and the partition
    # Registered in the server's Model Registry; loads by alias from it (as on another host), any batch size.
    version = mlflow.MlflowClient().get_model_version_by_alias("mocosfl-encoder", "good")
    assert version.run_id == runs[0].info.run_id and version.tags["run_hash"] == result["run_id"]
    t0 = time.monotonic()
    encoder = mlflow.pytorch.load_model("models:/mocosfl-encoder@good")
    assert tuple(encoder(torch.randn(8, 3, 32, 32)).shape) == (8, 64)  # 8 * model.width
    loaded = time.monotonic() - t0
    print(
        f"services healthy {seconds:.1f} s after start; the encoder loaded by alias and embedded 8 images in "
        f"{loaded:.1f} s"
    )


def test_postgresql_outage_fails_the_run_in_one_line_and_it_resumes(prepared, services, tmp_path):
    """PostgreSQL stops under a tracked pretrain: the run stops within 60 s with one line, its checkpoints kept;
    with the database back, the same command resumes from the last checkpoint and finishes its MLflow run."""
    import mlflow

    s, _, _, _ = services
    pg = s.postgres()
    # A run of 80 steps (kNN rarely) that checkpoints every 5 and logs a history row every 2.
    extra = ("pretrain.steps=80", "pretrain.knn_every=40", "pretrain.checkpoint_every=5")
    proc = _pretrain(prepared, tmp_path, s.mlflow_url, *extra)
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "runs").glob("*/ckpt-*.pt")):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.2)
        pg.stop("immediate")
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        failed_after = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        pg.start()
    assert proc.returncode == 1 and failed_after < 60, (proc.returncode, failed_after)
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("mocosfl pretrain: tracking failed: MLflow at") and "run the command again" in last, last
    again = _pretrain(prepared, tmp_path, s.mlflow_url, *extra)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["resumed_from_step"] >= 5 and result["steps"] == 80
    mlflow.set_tracking_uri(s.mlflow_url)
    run = mlflow.MlflowClient().get_run(result["tracking_run_id"])
    assert run.info.status == "FINISHED"  # the run the outage interrupted, continued
    print(f"failed {failed_after:.1f} s after PostgreSQL stopped; resumed at step {result['resumed_from_step']}")


def test_work_pool_runs_a_study_and_a_results_suite_over_two_workers(prepared, services, tmp_path):
    """`make deploy` + two `make worker`s (1 thread each) on the services:

    - `prefect deployment run mocosfl/tune`: the study, in the services' PostgreSQL, ends with the requested
      COMPLETE trials, run by both workers; MLflow holds one run per trial nested under the study's run;
    - `mocosfl results --suite check --executor pool`: each run of the suite is a flow run on the pool, its row
      run logged by the worker with the entry, which also travels back through MLflow;
    - no MLflow run is left RUNNING."""
    import mlflow
    import optuna

    s, env, _, _ = services
    env = {k: v for k, v in env.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "PGPASSWORD"))}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), MOCOSFL_NO_PROGRESS="1")
    deploy = subprocess.run(
        ["bash", "scripts/pool.sh", "deploy"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert deploy.returncode == 0, deploy.stdout[-2000:] + deploy.stderr[-2000:]
    worker_env = {**env, "THREADS": "1", "MOCOSFL_TRACKING": "1", "PREFECT_WORKER_QUERY_SECONDS": "2"}
    workers = [
        subprocess.Popen(
            ["bash", "scripts/pool.sh", "worker"],
            cwd=ROOT,
            env={**worker_env, "WORKER_NAME": f"test-worker-{i}"},
            stdout=open(tmp_path / f"worker-{i}.log", "w"),  # noqa: SIM115 - closed when the process ends
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        for i in (1, 2)
    ]
    data = [o for o in prepared if not o.startswith("pretrain.num_threads")]
    sets = [
        *data,
        "tune.executor=pool",
        f"tune.storage=postgresql://mocosfl@127.0.0.1:{s.pg_port}/optuna",  # password: PGPASSWORD on the workers
        "tune.study_name=pool-test",
        "tune.n_trials=6",  # enough for the second worker, started ~10 s later, to join
        "tune.steps=8",
        "tune.pruner=none",
        f"tune.out_dir={tmp_path}/tune",
        f"metrics_dir={tmp_path}/metrics",
    ]
    client_env = {**env, "PREFECT_API_URL": s.prefect_api, "MLFLOW_TRACKING_URI": s.mlflow_url}
    suite_sets = [*data, f"pretrain.runs_dir={tmp_path}/runs", f"report.out_dir={tmp_path}/reports"]
    try:
        t0 = time.monotonic()
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("prefect")),
                "deployment",
                "run",
                "mocosfl/tune",
                "-p",
                "profile=test",
                "--params",
                json.dumps({"overrides": sets}),
                "--watch",
                "--watch-timeout",
                "400",
            ],
            cwd=ROOT,
            env=client_env,
            capture_output=True,
            text=True,
            timeout=450,
        )
        study_seconds = time.monotonic() - t0
        assert run.returncode == 0 and "Completed" in run.stdout, run.stdout[-2000:] + _logs(tmp_path)
        t0 = time.monotonic()
        suite = subprocess.run(
            [
                sys.executable,
                "-m",
                "mocosfl",
                *cli_args("results", suite_sets, "--suite", "check", "--executor", "pool"),
            ],
            cwd=ROOT,
            env={**client_env, "MOCOSFL_TRACKING": "1"},
            capture_output=True,
            text=True,
            timeout=450,
        )
        suite_seconds = time.monotonic() - t0
        assert suite.returncode == 0, suite.stderr[-3000:] + _logs(tmp_path)
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGTERM)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
    print(f"on the pool: study {study_seconds:.1f} s, check suite {suite_seconds:.1f} s")

    url = f"postgresql://mocosfl:{s.postgres().password()}@127.0.0.1:{s.pg_port}/optuna"
    trials = optuna.load_study(study_name="pool-test", storage=url).get_trials(deepcopy=False)
    assert len(trials) >= 6 and {t.state.name for t in trials} == {"COMPLETE"}, [t.state.name for t in trials]
    assert len({t.user_attrs["worker"] for t in trials}) == 2, _logs(tmp_path)  # both workers ran trials
    mlflow.set_tracking_uri(s.mlflow_url)
    found = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert not [r.info.run_name for r in found if r.info.status == "RUNNING"]
    study_run = [r for r in found if r.data.tags.get("stage") == "tune" and r.info.run_name == "tune-pool-test"]
    assert len(study_run) == 1 and study_run[0].info.status == "FINISHED"
    trial_runs = [r for r in found if r.data.tags.get("study_name") == "pool-test" and r.data.tags.get("trial")]
    assert sorted(int(r.data.tags["trial"]) for r in trial_runs) == sorted(t.number for t in trials)
    assert {r.data.tags.get("mlflow.parentRunId") for r in trial_runs} == {study_run[0].info.run_id}

    result = json.loads(suite.stdout.strip().splitlines()[-1])
    assert result["ran"] == 2 and set(result["linear_probe_top1"]) == {"MocoSFL", "random init"}
    for label in ("MocoSFL", "random init"):
        assert f"] {label}: ran on the work pool" in suite.stderr, suite.stderr[-3000:]
    row_runs = [r for r in found if r.data.tags.get("stage") == "results-row"]
    assert {r.data.tags.get("mlflow.parentRunId") for r in row_runs} == {result["mlflow_run_id"]}
    assert sorted(r.info.run_name for r in row_runs) == ["MocoSFL", "random init"]
    # The way an entry comes back from a worker on another host: from its row run's artifact.
    from pipelines.results import _fetch_entry

    key = row_runs[0].data.tags["row_key"]
    cached = tmp_path / "runs" / "results" / f"{key}.json"
    original = cached.read_text()
    cached.unlink()
    _fetch_entry(key, result["mlflow_run_id"], cached)
    assert cached.read_text() == original


def _logs(tmp_path: Path) -> str:
    return "".join((tmp_path / f"worker-{i}.log").read_text()[-3000:] for i in (1, 2))
