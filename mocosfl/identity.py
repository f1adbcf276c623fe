"""What a result depends on: the training code's hash, part of every run id and results-cache key.

``code_hash()`` hashes the syntax tree of every module under ``mocosfl/`` that training or evaluation
runs, so an edit that can change a number (even one nobody remembered to version) changes the run id
and the run is trained anew. Comments, blank lines, formatting and docstrings are not in the syntax
tree as hashed, so they change nothing. Modules that only present or time results are left out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
# Relative to mocosfl/: modules that cannot change what a run computes.
NOT_TRAINING_CODE = ("cli.py", "bench.py", "identity.py", "__main__.py", "tracking.py", "experiments/suites.py")


def training_sources(package: Path = PACKAGE) -> list[Path]:
    """The modules whose code the hash covers, in a stable order."""
    files = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel not in NOT_TRAINING_CODE and "__pycache__" not in rel:
            files.append(path)
    return files


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if (
                body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
    return tree


# CPython keeps its AST recursion counter per interpreter, not per thread, so ast.parse while another thread
# builds an AST can fail with "SystemError: AST constructor recursion depth mismatch" (see CPython gh-106905).
# Seen on Python 3.11.7 in CI (2026-12-07) when a Prefect worker's flow ran `prepare`. Parsing is pure: retry.
_PARSE_TRIES = 5


def _parse(text: str) -> ast.Module:
    for attempt in range(_PARSE_TRIES - 1):
        try:
            return ast.parse(text)
        except SystemError as e:
            if "recursion depth mismatch" not in str(e):
                raise
            time.sleep(0.01 * (attempt + 1))
    return ast.parse(text)  # the last try raises whatever it raises


def source_digest(text: str) -> str:
    """Hash of one module's code, blind to comments, formatting and docstrings."""
    tree = _strip_docstrings(_parse(text))
    return hashlib.sha256(ast.dump(tree, annotate_fields=False).encode()).hexdigest()


@functools.cache
def code_hash(package: Path = PACKAGE) -> str:
    """12 hex digits over the training modules' names and code (computed once per process)."""
    h = hashlib.sha256()
    for path in training_sources(package):
        h.update(path.relative_to(package).as_posix().encode() + b"\0")
        h.update(source_digest(path.read_text()).encode() + b"\n")
    return h.hexdigest()[:12]


def git_commit(root: Path = PACKAGE.parent) -> str | None:
    """The checkout's HEAD commit, ``<sha>-dirty`` when tracked files differ from it; None outside git."""
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    head = git("rev-parse", "HEAD")
    if not head:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")
