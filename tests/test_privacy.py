"""The model-inversion attack (mocosfl.privacy): decoder, metrics, and `mocosfl attack` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_args

from mocosfl.cli import main
from mocosfl.privacy.attack import Pairs, mean_image_floor, split_aux
from mocosfl.privacy.decoder import InversionDecoder
from mocosfl.privacy.metrics import mse, psnr, ssim


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_decoder_is_the_references_res_norm_n4_c64() -> None:
    """PRIVACY.md's counts: 520,931 parameters for 64x32x32 smashed data (8 residual blocks), 449,579 with
    the C4S2 bottleneck's 4x16x16 (7 blocks and one transposed convolution)."""
    assert _params(InversionDecoder(64, 32, 32)) == 520_931
    assert _params(InversionDecoder(4, 16, 32)) == 449_579
    out = InversionDecoder(4, 8, 32, width=8, blocks=1).eval()(torch.randn(2, 4, 8, 8))
    assert out.shape == (2, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="cannot be decoded"):
        InversionDecoder(4, 12, 32)


def test_metrics_of_known_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen)
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5) and torch.equal(mse(x, x), torch.zeros(3))
    noise = torch.randn(x.shape, generator=gen)
    less, more, gray = (x + 0.1 * noise).clamp(0, 1), (x + 0.3 * noise).clamp(0, 1), torch.full_like(x, 0.5)
    assert (ssim(less, x) < 1).all() and (ssim(less, x) > ssim(more, x)).all() and (ssim(more, x) > ssim(gray, x)).all()
    assert torch.allclose(psnr(x * 0 + 0.5, x * 0 + 0.6), torch.full((3,), 20.0), atol=1e-3)  # MSE 0.01: 20 dB


def test_aux_split_and_mean_image_floor() -> None:
    train, val = split_aux(100, 0.1, seed=0)
    assert len(val) == 10 and not np.intersect1d(train, val).size and len(train) + len(val) == 100
    assert np.array_equal(split_aux(100, 0.1, seed=0)[1], val)
    with pytest.raises(ValueError, match="fewer than 2"):
        split_aux(3, 0.5, seed=0)
    x = torch.rand(8, 3, 4, 4)
    floor = mean_image_floor(Pairs(torch.zeros(8, 1), x), Pairs(torch.zeros(2, 1), x[:2]))
    assert floor["mse"] == pytest.approx(float(((x.mean(0) - x[:2]) ** 2).mean()))


@pytest.mark.integration
def test_attack_stage_writes_metrics_and_grid(prepared: list[str]) -> None:
    """`mocosfl attack` on the test profile's trained run: attack.json in the documented shape, the grid."""
    assert main(cli_args("pretrain", prepared)) == 0
    assert main(cli_args("attack", prepared)) == 0
    metrics = Path(next(o.split("=", 1)[1] for o in prepared if o.startswith("metrics_dir=")))
    result = json.loads((metrics / "attack.json").read_text())
    for m in ("ssim", "psnr", "mse"):
        assert set(result[m]) == {"mean", "std"} and np.isfinite(result[m]["mean"])
        for floor in ("mean_image", "random_init"):
            assert np.isfinite(result["floors"][floor][m])
    assert len(result["per_seed"]) == 3 and result["victims"] == 16 and result["aux_images"] == 100
    assert result["smashed_shape"] == [8, 32, 32] and result["bytes_per_image"] == 8 * 32 * 32 * 4
    assert 0 < result["ssim"]["mean"] <= 1 and result["mse"]["mean"] > 0
    assert (metrics / "attack_grid.png").stat().st_size > 1000


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("attack.aux_fraction=0", "attack.aux_fraction=0.0 is invalid: must be in (0, 1]"),
        ("attack.aux_fraction=1.5", "attack.aux_fraction=1.5 is invalid"),
        ("attack.decoder=unet", "attack.decoder='unet' is invalid: allowed 'res_normN4C64'"),
        ("seed=12345", "no finished pretrain run for this config"),
    ],
)
def test_bad_attack_input_is_one_line(
    prepared: list[str], override: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(cli_args("attack", prepared + [override])) == 2
    line = _one_error(capsys)
    assert needle in line, line
