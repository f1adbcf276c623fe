"""``mocosfl bench --set distributed.client_hosts=W``: a distributed step against the in-process one.

One command, one sitting: in-process steps, then the same steps with the server and W client hosts as
torchrun ranks on this host, then in-process steps again (the ratio uses both in-process windows). It
also counts the bytes that crossed the loopback interface during the distributed steps (the "wire",
TCP/IP headers and gloo's framing included) against the run's communication accounting, and each
role's peak RSS.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mocosfl.config import Config
from mocosfl.costs import peak_rss_mb
from mocosfl.data.partition import partition_indices
from mocosfl.data.prepare import Normalization
from mocosfl.io import write_json
from mocosfl.sfl.loop import resolve_device
from mocosfl.sfl.trainer import MocoSFLTrainer

log = logging.getLogger(__name__)

LOOPBACK_TX = Path("/sys/class/net/lo/statistics/tx_bytes")


def _bench_cfg(cfg: Config, n: int) -> Config:
    steps = cfg.bench.warmup + cfg.bench.steps
    return cfg.replace(**{"partition.num_clients": n, "pretrain.steps": steps})


def _data(cfg: Config, n: int) -> tuple[Callable[[np.ndarray], np.ndarray], int, list[np.ndarray], Any, Any]:
    """The bench's images as a loader of the given training indices (the prepared set is read only
    where asked, so a client host holds only its own images), their number, the shards, mean and std."""
    from mocosfl import workflow
    from mocosfl.bench import CIFAR_MEAN, CIFAR_STD, synthetic_images
    from mocosfl.data.prepare import DataError

    try:
        ds = workflow.Dataset(cfg)
        labels, mean, std = ds.train_y, ds.normalization.mean, ds.normalization.std

        def pixels(idx: np.ndarray) -> np.ndarray:
            return np.asarray(ds.prepared.train_x[ds.train_idx[idx]])

    except DataError:
        images, labels = synthetic_images(max(50_000, 5 * n), cfg.data.image_size, 10, cfg.seed)
        mean, std = CIFAR_MEAN, CIFAR_STD

        def pixels(idx: np.ndarray) -> np.ndarray:
            return images[idx]

    pc = cfg.partition
    shards = partition_indices(
        labels, pc.method, n, cfg.seed, shards_per_client=pc.shards_per_client, alpha=pc.dirichlet_alpha
    )
    return pixels, len(labels), shards, mean, std


def timed_steps(trainer: MocoSFLTrainer, warmup: int) -> list[float]:
    """Seconds of each step after the warm-up, to the plan's last step."""
    times = []
    while trainer.step < trainer.plan.total_steps:
        t0 = time.perf_counter()
        trainer.advance()
        if trainer.step > warmup:
            times.append(time.perf_counter() - t0)
    return times


def in_process(cfg: Config, n: int) -> dict[str, Any]:
    pixels, num_train, shards, mean, std = _data(cfg, n)
    images = pixels(np.arange(num_train))
    trainer = MocoSFLTrainer(cfg, images, shards, mean, std, None, resolve_device(cfg.device))
    bytes0 = trainer.bytes_up + trainer.bytes_down
    times = timed_steps(trainer, cfg.bench.warmup)
    return {
        "step_s": statistics.median(times),
        "accounted_bytes_per_step": (trainer.bytes_up + trainer.bytes_down - bytes0) / trainer.step,
        "threads": torch.get_num_threads(),
        "precision": trainer.precision,
        "plan": trainer.plan,
    }


def run_rank(cfg: Config, out_dir: Path) -> None:
    """One rank of the distributed bench (called by ``worker``): steps, then ``rank-<r>.json``."""
    from mocosfl.distributed.roles import ServerTrainer, client_host_trainer

    rank, n = dist.get_rank(), cfg.partition.num_clients
    start_rss, start_anon = rss_mb(), rss_mb("RssAnon")  # torch's runtime (~1 GB), before data and models
    pixels, num_train, shards, mean, std = _data(cfg, n)
    device = resolve_device(cfg.device)
    row: dict[str, Any] = {"rank": rank, "threads": torch.get_num_threads()}
    if rank == 0:
        no_images = np.zeros((num_train, 0, 0, 3), dtype=np.uint8)
        trainer: MocoSFLTrainer = ServerTrainer(cfg, no_images, shards, mean, std, None, device)
    else:
        trainer = client_host_trainer(cfg, rank - 1, pixels, num_train, shards, Normalization(mean, std, ""), device)
    dist.barrier()
    warm = cfg.bench.warmup
    times, wire0, t_wire = [], 0, 0.0
    while trainer.step < trainer.plan.total_steps:
        if trainer.step == warm:
            dist.barrier()
            wire0, t_wire = _loopback_tx(), time.perf_counter()
        t0 = time.perf_counter()
        trainer.advance()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    timed = trainer.step - warm
    if rank == 0:
        row.update(
            step_s=statistics.median(times[warm:]),
            wire_bytes_per_step=(_loopback_tx() - wire0) / timed if wire0 else None,
            wall_per_step=(time.perf_counter() - t_wire) / timed,
        )
    row["peak_rss_mb"] = peak_rss_mb()
    row["start_rss_mb"] = start_rss
    row["anon_rss_added_mb"] = rss_mb("RssAnon") - start_anon  # what the role holds at the end
    write_json(out_dir / f"rank-{rank}.json", row)


