"""Target-aware ResSFL (TAResSFL): an attacker-aware expert client that MocoSFL's clients start from.

Phase 1 (``ExpertTrainer``): a trusted party trains one split model (client + server, MoCo v2 as in
MocoSFL) on its own auxiliary images, plus ``taressfl.target_fraction`` of the clients' images, with the
ResSFL regulariser: a simulated attacker (an ``InversionDecoder``) learns to invert the client's smashed
data, and whenever its SSIM on the step's batch exceeds the target tau the client also descends
alpha * (SSIM - tau). One step:

1. the client computes h_q = f_c(view 1) and its EMA target h_k = f̄_c(view 2);
2. the server takes its MoCo step on (h_q, h_k) and returns g_c = dL/dh_q;
3. the simulator takes one Adam step on -SSIM(decoder(h_q), view 1 in [0, 1]), in train mode;
4. in eval mode it scores s = batch-mean SSIM(decoder(h_q), view 1); if s > tau (or tau = 0),
   g_r = alpha * ds/dh_q;
5. the client back-propagates g_c + g_r and takes its SGD step.

Phase 2 (``MocoSFLTrainer.load_expert``) starts every client, the server and both EMA targets from the
expert; with ``taressfl.freeze_clients`` the clients keep its weights (the reference's client lr 0).

Differences from the reference (``run_sflmoco_taressfl.py``): views are denormalised with the constants
they were normalised with (the reference used CIFAR-10's for every auxiliary set); the simulator uses the
attack's decoder (batch norm, PyTorch's default initialisation, constant lr) instead of Xavier init, a
GroupNorm variant below batch 20 and a step schedule; the expert is the last step's, not the step with the
best test kNN; a collapsed expert is reported as such (``collapse_reason``).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from mocosfl.data.augment import MocoV2Augment
from mocosfl.models.resnet import Encoder, count_params, split_model
from mocosfl.precision import autocast
from mocosfl.privacy.decoder import InversionDecoder
from mocosfl.privacy.metrics import ssim
from mocosfl.seeding import Stream, rng, torch_generator
from mocosfl.sfl.loop import TrainLoop, check_finite, cosine_lr, epoch_batch
from mocosfl.sfl.server import KeyQueue, ema_update_module, moco_backward

EXPERT_FORMAT = "mocosfl-taressfl-expert-v1"


def collapse_reason(
    knn_top1: float | None, loss: float | None, num_classes: int, queue_size: int, symmetric: bool = True
) -> str | None:
    """Why a MoCo run counts as collapsed, or None: kNN top-1 within 2 points of chance, or the loss within 1 %
    of the value of features that tell nothing apart (ln(K+1) per loss term: 17.40 for the symmetric loss at
    K = 6000)."""
    chance = 100.0 / num_classes
    if knn_top1 is not None and knn_top1 <= chance + 2.0:
        return f"kNN top-1 {knn_top1:.1f}% is at chance ({chance:.0f}%)"
    flat = (2 if symmetric else 1) * math.log(queue_size + 1)
    if loss is not None and abs(loss - flat) <= 0.01 * flat:
        return f"loss {loss:.2f} is at {'2' if symmetric else '1'} ln(K+1) = {flat:.2f}"
    return None


class ExpertTrainer(TrainLoop):
    """TAResSFL phase 1: one client and its server trained with MoCo plus the ResSFL regulariser.

    Constructed like every trainer, with ``train_x`` the expert's images and ``shards`` = [auxiliary
    indices] or [auxiliary, target] (``workflow.expert_data``); the config is the run's with the plan
    rewritten by ``workflow.expert_config`` (one "client" per image source, ``taressfl.batch_size`` each).
    """

    method = "expert"

    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.taressfl
        torch.manual_seed(cfg.seed)
        self.client, self.server = split_model(cfg.model)
        self.client.to(self.device)
        self.server.to(self.device)
        self.client_target = copy.deepcopy(self.client).requires_grad_(False)
        self.server_target = copy.deepcopy(self.server).requires_grad_(False)
        self.optimizer = torch.optim.SGD(
            [*self.client.parameters(), *self.server.parameters()],
            lr=cfg.pretrain.lr,
            momentum=cfg.pretrain.momentum,
            weight_decay=cfg.pretrain.weight_decay,
        )
        self.queue = KeyQueue(
            cfg.moco.queue_size, cfg.model.proj_dim, torch_generator(cfg.seed, Stream.QUEUE_INIT), self.device
        )
        a = cfg.augment
        self.augment = MocoV2Augment(
            cfg.data.image_size, self.mean, self.std, scale=a.crop_scale, blur_sigma=a.blur_sigma
        )
        size = cfg.data.image_size
        with torch.no_grad():
            c, s = self.client(torch.zeros(1, 3, size, size, device=self.device)).shape[1:3]
        with torch.random.fork_rng(devices=[]):  # the simulator's own initialisation stream
            torch.manual_seed(int(rng(cfg.seed, Stream.EXPERT_DECODER).integers(2**62)))
            self.decoder = InversionDecoder(c, s, size, t.decoder_width, t.decoder_blocks).to(self.device)
        self.decoder_optimizer = torch.optim.Adam(self.decoder.parameters(), lr=t.decoder_lr)
        self.ssim_history: list[float] = []  # the simulator's eval-mode SSIM at each step (before the client's step)
        self.hinge_steps = 0  # steps on which SSIM exceeded tau (the regulariser acted when alpha > 0)
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def step_images(self) -> np.ndarray:
        """This step's image indices: ``taressfl.batch_size`` from each source (auxiliary, then target)."""
        b, seed = self.plan.client_batch_size, self.cfg.seed

        def passes(source: int) -> Callable[[int], np.random.Generator]:
            return lambda e: rng(seed, Stream.EXPERT_EPOCH, source, e)

        return np.concatenate([epoch_batch(shard, self.step, b, passes(i)) for i, shard in enumerate(self.shards)])

    def advance(self) -> float:
        t0 = time.perf_counter()
        cfg = self.cfg
        idx = self.step_images()
        self.seen_images[idx] = True
        self.seen_clients[:] = True
        x = torch.from_numpy(np.ascontiguousarray(self.train_x[idx])).to(self.device)
        view1, view2 = self.augment.two_views(x, torch_generator(cfg.seed, Stream.EXPERT_AUGMENT, self.step))
        lr = cosine_lr(cfg.pretrain.lr, self.step, self.plan.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

        with autocast(self.precision, self.device):
            h_q = self.client(view1)
            with torch.no_grad():
                h_k = self.client_target(view2)
        h_q, h_k = h_q.float(), h_k.float()
        smashed_q = h_q.detach().requires_grad_(True)
        loss, keys = moco_backward(
            self.server,
            self.server_target,
            smashed_q,
            h_k,
            self.queue.keys,
            cfg.moco.temperature,
            cfg.moco.symmetric,
            self.precision,
        )
        check_finite(loss, self.step)
        grad = smashed_q.grad
        assert grad is not None
        grad = grad + self.regulariser_grad(h_q.detach(), view1 * self._std_t + self._mean_t)
        h_q.backward(grad)
        self.optimizer.step()
        ema_update_module(self.client_target, self.client, cfg.moco.ema)
        ema_update_module(self.server_target, self.server, cfg.moco.ema)
        self.queue.enqueue(keys)
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        return float(loss.item())

    def regulariser_grad(self, h: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Steps 3-4 of the module docstring: train the simulator on (h, images), then alpha * d(SSIM - tau)/dh
        when its SSIM exceeds tau (always when tau = 0), else zeros.
        Shape: h [B, C', H', W']; images [B, 3, S, S] in [0, 1]."""
        t = self.cfg.taressfl
        images = images.clamp(0.0, 1.0)  # bilinear resizing and float error can leave [0, 1] by a hair
        self.decoder.train()
        sim_loss = -ssim(self.decoder(h), images).mean()
        self.decoder_optimizer.zero_grad(set_to_none=True)
        sim_loss.backward()
        self.decoder_optimizer.step()

        self.decoder.eval()
        h = h.requires_grad_(True)
        score = ssim(self.decoder(h), images).mean()
        self.ssim_history.append(float(score.detach()))
        if t.target_ssim > 0 and score.item() <= t.target_ssim:  # tau = 0: no hinge, always alpha * dSSIM/dh
            return torch.zeros_like(h)
        self.hinge_steps += 1
        if t.alpha == 0:
            return torch.zeros_like(h)
        (grad,) = torch.autograd.grad(score, h)  # the decoder's own weights get nothing from this
        return t.alpha * grad

    def encoder(self) -> Encoder:
        return Encoder(copy.deepcopy(self.client), copy.deepcopy(self.server.backbone)).eval()

    def expert_payload(self) -> dict[str, Any]:
        """What phase 2 loads: client, server and both EMA targets (``MocoSFLTrainer.load_expert``)."""
        return {
            "format": EXPERT_FORMAT,
            "client": self.client.state_dict(),
            "client_target": self.client_target.state_dict(),
            "server": self.server.state_dict(),
            "server_target": self.server_target.state_dict(),
        }

    def state_dict(self) -> dict[str, Any]:
        return (
            super().state_dict()
            | self.expert_payload()
            | {
                "optimizer": self.optimizer.state_dict(),
                "queue": self.queue.state(),
                "decoder": self.decoder.state_dict(),
                "decoder_optimizer": self.decoder_optimizer.state_dict(),
                "ssim_history": self.ssim_history,
                "hinge_steps": self.hinge_steps,
            }
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.client.load_state_dict(state["client"])
        self.client_target.load_state_dict(state["client_target"])
        self.server.load_state_dict(state["server"])
        self.server_target.load_state_dict(state["server_target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.queue.load(state["queue"])
        self.decoder.load_state_dict(state["decoder"])
        self.decoder_optimizer.load_state_dict(state["decoder_optimizer"])
        self.ssim_history = list(state["ssim_history"])
        self.hinge_steps = int(state["hinge_steps"])

    def summary(self) -> dict[str, Any]:
        last = self.ssim_history[-max(1, len(self.ssim_history) // 10) :]
        return super().summary() | {
            "client_params": count_params(self.client),
            "server_params": count_params(self.server),
            "aux_images": len(self.shards[0]),
            "target_images": len(self.shards[1]) if len(self.shards) > 1 else 0,
            # The simulated attacker's SSIM over the last tenth of the steps, and how often the hinge acted.
            "simulator_ssim_final": float(np.mean(last)) if last else None,
            "hinge_active_fraction": self.hinge_steps / self.step if self.step else 0.0,
            "bytes_per_client": None,
            "sync_period": None,
        }
