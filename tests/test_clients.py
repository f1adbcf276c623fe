"""Tests for mocosfl.sfl.clients: the stacked/vmapped client path equals a per-client loop of plain modules."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mocosfl.models.resnet import MIN_GROUP_CHANNELS, build_split_model
from mocosfl.sfl import clients as C

M, B, WIDTH, SIZE = 4, 2, 4, 8
TOL = dict(rtol=1e-5, atol=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    # float32 gradients summed in a different order: tolerance relative to the tensor's scale.
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=msg)


def _setup(cut: int, seed: int = 0, width: int = WIDTH) -> tuple[nn.Module, C.Params, list[nn.Module], torch.Tensor]:
    """Template module, stacked params whose clients all differ, equal per-client module copies, inputs."""
    torch.manual_seed(seed)
    module, _ = build_split_model(width, cut, gn_channels_per_group=4)
    stacked = C.stack(C.module_params(module), M)
    with torch.no_grad():
        for v in stacked.values():
            v.add_(0.2 * torch.randn_like(v))  # clients must differ or mixing them up goes unnoticed
    models = []
    for i in range(M):
        mi = copy.deepcopy(module)
        mi.load_state_dict({k: v[i].clone() for k, v in stacked.items()})
        models.append(mi)
    x = torch.randn(M, B, 3, SIZE, SIZE)
    return module, stacked, models, x


def _mixing_loss_weights(out_shape: torch.Size, seed: int) -> torch.Tensor:
    return torch.randn(out_shape, generator=torch.Generator().manual_seed(seed))


def _batched_grads(module: nn.Module, stacked: C.Params, x: torch.Tensor, seed: int) -> C.Params:
    p = {k: v.detach().clone().requires_grad_(True) for k, v in stacked.items()}
    out = C.batched_forward(module, p, x)
    loss = (_mixing_loss_weights(out.shape, seed) * out.pow(2)).mean()
    names = list(p)
    grads = torch.autograd.grad(loss, [p[k] for k in names])
    return dict(zip(names, grads, strict=True))


def _loop_backward(models: list[nn.Module], x: torch.Tensor, seed: int) -> None:
    outs = torch.stack([m(x[i]) for i, m in enumerate(models)])
    # One loss over all clients, like the server's loss over the concatenated batch.
    loss = (_mixing_loss_weights(outs.shape, seed) * outs.pow(2)).mean()
    loss.backward()


# ---------------------------------------------------------------- forward and gradients


# Width 4: every client convolution has < MIN_GROUP_CHANNELS inputs and runs zero-padded; width 8:
# only the stem does, the 8 -> 8 convolutions run as they are.
CASES = [(1, 4), (3, 4), (5, 4), (3, MIN_GROUP_CHANNELS)]


@pytest.mark.parametrize(("cut", "width"), CASES)
def test_batched_forward_equals_loop(cut: int, width: int) -> None:
    module, stacked, models, x = _setup(cut, width=width)
    out = C.batched_forward(module, stacked, x)
    assert out.shape == (M, B, width, SIZE, SIZE)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(x[i]), **TOL)


def test_batched_forward_uses_each_clients_own_weights() -> None:
    module, stacked, _, x = _setup(1)
    x = x[:1].expand(M, *x.shape[1:])  # same input everywhere
    out = C.batched_forward(module, stacked, x)
    for i in range(1, M):
        assert not torch.allclose(out[0], out[i])


@pytest.mark.parametrize(("cut", "width"), CASES)
def test_batched_gradients_equal_loop(cut: int, width: int) -> None:
    module, stacked, models, x = _setup(cut, width=width)
    grads = _batched_grads(module, stacked, x, seed=5)
    _loop_backward(models, x, seed=5)
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            _assert_grad_close(grads[name][i], p.grad, msg=f"{name} client {i}")


def test_only_stackable_layers_run_stacked() -> None:
    module, _, _, _ = _setup(3)
    C.check_stackable(module)  # the split ResNet's client models are
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    with pytest.raises(ValueError, match=r"client layer '0' \(Conv2d\) cannot run stacked"):
        C.check_stackable(plain)


# ---------------------------------------------------------------- SGD


@pytest.mark.parametrize("cut", [1, 3])
def test_sgd_two_steps_equal_torch_sgd_per_client(cut: int) -> None:
    lr, mom, wd = 0.05, 0.9, 5e-4
    module, stacked, models, x = _setup(cut)
    p = {k: v.clone() for k, v in stacked.items()}
    buf = C.zeros_like(p)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=mom, weight_decay=wd) for m in models]
    for step in range(2):  # the second step is where momentum matters
        grads = _batched_grads(module, p, x, seed=10 + step)
        C.sgd_step(p, grads, buf, lr, mom, wd)
        for opt in opts:
            opt.zero_grad()
        _loop_backward(models, x, seed=10 + step)
        for opt in opts:
            opt.step()
        for i, (m, opt) in enumerate(zip(models, opts, strict=True)):
            for name, q in m.named_parameters():
                torch.testing.assert_close(p[name][i], q.detach(), **TOL, msg=f"step {step} {name} client {i}")
                _assert_grad_close(buf[name][i], opt.state[q]["momentum_buffer"])
    assert not torch.equal(p["0.0.weight"], stacked["0.0.weight"])


def test_sgd_step_hand_rule() -> None:
    p = {"w": torch.tensor([[1.0, -2.0]])}
    g = {"w": torch.tensor([[0.5, 0.5]])}
    buf = {"w": torch.tensor([[0.1, -0.1]])}
    C.sgd_step(p, g, buf, lr=0.1, momentum=0.9, weight_decay=0.01)
    d = torch.tensor([[0.5 + 0.01, 0.5 - 0.02]])
    expected_buf = 0.9 * torch.tensor([[0.1, -0.1]]) + d
    torch.testing.assert_close(buf["w"], expected_buf)
    torch.testing.assert_close(p["w"], torch.tensor([[1.0, -2.0]]) - 0.1 * expected_buf)


# ---------------------------------------------------------------- EMA


def test_ema_update_equals_loop() -> None:
    _, stacked, models, _ = _setup(3)
    target = {k: torch.randn_like(v) for k, v in stacked.items()}
    expected = {k: v.clone() for k, v in target.items()}
    tau = 0.9
    C.ema_update(target, stacked, tau)
    for i, m in enumerate(models):
        for name, q in m.named_parameters():
            expected_i = tau * expected[name][i] + (1 - tau) * q.detach()
            torch.testing.assert_close(target[name][i], expected_i, **TOL)


def test_ema_update_unstacked_and_tau_limits() -> None:
    t = {"w": torch.tensor([1.0, 2.0])}
    C.ema_update(t, {"w": torch.tensor([3.0, 6.0])}, 0.75)
    torch.testing.assert_close(t["w"], torch.tensor([1.5, 3.0]))
    C.ema_update(t, {"w": torch.tensor([9.0, 9.0])}, 0.0)
    torch.testing.assert_close(t["w"], torch.tensor([9.0, 9.0]))


# ---------------------------------------------------------------- FedAvg


def test_fedavg_weighted_equals_loop() -> None:
    _, stacked, _, _ = _setup(3)
    weights = torch.tensor([1.0, 3.0, 0.5, 2.5])
    avg = C.fedavg(stacked, weights)
    for name, v in stacked.items():
        expected = torch.zeros_like(v[0], dtype=torch.float64)
        for i in range(M):
            expected += float(weights[i]) * v[i].double()
        expected /= float(weights.sum())
        assert avg[name].shape == v.shape[1:]
        assert avg[name].dtype == v.dtype
        torch.testing.assert_close(avg[name], expected.float(), **TOL)


def test_fedavg_uniform_equals_mean() -> None:
    _, stacked, _, _ = _setup(1)
    avg = C.fedavg(stacked, torch.ones(M))
    for name, v in stacked.items():
        torch.testing.assert_close(avg[name], v.mean(dim=0), **TOL)


def test_fedavg_counts_every_client_once() -> None:
    # One client at 1, the rest at 0: a correct mean is 1/M (the reference's double count gives 2/(M+1)).
    for i in range(M):
        v = torch.zeros(M, 3)
        v[i] = 1.0
        avg = C.fedavg({"w": v}, torch.ones(M))
        torch.testing.assert_close(avg["w"], torch.full((3,), 1.0 / M))


def test_fedavg_one_hot_weights_select_a_client() -> None:
    _, stacked, _, _ = _setup(1)
    avg = C.fedavg(stacked, torch.tensor([0.0, 0.0, 7.0, 0.0]))
    for name, v in stacked.items():
        torch.testing.assert_close(avg[name], v[2], **TOL)


# ---------------------------------------------------------------- helpers and the state bank


def test_stack_copies_and_broadcasts() -> None:
    params = {"w": torch.arange(6.0).view(2, 3)}
    s = C.stack(params, 3)
    assert s["w"].shape == (3, 2, 3)
    s["w"][0].zero_()  # must not write through to the other clients or the source
    assert torch.equal(s["w"][1], params["w"]) and torch.equal(params["w"], torch.arange(6.0).view(2, 3))


def test_module_params_rejects_buffers_and_detaches() -> None:
    with pytest.raises(ValueError, match="buffers"):
        C.module_params(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    lin = nn.Linear(2, 2)
    p = C.module_params(lin)
    assert set(p) == {"weight", "bias"} and not p["weight"].requires_grad
    p["weight"].zero_()
    assert lin.weight.abs().sum() > 0


def test_nbytes() -> None:
    assert C.nbytes({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float64)}) == 12 * 4 + 5 * 8


def test_state_bank_gather_scatter_roundtrip() -> None:
    template = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    n = 6
    bank = C.ClientStateBank(template, n, fill="copy")
    for k, v in template.items():
        assert bank.tensors[k].shape == (n, *v.shape)
        for i in range(n):
            assert torch.equal(bank.tensors[k][i], v)
    ids = torch.tensor([4, 1])
    values = {k: torch.randn(2, *v.shape) for k, v in template.items()}
    bank.scatter(ids, values)
    got = bank.gather(ids)
    for k in template:
        assert torch.equal(got[k], values[k])
        for i in (0, 2, 3, 5):
            assert torch.equal(bank.tensors[k][i], template[k])
    got["w"].add_(1.0)  # gather hands out a copy
    assert torch.equal(bank.tensors["w"][4], values["w"][0])


def test_state_bank_zeros() -> None:
    bank = C.ClientStateBank({"w": torch.randn(2, 2)}, 5)
    assert torch.equal(bank.tensors["w"], torch.zeros(5, 2, 2))
    bank.scatter(torch.tensor([3]), {"w": torch.ones(1, 2, 2)})
    assert bank.tensors["w"].sum() == 4 and bank.tensors["w"][3].sum() == 4


def test_state_bank_is_one_block_that_round_trips_through_a_file(tmp_path) -> None:
    template = {"w": torch.randn(2, 3), "b": torch.randn(3)}
    bank = C.ClientStateBank(template, 4, fill="copy")
    assert bank.flat.shape == (4, 9) and bank.nbytes == 4 * 9 * 4
    bank.scatter(torch.tensor([2]), {"w": torch.ones(1, 2, 3), "b": torch.zeros(1, 3)})
    bank.save(tmp_path / "bank.npy")
    other = C.ClientStateBank(template, 4)
    other.load_(tmp_path / "bank.npy")
    assert torch.equal(other.flat, bank.flat)
    with pytest.raises(ValueError, match="expected"):
        C.ClientStateBank(template, 5).load_(tmp_path / "bank.npy")  # another N


def test_bfloat16_state_bank_halves_memory_and_hands_out_float32(tmp_path) -> None:
    template = {"w": torch.randn(2, 3)}
    bank = C.ClientStateBank(template, 4, fill="copy", storage_dtype=torch.bfloat16)
    assert bank.flat.dtype == torch.bfloat16 and bank.nbytes == 4 * 6 * 2
    got = bank.gather(torch.tensor([1, 3]))["w"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[0], template["w"], rtol=1 / 128, atol=0)  # bfloat16: 8 significant bits
    torch.testing.assert_close(got[0], template["w"].bfloat16().float(), rtol=0, atol=0)
    bank.save(tmp_path / "bank.npy")  # numpy has no bfloat16: stored as its int16 bits
    other = C.ClientStateBank(template, 4, storage_dtype=torch.bfloat16)
    other.load_(tmp_path / "bank.npy")
    assert torch.equal(other.flat, bank.flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_file_backed_state_bank_behaves_like_the_in_memory_one(tmp_path, dtype: torch.dtype) -> None:
    template = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    ram = C.ClientStateBank(template, 50, fill="copy", storage_dtype=dtype)
    disk = C.ClientStateBank(template, 50, fill="copy", storage_dtype=dtype, file_dir=tmp_path / "scratch")
    assert list((tmp_path / "scratch").iterdir()) == []  # the scratch file is unlinked at once
    assert torch.equal(disk.flat, ram.flat) and disk.nbytes == ram.nbytes
    for r in range(3):
        ids = torch.randperm(50, generator=torch.Generator().manual_seed(r))[:7]
        values = {k: torch.randn(7, *v.shape) for k, v in template.items()}
        ram.scatter(ids, values)
        disk.scatter(ids, values)
        for k in template:
            assert torch.equal(disk.gather(ids)[k], ram.gather(ids)[k])
    assert torch.equal(disk.flat, ram.flat)
    disk.save(tmp_path / "bank.npy")
    again = C.ClientStateBank(template, 50, storage_dtype=dtype, file_dir=tmp_path / "scratch")
    again.load_(tmp_path / "bank.npy")
    assert torch.equal(again.flat, ram.flat)
    again.load_(C.ClientStateBank(template, 50, storage_dtype=dtype))  # from another bank: zeros
    assert not again.flat.any()
