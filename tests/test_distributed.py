"""Distributed MocoSFL (mocosfl.distributed): real processes on torch.distributed against the simulation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS, ROOT, cli_args
from netns import network

from mocosfl.config import ConfigError, load_config
from mocosfl.distributed.launch import check_supported, parse_endpoint
from mocosfl.distributed.roles import DistributedError, LocalImages, client_hosts_of, role_rank


def test_client_hosts_own_disjoint_contiguous_blocks() -> None:
    owner = client_hosts_of(10, 3)
    assert owner.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert (np.diff(owner) >= 0).all() and set(owner) == {0, 1, 2}
    with pytest.raises(ConfigError, match="between 1 and partition.num_clients=4"):
        client_hosts_of(4, 5)


def test_a_client_host_reads_only_its_own_images() -> None:
    pixels = np.arange(3 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 3)
    images = LocalImages(pixels, num_train=10, own=np.array([7, 2, 5]))  # rows in sorted-index order
    assert len(images) == 10
    assert np.array_equal(images[np.array([5, 2])], pixels[[1, 0]])
    with pytest.raises(DistributedError, match="does not own"):
        images[np.array([2, 3])]


def test_unsupported_options_are_refused_with_one_line(tmp_path: Path) -> None:
    cfg = load_config(PARAMS, "test", ["distributed.client_hosts=2"])
    with pytest.raises(ConfigError, match="MocoSFL only"):
        check_supported(cfg, "flmoco", 20)
    with pytest.raises(ConfigError, match="between 1 and partition.num_clients=1"):
        check_supported(cfg, "mocosfl", 1)
    with pytest.raises(ConfigError, match="compile=on is not supported"):
        check_supported(cfg.replace(**{"pretrain.compile": "on"}), "mocosfl", 20)
    with pytest.raises(ConfigError, match="expected host:port"):
        parse_endpoint("localhost")
    with pytest.raises(ConfigError, match="distributed.client_hosts=-1 is invalid"):
        load_config(PARAMS, "test", ["distributed.client_hosts=-1"])


def test_roles_name_ranks_and_bad_roles_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    assert role_rank("server", 2) == 0 and role_rank("0", 2) == 1 and role_rank("1", 2) == 2
    monkeypatch.setenv("RANK", "2")
    assert role_rank(None, 2) == 2  # one host: torchrun's own rank
    for bad in ("2", "-1", "client"):
        with pytest.raises(ConfigError, match=f"role '{bad}' is invalid: `server` or a client host from 0 to 1"):
            role_rank(bad, 2)


STEPS = ["pretrain.steps=20"]


def pretrain_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "mocosfl", *cli_args("pretrain", overrides)]


def pretrain_result(overrides: list[str], metrics: Path) -> dict:
    done = subprocess.run(
        pretrain_cmd(overrides + [f"metrics_dir={metrics}"]), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((metrics / "pretrain.json").read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def simulated(prepared: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The in-process run every distributed run is compared with (test profile, 20 steps)."""
    return pretrain_result(prepared + STEPS, tmp_path_factory.mktemp("simulated"))


def assert_same_numbers(sim: dict, dist: dict) -> None:
    """The stated tolerance of a distributed run against the simulation (float reduction order)."""
    assert len(dist["history"]) == len(sim["history"]) == 20
    for a, b in zip(sim["history"], dist["history"], strict=True):
        assert abs(b["loss_mean"] - a["loss_mean"]) <= 1e-3 * abs(a["loss_mean"]), (a, b)
    assert abs(dist["final_loss"] - sim["final_loss"]) <= 1e-3 * abs(sim["final_loss"])
    assert abs(dist["knn_top1"] - sim["knn_top1"]) <= 1.0
    for a, b in zip(sim["history"], dist["history"], strict=True):  # every monitor, not only the last
        assert ("knn_top1" in a) == ("knn_top1" in b) and abs(a.get("knn_top1", 0) - b.get("knn_top1", 0)) <= 1.0
    for key in ("bytes_up_total", "bytes_down_total", "distinct_clients", "distinct_images", "steps"):
        assert dist[key] == sim[key], key


