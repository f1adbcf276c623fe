"""Re-measure the README's speed, memory, distributed, tuning and attack figures in one sitting.

    make evidence                                   # every step, about 30 minutes on 2 cores
    .venv/bin/python scripts/evidence.py --only w16,distributed

Runs the measurements below one after another and writes ``reports/evidence.md`` (the tables README
"Speed, memory and threads", "Distributed training", "Scaling out" and "Privacy" quote, headed by the
date, CPU, git commit and training-code hash) and ``reports/evidence.json`` (each step's raw numbers).
Each step's whole output goes to ``runs/evidence/<step>.log``. Nothing else should run on the machine
meanwhile: torch's threads slow each other several-fold when the cores are shared.

Steps, in this order:
  ref-1, w64-auto-1, w64-fp32, ref-2, w64-auto-2
        the reference code (``../shared/tools/official-bench``) and ``mocosfl bench`` at width 64
        (cut 1, N = 1000, M = 100, b = 1, 2 threads each), alternated; ``auto`` precision is bf16 where the
        CPU multiplies bf16 natively, else fp32. The reference needs ``--ref-python`` (``make ref-venv``: a
        separate venv with torch, torchvision, kornia, scikit-learn, matplotlib) and ``--mirror`` (a bare git
        mirror of SonyResearch/MocoSFL), else its two steps are recorded as skipped.
  w16          ``mocosfl bench --profile cpu --clients 100,1000,10000``: simulated vs centralized step.
  distributed  ``mocosfl bench --profile cpu --set distributed.client_hosts=2``: ratio and bytes.
  memory       peak RSS of 20 pretrain steps at N = 10,000, cut 5, width 64: stateless clients, stateful
               clients with the O(N) bank in memory, and with it in a file.
  tuning       ``scripts/bench_pool.py``: an Optuna study on 2 workers x 1 thread vs 1 worker x 2 threads
               (starts the services if they are not running, and stops what it started).
  attack       ``mocosfl pretrain`` + ``mocosfl attack`` on the smoke profile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MOCOSFL = [sys.executable, "-m", "mocosfl"]
REFERENCE_BENCH = ROOT / "../shared/tools/official-bench/run.py"
THREADS = ["--set", "pretrain.num_threads=2"]  # the reference bench's --threads 2
W64 = ["--profile", "cpu", "--clients", "1000", "--set", "model.width=64", "--set", "bench.steps=8", *THREADS]
MEMORY_RUN = [
    "--profile", "cpu",
    "--set", "partition.num_clients=10000", "--set", "model.cut_layers=5", "--set", "model.width=64",
    "--set", "pretrain.steps=20", "--set", "sfl.sample_period=5", "--set", "sfl.sync_period=5",
    "--set", "pretrain.checkpoint_every=10",
    "--set", "pretrain.knn_every=20", "--set", "evaluate.batch_size=200", "--set", "tracking.enabled=false",
]  # fmt: skip
# sync_period = sample_period: every round ends in a FedAvg, so no client is left with a model of its own. With
# the auto period (every 4 steps at N = 10,000: median shard 4.4 images, b = 1) against rounds of 5, rounds
# ended unsynced and even "stateless" clients held the O(N) bank of unsynced models (20.84 GB on 2026-12-02),
# which is not what this step compares.
MEMORY_VARIANTS = {
    "stateless": [],
    "stateful, float32, in memory": ["--set", "sfl.stateful_clients=true"],
    "stateful, float32, in a file": ["--set", "sfl.stateful_clients=true", "--set", "sfl.client_state_storage=file"],
}


class StepFailed(RuntimeError):
    pass


ENV = {**os.environ, "MOCOSFL_NO_PROGRESS": "1"}  # no progress bars in the logs


def run_logged(argv: list[str], log_path: Path) -> float:
    """Run ``argv`` from the checkout with its output appended to ``log_path``; its wall seconds."""
    with log_path.open("a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        t0 = time.perf_counter()
        rc = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=ENV).returncode
    if rc:
        raise StepFailed(f"exit {rc}: {' '.join(argv[:6])} ... (see {log_path})")
    return time.perf_counter() - t0


def last_json(log_path: Path, prefix: str = "{") -> dict[str, Any]:
    """The last line of ``log_path`` that starts with ``prefix``, parsed (stderr shares the log)."""
    lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith(prefix)]
    if not lines:
        raise ValueError(f"no JSON line in {log_path}")
    return dict(json.loads(lines[-1]))


def peak_rss_of(argv: list[str], log_path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of ``argv`` and its children, measured from a fresh parent process."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "print('PEAK', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    run_logged([sys.executable, "-c", probe, *argv], log_path)
    last = [ln for ln in log_path.read_text().splitlines() if ln.startswith("PEAK ")][-1].split()
    return float(last[1]), float(last[2]) / 1024  # ru_maxrss is in KiB on Linux


# ------------------------------------------------------------------------------------------------ the steps


def step_reference(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    py, mirror = ctx["ref_python"], ctx["mirror"]
    if not py or not mirror:
        return {"skipped": "no --ref-python / --mirror (see the script's docstring)"}
    argv = [py, str(REFERENCE_BENCH), "--mirror", mirror, "--clients", "1000", "--sampled", "100"]
    argv += ["--cut", "1", "--steps", "6", "--threads", "2"]
    log_path = ctx["work"] / f"{name}.log"
    run_logged(argv, log_path)
    data = last_json(log_path)
    return {k: data[k] for k in ("sim_step_s", "central_step_s", "commit", "peak_rss_mb") if k in data}


def mocosfl_bench(ctx: dict[str, Any], name: str, args: list[str], file: str = "bench.json") -> list[dict[str, Any]]:
    metrics = ctx["work"] / name
    shutil.rmtree(metrics, ignore_errors=True)
    run_logged([*MOCOSFL, "bench", *args, "--set", f"metrics_dir={metrics}"], ctx["work"] / f"{name}.log")
    return list(json.loads((metrics / file).read_text())["results"])


def prepare_and_partition(args: list[str], log_path: Path) -> None:
    """Decode the data set and write the partition a run needs (not part of what is measured)."""
    for command in ("prepare", "partition"):
        run_logged([*MOCOSFL, command, *args], log_path)


def step_w64(precision: str) -> Callable[[dict[str, Any], str], dict[str, Any]]:
    def step(ctx: dict[str, Any], name: str) -> dict[str, Any]:
        (row,) = mocosfl_bench(ctx, name, [*W64, "--set", f"pretrain.precision={precision}"])
        return row

    return step


def step_w16(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    return {"rows": mocosfl_bench(ctx, name, ["--profile", "cpu", "--clients", "100,1000,10000"])}


def step_distributed(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    args = ["--profile", "cpu", "--set", "distributed.client_hosts=2"]
    (row,) = mocosfl_bench(ctx, name, args, file="bench-distributed.json")
    return row


def step_memory(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    prepare_and_partition(MEMORY_RUN, ctx["work"] / f"{name}.log")
    rows = []
    for i, (variant, extra) in enumerate(MEMORY_VARIANTS.items()):
        where = ctx["work"] / f"{name}-{i}"
        shutil.rmtree(where, ignore_errors=True)
        dirs = ["--set", f"pretrain.runs_dir={where}/runs", "--set", f"metrics_dir={where}/metrics"]
        argv = [*MOCOSFL, "pretrain", *MEMORY_RUN, *extra, *dirs]
        seconds, peak_mb = peak_rss_of(argv, ctx["work"] / f"{name}.log")
        rows.append({"clients": variant, "peak_rss_mb": peak_mb, "wall_s": seconds})
        shutil.rmtree(where, ignore_errors=True)  # the float32 bank's checkpoints are ~6 GB
    return {"rows": rows}


def step_tuning(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    from pipelines import services

    log_path = ctx["work"] / f"{name}.log"
    st = services.Settings.from_env()
    ports = (st.pg_port, st.mlflow_port, st.prefect_port)
    running = [services.port_open(st.host, port) for port in ports]
    run_logged([sys.executable, "-m", "pipelines.services", "start"], log_path)
    try:
        env_file = st.root / "env"
        study = f"source {env_file} && bash scripts/pool.sh deploy && {sys.executable} scripts/bench_pool.py"
        run_logged(["bash", "-c", f"set -euo pipefail; {study}"], log_path)
    finally:
        if not any(running):  # all started here: stop them; services that were running before stay up
            run_logged([sys.executable, "-m", "pipelines.services", "stop"], log_path)
    return last_json(log_path, '{"profile"')


def step_attack(ctx: dict[str, Any], name: str) -> dict[str, Any]:
    where = ctx["work"] / name
    shutil.rmtree(where, ignore_errors=True)
    common = ["--profile", "smoke", "--set", f"pretrain.runs_dir={where}/runs", "--set", f"metrics_dir={where}"]
    common += ["--set", "tracking.enabled=false"]
    log_path = ctx["work"] / f"{name}.log"
    prepare_and_partition(common, log_path)
    pretrain_s = run_logged([*MOCOSFL, "pretrain", *common], log_path)
    attack_s = run_logged([*MOCOSFL, "attack", *common], log_path)
    result = json.loads((where / "attack.json").read_text())
    result.pop("per_seed", None)
    return {**result, "pretrain_wall_s": pretrain_s, "attack_wall_s": attack_s}


STEPS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "ref-1": step_reference,
    "w64-auto-1": step_w64("auto"),
    "w64-fp32": step_w64("fp32"),
    "ref-2": step_reference,
    "w64-auto-2": step_w64("auto"),
    "w16": step_w16,
    "distributed": step_distributed,
    "memory": step_memory,
    "tuning": step_tuning,
    "attack": step_attack,
}


# ------------------------------------------------------------------------------------------------ the record


def machine() -> dict[str, Any]:
    import torch

    from mocosfl.bench import TIMING_FLAGS, cpu_model
    from mocosfl.precision import cpu_flags

    flags = [f for f in TIMING_FLAGS if f in cpu_flags()]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "flags": flags, "torch": torch.__version__}


def provenance() -> dict[str, Any]:
    from mocosfl import identity
    from pipelines.results import code_line

    return {"git": identity.git_commit(ROOT), "training_code_hash": identity.code_hash(), "code_line": code_line(ROOT)}


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def fmt_gb(mib: float) -> str:
    """MiB (ru_maxrss / 1024, torch's and costs.peak_rss_mb's unit) as GB = 10^9 bytes, README's unit."""
    return f"{mib * 2**20 / 1e9:.2f} GB"


