"""MocoSFL training loop: rounds of ``sync_period`` steps, stacked clients, one MoCo server.

Randomness is derived from (seed, round) and (seed, step) rather than carried as
generator state, so a run resumed from any checkpoint replays exactly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mocosfl.config import Config, ConfigError
from mocosfl.data.augment import MocoV2Augment
from mocosfl.eval.knn import extract_features, knn_top1
from mocosfl.models.resnet import Encoder, build_split_model, count_params
from mocosfl.sfl import clients as C
from mocosfl.sfl.server import KeyQueue, PerClientQueue, ema_update_module, info_nce


class TrainingDiverged(RuntimeError):
    """Loss became NaN/inf; the last good checkpoint is left untouched."""


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


# torch.compile of the server costs ~1-2 minutes on 2 CPU cores; below this many steps it does not pay.
AUTO_COMPILE_MIN_STEPS = 2000


def maybe_compile(module: torch.nn.Module, mode: str, total_steps: int) -> torch.nn.Module:
    """The module itself, or a compiled wrapper sharing its parameters."""
    if mode == "on" or (mode == "auto" and total_steps >= AUTO_COMPILE_MIN_STEPS):
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


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _torch_gen(seed: int, *stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(_rng(seed, *stream).integers(2**62)))
    return g


@dataclass
class KnnData:
    """Fixed monitor subset: training images as memory bank, test images as queries."""

    bank_x: np.ndarray
    bank_y: torch.Tensor
    test_x: np.ndarray
    test_y: torch.Tensor
    num_classes: int


def moco_terms(
    server: Callable[[torch.Tensor], torch.Tensor],
    server_target: Callable[[torch.Tensor], torch.Tensor],
    h_q: torch.Tensor,
    h_k: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    symmetric: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The MoCo v2 loss on the server, one term at a time: yields (term, keys of that term).

    Symmetric (the reference): L(f_s(h_q), f̄_s(h_k)) + L(f_s(h_k), f̄_s(h_q)), else the first term.
    The terms share no online activations, so a caller may back-propagate each before the next is
    computed.  Shape: h_q, h_k [B, ...]; negatives [K, D] or [B, K, D]; each term's keys [B, D].
    """
    pairs = [(h_q, h_k)] + ([(h_k.detach(), h_q.detach())] if symmetric else [])
    for online_in, target_in in pairs:
        q = F.normalize(server(online_in), dim=1)
        with torch.no_grad():
            k = F.normalize(server_target(target_in), dim=1)
        yield info_nce(q, k, negatives, temperature), k


