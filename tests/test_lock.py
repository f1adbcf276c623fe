"""The checkout's pipeline lock (pipelines/lock.py), between real processes: a second run waits (or is
refused in one line), and a holder killed with SIGKILL leaves nothing locked."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.lock import Busy, exclusive

HOLD = """
import sys
from pipelines.lock import exclusive
with exclusive("holder job", sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()  # until the test says so
    print("releasing", flush=True)
"""


def _holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _release_later(holder: subprocess.Popen, seconds: float) -> threading.Timer:
    def release() -> None:
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()

    timer = threading.Timer(seconds, release)
    timer.start()
    return timer


def test_second_run_waits_for_the_first(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    said: list[str] = []
    timer = _release_later(holder, 1.0)
    t0 = time.monotonic()
    with exclusive("second job", tmp_path, log=said.append):
        waited = time.monotonic() - t0
        assert holder.stdout is not None and holder.stdout.readline().strip() == "releasing"  # it let go first
    timer.join()
    holder.wait(timeout=30)
    assert waited >= 1.0  # the holder cannot let go before the timer told it to
    assert said[0].startswith("second job: waiting for holder job (pid ") and str(holder.pid) in said[0]
    assert said[1].startswith("second job: lock acquired after ")


def test_refused_in_one_line_when_asked_not_to_wait(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(Busy, match=r"is busy: holder job \(pid \d+ on .*\); wait for it") as e:
            with exclusive("second job", tmp_path, wait=False):
                pass
        assert "\n" not in str(e.value)
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_a_killed_holder_leaves_it_free(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
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


def test_another_thread_waits(tmp_path: Path) -> None:
    """Re-entry is per thread: a second thread of the same process is excluded like another process."""
    order: list[str] = []
    entered, waiting = threading.Event(), threading.Event()

    def said(line: str) -> None:
        if "waiting for" in line:
            waiting.set()

    def second() -> None:
        entered.wait(timeout=30)
        with exclusive("thread job", tmp_path, log=said):
            order.append("thread runs")

    thread = threading.Thread(target=second)
    thread.start()
    with exclusive("main job", tmp_path):
        entered.set()
        assert waiting.wait(timeout=30)  # the thread is blocked on the lock, not let in
        order.append("main ends")
    thread.join(timeout=30)
    assert order == ["main ends", "thread runs"]
