"""Model-inversion attack (MIA) of an honest-but-curious server on a client model's smashed data.

The server holds a white-box copy of the (synced) client model f_c and auxiliary images of the clients'
distribution, never a client's images. It trains an ``InversionDecoder`` on pairs (f_c(x), x) of its
auxiliary images, keeps the decoder with the lowest mean validation MSE (held-out auxiliary images, decoder in
eval mode), and reconstructs victims from their smashed data. Targets are the images themselves in [0, 1]:
no JPEG round trip, one normalization for the client's input.
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mocosfl.data.augment import normalize_only
from mocosfl.privacy.decoder import InversionDecoder
from mocosfl.privacy.metrics import quality
from mocosfl.seeding import Stream, rng, torch_generator

METRICS = ("ssim", "psnr", "mse")


@dataclass(frozen=True)
class AttackSettings:
    """The attacker's decoder and its training (``attack`` in params.yaml)."""

    decoder_width: int = 64
    decoder_blocks: int = 4
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    val_fraction: float = 0.1  # of the auxiliary images, held out to select the decoder's epoch
    batch: int = 500  # images per forward pass when encoding and decoding (no effect on the numbers)


@dataclass(frozen=True)
class Pairs:
    """Smashed data and the images they came from.  Shapes: h [n, C, s, s], x [n, 3, S, S] in [0, 1]."""

    h: torch.Tensor
    x: torch.Tensor


@torch.no_grad()
def smash(
    client: nn.Module,
    images: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    image_size: int,
    batch: int,
    device: torch.device,
) -> Pairs:
    """f_c of uint8 images [n, H, W, 3] (eval mode, the client's normalization) and the images in [0, 1]."""
    client = client.eval()
    hs, xs = [], []
    for start in range(0, len(images), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(images[start : start + batch])).to(device)
        hs.append(client(normalize_only(chunk, mean, std, image_size)).float().cpu())
        xs.append(normalize_only(chunk, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), image_size).cpu())
    return Pairs(torch.cat(hs), torch.cat(xs))


def split_aux(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the auxiliary images the decoder trains on and of those that select its epoch."""
    n_val = max(1, math.ceil(n * val_fraction))
    if n - n_val < 2:
        raise ValueError(f"{n} auxiliary images leave fewer than 2 to train the decoder on")
    order = rng(seed, Stream.ATTACK_SPLIT).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def decode(decoder: nn.Module, h: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    decoder.eval()
    return torch.cat([decoder(part.to(device)).float().cpu() for part in h.split(batch)])


def train_decoder(
    train: Pairs,
    val: Pairs,
    s: AttackSettings,
    seed: int,
    attack_seed: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Adam on MSE(decoder(h), x); returns the decoder of the epoch with the lowest mean validation MSE.
    ``seed``, ``attack_seed``: the stream (``Stream.ATTACK``) of the initialisation and batch order."""
    gen = torch_generator(seed, Stream.ATTACK, attack_seed)
    c, size = train.h.shape[1], train.h.shape[-1]
    with torch.random.fork_rng(devices=[]):  # the decoder's initialisation, leaving the global RNG as it was
        torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
        decoder = InversionDecoder(c, size, train.x.shape[-1], s.decoder_width, s.decoder_blocks).to(device)
    opt = torch.optim.Adam(decoder.parameters(), lr=s.lr)
    best_loss, best_epoch, best_state = math.inf, 0, copy.deepcopy(decoder.state_dict())
    n = len(train.h)
    for epoch in range(1, s.epochs + 1):
        decoder.train()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n - 1, s.batch_size):  # a last batch of one image cannot train batch norm
            idx = order[start : start + s.batch_size]
            if len(idx) < 2:
                continue
            loss = nn.functional.mse_loss(decoder(train.h[idx].to(device)), train.x[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val_loss = float(((decode(decoder, val.h, s.batch, device) - val.x) ** 2).mean())
        if val_loss < best_loss:
            best_loss, best_epoch, best_state = val_loss, epoch, copy.deepcopy(decoder.state_dict())
        if log:
            log(f"    epoch {epoch}/{s.epochs}: validation MSE {val_loss:.4f}")
    decoder.load_state_dict(best_state)
    return decoder.eval(), {"best_epoch": best_epoch, "val_mse": best_loss}


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample std (ddof 1; 0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def attack(
    aux: Pairs,
    victims: Pairs,
    s: AttackSettings,
    seeds: int,
    seed: int,
    device: torch.device,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The attack ``seeds`` times (attack seeds 0..seeds-1 of ``seed``: decoder initialisation and batch
    order; the auxiliary images' split is ``seed``'s). Returns each attack's mean MSE / SSIM / PSNR over the
    victims, their mean and std across attacks, and the first attack's reconstructions (``recon``)."""
    tr, va = split_aux(len(aux.h), s.val_fraction, seed)
    train, val = Pairs(aux.h[tr], aux.x[tr]), Pairs(aux.h[va], aux.x[va])
    runs: list[dict[str, Any]] = []
    recon = torch.empty(0)
    for i in range(seeds):
        if log:
            log(f"  attack {i + 1}/{seeds}: decoder on {len(tr)} auxiliary images, {len(va)} to select its epoch")
        decoder, info = train_decoder(train, val, s, seed, i, device, log)
        out = decode(decoder, victims.h, s.batch, device)
        runs.append({"attack_seed": i, **info, **quality(out, victims.x)})
        if i == 0:
            recon = out
    result: dict[str, Any] = {m: mean_std([r[m] for r in runs]) for m in METRICS}
    return result | {"per_seed": runs, "recon": recon}


def mean_image_floor(aux: Pairs, victims: Pairs) -> dict[str, float]:
    """What an attacker gets without the smashed data: the auxiliary images' mean image for every victim."""
    guess = aux.x.mean(dim=0, keepdim=True).expand_as(victims.x)
    return quality(guess, victims.x)


def plot_grid(rows: dict[str, torch.Tensor], path: Any, columns: int = 8) -> None:
    """A PNG of the first ``columns`` images of each row ([n, 3, S, S] in [0, 1]): victims, reconstructions."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = min(columns, *(len(v) for v in rows.values()))
    fig = Figure(figsize=(1.2 * n + 1.6, 1.3 * len(rows)))
    FigureCanvasAgg(fig)
    for r, (label, images) in enumerate(rows.items()):
        for c in range(n):
            ax = fig.add_subplot(len(rows), n, r * n + c + 1)
            ax.imshow(images[c].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
