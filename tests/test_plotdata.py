"""The DVC plot files: every row of a curve has every column, whatever the history rows carry."""

from __future__ import annotations

import csv
from pathlib import Path

from mocosfl.plotdata import write_plot_data

HISTORY = [
    {"step": 1.0, "epoch": 0.5, "loss_mean": 9.0, "lr": 0.06, "steps_per_s": 2.0},
    {"step": 2.0, "epoch": 1.0, "loss_mean": 8.0, "lr": 0.05, "knn_top1": 21.5},
    {"step": 3.0, "epoch": 1.5, "knn_top1": 25.0},  # a row without a loss (not in the loss curve)
]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_curves_are_homogeneous(tmp_path: Path) -> None:
    write_plot_data(tmp_path, HISTORY)
    loss = _read(tmp_path / "pretrain_loss.csv")
    knn = _read(tmp_path / "pretrain_knn.csv")
    assert loss == [
        {"step": "1", "epoch": "0.5", "loss_mean": "9.0", "lr": "0.06"},
        {"step": "2", "epoch": "1.0", "loss_mean": "8.0", "lr": "0.05"},
    ]
    assert [(r["step"], r["knn_top1"]) for r in knn] == [("2", "21.5"), ("3", "25.0")]
    assert not list(tmp_path.glob(".*tmp*"))


def test_empty_history_still_writes_headers(tmp_path: Path) -> None:
    write_plot_data(tmp_path, [])
    assert (tmp_path / "pretrain_knn.csv").read_text() == "step,epoch,knn_top1\n"
