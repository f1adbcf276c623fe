"""The seams: a core that runs without the MLOps edge, and run ids that follow the training code."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PARAMS, ROOT

from mocosfl import identity

EDGE = ("pipelines", "mlflow", "prefect", "optuna", "dvc")
CORE = ROOT / "mocosfl"


def _is_edge(name: str) -> bool:
    return name.split(".")[0] in EDGE


def test_core_never_imports_the_edge() -> None:
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call):
                # importlib.import_module("x"), __import__("x"), importlib.util.find_spec("x")
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in ("import_module", "__import__", "find_spec") and node.args:
                    arg = node.args[0]
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names = [arg.value]
                    else:
                        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports a computed name")
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if _is_edge(n)]
    assert not offenders, "the core imports the MLOps edge:\n" + "\n".join(offenders)


def test_core_import_check_catches_an_edge_import(tmp_path: Path) -> None:
    """The scan above is not vacuous: the same walk finds each kind of edge import in a planted file."""
    planted = tmp_path / "bad.py"
    planted.write_text(
        "import mlflow\nfrom pipelines import tracking\nimport importlib\nimportlib.import_module('optuna')\n"
    )
    found = []
    for node in ast.walk(ast.parse(planted.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_edge(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and _is_edge(node.module):
            found.append(node.module)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
            found.append(node.args[0].value)  # type: ignore[attr-defined]
    assert found == ["mlflow", "pipelines", "optuna"]


# ----------------------------------------------------------------------------- the core without the edge

BLOCKER = """
import contextlib
import io
import json
import sys

BLOCKED = {blocked!r}


class Blocker:
    # Makes the edge packages unimportable, as in `pip install .` without the pipeline extra.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, Blocker())
from mocosfl.cli import main

results = []
for argv in json.loads(sys.argv[1]):  # one process for all commands: torch is imported once
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    results.append({{"argv": argv, "rc": rc, "stderr": err.getvalue()}})
print(json.dumps(results))
"""


def _core_only(tmp_path: Path, commands: list[list[str]]) -> list[dict]:
    launcher = tmp_path / "core_only.py"
    launcher.write_text(BLOCKER.format(blocked=["mlflow", "prefect", "optuna", "dvc"]))
    env = {**os.environ, "MOCOSFL_NO_PROGRESS": "1"}
    env.pop("MOCOSFL_TRACKING", None)  # tracking.enabled stays at its default, true
    proc = subprocess.run(
        [sys.executable, str(launcher), json.dumps(commands)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.integration
def test_stages_run_without_the_pipeline_extra(base_overrides: list[str], tmp_path: Path) -> None:
    sets = []
    for o in base_overrides + [f"pretrain.runs_dir={tmp_path / 'runs'}", f"metrics_dir={tmp_path / 'metrics'}"]:
        sets += ["--set", o]
    core = ["prepare", "partition", "pretrain", "evaluate"]
    edge = ["tune", "report", "results"]
    runs = _core_only(tmp_path, [[c, "--params", str(PARAMS), "--profile", "test", *sets] for c in core + edge])
    for run in runs[: len(core)]:
        stage, err = run["argv"][0], run["stderr"]
        assert run["rc"] == 0, f"{stage} failed without the extra:\n{err[-2000:]}"
        assert "Traceback" not in err
        if stage in ("pretrain", "evaluate"):
            warnings = [line for line in err.splitlines() if "tracking is off" in line]
            assert len(warnings) == 1 and "pip install" in warnings[0], err
    assert json.loads((tmp_path / "metrics" / "eval.json").read_text())["knn_top1"] >= 0
    for run in runs[len(core) :]:
        lines = run["stderr"].strip().splitlines()
        assert run["rc"] == 2, run["stderr"]
        assert len(lines) == 1 and "pipeline extra" in lines[0] and "pip install" in lines[0], run["stderr"]


# ----------------------------------------------------------------------------- run identity


def _copy_package(dest: Path) -> Path:
    shutil.copytree(CORE, dest / "mocosfl", ignore=shutil.ignore_patterns("__pycache__"))
    return dest / "mocosfl"


def test_code_hash_follows_code_not_comments(tmp_path: Path) -> None:
    pkg = _copy_package(tmp_path)
    before = identity.code_hash.__wrapped__(pkg)  # type: ignore[attr-defined]
    assert before == identity.code_hash()  # the copy is the same code
    server = pkg / "sfl" / "server.py"
    text = server.read_text()
    server.write_text("# a comment\n" + text.replace("\n\n\n", "\n\n\n# another comment\n", 1))
    assert identity.code_hash.__wrapped__(pkg) == before  # type: ignore[attr-defined]
    (pkg / "cli.py").write_text((pkg / "cli.py").read_text() + "\nX = 1\n")
    assert identity.code_hash.__wrapped__(pkg) == before  # type: ignore[attr-defined]  # not training code
    server.write_text(text + "\nEXTRA_CONSTANT = 2\n")
    assert identity.code_hash.__wrapped__(pkg) != before  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.integration
def test_editing_training_code_trains_a_new_run(prepared: list[str], tmp_path: Path) -> None:
    """Pretrain from a copy of the package, change the loss's code, pretrain again: a new run, trained anew."""
    pkg = _copy_package(tmp_path / "src")
    sets = []
    for o in prepared + [f"pretrain.runs_dir={tmp_path / 'runs'}", f"metrics_dir={tmp_path / 'metrics'}"]:
        sets += ["--set", o]
    env = {**os.environ, "MOCOSFL_NO_PROGRESS": "1", "MOCOSFL_TRACKING": "0", "PYTHONPATH": str(pkg.parent)}

    def pretrain() -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "mocosfl", "pretrain", "--params", str(PARAMS), "--profile", "test", *sets],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "already finished" not in proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = pretrain()
    assert Path(first["run_dir"]).parent == tmp_path / "runs" and first["resumed_from_step"] == 0
    server = pkg / "sfl" / "server.py"
    text = server.read_text()
    # Sharper logits: a change of the numbers that nobody versioned.
    assert text.count("/ temperature") >= 1
    server.write_text(text.replace("/ temperature", "/ (0.9 * temperature)"))
    second = pretrain()
    assert second["run_id"] != first["run_id"] and second["code_hash"] != first["code_hash"]
    assert second["resumed_from_step"] == 0 and second["final_loss"] != first["final_loss"]


def test_code_hash_parse_retries_cpythons_thread_race(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spurious 'recursion depth mismatch' (another thread building an AST) is parsed again; others raise."""
    real, calls = ast.parse, []

    def flaky(text: str) -> ast.Module:
        calls.append(text)
        if len(calls) == 1:
            raise SystemError("AST constructor recursion depth mismatch (before=72, after=92)")
        return real(text)

    want = identity.source_digest("x = 1\n")
    monkeypatch.setattr(identity.ast, "parse", flaky)
    assert identity.source_digest("x = 1\n") == want and len(calls) == 2

    def broken(text: str) -> ast.Module:
        raise SystemError("something else")

    monkeypatch.setattr(identity.ast, "parse", broken)
    with pytest.raises(SystemError, match="something else"):
        identity.source_digest("x = 1\n")
