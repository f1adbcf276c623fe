"""MoCo v2 augmentation applied per sample but computed in batch with torch tensor ops.
All randomness comes from an explicit CPU ``torch.Generator``: same state => bit-identical output on CPU."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
_CROP_TRIES = 10


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample random parameters of one augmentation call (all CPU tensors, leading dim B)."""

    crop: torch.Tensor  # [B, 4] int64 (top i, left j, height h, width w) in input pixels
    flip: torch.Tensor  # [B] bool
    jitter: torch.Tensor  # [B] bool, color jitter applied
    brightness: torch.Tensor  # [B] float32 factor
    contrast: torch.Tensor  # [B] float32 factor
    saturation: torch.Tensor  # [B] float32 factor
    hue: torch.Tensor  # [B] float32 shift in turns, [-hue, hue]
    gray: torch.Tensor  # [B] bool
    blur: torch.Tensor  # [B] bool
    sigma: torch.Tensor  # [B] float32 Gaussian sigma in pixels


def _to_float_chw(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, H, W] in [0, 1]."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images of shape [B, H, W, 3], got {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()


def _normalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def normalize_only(
    images: torch.Tensor,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    image_size: int,
) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float32 [B, 3, S, S] normalized, resized if H != S (bilinear, antialias).

    Used for evaluation features (no randomness).
    """
    x = _to_float_chw(images)  # [B, 3, H, W]
    if x.shape[-2:] != (image_size, image_size):
        size = (image_size, image_size)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return _normalize(x, mean, std)  # [B, 3, S, S]


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] luma."""
    r, g, b = x.unbind(dim=1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _blend(a: torch.Tensor, b: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * a + (1 - ratio) * b, clamped to [0, 1]; ratio is [B] (as torchvision's _blend)."""
    r = ratio.view(-1, 1, 1, 1)
    return (r * a + (1.0 - r) * b).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per-sample hue shift (in turns, [B]) of [B, 3, H, W] RGB in [0, 1], vectorized RGB -> HSV -> RGB.

    RGB -> HSV uses torchvision's formulas; HSV -> RGB the closed form
    c_n = v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6, n = 5, 3, 1 for R, G, B.
    Hue is kept in sixths of a turn throughout.
    """
    r, g, b = x.unbind(dim=1)  # [B, H, W] each
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    sat = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_div
    gc = (maxc - g) / cr_div
    bc = (maxc - b) / cr_div
    h6 = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))  # hue * 6
    h6 = h6 + 6.0 * shift.to(x.device, x.dtype).view(-1, 1, 1)
    n = torch.tensor((5.0, 3.0, 1.0), dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h6.unsqueeze(1), 6.0)  # [B, 3, H, W]
    a = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) * (1.0 - sat.unsqueeze(1) * a)


def _color_jitter(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """Brightness, contrast, saturation, hue, each clamped to [0, 1] (as torchvision), in this FIXED order.

    torchvision draws a random order per call; a fixed order keeps the batch fully vectorized.
    Hue is shifted as torchvision does it (HSV, not a YIQ rotation), see `_adjust_hue`.
    """
    dev = x.device
    x = (x * p.brightness.to(dev).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)  # blend with black
    mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # [B, 1, 1, 1]
    x = _blend(x, mean, p.contrast.to(dev))
    x = _blend(x, _grayscale(x), p.saturation.to(dev))
    return _adjust_hue(x, p.hue).clamp_(0.0, 1.0)


# PIL's GaussianBlur (what the reference applies) is 3 passes of an "extended" box blur per axis whose
# total variance is sigma^2 (Gwosdek et al., SSVM 2011), each pass replicating the edge pixels. It is
# emulated here rather than sampling a Gaussian, which differs from PIL on CIFAR images by up to ~4/255
# inside and 20-30/255 at the edges (replicating per pass is neither reflect nor replicate padding of one
# Gaussian).
BLUR_PASSES = 3


def box_radius(sigma: torch.Tensor, passes: int = BLUR_PASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer part l and fractional part a of the box radius whose ``passes`` passes have variance sigma^2.

    Shape: sigma [B] -> l [B] int64, a [B] (as PIL's _gaussian_blur_radius).
    """
    var = sigma.double() ** 2 / passes
    length = torch.sqrt(12.0 * var + 1.0)
    whole = torch.floor((length - 1.0) / 2.0)
    frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * var) / (6 * (var - (whole + 1) ** 2))
    return whole.to(torch.int64), frac.to(sigma.dtype)


def blur_kernel_size(sigma_max: float, passes: int = BLUR_PASSES) -> int:
    """Taps of one box pass at the largest sigma (2 -> 5); all passes together reach (taps // 2) * passes px."""
    whole, _ = box_radius(torch.tensor([float(sigma_max)]), passes)
    return 2 * int(whole.item()) + 3


def _box_kernels(sigma: torch.Tensor, ksize: int) -> torch.Tensor:
    """Per-sample extended box weights: 1 within l px, a at l + 1 px, normalized.  Shape: [B] -> [B, ksize]."""
    whole, frac = box_radius(sigma)
    dist = torch.arange(ksize, dtype=torch.int64).sub(ksize // 2).abs().view(1, -1)  # [1, k]
    w = torch.where(dist <= whole.view(-1, 1), 1.0, torch.where(dist == whole.view(-1, 1) + 1, frac.view(-1, 1), 0.0))
    return w / (2.0 * (whole + frac) + 1.0).view(-1, 1)  # [B, k]


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, ksize: int | None = None) -> torch.Tensor:
    """Per-sample Gaussian blur of [B, C, H, W] as PIL's GaussianBlur(radius=sigma), in float (no rounding).

    Separable: BLUR_PASSES box passes along W, then along H, each a weighted sum of ksize shifted views of the
    edge-replicated input (a loop over taps, not images: faster than a grouped conv2d on CPU for short kernels).
    ``ksize`` is raised to what the batch's largest sigma needs (never truncated); wider only adds zero taps.
    """
    k = max(ksize or 3, blur_kernel_size(float(sigma.max())))
    kern = _box_kernels(sigma.cpu(), k).to(x.device, x.dtype).view(-1, k, 1, 1, 1)  # [B, k, 1, 1, 1]
    hgt, wid = x.shape[-2:]
    pad = k // 2
    for _ in range(BLUR_PASSES):
        y = F.pad(x, (pad, pad, 0, 0), mode="replicate")  # [B, C, H, W+2p]
        x = kern[:, 0] * y[..., 0:wid]
        for tap in range(1, k):
            x = x + kern[:, tap] * y[..., tap : tap + wid]  # [B, C, H, W]
    for _ in range(BLUR_PASSES):
        y = F.pad(x, (0, 0, pad, pad), mode="replicate")  # [B, C, H+2p, W]
        x = kern[:, 0] * y[..., 0:hgt, :]
        for tap in range(1, k):
            x = x + kern[:, tap] * y[..., tap : tap + hgt, :]  # [B, C, H, W]
    return x


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low  # [n] float32


def _bernoulli(n: int, p: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p  # [n] bool


class MocoV2Augment:
    """MoCo v2 recipe: RandomResizedCrop, ColorJitter (p=0.8), RandomGrayscale (p=0.2),
    GaussianBlur (p=0.5), horizontal flip (p=0.5), Normalize — per sample, batched."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_p: float = 0.5,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        flip_p: float = 0.5,
    ) -> None:
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.scale = scale
        self.ratio = ratio
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = blur_sigma
        self.flip_p = flip_p
        self.blur_ksize = blur_kernel_size(blur_sigma[1])

    def _sample_crops(self, n: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """torchvision RandomResizedCrop.get_params vectorized over n samples x 10 tries.

        Returns [n, 4] int64 (i, j, h, w).
        """
        area = float(height * width)
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        u_scale = torch.rand(n, _CROP_TRIES, generator=generator, dtype=torch.float64)
        u_ratio = torch.rand(n, _CROP_TRIES, generator=generator, dtype=torch.float64)
        u_pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u_scale)  # [n, T]
        aspect = torch.exp(log_r[0] + (log_r[1] - log_r[0]) * u_ratio)  # [n, T]
        w = torch.round(torch.sqrt(target * aspect))
        h = torch.round(torch.sqrt(target / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # [n, T]
        first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # index of first valid try
        found = ok.any(dim=1)  # [n]
        w = w.gather(1, first).squeeze(1)
        h = h.gather(1, first).squeeze(1)
        # Fallback: central crop with the aspect ratio clamped into `ratio` (as torchvision).
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(height * max(self.ratio))), height
        else:
            fw, fh = width, height
        w = torch.where(found, w, float(fw))
        h = torch.where(found, h, float(fh))
        i = torch.floor(u_pos[:, 0] * (height - h + 1))
        j = torch.floor(u_pos[:, 1] * (width - w + 1))
        i = torch.where(found, i, (height - h) // 2)
        j = torch.where(found, j, (width - w) // 2)
        return torch.stack((i, j, h, w), dim=1).to(torch.int64)  # [n, 4]

    def sample_params(self, n: int, height: int, width: int, generator: torch.Generator) -> AugmentParams:
        """Draw all per-sample parameters on CPU; the number of draws is fixed, independent of the data."""
        crop = self._sample_crops(n, height, width, generator)
        jitter = _bernoulli(n, self.jitter_p, generator)
        brightness = _uniform(n, max(0.0, 1.0 - self.brightness), 1.0 + self.brightness, generator)
        contrast = _uniform(n, max(0.0, 1.0 - self.contrast), 1.0 + self.contrast, generator)
        saturation = _uniform(n, max(0.0, 1.0 - self.saturation), 1.0 + self.saturation, generator)
        hue = _uniform(n, -self.hue, self.hue, generator)
        gray = _bernoulli(n, self.grayscale_p, generator)
        blur = _bernoulli(n, self.blur_p, generator)
        sigma = _uniform(n, self.blur_sigma[0], self.blur_sigma[1], generator)
        flip = _bernoulli(n, self.flip_p, generator)
        return AugmentParams(crop, flip, jitter, brightness, contrast, saturation, hue, gray, blur, sigma)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """uint8 [B, H, W, 3] + params -> float32 [B, 3, S, S] normalized, on images.device."""
        x = _to_float_chw(images)  # [B, 3, H, W]
        b, _, height, width = x.shape
        dev = x.device
        s = self.image_size
        # Crop + resize + flip as one affine map of normalized coords (align_corners=False: -1/+1 = outer
        # pixel edges). Flipping first is equivalent to MoCo's flip-last: color ops and the symmetric blur
        # commute. Unlike torchvision there is no antialiasing (crops at 32 px are upscaled) and bilinear
        # taps at the crop border may read the neighbouring pixel outside the crop.
        crop = params.crop.to(dev, torch.float32)
        i, j, h, w = crop.unbind(dim=1)  # [B] each
        sign = 1.0 - 2.0 * params.flip.to(dev, torch.float32)
        # Output pixel centers in normalized coords -> input normalized coords per sample (= affine_grid).
        base = (torch.arange(s, dtype=torch.float32, device=dev) * 2.0 + 1.0) / s - 1.0  # [S]
        gx = (sign * w / width).view(-1, 1) * base + ((2.0 * j + w) / width - 1.0).view(-1, 1)  # [B, S]
        gy = (h / height).view(-1, 1) * base + ((2.0 * i + h) / height - 1.0).view(-1, 1)  # [B, S]
        # [B, S, S, 2]
        grid = torch.stack((gx.view(b, 1, s).expand(b, s, s), gy.view(b, s, 1).expand(b, s, s)), dim=-1)
        # [B, 3, S, S]
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

        def mask(m: torch.Tensor) -> torch.Tensor:
            return m.to(dev).view(-1, 1, 1, 1)  # [B, 1, 1, 1]

        if bool(params.jitter.any()):
            x = torch.where(mask(params.jitter), _color_jitter(x, params), x)
        if bool(params.gray.any()):
            x = torch.where(mask(params.gray), _grayscale(x).expand(-1, 3, -1, -1), x)
        if bool(params.blur.any()):
            # Only the blurred samples: the blur is the costliest op (6 passes), and it is per sample anyway.
            idx = params.blur.nonzero().squeeze(1)  # [n_blur]
            on_dev = idx.to(dev)
            blurred = _gaussian_blur(x[on_dev], params.sigma[idx], self.blur_ksize)  # [n_blur, 3, S, S]
            x = x.index_copy(0, on_dev, blurred)
        return _normalize(x, self.mean, self.std)  # [B, 3, S, S]

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """uint8 [B, H, W, 3] (channels-last), any device -> float32 [B, 3, S, S] normalized, S = image_size.

        All randomness is drawn from `generator` (CPU) and the parameters are then moved to images.device.
        ``rows`` ([B_all] bool, B of them True): the images are these rows of a larger batch; the
        parameters are drawn for all B_all rows and these rows' are applied, so a process holding part
        of a batch augments it exactly as the whole batch would be (a client host in distributed runs).
        """
        n = images.shape[0] if rows is None else len(rows)
        params = self.sample_params(n, images.shape[1], images.shape[2], generator)
        if rows is not None:
            params = AugmentParams(**{f.name: getattr(params, f.name)[rows] for f in dataclasses.fields(params)})
        return self.apply(images, params)

    def two_views(
        self, images: torch.Tensor, generator: torch.Generator, rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Two independent augmentations (query, key) of the same batch, each [B, 3, S, S]."""
        return self(images, generator, rows), self(images, generator, rows)
