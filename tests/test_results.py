"""`mocosfl results` on the tiny test profile: every method end to end, the table and plots, equal budgets,
skipping finished runs (keyed by resolved config with its seed, data and training code), several seeds per
row, MLflow parent + nested runs; plus the rendering helpers (mean ± std, CSV, coverage columns, header) and
the claims rule. The suites and row rules themselves: tests/test_experiments.py."""

from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path

import pytest
from conftest import PARAMS, cli_args

from mocosfl import identity
from mocosfl.bench import cpu_line
from mocosfl.config import ConfigError, load_config
from mocosfl.experiments import rows
from mocosfl.experiments.suites import MAIN, SUITES, Row
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
    assert any(line.startswith("estimated time for 10 runs") for line in log)
    rows = _rows(out["csv"])
    assert [r["label"] for r in rows] == [row.label for row in MAIN]  # the test profile: one seed per row
    assert {(r["seed"], r["seeds"], r["linear_probe_top1_std"]) for r in rows} == {("0", "1", "")}
    assert {r["method"] for r in rows} == {"mocosfl", "central", "flmoco", "random"}
    by = {r["label"]: r for r in rows}
    trained = [r for r in rows if r["method"] != "random"]
    # Same budget: every trained method saw steps x B images (test profile: 8 x 20 clients x b=2).
    assert {(r["steps"], r["images_seen"]) for r in trained} == {("8", str(8 * 40))}
    assert by["random init"]["images_seen"] == "0"
    # Coverage: 20 clients x b=2 over 8 steps reach some of the clients and at most 320 images; random init none.
    assert 0 < int(by["MocoSFL"]["distinct_clients"]) <= 20
    assert 0 < int(by["MocoSFL"]["distinct_images"]) <= 8 * 40
    assert by["random init"]["distinct_clients"] == by["random init"]["distinct_images"] == ""
    fl = by["FL-MoCo"]
    assert (fl["clients_per_round"], fl["client_batch_size"]) == ("10", "4")
    for r in rows:
        assert 0 <= float(r["linear_probe_top1"]) <= 100 and 0 <= float(r["knn_top1"]) <= 100
    # Sync periods at or beyond the 8 steps mean only the final FedAvg, as "never": one run, reused.
    never = {by[f"MocoSFL, {x}"]["key"] for x in ("sync every 10", "sync every 50", "never sync")}
    assert len(never) == 1 and by["MocoSFL, never sync"]["sync_period"] == ""
    assert by["MocoSFL, sync every step"]["sync_period"] == "1"
    # Cost columns: central has no clients; cut 1 at width 8 on 32 px is 3 x 2 x 27 x 8 x 32 x 32 FLOPs/image.
    assert by["centralized MoCo"]["bytes_per_client"] == "" and by["centralized MoCo"]["client_params"] == ""
    assert float(by["MocoSFL"]["client_flops_per_image"]) == 3 * 2 * 27 * 8 * 32 * 32
    assert float(fl["client_flops_per_image"]) > 50 * float(by["MocoSFL"]["client_flops_per_image"])
    assert float(fl["bytes_per_client"]) > float(by["MocoSFL"]["bytes_per_client"]) > 0
    md = Path(out["markdown"]).read_text()
    assert (
        "profile `test`" in md
        and "torch" in md
        and f"- Runs measured on: {cpu_line()}, fp32: 9 run(s); {cpu_line()}: 1 run(s)." in md
    )  # random init: no precision
    assert f"training-code hash {identity.code_hash()}" in md and "| distinct clients | distinct images | seeds |" in md
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
    assert out["ran"] == 10  # every distinct row evaluated again (its key covers `evaluate`), none retrained
    assert out["markdown"] == first["markdown"]


