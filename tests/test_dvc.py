"""`dvc repro` of dvc.yaml on the `test` profile in a copy of the repository: runs, draws every declared
plot, is idempotent, re-runs only what a changed param touches, push/pull restore the outputs from the
local remote, and experiments run in DVC's temporary copies (`exp run --temp`, `--queue` + `queue start`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import ARCHIVE, copy_checkout

pytestmark = [pytest.mark.slow, pytest.mark.integration]

VENV = Path(sys.executable).parent.parent  # not resolved: the venv, not the base interpreter
DVC = VENV / "bin" / "dvc"
STAGES = ("prepare", "partition", "pretrain", "evaluate", "attack", "report")
PNG = b"\x89PNG\r\n\x1a\n"


def _copy_repo(dest: Path) -> None:
    """The working tree as a fresh workspace on the test profile, with ../shared beside it."""
    copy_checkout(dest)
    (dest.parent / "shared").symlink_to(ARCHIVE.parents[1])  # data.source is ../shared/data/...
    params = dest / "params.yaml"
    params.write_text(re.sub(r"(?m)^profile: \S+", "profile: test", params.read_text()))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def _declared_plots(repo: Path) -> set[str]:
    """Top-level plot ids and the stages' plot outputs in dvc.yaml: what `dvc plots show` must draw."""
    doc = yaml.safe_load((repo / "dvc.yaml").read_text())
    names = {next(iter(p)) if isinstance(p, dict) else p for p in doc.get("plots", [])}
    for stage in doc["stages"].values():
        names |= {next(iter(p)) if isinstance(p, dict) else p for p in stage.get("plots", [])}
    return names


def _check_plots(shown: dict) -> None:
    """Every plot of `dvc plots show --json` has data: vega points, or an image file that is a PNG."""
    assert not shown.get("errors"), shown["errors"]
    for name, renders in shown["data"].items():
        assert renders, f"plot {name!r} has no data"
        for r in renders:
            if r["type"] == "image":
                assert Path(r["url"]).read_bytes()[:8] == PNG, name
            else:
                values = r["content"]["data"]["values"]
                assert values and all("step" in v for v in values), name


def _experiments(shown: list) -> dict[str, dict]:
    """`dvc exp show --json` -> {experiment name: its data (params, metrics)}."""
    return {e["name"]: e["revs"][0]["data"] for rev in shown for e in rev.get("experiments") or []}


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if not ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {ARCHIVE}")
    if not DVC.exists():
        pytest.skip(f"dvc not installed in {VENV}")
    dest = tmp_path / "main"
    dest.mkdir()
    _copy_repo(dest)
    return dest


