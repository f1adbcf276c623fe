"""Record (or check) the per-step loss of the `test` and `smoke` profiles as golden files.

    python scripts/record_goldens.py [--check] [--out tests/goldens]

A refactor must reproduce these exactly on the machine that recorded them (same CPU flags, torch
and thread count); tests/test_goldens.py compares against them on every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# (profile, method): the runs whose per-step losses are kept.
RUNS = [("test", "mocosfl"), ("test", "central"), ("test", "flmoco"), ("smoke", "mocosfl")]
THREADS = 2


def cpu_signature() -> str:
    """Model name and the SIMD flags that change float results (oneDNN picks kernels by them)."""
    from mocosfl.bench import cpu_model
    from mocosfl.precision import cpu_flags

    keep = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))
    return f"{cpu_model()} [{' '.join(keep)}] torch {torch.__version__} threads {THREADS}"


def record(profile: str, method: str, work: Path) -> dict:
    from mocosfl import workflow
    from mocosfl.config import load_config

    overrides = [
        f"data.prepared_dir={work / 'prepared'}",
        f"partition.out_dir={work / 'partitions'}",
        f"pretrain.runs_dir={work / 'runs'}",
        f"metrics_dir={work / 'metrics'}",
        f"pretrain.num_threads={THREADS}",
        "tracking.enabled=false",
        "pretrain.precision=fp32",  # the goldens are fp32 on every machine
    ]
    cfg = load_config(ROOT / "params.yaml", profile, overrides)
    workflow.prepare(cfg)
    workflow.partition(cfg)
    losses: list[float] = []
    result = workflow.pretrain(cfg, on_step=lambda row: losses.append(float(row["loss"])), method=method)
    knn = [[int(r["step"]), float(r["knn_top1"])] for r in result["history"] if "knn_top1" in r]
    return {"profile": profile, "method": method, "losses": losses, "knn": knn, "final_loss": result["final_loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "tests" / "goldens"))
    parser.add_argument("--check", action="store_true", help="compare with the stored files instead of writing")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    out = Path(args.out)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for profile, method in RUNS:
            got = record(profile, method, Path(tmp))
            path = out / f"{profile}-{method}.json"
            if args.check:
                want = json.loads(path.read_text())
                rel = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(got["losses"], want["losses"], strict=True))
                same = got["losses"] == want["losses"] and got["knn"] == want["knn"]
                worst = max(worst, rel)
                print(
                    f"{profile}/{method}: {'identical' if same else f'max relative difference {rel:.3g}'} "
                    f"over {len(got['losses'])} steps",
                    file=sys.stderr,
                )
            else:
                got["cpu"] = cpu_signature()
                out.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(got, indent=1) + "\n")
                print(f"wrote {path} ({len(got['losses'])} steps)", file=sys.stderr)
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