def markdown(record: dict[str, Any]) -> str:
    m, p, s = record["machine"], record["provenance"], record["steps"]
    lines = [
        "# Evidence: the README's speed, memory, distributed, tuning and attack figures",
        "",
        f"- Measured: {record['started']} – {record['finished']} UTC, one sitting, steps in the order below.",
        f"- Machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or 'none of note'}; "
        f"torch {m['torch']}.",
        f"- Code: {p['code_line']}.",  # the results tables' header format
        "- Written by `make evidence` (`scripts/evidence.py`); raw numbers in `evidence.json`.",
        "",
    ]

    def ok(name: str) -> bool:
        return name in s and "skipped" not in s[name] and "error" not in s[name]

    w64 = [n for n in ("ref-1", "w64-auto-1", "w64-fp32", "ref-2", "w64-auto-2") if n in s]
    if w64:
        refs = [s[n]["sim_step_s"] for n in ("ref-1", "ref-2") if ok(n)]
        ref = mean(refs) if refs else None
        lines += [
            "## Against the reference code (width 64, cut 1, N = 1000, M = 100, b = 1, K = 6000, 2 threads)",
            "",
            "| step (in order) | precision | sim step (median) | central step | reference ÷ this | GFLOP/s |",
            "|---|---|---|---|---|---|",
        ]
        for n in w64:
            r = s[n]
            if not ok(n):
                lines.append(f"| {n} | {r.get('skipped') or r.get('error')} | | | | |")
                continue
            vs = f"{ref / r['sim_step_s']:.2f}×" if ref else "—"
            gf = f"{r['gflops']:.0f}" if "gflops" in r else "—"
            prec = r.get("precision", "fp32 (reference)")
            lines.append(f"| {n} | {prec} | {r['sim_step_s']:.3f} s | {r['central_step_s']:.3f} s | {vs} | {gf} |")
        auto = [s[n]["sim_step_s"] for n in ("w64-auto-1", "w64-auto-2") if ok(n)]
        if ref and auto:
            lines += ["", f"Mean of the reference runs ÷ mean of the `auto` runs: **{ref / mean(auto):.2f}×**."]
        lines.append("")
    if ok("w16"):
        lines += [
            "## Simulated vs centralized step, width 16, cut 1, M = 100, b = 1 (`mocosfl bench --profile cpu`)",
            "",
            "| N | sim step | central step | sim / central | peak RSS | sync | precision |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in s["w16"]["rows"]:
            lines.append(
                f"| {r['num_clients']:,} | {fmt_ms(r['sim_step_s'])} | {fmt_ms(r['central_step_s'])} | "
                f"{r['ratio']:.3f} | {fmt_gb(r['peak_rss_mb'])} | {r['sync_ms']:.2f} ms | {r['precision']} |"
            )
        lines.append("")
    if ok("distributed"):
        r = s["distributed"]
        inproc = ", ".join(fmt_ms(x) for x in r["in_process_step_s"])
        wire = "not readable" if r["wire_bytes_per_step"] is None else f"{r['wire_bytes_per_step'] / 1e6:.2f} MB"
        vs = "" if r["wire_vs_accounting"] is None else f" ({r['wire_vs_accounting']:.3f})"
        lines += [
            f"## Distributed vs in-process (width {r['width']}, N = {r['num_clients']:,}, {r['client_hosts']} client "
            f"hosts, {r['precision']})",
            "",
            "| in-process (before, after) | distributed | ratio | wire / accounted bytes per step | peak RSS: server, "
            "client hosts | own memory added: server, client hosts |",
            "|---|---|---|---|---|---|",
            f"| {inproc} | {fmt_ms(r['distributed_step_s'])} | {r['distributed_ratio']:.3f} | "
            f"{wire} / {r['accounted_bytes_per_step'] / 1e6:.2f} MB{vs} | {r['server_peak_rss_mb']:.0f} MB, "
            f"{', '.join(f'{x:.0f}' for x in r['client_host_peak_rss_mb'])} MB | "
            f"{r['server_anon_rss_added_mb']:.0f} MB, "
            f"{', '.join(f'{x:.0f}' for x in r['client_host_anon_rss_added_mb'])} MB |",
            "",
        ]
    if ok("memory"):
        lines += [
            "## Peak RSS, 20 pretrain steps at N = 10,000, cut 5, width 64, M = 100, b = 1 (checkpoint at step 10)",
            "",
            "| clients | peak RSS | wall |",
            "|---|---|---|",
        ]
        for r in s["memory"]["rows"]:
            lines.append(f"| {r['clients']} | {fmt_gb(r['peak_rss_mb'])} | {r['wall_s']:.0f} s |")
        lines.append("")
    if ok("tuning"):
        r = s["tuning"]
        per_s = {k: r[k]["trials_finished"] / r[k]["seconds"] for k in ("2x1", "1x2")}
        lines += [
            f"## Tuning on the work pool ({r['trials']} `{r['profile']}` trials, no pruning)",
            "",
            "| layout | wall | trials finished |",
            "|---|---|---|",
            f"| 2 workers × 1 thread | {r['2x1']['seconds']:.1f} s | {r['2x1']['trials_finished']} |",
            f"| 1 worker × 2 threads | {r['1x2']['seconds']:.1f} s | {r['1x2']['trials_finished']} |",
            "",
            f"Speed-up in wall time, 1×2 ÷ 2×1: **{r['speedup_2x1_over_1x2']:.2f}×**; in trials per second: "
            f"{per_s['2x1'] / per_s['1x2']:.2f}×.",
            "",
        ]
    if ok("attack"):
        r = s["attack"]
        fl = r["floors"]
        lines += [
            "## Model-inversion attack, smoke profile (width 8, cut 1, 60 steps)",
            "",
            "| | SSIM | PSNR (dB) | MSE |",
            "|---|---|---|---|",
            f"| attack on the trained client | {r['ssim']['mean']:.3f} ± {r['ssim']['std']:.3f} | "
            f"{r['psnr']['mean']:.2f} ± {r['psnr']['std']:.2f} | {r['mse']['mean']:.4f} ± {r['mse']['std']:.4f} |",
            f"| attack on the random-init client | {fl['random_init']['ssim']:.3f} | {fl['random_init']['psnr']:.2f} | "
            f"{fl['random_init']['mse']:.4f} |",
            f"| the mean auxiliary image | {fl['mean_image']['ssim']:.3f} | {fl['mean_image']['psnr']:.2f} | "
            f"{fl['mean_image']['mse']:.4f} |",
            "",
            f"Pretrain {r['pretrain_wall_s']:.0f} s, attack stage {r['attack_wall_s']:.0f} s (wall).",
            "",
        ]
    failed = [f"- {n}: {s[n]['error']}" for n in s if "error" in s[n]]
    if failed:
        lines += ["## Steps that failed", "", *failed, ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated steps (default: all): {', '.join(STEPS)}")
    parser.add_argument("--ref-python", default=os.environ.get("MOCOSFL_REF_PYTHON"), help="the reference's python")
    parser.add_argument("--mirror", default=os.environ.get("MOCOSFL_REF_MIRROR"), help="SonyResearch/MocoSFL mirror")
    parser.add_argument(
        "--out", type=Path, help="where evidence.md/.json go (default: reports/, or --work with --only)"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "evidence", help="logs and scratch")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(STEPS)
    # A partial sitting must not replace the committed record of a whole one.
    args.out = args.out or (args.work if args.only else ROOT / "reports")
    unknown = [n for n in names if n not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}; known: {', '.join(STEPS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    ctx = {"work": args.work, "ref_python": args.ref_python, "mirror": args.mirror}
    record: dict[str, Any] = {
        "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "machine": machine(),
        "provenance": provenance(),
        "steps": {},
    }
    for name in names:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        (args.work / f"{name}.log").unlink(missing_ok=True)
        t0 = time.perf_counter()
        try:
            result = STEPS[name](ctx, name)
        except (StepFailed, OSError, KeyError, ValueError, IndexError) as e:
            result = {"error": str(e)}
        result["step_wall_s"] = round(time.perf_counter() - t0, 1)
        record["steps"][name] = result
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {result.get('error', 'done')} ({result['step_wall_s']} s)")
        # Kept after every step, so an interrupted sitting keeps what it measured (in the work folder).
        (args.work / "evidence-partial.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    record["finished"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evidence.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    (args.out / "evidence.md").write_text(markdown(record))
    print(f"wrote {args.out / 'evidence.md'} and evidence.json")
    return 1 if any("error" in r for r in record["steps"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
