"""The one training loop every method runs: ``TrainLoop`` (steps, history, kNN monitor, checkpoint calls)
and ``RoundLoop`` (rounds of ``sync_period`` steps over sampled participants, then FedAvg).

Randomness is derived from (seed, stream, round) and (seed, stream, step) rather than carried as
generator state (``mocosfl.seeding``), so a run resumed from any checkpoint replays exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mocosfl.config import Config, ConfigError
from mocosfl.data.augment import MocoV2Augment
from mocosfl.eval.knn import extract_features, knn_top1
from mocosfl.models.resnet import Encoder
from mocosfl.precision import resolve_precision
from mocosfl.seeding import Stream, rng, torch_generator
from mocosfl.sfl import clients as C


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the last good checkpoint is left untouched."""


def check_finite(loss: torch.Tensor | float, step: int) -> None:
    """Raise ``TrainingDiverged`` when any element of ``loss`` is NaN or infinite."""
    loss = torch.as_tensor(loss)
    if not torch.isfinite(loss).all():
        raise TrainingDiverged(
            f"loss became {loss.sum().item()} at step {step}; the last good checkpoint is kept — "
            "lower pretrain.lr or check the data"
        )


@dataclass(frozen=True)
class Plan:
    """The numbers a run is made of, after ``auto`` rules and validation."""

    num_clients: int
    clients_per_round: int
    client_batch_size: int
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    sync_period: int


