"""The two roles of a distributed MocoSFL run: the server (rank 0) and the client hosts (ranks 1..W).

Both are ``MocoSFLTrainer``s on the same plan and seed, so every rank derives each round's participants,
their shard order, the augmentation parameters and the FedAvg weights by itself; only tensors whose
shapes follow from the plan cross the wire:

- every message is a fixed-size header with its payload's shape, then the payload;
- every step, each client host sends its participants' smashed data (h_q and h_k stacked,
  [2, M_h, b, C', H', W'] fp32) to the server and receives dloss/dh_q ([M_h, b, C', H', W']);
- every FedAvg (each sync, each kNN monitor, the final encoder), each client host uploads the models
  of its contributing clients ([K_h, P] fp32) to the server, which averages all K in the simulation's
  order and broadcasts the mean ([P]) back, so a distributed run reproduces the in-process one.

No object collectives and no pickles: a payload is a plain tensor received into a buffer of the
expected shape, and checked to be finite before use.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mocosfl.checkpoints import checkpoint_files, checkpoint_step, load_latest_checkpoint, save_checkpoint
from mocosfl.config import Config, ConfigError
from mocosfl.sfl import clients as C
from mocosfl.sfl.loop import RoundLoop, TrainLoop, cosine_lr
from mocosfl.sfl.trainer import MocoSFLTrainer

SERVER = 0  # the server's rank; client host h (0-based) is rank h + 1
_MAX_CHECKPOINTS = 16  # checkpoint steps a rank offers when the ranks agree on where to resume
_HEADER = 8  # slots of a message header (its payload's shape)


class DistributedError(RuntimeError):
    """A rank sent something unusable or stopped answering; the message names it."""


def client_hosts_of(num_clients: int, hosts: int) -> np.ndarray:
    """The client host (0-based) owning each client: contiguous blocks of ~N/W clients.  Shape: [N]."""
    if not 1 <= hosts <= num_clients:
        raise ConfigError(
            f"distributed.client_hosts={hosts} is invalid: must be between 1 and partition.num_clients={num_clients}"
        )
    return (np.arange(num_clients) * hosts) // num_clients


class LocalImages:
    """A client host's training images: only its own clients' shards, addressed by training-set index.

    Reading an image of another host's client raises: a host never holds (or trains on) those.
    """

    def __init__(self, source: np.ndarray, num_train: int, own: np.ndarray):
        self.own = np.sort(own)
        self.slot = np.full(num_train, -1, dtype=np.int64)
        self.slot[self.own] = np.arange(len(self.own))
        self.pixels = np.asarray(source)  # [len(own), H, W, 3] uint8, rows in self.own order

    def __len__(self) -> int:
        return len(self.slot)

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        slots = self.slot[idx]
        if (slots < 0).any():
            raise DistributedError("a client host was asked for an image of a client it does not own")
        return self.pixels[slots]


def _flat(tensors: C.Params) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in tensors.values()])


def _unflat_rows(rows: torch.Tensor, like: C.Params) -> C.Params:
    """[K, P] -> {name: [K, *shape]}, the inverse of concatenating each row's flattened tensors."""
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = rows[:, offset : offset + v.numel()].reshape(len(rows), *v.shape)
        offset += v.numel()
    return out


def _unflat(flat: torch.Tensor, like: C.Params) -> C.Params:
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = flat[offset : offset + v.numel()].view(v.shape)
        offset += v.numel()
    return out


