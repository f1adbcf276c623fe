"""Benchmark: one Optuna study on the work pool, 2 workers x 1 thread against 1 worker x 2 threads.

Needs the services and the deployments: `make services && make deploy`, then
    .venv/bin/python scripts/bench_pool.py [--profile smoke] [--trials 8]
Each layout runs a fresh study (its own name and runs folder, no pruning, so both train the same number of
steps) of `--trials` trials through the `mocosfl/tune` deployment, with its workers started here and stopped
afterwards; the wall time is from submitting the flow run to its end. Prints one JSON line with both times,
their ratio and the CPU. Run it on an otherwise idle machine: layouts are measured one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_workers(count: int, threads: int, tag: str) -> list[subprocess.Popen]:
    procs = []
    for i in range(count):
        env = {**os.environ, "THREADS": str(threads), "WORKER_NAME": f"bench-{tag}-{i + 1}"}
        log = open(Path("/tmp") / f"mocosfl-bench-{tag}-{i + 1}.log", "w")  # noqa: SIM115 - closed with the process
        procs.append(
            subprocess.Popen(
                ["bash", str(ROOT / "scripts" / "pool.sh"), "worker"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
    return procs


def stop_workers(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def run_study(profile: str, trials: int, executor: str, tag: str) -> dict:
    from prefect.deployments import run_deployment

    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides = [
        f"tune.executor={executor}",
        "tune.pool_runs=2",
        f"tune.storage={os.environ.get('MOCOSFL_TUNE_STORAGE', 'optuna.db')}",
        f"tune.study_name=bench-{tag}-{stamp}",
        f"tune.n_trials={trials}",
        "tune.pruner=none",
        f"tune.out_dir=/tmp/mocosfl-bench/{tag}-{stamp}/tune",
        f"pretrain.runs_dir=/tmp/mocosfl-bench/{tag}-{stamp}/runs",
        f"metrics_dir=/tmp/mocosfl-bench/{tag}-{stamp}/metrics",
    ]
    t0 = time.perf_counter()
    run = run_deployment(
        "mocosfl/tune", parameters={"profile": profile, "overrides": overrides}, timeout=None, poll_interval=1
    )
    seconds = time.perf_counter() - t0
    state = run.state.type.value if run.state else "unknown"  # type: ignore[union-attr]
    if state != "COMPLETED":
        sys.exit(f"{tag}: flow run ended {state}; see /tmp/mocosfl-bench-{tag}-*.log")
    result = json.loads(Path(f"/tmp/mocosfl-bench/{tag}-{stamp}/metrics/tune.json").read_text())
    return {"seconds": round(seconds, 1), "trials_finished": result["n_trials"], "study": result["study_name"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--trials", type=int, default=8)
    args = parser.parse_args()
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("PREFECT_API_URL is not set: make services && source .services/env && make deploy")
    layouts = {"2x1": (2, 1, "pool"), "1x2": (1, 2, "local")}
    out: dict = {"profile": args.profile, "trials": args.trials}
    for tag, (workers, threads, executor) in layouts.items():
        procs = start_workers(workers, threads, tag)
        try:
            time.sleep(10)  # workers register with the pool
            out[tag] = {"workers": workers, "threads": threads, **run_study(args.profile, args.trials, executor, tag)}
        finally:
            stop_workers(procs)
        print(f"{tag}: {out[tag]}", file=sys.stderr)
    out["speedup_2x1_over_1x2"] = round(out["1x2"]["seconds"] / out["2x1"]["seconds"], 2)
    from mocosfl.bench import TIMING_FLAGS, cpu_model
    from mocosfl.precision import cpu_flags

    out["cpu"] = {"model": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in TIMING_FLAGS if f in cpu_flags()]}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
