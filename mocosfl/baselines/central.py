"""Centralized MoCo v2: one unsplit encoder on pooled data, batch B, the same symmetric loss.

It is MocoSFL's ceiling at equal budget and the yardstick for simulation overhead. ``CentralMoco``
is one step; ``CentralTrainer`` runs it for a MocoSFL plan's steps at its batch B, with checkpoints.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch

from mocosfl.config import Config
from mocosfl.data.augment import MocoV2Augment
from mocosfl.models.resnet import Encoder, ServerModel, count_params, split_model
from mocosfl.precision import resolve_precision
from mocosfl.seeding import Stream, rng, torch_generator
from mocosfl.sfl.loop import TrainLoop, check_finite, cosine_lr, epoch_batch, maybe_compile
from mocosfl.sfl.server import KeyQueue, ema_update_module, moco_backward


class CentralMoco:
    def __init__(
        self,
        cfg: Config,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        batch_size: int,
        total_steps: int,
        device: torch.device | str = "cpu",
    ):
        self.cfg = cfg
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.device = torch.device(device)
        self.precision = resolve_precision(cfg.pretrain.precision, self.device)
        torch.set_flush_denormal(True)  # as in MocoSFLTrainer: subnormals slow CPU convolutions ~10x
        torch.manual_seed(cfg.seed)
        m = cfg.model
        client, server = split_model(m)
        # The whole network is the "server" and the smashed data are the images themselves.
        self.model = ServerModel(Encoder(client, server.backbone), server.head).to(self.device)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.model_fn = maybe_compile(self.model, cfg.pretrain.compile)
        self.target_fn = maybe_compile(self.target, cfg.pretrain.compile)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=cfg.pretrain.lr,
            momentum=cfg.pretrain.momentum,
            weight_decay=cfg.pretrain.weight_decay,
        )
        self.queue = KeyQueue(
            cfg.moco.queue_size, m.proj_dim, torch_generator(cfg.seed, Stream.QUEUE_INIT), self.device
        )
        self.augment = MocoV2Augment(
            cfg.data.image_size, mean, std, scale=cfg.augment.crop_scale, blur_sigma=cfg.augment.blur_sigma
        )
        self.step = 0

    def train_step(self, images: np.ndarray) -> float:
        """One step on uint8 images [B, H, W, 3]."""
        cfg = self.cfg
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        view1, view2 = self.augment.two_views(x, torch_generator(cfg.seed, Stream.AUGMENT, self.step))
        lr = cosine_lr(cfg.pretrain.lr, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss, keys = moco_backward(
            self.model_fn,
            self.target_fn,
            view1,
            view2,
            self.queue.keys,
            cfg.moco.temperature,
            cfg.moco.symmetric,
            self.precision,
        )
        self.optimizer.step()
        ema_update_module(self.target, self.model, cfg.moco.ema)
        self.queue.enqueue(keys)
        self.step += 1
        return loss.item()


class CentralTrainer(TrainLoop):
    """Centralized MoCo on the images the clients hold, pooled, for a MocoSFL plan's steps at its batch B.

    Same constructor as ``MocoSFLTrainer``: the shards only define the pool and the plan (B = M*b and
    the step count), so both see the same number of images. Each epoch is a fresh seeded permutation
    of the pool, cut into consecutive batches (without replacement within an epoch).
    """

    method = "central"

    def setup(self) -> None:
        cfg, mean, std = self.cfg, self.mean, self.std
        self.pool = np.sort(np.concatenate(self.shards))  # [n] training-image indices the clients hold
        self.moco = CentralMoco(cfg, mean, std, self.plan.batch_size, self.plan.total_steps, self.device)

    def batch_indices(self, step: int) -> np.ndarray:
        """Training-image indices of one step.  Shape: [B] (a batch may straddle two epochs)."""
        seed = self.cfg.seed
        return epoch_batch(self.pool, step, self.plan.batch_size, lambda e: rng(seed, Stream.CENTRAL_EPOCH, e))

    def advance(self) -> float:
        t0 = time.perf_counter()
        self.moco.step = self.step
        idx = self.batch_indices(self.step)
        self.seen_images[idx] = True
        loss = self.moco.train_step(self.train_x[idx])
        check_finite(loss, self.step)
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        return loss

    def encoder(self) -> Encoder:
        enc = copy.deepcopy(self.moco.model.backbone)
        assert isinstance(enc, Encoder)
        return enc.eval()

    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {
            "model": self.moco.model.state_dict(),
            "target": self.moco.target.state_dict(),
            "optimizer": self.moco.optimizer.state_dict(),
            "queue": self.moco.queue.state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.moco.model.load_state_dict(state["model"])
        self.moco.target.load_state_dict(state["target"])
        self.moco.optimizer.load_state_dict(state["optimizer"])
        self.moco.queue.load(state["queue"])

    def summary(self) -> dict[str, Any]:
        # num_clients and batch_size are the MocoSFL plan's whose budget this run matches.
        return super().summary() | {
            "sync_period": None,
            "distinct_clients": None,  # the pooled images, not clients
            "client_params": None,
            "server_params": count_params(self.moco.model),
            "bytes_per_client": None,
        }
