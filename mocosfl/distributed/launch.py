"""Launch a distributed run on this host: ``torchrun`` with the server and ``distributed.client_hosts`` ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from mocosfl.config import Config, ConfigError
from mocosfl.distributed.roles import DistributedError, client_hosts_of
from mocosfl.io import write_json

log = logging.getLogger(__name__)

LAUNCH_FILE = "distributed-config.json"  # the resolved config every rank reads, in the run directory


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); port 0 stays 0 (pick a free one)."""
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"distributed.endpoint={endpoint!r} is invalid: expected host:port")
    return host, int(port)


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def check_supported(cfg: Config, method: str, num_clients: int) -> None:
    """Refuse, with one line and before any process starts, what the distributed mode cannot run."""
    if method != "mocosfl":
        raise ConfigError(
            f"distributed.client_hosts={cfg.distributed.client_hosts} applies to MocoSFL only; "
            f"the {method} baseline runs in process (distributed.client_hosts=0)"
        )
    client_hosts_of(num_clients, cfg.distributed.client_hosts)  # at most one host per client
    if cfg.pretrain.compile == "on":
        raise ConfigError("pretrain.compile=on is not supported with distributed.client_hosts > 0")


def torchrun(cfg: Config, worker_args: list[str]) -> int:
    """Run ``mocosfl.distributed.worker WORKER_ARGS`` as 1 server + W client-host ranks on this host;
    returns torchrun's exit status."""
    hosts = cfg.distributed.client_hosts
    host, port = parse_endpoint(cfg.distributed.endpoint)
    port = port or free_port(host)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={hosts + 1}",
        # c10d rendezvous: every restart is a new rendezvous round with a fresh store (with the static one
        # a restarted group read the previous attempt's gloo addresses and never connected).
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={host}:{port}",
        f"--rdzv-conf=join_timeout={math.ceil(cfg.distributed.timeout_s)}",
        f"--max-restarts={cfg.distributed.max_restarts}",
        "-m",
        "mocosfl.distributed.worker",
        *worker_args,
    ]
    log.info("distributed run: server + %d client hosts on %s:%d (torchrun)", hosts, host, port)
    # gloo listens on the interface the host name resolves to unless told: on one host, loopback only.
    env = os.environ | ({"GLOO_SOCKET_IFNAME": "lo"} if host in ("127.0.0.1", "localhost") else {})
    return subprocess.run(cmd, check=False, env=env).returncode


def launch(cfg: Config, method: str, directory: Path) -> dict[str, Any]:
    """Run ``pretrain`` as 1 server + W client-host processes on this host; returns rank 0's result."""
    check_supported(cfg, method, cfg.partition.num_clients)
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / LAUNCH_FILE
    write_json(config_file, cfg.to_dict())
    rc = torchrun(cfg, ["--config", str(config_file)])
    done = directory / "pretrain.json"
    if rc != 0 or not done.exists():
        raise DistributedError(
            f"the distributed run failed (torchrun exit {rc}, after up to {cfg.distributed.max_restarts} "
            "restarts from the last checkpoint); each rank's error is above"
        )
    return json.loads(done.read_text())  # type: ignore[no-any-return]
