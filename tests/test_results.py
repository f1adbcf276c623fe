"""`mocosfl results` on the tiny test profile: every method end to end, the table and plots, equal budgets,
skipping finished rows (keyed by resolved config, data and training code), MLflow parent + nested runs;
plus the rendering helpers. The suites and row rules themselves: tests/test_experiments.py."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from conftest import PARAMS, cli_args

from mocosfl import identity
from mocosfl.config import ConfigError, load_config
from mocosfl.experiments import rows
from mocosfl.experiments.suites import MAIN
from pipelines import results as R


@pytest.fixture(scope="module")
def suite(prepared, tmp_path_factory, one_thread):
    """The main suite once on the test profile, everything under a temp folder."""
    tmp = tmp_path_factory.mktemp("results")
    overrides = [*prepared, f"pretrain.runs_dir={tmp}/runs", f"report.out_dir={tmp}/reports"]
    cfg = load_config(PARAMS, "test", overrides)
    log: list[str] = []
    out = R.run_suite(cfg, "main", log=log.append)
    return cfg, out, tmp, log, overrides


def _rows(path: str) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_main_suite_runs_every_method(suite) -> None:
    cfg, out, tmp, log, _ = suite
    assert Path(out["markdown"]).name == "results-test.md"  # never the committed cpu table's name
    assert {Path(p).name for p in out["plots"]} == {"results-test-probe.png", "results-test-knn.png"}
    assert all(Path(p).stat().st_size > 0 for p in out["plots"])
    assert any(line.startswith("estimated time for 7 runs") for line in log)
    rows = _rows(out["csv"])
    assert [r["label"] for r in rows] == [row.label for row in MAIN]
    assert {r["method"] for r in rows} == {"mocosfl", "central", "flmoco", "random"}
    by = {r["label"]: r for r in rows}
    trained = [r for r in rows if r["method"] != "random"]
    # Same budget: every trained method saw steps x B images (test profile: 8 x 20 clients x b=2).
    assert {(r["steps"], r["images_seen"]) for r in trained} == {("8", str(8 * 40))}
    assert by["random init"]["images_seen"] == "0"
    fl = by["FL-MoCo"]
    assert (fl["clients_per_round"], fl["client_batch_size"]) == ("10", "4")
    for r in rows:
        assert 0 <= float(r["linear_probe_top1"]) <= 100 and 0 <= float(r["knn_top1"]) <= 100
    # Sync periods at or beyond the 8 steps are one round: one run, reused.
    never = {by[f"MocoSFL, {x}"]["key"] for x in ("sync every 50", "sync every 500", "never sync")}
    assert len(never) == 1 and by["MocoSFL, never sync"]["sync_period"] == "8"
    assert by["MocoSFL, sync every step"]["sync_period"] == "1"
    # Cost columns: central has no clients; cut 1 at width 8 on 32 px is 3 x 2 x 27 x 8 x 32 x 32 FLOPs/image.
    assert by["centralized MoCo"]["bytes_per_client"] == "" and by["centralized MoCo"]["client_params"] == ""
    assert float(by["MocoSFL"]["client_flops_per_image"]) == 3 * 2 * 27 * 8 * 32 * 32
    assert float(fl["client_flops_per_image"]) > 50 * float(by["MocoSFL"]["client_flops_per_image"])
    assert float(fl["bytes_per_client"]) > float(by["MocoSFL"]["bytes_per_client"]) > 0
    md = Path(out["markdown"]).read_text()
    assert "profile `test`" in md and "torch" in md and "CPUs" in md
    assert md.count("\n| ") == len(rows) + 1 and "## The paper's qualitative claims at this budget" in md
    assert "![results-test-probe.png](results-test-probe.png)" in md


@pytest.mark.slow
def test_second_run_skips_finished_rows_and_logs_to_mlflow(suite, tmp_path, monkeypatch) -> None:
    import mlflow

    from mocosfl import workflow

    cfg, first, _, _, _ = suite

    def boom(*a, **k):
        raise AssertionError("a finished row was run again")

    for name in ("pretrain", "evaluate", "make_trainer"):
        monkeypatch.setattr(workflow, name, boom)
    monkeypatch.setattr(rows, "estimate", boom)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MOCOSFL_TRACKING", "1")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    log: list[str] = []
    again = R.run_suite(cfg, "main", log=log.append)
    assert again["ran"] == 0 and again["linear_probe_top1"] == first["linear_probe_top1"]
    assert sum(line.startswith("[") and "already finished" in line for line in log) == len(MAIN)

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    parent = client.get_run(again["mlflow_run_id"])
    assert parent.data.tags["stage"] == "results" and parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "results")} >= {
        "results/results-test.md",
        "results/results-test.csv",
    }
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == sorted(row.label for row in MAIN)
    for c in children:
        assert c.data.tags["cached"] == "true" and "linear_probe_top1" in c.data.metrics
        assert "sfl.sync_period" in c.data.params


@pytest.mark.slow
def test_changed_evaluation_reruns_rows_but_reuses_pretraining(suite, monkeypatch) -> None:
    from mocosfl import workflow

    _, first, _, _, overrides = suite
    cfg = load_config(PARAMS, "test", [*overrides, "evaluate.linear_epochs=1"])

    def boom(*a, **k):
        raise AssertionError("a finished pretrain run was trained again")

    monkeypatch.setattr(workflow, "make_trainer", boom)
    monkeypatch.setattr(rows, "_seconds_per_step", lambda r, ds: 0.0)
    out = R.run_suite(cfg, "main", log=lambda s: None)
    assert out["ran"] == 7  # every distinct row evaluated again (its key covers `evaluate`), none retrained
    assert out["markdown"] == first["markdown"]


def test_unknown_suite_is_one_line_error(prepared, capsys) -> None:
    from mocosfl.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse's choices, in the CLI's one-line form
        main(cli_args("results", prepared, "--suite", "nope"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "main" in err and "paper" in err
    with pytest.raises(ConfigError, match=r"unknown suite 'nope' \(known: main, full, paper\)"):
        R.run_suite(load_config(PARAMS, "test", prepared), "nope")


def test_output_names_keep_the_cpu_table_apart() -> None:
    assert R.output_stem(load_config(PARAMS, "cpu"), "main") == "results-cpu"
    assert R.output_stem(load_config(PARAMS, "smoke"), "main") == "results-smoke"
    assert R.output_stem(load_config(PARAMS, "test"), "full") == "results-test-full"
    assert R.output_stem(load_config(PARAMS, "paper"), "paper") == "results-paper"
    assert R.output_stem(load_config(PARAMS, "paper"), "main") == "results-paper-main"


@pytest.mark.slow
def test_training_code_edit_reruns_every_row(suite, monkeypatch) -> None:
    """After an edit to training code (another code hash) no cached row is reused."""
    cfg, _, _, _, _ = suite

    class Stop(Exception):
        pass

    todo: list[int] = []

    def count(rows_to_run, log):
        todo.append(len(rows_to_run))
        raise Stop

    monkeypatch.setattr(rows, "estimate", count)
    monkeypatch.setattr(identity, "code_hash", lambda: "edited-code")
    with pytest.raises(Stop):
        R.run_suite(cfg, "main", log=lambda s: None)
    assert todo == [7]  # every distinct row of the main suite


def _entry(label: str, probe: float, flops: float | None = None, mb: float | None = None) -> dict:
    return {
        "label": label,
        "linear_probe_top1": probe,
        "client_flops_per_image": flops,
        "bytes_per_client": None if mb is None else mb * 1e6,
    }


def test_claims_state_support_and_its_absence() -> None:
    entries = [
        _entry("MocoSFL", 60.0, 2e6, 10.0),
        _entry("centralized MoCo", 63.0),
        _entry("FL-MoCo", 61.0, 5e8, 30.0),
        _entry("random init", 35.0),
        _entry("MocoSFL, no feature sharing", 55.0),
        _entry("MocoSFL, sync every step", 59.0),
        _entry("MocoSFL, sync every 50", 60.0),
        _entry("MocoSFL, never sync", 61.0),
    ]
    text = "\n".join(R.claims(entries))
    assert "matches centralized MoCo at equal budget (within 2 points): **not supported** — 60.00 vs 63.00" in text
    assert "Feature sharing (one shared queue) helps on this partition: **supported**" in text
    assert "Frequent synchronization beats never syncing: **not supported**" in text
    assert "MocoSFL beats FL-MoCo at the same images seen: **not supported**" in text
    assert "random-init floor: **supported**" in text and "(250x less)" in text
    assert R.claims([_entry("MocoSFL", 60.0)]) == []
