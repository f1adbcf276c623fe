"""Prefect flow `mocosfl`: prepare -> partition -> pretrain -> evaluate -> report, the model-inversion
attack on a trained run, or an Optuna study.

Each task is one call into the mocosfl CLI. When the flow runs params.yaml's own
profile with no overrides, stages go through `dvc repro --single-item`, so DVC's
lock records what Prefect produced and `dvc status` stays clean afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from pipelines import lock

ROOT = Path(__file__).resolve().parents[1]
# The library logs progress at INFO on the `mocosfl` logger; Prefect attaches its handlers to it
# (PREFECT_LOGGING_EXTRA_LOGGERS, set in pipelines.env) but leaves the level to us.
logging.getLogger("mocosfl").setLevel(logging.INFO)
PARAMS = ROOT / "params.yaml"
JOBS = {
    "pretrain": ["prepare", "partition", "pretrain", "evaluate"],
    "pipeline": ["prepare", "partition", "pretrain", "evaluate", "report"],
    "attack": ["prepare", "partition", "pretrain", "attack"],
    "tune": ["prepare", "partition", "tune"],
}
# What each stage leaves in metrics/ (read back when DVC ran the stage in a subprocess).
STAGE_METRICS = {
    "partition": "partition.json",
    "pretrain": "pretrain.json",
    "evaluate": "eval.json",
    "attack": "attack.json",
}


def params_profile() -> str:
    return str((yaml.safe_load(PARAMS.read_text()) or {}).get("profile", "default"))


def dvc_bin() -> str | None:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else shutil.which("dvc")


def use_dvc(stage: str, profile: str, overrides: list[str]) -> bool:
    """DVC runs the stage only for the configuration it tracks: params.yaml exactly as written."""
    return (
        stage != "tune"
        and not overrides
        and profile == params_profile()
        and (ROOT / "dvc.yaml").exists()
        and (ROOT / ".dvc").is_dir()
        and dvc_bin() is not None
        and os.environ.get("MOCOSFL_USE_DVC", "1") != "0"
    )


def cli_args(stage: str, profile: str, overrides: list[str]) -> list[str]:
    args = [stage, "--params", str(PARAMS), "--profile", profile]
    for o in overrides:
        args += ["--set", o]
    return args


def run_stage(stage: str, profile: str, overrides: list[str]) -> dict[str, Any]:
    """Run one stage, through DVC when it tracks this configuration, else in-process."""
    if use_dvc(stage, profile, overrides):
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        # Output goes straight to the terminal: the stage's own progress bar stays visible.
        proc = subprocess.run([dvc_bin() or "dvc", "repro", "--single-item", stage], cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"dvc repro {stage} failed with exit code {proc.returncode} (its output is above)")
        name = STAGE_METRICS.get(stage)
        if name is None:
            return {"stage": stage, "via": "dvc"}
        from mocosfl.config import load_config

        metrics = Path(load_config(PARAMS, profile).metrics_dir) / name
        result = json.loads(metrics.read_text())
        result.pop("history", None)
        return {**result, "via": "dvc"}
    from mocosfl import cli

    result = cli.run(cli_args(stage, profile, overrides))
    result.pop("history", None)
    return result


@task(name="prepare")
def prepare(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("prepare", profile, overrides)


@task(name="partition")
def partition(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("partition", profile, overrides)


@task(name="pretrain")
def pretrain(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("pretrain", profile, overrides)


@task(name="evaluate")
def evaluate(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("evaluate", profile, overrides)


@task(name="attack")
def attack(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("attack", profile, overrides)


@task(name="report")
def report(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("report", profile, overrides)


@task(name="tune")
def tune(profile: str, overrides: list[str]) -> dict[str, Any]:
    return run_stage("tune", profile, overrides)


TASKS = {t.name: t for t in (prepare, partition, pretrain, evaluate, attack, report, tune)}


@flow(name="mocosfl", log_prints=True)
def mocosfl_flow(profile: str = "cpu", overrides: list[str] | None = None, job: str = "pipeline") -> dict[str, Any]:
    """Run a job (`pretrain`, `pipeline`, `attack` or `tune`) for a profile and KEY=VALUE overrides.

    The job holds the checkout's pipeline lock (pipelines/lock.py) while it writes data/, runs/ and metrics/,
    so a second flow run in the same checkout waits for it; a study (`tune`) releases it after partitioning,
    since its trials may be shared with other processes."""
    if job not in JOBS:
        raise ValueError(f"job={job!r} is invalid: allowed {', '.join(JOBS)}")
    overrides = list(overrides or [])
    logger = get_run_logger()
    results: dict[str, Any] = {}
    stages = JOBS[job]
    with lock.exclusive(f"flow job {job}", ROOT, log=logger.info):
        for stage in stages:
            if stage == "tune":
                break
            logger.info("stage %s (profile %s, overrides %s)", stage, profile, overrides or "none")
            results[stage] = TASKS[stage](profile, overrides)
    if "tune" in stages:
        logger.info("stage tune (profile %s, overrides %s)", profile, overrides or "none")
        results["tune"] = TASKS["tune"](profile, overrides)
    return results


@flow(name="mocosfl-tune-trials", log_prints=True)
def tune_trials_flow(config: dict[str, Any], parent_run_id: str | None = None) -> dict[str, Any]:
    """Run trials of a shared Optuna study until it holds `tune.n_trials` finished ones: what a study with
    `tune.executor=pool` submits to the work pool. `config` is the study's whole config (Config.to_dict());
    `parent_run_id` is the study's MLflow run, under which each trial's run is nested."""
    from mocosfl.config import from_portable
    from pipelines.tune import run_trials

    # Its paths are relative to the submitting checkout's root: resolved against this host's checkout.
    return run_trials(from_portable(config, ROOT), parent_run_id=parent_run_id, log=get_run_logger().info)


@flow(name="mocosfl-results-run", log_prints=True)
def results_run_flow(
    config: dict[str, Any],
    suite: str,
    label: str,
    seed_offset: int,
    name: str,
    key: str,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One run of a results suite (row `label` at seed `seed + seed_offset`): what `mocosfl results --executor
    pool` submits to the work pool, one flow run per missing run. `config` is the suite's config
    (mocosfl.config.portable); the row's MLflow run is nested under the suite's run `parent_run_id`."""
    from mocosfl.config import from_portable
    from pipelines.results import run_on_pool_worker

    cfg = from_portable(config, ROOT)
    return run_on_pool_worker(cfg, suite, label, seed_offset, name, key, parent_run_id, log=get_run_logger().info)