@pytest.mark.integration
def test_two_client_hosts_equal_the_simulation(prepared: list[str], simulated: dict, tmp_path: Path) -> None:
    """The acceptance run: `mocosfl pretrain --set distributed.client_hosts=2` on the test profile, 20 steps,
    against the in-process run. FedAvg is computed by the server in the simulation's order, so the losses
    are equal (measured: bit-identical); the bound is the one stated for float reduction order."""
    dist = pretrain_result(prepared + STEPS + ["distributed.client_hosts=2"], tmp_path)
    assert dist["run_id"] != simulated["run_id"]  # its own run directory, never a resumed simulation
    assert_same_numbers(simulated, dist)


@pytest.mark.integration
def test_stateful_clients_and_separate_sampling_and_sync_equal_the_simulation(
    prepared: list[str], tmp_path: Path
) -> None:
    """Client state that outlives a round on the client hosts: stateful momentum, unsynced EMA targets,
    rounds of 4 steps against syncs every 6 (a round ends unsynced at step 4, banked models average in at
    step 6), 8 of 20 clients per round (a host may have no participant in a round)."""
    over = prepared + ["pretrain.steps=12", "sfl.stateful_clients=true", "sfl.sync_targets=false"]
    over += ["sfl.sample_period=4", "sfl.sync_period=6", "sfl.clients_per_round=8"]
    sim = pretrain_result(over, tmp_path / "sim")
    dist = pretrain_result(over + ["distributed.client_hosts=2"], tmp_path / "dist")
    assert [r["loss_mean"] for r in dist["history"]] == [r["loss_mean"] for r in sim["history"]]  # measured: equal
    assert dist["knn_top1"] == sim["knn_top1"] and dist["distinct_clients"] == sim["distinct_clients"]


def _worker_pid(rank: int, marker: str) -> int | None:
    """The pid of the distributed worker of ``rank`` whose command line mentions ``marker``."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "mocosfl.distributed.worker" in cmdline and marker in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.integration
def test_a_client_host_killed_mid_run_restarts_from_the_checkpoint(
    prepared: list[str], simulated: dict, tmp_path: Path
) -> None:
    """SIGKILL client host 0 after its step-10 checkpoint: torchrun restarts every rank, they resume from
    the newest step all of them checkpointed, and the run ends with the uninterrupted run's numbers."""
    runs = tmp_path / "runs"  # a run directory of its own (the other test's run is finished)
    over = prepared + STEPS + [f"pretrain.runs_dir={runs}", "pretrain.checkpoint_every=5"]
    over += ["distributed.client_hosts=2", "distributed.max_restarts=1", f"metrics_dir={tmp_path}"]
    proc = subprocess.Popen(
        pretrain_cmd(over), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    killed = None
    try:
        deadline = time.monotonic() + 300
        while killed is None and proc.poll() is None and time.monotonic() < deadline:
            if list(runs.glob("*/client-host-0/ckpt-000000010.pt")):
                killed = _worker_pid(1, str(runs))
                if killed:
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        out, err = proc.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and whatever else runs in its session
        for _ in range(100):  # torchrun starts each rank in a session of its own
            pids = [p for rank in range(3) if (p := _worker_pid(rank, str(runs))) is not None]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
    assert killed is not None, "the run ended before client host 0 could be killed"
    assert proc.returncode == 0, err[-3000:]
    assert "resuming at step" in err  # the restarted ranks resumed from a checkpoint
    assert_same_numbers(simulated, json.loads((tmp_path / "pretrain.json").read_text()))


def host_command(role: str, address: str, server_address: str, overrides: list[str]) -> list[str]:
    """The documented command of one host of a run on several hosts (README: "On several hosts")."""
    rdzv = "join_timeout=60" + (",is_host=1" if role == "server" else "")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=3",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={server_address}:29400",
        f"--rdzv-conf={rdzv}",
        f"--local-addr={address}",  # what the other hosts reach this one at (not its host name)
        "--max-restarts=0",
        "-m",
        "mocosfl.distributed.worker",
        "--role",
        role,
        *cli_args("pretrain", overrides)[1:],
    ]


