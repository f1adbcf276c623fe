"""Baselines on tiny synthetic images: FL-MoCo's stacked round equals a per-client loop, FedAvg of full models,
centralized batches without replacement, exact resume of both, and client FLOPs / bytes against a hand count."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, vmap

from mocosfl.baselines.central import CentralTrainer
from mocosfl.baselines.flmoco import FLMocoTrainer, build_full_model
from mocosfl.checkpoints import load_latest_checkpoint, save_checkpoint
from mocosfl.config import Config, load_config
from mocosfl.costs import count_flops, flmoco_client_flops, mocosfl_client_flops
from mocosfl.data.partition import partition_indices
from mocosfl.models.resnet import MIN_GROUP_CHANNELS, WSConv2d, count_params
from mocosfl.seeding import Stream, torch_generator
from mocosfl.sfl import clients as C
from mocosfl.sfl.loop import sample_participants
from mocosfl.sfl.server import ema_update_module
from mocosfl.sfl.trainer import MocoSFLTrainer, TrainLoop, cosine_lr, moco_loss

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
N_IMG, SIZE, N = 200, 16, 8
IMAGES = np.random.default_rng(0).integers(0, 256, (N_IMG, SIZE, SIZE, 3), dtype=np.uint8)
LABELS = np.repeat(np.arange(10), N_IMG // 10)
SHARDS = partition_indices(LABELS, "noniid-shards", N, seed=0)  # 8 clients x 24 images

pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(**over) -> Config:
    # test profile: width 8, proj 64 -> 32, b = 2, sync_period 3, queue 128, 8 steps. Unless a test says
    # otherwise, participants are re-sampled at every sync (sampling round = sync period).
    base = {"data.image_size": SIZE, "partition.num_clients": N, "sfl.sample_period": over.get("sfl.sync_period", 3)}
    return load_config(PARAMS, "test").replace(**{**base, **over})


def clone(params: C.Params) -> C.Params:
    return {k: v.detach().clone() for k, v in params.items()}


def roundtrip(state: dict) -> dict:
    """Through the real checkpoint files: a weights_only .pt plus one .npy per O(N) bank."""
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), state, keep=1)
        loaded = load_latest_checkpoint(Path(tmp))
        assert loaded is not None
        for name, value in loaded.items():  # read the banks before the folder goes
            if name.endswith("_bank"):
                loaded[name] = torch.from_numpy(np.load(value)).view(state[name].flat.dtype)
        return loaded


# ---------------------------------------------------------------- FL-MoCo


def loop_client_step(
    cfg: Config,
    p: C.Params,
    t: C.Params,
    mom: C.Params,
    queue: torch.Tensor,
    ptr: int,
    view1: torch.Tensor,
    view2: torch.Tensor,
    lr: float,
) -> tuple[C.Params, C.Params, torch.Tensor, float]:
    """One client's step the plain way: its own nn.Module, torch.optim.SGD, EMA, FIFO queue."""
    pc, mc = cfg.pretrain, cfg.moco
    model = build_full_model(cfg)
    model.load_state_dict(p)
    target = copy.deepcopy(model).requires_grad_(False)
    target.load_state_dict(t)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=pc.momentum, weight_decay=pc.weight_decay)
    for name, param in model.named_parameters():
        opt.state[param]["momentum_buffer"] = mom[name].clone()
    loss, keys = moco_loss(model, target, view1, view2, queue.clone(), mc.temperature, mc.symmetric)
    opt.zero_grad()
    loss.backward()
    opt.step()
    ema_update_module(target, model, mc.ema)
    queue = queue.clone()
    queue[(ptr + torch.arange(len(keys))) % len(queue)] = keys
    return clone(dict(model.named_parameters())), clone(dict(target.named_parameters())), queue, loss.item()


