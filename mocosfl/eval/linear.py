"""Linear probe on frozen features: one linear layer trained with labels (Adam, the reference's recipe).

The epoch is selected on a validation split carved from train, never on test.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ProbeResult:
    test_top1: float  # at the epoch chosen on validation
    test_top1_final: float  # after the last epoch
    val_top1: float
    best_epoch: int


def _accuracy(w: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (w(x).argmax(dim=1) == y).float().mean().item()


def linear_probe(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> ProbeResult:
    """Train a linear classifier on features [N, F]; return test accuracy (percent)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(train_f), generator=g)
    n_val = max(1, int(round(val_fraction * len(train_f))))
    val_idx, fit_idx = perm[:n_val], perm[n_val:]
    if len(fit_idx) == 0:
        raise ValueError("too few training features for a validation split")
    # Standardise with training statistics: an affine map, so separability is unchanged,
    # but Adam converges far faster on narrow encoders' features.
    mu = train_f[fit_idx].mean(dim=0)
    sd = train_f[fit_idx].std(dim=0).clamp_min(1e-6)
    x_fit, y_fit = (train_f[fit_idx] - mu) / sd, train_y[fit_idx]
    x_val, y_val = (train_f[val_idx] - mu) / sd, train_y[val_idx]
    x_test = (test_f - mu) / sd

    torch.manual_seed(seed)
    head = torch.nn.Linear(train_f.shape[1], num_classes)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    best = (-1.0, 0, 0.0)  # (val acc, epoch, test acc)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(x_fit), generator=g)
        for start in range(0, len(order), batch_size):
            i = order[start : start + batch_size]
            loss = F.cross_entropy(head(x_fit[i]), y_fit[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = _accuracy(head, x_val, y_val)
        if val > best[0]:
            best = (val, epoch, _accuracy(head, x_test, test_y))
    return ProbeResult(
        test_top1=best[2], test_top1_final=_accuracy(head, x_test, test_y), val_top1=best[0], best_epoch=best[1]
    )
