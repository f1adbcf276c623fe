"""Distributed MocoSFL (mocosfl.distributed): real processes on torch.distributed against the simulation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PARAMS, ROOT, cli_args

from mocosfl.config import ConfigError, load_config
from mocosfl.distributed.launch import check_supported, parse_endpoint
from mocosfl.distributed.roles import DistributedError, LocalImages, client_hosts_of


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
        check_supported(cfg, "flmoco", tmp_path / "run")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ckpt-000010.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="resuming one is not supported yet"):
        check_supported(cfg, "mocosfl", tmp_path / "run")
    with pytest.raises(ConfigError, match="expected host:port"):
        parse_endpoint("localhost")
    with pytest.raises(ConfigError, match="distributed.client_hosts=-1 is invalid"):
        load_config(PARAMS, "test", ["distributed.client_hosts=-1"])


@pytest.mark.integration
def test_two_client_hosts_equal_the_simulation(prepared: list[str], tmp_path: Path) -> None:
    """The acceptance run: `mocosfl pretrain --set distributed.client_hosts=2` on the test profile, 20 steps,
    against the in-process run. FedAvg is computed by the server in the simulation's order, so the losses
    are equal (measured: bit-identical); the bound is the one stated for float reduction order."""
    steps = ["pretrain.steps=20"]
    results = {}
    for hosts in (0, 2):
        where = [f"metrics_dir={tmp_path / str(hosts)}", f"distributed.client_hosts={hosts}"]
        cmd = [sys.executable, "-m", "mocosfl", *cli_args("pretrain", prepared + steps + where)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results[hosts] = json.loads((tmp_path / str(hosts) / "pretrain.json").read_text())
    sim, dist = results[0], results[2]
    assert dist["run_id"] != sim["run_id"]  # its own run directory, never a resumed simulation
    assert len(dist["history"]) == len(sim["history"]) == 20
    for a, b in zip(sim["history"], dist["history"], strict=True):
        assert abs(b["loss_mean"] - a["loss_mean"]) <= 1e-3 * abs(a["loss_mean"]), (a, b)
    assert abs(dist["final_loss"] - sim["final_loss"]) <= 1e-3 * abs(sim["final_loss"])
    assert abs(dist["knn_top1"] - sim["knn_top1"]) <= 1.0
    for key in ("bytes_up_total", "bytes_down_total", "distinct_clients", "distinct_images", "steps"):
        assert dist[key] == sim[key], key


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
