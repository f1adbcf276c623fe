"""Shared fixtures: the real CIFAR-10 archive prepared once per session into a temp folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params.yaml"
ARCHIVE = (ROOT / "../shared/data/cifar10-jpeg.tar.gz").resolve()

os.environ.setdefault("MOCOSFL_NO_PROGRESS", "1")
# Library/CLI tests don't log to MLflow; the pipeline tests turn it on against a temp store.
os.environ.setdefault("MOCOSFL_TRACKING", "0")


def copy_checkout(dest: Path) -> None:
    """The working tree's tracked and untracked-not-ignored files copied into ``dest`` (dvc.yaml, .dvc/config,
    the Makefile as they are), with ``dest/.venv`` pointing at this venv (scripts/mocosfl and the Makefile run
    the workspace's .venv)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    (dest / ".venv").symlink_to(Path(sys.executable).parent.parent)  # not resolved: the venv itself


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mocosfl")


@pytest.fixture(scope="session")
def base_overrides(workdir: Path) -> list[str]:
    """--set values that keep every generated file of the test profile under a temp folder."""
    if not ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {ARCHIVE}")
    return [
        f"data.prepared_dir={workdir / 'prepared'}",
        f"partition.out_dir={workdir / 'partitions'}",
        f"pretrain.runs_dir={workdir / 'runs'}",
        f"metrics_dir={workdir / 'metrics'}",
        "pretrain.num_threads=2",
    ]


def cli_args(command: str, overrides: list[str], *extra: str, profile: str = "test") -> list[str]:
    args = [command, "--params", str(PARAMS), "--profile", profile]
    for o in overrides:
        args += ["--set", o]
    return args + list(extra)


@pytest.fixture(scope="session")
def prepared(base_overrides: list[str]) -> list[str]:
    """Prepare + partition the test profile once; returns the overrides to reuse them."""
    from mocosfl.cli import main

    assert main(cli_args("prepare", base_overrides)) == 0
    assert main(cli_args("partition", base_overrides)) == 0
    return base_overrides


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and don't fight other jobs for the 2 cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """A throw-away sshd on 127.0.0.1 and a free port (tests/sshd.py), stopped at the end; skips without
    OpenSSH's server. Yields its ``Sshd``: client key, known_hosts, ``url(path)``."""
    from sshd import Sshd, running

    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.configure()
    with running(server):
        yield server
