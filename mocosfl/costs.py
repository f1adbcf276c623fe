"""Client compute per image, counted by torch's FlopCounterMode on the layers a client actually runs.

Convention (FlopCounterMode's): 2 FLOPs per multiply-accumulate of convolutions and matrix products,
forward and backward; norms, activations, weight standardization and elementwise ops are not counted.
Bytes exchanged are counted by the trainers from the tensors they send (``bytes_up`` / ``bytes_down``).
"""

from __future__ import annotations

import copy
import resource
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mocosfl.config import Config
from mocosfl.models.resnet import Encoder, ServerModel, build_split_model
from mocosfl.sfl.trainer import moco_loss


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB = 2**20 bytes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward ops it runs)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def mocosfl_client_flops(cfg: Config, client_batch_size: int) -> float:
    """FLOPs per image of a MocoSFL client step at the configured cut.

    The client runs its online model on view 1 (graph kept), its EMA target on view 2 (no grad),
    and backprops the server's gradient through the online model.  Shape: views [b, 3, S, S].
    """
    m, s, b = cfg.model, cfg.data.image_size, client_batch_size
    client, _ = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
    target = copy.deepcopy(client).requires_grad_(False)
    view1, view2 = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)

    def step() -> None:
        h_q = client(view1)  # [b, C', H', W']
        with torch.no_grad():
            target(view2)
        h_q.backward(torch.ones_like(h_q))  # stands in for the server's dloss/dh_q

    return count_flops(step) / b


def flmoco_client_flops(cfg: Config, client_batch_size: int, local_queue_size: int) -> float:
    """FLOPs per image of an FL-MoCo client step: the whole MoCo step on its own b images.

    Online and target models on both views (symmetric loss), logits against its K/M local keys,
    backward through the whole online model.  Shape: views [b, 3, S, S], negatives [K/M, D].
    """
    m, s, b = cfg.model, cfg.data.image_size, client_batch_size
    client, server = build_split_model(m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_groups)
    model = ServerModel(Encoder(client, server.backbone), server.head)
    target = copy.deepcopy(model).requires_grad_(False)
    view1, view2 = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)
    negatives = F.normalize(torch.randn(local_queue_size, m.proj_dim), dim=1)

    def step() -> None:
        loss, _ = moco_loss(model, target, view1, view2, negatives, cfg.moco.temperature, cfg.moco.symmetric)
        loss.backward()

    return count_flops(step) / b
