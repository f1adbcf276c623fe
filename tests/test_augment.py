"""Tests for mocosfl.data.augment: shapes, determinism, per-op semantics vs torchvision, statistics."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from conftest import ARCHIVE
from PIL import Image, ImageFilter
from torchvision.transforms import RandomResizedCrop

from mocosfl.data import augment as A
from mocosfl.data.augment import MocoV2Augment, blur_kernel_size, box_radius, normalize_only

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


# PIL rounds to uint8 after each of its 6 box passes (3 per axis); box averaging never amplifies an
# earlier rounding error, so our float blur is within 6 * 0.5 / 255 of PIL's output (+ slack for PIL's
# float32 radius and 24-bit fixed-point weights).
PIL_BLUR_TOL = (6 * 0.5 + 0.1) / 255


def _cifar_images(n: int) -> np.ndarray:
    """The archive's first n images, uint8 [n, 32, 32, 3] (decoded the way prepare decodes them)."""
    if not ARCHIVE.exists():
        pytest.skip(f"CIFAR-10 archive not found at {ARCHIVE}")
    out = []
    with tarfile.open(ARCHIVE, "r:gz") as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                data = tar.extractfile(member)
                assert data is not None
                out.append(np.asarray(Image.open(io.BytesIO(data.read())).convert("RGB")))
                if len(out) == n:
                    break
    return np.stack(out)


def _pil_blur(images: np.ndarray, sigma: float) -> torch.Tensor:
    """The reference's blur: PIL GaussianBlur(radius=sigma) per image -> float [B, 3, H, W] in [0, 1]."""
    out = [np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=sigma))) for im in images]
    return _as_float(torch.from_numpy(np.stack(out)))


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.5, 2.0])
@pytest.mark.parametrize("kind", ["cifar", "noise"])
def test_gaussian_blur_matches_pil(kind: str, sigma: float) -> None:
    images = _cifar_images(48) if kind == "cifar" else _images(16, seed=3).numpy()
    x = _as_float(torch.from_numpy(images))
    ref = _pil_blur(images, sigma)
    out = A._gaussian_blur(x, torch.full((len(x),), sigma), blur_kernel_size(2.0))
    err = (out - ref).abs()
    assert err.max().item() <= PIL_BLUR_TOL, f"max |ours - PIL| = {255 * err.max().item():.2f}/255"
    assert err.mean().item() < 1.25 / 255  # rounding noise (at sigma 0.1 PIL rounds the whole blur away)
    if sigma == 2.0:
        # The test can fail: the old 3-tap sampled Gaussian, and even a wide one with reflect padding
        # (torchvision's), are far from PIL at sigma = 2 (the first in the interior, the second at the edges).
        for ksize in (3, 13):
            gauss = TF.gaussian_blur(x, kernel_size=[ksize, ksize], sigma=[sigma, sigma])
            assert (gauss - ref).abs().max().item() > 3 * PIL_BLUR_TOL


def test_per_sample_sigmas_blur_each_image_with_its_own() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    p = aug.sample_params(12, 32, 32, _gen(12))
    images = _images(12).numpy()
    out = A._gaussian_blur(_as_float(torch.from_numpy(images)), p.sigma, aug.blur_ksize)
    for b in range(12):
        ref = _pil_blur(images[b : b + 1], p.sigma[b].item())
        assert (out[b : b + 1] - ref).abs().max().item() <= PIL_BLUR_TOL


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 1.41, 1.42, 2.0, 3.0, 5.0])
def test_box_passes_add_up_to_the_gaussian_variance(sigma: float) -> None:
    # Each extended box pass has variance sigma^2 / 3, so the three passes have sigma^2 (Gwosdek et al.).
    k = blur_kernel_size(sigma)
    w = A._box_kernels(torch.tensor([sigma], dtype=torch.float64), k)[0].numpy()
    d = np.arange(k) - k // 2
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    assert (w * d**2).sum() == pytest.approx(sigma**2 / 3, rel=1e-9)
    assert w[0] > 0 and (w >= 0).all() and np.allclose(w, w[::-1])  # no wasted taps, symmetric
    whole, frac = box_radius(torch.tensor([sigma], dtype=torch.float64))
    assert 0 <= frac.item() < 1 and 2 * whole.item() + 3 == k


def test_blur_kernel_size() -> None:
    # Taps of one of the 3 box passes: sigma = 2 needs a 5-tap box, so the blur reaches 3 * 2 = 6 px = 3 sigma.
    assert blur_kernel_size(2.0) == 5
    assert blur_kernel_size(1.0) == 3
    assert blur_kernel_size(0.1) == 3
    assert blur_kernel_size(3.0) == 7
    assert MocoV2Augment(32, MEAN, STD).blur_ksize == 5
    assert MocoV2Augment(224, MEAN, STD).blur_ksize == 5  # sigma is in pixels, whatever the image size


def test_defaults_are_the_reference_recipe() -> None:
    aug = MocoV2Augment(32, MEAN, STD)
    assert aug.scale == (0.08, 1.0) and aug.ratio == (3 / 4, 4 / 3)
    assert aug.blur_sigma == (0.1, 2.0) and aug.blur_p == 0.5
    assert (aug.jitter_p, aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.8, 0.4, 0.4, 0.4, 0.1)
    assert (aug.grayscale_p, aug.flip_p) == (0.2, 0.5)


def test_blur_only_output_is_pil_blur_then_normalize() -> None:
    aug = _only(blur_p=1.0)
    x = _images(8, seed=8)
    p = aug.sample_params(8, 32, 32, _gen(81))
    raw = _unnormalize(aug.apply(x, p))
    for b in range(8):
        ref = _pil_blur(x[b : b + 1].numpy(), p.sigma[b].item())
        assert (raw[b : b + 1] - ref).abs().max().item() <= PIL_BLUR_TOL + 1e-5


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
    # Rounding to whole pixels moves areas/ratios slightly out of the nominal ranges (0.08 of 1024 px = 82 px).
    assert frac.min() >= 0.06 and frac.min() < 0.1 and frac.max() <= 1.0
    aspect = w.double() / h.double()
    assert aspect.min() >= 0.65 and aspect.max() <= 1.5
    # Nominal mean 0.54, lowered a little by rejected over-wide/tall crops; compare with torchvision itself
    # at its default scale (what the reference's RandomResizedCrop(32) uses).
    torch.manual_seed(0)
    img = torch.zeros(3, 32, 32)
    ref = [RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(2000)]
    ref_frac = sum(rh * rw for _, _, rh, rw in ref) / (2000 * 32 * 32)
    assert 0.45 < frac.mean().item() < 0.58
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
