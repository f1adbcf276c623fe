"""MocoSFL: N stacked clients and one MoCo server, in sampling rounds with FedAvg every ``sync_period`` steps.

The rounds, counters and checkpoints of the loop are ``mocosfl.sfl.loop.RoundLoop``'s; this module is
MocoSFL's own part: the split step, the server and its queue, and the O(N) client-state banks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mocosfl.models.resnet import Encoder, count_params, split_model
from mocosfl.precision import autocast
from mocosfl.seeding import Stream, torch_generator
from mocosfl.sfl import clients as C
from mocosfl.sfl.loop import (
    KnnData,
    Plan,
    RoundLoop,
    TrainingDiverged,
    TrainLoop,
    auto_client_batch_size,
    auto_clients_per_round,
    check_finite,
    cosine_lr,
    maybe_compile,
    resolve_device,
    resolve_plan,
)
from mocosfl.sfl.server import (
    KeyQueue,
    PerClientQueue,
    ema_update_module,
    local_queue_size,
    moco_backward,
    moco_loss,
    moco_terms,
)

# Names other modules have always imported from here.
__all__ = [
    "KnnData",
    "MocoSFLTrainer",
    "Plan",
    "TrainLoop",
    "TrainingDiverged",
    "auto_client_batch_size",
    "auto_clients_per_round",
    "cosine_lr",
    "maybe_compile",
    "moco_backward",
    "moco_loss",
    "moco_terms",
    "resolve_device",
    "resolve_plan",
]


class MocoSFLTrainer(RoundLoop):
    """Simulates N clients + one server on one machine; ``run`` trains, ``state_dict`` checkpoints."""

    def setup(self) -> None:
        super().setup()
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        m = cfg.model
        self.client_module, self.server = split_model(m)
        self.client_module.to(self.device)
        C.check_stackable(self.client_module)
        # TAResSFL phase 2 with frozen clients: they keep the expert's weights (no backward, no gradient sent).
        self.frozen_clients = cfg.taressfl.enabled and cfg.taressfl.freeze_clients
        self.setup_clients()
        self.setup_server()

    def setup_server(self) -> None:
        """The server's half: its model and EMA target, optimizer and key queue."""
        cfg, m = self.cfg, self.cfg.model
        self.server.to(self.device)
        self.server_target = split_model(m)[1].to(self.device)
        self.server_target.load_state_dict(self.server.state_dict())
        self.server_target.requires_grad_(False)
        # Compiled wrappers share parameters with the eager modules, so EMA, checkpoints and kNN
        # (which use the eager modules) see the same weights.
        self.server_fn = maybe_compile(self.server, cfg.pretrain.compile)
        self.server_target_fn = maybe_compile(self.server_target, cfg.pretrain.compile)
        self.optimizer = torch.optim.SGD(
            self.server.parameters(),
            lr=cfg.pretrain.lr,
            momentum=cfg.pretrain.momentum,
            weight_decay=cfg.pretrain.weight_decay,
        )
        self.setup_queue()

    def setup_clients(self, target: C.Params | None = None) -> None:
        """The clients' half: the global client model (``client_module``'s weights) and target (``target``,
        default a copy of the model), and the O(N) per-client state banks."""
        cfg, n = self.cfg, self.plan.num_clients
        self.global_params = C.module_params(self.client_module)
        source = self.global_params if target is None else target
        self.global_target = {k: v.detach().clone().to(self.device) for k, v in source.items()}
        bank = {
            "storage_dtype": getattr(torch, cfg.sfl.client_state_dtype),
            "file_dir": Path(cfg.pretrain.runs_dir) if cfg.sfl.client_state_storage == "file" else None,
        }
        self.momentum_bank = C.ClientStateBank(self.global_params, n, **bank) if cfg.sfl.stateful_clients else None
        self.target_bank = (
            None if cfg.sfl.sync_targets else C.ClientStateBank(self.global_target, n, fill="copy", **bank)
        )

    def setup_queue(self) -> None:
        """MoCo's key queue: shared by all clients (feature sharing), or one per client."""
        cfg, n = self.cfg, self.plan.num_clients
        queue_gen = torch_generator(cfg.seed, Stream.QUEUE_INIT)
        dim = cfg.model.proj_dim
        if cfg.moco.feature_sharing:
            self.queue: KeyQueue | PerClientQueue = KeyQueue(cfg.moco.queue_size, dim, queue_gen, self.device)
        else:
            # Without sharing each client contrasts against its own past keys.
            per_client = local_queue_size(cfg.moco.queue_size, self.plan.clients_per_round)
            self.queue = PerClientQueue(n, per_client, dim, queue_gen, self.device)

    # ------------------------------------------------------------------ client state across rounds

    @property
    def syncs_targets(self) -> bool:
        return self.target_bank is None

    @property
    def keeps_momentum(self) -> bool:
        return self.momentum_bank is not None

    def gather_client_state(self, ids: torch.Tensor) -> tuple[C.Params, C.Params]:
        """Stateful clients start from their own momentum, unsynced ones from their own target."""
        t = self.target_bank.gather(ids) if self.target_bank else C.stack(self.global_target, len(ids))
        mom = self.momentum_bank.gather(ids) if self.momentum_bank else C.zeros_like(self.p)
        return t, mom

    def keep_client_state(self, ids: torch.Tensor) -> None:
        if self.target_bank is not None:
            self.target_bank.scatter(ids, self.t)
        if self.momentum_bank is not None:
            self.momentum_bank.scatter(ids, self.mom)

    # ------------------------------------------------------------------ one step

    def train_step(self) -> float:
        """One split step: the clients' forward, the server's step on the concatenated batch, the
        clients' backward. ``mocosfl.distributed`` runs the same three parts in separate processes."""
        lr = cosine_lr(self.cfg.pretrain.lr, self.step, self.plan.total_steps)
        h_q, h_k = self.client_forward(*self.step_views())
        loss, grad = self.server_step(h_q.detach(), h_k, lr)
        self.client_backward(h_q, grad, lr)
        return loss

    def client_forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The local participants' smashed data: h_q with its graph, h_k without.

        Both compute in the run's precision, but the wire carries fp32 either way, so bytes sent do not
        depend on it. Shape: views [M_local, b, 3, S, S] -> each [M_local, b, C', H', W'] fp32.
        """
        with autocast(self.precision, self.device), torch.set_grad_enabled(not self.frozen_clients):
            h_q = C.batched_forward(self.client_module, self.p, view1)
            with torch.no_grad():
                h_k = C.batched_forward(self.client_module, self.t, view2)
        return h_q.float(), h_k.float()

    def server_step(self, h_q: torch.Tensor, h_k: torch.Tensor, lr: float) -> tuple[float, torch.Tensor]:
        """The server's part of a step on all M participants' smashed data: MoCo loss, backward, SGD,
        EMA, enqueue. Returns (loss, dloss/dh_q).  Shape: h_q, h_k [M, b, C', H', W']; grad as h_q."""
        cfg = self.cfg
        assert self.round_ids is not None
        m, b = h_q.shape[:2]
        # Vector concatenation: the server sees one batch of B = M*b smashed samples.
        smashed_q = h_q.flatten(0, 1).requires_grad_(True)  # [B, C', H', W']
        smashed_k = h_k.flatten(0, 1)
        self.bytes_up += smashed_q.numel() * smashed_q.element_size() * 2

        if isinstance(self.queue, KeyQueue):
            negatives = self.queue.keys  # no copy: the queue is only written after backward
        else:
            negatives = self.queue.negatives(self.round_ids.repeat_interleave(b).to(self.device))
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
            self.precision,
        )
        check_finite(loss, self.step)
        self.optimizer.step()
        ema_update_module(self.server_target, self.server, cfg.moco.ema)
        if isinstance(self.queue, KeyQueue):
            self.queue.enqueue(keys)
        else:
            per_client = keys.view(-1, m, b, keys.shape[-1]).transpose(0, 1).reshape(m, -1, keys.shape[-1])
            self.queue.enqueue(self.round_ids.to(self.device), per_client)  # [M, terms*b, D]
        # The server returns each client its slice of dloss/dh_q.
        grad = smashed_q.grad.view_as(h_q)  # type: ignore[union-attr]
        if not self.frozen_clients:  # frozen clients need no gradient
            self.bytes_down += grad.numel() * grad.element_size()
        return loss.item(), grad

    def client_backward(self, h_q: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """The local participants back-propagate the server's gradient, step SGD and their EMA targets.
        Shape: h_q, grad [M_local, b, C', H', W']."""
        cfg = self.cfg
        if self.frozen_clients:  # the targets still move towards the (fixed) online models
            C.ema_update(self.t, self.p, cfg.moco.ema)
            return
        names = list(self.p)
        grads = torch.autograd.grad(h_q, [self.p[k] for k in names], grad)
        C.sgd_step(
            self.p, dict(zip(names, grads, strict=True)), self.mom, lr, cfg.pretrain.momentum, cfg.pretrain.weight_decay
        )
        C.ema_update(self.t, self.p, cfg.moco.ema)

    def load_expert(self, expert: dict[str, Any]) -> None:
        """TAResSFL phase 2's start (before step 0): every client from the expert's client and its EMA target,
        the server and its target from the expert's (``mocosfl.privacy.taressfl``)."""
        if self.step:
            raise RuntimeError("load_expert: the run has already started")
        self.client_module.load_state_dict(expert["client"])
        self.setup_clients(target=expert["client_target"])
        self.server.load_state_dict(expert["server"])
        self.server_target.load_state_dict(expert["server_target"])

    # ------------------------------------------------------------------ evaluation

    def global_client(self, params: C.Params) -> nn.Module:
        """A client model holding ``params`` (the synced global model), in eval mode."""
        m = self.cfg.model
        client, _ = split_model(m)
        client.load_state_dict({k: v.detach().clone() for k, v in params.items()})
        return client.to(self.device).eval()

    def encoder(self) -> Encoder:
        """The current encoder (client global model + server backbone) as a plain module."""
        return Encoder(self.global_client(self.current_params()), copy.deepcopy(self.server.backbone)).eval()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            server=self.server.state_dict(),
            server_target=self.server_target.state_dict(),
            optimizer=self.optimizer.state_dict(),
            queue=self.queue.state(),
        )
        return state | self.bank_state()

    def bank_state(self) -> dict[str, Any]:
        """The O(N) client-state banks a checkpoint holds (each saved to its own file by save_checkpoint)."""
        banks = {"momentum_bank": self.momentum_bank, "target_bank": self.target_bank}
        return {name: bank for name, bank in banks.items() if bank is not None}

    def load_banks(self, state: dict[str, Any]) -> None:
        """Refill the banks from a checkpoint: a bank, or the checkpoint's .npy file."""
        if self.momentum_bank is not None:
            self.momentum_bank.load_(state["momentum_bank"])
        if self.target_bank is not None:
            self.target_bank.load_(state["target_bank"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.server.load_state_dict(state["server"])
        self.server_target.load_state_dict(state["server_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queue.load(state["queue"])
        self.load_banks(state)

    def summary(self) -> dict[str, Any]:
        return super().summary() | {
            "client_params": count_params(self.client_module),
            "server_params": count_params(self.server),
            # O(N) per-client state (stateful momentum, unsynced targets); 0 for stateless clients.
            "client_state_mb": sum(b.nbytes for b in (self.momentum_bank, self.target_bank) if b) / 2**20,
        }
