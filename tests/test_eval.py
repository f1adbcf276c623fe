"""Tests for mocosfl.eval: weighted kNN vs a brute-force loop, feature extraction, and the linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mocosfl.eval.knn import extract_features, knn_predict, knn_top1
from mocosfl.eval.linear import linear_probe

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_knn(
    bank: np.ndarray, labels: np.ndarray, queries: np.ndarray, num_classes: int, k: int, t: float
) -> np.ndarray:
    """One query at a time: cosine similarity, k most similar, vote exp(sim / t) per class, argmax."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    preds = []
    for q in queries:
        q = q / np.linalg.norm(q)
        sims = [(float(q @ bank[i]), i) for i in range(len(bank))]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, i in sims[:k]:
            votes[labels[i]] += np.exp(s / t)
        preds.append(int(np.argmax(votes)))
    return np.array(preds)


@pytest.mark.parametrize("k,t,chunk", [(7, 0.1, 1000), (1, 0.5, 3), (30, 0.07, 4), (500, 0.1, 1000)])
def test_knn_predict_matches_brute_force(k: int, t: float, chunk: int) -> None:
    g = torch.Generator().manual_seed(k)
    bank = torch.randn(60, 6, generator=g) * 3 + 1
    labels = torch.randint(0, 4, (60,), generator=g)
    queries = torch.randn(25, 6, generator=g)
    got = knn_predict(bank, labels, queries, 4, k=k, temperature=t, chunk=chunk)
    assert got.shape == (25,) and got.dtype == torch.long
    expected = brute_knn(bank.double().numpy(), labels.numpy(), queries.double().numpy(), 4, min(k, 60), t)
    assert np.array_equal(got.numpy(), expected)


def test_knn_weighting_beats_majority() -> None:
    # k=3: one very close neighbour of class 1 outvotes two far ones of class 0 at a low temperature.
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([1, 0, 0, 0])
    q = torch.tensor([[1.0, 0.3]])
    assert knn_predict(bank, labels, q, 2, k=3, temperature=0.05).item() == 1
    assert knn_predict(bank, labels, q, 2, k=3, temperature=100.0).item() == 0


def _clusters(n_per: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(dim)[:classes] * 10
    y = torch.arange(classes).repeat_interleave(n_per)
    x = centers[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_top1_perfect_on_separable_clusters() -> None:
    bank, by = _clusters(40, 5, 8, 0.5, seed=0)
    test, ty = _clusters(10, 5, 8, 0.5, seed=1)
    assert knn_top1(bank, by, test, ty, 5, k=20, temperature=0.1) == 100.0
    assert knn_top1(bank, by, test, (ty + 1) % 5, 5, k=20) == 0.0


def test_extract_features_batches_and_normalizes() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    seen = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape)
        return x.mean(dim=(2, 3)).double()

    f = extract_features(encode, images, mean, std, image_size=8, batch_size=3)
    assert [s[0] for s in seen] == [3, 3, 1]
    assert f.shape == (7, 3) and f.dtype == torch.float32
    expected = (images.astype(np.float64) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(f.numpy(), expected.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- linear probe


def _blobs(n: int, seed: int, classes: int = 3, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[4.0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0], [0, 0, 4.0, 0, 0]])[:classes, :dim]
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def test_linear_probe_learns_separable_blobs() -> None:
    xtr, ytr = _blobs(600, 0)
    xva, yva = _blobs(150, 2)
    xte, yte = _blobs(300, 1)
    res = linear_probe(xtr, ytr, xva, yva, xte, yte, 3, epochs=15, lr=1e-2, batch_size=64, seed=0)
    assert res.test_top1 > 90 and res.test_top1_final > 90 and res.val_top1 > 90
    assert 1 <= res.best_epoch <= 15


def test_linear_probe_is_deterministic_given_seed() -> None:
    xtr, ytr = _blobs(300, 0)
    xva, yva = _blobs(50, 2)
    xte, yte = _blobs(100, 1)
    a = linear_probe(xtr, ytr, xva, yva, xte, yte, 3, epochs=5, lr=1e-2, batch_size=32, seed=3)
    b = linear_probe(xtr, ytr, xva, yva, xte, yte, 3, epochs=5, lr=1e-2, batch_size=32, seed=3)
    assert a == b


def test_linear_probe_selects_on_validation_not_test() -> None:
    # Noisy features and a large step: validation accuracy peaks early, so the chosen epoch is informative.
    x, y = _blobs(200, 0)
    x = x + 3.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    xtr, ytr, xva, yva = x[:140], y[:140], x[140:], y[140:]
    xte, yte = _blobs(200, 1)
    kw = dict(num_classes=3, epochs=10, lr=0.1, batch_size=16, seed=0)
    res = linear_probe(xtr, ytr, xva, yva, xte, yte, **kw)
    assert 1 <= res.best_epoch < 10
    # Arbitrary other test features and labels: selection (epoch, val accuracy) must not move.
    for s in range(3):
        g = torch.Generator().manual_seed(100 + s)
        fake_x, fake_y = torch.randn(xte.shape, generator=g), torch.randint(0, 3, yte.shape, generator=g)
        other = linear_probe(xtr, ytr, xva, yva, fake_x, fake_y, **kw)
        assert (other.best_epoch, other.val_top1) == (res.best_epoch, res.val_top1)
    # test_top1 is the test accuracy of the model at best_epoch: rerunning with exactly that many epochs
    # replays the same training (same seed), so its final accuracy is the reported one.
    short = linear_probe(xtr, ytr, xva, yva, xte, yte, **{**kw, "epochs": res.best_epoch})
    assert short.test_top1_final == res.test_top1
    assert short.val_top1 == res.val_top1


def test_linear_probe_needs_train_and_val() -> None:
    x, y = _blobs(1, 0)
    with pytest.raises(ValueError, match="too few"):
        linear_probe(x, y, x, y, x, y, 3, epochs=1)
    with pytest.raises(ValueError, match="too few"):
        linear_probe(*_blobs(10, 0), x[:0], y[:0], x, y, 3, epochs=1)
