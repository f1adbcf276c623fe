"""Centralized MoCo v2: one unsplit encoder on pooled data, batch B, the same symmetric loss.

It is MocoSFL's ceiling at equal budget and the yardstick for simulation overhead.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from mocosfl.config import Config
from mocosfl.data.augment import MocoV2Augment
from mocosfl.models.resnet import Encoder, ServerModel, build_split_model
from mocosfl.sfl.server import KeyQueue, ema_update_module
from mocosfl.sfl.trainer import _torch_gen, cosine_lr, moco_loss


class CentralMoco:
    def __init__(self, cfg: Config, mean: tuple[float, float, float], std: tuple[float, float, float],
                 batch_size: int, total_steps: int, device: torch.device | str = "cpu"):
        self.cfg = cfg
        self.batch_size = batch_size
        self.total_steps = total_steps
        self.device = torch.device(device)
        torch.set_flush_denormal(True)  # as in MocoSFLTrainer: subnormals slow CPU convolutions ~10x
        torch.manual_seed(cfg.seed)
        m = cfg.model
        client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
        # The whole network is the "server" and the smashed data are the images themselves.
        self.model = ServerModel(Encoder(client, server.backbone), server.head).to(self.device)
        self.target = copy.deepcopy(self.model).requires_grad_(False)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.pretrain.lr,
                                         momentum=cfg.pretrain.momentum, weight_decay=cfg.pretrain.weight_decay)
        self.queue = KeyQueue(cfg.moco.queue_size, m.proj_dim, _torch_gen(cfg.seed, 7), self.device)
        self.augment = MocoV2Augment(cfg.data.image_size, mean, std)
        self.step = 0

    def train_step(self, images: np.ndarray) -> float:
        """One step on uint8 images [B, H, W, 3]."""
        cfg = self.cfg
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        view1, view2 = self.augment.two_views(x, _torch_gen(cfg.seed, 3, self.step))
        lr = cosine_lr(cfg.pretrain.lr, self.step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, keys = moco_loss(self.model, self.target, view1, view2, self.queue.keys.clone(),
                               cfg.moco.temperature, cfg.moco.symmetric)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        ema_update_module(self.target, self.model, cfg.moco.ema)
        self.queue.enqueue(keys)
        self.step += 1
        return loss.item()