class _Rank(MocoSFLTrainer):
    """What both roles share: ownership of clients, FedAvg over the wire, the wire's checks."""

    def setup(self) -> None:
        self.hosts = self.cfg.distributed.client_hosts
        self.owner = client_hosts_of(self.plan.num_clients, self.hosts)
        super().setup()
        s = self.cfg.data.image_size
        with torch.no_grad():  # C', H', W' of the smashed data: fixed by the model and the image size
            self.smashed_shape = tuple(self.client_module(torch.zeros(1, 3, s, s, device=self.device)).shape[1:])

    def host_rows(self, host: int) -> torch.Tensor:
        """Positions in the open round of client host ``host``'s participants ([M] bool)."""
        assert self.round_ids is not None
        return torch.from_numpy(self.owner[self.round_ids.numpy()] == host)

    def average(self, rows: C.Params, ids: np.ndarray, w: torch.Tensor, like: C.Params) -> C.Params:
        """FedAvg as clients do it: each client host uploads its contributors' models to the server, which
        averages all of them in the in-process order (so the result is the simulation's, bit for bit)
        and broadcasts the mean to every client host."""
        size = sum(v.numel() for v in like.values())
        owner = self.owner[ids]
        mean = torch.empty(size, dtype=torch.float32)
        if dist.get_rank() == SERVER:
            stacked = torch.empty(len(ids), size, dtype=torch.float32)
            for h in range(self.hosts):
                mine = torch.from_numpy(owner == h)
                if mine.any():
                    stacked[mine] = self.receive((int(mine.sum()), size), h + 1, "client models")
            mean = _flat(C.weighted_sum(_unflat_rows(stacked, like), w)).float()
        elif len(rows) and next(iter(rows.values())).shape[0]:
            self.send(torch.cat([v.reshape(v.shape[0], -1) for v in rows.values()], dim=1), SERVER)
        dist.broadcast(mean, src=SERVER)
        return {k: v.to(self.device, like[k].dtype).clone() for k, v in _unflat(mean, like).items()}

    def _lr(self) -> float:
        return cosine_lr(self.cfg.pretrain.lr, self.step, self.plan.total_steps)

    def receive(self, shape: tuple[int, ...], src: int, what: str) -> torch.Tensor:
        """One fp32 tensor of ``shape`` from rank ``src``; a wrong shape or a non-finite value stops the run.

        Each message is a fixed-size header (the payload's shape) then the payload: gloo aborts the whole
        process on a payload of unexpected size, so the shape is checked before the payload is read.
        """
        header = torch.empty(_HEADER, dtype=torch.long)
        buf = torch.empty(shape, dtype=torch.float32)
        try:
            dist.recv(header, src=src)
            sent = tuple(int(d) for d in header[header >= 0].tolist())
            if sent == tuple(shape):
                dist.recv(buf, src=src)
        except RuntimeError as e:
            raise DistributedError(f"{_name(src)}: receiving {what} at step {self.step} failed ({e})") from None
        if sent != tuple(shape):
            raise DistributedError(
                f"{_name(src)} sent {what} of shape {list(sent)} at step {self.step}, expected {list(shape)}"
            )
        if not torch.isfinite(buf).all():
            raise DistributedError(f"{_name(src)} sent non-finite {what} at step {self.step}")
        return buf

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        dist.send(shape_header(tensor.shape), dst=dst)
        dist.send(tensor.detach().float().contiguous().cpu(), dst=dst)


