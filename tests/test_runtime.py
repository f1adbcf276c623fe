"""Tests for mocosfl.runtime: the process-wide thread and allocator settings."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

from mocosfl import runtime


def _glibc() -> bool:
    try:
        ctypes.CDLL("libc.so.6").gnu_get_libc_version  # noqa: B018
    except (OSError, AttributeError):
        return False
    return True


@pytest.mark.skipif(not (sys.platform.startswith("linux") and _glibc()), reason="glibc only")
def test_keep_freed_memory_is_accepted_by_glibc() -> None:
    # In a child, so this test process keeps its own allocator settings.
    code = "from mocosfl import runtime; print(runtime.keep_freed_memory())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize("var", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_keep_freed_memory_leaves_the_users_malloc_settings_alone(var: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, "131072")
    assert runtime.keep_freed_memory() is False


def test_configure_sets_threads() -> None:
    # A count other than the child's default, so the test cannot pass without configure() acting;
    # None keeps the default.
    code = (
        "import torch; from mocosfl import runtime; n = torch.get_num_threads(); runtime.configure(None); "
        "print(n, torch.get_num_threads(), end=' '); runtime.configure(n + 1); print(torch.get_num_threads())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    default, after_none, after = map(int, out.stdout.split())
    assert (after_none, after) == (default, default + 1)
