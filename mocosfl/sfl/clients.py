"""Client models of one round stored stacked (leading dim = participant) and run as one call.

Every round starts from one global client model, so only the M participants' copies
differ; their weights, EMA targets and SGD momentum are [M, ...] tensors, and forward,
SGD, EMA and FedAvg are single tensor ops over that dimension (no loop over clients).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

Params = dict[str, torch.Tensor]


def module_params(module: nn.Module) -> Params:
    """Detached copy of a module's parameters (client models have no buffers)."""
    if any(True for _ in module.buffers()):
        raise ValueError("stacked client models must not have buffers (use GroupNorm, not BatchNorm)")
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def stack(params: Params, m: int) -> Params:
    """Broadcast one model to M participants.  Shape: [*] -> [M, *]."""
    return {k: v.unsqueeze(0).expand(m, *v.shape).clone() for k, v in params.items()}


def batched_forward(module: nn.Module, stacked: Params, x: torch.Tensor) -> torch.Tensor:
    """Run participant i's weights on its own micro-batch, all at once.

    Shape: x [M, b, C, H, W] -> [M, b, C', H', W'].
    """

    def one(p: Params, xi: torch.Tensor) -> torch.Tensor:
        return functional_call(module, p, (xi,))

    return vmap(one)(stacked, x)


@torch.no_grad()
def sgd_step(
    params: Params,
    grads: Params,
    momentum_buf: Params,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> None:
    """In-place SGD with momentum and L2 weight decay, the same rule as ``torch.optim.SGD``.

    A zero buffer gives ``buf = grad`` on the first step, which is torch's initialisation.
    """
    for name, p in params.items():
        d = grads[name].add(p, alpha=weight_decay) if weight_decay else grads[name]
        buf = momentum_buf[name]
        buf.mul_(momentum).add_(d)
        p.sub_(buf, alpha=lr)


@torch.no_grad()
def ema_update(target: Params, online: Params, tau: float) -> None:
    """target <- tau * target + (1 - tau) * online, in place (works stacked or not)."""
    for name, t in target.items():
        t.mul_(tau).add_(online[name], alpha=1.0 - tau)


@torch.no_grad()
def fedavg(stacked: Params, weights: torch.Tensor) -> Params:
    """Weighted mean over the participant dimension.  Shape: [M, *] -> [*].

    ``weights`` [M] need not be normalised; every participant counts once (the
    reference's averaging double-counted one client).
    """
    w = weights.to(dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for name, v in stacked.items():
        shape = (-1,) + (1,) * (v.dim() - 1)
        out[name] = (v.double() * w.view(shape)).sum(dim=0).to(v.dtype)
    return out


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def nbytes(params: Params) -> int:
    return sum(v.numel() * v.element_size() for v in params.values())


class ClientStateBank:
    """Per-client tensors for all N clients (O(N) memory), gathered/scattered per round.

    Used for stateful SGD momentum and for client targets when they are not synced.
    """

    def __init__(self, template: Params, num_clients: int, fill: str = "zeros"):
        self.tensors: Params = {}
        for name, v in template.items():
            if fill == "zeros":
                self.tensors[name] = torch.zeros((num_clients, *v.shape), dtype=v.dtype, device=v.device)
            else:
                self.tensors[name] = v.unsqueeze(0).repeat(num_clients, *([1] * v.dim()))

    def gather(self, ids: torch.Tensor) -> Params:
        return {k: v.index_select(0, ids.to(v.device)) for k, v in self.tensors.items()}

    @torch.no_grad()
    def scatter(self, ids: torch.Tensor, values: Params) -> None:
        for k, v in self.tensors.items():
            v.index_copy_(0, ids.to(v.device), values[k])
