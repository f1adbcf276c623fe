"""`make gpu-check`: the GPU checks in one short run (at most ~8 minutes on one GPU); one JSON line.

Runs the CUDA-marked tests, then the width-64 paper-profile bench (N=1000, M=100, b=1) for 50 steps in
fp32 (TF32 matrix products), in bf16, and in bf16 under torch.compile (the figure that decides whether
`pretrain.compile: auto` should compile on CUDA; on CPU compiling was measured slower), with peak GPU
memory. On a machine without CUDA it prints
{"skipped": ...} and exits 0.

    python scripts/gpu_check.py [--steps 50] [--out metrics/gpu_check.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_tests() -> dict[str, object]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stdout.strip().splitlines()
    return {"rc": proc.returncode, "summary": lines[-1] if lines else "", "seconds": time.perf_counter() - t0}


def run_bench(precision: str, steps: int, compile_mode: str = "off") -> dict[str, object]:
    from mocosfl import bench
    from mocosfl.config import load_config

    overrides = [
        "device=cuda",
        f"pretrain.precision={precision}",
        f"pretrain.compile={compile_mode}",
        f"bench.steps={steps}",
        "bench.warmup=5",
        f"metrics_dir={ROOT / 'metrics' / 'gpu_check'}",
    ]
    cfg = load_config(ROOT / "params.yaml", "paper", overrides)
    row = bench.bench(cfg, [cfg.partition.num_clients])["results"][0]
    keep = ("precision", "compile", "sim_step_s", "central_step_s", "ratio", "gflops", "peak_gpu_mb", "first_step_s")
    return {k: row[k] for k in keep}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "metrics" / "gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device on this machine", "host": platform.node()}))
        return 0
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "tests": run_tests(),
        "bench": [run_bench("fp32", args.steps), run_bench("bf16", args.steps), run_bench("bf16", args.steps, "on")],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0 if result["tests"]["rc"] in (0, 5) else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