def auto_client_batch_size(num_clients: int) -> int:
    # The reference: total batch 100 split over the clients when there are few, else 1.
    return max(1, 100 // num_clients) if num_clients <= 50 else 1


def auto_clients_per_round(num_clients: int) -> int:
    # The reference samples a fraction 1/(N//100) of the clients when N >= 200 (100-199 of them).
    if num_clients < 200:
        return num_clients
    return int(num_clients / (num_clients // 100))


def resolve_plan(cfg: Config, shard_sizes: np.ndarray) -> Plan:
    n = len(shard_sizes)
    if n != cfg.partition.num_clients:
        raise ConfigError(
            f"the shard index has {n} clients but partition.num_clients={cfg.partition.num_clients}; "
            "run `mocosfl partition` again"
        )
    m = cfg.sfl.clients_per_round
    m = auto_clients_per_round(n) if m == "auto" else m
    if m > n:
        raise ConfigError(f"sfl.clients_per_round={m} is invalid: more than partition.num_clients={n}")
    b = cfg.sfl.client_batch_size
    b = auto_client_batch_size(n) if b == "auto" else b
    smallest = int(shard_sizes.min())
    if smallest < 1:
        raise ConfigError("a client shard is empty; choose another partition")
    if b > smallest:
        raise ConfigError(
            f"sfl.client_batch_size={b} is invalid: larger than the smallest client shard ({smallest} images)"
        )
    batch = m * b
    # One epoch = one pass over the training images in total, which equals the reference's
    # "epochs x 1/ratio" bookkeeping when clients are sampled.
    steps_per_epoch = max(1, math.ceil(int(shard_sizes.sum()) / batch))
    total = cfg.pretrain.steps or cfg.pretrain.epochs * steps_per_epoch
    return Plan(n, m, b, batch, steps_per_epoch, total, cfg.sfl.sync_period)


def maybe_compile(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The module itself, or (``on``) a compiled wrapper sharing its parameters.

    ``auto`` runs eager: measured on a 2-core AMD EPYC (avx512_bf16) on 2026-12-01, a compiled step was
    slower in bf16 (width 16: 0.605 vs 0.337 s; width 64: 3.50 vs 3.03 s) and no faster in fp32
    (6.15 vs 5.97 s), after 70-80 s of compiling. Not measured on CUDA (``make gpu-check`` times it).
    """
    if mode == "on":
        return torch.compile(module)  # type: ignore[return-value]
    return module


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda is invalid: no CUDA device is available here")
    return torch.device(name)


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))


@dataclass
class KnnData:
    """Fixed monitor subset: training images as memory bank, test images as queries."""

    bank_x: np.ndarray
    bank_y: torch.Tensor
    test_x: np.ndarray
    test_y: torch.Tensor
    num_classes: int


def sample_participants(plan: Plan, seed: int, r: int) -> np.ndarray:
    """Sorted ids of round r's M participants (all N when M = N)."""
    if plan.clients_per_round < plan.num_clients:
        gen = rng(seed, Stream.PARTICIPANTS, r)
        return np.sort(gen.choice(plan.num_clients, plan.clients_per_round, replace=False))
    return np.arange(plan.num_clients)


def round_order(shards: list[np.ndarray], ids: np.ndarray, seed: int, r: int) -> tuple[np.ndarray, ...]:
    """Each participant's shard in a fresh random order: flat array, offsets, lengths (each [M] but flat)."""
    gen = rng(seed, Stream.ROUND_ORDER, r)
    perms = [shards[i][gen.permutation(len(shards[i]))] for i in ids]
    lens = np.array([len(p) for p in perms])
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.concatenate(perms), offsets, lens


def step_samples(order: tuple[np.ndarray, ...], t_in_round: int, b: int) -> np.ndarray:
    """Image indices of one step of a round, participant-major.  Shape: [M*b] (wraps around a shard)."""
    flat, offsets, lens = order
    pos = (t_in_round * b + np.arange(b))[None, :] % lens[:, None]  # [M, b]
    return flat[offsets[:, None] + pos].reshape(-1)


class TrainLoop:
    """The step loop every method shares: history rows, kNN monitor, checkpoint calls, the counters.

    All take the same constructor arguments. A method builds its own models in ``setup`` and implements
    ``advance`` (one step, returns the loss) and ``encoder``; it extends ``state_dict``,
    ``load_state_dict`` and ``summary`` (call the base, add its own entries).
    """

    def __init__(
        self,
        cfg: Config,
        train_x: np.ndarray,
        shards: list[np.ndarray],
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        knn: KnnData | None = None,
        device: torch.device | str = "cpu",
    ):
        """What every method shares: the data, the plan, the monitor and the counters a checkpoint keeps."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.train_x = train_x  # [n, H, W, 3] uint8
        self.shards = shards
        self.shard_sizes = np.array([len(s) for s in shards])
        self.plan = resolve_plan(cfg, self.shard_sizes)
        # fp32 or bf16 forward passes (pretrain.precision, "auto" resolved for this device)
        self.precision = resolve_precision(cfg.pretrain.precision, self.device)
        self.knn = knn
        self.mean, self.std = mean, std
        # Subnormal floats make oneDNN convolutions ~10x slower on x86 CPUs (measured: 9.5 s vs
        # 0.65 s per step at width 16); flushing them changes no result that matters.
        torch.set_flush_denormal(True)
        self.step = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.train_seconds = 0.0
        self.knn_seconds = 0.0  # kNN monitor time, kept out of train_seconds
        self.history: list[dict[str, float]] = []
        self.window_losses: list[float] = []  # losses since the last history row
        self.setup()

    def setup(self) -> None:
        """The method's own models, optimizer and queue (called at the end of ``__init__``)."""
        raise NotImplementedError

    def advance(self) -> float:
        raise NotImplementedError

    def encoder(self) -> Encoder:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The counters every method checkpoints; a method adds its models, optimizer and queue."""
        return {
            "step": self.step,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "train_seconds": self.train_seconds,
            "knn_seconds": self.knn_seconds,
            "history": self.history,
            "window_losses": self.window_losses,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bytes_up = int(state["bytes_up"])
        self.bytes_down = int(state["bytes_down"])
        self.train_seconds = float(state["train_seconds"])
        self.knn_seconds = float(state["knn_seconds"])
        self.history = list(state["history"])
        self.window_losses = list(state["window_losses"])

    def summary(self) -> dict[str, Any]:
        """The run's totals (the pretrain metrics); a method adds its model sizes and plan fields."""
        plan = self.plan
        return {
            "steps": self.step,
            "total_steps": plan.total_steps,
            "epochs": self.step / plan.steps_per_epoch,
            "images_seen": self.step * plan.batch_size,
            "num_clients": plan.num_clients,
            "batch_size": plan.batch_size,
            "bytes_up_total": self.bytes_up,
            "bytes_down_total": self.bytes_down,
            "train_seconds": self.train_seconds,
            "knn_seconds": self.knn_seconds,
            "knn_overhead": self.knn_seconds / self.train_seconds if self.train_seconds else 0.0,
            "steps_per_s": self.step / self.train_seconds if self.train_seconds else 0.0,
        }

    def knn_monitor(self) -> float | None:
        if self.knn is None:
            return None
        enc = self.encoder()
        kw: dict[str, Any] = dict(
            mean=self.mean,
            std=self.std,
            image_size=self.cfg.data.image_size,
            batch_size=self.cfg.evaluate.batch_size,
            device=self.device,
        )
        bank = extract_features(enc, self.knn.bank_x, **kw)
        test = extract_features(enc, self.knn.test_x, **kw)
        e = self.cfg.evaluate
        return knn_top1(bank, self.knn.bank_y, test, self.knn.test_y, self.knn.num_classes, e.knn_k, e.knn_temperature)

    def run(
        self,
        on_step: Callable[[dict[str, float]], None] | None = None,
        on_checkpoint: Callable[[TrainLoop], None] | None = None,
    ) -> None:
        """Train from ``self.step`` to the plan's last step."""
        plan, pc = self.plan, self.cfg.pretrain
        # A history row (MLflow metrics, report curves) per epoch, but at least ~50 per run.
        log_every = max(1, min(pc.knn_every, plan.steps_per_epoch, math.ceil(plan.total_steps / 50)))
        window_start = time.perf_counter()
        while self.step < plan.total_steps:
            loss = self.advance()
            self.window_losses.append(loss)
            row: dict[str, float] = {"step": self.step, "loss": loss}
            if self.step % log_every == 0 or self.step == plan.total_steps:
                elapsed = time.perf_counter() - window_start
                row.update(
                    epoch=self.step / plan.steps_per_epoch,
                    loss_mean=float(np.mean(self.window_losses)),
                    lr=cosine_lr(pc.lr, self.step - 1, plan.total_steps),
                    steps_per_s=len(self.window_losses) / max(elapsed, 1e-9),
                    bytes_per_client=(self.bytes_up + self.bytes_down) / plan.num_clients,
                )
                if self.step % pc.knn_every == 0 or self.step == plan.total_steps:
                    t_knn = time.perf_counter()
                    knn = self.knn_monitor()
                    self.knn_seconds += time.perf_counter() - t_knn
                    if knn is not None:
                        row["knn_top1"] = knn
                self.history.append({k: float(v) for k, v in row.items() if k != "loss"})
                self.window_losses = []
                window_start = time.perf_counter()
            if on_step:
                on_step(row)
            if on_checkpoint and (self.step % pc.checkpoint_every == 0 or self.step == plan.total_steps):
                on_checkpoint(self)


class RoundLoop(TrainLoop):
    """Federated rounds, shared by MocoSFL and FL-MoCo: ``sync_period`` steps, then FedAvg.

    ``begin_round`` sends the global model (and target) to the round's M sampled participants, held
    stacked as ``p``, ``t`` and ``mom`` ([M, ...] each); every step each participant reads ``b`` images
    of its own shard (``step_views``); ``end_round`` FedAvgs them into the next global model. A method
    calls ``super().setup()`` then builds its models and ``global_params``/``global_target``, implements
    ``train_step`` and ``encoder``, and may keep per-client state across rounds by overriding
    ``gather_client_state``/``keep_client_state`` and ``syncs_targets``.
    """

    def setup(self) -> None:
        self.augment = MocoV2Augment(self.cfg.data.image_size, self.mean, self.std)
        self.global_params: C.Params = {}
        self.global_target: C.Params = {}
        self.round_ids: torch.Tensor | None = None  # [M] sorted participants of the open round
        self.p: C.Params = {}  # [M, ...] their online models
        self.t: C.Params = {}  # [M, ...] their EMA targets
        self.mom: C.Params = {}  # [M, ...] their SGD momentum
        self.order: tuple[np.ndarray, ...] = ()  # the open round's shard order (``round_order``)
        self.last_sync_seconds = 0.0  # duration of the latest sync

    def train_step(self) -> float:
        """One step of the open round's participants; returns the loss."""
        raise NotImplementedError

    @property
    def round_open(self) -> bool:
        return self.round_ids is not None

    @property
    def syncs_targets(self) -> bool:
        """Whether the EMA targets are averaged with the models; if not, each client keeps its own."""
        return True

    # ------------------------------------------------------------------ rounds

    def gather_client_state(self, ids: torch.Tensor) -> tuple[C.Params, C.Params]:
        """Targets and SGD momentum the participants ``ids`` start the round with: the global target
        and zeros (stateless clients).  Shape: each [M, ...]."""
        return C.stack(self.global_target, len(ids)), C.zeros_like(self.p)

    def keep_client_state(self, ids: torch.Tensor) -> None:
        """What the participants keep of the ending round beyond the sync (stateless clients: nothing)."""

    def begin_round(self, r: int) -> None:
        """Send the global model (and target) to round r's participants."""
        ids = torch.from_numpy(sample_participants(self.plan, self.cfg.seed, r)).long()
        m = len(ids)
        self.round_ids = ids
        self.p = {k: v.requires_grad_(True) for k, v in C.stack(self.global_params, m).items()}
        self.t, self.mom = self.gather_client_state(ids)
        self.order = round_order(self.shards, ids.numpy(), self.cfg.seed, r)
        sent = C.nbytes(self.global_params) + (C.nbytes(self.global_target) if self.syncs_targets else 0)
        self.bytes_down += m * sent

    def fedavg_weights(self, ids: torch.Tensor) -> torch.Tensor:
        """FedAvg weight of each participant ([M], unnormalised), per ``sfl.fedavg_weights``."""
        if self.cfg.sfl.fedavg_weights == "shard_size":
            return torch.from_numpy(self.shard_sizes[ids.numpy()]).double()
        return torch.ones(len(ids), dtype=torch.float64)  # every participant saw b * steps samples

    def end_round(self) -> None:
        """Sync: the participants upload their models (and targets); FedAvg of each becomes the global one."""
        assert self.round_ids is not None
        ids, m = self.round_ids, len(self.round_ids)
        weights = self.fedavg_weights(ids)
        self.global_params = C.fedavg(self.p, weights)
        self.bytes_up += m * C.nbytes(self.global_params)
        if self.syncs_targets:
            self.global_target = C.fedavg(self.t, weights)
            self.bytes_up += m * C.nbytes(self.global_target)
        self.keep_client_state(ids)
        self.round_ids = None
        self.p, self.t, self.mom = {}, {}, {}
        self.order = ()

    def sync_now(self) -> float:
        """End a round with a sync now (opening one first if none is open); returns the sync's seconds."""
        if self.round_ids is None:
            self.begin_round(self.step // self.plan.sync_period)
        t = time.perf_counter()
        self.end_round()
        self.last_sync_seconds = time.perf_counter() - t
        return self.last_sync_seconds

    def current_params(self) -> C.Params:
        """What a sync right now would produce (the global model between rounds)."""
        if self.round_ids is None:
            return self.global_params
        return C.fedavg({k: v.detach() for k, v in self.p.items()}, self.fedavg_weights(self.round_ids))

    # ------------------------------------------------------------------ one step

    def step_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's two augmented views per participant.  Shape: each [M, b, 3, S, S]."""
        assert self.round_ids is not None
        m, b = len(self.round_ids), self.plan.client_batch_size
        idx = step_samples(self.order, self.step % self.plan.sync_period, b)  # [M*b]
        images = torch.from_numpy(np.ascontiguousarray(self.train_x[idx])).to(self.device)
        view1, view2 = self.augment.two_views(images, torch_generator(self.cfg.seed, Stream.AUGMENT, self.step))
        return view1.view(m, b, *view1.shape[1:]), view2.view(m, b, *view2.shape[1:])

    def advance(self) -> float:
        """One step, opening a round before it and syncing after it when due."""
        plan = self.plan
        t0 = time.perf_counter()
        if self.round_ids is None:
            self.begin_round(self.step // plan.sync_period)
        loss = self.train_step()
        self.step += 1
        if self.step % plan.sync_period == 0 or self.step == plan.total_steps:
            self.sync_now()
        self.train_seconds += time.perf_counter() - t0
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(global_params=self.global_params, global_target=self.global_target)
        if self.round_ids is not None:
            state["round"] = {
                "ids": self.round_ids,
                "p": {k: v.detach() for k, v in self.p.items()},
                "t": self.t,
                "mom": self.mom,
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.global_params = state["global_params"]
        self.global_target = state["global_target"]
        if "round" in state:
            rnd = state["round"]
            self.round_ids = rnd["ids"]
            self.p = {k: v.clone().requires_grad_(True) for k, v in rnd["p"].items()}
            self.t, self.mom = rnd["t"], rnd["mom"]
            self.order = round_order(self.shards, rnd["ids"].numpy(), self.cfg.seed, self.step // self.plan.sync_period)
        else:
            self.round_ids = None
            self.p, self.t, self.mom = {}, {}, {}
            self.order = ()

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return super().summary() | {
            "clients_per_round": plan.clients_per_round,
            "client_batch_size": plan.client_batch_size,
            "sync_period": plan.sync_period,
            "bytes_per_client": (self.bytes_up + self.bytes_down) / plan.num_clients,
        }