def test_dvc_repro_status_and_push_pull(repo: Path) -> None:
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(repo / ".dvc" / "tmp" / "site-cache"),
        "MOCOSFL_TRACKING": "0",
        "MOCOSFL_NO_PROGRESS": "1",
    }
    env.pop("MOCOSFL_PARAMS", None)

    def dvc(*args: str, stdout_only: bool = False, path: str | None = None) -> str:
        run_env = env if path is None else {**env, "PATH": path}
        proc = subprocess.run([str(DVC), *args], cwd=repo, env=run_env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout if stdout_only else proc.stdout + proc.stderr

    assert _ran(dvc("repro")) == set(STAGES)
    for name in (
        "metrics/partition.json",
        "metrics/partition_heatmap.png",
        "metrics/pretrain.json",
        "metrics/eval.json",
        "reports/report.md",
        "reports/loss.png",
    ):
        assert (repo / name).is_file(), name
    assert "profile test" in (repo / "reports/report.md").read_text()
    shown = json.loads(dvc("plots", "show", "--json", stdout_only=True))
    assert _declared_plots(repo) <= set(shown["data"]), sorted(shown["data"])
    _check_plots(shown)

    again = dvc("repro")
    assert not _ran(again) and "Data and pipelines are up to date" in again
    assert "Data and pipelines are up to date" in dvc("status")

    # A pretrain knob re-runs pretrain and what reads its outputs, never the data stages.
    params = repo / "params.yaml"
    text = params.read_text()
    assert text.count("\n  lr: 0.06") == 1
    params.write_text(text.replace("\n  lr: 0.06", "\n  lr: 0.05"))
    status = dvc("status")
    assert "pretrain:" in status and "prepare:" not in status and "partition:" not in status
    assert _ran(dvc("repro")) == {"pretrain", "evaluate", "attack", "report"}
    assert "Data and pipelines are up to date" in dvc("status")

    # An edit of the training code that changes the numbers: DVC re-runs pretrain and it trains anew
    # (a new run id) instead of answering "already finished"; the old run stays for whoever needs it.
    before = json.loads((repo / "metrics/pretrain.json").read_text())
    server = repo / "mocosfl/sfl/server.py"
    code = server.read_text()
    assert "/ temperature" in code
    server.write_text(code.replace("/ temperature", "/ (0.9 * temperature)", 1))
    retrained = dvc("repro")
    assert _ran(retrained) == {"pretrain", "evaluate", "attack", "report"} and "already finished" not in retrained
    after = json.loads((repo / "metrics/pretrain.json").read_text())
    assert after["run_id"] != before["run_id"] and after["code_hash"] != before["code_hash"]
    assert after["resumed_from_step"] == 0 and after["final_loss"] != before["final_loss"]
    server.write_text(code)
    assert "already finished" in dvc("repro")  # back to the old code: its finished run is reused

    # Push to the default local remote (.dvcstore/), lose every output and the cache, pull them back.
    dvc("push")
    assert (repo / ".dvcstore").is_dir()
    for name in ("data", "runs", "metrics", "reports", ".dvc/cache"):
        shutil.rmtree(repo / name)
    assert "Data and pipelines are up to date" not in dvc("status")
    dvc("pull")
    assert list((repo / "runs").glob("*/encoder.pt")) and (repo / "metrics/eval.json").is_file()
    assert "Data and pipelines are up to date" in dvc("status")

    # Experiments in DVC's temporary copies (.dvc/tmp/exps/...), which have no .venv and no ../shared;
    # up to `pretrain` only: that stage already needs the CLI, the code and the data (evaluate adds ~20 s each).
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["add", "-A"], ["commit", "-qm", "lock"]):
        subprocess.run(git + cmd, cwd=repo, check=True, capture_output=True)
    temp = dvc("exp", "run", "--temp", "-n", "temp-lr", "-S", "pretrain.lr=0.04", "pretrain")
    assert _ran(temp) == {"pretrain"}, temp
    path = f"{DVC.parent}{os.pathsep}{env.get('PATH', '')}"  # the queue starts its worker as `dvc` from PATH
    dvc("exp", "run", "--queue", "-n", "queued-lr", "-S", "pretrain.lr=0.03", "pretrain")
    dvc("queue", "start", path=path)
    deadline = time.monotonic() + 300
    while re.search(r"\b(Queued|Running)\b", status := dvc("queue", "status", path=path)):
        if time.monotonic() > deadline:
            dvc("queue", "stop", "--kill", path=path)
            pytest.fail(f"queued experiment not done after 300 s:\n{status}")
        time.sleep(2)
    assert re.search(r"queued-lr\s.*Success", status), status
    shown = json.loads(dvc("exp", "show", "--json", stdout_only=True))
    exps = _experiments(shown)
    run_ids = {shown[0]["data"]["metrics"]["metrics/pretrain.json"]["data"]["run_id"]}  # the workspace's
    for name, lr in (("temp-lr", 0.04), ("queued-lr", 0.03)):
        assert exps[name]["params"]["params.yaml"]["data"]["pretrain"]["lr"] == lr, name
        pretrained = exps[name]["metrics"]["metrics/pretrain.json"]["data"]
        assert pretrained["steps"] > 0 and pretrained["run_id"] not in run_ids, (name, pretrained)  # its own run
        run_ids.add(pretrained["run_id"])
