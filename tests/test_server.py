"""Tests for mocosfl.sfl.server (InfoNCE, moco_loss/moco_backward, key queues, EMA), by hand."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocosfl.sfl.server import (
    KeyQueue,
    PerClientQueue,
    ema_update_module,
    info_nce,
    local_queue_size,
    moco_backward,
    moco_loss,
)

T = 0.1


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def np_info_nce(q: np.ndarray, k: np.ndarray, negs: np.ndarray, t: float) -> float:
    """Per sample j: -log softmax([q_j.k_j, q_j.n_1, ...] / t)[0]; negs [K, D] or [B, K, D]. Mean over j."""
    losses = []
    for j in range(q.shape[0]):
        n_j = negs if negs.ndim == 2 else negs[j]
        logits = np.concatenate([[q[j] @ k[j]], n_j @ q[j]]) / t
        mx = logits.max()
        losses.append(-(logits[0] - mx - np.log(np.exp(logits - mx).sum())))
    return float(np.mean(losses))


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------- InfoNCE


def test_info_nce_shared_negatives_matches_numpy() -> None:
    q, k, negs = _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(11, 8, seed=2)
    got = info_nce(q, k, negs, T)
    assert got.shape == ()
    assert got.item() == pytest.approx(np_info_nce(_np(q), _np(k), _np(negs), T), rel=1e-5)


def test_info_nce_per_sample_negatives_matches_numpy() -> None:
    q, k, negs = _unit(5, 8, seed=0), _unit(5, 8, seed=1), _unit(5, 7, 8, seed=3)
    got = info_nce(q, k, negs, T)
    assert got.item() == pytest.approx(np_info_nce(_np(q), _np(k), _np(negs), T), rel=1e-5)
    # Each sample really uses its own negatives: sample 0's row alone changes the result.
    negs2 = negs.clone()
    negs2[0] = _unit(7, 8, seed=9)
    assert info_nce(q, k, negs2, T).item() != pytest.approx(got.item(), rel=1e-6)


def test_info_nce_broadcast_per_sample_equals_shared() -> None:
    q, k, negs = _unit(4, 6, seed=0), _unit(4, 6, seed=1), _unit(9, 6, seed=2)
    torch.testing.assert_close(info_nce(q, k, negs.expand(4, 9, 6), T), info_nce(q, k, negs, T))


def test_info_nce_limits() -> None:
    q = _unit(3, 4, seed=0)
    # Positive identical to q, negatives opposite: loss ~ 0.
    assert info_nce(q, q, -q[:1], 0.01).item() < 1e-6
    # Everything orthogonal-equal: loss = log(1 + K).
    e = torch.eye(4)
    assert info_nce(e[:1], e[1:2], e[2:4], T).item() == pytest.approx(np.log(3), rel=1e-6)


# ---------------------------------------------------------------- shared queue


def test_local_queue_size_splits_the_budget_and_keeps_one_key() -> None:
    assert [local_queue_size(128, m) for m in (1, 4, 5, 128, 200)] == [128, 32, 25, 1, 1]


def test_key_queue_init_is_unit_norm_and_seeded() -> None:
    a = KeyQueue(6, 4, torch.Generator().manual_seed(0))
    b = KeyQueue(6, 4, torch.Generator().manual_seed(0))
    assert a.keys.shape == (6, 4) and a.ptr == 0
    torch.testing.assert_close(a.keys.norm(dim=1), torch.ones(6))
    assert torch.equal(a.keys, b.keys)


def test_key_queue_fifo_and_wrap_around() -> None:
    q = KeyQueue(5, 2, torch.Generator().manual_seed(0))
    init = q.keys.clone()
    k = torch.arange(20.0).view(10, 2)  # row r = [2r, 2r+1]
    q.enqueue(k[0:3])
    assert q.ptr == 3
    assert torch.equal(q.keys[:3], k[0:3]) and torch.equal(q.keys[3:], init[3:])
    q.enqueue(k[3:7])  # 4 more than the 2 slots left: wraps and overwrites the oldest (slots 0, 1)
    assert q.ptr == (3 + 4) % 5 == 2
    assert torch.equal(q.keys, torch.stack([k[5], k[6], k[2], k[3], k[4]]))
    q.enqueue(k[7:8])
    assert q.ptr == 3 and torch.equal(q.keys[2], k[7])


def test_key_queue_more_than_k_keeps_newest_k() -> None:
    q = KeyQueue(4, 2, torch.Generator().manual_seed(0))
    q.enqueue(torch.zeros(1, 2))
    k = torch.arange(14.0).view(7, 2)
    q.enqueue(k)
    # As a set the queue holds exactly the newest 4 keys, oldest of them at ptr (next to be overwritten).
    assert sorted(q.keys[:, 0].tolist()) == sorted(k[3:, 0].tolist())
    assert torch.equal(q.keys[q.ptr], k[3])
    q.enqueue(torch.full((1, 2), -1.0))
    assert not (q.keys[:, 0] == k[3, 0]).any()  # the oldest went first
    assert (q.keys[:, 0] == k[4, 0]).any()


def test_key_queue_state_roundtrip() -> None:
    a = KeyQueue(5, 3, torch.Generator().manual_seed(0))
    a.enqueue(torch.ones(3, 3))
    b = KeyQueue(5, 3, torch.Generator().manual_seed(1))
    b.load(a.state())
    assert b.ptr == 3 and torch.equal(b.keys, a.keys)
    b.enqueue(torch.zeros(1, 3))
    assert a.keys[3].sum() != 0  # load copied, not aliased


# ---------------------------------------------------------------- per-client queue


def test_per_client_queue_touches_only_given_clients_and_wraps() -> None:
    n, size, d = 5, 3, 2
    q = PerClientQueue(n, size, d, torch.Generator().manual_seed(0))
    assert q.keys.shape == (n, size, d)
    torch.testing.assert_close(q.keys.norm(dim=2), torch.ones(n, size))
    init = q.keys.clone()
    ids = torch.tensor([1, 3])
    new = torch.arange(2 * 2 * d, dtype=torch.float32).view(2, 2, d)  # 2 keys per client
    q.enqueue(ids, new)
    assert q.ptr.tolist() == [0, 2, 0, 2, 0]
    for c in (0, 2, 4):
        assert torch.equal(q.keys[c], init[c])
    assert torch.equal(q.keys[1, :2], new[0]) and torch.equal(q.keys[1, 2], init[1, 2])
    assert torch.equal(q.keys[3, :2], new[1])
    new2 = 100 + torch.arange(2 * 2 * d, dtype=torch.float32).view(2, 2, d)
    q.enqueue(ids, new2)  # slots 2, then wrap to 0
    assert q.ptr.tolist() == [0, 1, 0, 1, 0]
    assert torch.equal(q.keys[1, 2], new2[0, 0]) and torch.equal(q.keys[1, 0], new2[0, 1])
    assert torch.equal(q.keys[1, 1], new[0, 1])
    assert torch.equal(q.keys[3, 2], new2[1, 0]) and torch.equal(q.keys[3, 0], new2[1, 1])


def test_per_client_queue_more_than_size_keeps_newest() -> None:
    q = PerClientQueue(3, 2, 1, torch.Generator().manual_seed(0))
    q.enqueue(torch.tensor([2]), torch.arange(5.0).view(1, 5, 1))
    assert sorted(q.keys[2, :, 0].tolist()) == [3.0, 4.0]
    assert q.ptr.tolist() == [0, 0, 0]


def test_per_client_queue_negatives_by_sample() -> None:
    q = PerClientQueue(4, 3, 2, torch.Generator().manual_seed(0))
    owners = torch.tensor([2, 2, 0, 3])
    negs = q.negatives(owners)
    assert negs.shape == (4, 3, 2)
    for j, c in enumerate(owners.tolist()):
        assert torch.equal(negs[j], q.keys[c])


def test_per_client_queue_state_roundtrip() -> None:
    a = PerClientQueue(3, 4, 2, torch.Generator().manual_seed(0))
    a.enqueue(torch.tensor([0, 2]), torch.ones(2, 3, 2))
    b = PerClientQueue(3, 4, 2, torch.Generator().manual_seed(5))
    b.load(a.state())
    assert torch.equal(b.keys, a.keys) and torch.equal(b.ptr, a.ptr)


# ---------------------------------------------------------------- EMA of modules


def test_ema_update_module() -> None:
    torch.manual_seed(0)
    online, target = nn.Linear(3, 2), nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update_module(target, online, 0.8)
    for t, b, o in zip(target.parameters(), before, online.parameters(), strict=True):
        torch.testing.assert_close(t, 0.8 * b + 0.2 * o.detach())


# ---------------------------------------------------------------- moco_loss


def _servers(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    server = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5))
    target = copy.deepcopy(server)
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.3 * torch.randn_like(p))  # target differs, so swapping online/target roles is visible
    target.requires_grad_(False)
    return server, target


def _hand_term(server: nn.Module, target: nn.Module, a: torch.Tensor, b: torch.Tensor, negs: torch.Tensor) -> float:
    q = F.normalize(server(a), dim=1)
    k = F.normalize(target(b), dim=1)
    return np_info_nce(_np(q), _np(k), _np(negs), T)


@pytest.mark.parametrize("per_sample", [False, True])
def test_symmetric_moco_loss_is_sum_of_two_terms(per_sample: bool) -> None:
    server, target = _servers()
    h_q, h_k = torch.randn(4, 6), torch.randn(4, 6)
    negs = _unit(4, 9, 5, seed=1) if per_sample else _unit(9, 5, seed=1)
    loss, keys = moco_loss(server, target, h_q, h_k, negs, T, symmetric=True)
    expected = _hand_term(server, target, h_q, h_k, negs) + _hand_term(server, target, h_k, h_q, negs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert keys.shape == (8, 5)
    torch.testing.assert_close(keys[:4], F.normalize(target(h_k), dim=1))
    torch.testing.assert_close(keys[4:], F.normalize(target(h_q), dim=1))


@pytest.mark.parametrize("per_sample", [False, True])
def test_asymmetric_moco_loss(per_sample: bool) -> None:
    server, target = _servers()
    h_q, h_k = torch.randn(3, 6), torch.randn(3, 6)
    negs = _unit(3, 8, 5, seed=1) if per_sample else _unit(8, 5, seed=1)
    loss, keys = moco_loss(server, target, h_q, h_k, negs, T, symmetric=False)
    assert loss.item() == pytest.approx(_hand_term(server, target, h_q, h_k, negs), rel=1e-5)
    torch.testing.assert_close(keys, F.normalize(target(h_k), dim=1))


def test_moco_loss_gradient_reaches_h_q_only() -> None:
    server, target = _servers()
    h_q = torch.randn(4, 6, requires_grad=True)
    h_k = torch.randn(4, 6, requires_grad=True)
    negs = _unit(9, 5, seed=1)
    loss, keys = moco_loss(server, target, h_q, h_k, negs, T, symmetric=True)
    assert not keys.requires_grad
    loss.backward()
    assert h_k.grad is None
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in server.parameters())

    # dL/dh_q comes only from the first term's online branch.
    h_q2 = h_q.detach().clone().requires_grad_(True)
    q = F.normalize(server(h_q2), dim=1)
    with torch.no_grad():
        k = F.normalize(target(h_k), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ negs.t()], dim=1) / T
    (-F.log_softmax(logits, dim=1)[:, 0].mean()).backward()
    torch.testing.assert_close(h_q.grad, h_q2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_moco_backward_equals_backward_of_moco_loss(symmetric: bool, per_sample: bool) -> None:
    """One backward per term gives the joint loss's value, keys and gradients (server and h_q)."""
    negs = _unit(4, 9, 5, seed=1) if per_sample else _unit(9, 5, seed=1)
    h_q, h_k = torch.randn(4, 6), torch.randn(4, 6)

    server, target = _servers()
    hq_joint = h_q.clone().requires_grad_(True)
    loss, keys = moco_loss(server, target, hq_joint, h_k, negs, T, symmetric)
    loss.backward()
    joint = [p.grad.clone() for p in server.parameters()]

    server2, target2 = _servers()
    hq_split = h_q.clone().requires_grad_(True)
    loss2, keys2 = moco_backward(server2, target2, hq_split, h_k, negs, T, symmetric)
    assert not loss2.requires_grad and not keys2.requires_grad
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(keys2, keys)
    torch.testing.assert_close(hq_split.grad, hq_joint.grad, rtol=1e-5, atol=1e-7)
    for g, p in zip(joint, server2.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in target2.parameters())


