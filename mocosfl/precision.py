"""Compute precision of the forward passes, clients' and server's (``pretrain.precision``): fp32, or bf16 autocast.

bf16 pays only where the hardware multiplies bf16 natively (CPUs with ``avx512_bf16``/``amx_bf16``, CUDA
devices with bf16); elsewhere it is emulated and slower, so ``auto`` picks fp32 there. Only the forward
passes run under autocast: master weights, optimizer state, EMA targets, the key queue, FedAvg, the
loss reduction and the smashed data and gradients on the wire stay fp32.
"""

from __future__ import annotations

import functools
import logging
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 in hardware."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return bool(cpu_flags() & NATIVE_BF16_CPU_FLAGS)


# Methods whose forward passes run inside ``torch.func.vmap``, where autocast has no effect: with torch
# 2.14 a convolution under bf16 autocast inside vmap still computes and returns fp32, and casting the
# input alone fails on the fp32 weight. They compute in fp32 whatever ``pretrain.precision`` says.
FP32_ONLY_METHODS = frozenset({"flmoco"})


def resolve_precision(name: str, device: torch.device, method: str = "mocosfl") -> str:
    """``auto`` -> ``bf16`` where the hardware has native bf16, else ``fp32``; explicit names stay;
    ``fp32`` for the methods in ``FP32_ONLY_METHODS``."""
    if method in FP32_ONLY_METHODS:
        if name == "bf16":
            log.warning("pretrain.precision=bf16: %s computes in fp32 (autocast has no effect in vmap)", method)
        return "fp32"
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and not native_bf16(device):
        log.warning("pretrain.precision=bf16 on %s without native bf16: emulated, likely slower than fp32", device)
    return name


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def compute_input(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A model's fp32 input in the precision its forward computes in (differentiable; fp32 gradients).

    Autocast casts the input of each matmul or convolution but not of the residual adds, so an fp32
    input to a ResNet stage would keep the whole residual stream of that stage in fp32 (fp32 + bf16 is
    fp32) and cast it again before every convolution. Casting once at the entry keeps the stream in
    bf16, as it is after a network's first convolution; this took ~0.3 s off a width-64 server step.
    """
    return x if precision == "fp32" else x.to(DTYPES[precision])