def moco_loss(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole loss with its graph, and the keys to enqueue ([2B, D] symmetric, [B, D] not).

    Same arguments as ``moco_terms``.
    """
    terms, keys = zip(*moco_terms(*args, **kwargs), strict=True)
    return sum(terms[1:], terms[0]), torch.cat(keys)


def moco_backward(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``moco_loss(...)`` and its backward pass, one term at a time; returns (detached loss, keys).

    Back-propagating each term before computing the next halves the server's peak activation
    memory (1.1 GB less per step at width 64, B=100). Gradients accumulate into the server's
    parameters and ``h_q.grad`` as one backward of the sum would (equal up to float rounding).
    Same arguments as ``moco_terms``.
    """
    total, keys = None, []
    for term, k in moco_terms(*args, **kwargs):
        term.backward()
        total = term.detach() if total is None else total + term.detach()
        keys.append(k)
    assert total is not None
    return total, torch.cat(keys)


def sample_participants(plan: Plan, seed: int, r: int) -> np.ndarray:
    """Sorted ids of round r's M participants (all N when M = N)."""
    if plan.clients_per_round < plan.num_clients:
        return np.sort(_rng(seed, 1, r).choice(plan.num_clients, plan.clients_per_round, replace=False))
    return np.arange(plan.num_clients)


def round_order(shards: list[np.ndarray], ids: np.ndarray, seed: int, r: int) -> tuple[np.ndarray, ...]:
    """Each participant's shard in a fresh random order: flat array, offsets, lengths (each [M] but flat)."""
    rng = _rng(seed, 2, r)
    perms = [shards[i][rng.permutation(len(shards[i]))] for i in ids]
    lens = np.array([len(p) for p in perms])
    offsets = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.concatenate(perms), offsets, lens


def step_samples(order: tuple[np.ndarray, ...], t_in_round: int, b: int) -> np.ndarray:
    """Image indices of one step of a round, participant-major.  Shape: [M*b] (wraps around a shard)."""
    flat, offsets, lens = order
    pos = (t_in_round * b + np.arange(b))[None, :] % lens[:, None]  # [M, b]
    return flat[offsets[:, None] + pos].reshape(-1)


class TrainLoop:
    """The step loop MocoSFL and the baselines share: history rows, kNN monitor, checkpoint calls.

    All take the same constructor arguments. Subclasses build their own models in ``setup`` and
    implement ``advance`` (one step, returns the loss), ``encoder``, ``state_dict``,
    ``load_state_dict`` and ``summary``.
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
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        raise NotImplementedError

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


class MocoSFLTrainer(TrainLoop):
    """Simulates N clients + one server on one machine; ``run`` trains, ``state_dict`` checkpoints."""

    def setup(self) -> None:
        cfg, mean, std = self.cfg, self.mean, self.std
        self.augment = MocoV2Augment(cfg.data.image_size, mean, std)
        torch.manual_seed(cfg.seed)
        m = cfg.model
        self.client_module, self.server = build_split_model(
            m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups
        )
        self.client_module.to(self.device)
        C.check_stackable(self.client_module)
        self.server.to(self.device)
        self.server_target = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)[1].to(
            self.device
        )
        self.server_target.load_state_dict(self.server.state_dict())
        self.server_target.requires_grad_(False)
        # Compiled wrappers share parameters with the eager modules, so EMA, checkpoints and kNN
        # (which use the eager modules) see the same weights.
        self.server_fn = maybe_compile(self.server, cfg.pretrain.compile, self.plan.total_steps)
        self.server_target_fn = maybe_compile(self.server_target, cfg.pretrain.compile, self.plan.total_steps)
        self.optimizer = torch.optim.SGD(
            self.server.parameters(),
            lr=cfg.pretrain.lr,
            momentum=cfg.pretrain.momentum,
            weight_decay=cfg.pretrain.weight_decay,
        )

        self.global_params = C.module_params(self.client_module)
        self.global_target = {k: v.clone() for k, v in self.global_params.items()}
        n = self.plan.num_clients
        bank = {
            "storage_dtype": getattr(torch, cfg.sfl.client_state_dtype),
            "file_dir": Path(cfg.pretrain.runs_dir) if cfg.sfl.client_state_storage == "file" else None,
        }
        self.momentum_bank = C.ClientStateBank(self.global_params, n, **bank) if cfg.sfl.stateful_clients else None
        self.target_bank = (
            None if cfg.sfl.sync_targets else C.ClientStateBank(self.global_params, n, fill="copy", **bank)
        )

        queue_gen = _torch_gen(cfg.seed, 7)
        dim = m.proj_dim
        if cfg.moco.feature_sharing:
            self.queue: KeyQueue | PerClientQueue = KeyQueue(cfg.moco.queue_size, dim, queue_gen, self.device)
        else:
            # Without sharing each client contrasts against its own past keys; the K budget is
            # split over the participants so a step sees as many negatives in total.
            per_client = max(1, cfg.moco.queue_size // self.plan.clients_per_round)
            self.queue = PerClientQueue(n, per_client, dim, queue_gen, self.device)

        self.round_ids: torch.Tensor | None = None  # participants of the open round
        self.p: C.Params = {}
        self.t: C.Params = {}
        self.mom: C.Params = {}
        self.last_sync_seconds = 0.0

    # ------------------------------------------------------------------ rounds

    def _round_data(self, r: int) -> tuple[np.ndarray, ...]:
        return round_order(self.shards, self.round_ids.cpu().numpy(), self.cfg.seed, r)  # type: ignore[union-attr]

    def begin_round(self, r: int) -> None:
        ids = sample_participants(self.plan, self.cfg.seed, r)
        self.round_ids = torch.from_numpy(ids).long()
        m = len(ids)
        self.p = {k: v.requires_grad_(True) for k, v in C.stack(self.global_params, m).items()}
        self.t = self.target_bank.gather(self.round_ids) if self.target_bank else C.stack(self.global_target, m)
        self.mom = self.momentum_bank.gather(self.round_ids) if self.momentum_bank else C.zeros_like(self.p)
        self._data = self._round_data(r)
        self.bytes_down += m * C.nbytes(self.global_params) * (2 if self.target_bank is None else 1)

    def _sync_weights(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.sfl.fedavg_weights == "shard_size":
            return torch.from_numpy(self.shard_sizes[ids.numpy()]).double()
        return torch.ones(len(ids), dtype=torch.float64)  # every participant saw b * steps samples

    def end_round(self) -> None:
        """Sync: FedAvg the participants' models (and targets) and load into every client."""
        assert self.round_ids is not None
        ids = self.round_ids
        m = len(ids)
        weights = self._sync_weights(ids)
        self.global_params = C.fedavg(self.p, weights)
        self.bytes_up += m * C.nbytes(self.global_params)
        if self.target_bank is None:
            self.global_target = C.fedavg(self.t, weights)
            self.bytes_up += m * C.nbytes(self.global_target)
        else:
            self.target_bank.scatter(ids, self.t)
        if self.momentum_bank is not None:
            self.momentum_bank.scatter(ids, self.mom)
        self.round_ids = None
        self.p, self.t, self.mom = {}, {}, {}

    def current_client_params(self) -> C.Params:
        """What a sync right now would produce (the global model between rounds)."""
        if self.round_ids is None:
            return self.global_params
        return C.fedavg({k: v.detach() for k, v in self.p.items()}, self._sync_weights(self.round_ids))

    # ------------------------------------------------------------------ one step

    def train_step(self) -> float:
        plan, cfg = self.plan, self.cfg
        assert self.round_ids is not None
        t_in_round = self.step % plan.sync_period
        m, b = len(self.round_ids), plan.client_batch_size
        idx = step_samples(self._data, t_in_round, b)  # [M*b]
        images = torch.from_numpy(np.ascontiguousarray(self.train_x[idx])).to(self.device)
        view1, view2 = self.augment.two_views(images, _torch_gen(cfg.seed, 3, self.step))
        view1 = view1.view(m, b, *view1.shape[1:])  # [M, b, 3, S, S]
        view2 = view2.view(m, b, *view2.shape[1:])

        # Clients: online forward keeps its graph, target forward does not.
        h_q = C.batched_forward(self.client_module, self.p, view1)  # [M, b, C', H', W']
        with torch.no_grad():
            h_k = C.batched_forward(self.client_module, self.t, view2)
        # Vector concatenation: the server sees one batch of B = M*b smashed samples.
        smashed_q = h_q.detach().flatten(0, 1).requires_grad_(True)  # [B, C', H', W']
        smashed_k = h_k.flatten(0, 1)
        self.bytes_up += smashed_q.numel() * smashed_q.element_size() * 2

        if isinstance(self.queue, KeyQueue):
            negatives = self.queue.keys  # no copy: the queue is only written after backward
        else:
            negatives = self.queue.negatives(self.round_ids.repeat_interleave(b).to(self.device))
        lr = cosine_lr(cfg.pretrain.lr, self.step, plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, keys = moco_backward(
            self.server_fn,
            self.server_target_fn,
            smashed_q,
            smashed_k,
            negatives,
            cfg.moco.temperature,
            cfg.moco.symmetric,
        )
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step}; the last good checkpoint is kept — "
                "lower pretrain.lr or check the data"
            )
        self.optimizer.step()

        # The server returns each client its slice of dloss/dh_q; clients backprop locally.
        grad = smashed_q.grad.view_as(h_q)  # type: ignore[union-attr]
        self.bytes_down += grad.numel() * grad.element_size()
        names = list(self.p)
        grads = torch.autograd.grad(h_q, [self.p[k] for k in names], grad)
        C.sgd_step(
            self.p, dict(zip(names, grads, strict=True)), self.mom, lr, cfg.pretrain.momentum, cfg.pretrain.weight_decay
        )

        tau = cfg.moco.ema
        ema_update_module(self.server_target, self.server, tau)
        C.ema_update(self.t, self.p, tau)
        if isinstance(self.queue, KeyQueue):
            self.queue.enqueue(keys)
        else:
            per_client = keys.view(-1, m, b, keys.shape[-1]).transpose(0, 1).reshape(m, -1, keys.shape[-1])
            self.queue.enqueue(self.round_ids.to(self.device), per_client)  # [M, terms*b, D]
        return loss.item()

    # ------------------------------------------------------------------ evaluation

    def encoder(self) -> Encoder:
        """The current encoder (client global model + server backbone) as a plain module."""
        m = self.cfg.model
        client, _ = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
        client.load_state_dict({k: v.detach().clone() for k, v in self.current_client_params().items()})
        return Encoder(client.to(self.device), copy.deepcopy(self.server.backbone)).eval()

    # ------------------------------------------------------------------ the loop

    def advance(self) -> float:
        """One step, opening a round before it and syncing after it when due."""
        plan = self.plan
        t0 = time.perf_counter()
        if self.round_ids is None:
            self.begin_round(self.step // plan.sync_period)
        loss = self.train_step()
        self.step += 1
        if self.step % plan.sync_period == 0 or self.step == plan.total_steps:
            t_sync = time.perf_counter()
            self.end_round()
            self.last_sync_seconds = time.perf_counter() - t_sync
        self.train_seconds += time.perf_counter() - t0
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "step": self.step,
            "server": self.server.state_dict(),
            "server_target": self.server_target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "global_params": self.global_params,
            "global_target": self.global_target,
            "queue": self.queue.state(),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "train_seconds": self.train_seconds,
            "knn_seconds": self.knn_seconds,
            "history": self.history,
            "window_losses": self.window_losses,
        }
        if self.round_ids is not None:
            state["round"] = {
                "ids": self.round_ids,
                "p": {k: v.detach() for k, v in self.p.items()},
                "t": self.t,
                "mom": self.mom,
            }
        if self.momentum_bank is not None:
            state["momentum_bank"] = self.momentum_bank  # saved to its own file by save_checkpoint
        if self.target_bank is not None:
            state["target_bank"] = self.target_bank
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.server.load_state_dict(state["server"])
        self.server_target.load_state_dict(state["server_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.global_params = state["global_params"]
        self.global_target = state["global_target"]
        self.queue.load(state["queue"])
        self.bytes_up = int(state["bytes_up"])
        self.bytes_down = int(state["bytes_down"])
        self.train_seconds = float(state["train_seconds"])
        self.knn_seconds = float(state["knn_seconds"])
        self.history = list(state["history"])
        self.window_losses = list(state["window_losses"])
        if self.momentum_bank is not None:
            self.momentum_bank.load_(state["momentum_bank"])  # a bank, or the checkpoint's .npy file
        if self.target_bank is not None:
            self.target_bank.load_(state["target_bank"])
        if "round" in state:
            rnd = state["round"]
            self.round_ids = rnd["ids"]
            self.p = {k: v.clone().requires_grad_(True) for k, v in rnd["p"].items()}
            self.t, self.mom = rnd["t"], rnd["mom"]
            self._data = self._round_data(self.step // self.plan.sync_period)
        else:
            self.round_ids = None

    def summary(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "steps": self.step,
            "total_steps": plan.total_steps,
            "epochs": self.step / plan.steps_per_epoch,
            "images_seen": self.step * plan.batch_size,
            "num_clients": plan.num_clients,
            "clients_per_round": plan.clients_per_round,
            "client_batch_size": plan.client_batch_size,
            "batch_size": plan.batch_size,
            "sync_period": plan.sync_period,
            "client_params": count_params(self.client_module),
            "server_params": count_params(self.server),
            "bytes_up_total": self.bytes_up,
            "bytes_down_total": self.bytes_down,
            "bytes_per_client": (self.bytes_up + self.bytes_down) / plan.num_clients,
            "train_seconds": self.train_seconds,
            "knn_seconds": self.knn_seconds,
            "knn_overhead": self.knn_seconds / self.train_seconds if self.train_seconds else 0.0,
            "steps_per_s": self.step / self.train_seconds if self.train_seconds else 0.0,
            # O(N) per-client state (stateful momentum, unsynced targets); 0 for stateless clients.
            "client_state_mb": sum(b.nbytes for b in (self.momentum_bank, self.target_bank) if b) / 2**20,
        }
