"""The checkout's pipeline lock (pipelines/lock.py), between real processes: a second run waits (or is
refused in one line), and a holder killed with SIGKILL leaves nothing locked."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.lock import Busy, exclusive

HOLD = """
import sys, time
from pipelines.lock import exclusive
with exclusive("holder job", sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(directory: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_waits_for_the_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 1.5)
    said: list[str] = []
    t0 = time.monotonic()
    with exclusive("second job", tmp_path, log=said.append):
        waited = time.monotonic() - t0  # it got the lock only once the holder had let go, after its 1.5 s
    holder.wait(timeout=10)
    assert waited >= 1.0
    assert said[0].startswith("second job: waiting for holder job (pid ") and str(holder.pid) in said[0]
    assert said[1].startswith("second job: lock acquired after ")


def test_refused_in_one_line_when_asked_not_to_wait(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 30)
    try:
        with pytest.raises(Busy, match=r"is busy: holder job \(pid \d+ on .*\); wait for it") as e:
            with exclusive("second job", tmp_path, wait=False):
                pass
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_killed_holder_leaves_it_free(tmp_path: Path) -> None:
    holder = _holder(tmp_path, 60)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with exclusive("after a crash", tmp_path, wait=False):  # no Busy: the kernel dropped the dead holder's lock
        pass


def test_reentrant_within_a_process(tmp_path: Path) -> None:
    said: list[str] = []
    with exclusive("job", tmp_path, log=said.append):
        with exclusive("its stage", tmp_path, wait=False, log=said.append):
            pass
        with exclusive("another stage", tmp_path, wait=False, log=said.append):
            pass
    assert said == []
    with exclusive("next job", tmp_path, wait=False):  # released once the outermost holder ended
        pass