def test_flmoco_round_equals_per_client_loop() -> None:
    """Every step of a stacked (vmap) round == each participant stepping its own module; the sync is their mean.

    Compared step by step from the same state: a whole round can amplify float rounding ~1e5x through a
    near-degenerate GroupNorm group of a freshly initialised net on noise images.
    """
    cfg = make_cfg(**{"sfl.clients_per_round": 3, "sfl.sync_period": 3, "pretrain.steps": 6})
    tr = FLMocoTrainer(cfg, IMAGES, SHARDS, MEAN, STD)
    tr.begin_round(0)
    assert tr.queue is not None
    for s in range(3):
        before = {
            "p": clone(tr.p),
            "t": clone(tr.t),
            "mom": clone(tr.mom),
            "q": tr.queue.keys.clone(),
            "ptr": tr.queue.ptr.clone(),
        }
        view1, view2 = tr.step_views()
        lr = cosine_lr(cfg.pretrain.lr, tr.step, tr.plan.total_steps)
        loss = tr.train_step()
        tr.step += 1
        loop_losses = []
        for i in range(3):
            p, t, q, client_loss = loop_client_step(
                cfg,
                {k: v[i] for k, v in before["p"].items()},
                {k: v[i] for k, v in before["t"].items()},
                {k: v[i] for k, v in before["mom"].items()},
                before["q"][i],
                int(before["ptr"][i]),
                view1[i],
                view2[i],
                lr,
            )
            loop_losses.append(client_loss)
            for name in p:
                torch.testing.assert_close(tr.p[name][i], p[name], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(tr.t[name][i], t[name], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(tr.queue.keys[i], q, rtol=1e-4, atol=1e-5)
        assert loss == pytest.approx(float(np.mean(loop_losses)), rel=1e-4)
        if s == 0:
            assert not torch.equal(tr.p["head.0.weight"][0], tr.p["head.0.weight"][1])  # clients diverge
    final = clone(tr.p)
    tr.sync(round_continues=False)
    tr.end_round()
    for name, v in final.items():
        torch.testing.assert_close(tr.global_params[name], v.mean(0), rtol=1e-5, atol=1e-6)


def test_flmoco_fedavg_of_full_models_and_bytes() -> None:
    cfg = make_cfg(
        **{"sfl.clients_per_round": 4, "sfl.sync_period": 2, "pretrain.steps": 4, "sfl.fedavg_weights": "shard_size"}
    )
    unequal = np.split(np.arange(N_IMG), np.cumsum([10, 15, 20, 25, 30, 30, 35]))
    tr = FLMocoTrainer(cfg, IMAGES, unequal, MEAN, STD)
    tr.advance()
    tr.advance()  # still open: the sync comes after the step that completes the round
    assert tr.round_ids is None
    tr.begin_round(1)
    ids = tr.round_ids.clone()
    tr.train_step()
    tr.step += 1
    p, t = clone(tr.p), clone(tr.t)
    w = torch.tensor([len(unequal[i]) for i in ids], dtype=torch.float64)
    tr.sync(round_continues=False)
    tr.end_round()
    for name, v in p.items():
        expected = (v.double() * (w / w.sum()).view(-1, *[1] * (v.dim() - 1))).sum(0).float()
        torch.testing.assert_close(tr.global_params[name], expected)
        assert not torch.equal(tr.global_params[name], v[0])
    for name, v in t.items():
        torch.testing.assert_close(
            tr.global_target[name], (v.double() * (w / w.sum()).view(-1, *[1] * (v.dim() - 1))).sum(0).float()
        )
    # Two rounds, 4 participants: the full model and its target go down at the start and up at the end.
    full = 4 * count_params(build_full_model(cfg))
    assert tr.bytes_down == tr.bytes_up == 2 * 4 * (2 * full)
    assert tr.summary()["client_params"] == full // 4


def test_flmoco_local_queues_live_with_their_clients() -> None:
    cfg = make_cfg(**{"sfl.clients_per_round": 6, "pretrain.steps": 9})
    tr = FLMocoTrainer(cfg, IMAGES, SHARDS, MEAN, STD)
    assert tr.queue_size == 128 // 6 and (tr.queue_ptr == -1).all()
    for _ in range(3):
        tr.advance()
    assert tr.round_ids is None and tr.queue is None
    ids0 = tr.round_ids if tr.round_ids is not None else torch.from_numpy(sample_participants(tr.plan, cfg.seed, 0))
    others = [i for i in range(N) if i not in ids0.tolist()]
    assert (tr.queue_ptr[ids0] == (3 * 2 * 2) % tr.queue_size).all()  # 3 steps x 2 terms x b=2 keys each
    assert (tr.queue_ptr[others] == -1).all()
    kept = tr.queue_bank.tensors["keys"]
    tr.begin_round(1)
    ids1 = tr.round_ids.tolist()
    assert any(i in ids0.tolist() for i in ids1) and any(i in others for i in ids1)
    for j, i in enumerate(ids1):
        if i in ids0.tolist():  # its own queue, where it left it
            assert torch.equal(tr.queue.keys[j], kept[i]) and tr.queue.ptr[j] == tr.queue_ptr[i]
        else:  # first time: random unit keys seeded by the client's id, written from slot 0
            fresh = torch.randn(tr.queue_size, 32, generator=torch_generator(cfg.seed, Stream.FLMOCO_QUEUE, i))
            torch.testing.assert_close(tr.queue.keys[j], torch.nn.functional.normalize(fresh, dim=1))
            assert tr.queue.ptr[j] == 0


def test_flmoco_same_images_and_participants_as_mocosfl() -> None:
    cfg = make_cfg(**{"sfl.clients_per_round": 3, "pretrain.steps": 4})
    fl, sfl = FLMocoTrainer(cfg, IMAGES, SHARDS, MEAN, STD), MocoSFLTrainer(cfg, IMAGES, SHARDS, MEAN, STD)
    fl.begin_round(0)
    sfl.begin_round(0)
    assert torch.equal(fl.round_ids, sfl.round_ids)
    assert np.array_equal(np.concatenate(fl.order), np.concatenate(sfl.order))
    assert fl.plan == sfl.plan and fl.summary()["images_seen"] == 0


# ---------------------------------------------------------------- centralized


def test_central_batches_cover_the_pool_once_per_epoch() -> None:
    tr = CentralTrainer(make_cfg(), IMAGES, SHARDS, MEAN, STD)
    batch, pool = tr.plan.batch_size, np.sort(np.concatenate(SHARDS))
    assert batch == N * 2 and len(pool) % batch == 0
    steps = len(pool) // batch
    epoch0 = np.concatenate([tr.batch_indices(s) for s in range(steps)])
    epoch1 = np.concatenate([tr.batch_indices(s) for s in range(steps, 2 * steps)])
    assert np.array_equal(np.sort(epoch0), pool) and np.array_equal(np.sort(epoch1), pool)
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(tr.batch_indices(3), CentralTrainer(make_cfg(), IMAGES, SHARDS, MEAN, STD).batch_indices(3))


def test_central_trains_the_encoder_it_exports() -> None:
    tr = CentralTrainer(make_cfg(**{"pretrain.steps": 3}), IMAGES, SHARDS, MEAN, STD)
    before = copy.deepcopy(tr.encoder().state_dict())
    tr.run()
    s = tr.summary()
    assert s["images_seen"] == 3 * N * 2 and s["bytes_per_client"] is None and tr.step == 3
    after = tr.encoder().state_dict()
    assert set(before) == set(after) and any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cls", [CentralTrainer, FLMocoTrainer])
def test_resume_mid_run_is_exact(cls: type[TrainLoop]) -> None:
    cfg = make_cfg(**{"pretrain.steps": 5, "sfl.clients_per_round": 3, "pretrain.knn_every": 2})
    straight = cls(cfg, IMAGES, SHARDS, MEAN, STD)  # type: ignore[call-arg]
    straight.run()
    first = cls(cfg, IMAGES, SHARDS, MEAN, STD)  # type: ignore[call-arg]
    for _ in range(2):  # step 2 is mid-round for FL-MoCo (sync period 3)
        first.advance()
    resumed = cls(cfg, IMAGES, SHARDS, MEAN, STD)  # type: ignore[call-arg]
    resumed.load_state_dict(roundtrip(first.state_dict()))
    resumed.run()
    a, b = straight.encoder().state_dict(), resumed.encoder().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- cost accounting


def test_cut1_client_flops_and_bytes_match_a_hand_count() -> None:
    """Cut 1 = conv 3->w 3x3 on SxS (+ GroupNorm, ReLU): 9*3*w*S*S multiply-accumulates per image."""
    w, s, b, m, steps = 8, SIZE, 2, N, 3
    cfg = make_cfg(**{"model.width": w, "model.cut_layers": 1, "pretrain.steps": steps})
    macs = 9 * 3 * w * s * s
    # online forward + target forward + backward for the weight gradient only (images need no gradient)
    assert mocosfl_client_flops(cfg, b) == 3 * 2 * macs

    tr = MocoSFLTrainer(cfg, IMAGES, SHARDS, MEAN, STD)
    assert (tr.plan.clients_per_round, tr.plan.client_batch_size, tr.plan.sync_period) == (m, b, 3)
    params = 9 * 3 * w + 2 * w  # conv weight (no bias) + GroupNorm weight and bias
    assert count_params(tr.client_module) == params
    tr.run()  # one round of 3 steps
    smashed = 4 * w * s * s  # bytes of one float32 [w, S, S] tensor
    model_and_target = 2 * 4 * params
    assert tr.bytes_up == steps * m * b * 2 * smashed + m * model_and_target  # h_q, h_k up; sync up
    assert tr.bytes_down == steps * m * b * smashed + m * model_and_target  # gradient down; models down


def test_flmoco_client_runs_the_whole_network() -> None:
    cfg = make_cfg()
    sfl, fl = mocosfl_client_flops(cfg, 2), flmoco_client_flops(cfg, 2, 16)
    assert fl > 50 * sfl
    assert flmoco_client_flops(cfg, 4, 16) == pytest.approx(fl)  # per image, whatever the batch


@pytest.mark.parametrize("path", ["folded", "vmap"])
def test_stacked_client_convolutions_count_as_many_flops_as_a_loop_over_clients(path: str) -> None:
    """Stacked clients' convolutions are grouped ones (folded for MocoSFL, vmap for FL-MoCo); the
    backward of a grouped convolution must not count G x."""
    torch.manual_seed(0)
    c_in = MIN_GROUP_CHANNELS  # no zero-padding of the groups, so the counts can match exactly
    conv = WSConv2d(c_in, 6, 3, padding=1, bias=False)
    m = 5
    weights = {"weight": conv.weight.detach().unsqueeze(0).repeat(m, 1, 1, 1, 1).requires_grad_(True)}
    x = torch.randn(m, 2, c_in, 8, 8)

    def batched() -> None:
        if path == "folded":
            h = C.batched_forward(conv, weights, x)
        else:
            h = vmap(lambda p, xi: functional_call(conv, p, (xi,)))(weights, x)
        torch.autograd.grad(h.sum(), [weights["weight"]])

    def loop() -> None:
        for i in range(m):
            w = weights["weight"][i].detach().requires_grad_(True)
            h = functional_call(conv, {"weight": w}, (x[i],))
            torch.autograd.grad(h.sum(), [w])

    per_forward = 2 * (2 * 6 * 8 * 8) * c_in * 9  # 2 FLOPs x outputs x (C_in x 3 x 3), per client
    assert count_flops(loop) == m * 2 * per_forward  # forward + weight gradient
    assert count_flops(batched) == count_flops(loop)


@pytest.mark.parametrize("cls", [MocoSFLTrainer, CentralTrainer, FLMocoTrainer])
def test_every_method_trains_with_precision_bf16(cls: type[TrainLoop]) -> None:
    """``pretrain.precision=bf16`` is valid for every method (the results suites run them all at the cpu
    profile's ``auto``); FL-MoCo says it computes in fp32, since its vmap'd forward ignores autocast."""
    tr = cls(make_cfg(**{"pretrain.precision": "bf16", "pretrain.steps": 2}), IMAGES, SHARDS, MEAN, STD)
    tr.run()
    assert tr.step == 2 and np.isfinite(tr.history[-1]["loss_mean"])
    assert tr.precision == ("fp32" if cls is FLMocoTrainer else "bf16")


def test_autocast_is_still_ignored_inside_vmap() -> None:
    """Why FL-MoCo computes in fp32 (``precision.FP32_ONLY_METHODS``): a convolution under bf16 autocast
    inside ``torch.func.vmap`` returns fp32 (torch 2.14). If this fails, torch applies autocast under
    vmap now, and FL-MoCo could run in bf16."""
    w, x = torch.randn(2, 4, 3, 3, 3), torch.randn(2, 1, 3, 8, 8)

    def conv(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.nn.functional.conv2d(x, w)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.conv2d(x[0], w[0]).dtype == torch.bfloat16  # outside vmap it applies
    assert vmap(conv)(w, x).dtype == torch.float32
