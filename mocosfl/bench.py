"""Benchmark: MocoSFL simulation vs centralized MoCo v2 at the same total batch, interleaved.

Both run in one process on the same images so machine noise hits them alike; each
figure is the median over ``bench.steps`` steps after ``bench.warmup`` warm-up steps.
Each client count runs in a fresh process, so its peak RSS is its own.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mocosfl import precision, runtime
from mocosfl.baselines.central import CentralMoco
from mocosfl.config import Config
from mocosfl.costs import count_flops, peak_rss_mb
from mocosfl.data.augment import MocoV2Augment
from mocosfl.data.partition import partition_indices
from mocosfl.io import atomic_path
from mocosfl.seeding import Stream, torch_generator
from mocosfl.sfl.trainer import MocoSFLTrainer, resolve_device

logger = logging.getLogger(__name__)

# The CPU features that decide which kernels (and so speed, and bf16 support) a timing had.
TIMING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform``'s names where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_line() -> str:
    """What a timing was measured on: ``<model>, <n> cores (<flags>)``, flags from ``TIMING_FLAGS``.

    Cores are the logical CPUs this process may run on (its affinity), not the host's count.
    """
    flags = [f for f in TIMING_FLAGS if f in precision.cpu_flags()]
    named = " ".join(flags) or "none of " + "/".join(TIMING_FLAGS)
    return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores ({named})"


CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def synthetic_images(n: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


RGB = tuple[float, float, float]


def bench_data(cfg: Config, num_clients: int, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray, RGB, RGB]:
    """The prepared training set if there is one, else synthetic images of the configured size."""
    from mocosfl import workflow
    from mocosfl.data.prepare import DataError

    try:
        ds = workflow.Dataset(cfg)
        log(f"bench on prepared data {ds.prepared.path.name} ({len(ds.train_y)} images)")
        return ds.train_x(), ds.train_y, ds.normalization.mean, ds.normalization.std
    except DataError:
        n = max(50_000, 5 * num_clients)
        log(f"no prepared data: bench on {n} synthetic images")
        images, labels = synthetic_images(n, cfg.data.image_size, 10, cfg.seed)
        return images, labels, CIFAR_MEAN, CIFAR_STD


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


@dataclass
class Timings:
    """Seconds per step of each side after the warm-up, of each sync, and of the very first steps."""

    sim: list[float] = field(default_factory=list)
    central: list[float] = field(default_factory=list)
    sync: list[float] = field(default_factory=list)
    first_sim: float = 0.0
    first_central: float = 0.0


def interleaved_steps(sim: MocoSFLTrainer, central_step: Callable[[], None], steps: int, warmup: int) -> Timings:
    """``steps`` steps of each, alternating which goes first so neither always inherits the other's
    cache and clock state; the first ``warmup`` are not kept (the very first is reported apart)."""
    out = Timings()
    for s in range(steps):
        if s % 2 == 0:
            dt, dc = _timed(sim.advance), _timed(central_step)
        else:
            dc = _timed(central_step)
            dt = _timed(sim.advance)
        if s == 0:
            out.first_sim, out.first_central = dt, dc
        if s >= warmup:
            out.sim.append(dt)
            out.central.append(dc)
            if sim.synced_last_step:
                out.sync.append(sim.last_sync_seconds)
    return out


def augment_seconds(cfg: Config, images: np.ndarray, batch: int, mean: RGB, std: RGB, device: torch.device) -> float:
    """Median time to make both augmented views of one batch (5 tries)."""
    aug = MocoV2Augment(cfg.data.image_size, mean, std, scale=cfg.augment.crop_scale, blur_sigma=cfg.augment.blur_sigma)
    batch_imgs = torch.from_numpy(np.array(images[:batch])).to(device)
    seconds = []
    for i in range(5):
        t = time.perf_counter()
        aug.two_views(batch_imgs, torch_generator(cfg.seed, Stream.BENCH_AUGMENT, i))
        seconds.append(time.perf_counter() - t)
    return _median(seconds)


def bench_one(cfg: Config, n: int, log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Interleaved sim/central steps at N clients; one row of the bench table."""
    device = resolve_device(cfg.device)
    images, labels, mean, std = bench_data(cfg, n, log)
    run_cfg = cfg.replace(**{"partition.num_clients": n})
    pc = cfg.partition
    shards = partition_indices(
        labels, pc.method, n, cfg.seed, shards_per_client=pc.shards_per_client, alpha=pc.dirichlet_alpha
    )
    steps = cfg.bench.warmup + cfg.bench.steps + 1  # +1: the step whose FLOPs are counted
    t0 = time.perf_counter()
    sim = MocoSFLTrainer(run_cfg.replace(**{"pretrain.steps": steps}), images, shards, mean, std, None, device)
    setup_s = time.perf_counter() - t0
    plan = sim.plan
    central = CentralMoco(run_cfg, mean, std, plan.batch_size, steps, device)
    rng = np.random.default_rng(cfg.seed)

    def central_step() -> None:
        central.train_step(images[rng.choice(len(images), plan.batch_size, replace=False)])

    log(
        f"N={n}: M={plan.clients_per_round}, b={plan.client_batch_size}, B={plan.batch_size}, "
        f"{steps - 1} steps each (interleaved), compile={cfg.pretrain.compile}, precision={sim.precision}"
    )
    times = interleaved_steps(sim, central_step, steps - 1, cfg.bench.warmup)
    sim_flops = count_flops(sim.advance)
    central_flops = count_flops(central_step)
    # Time a sync on its own too, so it is reported even when no round ended in the window.
    times.sync.append(sim.sync_now())
    aug_s = augment_seconds(cfg, images, plan.batch_size, mean, std, device)

    sim_s, central_s = _median(times.sim), _median(times.central)
    row = {
        "num_clients": n,
        "clients_per_round": plan.clients_per_round,
        "client_batch_size": plan.client_batch_size,
        "batch_size": plan.batch_size,
        "width": cfg.model.width,
        "cut_layers": cfg.model.cut_layers,
        "stateful_clients": cfg.sfl.stateful_clients,
        "compile": cfg.pretrain.compile,
        "precision": sim.precision,  # resolved: fp32 or bf16 (server forward passes; both methods)
        "threads": torch.get_num_threads(),
        "sim_step_s": sim_s,
        "central_step_s": central_s,
        "ratio": sim_s / central_s,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "sync_ms": 1000 * _median(times.sync),
        "client_setup_s": setup_s,
        # The first step pays for one-off work (oneDNN primitives, torch.compile); reported apart.
        "first_step_s": times.first_sim,
        "central_first_step_s": times.first_central,
        "gflop_per_step": sim_flops / 1e9,
        "gflops": sim_flops / 1e9 / sim_s,
        "central_gflops": central_flops / 1e9 / central_s,
        "train_images_per_s": plan.batch_size / sim_s,
        "augment_images_per_s": plan.batch_size / aug_s,
    }
    log(
        f"  sim {sim_s * 1000:.1f} ms/step, central {central_s * 1000:.1f} ms/step, ratio {row['ratio']:.3f}, "
        f"{row['gflops']:.1f} GFLOP/s, sync {row['sync_ms']:.2f} ms, peak RSS {row['peak_rss_mb']:.0f} MB"
    )
    return row


