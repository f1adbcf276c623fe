"""One pipeline at a time per working directory: an exclusive lock on ``.mocosfl.lock``.

Two pipeline runs in one checkout (``make pipeline`` twice, two flow runs picked up by two workers on one
host) would fight over DVC's lock and overwrite each other's ``metrics/*.json``. Each job holds this lock
while it writes there, so a second run waits for the first (saying once whom it waits for) and then runs:
serialized, never interleaved. Trials of a shared study hold it only while they prepare and partition the
data; their training writes into per-trial folders and runs concurrently.

The lock is ``flock(2)`` on a file: the kernel drops it when its holder dies, even by SIGKILL, so a crashed
run never leaves the checkout locked. It is re-entrant within a thread (a job's stage that takes it again in
the same thread does not wait for itself); a child process taking it would wait for its parent, so the stages
a job runs as subprocesses (`dvc repro`, scripts/mocosfl) never take it.

What takes it: the Prefect flow's jobs (`make pipeline`, deployments, pool workers) and, while they prepare
data, studies and results runs on the pool. A bare `mocosfl pretrain` or `dvc repro` does not.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".mocosfl.lock"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose data/, runs/ and metrics/ the lock guards

_held: dict[tuple[Path, int], int] = {}  # (lock file, thread) -> depth
_guard = threading.Lock()


class Busy(RuntimeError):
    """The checkout is locked by another run and the caller asked not to wait."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 512).decode(errors="replace").strip() or "another process"
    except OSError:
        return "another process"


@contextmanager
def exclusive(
    what: str, directory: str | Path = ROOT, wait: bool = True, log: Callable[[str], None] = print
) -> Iterator[None]:
    """Hold the checkout's pipeline lock while ``what`` runs; wait for (or, ``wait=False``, refuse with
    ``Busy``) a holder in another process or thread."""
    key = ((Path(directory) / LOCK_FILE).resolve(), threading.get_ident())
    path = key[0]
    with _guard:
        reentered = key in _held
        if reentered:
            _held[key] += 1
    if reentered:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            if not wait:
                raise Busy(f"{path.parent} is busy: {holder}; wait for it to finish or stop it") from None
            log(f"{what}: waiting for {holder} to finish (lock {path})")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            log(f"{what}: lock acquired after {time.monotonic() - t0:.1f} s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what} (pid {os.getpid()} on {socket.gethostname()})\n".encode(), 0)
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[key]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
