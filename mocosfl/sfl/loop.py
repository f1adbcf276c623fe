"""The one training loop every method runs: ``TrainLoop`` (steps, history, kNN monitor, checkpoint calls)
and ``RoundLoop`` (sampling rounds of ``sample_period`` steps over sampled participants; FedAvg every
``sync_period`` steps, independently).

Randomness is derived from (seed, stream, round) and (seed, stream, step) rather than carried as
generator state (``mocosfl.seeding``), so a run resumed from any checkpoint replays exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
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
    sample_period: int  # steps between re-sampling the participants
    sync_period: int | None  # steps between FedAvgs; None = never (one FedAvg at the very end)


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
    # The reference re-samples once per epoch, in which each participant passes once over its shard.
    sample_cfg = cfg.sfl.sample_period
    sample = max(1, round(float(np.median(shard_sizes)) / b)) if sample_cfg == "auto" else sample_cfg
    sync_cfg = cfg.sfl.sync_period
    if sync_cfg == "auto":  # the reference: 1000 // (b*N) syncs per pass over a participant's shard
        sync: int | None = max(1, round(float(np.median(shard_sizes)) / b / max(1, 1000 // (b * n))))
    else:
        sync = None if sync_cfg == "never" else sync_cfg
    return Plan(n, m, b, batch, steps_per_epoch, total, sample, sync)


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
    """Fixed monitor subset: training images as memory bank, validation images (never test) as queries.

    ``bank_rows``: the bank images' training-set indices (the space shards index). A distributed run's
    server has no training images (``bank_x`` is None): the client hosts holding them send their
    client-model activations instead.
    """

    bank_x: np.ndarray | None
    bank_y: torch.Tensor
    query_x: np.ndarray
    query_y: torch.Tensor
    num_classes: int
    bank_rows: np.ndarray | None = None


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


def epoch_batch(pool: np.ndarray, step: int, batch: int, epoch_rng: Callable[[int], np.random.Generator]) -> np.ndarray:
    """Step ``step``'s ``batch`` entries of ``pool``: consecutive slices of a fresh permutation per pass over it
    (``epoch_rng(pass)`` draws it), a batch straddling two passes taking from both.  Shape: [batch]."""
    n = len(pool)
    epoch, within = np.divmod(step * batch + np.arange(batch), n)
    out = np.empty(batch, dtype=pool.dtype)
    for e in np.unique(epoch):
        sel = epoch == e
        out[sel] = pool[epoch_rng(int(e)).permutation(n)[within[sel]]]
    return out


class TrainLoop:
    """The step loop every method shares: history rows, kNN monitor, checkpoint calls, the counters.

    All take the same constructor arguments. A method builds its own models in ``setup`` and implements
    ``advance`` (one step, returns the loss) and ``encoder``; it extends ``state_dict``,
    ``load_state_dict`` and ``summary`` (call the base, add its own entries).
    """

    method = "mocosfl"  # the name workflow.METHODS knows it by

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
        self.precision = resolve_precision(cfg.pretrain.precision, self.device, self.method)
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
        # What the run actually trained on (the results tables' distinct clients / images).
        self.seen_images = np.zeros(len(train_x), dtype=bool)
        self.seen_clients = np.zeros(len(shards), dtype=bool)
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
            "seen_images": torch.from_numpy(np.packbits(self.seen_images)),
            "seen_clients": torch.from_numpy(np.packbits(self.seen_clients)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.bytes_up = int(state["bytes_up"])
        self.bytes_down = int(state["bytes_down"])
        self.train_seconds = float(state["train_seconds"])
        self.knn_seconds = float(state["knn_seconds"])
        self.history = list(state["history"])
        self.window_losses = list(state["window_losses"])
        for name in ("seen_images", "seen_clients"):
            flags = getattr(self, name)
            flags[:] = np.unpackbits(state[name].numpy(), count=len(flags)).astype(bool)

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
            "distinct_images": int(self.seen_images.sum()),
            "distinct_clients": int(self.seen_clients.sum()),
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
        assert self.knn.bank_x is not None, "the kNN bank's images are needed in process"
        bank = extract_features(enc, self.knn.bank_x, **kw)
        queries = extract_features(enc, self.knn.query_x, **kw)
        e = self.cfg.evaluate
        k = self.knn
        return knn_top1(bank, k.bank_y, queries, k.query_y, k.num_classes, e.knn_k, e.knn_temperature)

    def history_due(self) -> bool:
        """Whether the step just taken gets a history row (MLflow metrics, report curves): one per epoch,
        but at least ~50 per run, and every kNN step (the last one included)."""
        plan, pc = self.plan, self.cfg.pretrain
        every = max(1, min(pc.knn_every, plan.steps_per_epoch, math.ceil(plan.total_steps / 50)))
        return self.step % every == 0 or self.knn_due()

    def knn_due(self) -> bool:
        """Whether the step just taken runs the kNN monitor: every ``pretrain.knn_every`` steps and the last,
        whatever the history's own period (a kNN step always gets a history row)."""
        return self.step % self.cfg.pretrain.knn_every == 0 or self.step == self.plan.total_steps

    def checkpoint_due(self) -> bool:
        return self.step % self.cfg.pretrain.checkpoint_every == 0 or self.step == self.plan.total_steps

    def run(
        self,
        on_step: Callable[[dict[str, float]], None] | None = None,
        on_checkpoint: Callable[[TrainLoop], None] | None = None,
    ) -> None:
        """Train from ``self.step`` to the plan's last step."""
        plan, pc = self.plan, self.cfg.pretrain
        window_start = time.perf_counter()
        while self.step < plan.total_steps:
            loss = self.advance()
            self.window_losses.append(loss)
            row: dict[str, float] = {"step": self.step, "loss": loss}
            if self.history_due():
                elapsed = time.perf_counter() - window_start
                row.update(
                    epoch=self.step / plan.steps_per_epoch,
                    loss_mean=float(np.mean(self.window_losses)),
                    lr=cosine_lr(pc.lr, self.step - 1, plan.total_steps),
                    steps_per_s=len(self.window_losses) / max(elapsed, 1e-9),
                    bytes_per_client=(self.bytes_up + self.bytes_down) / plan.num_clients,
                )
                if self.knn_due():
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
            if on_checkpoint and self.checkpoint_due():
                on_checkpoint(self)


