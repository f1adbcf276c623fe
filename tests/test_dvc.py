"""`dvc repro` of dvc.yaml on the `test` profile in a copy of the repository: runs, is idempotent,
re-runs only what a changed param touches, and push/pull restore the outputs from the local remote."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ARCHIVE, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.integration]

VENV = Path(sys.executable).parent.parent  # not resolved: the venv, not the base interpreter
DVC = VENV / "bin" / "dvc"
STAGES = ("prepare", "partition", "pretrain", "evaluate", "report")


def _copy_repo(dest: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files, as a fresh git repository."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(VENV)  # stage cmds call .venv/bin/mocosfl
    (dest.parent / "shared").symlink_to(ARCHIVE.parents[1])  # data.source is ../shared/data/...
    params = dest / "params.yaml"
    params.write_text(re.sub(r"(?m)^profile: \S+", "profile: test", params.read_text()))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(git + cmd, cwd=dest, check=True, capture_output=True)


def _ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


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

    def dvc(*args: str) -> str:
        proc = subprocess.run([str(DVC), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

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
    assert _ran(dvc("repro")) == {"pretrain", "evaluate", "report"}
    assert "Data and pipelines are up to date" in dvc("status")

    # Push to the default local remote (.dvcstore/), lose every output and the cache, pull them back.
    dvc("push")
    assert (repo / ".dvcstore").is_dir()
    for name in ("data", "runs", "metrics", "reports", ".dvc/cache"):
        shutil.rmtree(repo / name)
    assert "Data and pipelines are up to date" not in dvc("status")
    dvc("pull")
    assert list((repo / "runs").glob("*/encoder.pt")) and (repo / "metrics/eval.json").is_file()
    assert "Data and pipelines are up to date" in dvc("status")
