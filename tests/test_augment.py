"""Tests for mocosfl.data.augment: shapes, determinism, per-op semantics vs torchvision, statistics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import RandomResizedCrop

from mocosfl.data import augment as A
from mocosfl.data.augment import MocoV2Augment, blur_kernel_size, normalize_only

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)  # [B, H, W, 3]


def _only(jitter_p: float = 0.0, grayscale_p: float = 0.0, blur_p: float = 0.0, flip_p: float = 0.0) -> MocoV2Augment:
    """Full-image crop (scale = ratio = 1) and only the named ops switched on."""
    return MocoV2Augment(
        32,
        MEAN,
        STD,
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        jitter_p=jitter_p,
        grayscale_p=grayscale_p,
        blur_p=blur_p,
        flip_p=flip_p,
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W]


def test_shape_dtype_device() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    out = aug(_images(16), _gen(0))
    assert out.shape == (16, 3, 32, 32)
    assert out.dtype == torch.float32
    assert out.device.type == "cpu"
    assert out.is_contiguous()
    assert torch.isfinite(out).all()
    # Different input and output sizes.
    assert MocoV2Augment(24, MEAN, STD)(_images(4, size=40), _gen(0)).shape == (4, 3, 24, 24)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_device_matches_cpu() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    x = _images(32)
    out = aug(x.cuda(), _gen(3))
    assert out.device.type == "cuda" and out.shape == (32, 3, 32, 32)
    torch.testing.assert_close(out.cpu(), aug(x, _gen(3)), atol=1e-3, rtol=0)


def test_determinism() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    x = _images(32)
    a = aug(x, _gen(123))
    b = aug(x, _gen(123))
    c = aug(x, _gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # The generator advances: consecutive calls differ, and the sequence is reproducible.
    g1, g2 = _gen(5), _gen(5)
    seq1 = [aug(x, g1) for _ in range(2)]
    seq2 = [aug(x, g2) for _ in range(2)]
    assert not torch.allclose(seq1[0], seq1[1])
    assert all(torch.equal(p, q) for p, q in zip(seq1, seq2, strict=True))


def test_two_views_differ_and_are_reproducible() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    x = _images(16)
    q1, k1 = aug.two_views(x, _gen(7))
    q2, k2 = aug.two_views(x, _gen(7))
    assert q1.shape == k1.shape == (16, 3, 32, 32)
    assert not torch.allclose(q1, k1)
    # Per sample, too: every pair of views differs.
    assert ((q1 - k1).flatten(1).abs().amax(dim=1) > 1e-3).all()
    assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_everything_off_equals_normalize_only() -> None:
    aug = _only()
    x = _images(16)
    out = aug(x, _gen(0))
    ref = (_as_float(x) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out, normalize_only(x, MEAN, STD, 32), atol=1e-5, rtol=0)


def test_normalize_only_resizes() -> None:
    x = _images(4, size=64)
    out = normalize_only(x, MEAN, STD, 32)
    assert out.shape == (4, 3, 32, 32)
    ref = F.interpolate(_as_float(x), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(_unnormalize(out), ref, atol=1e-5, rtol=0)


def test_grayscale_always() -> None:
    aug = MocoV2Augment(32, MEAN, STD, grayscale_p=1.0)
    raw = _unnormalize(aug(_images(16), _gen(1)))
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, 0], raw[:, 2], atol=1e-5, rtol=0)


def test_flip_only_equals_torch_flip() -> None:
    aug = _only(flip_p=1.0)
    x = _images(8)
    ref = torch.flip(normalize_only(x, MEAN, STD, 32), dims=[-1])
    torch.testing.assert_close(aug(x, _gen(0)), ref, atol=1e-5, rtol=0)


def test_jittered_values_stay_in_unit_range() -> None:
    aug = _only(jitter_p=1.0)
    raw = _unnormalize(aug(_images(32), _gen(2)))
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5


def test_color_jitter_matches_torchvision() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    n = 32
    p = aug.sample_params(n, 32, 32, _gen(11))
    x = _as_float(_images(n))
    out = A._color_jitter(x, p)  # [B, 3, 32, 32]
    for b in range(n):
        t = TF.adjust_brightness(x[b], p.brightness[b].item())
        t = TF.adjust_contrast(t, p.contrast[b].item())
        t = TF.adjust_saturation(t, p.saturation[b].item())
        t = TF.adjust_hue(t, p.hue[b].item())
        torch.testing.assert_close(out[b], t, atol=5e-4, rtol=0)


@pytest.mark.parametrize("ksize", [3, 23])
def test_gaussian_blur_matches_torchvision(ksize: int) -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    n = 16
    p = aug.sample_params(n, 32, 32, _gen(12))
    x = _as_float(_images(n))
    out = A._gaussian_blur(x, p.sigma, ksize)
    for b in range(n):
        sigma = p.sigma[b].item()
        ref = TF.gaussian_blur(x[b], kernel_size=[ksize, ksize], sigma=[sigma, sigma])
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


def test_blur_kernel_size() -> None:
    assert blur_kernel_size(32) == 3
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(8) == 3
    assert all(blur_kernel_size(s) % 2 == 1 for s in range(1, 300))


def test_crop_matches_torchvision_resized_crop() -> None:
    # Geometry only: grid_sample vs torchvision crop + resize differ only at crop borders (bilinear taps).
    aug = MocoV2Augment(32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    n = 32
    x = _images(n)
    p = aug.sample_params(n, 32, 32, _gen(13))
    out = aug.apply(x, p)
    xf = _as_float(x)
    for b in range(n):
        ref = TF.resized_crop(xf[b], *p.crop[b].tolist(), size=[32, 32], antialias=True)
        if p.flip[b]:
            ref = torch.flip(ref, dims=[-1])
        assert (out[b] - ref).abs().mean() < 0.02


def test_crop_param_statistics() -> None:
    n = 4000
    aug = MocoV2Augment(32, MEAN, STD)
    crop = aug.sample_params(n, 32, 32, _gen(21)).crop  # [n, 4]
    i, j, h, w = crop.unbind(dim=1)
    assert (i >= 0).all() and (j >= 0).all() and (i + h <= 32).all() and (j + w <= 32).all()
    assert (h >= 1).all() and (w >= 1).all()
    frac = (h * w).double() / (32 * 32)
    # Rounding to whole pixels moves areas/ratios slightly out of the nominal ranges.
    assert frac.min() >= 0.17 and frac.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.65 and aspect.max() <= 1.5
    # Nominal mean 0.6, lowered a little by rejected over-wide/tall crops; compare with torchvision itself.
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = [RandomResizedCrop.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    ref_frac = sum(rh * rw for _, _, rh, rw in ref) / (2000 * 32 * 32)
    assert 0.5 < frac.mean().item() < 0.65
    assert abs(frac.mean().item() - ref_frac) < 0.03
    # Positions are uniform over the valid range: mean centre near the image centre.
    assert abs((j + w / 2).double().mean().item() - 16) < 0.5
    assert abs((i + h / 2).double().mean().item() - 16) < 0.5


def test_crop_fallback_is_center_crop() -> None:
    # No aspect ratio in [4, 5] fits a square 8x8 image at area >= 90%: every try fails -> centre crop.
    aug = MocoV2Augment(8, MEAN, STD, scale=(0.9, 1.0), ratio=(4.0, 5.0))
    crop = aug.sample_params(64, 8, 8, _gen(0)).crop
    assert (crop == torch.tensor([3, 0, 2, 8])).all()


def test_param_frequencies() -> None:
    n = 4000
    p = MocoV2Augment(32, MEAN, STD).sample_params(n, 32, 32, _gen(31))
    for mask, prob in ((p.jitter, 0.8), (p.gray, 0.2), (p.blur, 0.5), (p.flip, 0.5)):
        assert abs(mask.float().mean().item() - prob) < 0.035  # > 4 binomial standard deviations
    assert 0.1 <= p.sigma.min().item() and p.sigma.max().item() <= 2.0
    assert abs(p.sigma.mean().item() - 1.05) < 0.05
    assert p.hue.abs().max().item() <= 0.1 and abs(p.hue.mean().item()) < 0.01
    for f in (p.brightness, p.contrast, p.saturation):
        assert 0.6 <= f.min().item() and f.max().item() <= 1.4


def test_grayscale_frequency_in_output() -> None:
    n = 2000
    aug = _only(grayscale_p=0.2)
    raw = _unnormalize(aug(_images(n, size=32, seed=4), _gen(41)))
    is_gray = ((raw[:, 0] - raw[:, 1]).abs().amax(dim=(1, 2)) < 1e-5) & (
        (raw[:, 0] - raw[:, 2]).abs().amax(dim=(1, 2)) < 1e-5
    )
    assert abs(is_gray.float().mean().item() - 0.2) < 0.04


def test_flip_frequency_in_output() -> None:
    n = 2000
    x = _images(n, seed=5)
    aug = _only(flip_p=0.5)
    out = aug(x, _gen(51))
    flipped = torch.flip(normalize_only(x, MEAN, STD, 32), dims=[-1])
    is_flipped = (out - flipped).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert abs(is_flipped.float().mean().item() - 0.5) < 0.05


def test_blur_frequency_in_output() -> None:
    n = 2000
    x = _images(n, seed=6)
    aug = _only(blur_p=0.5)
    out = aug(x, _gen(61))
    changed = (out - normalize_only(x, MEAN, STD, 32)).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert abs(changed.float().mean().item() - 0.5) < 0.05


def test_jitter_frequency_in_output() -> None:
    n = 2000
    x = _images(n, seed=7)
    aug = _only(jitter_p=0.8)
    p = aug.sample_params(n, 32, 32, _gen(71))
    out = aug.apply(x, p)
    changed = (out - normalize_only(x, MEAN, STD, 32)).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert torch.equal(changed, p.jitter)
    assert abs(changed.float().mean().item() - 0.8) < 0.04
    # Unapplied samples are passed through untouched.
    keep = ~p.jitter
    torch.testing.assert_close(out[keep], normalize_only(x[keep], MEAN, STD, 32), atol=1e-5, rtol=0)


def test_params_replace_roundtrip() -> None:
    # apply() is a pure function of (images, params): it leaves both untouched, a copy of the params
    # reproduces the output exactly, and __call__ is sample_params + apply.
    aug = MocoV2Augment(32, MEAN, STD)
    x = _images(8)
    x_before = x.clone()
    p = aug.sample_params(8, 32, 32, _gen(9))
    copy = dataclasses.replace(p, **{f.name: getattr(p, f.name).clone() for f in dataclasses.fields(p)})
    out = aug.apply(x, p)
    assert torch.equal(x, x_before)
    assert all(torch.equal(getattr(p, f.name), getattr(copy, f.name)) for f in dataclasses.fields(p))
    assert torch.equal(out, aug.apply(x, copy))
    assert torch.equal(out, aug(x, _gen(9)))
