"""Tests for MocoSFLTrainer on tiny synthetic images: split training == end-to-end training, rounds and FedAvg,
client state options, determinism, exact resume through a weights_only checkpoint, and divergence."""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mocosfl import workflow
from mocosfl.config import Config, load_config
from mocosfl.data.partition import partition_indices
from mocosfl.eval.knn import extract_features
from mocosfl.sfl import clients as C
from mocosfl.sfl.server import KeyQueue, PerClientQueue
from mocosfl.sfl.trainer import KnnData, MocoSFLTrainer, TrainingDiverged, moco_loss

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
N_IMG, SIZE, N = 200, 16, 8
IMAGES = np.random.default_rng(0).integers(0, 256, (N_IMG, SIZE, SIZE, 3), dtype=np.uint8)
LABELS = np.repeat(np.arange(10), N_IMG // 10)
SHARDS = partition_indices(LABELS, "noniid-shards", N, seed=0)  # 8 clients x 24 images
# Unequal shards, for shard_size weighting.
UNEQUAL = np.split(np.arange(N_IMG), np.cumsum([10, 15, 20, 25, 30, 30, 35]))


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(**over) -> Config:
    # test profile: width 8, proj 64 -> 32, b = 2, sync_period 3, queue 128, 8 steps. Unless a test says
    # otherwise, participants are re-sampled at every sync (sampling round = sync period).
    base = {"data.image_size": SIZE, "partition.num_clients": N, "sfl.sample_period": over.get("sfl.sync_period", 3)}
    return load_config(PARAMS, "test").replace(**{**base, **over})


def make(shards: list[np.ndarray] = SHARDS, knn: KnnData | None = None, **over) -> MocoSFLTrainer:
    return MocoSFLTrainer(make_cfg(**over), IMAGES, shards, MEAN, STD, knn=knn)


def clone(params: C.Params) -> C.Params:
    return {k: v.detach().clone() for k, v in params.items()}


def spy_end_round(tr: MocoSFLTrainer, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the participants' state just before each sync."""
    seen: list[dict] = []
    original = tr.end_round

    def spy() -> None:
        seen.append({"ids": tr.round_ids.clone(), "p": clone(tr.p), "t": clone(tr.t), "mom": clone(tr.mom)})
        original()

    monkeypatch.setattr(tr, "end_round", spy)
    return seen


def spy_sync(tr: MocoSFLTrainer, monkeypatch: pytest.MonkeyPatch) -> list[C.Params]:
    """Record, before each sync, the FedAvg it should produce (``expected_fedavg``)."""
    captured: list[C.Params] = []
    original = tr.sync

    def spy(round_continues: bool = True) -> None:
        captured.append(expected_fedavg(tr))
        original(round_continues)

    monkeypatch.setattr(tr, "sync", spy)
    return captured


TIMING_KEYS = {"train_seconds", "steps_per_s"}  # wall-clock, legitimately differ between runs


def assert_state_equal(a, b, path: str = "") -> None:
    """Bit-identical nested checkpoint dicts (tensors compared exactly, timings skipped)."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in set(a) - TIMING_KEYS:
            assert_state_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_state_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, C.ClientStateBank):
        assert isinstance(b, C.ClientStateBank) and torch.equal(a.flat, b.flat), path
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    else:
        assert a == b, path


# ---------------------------------------------------------------- basics


def test_runs_with_finite_losses() -> None:
    tr = make()
    assert (tr.plan.clients_per_round, tr.plan.client_batch_size, tr.plan.total_steps) == (8, 2, 8)
    rows: list[dict] = []
    tr.run(on_step=rows.append)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert tr.step == 8 and tr.round_ids is None
    assert tr.history and tr.history[-1]["step"] == 8
    s = tr.summary()
    assert s["images_seen"] == 8 * 16 and s["client_params"] == C.nbytes(tr.global_params) // 4


def test_training_changes_all_models() -> None:
    tr = make(**{"pretrain.steps": 3})
    server0, client0 = copy.deepcopy(tr.server.state_dict()), clone(tr.global_params)
    tr.run()
    assert any(not torch.equal(v, server0[k]) for k, v in tr.server.state_dict().items())
    assert all(not torch.equal(v, client0[k]) for k, v in tr.global_params.items())
    assert all(not torch.equal(v, client0[k]) for k, v in tr.global_target.items())


def test_deterministic_given_seed() -> None:
    a, b = make(), make()
    la = [a.advance() for _ in range(5)]
    lb = [b.advance() for _ in range(5)]
    assert la == lb
    assert_state_equal(a.state_dict(), b.state_dict())
    c = make(seed=1)
    assert [c.advance() for _ in range(5)] != la


def test_each_client_trains_on_its_own_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"sfl.clients_per_round": 3})
    seen = []
    original = tr.augment.two_views

    def spy(images, generator):
        seen.append(images.clone())
        return original(images, generator)

    monkeypatch.setattr(tr.augment, "two_views", spy)
    tr.advance()
    ids = tr.round_ids.tolist()
    assert len(ids) == 3 and seen[0].shape == (3 * 2, SIZE, SIZE, 3)
    for i, c in enumerate(ids):
        shard_images = torch.from_numpy(IMAGES[SHARDS[c]])
        for img in seen[0][2 * i : 2 * i + 2]:
            assert (shard_images == img).flatten(1).all(dim=1).any()


# ---------------------------------------------------------------- split step == end-to-end step


def test_two_split_steps_equal_end_to_end_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-client plain modules, backprop straight through server + client, torch SGD everywhere."""
    # The stacked clients' grouped convolutions round differently from per-client ones (~1e-8 after a
    # step). With ReLU, a pre-activation that close to zero lands on the other side of the kink: seen at
    # seed 0 on an avx512 EPYC (one server weight gradient 4.5 % off) and at seed 1 on an AVX2-only one
    # (every server weight up to layer 3 off by up to 1e-2). Both sides use softplus instead, so the
    # comparison is of the split/stacked training itself, which does not depend on the activation.
    monkeypatch.setattr(torch.nn.functional, "relu", lambda x, inplace=False: torch.nn.functional.softplus(x))
    over = {"sfl.clients_per_round": 4, "pretrain.steps": 10, "moco.ema": 0.9}
    tr = make(**over)
    cfg = tr.cfg
    views = []
    original = tr.augment.two_views

    def spy(images, generator):
        v = original(images, generator)
        views.append(v)
        return v

    monkeypatch.setattr(tr.augment, "two_views", spy)

    # Reference state, copied before any step.
    clients = []
    template = copy.deepcopy(tr.client_module)
    template.load_state_dict(tr.global_params)
    server, server_t = copy.deepcopy(tr.server), copy.deepcopy(tr.server_target)
    queue = copy.deepcopy(tr.queue)
    pc = cfg.pretrain
    server_opt = torch.optim.SGD(server.parameters(), lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay)

    for step in range(2):
        loss = tr.advance()
        m, b = 4, 2
        if step == 0:
            clients = [copy.deepcopy(template) for _ in range(m)]
            targets = [copy.deepcopy(template).requires_grad_(False) for _ in range(m)]
            opts = [
                torch.optim.SGD(c.parameters(), lr=pc.lr, momentum=pc.momentum, weight_decay=pc.weight_decay)
                for c in clients
            ]
        v1, v2 = (v.view(m, b, 3, SIZE, SIZE) for v in views[step])
        h_q = torch.cat([clients[i](v1[i]) for i in range(m)])
        with torch.no_grad():
            h_k = torch.cat([targets[i](v2[i]) for i in range(m)])
        ref_loss, keys = moco_loss(server, server_t, h_q, h_k, queue.keys.clone(), cfg.moco.temperature, True)
        lr = pc.lr * 0.5 * (1 + math.cos(math.pi * step / 10))
        for opt in [server_opt, *opts]:
            opt.param_groups[0]["lr"] = lr
            opt.zero_grad()
        ref_loss.backward()
        for opt in [server_opt, *opts]:
            opt.step()
        with torch.no_grad():
            for t, o in zip(server_t.parameters(), server.parameters(), strict=True):
                t.mul_(0.9).add_(0.1 * o)
            for tm, cm in zip(targets, clients, strict=True):
                for t, o in zip(tm.parameters(), cm.parameters(), strict=True):
                    t.mul_(0.9).add_(0.1 * o)
        queue.enqueue(keys)

        assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
        for name, p in server.named_parameters():
            torch.testing.assert_close(dict(tr.server.named_parameters())[name], p, rtol=1e-4, atol=1e-5)
        for i in range(m):
            for name, p in clients[i].named_parameters():
                torch.testing.assert_close(tr.p[name][i].detach(), p.detach(), rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(
                    tr.t[name][i], dict(targets[i].named_parameters())[name], rtol=1e-4, atol=1e-5
                )
        torch.testing.assert_close(tr.queue.keys, queue.keys, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- rounds and FedAvg


def test_sync_averages_participants_and_loads_everyone(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"sfl.clients_per_round": 4})
    seen = spy_end_round(tr, monkeypatch)
    for _ in range(3):
        tr.advance()
    assert len(seen) == 1 and tr.round_ids is None
    p, t = seen[0]["p"], seen[0]["t"]
    assert not torch.equal(p["0.0.weight"][0], p["0.0.weight"][1])  # participants had drifted apart
    for name in p:
        torch.testing.assert_close(tr.global_params[name], p[name].mean(dim=0), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(tr.global_target[name], t[name].mean(dim=0), rtol=1e-6, atol=1e-7)
    tr.begin_round(1)
    assert not torch.equal(tr.round_ids, seen[0]["ids"])  # re-sampled
    for name, v in tr.p.items():
        for i in range(len(tr.round_ids)):
            assert torch.equal(v[i].detach(), tr.global_params[name])
            assert torch.equal(tr.t[name][i], tr.global_target[name])
            assert not tr.mom[name][i].any()  # stateless clients


def test_sync_weights_by_shard_size(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(shards=UNEQUAL, **{"sfl.fedavg_weights": "shard_size"})
    seen = spy_end_round(tr, monkeypatch)
    for _ in range(3):
        tr.advance()
    w = np.array([len(s) for s in UNEQUAL], dtype=np.float64)
    w /= w.sum()
    for name, v in seen[0]["p"].items():
        expected = sum(float(w[i]) * v[i].double() for i in range(N)).float()
        torch.testing.assert_close(tr.global_params[name], expected, rtol=1e-6, atol=1e-7)


def test_mid_round_client_params_are_what_a_sync_would_give() -> None:
    # current_params() feeds encoder() and the kNN monitor between syncs.
    tr = make(shards=UNEQUAL, **{"sfl.fedavg_weights": "shard_size"})
    tr.advance()
    assert tr.round_ids is not None
    now = clone(tr.current_params())
    tr.sync()
    for name, v in tr.global_params.items():
        torch.testing.assert_close(now[name], v, rtol=1e-6, atol=1e-7)


def test_sync_now_syncs_the_open_round_or_opens_one() -> None:
    # The bench times syncs through this public API instead of the round internals.
    tr = make(**{"sfl.clients_per_round": 4})
    tr.advance()
    assert tr.round_open and not tr.synced_last_step
    trained = clone(tr.p)
    assert tr.sync_now() == tr.last_sync_seconds >= 0.0
    assert tr.round_open and tr.step == 1  # the participants carry on from the synced model
    for name, v in trained.items():
        torch.testing.assert_close(tr.global_params[name], v.mean(dim=0), rtol=1e-6, atol=1e-7)
        assert all(torch.equal(tr.p[name][i].detach(), tr.global_params[name]) for i in range(4))
    tr.end_round()
    before = clone(tr.global_params)
    tr.sync_now()  # no round open: round 0 is opened again and synced untrained
    for name, v in before.items():
        torch.testing.assert_close(tr.global_params[name], v, rtol=1e-6, atol=1e-7)


def test_last_round_may_be_short(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"pretrain.steps": 4})
    seen = spy_end_round(tr, monkeypatch)
    tr.run()
    assert len(seen) == 2 and tr.round_ids is None and tr.step == 4


def test_unsynced_targets_stay_per_client(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"sfl.clients_per_round": 4, "sfl.sync_targets": False})
    init = clone(tr.global_params)
    seen = spy_end_round(tr, monkeypatch)
    for _ in range(3):
        tr.advance()
    ids, t = seen[0]["ids"], seen[0]["t"]
    others = [i for i in range(N) if i not in ids.tolist()]
    bank = tr.target_bank.tensors
    for name in init:
        assert torch.equal(bank[name][ids], t[name])
        assert not torch.equal(bank[name][ids[0]], bank[name][ids[1]])
        for i in others:
            assert torch.equal(bank[name][i], init[name])
        assert torch.equal(tr.global_target[name], init[name])  # never averaged
    # The next round's participants start from their own targets.
    tr.begin_round(1)
    for name in init:
        assert torch.equal(tr.t[name], bank[name][tr.round_ids])


def test_stateful_clients_keep_momentum(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"sfl.clients_per_round": 4, "sfl.stateful_clients": True})
    seen = spy_end_round(tr, monkeypatch)
    for _ in range(3):
        tr.advance()
    ids = seen[0]["ids"]
    others = [i for i in range(N) if i not in ids.tolist()]
    bank = tr.momentum_bank.tensors
    assert tr.summary()["client_state_mb"] == N * C.nbytes(tr.global_params) / 2**20  # N x client params
    for name, v in bank.items():
        assert torch.equal(v[ids], seen[0]["mom"][name])
        assert all(v[i].abs().sum() > 0 for i in ids)
        assert not v[others].any()
    tr.begin_round(1)
    for name in bank:
        assert torch.equal(tr.mom[name], bank[name][tr.round_ids])
    assert any(tr.mom[name].any() for name in bank)  # some of round 1's clients were in round 0


def test_stateless_clients_have_no_bank() -> None:
    tr = make()
    assert tr.momentum_bank is None and tr.target_bank is None and tr.summary()["client_state_mb"] == 0
    assert isinstance(tr.queue, KeyQueue)


def test_without_feature_sharing_each_client_has_its_own_queue() -> None:
    tr = make(**{"sfl.clients_per_round": 4, "moco.feature_sharing": False})
    assert isinstance(tr.queue, PerClientQueue)
    assert tr.queue.keys.shape == (N, 128 // 4, 32)
    init = tr.queue.keys.clone()
    losses = [tr.advance() for _ in range(2)]
    assert all(math.isfinite(x) for x in losses)
    ids = tr.round_ids
    others = [i for i in range(N) if i not in ids.tolist()]
    # Two steps x (2 loss terms x b = 2) keys per participant.
    assert tr.queue.ptr[ids].tolist() == [8] * 4
    assert not tr.queue.ptr[others].any()
    assert torch.equal(tr.queue.keys[others], init[others])
    assert torch.equal(tr.queue.keys[ids, 8:], init[ids, 8:])
    assert not torch.isclose(tr.queue.keys[ids, :8], init[ids, :8]).all(dim=-1).any()
    torch.testing.assert_close(tr.queue.keys[ids, :8].norm(dim=2), torch.ones(4, 8))


def test_asymmetric_loss_runs() -> None:
    tr = make(**{"moco.symmetric": False, "pretrain.steps": 2})
    ptr0 = tr.queue.ptr
    assert all(math.isfinite(tr.advance()) for _ in range(2))
    assert tr.queue.ptr == ptr0 + 2 * 16  # B keys per step, not 2B


# ---------------------------------------------------------------- checkpoints


def roundtrip(state: dict, directory: Path) -> dict:
    """Through the real checkpoint files: a weights_only .pt plus one .npy per O(N) bank."""
    workflow.save_checkpoint(directory, state, keep=2)
    loaded = workflow.load_latest_checkpoint(directory)
    assert loaded is not None
    return loaded


VARIANTS = {
    "default": {},
    "sampled+stateful+unsynced+private-queues": {
        "sfl.clients_per_round": 4,
        "sfl.stateful_clients": True,
        "sfl.sync_targets": False,
        "moco.feature_sharing": False,
    },
    "stateful+unsynced, bfloat16 state in a file": {
        "sfl.clients_per_round": 4,
        "sfl.stateful_clients": True,
        "sfl.sync_targets": False,
        "sfl.client_state_dtype": "bfloat16",
        "sfl.client_state_storage": "file",
    },
    "rounds of 3 ending between syncs every 5": {
        "sfl.clients_per_round": 4,
        "sfl.sync_period": 5,
        "sfl.sample_period": 3,
    },
}
BANKS = {
    "sampled+stateful+unsynced+private-queues": ["momentum_bank", "target_bank"],
    "stateful+unsynced, bfloat16 state in a file": ["momentum_bank", "target_bank"],
    "rounds of 3 ending between syncs every 5": ["unsynced_bank"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("stop", [4, 6], ids=["mid-round", "round-boundary"])
def test_resume_is_bit_identical(variant: str, stop: int, tmp_path: Path) -> None:
    over = VARIANTS[variant]
    full = make(**over)
    full_losses = [full.advance() for _ in range(8)]

    first = make(**over)
    assert [first.advance() for _ in range(stop)] == full_losses[:stop]
    assert (first.round_ids is not None) == (stop % 3 != 0)
    state = roundtrip(first.state_dict(), tmp_path)
    del first
    banks = sorted(p.name.split(".")[1] for p in tmp_path.glob("*.npy"))
    assert banks == BANKS.get(variant, [])

    resumed = make(**over)
    resumed.load_state_dict(state)
    assert resumed.step == stop
    assert [resumed.advance() for _ in range(8 - stop)] == full_losses[stop:]
    assert_state_equal(resumed.state_dict(), full.state_dict())


STATEFUL = VARIANTS["sampled+stateful+unsynced+private-queues"]


def test_large_banks_keep_only_the_newest_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**STATEFUL)
    for _ in range(2):
        tr.advance()
        workflow.save_checkpoint(tmp_path, tr.state_dict(), keep=3)
    assert len(list(tmp_path.glob("*.pt"))) == 2 and len(list(tmp_path.glob("*.npy"))) == 4
    # The checkpoint code lives where workflow's save_checkpoint comes from.
    monkeypatch.setattr(importlib.import_module(workflow.save_checkpoint.__module__), "LARGE_CHECKPOINT_BYTES", 1)
    tr.advance()
    workflow.save_checkpoint(tmp_path, tr.state_dict(), keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000003.momentum_bank.npy",
        "ckpt-000000003.pt",
        "ckpt-000000003.target_bank.npy",
    ]


def test_checkpoint_with_a_missing_or_short_bank_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    tr = make(**STATEFUL)
    tr.advance()
    workflow.save_checkpoint(tmp_path, tr.state_dict(), keep=5)
    tr.advance()
    workflow.save_checkpoint(tmp_path, tr.state_dict(), keep=5)
    short = tmp_path / "ckpt-000000002.momentum_bank.npy"
    short.write_bytes(short.read_bytes()[:-8])
    assert workflow.load_latest_checkpoint(tmp_path)["step"] == 1
    assert "skipping unreadable checkpoint" in capsys.readouterr().out + caplog.text  # printed or logged
    (tmp_path / "ckpt-000000001.target_bank.npy").unlink()
    assert workflow.load_latest_checkpoint(tmp_path) is None


def test_orphan_banks_of_a_killed_save_are_removed(tmp_path: Path) -> None:
    tr = make(**STATEFUL)
    tr.advance()
    orphan = tmp_path / "ckpt-000000009.momentum_bank.npy"
    tmp_path.mkdir(exist_ok=True)
    orphan.write_bytes(b"half written")
    workflow.save_checkpoint(tmp_path, tr.state_dict(), keep=2)
    assert not orphan.exists()
    assert workflow.load_latest_checkpoint(tmp_path)["step"] == 1


# ---------------------------------------------------------------- monitor and divergence


def test_knn_monitor_runs_every_knn_every_steps_whatever_the_history_period() -> None:
    """60 steps keep a history row every 2 (~50 per run); kNN every 25 steps still runs at 25 and 50, not only at
    the last step (the tuning pruner and the report's curves read these)."""
    knn = KnnData(IMAGES[:40], torch.from_numpy(LABELS[:40]), IMAGES[40:60], torch.from_numpy(LABELS[40:60]), 10)
    tr = make(knn=knn, **{"pretrain.steps": 60, "pretrain.knn_every": 25})
    tr.run()
    assert [h["step"] for h in tr.history if "knn_top1" in h] == [25, 50, 60]
    assert [h["step"] for h in tr.history][:3] == [2, 4, 6]


def test_knn_monitor_and_encoder() -> None:
    knn = KnnData(IMAGES[:60], torch.from_numpy(LABELS[:60]), IMAGES[60:80], torch.from_numpy(LABELS[60:80]), 10)
    tr = make(knn=knn, **{"pretrain.steps": 4})
    tr.run()
    assert [h["step"] for h in tr.history if "knn_top1" in h] == [4]
    acc = tr.history[-1]["knn_top1"]
    assert 0.0 <= acc <= 100.0 and acc == tr.knn_monitor()
    enc = tr.encoder()
    for name, v in enc.client.named_parameters():
        assert torch.equal(v, tr.global_params[name])
    f = extract_features(enc, IMAGES[:4], MEAN, STD, SIZE)
    assert f.shape == (4, 8 * 8)
    assert isinstance(enc.backbone, nn.Module) and enc.backbone is not tr.server.backbone


def test_nan_loss_raises_training_diverged() -> None:
    tr = make(**{"pretrain.lr": 1e30})
    with pytest.raises(TrainingDiverged, match="lower pretrain.lr"):
        for _ in range(8):
            tr.advance()
    assert tr.step < 8


# ---------------------------------------------------------------- sampling rounds vs syncs


def test_plan_sample_period_auto_and_never_sync() -> None:
    tr = make(**{"sfl.sample_period": "auto", "sfl.sync_period": "never"})
    assert tr.plan.sample_period == 12  # one pass over a 24-image shard at b = 2
    assert tr.plan.sync_period is None and tr.summary()["sync_period"] is None


def expected_fedavg(tr: MocoSFLTrainer) -> C.Params:
    """FedAvg by hand of every client trained since the last sync, weighted by its steps since then."""
    live = tr.round_ids.tolist() if tr.round_ids is not None else []
    models: dict[int, C.Params] = {i: {k: v[j].detach() for k, v in tr.p.items()} for j, i in enumerate(live)}
    bank = tr.unsynced_bank.tensors if tr.unsynced_bank is not None else {}
    for i in np.flatnonzero(tr.steps_since_sync):
        if int(i) not in models:
            models[int(i)] = {k: bank[f"p.{k}"][i] for k in tr.global_params}
    w = {i: float(tr.steps_since_sync[i]) for i in models}
    total = sum(w.values())
    return {k: sum(w[i] / total * m[k].double() for i, m in models.items()).float() for k in tr.global_params}


def test_clients_leaving_unsynced_resume_their_own_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rounds of 2 steps, FedAvg every 6: rounds 0 and 1 end without a sync.
    tr = make(**{"sfl.clients_per_round": 6, "sfl.sample_period": 2, "sfl.sync_period": 6})
    init = clone(tr.global_params)
    seen = spy_end_round(tr, monkeypatch)
    tr.advance()
    tr.advance()
    assert tr.round_ids is None and not tr.synced_last_step and tr.unsynced_bank is not None
    ids0, p0, t0, mom0 = seen[0]["ids"], seen[0]["p"], seen[0]["t"], seen[0]["mom"]
    assert all(torch.equal(tr.global_params[k], init[k]) for k in init)  # no FedAvg yet
    assert set(np.flatnonzero(tr.steps_since_sync).tolist()) == set(ids0.tolist())

    tr.begin_round(1)
    ids1 = tr.round_ids.tolist()
    back = [i for i in ids1 if i in ids0.tolist()]
    assert back and len(back) < len(ids1)  # 6 of 8 twice: some return, some are new
    for j, i in enumerate(ids1):
        for k in init:
            if i in back:  # its own model, target and momentum from round 0
                src = ids0.tolist().index(i)
                assert torch.equal(tr.p[k][j].detach(), p0[k][src])
                assert torch.equal(tr.t[k][j], t0[k][src]) and torch.equal(tr.mom[k][j], mom0[k][src])
            else:
                assert torch.equal(tr.p[k][j].detach(), init[k]) and not tr.mom[k][j].any()

    # The sync at step 6 averages round 2's participants and everyone still away with a newer model.
    captured = spy_sync(tr, monkeypatch)
    while tr.step < 6:
        tr.advance()
    assert len(captured) == 1 and tr.synced_last_step and not tr.steps_since_sync.any()
    for k, v in captured[0].items():
        torch.testing.assert_close(tr.global_params[k], v, rtol=1e-6, atol=1e-7)
    tr.begin_round(3)  # after a sync everyone starts from the global model
    for k, v in tr.p.items():
        assert all(torch.equal(v[j].detach(), tr.global_params[k]) for j in range(len(tr.round_ids)))


def test_never_sync_evaluates_the_fedavg_of_every_trained_client(monkeypatch: pytest.MonkeyPatch) -> None:
    tr = make(**{"sfl.clients_per_round": 3, "sfl.sample_period": 2, "sfl.sync_period": "never"})
    init = clone(tr.global_params)
    captured = spy_sync(tr, monkeypatch)
    tr.run()
    assert len(captured) == 1  # only after the last step
    trained = {int(c) for r in range(4) for c in C_sample(tr, r)}
    assert tr.summary()["distinct_clients"] == len(trained) > 3
    for k, v in captured[0].items():
        torch.testing.assert_close(tr.global_params[k], v, rtol=1e-6, atol=1e-7)
        assert not torch.equal(tr.global_params[k], init[k])


def C_sample(tr: MocoSFLTrainer, r: int) -> np.ndarray:
    from mocosfl.sfl.loop import sample_participants

    return sample_participants(tr.plan, tr.cfg.seed, r)


def test_distinct_clients_and_images_count_what_was_trained_on() -> None:
    from mocosfl.sfl.loop import round_order, step_samples

    tr = make(**{"sfl.clients_per_round": 3, "sfl.sample_period": 2, "sfl.sync_period": 4})
    tr.run()
    plan, clients, images = tr.plan, set(), set()
    for s in range(plan.total_steps):
        r = s // plan.sample_period
        ids = C_sample(tr, r)
        clients |= set(ids.tolist())
        order = round_order(SHARDS, ids, tr.cfg.seed, r)
        images |= set(step_samples(order, s % plan.sample_period, plan.client_batch_size).tolist())
    s = tr.summary()
    assert (s["distinct_clients"], s["distinct_images"]) == (len(clients), len(images))
    # A client sampled twice re-reads part of its shard, so fewer distinct images than images seen.
    assert len(clients) > plan.clients_per_round and 0 < len(images) <= plan.total_steps * plan.batch_size