def _child(cfg: Config, n: int) -> dict[str, Any]:
    # A spawned process starts with the defaults: no log handler, default thread settings.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    runtime.configure(cfg.pretrain.num_threads)
    return bench_one(cfg, n)


def bench(
    cfg: Config, clients: list[int], log: Callable[[str], None] = logger.info, isolate: bool = True
) -> dict[str, Any]:
    """One row per client count; ``isolate`` runs each in its own process (honest peak RSS), which logs
    its progress to its stderr."""
    results = []
    for n in clients:
        if isolate:
            with mp.get_context("spawn").Pool(1) as pool:
                results.append(pool.apply(_child, (cfg, n)))
        else:
            results.append(bench_one(cfg, n, log))
    return {"results": results}


def plot_bench(results: list[dict[str, Any]], path: Path) -> None:
    """Step time (sim vs central) and peak RSS against the number of clients."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ns = [r["num_clients"] for r in results]
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(ns, [r["sim_step_s"] for r in results], "o-", label="MocoSFL simulation")
    ax1.plot(ns, [r["central_step_s"] for r in results], "s--", label="centralized MoCo")
    ax1.set(xscale="log", xlabel="clients N", ylabel="step time (s, median)", title="step time vs N")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax2.plot(ns, [r["peak_rss_mb"] / 1024 for r in results], "o-")
    ax2.set(xscale="log", xlabel="clients N", ylabel="peak RSS (GB)", title="memory vs N")
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
