"""Checkpoints of a run: one small ``ckpt-<step>.pt`` per save plus a ``.npy`` per O(N) client bank.

A trainer's state is one dict; entries named ``*_bank`` are O(N) per-client banks (stateful momentum,
unsynced targets: 6 GB at N=10,000, cut 5, width 64). They are streamed to their own
``ckpt-<step>.<name>.npy`` files next to the small ``ckpt-<step>.pt`` and read back straight into the
trainer's bank, so neither saving nor resuming holds a second copy. The .pt file is written last and is
what makes a checkpoint exist; when its banks reach LARGE_CHECKPOINT_BYTES only the newest checkpoint is
kept, so the disk holds at most two while a new one is written.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from mocosfl.io import atomic_path
from mocosfl.sfl import clients as C

log = logging.getLogger(__name__)

LARGE_CHECKPOINT_BYTES = 1 << 30
BANK_SUFFIX = "_bank"


def checkpoint_files(directory: Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    return sorted(directory.glob("ckpt-*.pt"))


def _bank_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.parent.glob(f"{ckpt.stem}.*.npy"))


def _remove_checkpoint(ckpt: Path) -> None:
    ckpt.unlink(missing_ok=True)  # first, so a half-removed checkpoint is never picked up
    for f in _bank_files(ckpt):
        f.unlink(missing_ok=True)


def save_checkpoint(directory: Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` atomically as ``ckpt-<step>.pt`` (+ one .npy per bank); keep the newest ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{state['step']:09d}.pt"
    small = dict(state)
    bank_bytes = 0
    for name, value in state.items():
        if name.endswith(BANK_SUFFIX) and isinstance(value, C.ClientStateBank):
            bank = directory / f"{path.stem}.{name}.npy"
            with atomic_path(bank) as tmp:
                value.save(tmp)
            small[name] = {"npy": bank.name, "shape": list(value.flat.shape)}
            bank_bytes += value.nbytes
    with atomic_path(path) as tmp:
        torch.save(small, tmp)
    if bank_bytes >= LARGE_CHECKPOINT_BYTES:
        keep = 1
    for old in checkpoint_files(directory)[:-keep]:
        _remove_checkpoint(old)
    kept = {f.stem for f in checkpoint_files(directory)}
    for orphan in directory.glob("ckpt-*.*.npy"):  # banks of a save that was killed before its .pt
        if orphan.name.split(".")[0] not in kept:
            orphan.unlink(missing_ok=True)
    return path


def checkpoint_step(path: Path) -> int:
    """The step a ``ckpt-<step>.pt`` file was saved at."""
    return int(path.stem.split("-", 1)[1])


def load_latest_checkpoint(directory: Path, step: int | None = None) -> dict[str, Any] | None:
    """Newest readable checkpoint (only the one of ``step`` when given); an unreadable one is skipped with
    a warning, never deleted.

    Bank entries come back as the Path of their .npy file, for ``ClientStateBank.load_``.
    """
    files = checkpoint_files(directory)
    if step is not None:
        files = [f for f in files if checkpoint_step(f) == step]
    for path in reversed(files):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for name, value in state.items():
                if name.endswith(BANK_SUFFIX) and isinstance(value, dict):
                    bank = directory / value["npy"]
                    C.check_npy(bank, tuple(value["shape"]))  # present and complete
                    state[name] = bank
            return state
        except Exception as e:  # noqa: BLE001 - any unreadable file: fall back to the previous one
            log.warning("skipping unreadable checkpoint %s: %s", path, type(e).__name__)
    return None
