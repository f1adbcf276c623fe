"""Training curves as plot files with one set of columns per file, for `dvc plots` (declared in dvc.yaml).

The history in pretrain.json mixes row shapes (only kNN steps carry ``knn_top1``), which DVC's plot
converter rejects; these CSVs split it into curves whose every row has every column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mocosfl.io import write_text

# file name in the metrics folder -> its columns; a history row goes into every file whose columns it has
CURVES = {
    "pretrain_loss.csv": ("step", "epoch", "loss_mean", "lr"),
    "pretrain_knn.csv": ("step", "epoch", "knn_top1"),
}


def curve_rows(history: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, float]]:
    """The history rows that carry all of ``columns``, cut down to them (``step`` as an integer)."""
    rows = []
    for row in history:
        if all(row.get(c) is not None for c in columns):
            rows.append({c: int(row[c]) if c == "step" else float(row[c]) for c in columns})
    return rows


def write_plot_data(metrics_dir: str | Path, history: Sequence[dict[str, Any]]) -> None:
    """Write ``CURVES`` from a pretrain history into ``metrics_dir`` (atomically, header even when empty)."""
    for name, columns in CURVES.items():
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(curve_rows(history, columns))
        write_text(Path(metrics_dir) / name, buf.getvalue())
