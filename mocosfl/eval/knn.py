"""Feature extraction and the weighted kNN classifier (k=200, T=0.1) used as SSL monitor."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mocosfl.data.augment import normalize_only


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    image_size: int,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Encode uint8 images [N, H, W, 3] (no augmentation) -> float features [N, F] on CPU."""
    out = []
    for start in range(0, len(images), batch_size):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).to(device)
        out.append(encode(normalize_only(chunk, mean, std, image_size)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1000,
) -> torch.Tensor:
    """Weighted kNN vote on cosine similarity (InstDisc / MoCo monitor rule).

    Shape: bank [N, F], bank_labels [N], queries [Q, F] -> predicted labels [Q].
    """
    bank = F.normalize(bank, dim=1)
    queries = F.normalize(queries, dim=1)
    k = min(k, bank.shape[0])
    preds = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.t()  # [q, N]
        top_sim, top_idx = sim.topk(k, dim=1)  # [q, k]
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)  # [q, C]
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    query_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy in percent."""
    pred = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    return 100.0 * (pred == query_labels).float().mean().item()