@pytest.mark.integration
def test_server_and_client_hosts_on_separate_network_hosts(
    prepared: list[str], simulated: dict, tmp_path: Path
) -> None:
    """Three network namespaces joined by veth pairs: the server (validation images only) and two client
    hosts (their own clients' images only), rendezvous and gloo over the veth addresses. The run equals
    the simulation, and what each client host's eth0 sent is what its ranks counted, plus TCP/IP."""
    from mocosfl.cli import run
    from mocosfl.data.prepare import load_prepared
    from mocosfl.workflow import Dataset

    base = prepared + STEPS + ["distributed.client_hosts=2", "distributed.timeout_s=60"]
    cfg = load_config(PARAMS, "test", base)
    training_images = set(Dataset(cfg).train_idx.tolist())
    roles = {"server": "server", "host0": "0", "host1": "1"}
    overrides, held = {}, {}
    for name, role in roles.items():
        exported = run(cli_args("host-data", base, "--role", role, "--out", str(tmp_path / name)))
        here = [f"pretrain.runs_dir={tmp_path / name / 'runs'}", f"metrics_dir={tmp_path / name / 'metrics'}"]
        overrides[name] = base + exported["settings"] + here
        data = load_prepared(cfg.data.source, tmp_path / name / "prepared", cfg.data.image_size)
        held[name] = set(data.train_x.rows.tolist())  # type: ignore[attr-defined]
        assert len(held[name]) == exported["images"] and len(data.test_x.rows) == 0  # type: ignore[attr-defined]
    assert not held["server"] & training_images  # the validation images only
    assert not held["host0"] & held["host1"] and held["host0"] | held["host1"] <= training_images
    with network(list(roles)) as net:
        env = os.environ | {"GLOO_SOCKET_IFNAME": "eth0"}
        before = {name: net.counters(name) for name in roles}
        logs = {name: tmp_path / f"{name}.log" for name in roles}  # files: a full pipe would stall a host
        procs = {}
        for name, role in roles.items():
            with logs[name].open("w") as out:
                command = host_command(role, net.address(name), net.address("server"), overrides[name])
                procs[name] = net.popen(name, command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        for proc in procs.values():
            proc.wait(timeout=600)
        sent = {name: net.counters(name)["tx"] - before[name]["tx"] for name in roles}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}:\n{logs[name].read_text()[-3000:]}"
    result = json.loads((tmp_path / "server" / "metrics" / "pretrain.json").read_text())
    assert_same_numbers(simulated, result)
    assert result["world_size"] == 3
    wire_files = [next((tmp_path / f"host{h}" / "runs").glob(f"*/client-host-{h}/wire.json")) for h in (0, 1)]
    for name, file in zip(("host0", "host1"), wire_files, strict=True):
        counted = json.loads(file.read_text())
        ratio = sent[name] / counted["dist_sent_bytes_this_session"]
        print(
            f"{name}: eth0 sent {sent[name]} B, its rank counted {counted['dist_sent_bytes_this_session']} B "
            f"({ratio:.3f}x), by kind {counted['dist_sent_bytes_by_kind_this_session']}"
        )
        assert 1.0 < ratio < 1.15, (name, sent[name], counted)  # TCP/IP headers at MTU 1500, rendezvous
    # Against the communication accounting (smashed data and models up): the hosts' own counts (headers,
    # and uploads at the kNN monitors too; measured 1.003x) and eth0 less the monitor's activations (1.022x).
    kinds = [json.loads(f.read_text())["dist_sent_bytes_by_kind_this_session"] for f in wire_files]
    monitor = sum(k["kNN bank activations"] for k in kinds)
    training = sum(k["smashed data"] + k["client models"] for k in kinds)
    assert abs(training / result["bytes_up_total"] - 1) < 0.1
    assert abs((sent["host0"] + sent["host1"] - monitor) / result["bytes_up_total"] - 1) < 0.1
    server_sent = result["dist_sent_bytes_this_session"]
    print(
        f"server: eth0 sent {sent['server']} B, counted {server_sent} B; accounting up "
        f"{result['bytes_up_total']} B, down {result['bytes_down_total']} B"
    )
    assert 1.0 < sent["server"] / server_sent < 1.15


