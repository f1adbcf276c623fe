"""Per-image reconstruction quality: MSE, SSIM and PSNR of images in [0, 1] (the reference's definitions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

_WINDOW = 11
_SIGMA = 1.5
_C1 = 0.01**2
_C2 = 0.03**2


def _gaussian_window(channels: int, device: torch.device) -> torch.Tensor:
    x = torch.arange(_WINDOW, dtype=torch.float32, device=device) - _WINDOW // 2
    g = torch.exp(-(x**2) / (2 * _SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, _WINDOW, _WINDOW).contiguous()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SSIM of each image pair: an 11x11 Gaussian window (sigma 1.5), zero padding, C1 = 0.01^2,
    C2 = 0.03^2, the mean of the SSIM map over channels and pixels.  Shape: [B, C, H, W] x2 -> [B]."""
    c = a.shape[1]
    w = _gaussian_window(c, a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, padding=_WINDOW // 2, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a**2 + mu_b**2 + _C1) * (var_a + var_b + _C2)
    return (num / den).flatten(1).mean(dim=1)


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair.  Shape: [B, C, H, W] x2 -> [B]."""
    return ((a - b) ** 2).flatten(1).mean(dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / MSE) of each pair of images in [0, 1] (dB).  Shape: [B, C, H, W] x2 -> [B]."""
    return 10 * torch.log10(1.0 / mse(a, b).clamp_min(1e-12))


def quality(recon: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """Mean MSE, SSIM and PSNR over a set of reconstructions of ``truth``."""
    return {
        "mse": float(mse(recon, truth).mean()),
        "ssim": float(ssim(recon, truth).mean()),
        "psnr": float(psnr(recon, truth).mean()),
    }
