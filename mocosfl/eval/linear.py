"""Linear probe on frozen features: one linear layer trained with labels (Adam, the reference's recipe).

The epoch is selected on the validation images (``data.val_size``, carved from train), never on test.
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
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    test_f: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> ProbeResult:
    """Fit a linear classifier on train features, pick the epoch on val, report test accuracy (percent).

    Shape: train_f [N, F], val_f [V, F], test_f [T, F]; labels [N], [V], [T].
    """
    if len(train_f) < 2 or len(val_f) < 1:
        raise ValueError(f"too few features for a probe: {len(train_f)} train, {len(val_f)} validation")
    g = torch.Generator().manual_seed(seed)
    # Standardise with training statistics: an affine map, so separability is unchanged,
    # but Adam converges far faster on narrow encoders' features.
    mu = train_f.mean(dim=0)
    sd = train_f.std(dim=0).clamp_min(1e-6)
    x_fit, y_fit = (train_f - mu) / sd, train_y
    x_val, y_val = (val_f - mu) / sd, val_y
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
