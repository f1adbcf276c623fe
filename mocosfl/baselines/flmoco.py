"""FL-MoCo: classic federated self-supervised learning, the baseline family MocoSFL is compared with.

Each round's participants train the *whole* encoder + projection head locally with the same MoCo v2
loss on their own shard (local EMA target, local queue), then the server FedAvgs the full models.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.func import functional_call, vmap

from mocosfl.config import Config
from mocosfl.models.resnet import Encoder, ServerModel, build_split_model, count_params
from mocosfl.seeding import Stream, torch_generator
from mocosfl.sfl import clients as C
from mocosfl.sfl.loop import RoundLoop, check_finite, cosine_lr
from mocosfl.sfl.server import PerClientQueue, local_queue_size, moco_loss


def build_full_model(cfg: Config) -> ServerModel:
    """The unsplit network (encoder + head), initialised as ``CentralMoco``'s from ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    m = cfg.model
    client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
    return ServerModel(Encoder(client, server.backbone), server.head)


class FLMocoTrainer(RoundLoop):
    """Federated MoCo on the same plan as MocoSFL: rounds of ``sfl.sync_period`` local steps.

    The participants, their batch b and the images they read each step are MocoSFL's (same seeds),
    so both see M*b images per step. Each participant keeps a local queue of K/M keys for the round
    (stateless clients: queue and SGD momentum start afresh when a client is sampled); at the round's
    end the online models and the EMA targets are FedAvg'd into the next round's global model.
    Participants are stacked ([M, ...] weights) and run as one ``vmap`` call: measured on 2 CPU cores
    at width 16, M=20, b=1 it is ~5x faster than a Python loop over clients.
    """

    def setup(self) -> None:
        super().setup()
        self.module = build_full_model(self.cfg).to(self.device)
        self.global_params = C.module_params(self.module)
        self.global_target = {k: v.clone() for k, v in self.global_params.items()}
        self.queue_size = local_queue_size(self.cfg.moco.queue_size, self.plan.clients_per_round)
        self.queue: PerClientQueue | None = None  # the open round's local queues

    # ------------------------------------------------------------------ rounds

    def new_queue(self, r: int, m: int) -> PerClientQueue:
        """Round r's M fresh local queues of K/M keys each."""
        # Indexed by position in the round, not by client id: a queue lives for one round.
        gen = torch_generator(self.cfg.seed, Stream.FLMOCO_QUEUE, r)
        return PerClientQueue(m, self.queue_size, self.cfg.model.proj_dim, gen, self.device)

    def begin_round(self, r: int) -> None:
        super().begin_round(r)
        assert self.round_ids is not None
        self.queue = self.new_queue(r, len(self.round_ids))

    def end_round(self) -> None:
        super().end_round()
        self.queue = None

    # ------------------------------------------------------------------ one step

    def _client_loss(
        self, p: C.Params, t: C.Params, view1: torch.Tensor, view2: torch.Tensor, negatives: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One participant's MoCo loss on its own views and queue.  Shape: views [b, 3, S, S],
        negatives [K/M, D] -> (loss [], keys [terms*b, D])."""
        cfg = self.cfg
        return moco_loss(
            lambda x: functional_call(self.module, p, (x,)),
            lambda x: functional_call(self.module, t, (x,)),
            view1,
            view2,
            negatives,
            cfg.moco.temperature,
            cfg.moco.symmetric,
            self.precision,
        )

    def train_step(self) -> float:
        cfg = self.cfg
        assert self.round_ids is not None and self.queue is not None
        view1, view2 = self.step_views()
        losses, keys = vmap(self._client_loss)(self.p, self.t, view1, view2, self.queue.keys)  # [M], [M, n, D]
        check_finite(losses, self.step)
        names = list(self.p)
        # Client i's loss depends only on its own weights, so one backward of the sum gives each its gradient.
        grads = torch.autograd.grad(losses.sum(), [self.p[k] for k in names])
        lr = cosine_lr(cfg.pretrain.lr, self.step, self.plan.total_steps)
        C.sgd_step(
            self.p, dict(zip(names, grads, strict=True)), self.mom, lr, cfg.pretrain.momentum, cfg.pretrain.weight_decay
        )
        C.ema_update(self.t, self.p, cfg.moco.ema)
        self.queue.enqueue(torch.arange(len(self.round_ids), device=self.device), keys)
        return losses.mean().item()

    # ------------------------------------------------------------------ evaluation, checkpoints

    def encoder(self) -> Encoder:
        model = copy.deepcopy(self.module)
        model.load_state_dict({k: v.detach().clone() for k, v in self.current_params().items()})
        enc = model.backbone
        assert isinstance(enc, Encoder)
        return enc.eval()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.queue is not None:
            state["round"]["queue"] = self.queue.state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.queue = None
        if "round" in state:
            self.queue = self.new_queue(self.step // self.plan.sync_period, len(state["round"]["ids"]))
            self.queue.load(state["round"]["queue"])

    def summary(self) -> dict[str, Any]:
        return super().summary() | {
            "local_queue_size": self.queue_size,
            "client_params": count_params(self.module),
        }