class RoundLoop(TrainLoop):
    """Federated rounds, shared by MocoSFL and FL-MoCo: sampling rounds and syncs on separate schedules.

    Every ``sample_period`` steps a new sampling round draws M participants; each holds its online model,
    EMA target and SGD momentum stacked as ``p``, ``t`` and ``mom`` ([M, ...] each) and every step reads
    ``b`` images of its own shard (``step_views``). Every ``sync_period`` steps (and after the last step)
    FedAvg averages every client model trained since the previous sync into the next global model, and
    the participants continue from it. A client whose round ends without a sync keeps its own state in
    the O(N) unsynced bank and resumes from it when sampled again; after a sync every client starts from
    the global model. A method calls ``super().setup()`` then builds its models and
    ``global_params``/``global_target``, implements ``train_step`` and ``encoder``, and may keep more
    per-client state by overriding ``gather_client_state``/``keep_client_state``, ``syncs_targets``
    and ``keeps_momentum``.
    """

    def setup(self) -> None:
        a = self.cfg.augment
        self.augment = MocoV2Augment(
            self.cfg.data.image_size, self.mean, self.std, scale=a.crop_scale, blur_sigma=a.blur_sigma
        )
        self.global_params: C.Params = {}
        self.global_target: C.Params = {}
        self.round_ids: torch.Tensor | None = None  # [M] sorted participants of the open round
        # The participants this process computes (``owns``): all M in process, a client host's own in a
        # distributed run. ``p``, ``t`` and ``mom`` hold their rows only; the counters cover all M.
        self.local_ids: torch.Tensor = torch.zeros(0, dtype=torch.long)  # [M_local]
        self.local_mask: torch.Tensor = torch.zeros(0, dtype=torch.bool)  # [M] which rows are local
        self.p: C.Params = {}  # [M_local, ...] their online models
        self.t: C.Params = {}  # [M_local, ...] their EMA targets
        self.mom: C.Params = {}  # [M_local, ...] their SGD momentum
        self.order: tuple[np.ndarray, ...] = ()  # the open round's shard order (``round_order``)
        self.last_sync_seconds = 0.0  # duration of the latest sync
        self.synced_last_step = False
        n = self.plan.num_clients
        # Steps each client trained since the last sync (its FedAvg weight); > 0 for a client out of a
        # round marks its state in unsynced_bank as newer than the global model.
        self.steps_since_sync = np.zeros(n, dtype=np.int64)
        self.unsynced_bank: C.ClientStateBank | None = None  # made when a round first ends unsynced

    def train_step(self) -> float:
        """One step of the open round's participants; returns the loss."""
        raise NotImplementedError

    @property
    def round_open(self) -> bool:
        return self.round_ids is not None

    def owns(self, ids: np.ndarray) -> np.ndarray:
        """Which clients ``ids`` this process holds the models, state and images of ([n] bool): all of them
        in process (``mocosfl.distributed`` splits them over client hosts)."""
        return np.ones(len(ids), dtype=bool)

    @property
    def syncs_targets(self) -> bool:
        """Whether the EMA targets are averaged with the models; if not, each client keeps its own."""
        return True

    @property
    def keeps_momentum(self) -> bool:
        """Whether the method keeps every client's SGD momentum itself (stateful clients)."""
        return False

    # ------------------------------------------------------------------ client state

    def gather_client_state(self, ids: torch.Tensor) -> tuple[C.Params, C.Params]:
        """Targets and SGD momentum the participants ``ids`` start the round with: the global target
        and zeros (stateless clients).  Shape: each [M, ...]."""
        return C.stack(self.global_target, len(ids)), C.zeros_like(self.p)

    def keep_client_state(self, ids: torch.Tensor) -> None:
        """What the participants keep of the ending round beyond their unsynced model (default: nothing)."""

    def _unsynced_state(self) -> C.Params:
        """The participants' state a round without a sync leaves with them, flat-named for one bank."""
        return self._banked_parts({k: v.detach() for k, v in self.p.items()}, self.t, self.mom)

    def _banked_parts(self, p: C.Params, t: C.Params, mom: C.Params) -> C.Params:
        """What an unsynced client keeps: its model, its target when targets sync, its momentum unless
        the method keeps momentum itself; flat-named for one bank ("p.", "t.", "mom.")."""
        parts = {"p": p}
        if self.syncs_targets:
            parts["t"] = t
        if not self.keeps_momentum:
            parts["mom"] = mom
        return C.join_parts(parts)

    def _make_unsynced_bank(self) -> C.ClientStateBank:
        template = self._banked_parts(self.global_params, self.global_target, self.global_params)
        sfl = self.cfg.sfl
        return C.ClientStateBank(
            template,
            self.plan.num_clients,
            storage_dtype=getattr(torch, sfl.client_state_dtype),
            file_dir=Path(self.cfg.pretrain.runs_dir) if sfl.client_state_storage == "file" else None,
        )

    def _unsynced_ids(self) -> np.ndarray:
        """Clients outside the open round holding a model newer than the global one (sorted)."""
        away = self.steps_since_sync > 0
        if self.round_ids is not None:
            away[self.round_ids.numpy()] = False
        return np.flatnonzero(away)

    # ------------------------------------------------------------------ rounds

    def begin_round(self, r: int) -> None:
        """Round r's participants start from the global model, or from their own if they trained since the last sync."""
        ids = torch.from_numpy(sample_participants(self.plan, self.cfg.seed, r)).long()
        self.round_ids = ids
        self.local_mask = torch.from_numpy(self.owns(ids.numpy()))
        local = self.local_ids = ids[self.local_mask]
        self.seen_clients[ids.numpy()] = True
        self.p = C.stack(self.global_params, len(local))
        self.t, self.mom = self.gather_client_state(local)
        own = torch.from_numpy(self.steps_since_sync[local.numpy()] > 0)
        if own.any():
            assert self.unsynced_bank is not None
            held = C.split_parts(self.unsynced_bank.gather(local[own]))
            with torch.no_grad():
                for into, part in ((self.p, "p"), (self.t, "t"), (self.mom, "mom")):
                    for key, v in held.get(part, {}).items():
                        into[key][own] = v
        self.p = {k: v.requires_grad_(True) for k, v in self.p.items()}
        self.order = round_order(self.shards, ids.numpy(), self.cfg.seed, r)
        sent = C.nbytes(self.global_params) + (C.nbytes(self.global_target) if self.syncs_targets else 0)
        returning = self.steps_since_sync[ids.numpy()] > 0  # they already hold their model
        self.bytes_down += int((~returning).sum()) * sent

    def end_round(self) -> None:
        """Close the round; participants that trained since the last sync keep their state for later."""
        assert self.round_ids is not None
        ids = self.local_ids
        unsynced = torch.from_numpy(self.steps_since_sync[ids.numpy()] > 0)
        if unsynced.any():
            if self.unsynced_bank is None:
                self.unsynced_bank = self._make_unsynced_bank()
            state = self._unsynced_state()
            self.unsynced_bank.scatter(ids[unsynced], {k: v[unsynced] for k, v in state.items()})
        self.keep_client_state(ids)
        self.round_ids = None
        self.p, self.t, self.mom = {}, {}, {}
        self.order = ()

    def fedavg_weights(self, ids: np.ndarray) -> torch.Tensor:
        """FedAvg weight of each client ``ids`` ([n], unnormalised), per ``sfl.fedavg_weights``."""
        if self.cfg.sfl.fedavg_weights == "shard_size":
            return torch.from_numpy(self.shard_sizes[ids]).double()
        # samples_seen: every client trained b images per step since the last sync
        steps = torch.from_numpy(self.steps_since_sync[ids]).double()
        return steps if steps.sum() > 0 else torch.ones(len(ids), dtype=torch.float64)

    def _fedavg_now(self) -> tuple[C.Params, C.Params | None, int]:
        """FedAvg of the open round's participants and every unsynced client outside it: (models,
        targets or None, how many clients contributed).

        Every process knows the contributors and their weights (they follow from the seed) and holds the
        rows of those it ``owns``: the live participants' in round order, then the banked ones by id.
        """
        live = self.round_ids.numpy() if self.round_ids is not None else np.zeros(0, dtype=np.int64)
        away = self._unsynced_ids()
        ids = np.concatenate([live, away])
        if len(ids) == 0:  # nothing trained since the last sync
            return self.global_params, self.global_target if self.syncs_targets else None, 0
        weights = self.fedavg_weights(ids)
        if weights.sum() == 0:
            weights = torch.ones_like(weights)
        w = weights / weights.sum()
        models = {k: v.detach() for k, v in self.p.items()}  # the local participants' rows
        targets = dict(self.t) if self.syncs_targets else {}
        held = away[self.owns(away)]
        if len(held):
            assert self.unsynced_bank is not None
            banked = C.split_parts(self.unsynced_bank.gather(torch.from_numpy(held)))
            for into, part in ((models, "p"), (targets, "t")):
                for key, v in banked.get(part, {}).items():
                    into[key] = torch.cat([into[key], v.to(self.device)]) if key in into else v.to(self.device)
        avg_models = self.average(models, ids, w, self.global_params)
        avg_targets = self.average(targets, ids, w, self.global_target) if self.syncs_targets else None
        return avg_models, avg_targets, len(ids)

    def average(self, rows: C.Params, ids: np.ndarray, w: torch.Tensor, like: C.Params) -> C.Params:
        """The weighted mean of the contributors ``ids`` ([K], weights ``w`` summing to 1) given the rows
        this process holds (``owns``; in process all K, in ``ids`` order), in ``like``'s dtypes."""
        return {k: v.to(like[k].dtype) for k, v in C.weighted_sum(rows, w).items()}

    def sync(self, round_continues: bool = True) -> None:
        """FedAvg every client model trained since the last sync; everyone continues from the result."""
        t0 = time.perf_counter()
        models, targets, contributors = self._fedavg_now()
        per_client = C.nbytes(models) + (C.nbytes(targets) if targets is not None else 0)
        self.bytes_up += contributors * per_client
        self.global_params = models
        if targets is not None:
            self.global_target = targets
        self.steps_since_sync[:] = 0
        if self.round_ids is not None and round_continues:  # the participants carry on from the global model
            m = len(self.round_ids)
            self.bytes_down += m * per_client
            with torch.no_grad():
                for k, v in self.p.items():
                    v.copy_(models[k].expand_as(v))
                if targets is not None:
                    self.t = C.stack(targets, len(self.local_ids))
        self.last_sync_seconds = time.perf_counter() - t0

    def sync_now(self) -> float:
        """A sync right now (opening a round first if none is open); returns its seconds."""
        if self.round_ids is None:
            self.begin_round(self.step // self.plan.sample_period)
        self.sync()
        return self.last_sync_seconds

    def current_params(self) -> C.Params:
        """What a sync right now would produce (the global model when nothing trained since the last one)."""
        return self._fedavg_now()[0]

    # ------------------------------------------------------------------ one step

    def step_samples(self) -> np.ndarray:
        """This step's image indices, participant-major, all M participants'; marks them seen.  Shape: [M*b]."""
        idx = step_samples(self.order, self.step % self.plan.sample_period, self.plan.client_batch_size)
        self.seen_images[idx] = True
        return idx

    def step_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's two augmented views per local participant.  Shape: each [M_local, b, 3, S, S]."""
        assert self.round_ids is not None
        m, b = len(self.local_ids), self.plan.client_batch_size
        idx = self.step_samples()  # [M*b]
        gen = torch_generator(self.cfg.seed, Stream.AUGMENT, self.step)
        if m == len(self.round_ids):
            images = torch.from_numpy(np.ascontiguousarray(self.train_x[idx])).to(self.device)
            view1, view2 = self.augment.two_views(images, gen)
        else:  # part of the batch: augmented as the whole batch would be
            rows = self.local_mask.repeat_interleave(b)  # [M*b]
            images = torch.from_numpy(np.ascontiguousarray(self.train_x[idx[rows.numpy()]])).to(self.device)
            view1, view2 = self.augment.two_views(images, gen, rows)
        return view1.view(m, b, *view1.shape[1:]), view2.view(m, b, *view2.shape[1:])

    def advance(self) -> float:
        """One step: open a sampling round when due, train, sync when due, close the round when due."""
        plan = self.plan
        t0 = time.perf_counter()
        if self.round_ids is None:
            self.begin_round(self.step // plan.sample_period)
        assert self.round_ids is not None
        loss = self.train_step()
        self.steps_since_sync[self.round_ids.numpy()] += 1
        self.step += 1
        last = self.step == plan.total_steps
        round_ends = last or self.step % plan.sample_period == 0
        self.synced_last_step = last or (plan.sync_period is not None and self.step % plan.sync_period == 0)
        if self.synced_last_step:
            self.sync(round_continues=not round_ends)
        if round_ends:
            self.end_round()
        self.train_seconds += time.perf_counter() - t0
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            global_params=self.global_params,
            global_target=self.global_target,
            steps_since_sync=torch.from_numpy(self.steps_since_sync.copy()),
        )
        if self.unsynced_bank is not None:
            state["unsynced_bank"] = self.unsynced_bank  # saved to its own file by save_checkpoint
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
        self.steps_since_sync[:] = state["steps_since_sync"].numpy()
        if "round" in state:
            rnd = state["round"]
            self.round_ids = rnd["ids"]
            self.local_mask = torch.from_numpy(self.owns(rnd["ids"].numpy()))
            self.local_ids = rnd["ids"][self.local_mask]
            self.p = {k: v.clone().requires_grad_(True) for k, v in rnd["p"].items()}
            self.t, self.mom = rnd["t"], rnd["mom"]
            r = self.step // self.plan.sample_period
            self.order = round_order(self.shards, rnd["ids"].numpy(), self.cfg.seed, r)
        else:
            self.round_ids = None
            self.p, self.t, self.mom = {}, {}, {}
            self.order = ()
        if "unsynced_bank" in state:
            if self.unsynced_bank is None:
                self.unsynced_bank = self._make_unsynced_bank()
            self.unsynced_bank.load_(state["unsynced_bank"])

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return super().summary() | {
            "clients_per_round": plan.clients_per_round,
            "client_batch_size": plan.client_batch_size,
            "sample_period": plan.sample_period,
            "sync_period": plan.sync_period,  # None: never
            "bytes_per_client": (self.bytes_up + self.bytes_down) / plan.num_clients,
        }
