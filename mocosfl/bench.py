"""Benchmark: MocoSFL simulation vs centralized MoCo v2 at the same total batch, interleaved.

Both run in one process on the same images so machine noise hits them alike; each
figure is the median over ``bench.steps`` steps after ``bench.warmup`` warm-up steps.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mocosfl.baselines.central import CentralMoco
from mocosfl.config import Config
from mocosfl.data.augment import MocoV2Augment
from mocosfl.data.partition import partition_indices
from mocosfl.sfl.trainer import MocoSFLTrainer, _torch_gen, resolve_device

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def synthetic_images(n: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, num_classes, n)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def bench(
    cfg: Config,
    clients: list[int],
    images: np.ndarray,
    labels: np.ndarray,
    mean: tuple[float, float, float] = CIFAR_MEAN,
    std: tuple[float, float, float] = CIFAR_STD,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    device = resolve_device(cfg.device)
    results = []
    for n in clients:
        run_cfg = cfg.replace(**{"partition.num_clients": n})
        shards = partition_indices(labels, cfg.partition.method, n, cfg.seed,
                                   shards_per_client=cfg.partition.shards_per_client,
                                   alpha=cfg.partition.dirichlet_alpha)
        steps = cfg.bench.warmup + cfg.bench.steps
        t0 = time.perf_counter()
        sim = MocoSFLTrainer(run_cfg.replace(**{"pretrain.steps": 10**9}), images, shards, mean, std,
                             None, device)
        setup_s = time.perf_counter() - t0
        batch = sim.plan.batch_size
        central = CentralMoco(run_cfg, mean, std, batch, 10**9, device)
        rng = np.random.default_rng(cfg.seed)
        sim_t, central_t, sync_t = [], [], []
        log(f"N={n}: M={sim.plan.clients_per_round}, b={sim.plan.client_batch_size}, B={batch}, "
            f"{steps} steps each (interleaved)")
        for s in range(steps):
            t = time.perf_counter()
            sim.advance()
            dt = time.perf_counter() - t
            synced = sim.step % sim.plan.sync_period == 0
            if s >= cfg.bench.warmup:
                sim_t.append(dt)
                if synced:
                    sync_t.append(sim.last_sync_seconds)
            batch_idx = rng.choice(len(images), batch, replace=False)
            t = time.perf_counter()
            central.train_step(images[batch_idx])
            if s >= cfg.bench.warmup:
                central_t.append(time.perf_counter() - t)
        # Time a sync on its own too, so it is reported even when no round ended in the window.
        if sim.round_ids is None:
            sim.begin_round(sim.step // sim.plan.sync_period)
        t = time.perf_counter()
        sim.end_round()
        sync_t.append(time.perf_counter() - t)

        aug = MocoV2Augment(cfg.data.image_size, mean, std)
        batch_imgs = torch.from_numpy(images[:batch]).to(device)
        aug_t = []
        for i in range(5):
            t = time.perf_counter()
            aug.two_views(batch_imgs, _torch_gen(cfg.seed, 99, i))
            aug_t.append(time.perf_counter() - t)
        sim_s, central_s = _median(sim_t), _median(central_t)
        row = {
            "num_clients": n,
            "clients_per_round": sim.plan.clients_per_round,
            "client_batch_size": sim.plan.client_batch_size,
            "batch_size": batch,
            "width": cfg.model.width,
            "cut_layers": cfg.model.cut_layers,
            "sim_step_s": sim_s,
            "central_step_s": central_s,
            "ratio": sim_s / central_s,
            "peak_rss_mb": peak_rss_mb(),
            "sync_ms": 1000 * _median(sync_t),
            "client_setup_s": setup_s,
            "train_images_per_s": batch / sim_s,
            "augment_images_per_s": batch / _median(aug_t),
        }
        log(f"  sim {sim_s * 1000:.1f} ms/step, central {central_s * 1000:.1f} ms/step, ratio {row['ratio']:.3f}, "
            f"sync {row['sync_ms']:.1f} ms, peak RSS {row['peak_rss_mb']:.0f} MB")
        results.append(row)
        del sim, central
    return {"results": results}
