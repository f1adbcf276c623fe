"""Training on a CUDA device (skipped without one; `make gpu-check` runs these on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PARAMS

from mocosfl import workflow
from mocosfl.config import load_config

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretrain_on_cuda_close_to_cpu(prepared: list[str], tmp_path: Path, precision: str) -> None:
    """The test profile on the GPU: it trains, reports its precision, and its first losses are those of
    the CPU run within float noise (TF32/bf16 kernels differ from the CPU's)."""
    losses: dict[str, list[float]] = {"cpu": [], "cuda": []}
    for device, steps in losses.items():
        overrides = prepared + [
            f"device={device}",
            f"pretrain.precision={precision}",
            f"pretrain.runs_dir={tmp_path / device / 'runs'}",
            f"metrics_dir={tmp_path / device}",
        ]
        cfg = load_config(PARAMS, "test", overrides)
        result = workflow.pretrain(cfg, on_step=lambda r, s=steps: s.append(r["loss"]))  # type: ignore[misc]
        assert result["precision"] == precision and np.isfinite(result["final_loss"])
    first = [abs(g - c) / abs(c) for g, c in zip(losses["cuda"][:3], losses["cpu"][:3], strict=True)]
    assert max(first) < 0.05, first
