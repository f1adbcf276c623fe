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
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from mocosfl.config import Config
from mocosfl.models.resnet import Encoder, ServerModel, count_params, split_model
from mocosfl.sfl.server import local_queue_size
from mocosfl.sfl.trainer import Plan, moco_loss


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB = 2**20 bytes)."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _conv_backward_flop(
    grad_out_shape: list[int],
    x_shape: list[int],
    w_shape: list[int],
    _bias: object,
    _stride: object,
    _padding: object,
    _dilation: object,
    transposed: bool,
    _output_padding: object,
    groups: int,
    output_mask: list[bool],
    out_shape: tuple[list[int] | None, ...],
    **_: object,
) -> int:
    """torch's convolution_backward formula with grad_weight divided by ``groups``.

    torch (2.14) counts a grouped convolution's weight gradient as if groups were 1, i.e. G times too
    much. Stacked clients (folded for MocoSFL, vmap for FL-MoCo) run each client convolution as one
    grouped convolution (G = M participants), so uncorrected a cut-5 MocoSFL step counted 3.8 TFLOP
    instead of ~0.9.
    """

    def t(shape: list[int]) -> list[int]:
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0] and out_shape[0] is not None:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1] and out_shape[1] is not None:
        if transposed:
            flops += conv_flop_count(t(grad_out_shape), t(x_shape), t(out_shape[1]), transposed=False) // groups
        else:
            flops += conv_flop_count(t(x_shape), t(grad_out_shape), t(out_shape[1]), transposed=False) // groups
    return flops


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward ops it runs), grouped convolutions counted right."""
    counter = FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flop})
    with counter:
        fn()
    return int(counter.get_total_flops())


def mocosfl_client_flops(cfg: Config, client_batch_size: int) -> float:
    """FLOPs per image of a MocoSFL client step at the configured cut.

    The client runs its online model on view 1 (graph kept), its EMA target on view 2 (no grad),
    and backprops the server's gradient through the online model (frozen TAResSFL clients do not).
    Shape: views [b, 3, S, S].
    """
    m, s, b = cfg.model, cfg.data.image_size, client_batch_size
    client, _ = split_model(m)
    target = copy.deepcopy(client).requires_grad_(False)
    view1, view2 = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)

    frozen = cfg.taressfl.enabled and cfg.taressfl.freeze_clients  # TAResSFL phase 2: forward passes only

    def step() -> None:
        with torch.set_grad_enabled(not frozen):
            h_q = client(view1)  # [b, C', H', W']
        with torch.no_grad():
            target(view2)
        if not frozen:
            h_q.backward(torch.ones_like(h_q))  # stands in for the server's dloss/dh_q

    return count_flops(step) / b


def flmoco_client_flops(cfg: Config, client_batch_size: int, local_queue_size: int) -> float:
    """FLOPs per image of an FL-MoCo client step: the whole MoCo step on its own b images.

    Online and target models on both views (symmetric loss), logits against its K/M local keys,
    backward through the whole online model.  Shape: views [b, 3, S, S], negatives [K/M, D].
    """
    m, s, b = cfg.model, cfg.data.image_size, client_batch_size
    client, server = split_model(m)
    model = ServerModel(Encoder(client, server.backbone), server.head)
    target = copy.deepcopy(model).requires_grad_(False)
    view1, view2 = torch.randn(b, 3, s, s), torch.randn(b, 3, s, s)
    negatives = F.normalize(torch.randn(local_queue_size, m.proj_dim), dim=1)

    def step() -> None:
        loss, _ = moco_loss(model, target, view1, view2, negatives, cfg.moco.temperature, cfg.moco.symmetric)
        loss.backward()

    return count_flops(step) / b


def client_cost(method: str, cfg: Config, plan: Plan | None) -> tuple[int | None, float | None]:
    """(parameters a client holds, FLOPs per image of its step) for ``method`` at ``plan``.

    MocoSFL clients hold the client model only; FL-MoCo clients the whole encoder and head and their
    own K/M-key queue. None for methods without clients (central) or without training (``plan`` None).
    """
    if plan is None or method == "central":
        return None, None
    m = cfg.model
    client, server = split_model(m)
    if method == "mocosfl":
        return count_params(client), mocosfl_client_flops(cfg, plan.client_batch_size)
    if method == "flmoco":
        queue = local_queue_size(cfg.moco.queue_size, plan.clients_per_round)
        return count_params(client) + count_params(server), flmoco_client_flops(cfg, plan.client_batch_size, queue)
    raise ValueError(f"unknown method {method!r} (known: mocosfl, central, flmoco)")
