"""The command line end to end on the tiny `test` profile over real CIFAR-10 (JPEG) data."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARAMS, ROOT, cli_args
from PIL import Image

from mocosfl.cli import main

pytestmark = pytest.mark.integration


def _metrics(overrides: list[str], name: str) -> dict:
    mdir = next(o.split("=", 1)[1] for o in overrides if o.startswith("metrics_dir="))
    return json.loads((Path(mdir) / name).read_text())


def test_partition_summary(prepared: list[str]) -> None:
    summary = _metrics(prepared, "partition.json")
    assert summary["num_clients"] == 20
    # 40 shards of 50 over ~200 images a class: some shards straddle two classes.
    assert summary["classes_per_client_mean"] <= 2.5
    png = Path(next(o.split("=", 1)[1] for o in prepared if o.startswith("metrics_dir="))) / "partition_heatmap.png"
    assert png.stat().st_size > 1000


def test_pretrain_evaluate_and_rerun(prepared: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(cli_args("pretrain", prepared)) == 0
    result = _metrics(prepared, "pretrain.json")
    assert result["steps"] == 8 and result["resumed_from_step"] == 0
    assert result["peak_rss_mb_this_session"] > 100 and result["client_state_mb"] == 0  # stateless
    assert np.isfinite(result["final_loss"]) and 0 <= result["knn_top1"] <= 100
    assert [r["step"] for r in result["history"] if "knn_top1" in r] == [4, 8]

    # A finished run is not trained again.
    capsys.readouterr()
    assert main(cli_args("pretrain", prepared)) == 0
    assert "already finished" in capsys.readouterr().err
    assert _metrics(prepared, "pretrain.json")["resumed_from_step"] == 8

    assert main(cli_args("evaluate", prepared)) == 0
    ev = _metrics(prepared, "eval.json")
    for key in ("knn_top1", "linear_probe_top1"):
        assert 0 <= ev[key] <= 100
    # data.train_limit 2200 = 2000 training + 200 validation images (data.val_size)
    assert ev["train_images"] == 2000 and ev["val_images"] == 200 and ev["test_images"] == 400

    assert main(cli_args("evaluate", prepared + ["evaluate.encoder=random"])) == 0
    assert "knn_top1" in _metrics(prepared, "eval_random.json")

    # The trained encoder can be taken away as one frozen module.
    import mocosfl

    enc = mocosfl.load_encoder(result["run_dir"])
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.training
    assert enc(torch.zeros(2, 3, 32, 32)).shape == (2, 64)


def test_other_config_gets_its_own_run(prepared: list[str]) -> None:
    assert main(cli_args("pretrain", prepared + ["pretrain.steps=2", "sfl.sync_period=1"])) == 0
    other = _metrics(prepared, "pretrain.json")
    assert other["steps"] == 2 and other["resumed_from_step"] == 0


def test_embed_imagefolder(prepared: list[str], tmp_path: Path) -> None:
    assert main(cli_args("pretrain", prepared)) == 0
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cats", "dogs"):
            d = tmp_path / "folder" / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(d / f"{i}.png")
    out = tmp_path / "features.npz"
    assert main(cli_args("embed", prepared, "--input", str(tmp_path / "folder"), "--output", str(out))) == 0
    z = np.load(out)
    assert z["train_features"].shape == (6, 64) and z["test_features"].shape == (4, 64)
    assert list(z["classes"]) == ["cats", "dogs"]


def test_bench_prints_json_last(prepared: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(cli_args("bench", prepared, "--clients", "10,20")) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    results = json.loads(last)["results"]
    assert [r["num_clients"] for r in results] == [10, 20]
    for r in results:
        # The test profile's plan at N < 200: every client takes part, with its fixed batch of 2.
        n = r["num_clients"]
        assert (r["clients_per_round"], r["client_batch_size"], r["batch_size"]) == (n, 2, 2 * n)
        assert r["sim_step_s"] > 0 and r["central_step_s"] > 0 and r["peak_rss_mb"] > 100
        assert r["gflop_per_step"] > 0 and r["threads"] >= 1
        assert r["precision"] == "fp32"  # the test profile pins it


def test_config_prints_resolved_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--params", str(PARAMS), "--profile", "smoke", "--set", "sfl.sync_period=7"]) == 0
    out = capsys.readouterr().out
    assert "sync_period: 7" in out and "profile: smoke" in out


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_missing_archive(base_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prepared_dir = tmp_path / "prep"
    code = main(
        cli_args(
            "prepare", base_overrides + [f"data.source={tmp_path / 'nope.tar.gz'}", f"data.prepared_dir={prepared_dir}"]
        )
    )
    assert code == 2
    assert "nope.tar.gz" in _one_error_line(capsys)
    assert not prepared_dir.exists() or not any(prepared_dir.iterdir())


def test_corrupt_archive(base_overrides: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"this is not a tar archive" * 100)[:200])
    prepared_dir = tmp_path / "prep"
    code = main(cli_args("prepare", base_overrides + [f"data.source={bad}", f"data.prepared_dir={prepared_dir}"]))
    assert code == 2
    assert "bad.tar.gz" in _one_error_line(capsys)
    assert not prepared_dir.exists() or not any(prepared_dir.iterdir())


@pytest.mark.parametrize(
    ("command", "override", "needle"),
    [
        ("partition", "partition.method=pathological", "partition.method"),
        ("partition", "partition.num_clients=5000", "5000"),
        ("pretrain", "model.cut_layers=2", "model.cut_layers"),
        ("pretrain", "sfl.clients_per_round=50", "clients_per_round"),
        ("pretrain", "no.such.key=1", "unknown config key 'no'"),
    ],
)
def test_bad_input_is_one_line(
    prepared: list[str], command: str, override: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(cli_args(command, prepared + [override])) == 2
    line = _one_error_line(capsys)
    assert needle in line and "Traceback" not in line


def test_console_script_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mocosfl.cli", "pretrain", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--profile" in out and "--set" in out


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return _one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["bench", "--clients", "a,b"], "'a,b' is not a comma-separated list of client counts"),
        (["bench", "--clients", "100,0"], "must be >= 1"),
        (["pretrain", "--device", "tpu"], "invalid choice: 'tpu'"),
        (["results", "--suite", "nope"], "invalid choice: 'nope'"),
        (["no-such-command"], "invalid choice: 'no-such-command'"),
    ],
)
def test_usage_mistakes_are_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    line = _usage_error(argv, capsys)
    assert needle in line and line.startswith("mocosfl")


def test_garbage_encoder_is_one_line(prepared: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    garbage = tmp_path / "encoder.pt"
    garbage.write_text("this is not a checkpoint\n")
    capsys.readouterr()
    code = main(
        cli_args(
            "embed", prepared, "--input", str(tmp_path), "--output", str(tmp_path / "f.npz"), "--encoder", str(garbage)
        )
    )
    assert code == 2
    line = _one_error_line(capsys)
    assert "encoder.pt is not a mocosfl encoder file" in line and "Traceback" not in line


def test_version_names_the_training_code(capsys: pytest.CaptureFixture[str]) -> None:
    from mocosfl import __version__
    from mocosfl.identity import code_hash

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mocosfl {__version__} (training code {code_hash()})"


def test_device_flag_and_profile_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--params", str(PARAMS), "--profile", "test", "--device", "cpu"]) == 0
    assert "device: cpu" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "cpu, paper, smoke, test" in " ".join(capsys.readouterr().out.split())