def shape_header(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A message's header: its payload's shape, padded with -1 to a fixed length."""
    if len(shape) > _HEADER:
        raise ValueError(f"a payload of {len(shape)} dimensions does not fit the {_HEADER}-slot header")
    header = torch.full((_HEADER,), -1, dtype=torch.long)
    header[: len(shape)] = torch.tensor(list(shape), dtype=torch.long)
    return header


def _name(rank: int) -> str:
    return "the server (rank 0)" if rank == SERVER else f"client host {rank - 1} (rank {rank})"


class ServerTrainer(_Rank):
    """Rank 0: the server model, its EMA target, optimizer and key queue; no client models, no images.

    It runs ``TrainLoop.run`` as in process (history, kNN monitor, metrics); the client models it needs
    for the monitor and the encoder come from FedAvg over the wire (``average``).
    """

    def owns(self, ids: np.ndarray) -> np.ndarray:
        return np.zeros(len(ids), dtype=bool)

    def train_step(self) -> float:
        assert self.round_ids is not None
        self.step_samples()  # bookkeeping only (distinct images); the pixels stay on the client hosts
        m, b = len(self.round_ids), self.plan.client_batch_size
        h_q = torch.empty(m, b, *self.smashed_shape)
        h_k = torch.empty_like(h_q)
        rows = [self.host_rows(h) for h in range(self.hosts)]
        for h, r in enumerate(rows):
            if r.any():
                both = self.receive((2, int(r.sum()), b, *self.smashed_shape), h + 1, "smashed data")
                h_q[r], h_k[r] = both[0], both[1]
        loss, grad = self.server_step(h_q.to(self.device), h_k.to(self.device), self._lr())
        for h, r in enumerate(rows):
            if r.any():
                self.send(grad[r.to(grad.device)], h + 1)
        return loss

    def knn_monitor(self) -> float | None:
        if self.knn is None:  # the client hosts join the FedAvg at every monitor: keep the schedule
            self.current_params()
        return super().knn_monitor()


class ClientHostTrainer(_Rank):
    """Rank h + 1: client host h, holding its block of clients (models, state, images) and no server.

    ``run_host`` mirrors the server's loop: a step, the syncs it implies, and the FedAvg (``average``) at
    each kNN monitor and for the final encoder.
    """

    def __init__(self, cfg: Config, host: int, *args: Any, **kwargs: Any):
        self.host = host
        super().__init__(cfg, *args, **kwargs)

    def setup_server(self) -> None:
        del self.server  # built with the client model (same initialisation as in process), not kept

    def owns(self, ids: np.ndarray) -> np.ndarray:
        return self.owner[ids] == self.host

    def train_step(self) -> float:
        if not len(self.local_ids):  # none of this host's clients in the round
            self.step_samples()
            return math.nan
        lr = self._lr()
        h_q, h_k = self.client_forward(*self.step_views())
        self.send(torch.stack((h_q.detach(), h_k)), SERVER)
        grad = self.receive(tuple(h_q.shape), SERVER, "gradients").to(self.device)
        self.client_backward(h_q, grad, lr)
        return math.nan  # the loss is the server's

    def run_host(self, checkpoint_dir: Path) -> None:
        """Follow the server to the last step; checkpoint this host's state into ``checkpoint_dir`` at the
        steps the server checkpoints at, so a restarted run resumes every rank from the same step."""
        while self.step < self.plan.total_steps:
            self.advance()
            if self.knn_due():
                self.current_params()
            if self.checkpoint_due():
                save_checkpoint(checkpoint_dir, self.state_dict(), self.cfg.pretrain.keep_checkpoints)
        self.current_params()  # the server's final encoder

    def state_dict(self) -> dict[str, Any]:
        """The loop's counters and client state (open round's rows, unsynced bank) and the O(N) banks."""
        return RoundLoop.state_dict(self) | self.bank_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        RoundLoop.load_state_dict(self, state)
        self.load_banks(state)


def agreed_checkpoint_step(directory: Path) -> int:
    """The newest step every rank holds a checkpoint of, each rank looking in its own ``directory``
    (0: start afresh). A collective: every rank calls it once, before training."""
    steps = [checkpoint_step(p) for p in checkpoint_files(directory)][-_MAX_CHECKPOINTS:]
    mine = torch.full((_MAX_CHECKPOINTS,), -1, dtype=torch.long)
    mine[: len(steps)] = torch.tensor(steps, dtype=torch.long)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    held = [{s for s in t.tolist() if s >= 0} for t in everyone]
    common = set.intersection(*held)
    if not common and any(held):  # starting afresh would silently throw the checkpoints away
        run = directory.parent if directory.name.startswith("client-host") else directory
        offered = ", ".join(str(sorted(h)) for h in held)
        raise DistributedError(
            f"the ranks hold checkpoints of different steps ({offered}) and none in common; delete {run} to start over"
        )
    return max(common, default=0)


def load_agreed_checkpoint(trainer: TrainLoop, directory: Path) -> None:
    """Resume ``trainer`` (this rank) from the newest checkpoint all ranks hold, if any."""
    step = agreed_checkpoint_step(directory)
    if not step:
        return
    state = load_latest_checkpoint(directory, step)
    if state is None:
        raise DistributedError(f"{_name(dist.get_rank())} cannot read its checkpoint of step {step} in {directory}")
    trainer.load_state_dict(state)