def test_bf16_forward_keeps_loss_and_keys_fp32_and_close() -> None:
    """Under bf16 autocast the server's forward passes run in bf16 but the loss, the keys and the
    gradients that reach the smashed data are fp32, and close to the fp32 ones (bf16 has 8 mantissa bits)."""
    from mocosfl.models.resnet import build_split_model
    from mocosfl.sfl.server import moco_loss

    torch.manual_seed(0)
    client, server = build_split_model(8, 1, proj_hidden_dim=32, proj_dim=16)
    target = build_split_model(8, 1, proj_hidden_dim=32, proj_dim=16)[1]
    target.load_state_dict(server.state_dict())
    x1, x2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)
    negatives = torch.nn.functional.normalize(torch.randn(64, 16), dim=1)
    out = {}
    for precision in ("fp32", "bf16"):
        h_q = client(x1).detach().requires_grad_(True)
        h_k = client(x2).detach()
        loss, keys = moco_loss(server, target, h_q, h_k, negatives, 0.1, True, precision)
        loss.backward()
        assert loss.dtype == keys.dtype == h_q.grad.dtype == torch.float32
        out[precision] = (loss.item(), keys, h_q.grad)
        server.zero_grad()
    (l32, k32, g32), (l16, k16, g16) = out["fp32"], out["bf16"]
    assert l16 != l32 and abs(l16 - l32) / abs(l32) < 0.02  # bf16 really ran, and stays close
    assert torch.nn.functional.cosine_similarity(k16, k32).min() > 0.99
    # The smashed data enter the server rounded to bf16 and the residual stream stays bf16 (as after a
    # network's first convolution): 0.946 measured on this width-8 net on noise.
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.9