@pytest.mark.integration
def test_distributed_bench_reports_ratio_bytes_and_memory(prepared: list[str], tmp_path: Path) -> None:
    """`mocosfl bench --set distributed.client_hosts=2` on the test profile: the bytes counted on the
    loopback interface match the communication accounting within 10 % (Linux; measured 0.2-0.3 % above)."""
    from mocosfl.cli import run

    where = [f"metrics_dir={tmp_path}", "distributed.client_hosts=2", "bench.steps=2", "bench.warmup=1"]
    row = run(cli_args("bench", prepared + where))["results"][0]
    assert row["client_hosts"] == 2 and row["client_host_threads"] == 1
    assert row["distributed_step_s"] > 0 and row["distributed_ratio"] > 0
    assert len(row["client_host_peak_rss_mb"]) == 2 and row["server_peak_rss_mb"] > 0
    if row["wire_bytes_per_step"] is not None:  # no /sys/class/net/lo elsewhere
        assert abs(row["wire_vs_accounting"] - 1) < 0.1, row
    assert json.loads((tmp_path / "bench-distributed.json").read_text())["results"] == [row]


def test_a_client_host_that_never_joins_fails_after_the_timeout(tmp_path: Path) -> None:
    """The server waits distributed.timeout_s for the client hosts, not c10d's 30 minutes, and says so in
    one line (exit 2)."""
    from mocosfl.distributed.launch import free_port

    cfg = load_config(PARAMS, "test", ["distributed.client_hosts=2", "distributed.timeout_s=3"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.to_dict()))
    env = os.environ | {
        "RANK": "0",
        "WORLD_SIZE": "3",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port("127.0.0.1")),
    }
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "mocosfl.distributed.worker", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - t0 < 60
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "joined within distributed.timeout_s=3 s" in errors[0], done.stderr[-2000:]


def _send_payload(port: int, payload: str) -> None:
    """Rank 1 of a two-rank gloo group: sends the server one bad smashed-data message."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    from mocosfl.distributed.roles import shape_header

    t = torch.ones(4, 3) if payload == "shape" else torch.ones(2, 3)
    if payload == "nan":
        t[0, 1] = float("nan")
    dist.send(shape_header(t.shape), dst=0)
    dist.send(t, dst=0)
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("payload", "message"),
    [("nan", "sent non-finite smashed data at step 3"), ("shape", r"shape \[4, 3\] at step 3, expected \[2, 3\]")],
)
def test_a_bad_payload_stops_the_run_naming_the_host(payload: str, message: str) -> None:
    import multiprocessing
    from datetime import timedelta
    from types import SimpleNamespace

    import torch.distributed as dist

    from mocosfl.distributed.launch import free_port
    from mocosfl.distributed.roles import _Rank

    port = free_port("127.0.0.1")
    sender = multiprocessing.get_context("spawn").Process(target=_send_payload, args=(port, payload))
    sender.start()
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout=timedelta(seconds=30)
    )
    try:
        with pytest.raises(DistributedError, match=rf"^client host 0 \(rank 1\).*{message}"):
            _Rank.receive(SimpleNamespace(step=3), (2, 3), 1, "smashed data")  # type: ignore[arg-type]
    finally:
        dist.destroy_process_group()
        sender.join(30)
        sender.kill()
