"""`mocosfl report` over the real test-profile chain: markdown, HTML and PNG plots; a clear error without metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import PARAMS, cli_args

from mocosfl import workflow
from mocosfl.cli import main
from pipelines import tracking

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics_dir(overrides: list[str]) -> Path:
    return Path(next(o.split("=", 1)[1] for o in overrides if o.startswith("metrics_dir=")))


@pytest.mark.slow
@pytest.mark.integration
def test_report_from_real_chain(prepared: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # pretrain/evaluate here (a finished run is reused) so the metrics files describe one run.
    assert main(cli_args("pretrain", prepared)) == 0
    assert main(cli_args("evaluate", prepared)) == 0
    assert main(cli_args("evaluate", prepared + ["evaluate.encoder=random"])) == 0
    out = tmp_path / "reports"
    assert main(cli_args("report", prepared + [f"report.out_dir={out}"])) == 0

    ev = json.loads((_metrics_dir(prepared) / "eval.json").read_text())
    rnd = json.loads((_metrics_dir(prepared) / "eval_random.json").read_text())
    md = (out / "report.md").read_text()
    assert f"{ev['knn_top1']:.2f}" in md and f"{ev['linear_probe_top1']:.2f}" in md
    assert f"{ev['knn_top1'] - rnd['knn_top1']:+.2f}" in md  # gain over random init
    assert "CIFAR-10 (JPEG q75)" in md and "tracking was off" in md
    for section in ("data:", "partition:", "model:", "sfl:", "moco:", "pretrain:"):
        assert f"\n{section}\n" in md
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 3 and (out / "partition_heatmap.png") in pngs
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000
        assert f"({png.name})" in md
    page = (out / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<img src='loss.png'" in page and "http" not in page
    assert not list(out.glob(".*tmp*"))
    assert str(tmp_path.parent) not in md and "/tmp/" not in md  # paths are relative to the project

    # With tracking on, the report links the pretrain run's MLflow page.
    run_dir = json.loads((_metrics_dir(prepared) / "pretrain.json").read_text())["run_dir"]
    workflow.write_run_id(run_dir, "abc123")
    monkeypatch.setattr(tracking, "enabled", lambda cfg: True)
    monkeypatch.setattr(tracking, "run_url", lambda cfg, run_id: f"http://127.0.0.1:5000/#/experiments/1/runs/{run_id}")
    try:
        assert main(cli_args("report", prepared + [f"report.out_dir={out}"])) == 0
    finally:
        (Path(run_dir) / workflow.RUN_ID_FILE).unlink()
    linked = (out / "report.md").read_text()
    assert "(http://127.0.0.1:5000/#/experiments/1/runs/abc123)" in linked and "/tmp/" not in linked


def test_report_without_metrics_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "report",
        "--params",
        str(PARAMS),
        "--profile",
        "test",
        "--set",
        f"metrics_dir={tmp_path / 'metrics'}",
        "--set",
        f"report.out_dir={tmp_path / 'reports'}",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "partition.json not found" in err and "mocosfl partition" in err
    assert not (tmp_path / "reports").exists()