def rss_mb(kind: str = "VmRSS") -> float:
    """This process's resident memory now (MB) from /proc/self/status: ``VmRSS`` (all of it) or
    ``RssAnon`` (its own memory, without the file pages of shared libraries and memory-mapped data);
    nan where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def _loopback_tx() -> int:
    try:
        return int(LOOPBACK_TX.read_text())
    except OSError:
        return 0


def bench_distributed(cfg: Config, n: int, log: Callable[[str], None] = log.info) -> dict[str, Any]:
    """One row: in-process, distributed, in-process again, on the same plan and data."""
    from mocosfl.distributed.launch import torchrun

    hosts = cfg.distributed.client_hosts
    run_cfg = _bench_cfg(cfg, n)
    log(f"N={n}: in-process steps ({cfg.bench.steps} timed)")
    before = in_process(run_cfg, n)
    with tempfile.TemporaryDirectory(prefix="mocosfl-dist-bench-") as tmp:
        out = Path(tmp)
        write_json(out / "config.json", run_cfg.to_dict())
        log(f"N={n}: distributed steps, server + {hosts} client hosts")
        rc = torchrun(run_cfg, ["--config", str(out / "config.json"), "--bench", str(out)])
        if rc != 0:
            from mocosfl.distributed.roles import DistributedError

            raise DistributedError(f"the distributed bench failed (torchrun exit {rc}); each rank's error is above")
        ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(hosts + 1)]
    log(f"N={n}: in-process steps again")
    after = in_process(run_cfg, n)
    plan = before["plan"]
    inproc_s = (before["step_s"] + after["step_s"]) / 2
    server = ranks[0]
    wire = server["wire_bytes_per_step"]
    row = {
        "num_clients": n,
        "clients_per_round": plan.clients_per_round,
        "client_batch_size": plan.client_batch_size,
        "width": cfg.model.width,
        "cut_layers": cfg.model.cut_layers,
        "precision": before["precision"],
        "client_hosts": hosts,
        "in_process_threads": before["threads"],
        "server_threads": server["threads"],
        "client_host_threads": ranks[1]["threads"],
        "in_process_step_s": [before["step_s"], after["step_s"]],
        "distributed_step_s": server["step_s"],
        "distributed_ratio": server["step_s"] / inproc_s,
        "accounted_bytes_per_step": before["accounted_bytes_per_step"],
        "wire_bytes_per_step": wire,
        "wire_vs_accounting": wire / before["accounted_bytes_per_step"] if wire else None,
        "server_peak_rss_mb": server["peak_rss_mb"],
        "client_host_peak_rss_mb": [r["peak_rss_mb"] for r in ranks[1:]],
        # What each role added above torch's runtime: its data, models and activations.
        "server_rss_above_start_mb": server["peak_rss_mb"] - server["start_rss_mb"],
        "client_host_rss_above_start_mb": [r["peak_rss_mb"] - r["start_rss_mb"] for r in ranks[1:]],
        "server_anon_rss_added_mb": server["anon_rss_added_mb"],
        "client_host_anon_rss_added_mb": [r["anon_rss_added_mb"] for r in ranks[1:]],
    }
    log(
        f"  in-process {inproc_s * 1000:.0f} ms/step, distributed {server['step_s'] * 1000:.0f} ms/step "
        f"(ratio {row['distributed_ratio']:.3f}); bytes/step wire {wire or float('nan'):.0f} vs accounted "
        f"{before['accounted_bytes_per_step']:.0f}; peak RSS above torch's runtime: server "
        f"{row['server_rss_above_start_mb']:.0f} MB, client hosts "
        f"{', '.join(f'{r:.0f}' for r in row['client_host_rss_above_start_mb'])} MB; own (anonymous) memory "
        f"added: server {row['server_anon_rss_added_mb']:.0f} MB, client hosts "
        f"{', '.join(f'{r:.0f}' for r in row['client_host_anon_rss_added_mb'])} MB"
    )
    return row