def test_unknown_suite_is_one_line_error(prepared, capsys) -> None:
    from mocosfl.cli import main

    with pytest.raises(SystemExit) as exit_:  # argparse's choices, in the CLI's one-line form
        main(cli_args("results", prepared, "--suite", "nope"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nope'" in err and "main" in err and "paper" in err
    with pytest.raises(ConfigError, match=r"unknown suite 'nope' \(known: main, full, long, paper, privacy, check\)"):
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
    assert todo == [10]  # every distinct row of the main suite


@pytest.mark.slow
def test_rows_run_per_seed_and_cache_each_seed(suite, monkeypatch) -> None:
    """Two seeds per row: seed 0 is the main suite's cached run, seed 1 a run of its own, then cached too."""
    cfg, _, _, _, _ = suite
    two = [Row("MocoSFL", "mocosfl", "method", curve=True), Row("random init", "random", "method")]
    monkeypatch.setitem(SUITES, "two", two)

    def no_estimate(*a, **k):
        raise AssertionError("estimate=False (--no-estimate) still timed steps")

    monkeypatch.setattr(rows, "estimate", no_estimate)
    out = R.run_suite(cfg, "two", log=lambda s: None, seeds=2, estimate=False)
    assert (out["ran"], out["rows"], out["runs"]) == (2, 2, 4)
    lines = _rows(out["csv"])
    assert [(r["label"], r["seed"], r["seeds"]) for r in lines] == [
        (label, seed, "2") for label in ("MocoSFL", "random init") for seed in ("0", "1")
    ]
    assert len({r["key"] for r in lines}) == 4
    moco = [r for r in lines if r["label"] == "MocoSFL"]
    a, b = (float(r["linear_probe_top1"]) for r in moco)
    assert float(moco[1]["linear_probe_top1_mean"]) == pytest.approx((a + b) / 2)
    assert float(moco[1]["linear_probe_top1_std"]) == pytest.approx(abs(a - b) / 2**0.5)  # ddof=1
    md = Path(out["markdown"]).read_text()
    assert f"| {(a + b) / 2:.2f} ± {abs(a - b) / 2**0.5:.2f} |" in md
    assert R.run_suite(cfg, "two", log=lambda s: None, seeds=2)["ran"] == 0

    # The run records beside the table restore a lost results cache (another machine or session):
    # nothing runs again and the table is the same; a record of other training code is dropped.
    records = R.records_path(cfg, "two")
    saved = json.loads(records.read_text())
    assert sorted(saved) == sorted(r["key"] for r in lines)
    assert {v["machine"] for v in saved.values()} == {cpu_line()}  # each run records the CPU it ran on
    saved["from-old-code"] = {**saved[lines[0]["key"]], "key": "from-old-code", "code_hash": "0" * 12}
    records.write_text(json.dumps(saved))
    for r in lines:  # seed 0 is also the main suite's run: the restore below puts it back for the other tests
        (rows.results_dir(cfg) / f"{r['key']}.json").unlink()
    log: list[str] = []
    again = R.run_suite(cfg, "two", log=log.append, seeds=2)
    assert again["ran"] == 0
    assert any(line.startswith("4 finished run(s) restored from") for line in log)
    assert _rows(again["csv"]) == lines
    assert sorted(json.loads(records.read_text())) == sorted(r["key"] for r in lines)
    saved = records.read_text()
    records.write_text("{not json")
    with pytest.raises(ConfigError, match="not a readable run-record file"):
        R.run_suite(cfg, "two", log=lambda s: None, seeds=2)
    records.write_text(saved)
    with pytest.raises(ConfigError, match="--seeds 0 is invalid"):
        R.run_suite(cfg, "two", seeds=0)


def test_run_records_are_read_by_key_and_checked(tmp_path) -> None:
    """Only a record filed under its own key is restored, never over a cached run; a malformed file is an error."""
    records, cache = tmp_path / "t.runs.json", tmp_path / "cache"
    code = identity.code_hash()
    good, moved = {"key": "aaa", "code_hash": code, "x": 1}, {"key": "zzz", "code_hash": code, "x": 2}
    records.write_text(json.dumps({"aaa": good, "bbb": moved}))
    assert R.restore_records(records, cache, {"aaa", "bbb", "ccc"}) == 1
    assert json.loads((cache / "aaa.json").read_text()) == good and not (cache / "bbb.json").exists()
    assert R.restore_records(records, cache, {"aaa"}) == 0  # already cached: the cache is not overwritten
    # While a suite runs, other records of this code are kept and those of other code dropped; the final
    # write keeps exactly the suite's runs.
    records.write_text(json.dumps({"aaa": good, "old": {"key": "old", "code_hash": "0" * 12}, "bbb": moved}))
    R.save_records(records, cache, {"aaa"})
    assert sorted(json.loads(records.read_text())) == ["aaa", "bbb"]
    R.save_records(records, cache, {"aaa"}, final=True)
    assert sorted(json.loads(records.read_text())) == ["aaa"]
    for bad in ("[1, 2]", '{"aaa": "not an entry"}', "null"):
        records.write_text(bad)
        with pytest.raises(ConfigError, match="is not a run-record file"):
            R.restore_records(records, cache, {"aaa"})
        with pytest.raises(ConfigError, match="is not a run-record file"):
            R.save_records(records, cache, {"aaa"})
        assert records.read_text() == bad  # nothing overwritten


def _run(label: str, probe: float, seed: int = 0, **extra: object) -> dict:
    """One (row, seed) entry as ``rows.run_row`` returns it, with made-up numbers."""
    return {
        "label": label,
        "group": "method",
        "method": "random" if "random" in label else "mocosfl",
        "seed": seed,
        "key": f"{label}-{seed}",
        "num_clients": 1000,
        "partition": "noniid-shards",
        "cut_layers": 1,
        "sync_period": 50,
        "never_sync": False,
        "clients_per_round": 100,
        "client_batch_size": 1,
        "batch_size": 100,
        "queue": "6000 shared",
        "width": 16,
        "steps": 500,
        "images_seen": 50_000,
        "knn_top1": probe - 4,
        "linear_probe_top1": probe,
        "linear_probe_top1_final_epoch": probe,
        "client_params": 464,
        "bytes_per_client": 1e6,
        "client_flops_per_image": 2e6,
        "train_seconds": 60.0,
        "eval_seconds": 30.0,
        "wall_seconds": 90.0,
        "knn_history": [{"step": 250, "knn_top1": probe - 10}, {"step": 500, "knn_top1": probe - 4}],
        **extra,
    }


def _runs() -> list[dict]:
    """MocoSFL at three seeds (new results, with coverage counts), random init at one (an old cached result)."""
    moco = [_run("MocoSFL", p, s, distinct_clients=640 + s, distinct_images=32_000) for s, p in enumerate((59, 60, 61))]
    return moco + [_run("random init", 20.0)]


def test_mean_std_formatting() -> None:
    assert R.mean_std([59.0, 60.0, 61.0]) == (60.0, 1.0)  # sample std (ddof=1)
    assert R.mean_std([42.0]) == (42.0, None)
    assert R.pm(37.734, 0.4149) == "37.73 ± 0.41"
    assert R.pm(37.7, None) == "37.70" and R.pm(None, None) == "—"


def test_table_shows_mean_std_seeds_and_coverage() -> None:
    moco, rnd = R.aggregate(_runs())
    assert (moco["seeds"], moco["linear_probe_top1"], moco["linear_probe_top1_std"]) == (3, 60.0, 1.0)
    assert (rnd["seeds"], rnd["linear_probe_top1_std"]) == (1, None)
    cells = dict(zip(R.COLUMNS, R.table_cells(moco), strict=True))
    assert (
        cells["seeds"] == "3" and cells["linear-probe top-1"] == "60.00 ± 1.00" and cells["kNN top-1"] == "56.00 ± 1.00"
    )
    assert (cells["distinct clients"], cells["distinct images"]) == ("641", "32,000")  # means over seeds
    cells = dict(zip(R.COLUMNS, R.table_cells(rnd), strict=True))
    assert cells["seeds"] == "1 seed" and cells["linear-probe top-1"] == "20.00"
    assert cells["distinct clients"] == cells["distinct images"] == "—"  # a result from before the counts


def test_csv_has_a_line_per_seed_and_the_rows_aggregate() -> None:
    import pandas as pd

    df = pd.read_csv(io.StringIO(R.csv_text(_runs())))
    assert list(zip(df["label"], df["seed"], strict=True)) == [("MocoSFL", s) for s in range(3)] + [("random init", 0)]
    table = df.drop_duplicates("label").set_index("label")
    assert table.loc["MocoSFL", "linear_probe_top1_mean"] == 60.0 and table.loc["MocoSFL", "seeds"] == 3
    assert table.loc["MocoSFL", "linear_probe_top1_std"] == 1.0 and pd.isna(table.loc["random init", "knn_top1_std"])
    assert pd.isna(table.loc["random init", "distinct_images"]) and df["distinct_clients"].iloc[2] == 642


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_header_names_commit_code_hash_dirty_training_code_and_wall_time(tmp_path, tmp_path_factory) -> None:
    (tmp_path / "mocosfl").mkdir()
    (tmp_path / "mocosfl" / "a.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("notes\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "first")
    sha = _git(tmp_path, "rev-parse", "HEAD")
    clean = R.code_line(tmp_path)
    assert clean.startswith(f"git {sha[:10]}; training-code hash {identity.code_hash()}") and "dirty" not in clean
    (tmp_path / "README.md").write_text("edited\n")  # outside mocosfl/: the training code is as committed
    assert "dirty" not in R.code_line(tmp_path)
    (tmp_path / "mocosfl" / "b.py").write_text("y = 2\n")  # a new module is training code too
    assert f"git {sha[:10]} **dirty** (uncommitted changes under mocosfl/)" in R.code_line(tmp_path)
    assert R.training_code_dirty(tmp_path_factory.mktemp("not-git")) is None

    md = R.markdown(load_config(PARAMS, "test"), "main", _runs(), "results-test", 150.0, [])
    assert f"- Code: {R.code_line()}." in md and "one run per row" not in md
    assert "Wall time: 6.0 min, the sum of the 4 distinct runs' measured training + evaluation times" in md
    assert "this invocation took 2.5 min" in md and "mean ± sample std (ddof=1)" in md
    assert "| MocoSFL | 1000 | 100 x 1 | noniid-shards | 1 | 50 | 6000 shared | 500 | 50,000 | 641 | 32,000 | 3 |" in md


def _row(label: str, probe: float, std: float | None, flops: float | None = None, mb: float | None = None) -> dict:
    """An aggregated table row: mean and std (None for one seed) of the linear probe."""
    return {
        "label": label,
        "linear_probe_top1": probe,
        "linear_probe_top1_std": std,
        "client_flops_per_image": flops,
        "bytes_per_client": None if mb is None else mb * 1e6,
    }


def test_verdict_needs_a_difference_beyond_both_stds() -> None:
    assert R.verdict(60.0, 0.5, 58.0, 0.5) == R.SUPPORTED  # +2 > 1
    assert R.verdict(60.0, 1.5, 58.0, 1.0) == R.NOT_RESOLVED  # +2 < 2.5
    assert R.verdict(56.0, 0.5, 58.0, 0.5) == R.NOT_SUPPORTED  # -2, beyond 1 the wrong way
    assert R.verdict(58.0, 0.0, 58.0, 0.0) == R.NOT_RESOLVED  # no difference is no evidence
    assert R.verdict(70.0, None, 50.0, 0.5) == R.verdict(70.0, 0.5, 50.0, None) == R.ONE_SEED
    # "Within 2 points": a - b + 2 against the noise.
    assert R.verdict(60.0, 0.2, 61.5, 0.2, margin=2.0) == R.SUPPORTED
    assert R.verdict(60.0, 0.2, 63.0, 0.2, margin=2.0) == R.NOT_SUPPORTED
    assert R.verdict(60.0, 0.5, 62.5, 0.5, margin=2.0) == R.NOT_RESOLVED


def test_claims_state_support_its_absence_and_unresolved() -> None:
    entries = [
        _row("MocoSFL", 60.0, 0.5, 2e6, 10.0),
        _row("centralized MoCo", 63.0, 0.4),
        _row("FL-MoCo", 45.0, 1.0, 5e8, 30.0),
        _row("random init", 59.5, 0.5),
        _row("MocoSFL, no feature sharing", 55.0, 0.5),
        _row("MocoSFL, sync every step", 59.0, None),
        _row("MocoSFL, sync every 10", 60.0, None),
        _row("MocoSFL, never sync", 61.0, None),
        _row("FL-MoCo, MocoSFL's clients and batch", 40.0, None),
    ]
    text = "\n".join(R.claims(entries))
    assert (
        "matches centralized MoCo at equal budget (within 2 points): **not supported** — MocoSFL 60.00 ± 0.50 "
        "vs centralized MoCo 63.00 ± 0.40 (Δ -3.00, std sum 0.90)." in text
    )
    assert "Feature sharing (one shared queue) helps on this partition: **supported**" in text
    assert (
        "beats never: **not resolved (one seed)** — MocoSFL, sync every 10 60.00 vs MocoSFL, never sync 61.00" in text
    )
    assert "MocoSFL beats FL-MoCo at the same images seen: **supported**" in text
    assert "each client a batch of 1 on its own): **not resolved (one seed)** — MocoSFL 60.00 ± 0.50 vs" in text
    assert "random-init floor: **not resolved at this budget**" in text and "(250x less)" in text
    assert R.claims([_row("MocoSFL", 60.0, 0.5)]) == []
