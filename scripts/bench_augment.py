"""Benchmark MocoV2Augment against an equivalent kornia.augmentation pipeline on CPU.

Usage: PYTHONPATH=. .venv/bin/python scripts/bench_augment.py [--batch 200] [--runs 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import kornia.augmentation as K
import torch

from mocosfl.data.augment import MocoV2Augment

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def kornia_pipeline(size: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        K.RandomResizedCrop((size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
        K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((13, 13), (0.1, 2.0), p=0.5),  # +-3 sigma at sigma = 2, as ours reaches (6 px)
        K.RandomHorizontalFlip(p=0.5),
        K.Normalize(mean=torch.tensor(MEAN), std=torch.tensor(STD)),
    )


def median_rates(fns: list[Callable[[], torch.Tensor]], batch: int, runs: int, warmup: int = 3) -> list[float]:
    """Median images/s per function over `runs` timed calls, interleaved so machine noise hits all alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [batch / statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, args.size, args.size, 3), dtype=torch.uint8, generator=gen)

    ours = MocoV2Augment(args.size, MEAN, STD)
    kor = kornia_pipeline(args.size)

    def run_ours() -> torch.Tensor:
        return ours(images, gen)

    def run_kornia() -> torch.Tensor:
        # Same input conversion as ours (uint8 [B, H, W, 3] -> float [B, 3, H, W]) so the comparison is fair.
        x = images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
        with torch.no_grad():
            return kor(x)

    with torch.no_grad():
        r_ours, r_kor = median_rates([run_ours, run_kornia], args.batch, args.runs)
    print(f"batch={args.batch} size={args.size} threads={args.threads} runs={args.runs} (median)")
    print(f"mocosfl MocoV2Augment : {r_ours:10.0f} images/s")
    print(f"kornia.augmentation   : {r_kor:10.0f} images/s")
    print(f"speed-up (ours/kornia): {r_ours / r_kor:.2f}x")


if __name__ == "__main__":
    main()
