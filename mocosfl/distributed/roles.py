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
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mocosfl.checkpoints import checkpoint_files, checkpoint_step, load_latest_checkpoint, save_checkpoint
from mocosfl.config import Config, ConfigError
from mocosfl.data.augment import normalize_only
from mocosfl.data.prepare import Normalization
from mocosfl.eval.knn import extract_features, knn_top1
from mocosfl.io import write_json
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


def role_rank(role: str | None, hosts: int) -> int:
    """The rank of a host's role: ``server`` is 0, client host ``H`` (0-based) is H + 1; without a role,
    torchrun's own rank (every rank on one host, as ``mocosfl pretrain`` launches them)."""
    if role is None:
        return int(os.environ["RANK"])
    if role == "server":
        return SERVER
    if not role.isdigit() or int(role) >= hosts:
        raise ConfigError(f"role {role!r} is invalid: `server` or a client host from 0 to {hosts - 1}")
    return int(role) + 1


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


def client_host_trainer(
    cfg: Config,
    host: int,
    pixels: Callable[[np.ndarray], np.ndarray],
    num_train: int,
    shards: list[np.ndarray],
    norm: Normalization,
    device: torch.device,
    bank_rows: np.ndarray | None = None,
) -> ClientHostTrainer:
    """Client host ``host``'s trainer, reading (through ``pixels``, training-set indices -> uint8 images)
    only the images of its own clients' shards."""
    owner = client_hosts_of(len(shards), cfg.distributed.client_hosts)
    own = np.sort(np.concatenate([shards[i] for i in np.flatnonzero(owner == host)]))
    images = LocalImages(pixels(own), num_train, own)
    return ClientHostTrainer(cfg, host, images, shards, norm.mean, norm.std, None, device, bank_rows=bank_rows)


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
        self.client_of = np.full(len(self.train_x), -1, dtype=np.int64)  # training image -> its client
        for i, shard in enumerate(self.shards):
            self.client_of[shard] = i
        self.sent_bytes = self.received_bytes = 0  # through torch.distributed, headers included
        self.sent_by_kind: dict[str, int] = {}  # sent_bytes by what was sent
        self.start_step = 0  # the step this process started (or resumed) at
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
            self.send(torch.cat([v.reshape(v.shape[0], -1) for v in rows.values()], dim=1), SERVER, "client models")
        dist.broadcast(mean, src=SERVER)
        if dist.get_rank() == SERVER:
            sent = mean.numel() * mean.element_size() * self.hosts
            self.sent_bytes += sent
            self.sent_by_kind["global model"] = self.sent_by_kind.get("global model", 0) + sent
        else:
            self.received_bytes += mean.numel() * mean.element_size()
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
            raise DistributedError(f"{rank_name(src)}: receiving {what} at step {self.step} failed ({e})") from None
        if sent != tuple(shape):
            raise DistributedError(
                f"{rank_name(src)} sent {what} of shape {list(sent)} at step {self.step}, expected {list(shape)}"
            )
        if not torch.isfinite(buf).all():
            raise DistributedError(f"{rank_name(src)} sent non-finite {what} at step {self.step}")
        self.received_bytes += _message_bytes(buf)
        return buf

    def send(self, tensor: torch.Tensor, dst: int, what: str) -> None:
        payload = tensor.detach().float().contiguous().cpu()
        try:
            dist.send(shape_header(payload.shape), dst=dst)
            dist.send(payload, dst=dst)
        except RuntimeError as e:
            raise DistributedError(f"sending {what} to {rank_name(dst)} at step {self.step} failed ({e})") from None
        self.sent_bytes += _message_bytes(payload)
        self.sent_by_kind[what] = self.sent_by_kind.get(what, 0) + _message_bytes(payload)

    def wire_summary(self) -> dict[str, Any]:
        """What this rank sent and received through torch.distributed since it started (payloads and
        headers, not TCP/IP's), and the steps that took."""
        return {
            "world_size": dist.get_world_size(),
            "dist_steps_this_session": self.step - self.start_step,
            "dist_sent_bytes_this_session": self.sent_bytes,
            "dist_received_bytes_this_session": self.received_bytes,
            "dist_sent_bytes_by_kind_this_session": dict(self.sent_by_kind),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.start_step = self.step


def _message_bytes(payload: torch.Tensor) -> int:
    return _HEADER * 8 + payload.numel() * payload.element_size()


def shape_header(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """A message's header: its payload's shape, padded with -1 to a fixed length."""
    if len(shape) > _HEADER:
        raise ValueError(f"a payload of {len(shape)} dimensions does not fit the {_HEADER}-slot header")
    header = torch.full((_HEADER,), -1, dtype=torch.long)
    header[: len(shape)] = torch.tensor(list(shape), dtype=torch.long)
    return header


def rank_name(rank: int) -> str:
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
                self.send(grad[r.to(grad.device)], h + 1, "gradients")
        return loss

    def summary(self) -> dict[str, Any]:
        return super().summary() | self.wire_summary()

    def knn_monitor(self) -> float | None:
        """The in-process monitor with the bank's images left on the client hosts: each sends the synced
        client model's activations of the bank images it holds, the server encodes them the rest of the way."""
        enc = self.encoder()  # a FedAvg: the client hosts join it at every monitor, bank or not
        k = self.knn
        if k is None:
            return None
        assert k.bank_rows is not None, "the server's kNN bank is given by its training-set indices"
        acts = torch.empty(len(k.bank_rows), *self.smashed_shape)
        owner = self.owner[self.client_of[k.bank_rows]]
        for h in range(self.hosts):
            mine = torch.from_numpy(owner == h)
            if mine.any():
                acts[mine] = self.receive((int(mine.sum()), *self.smashed_shape), h + 1, "kNN bank activations")
        e = self.cfg.evaluate
        with torch.no_grad():
            bank = [enc.backbone(a.to(self.device)).float().cpu() for a in acts.split(e.batch_size)]
        kw: dict[str, Any] = dict(mean=self.mean, std=self.std, image_size=self.cfg.data.image_size)
        queries = extract_features(enc, k.query_x, **kw, batch_size=e.batch_size, device=self.device)
        return knn_top1(torch.cat(bank), k.bank_y, queries, k.query_y, k.num_classes, e.knn_k, e.knn_temperature)


class ClientHostTrainer(_Rank):
    """Rank h + 1: client host h, holding its block of clients (models, state, images) and no server.

    ``run_host`` mirrors the server's loop: a step, the syncs it implies, and the FedAvg (``average``) at
    each kNN monitor and for the final encoder.
    """

    def __init__(self, cfg: Config, host: int, *args: Any, bank_rows: np.ndarray | None = None, **kwargs: Any):
        self.host = host
        self.bank_rows = bank_rows  # the kNN monitor's bank (training-set indices); None: no monitor
        super().__init__(cfg, *args, **kwargs)

    def setup_server(self) -> None:
        del self.server  # built with the client model (same initialisation as in process), not kept

    def owns(self, ids: np.ndarray) -> np.ndarray:
        return self.owner[ids] == self.host

    @property
    def num_own_clients(self) -> int:
        return int((self.owner == self.host).sum())

    @property
    def num_own_images(self) -> int:
        return len(self.train_x.own)  # type: ignore[attr-defined]

    def train_step(self) -> float:
        if not len(self.local_ids):  # none of this host's clients in the round
            self.step_samples()
            return math.nan
        lr = self._lr()
        h_q, h_k = self.client_forward(*self.step_views())
        self.send(torch.stack((h_q.detach(), h_k)), SERVER, "smashed data")
        grad = self.receive(tuple(h_q.shape), SERVER, "gradients").to(self.device)
        self.client_backward(h_q, grad, lr)
        return math.nan  # the loss is the server's

    def run_host(self, checkpoint_dir: Path) -> None:
        """Follow the server to the last step; checkpoint this host's state into ``checkpoint_dir`` at the
        steps the server checkpoints at, so a restarted run resumes every rank from the same step."""
        while self.step < self.plan.total_steps:
            self.advance()
            if self.knn_due():
                self.send_bank_activations()
            if self.checkpoint_due():
                save_checkpoint(checkpoint_dir, self.state_dict(), self.cfg.pretrain.keep_checkpoints)
        self.current_params()  # the server's final encoder
        write_json(checkpoint_dir / "wire.json", self.wire_summary())

    def send_bank_activations(self) -> None:
        """This host's part of the server's kNN monitor: join the FedAvg, then send the synced client
        model's activations of the bank images it holds, in bank order."""
        params = self.current_params()
        if self.bank_rows is None:
            return
        mine = self.bank_rows[self.owner[self.client_of[self.bank_rows]] == self.host]
        if not len(mine):
            return
        client, bs, size = self.global_client(params), self.cfg.evaluate.batch_size, self.cfg.data.image_size
        parts = []
        with torch.no_grad():
            for start in range(0, len(mine), bs):
                x = torch.from_numpy(self.train_x[mine[start : start + bs]]).to(self.device)
                parts.append(client(normalize_only(x, self.mean, self.std, size)))
        self.send(torch.cat(parts), SERVER, "kNN bank activations")

    def state_dict(self) -> dict[str, Any]:
        """The loop's counters and client state (open round's rows, unsynced bank) and the O(N) banks."""
        return RoundLoop.state_dict(self) | self.bank_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        RoundLoop.load_state_dict(self, state)
        self.load_banks(state)
        self.start_step = self.step


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
        raise DistributedError(f"{rank_name(dist.get_rank())} cannot read its checkpoint of step {step} in {directory}")
    trainer.load_state_dict(state)
