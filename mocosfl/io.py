"""Atomic file writes: a reader (another process, DVC, a resumed run) never sees half a file.

Every writer in mocosfl goes through ``atomic_path``: write to a hidden temp file next to the target,
then ``os.replace`` it into place (atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path to write ``path``'s content to; on success it replaces ``path``, else it is removed.

    ``suffix`` is appended to the temp name for writers that insist on an extension (``np.savez`` adds
    ``.npz`` unless the name ends in it; matplotlib picks the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write, indented and key-sorted (diff-friendly metrics files)."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
