"""A pretrain killed with SIGKILL and resumed ends with the same metrics as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PARAMS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

# Checkpoints every 2 steps with rounds of 5: the kill can land mid-round or at a sync.
RUN = ["pretrain.steps=14", "sfl.sync_period=5", "pretrain.checkpoint_every=2", "pretrain.knn_every=7"]


def _pretrain_cmd(overrides: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "mocosfl.cli", "pretrain", "--params", str(PARAMS), "--profile", "test"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _env() -> dict[str, str]:
    return {**os.environ, "MOCOSFL_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def _run(overrides: list[str]) -> dict:
    subprocess.run(_pretrain_cmd(overrides), check=True, env=_env(), cwd=ROOT, capture_output=True)
    mdir = next(o.split("=", 1)[1] for o in overrides if o.startswith("metrics_dir="))
    return json.loads((Path(mdir) / "pretrain.json").read_text())


def _with(overrides: list[str], tmp: Path, name: str, precision: str) -> list[str]:
    kept = [o for o in overrides if not o.startswith(("pretrain.runs_dir=", "metrics_dir="))]
    where = [f"pretrain.runs_dir={tmp / name / 'runs'}", f"metrics_dir={tmp / name / 'metrics'}"]
    return kept + RUN + [f"pretrain.precision={precision}"] + where


# Exact within one precision mode: bf16 autocast is as deterministic on CPU as fp32.
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sigkill_then_resume_matches_uninterrupted(prepared: list[str], tmp_path: Path, precision: str) -> None:
    clean = _run(_with(prepared, tmp_path, "clean", precision))
    assert clean["precision"] == precision

    killed = _with(prepared, tmp_path, "killed", precision)
    runs = tmp_path / "killed" / "runs"
    proc = subprocess.Popen(
        _pretrain_cmd(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    # Kill once a checkpoint past step 6 exists: several rounds done, the run not finished.
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.stem.split("-")[1]) for p in runs.glob("*/ckpt-*.pt")]
        if steps and max(steps) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    steps = sorted(int(p.stem.split("-")[1]) for p in runs.glob("*/ckpt-*.pt"))
    assert steps and max(steps) < 14
    assert not list(runs.glob("*/pretrain.json"))

    resumed = _run(killed)
    assert resumed["resumed_from_step"] == max(steps)
    assert resumed["steps"] == clean["steps"] == 14
    assert resumed["final_loss"] == clean["final_loss"]
    assert resumed["knn_top1"] == clean["knn_top1"]
    strip = ("steps_per_s",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in resumed["history"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in clean["history"]
    ]
