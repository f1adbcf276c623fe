"""Scale-out across hosts, for real, on one machine: four network namespaces on a virtual switch (tests/netns.py).

- ``db``: `make services` bound to its own address (PostgreSQL, MLflow with the proxied artifact store, Prefect),
  `make deploy`, and the `prefect deployment run` a user types;
- ``w1``: `make worker`, which runs the study: trials in the shared PostgreSQL database, runs and artifacts
  uploaded to the MLflow server over the network;
- ``store``: an sshd, the DVC remote ``w1`` pushes to and pulls from.

Nothing listens on the test machine's own interfaces: every connection crosses the switch. Skips with the reason
where namespaces cannot be created (not root, no `ip`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pytest
from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]
BIN = Path(sys.executable).parent


def _run(net, host: str, cmd: list[str], env: dict[str, str], timeout: float, cwd: Path = ROOT) -> str:
    """``cmd`` on ``host``, to its end (bounded); its output, or a failure showing it."""
    proc = net.popen(host, cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:4])} on {host} did not end in {timeout:.0f} s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} on {host} failed ({proc.returncode}):\n{out[-3000:]}"
    return out


RUNS = """
import json, mlflow
runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
print(json.dumps([[r.info.run_name, r.info.status, r.data.tags.get("mlflow.parentRunId")] for r in runs]))
"""


def test_services_worker_and_dvc_remote_on_three_hosts(prepared, tmp_path):
    from sshd import sshd_binary

    from pipelines.services import ServiceError, pg_bin

    try:
        pg_bin("initdb")
    except ServiceError as e:
        pytest.skip(f"no PostgreSQL server here: {e}")
    if sshd_binary() is None:
        pytest.skip("no OpenSSH server (Debian: apt-get install openssh-server)")
    services_dir = Path(tempfile.mkdtemp(prefix="mocosfl-hosts-"))
    services_dir.chmod(0o755)  # PostgreSQL runs as 'postgres' under root; pytest's tmp_path is closed to it
    try:
        _three_hosts(prepared, tmp_path, services_dir / "svc")
    finally:
        shutil.rmtree(services_dir, ignore_errors=True)


def _three_hosts(prepared: list[str], tmp_path: Path, services: Path) -> None:
    from netns import network
    from sshd import Sshd, running

    with network(["db", "w1", "store"]) as net:
        db = net.address("db")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "MLFLOW_", "PGPASSWORD"))}
        env = {
            **base,
            "SERVICES_DIR": str(services),
            "SERVICES_HOST": db,
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "MOCOSFL_NO_PROGRESS": "1",
        }
        t0 = time.monotonic()
        out = _run(net, "db", [sys.executable, "-m", "pipelines.services", "start"], env, timeout=180)
        started = time.monotonic() - t0
        try:
            assert f"MLflow http://{db}:5000" in out, out
            _run(net, "db", ["bash", "scripts/pool.sh", "deploy"], env, timeout=180)
            worker_env = {**env, "MOCOSFL_TRACKING": "1", "THREADS": "1", "WORKER_NAME": "w1"}
            worker_env["PREFECT_WORKER_QUERY_SECONDS"] = "2"
            net.popen(
                "w1",
                ["bash", "scripts/pool.sh", "worker"],
                cwd=ROOT,
                env=worker_env,
                stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115 - closed when the process ends
                stderr=subprocess.STDOUT,
            )
            sets = [
                *[o for o in prepared if not o.startswith("pretrain.num_threads")],
                f"tune.storage=postgresql://mocosfl@{db}:5432/optuna",
                "tune.study_name=three-hosts",
                "tune.n_trials=2",
                f"tune.out_dir={tmp_path}/tune",
                f"metrics_dir={tmp_path}/metrics",
            ]
            client = {**env, "PREFECT_API_URL": f"http://{db}:4200/api"}
            run = [str(BIN / "prefect"), "deployment", "run", "mocosfl/tune", "-p", "profile=test"]
            run += ["--params", json.dumps({"overrides": sets}), "--watch", "--watch-timeout", "300"]
            try:
                out = _run(net, "db", run, client, timeout=360)
            except AssertionError as e:
                raise AssertionError(f"{e}\nworker:\n{(tmp_path / 'worker.log').read_text()[-3000:]}") from None
            assert "Completed" in out, out[-2000:]

            study = json.loads((tmp_path / "metrics" / "tune.json").read_text())
            assert study["n_trials"] == 2 and study["storage"] == f"postgresql://mocosfl@{db}:5432/optuna"
            runs = json.loads(
                _run(net, "db", [sys.executable, "-c", RUNS], {**env, "MLFLOW_TRACKING_URI": f"http://{db}:5000"}, 120)
                .strip()
                .splitlines()[-1]
            )
            assert sorted(name for name, _, _ in runs) == ["trial-0", "trial-1", "tune-three-hosts"], runs
            assert {status for _, status, _ in runs} == {"FINISHED"}, runs
            # The study's files went up through the MLflow server into its artifact store on `db`.
            assert list((services / "mlflow-artifacts").rglob("tune/tune.json"))
            traffic = net.counters("w1")
            assert traffic["tx"] > 100_000 and traffic["rx"] > 100_000, traffic  # w1 talked to db over the wire
        finally:
            _run(net, "db", [sys.executable, "-m", "pipelines.services", "stop"], env, timeout=120)

        # DVC: w1 pushes to the remote on `store` over SSH and pulls back into an emptied workspace.
        server = Sshd(tmp_path / "sshd", host=net.address("store"))
        server.configure()
        with running(server, popen=partial(net.popen, "store"), ready=server.listening):
            repo, remote = tmp_path / "repo", tmp_path / "store-remote"
            repo.mkdir()
            dvc_env = {**base, "HOME": str(tmp_path / "home"), "DVC_NO_ANALYTICS": "1"}
            dvc = partial(_run, net, "w1", env=dvc_env, timeout=120, cwd=repo)
            content = os.urandom(200_000)
            (repo / "shards.npz").write_bytes(content)
            dvc([str(BIN / "dvc"), "init", "--no-scm", "-q"])
            dvc([str(BIN / "dvc"), "add", "-q", "shards.npz"])
            dvc([str(BIN / "dvc"), "remote", "add", "-d", "store", server.url(remote)])
            dvc([str(BIN / "dvc"), "remote", "modify", "--local", "store", "keyfile", str(server.client_key)])
            dvc([str(BIN / "dvc"), "push"])
            assert [p.read_bytes() for p in remote.rglob("*") if p.is_file()] == [content]
            for path in (repo / ".dvc" / "cache", repo / "shards.npz"):
                subprocess.run(["rm", "-rf", str(path)], check=True, timeout=30)
            dvc([str(BIN / "dvc"), "pull"])
            assert (repo / "shards.npz").read_bytes() == content
            assert "Accepted publickey" in server.log.read_text()
    print(f"services on a namespace host healthy {started:.1f} s after start")
