"""Client models of one round stored stacked (leading dim = participant) and run as one call.

Every round starts from one global client model, so only the M participants' copies
differ; their weights, EMA targets and SGD momentum are [M, ...] tensors, and forward,
SGD, EMA and FedAvg are single tensor ops over that dimension (no loop over clients).
The forward folds the participants into channels and runs the model's own layers as
grouped ones (see mocosfl.models.resnet), which needs no vmap.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from mocosfl.models.resnet import Conv2d, GroupNorm

Params = dict[str, torch.Tensor]


def module_params(module: nn.Module) -> Params:
    """Detached copy of a module's parameters (client models have no buffers)."""
    if any(True for _ in module.buffers()):
        raise ValueError("stacked client models must not have buffers (use GroupNorm, not BatchNorm)")
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def stack(params: Params, m: int) -> Params:
    """Broadcast one model to M participants.  Shape: [*] -> [M, *]."""
    return {k: v.unsqueeze(0).expand(m, *v.shape).clone() for k, v in params.items()}


# Layers that run stacked weights on folded input; parameter-free modules (ReLU, Sequential, the
# residual blocks) only route tensors and need nothing.
STACKABLE = (Conv2d, GroupNorm)  # WSConv2d is a Conv2d


def check_stackable(module: nn.Module) -> None:
    """Raise ValueError unless every layer holding parameters can run stacked (see ``batched_forward``)."""
    for name, sub in module.named_modules():
        if any(True for _ in sub.parameters(recurse=False)) and not isinstance(sub, STACKABLE):
            raise ValueError(
                f"client layer {name or 'module'!r} ({type(sub).__name__}) cannot run stacked "
                "clients: build the client model from mocosfl.models.resnet's Conv2d/WSConv2d and GroupNorm"
            )


def batched_forward(module: nn.Module, stacked: Params, x: torch.Tensor) -> torch.Tensor:
    """Run participant i's weights on its own micro-batch, all at once.

    The participants are folded into channels, [b, M*C, H, W], and the module's layers run them as
    grouped ones (one convolution with groups=M per layer, not M convolutions); the result is a view
    of their folded output.
    Shape: x [M, b, C, H, W] -> [M, b, C', H', W'].
    """
    m = x.shape[0]
    folded = x.transpose(0, 1).flatten(1, 2)  # [b, M*C, H, W]
    out = functional_call(module, stacked, (folded,))  # [b, M*C', H', W']
    return out.unflatten(1, (m, -1)).transpose(0, 1)


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
    return {k: v.to(stacked[k].dtype) for k, v in weighted_sum(stacked, w / w.sum()).items()}


@torch.no_grad()
def weighted_sum(stacked: Params, weights: torch.Tensor) -> Params:
    """Sum over the participant dimension with ``weights`` [M], in float64.  Shape: [M, *] -> [*]."""
    out = {}
    for name, v in stacked.items():
        shape = (-1,) + (1,) * (v.dim() - 1)
        out[name] = (v.double() * weights.to(v.device, torch.float64).view(shape)).sum(dim=0)
    return out


def zeros_like(params: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in params.items()}


def nbytes(params: Params) -> int:
    return sum(v.numel() * v.element_size() for v in params.values())


def join_parts(parts: dict[str, Params]) -> Params:
    """Several named parameter sets as one flat dict, for one bank: {"p": {"w": x}} -> {"p.w": x}."""
    return {f"{part}.{k}": v for part, params in parts.items() for k, v in params.items()}


def split_parts(flat: Params) -> dict[str, Params]:
    """Inverse of :func:`join_parts`: {"p.w": x, "t.w": y} -> {"p": {"w": x}, "t": {"w": y}}."""
    parts: dict[str, Params] = {}
    for name, v in flat.items():
        part, key = name.split(".", 1)
        parts.setdefault(part, {})[key] = v
    return parts


class ClientStateBank:
    """Per-client copies of one parameter set for all N clients, gathered/scattered per round.

    Used for stateful SGD momentum and for client targets when they are not synced. Stored as one
    [N, P] tensor (P = parameters per client), so the O(N) state costs exactly N * P * element bytes
    and is written to and read from checkpoints as one contiguous block (``save``/``load_``).

    With ``file_dir`` the tensor is a shared memory map of a scratch file in that folder (unlinked at
    once, so nothing is left behind however the process ends): after every gather, scatter, save or
    load the mapped pages are handed back to the kernel, so the process holds only the round's M
    rows and the rest lives in the page cache or on disk, for N beyond what RAM should hold.
    """

    def __init__(
        self,
        template: Params,
        num_clients: int,
        fill: str = "zeros",
        storage_dtype: torch.dtype | None = None,
        file_dir: Path | None = None,
    ):
        """``storage_dtype`` (default: the template's) may be narrower, e.g. bfloat16 to halve the
        bank; values are rounded to it on ``scatter`` and handed out in the template's dtype."""
        if fill not in ("zeros", "copy"):
            raise ValueError(f"fill must be 'zeros' or 'copy', not {fill!r}")
        dtypes = {v.dtype for v in template.values()}
        if len(dtypes) != 1:
            raise ValueError(f"a state bank holds one dtype, got {sorted(map(str, dtypes))}")
        first = next(iter(template.values()))
        self.dtype = first.dtype  # what gather returns
        self.shapes = {k: v.shape for k, v in template.items()}
        self.sizes = [v.numel() for v in template.values()]
        shape, dtype = (num_clients, sum(self.sizes)), storage_dtype or first.dtype
        self._map: mmap.mmap | None = None
        if file_dir is None:
            self.flat = torch.empty(shape, dtype=dtype, device=first.device)
        else:
            if first.device.type != "cpu":
                raise ValueError("a file-backed client state bank lives on the CPU")
            nbytes = shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size()
            Path(file_dir).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".client-state-", dir=file_dir)
            try:
                os.unlink(name)  # the mapping keeps the data; the disk space goes when the process does
                os.ftruncate(fd, nbytes)
                self._map = mmap.mmap(fd, nbytes)  # MAP_SHARED: pages can be dropped and re-read
            finally:
                os.close(fd)
            self.flat = torch.frombuffer(self._map, dtype=dtype).view(shape)
        # Every value is written, block by block, so the state is really there from the start
        # (resident in memory, or in the file), not lazily zero pages.
        row = flatten({k: v.unsqueeze(0) for k, v in template.items()}).to(dtype)
        for lo in range(0, shape[0], self._block_rows()):
            block = self.flat[lo : lo + self._block_rows()]
            if fill == "zeros":
                block.zero_()
            else:
                block.copy_(row.expand_as(block))
            self.release()

    def _block_rows(self) -> int:
        return max(1, _READ_BLOCK // max(1, self.flat.shape[1] * self.flat.element_size()))

    def release(self) -> None:
        """Hand a file-backed bank's pages back to the kernel (they stay in the file); no-op in memory."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)

    @property
    def tensors(self) -> Params:
        """Per-parameter views [N, *shape] of the bank (no copy)."""
        return _unflatten(self.flat, self.shapes, self.sizes)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def gather(self, ids: torch.Tensor) -> Params:
        """Copies of the given clients' state.  Shape per parameter: [M, *shape]."""
        rows = self.flat.index_select(0, ids.to(self.flat.device)).to(self.dtype)
        self.release()
        return {k: v.contiguous() for k, v in _unflatten(rows, self.shapes, self.sizes).items()}

    @torch.no_grad()
    def scatter(self, ids: torch.Tensor, values: Params) -> None:
        rows = flatten({k: values[k] for k in self.shapes}).to(self.flat.dtype)
        self.flat.index_copy_(0, ids.to(self.flat.device), rows)
        self.release()

    def save(self, path: Path) -> None:
        """Write the bank as a .npy file, block by block (never a second copy in memory)."""
        arr = _numpy_view(self.flat[:1].cpu())
        header = {
            "descr": np.lib.format.dtype_to_descr(arr.dtype),
            "fortran_order": False,
            "shape": tuple(self.flat.shape),
        }
        with open(path, "wb") as f:
            np.lib.format.write_array_header_2_0(f, header)
            for lo in range(0, self.flat.shape[0], self._block_rows()):
                block = self.flat[lo : lo + self._block_rows()].cpu().contiguous()
                f.write(memoryview(_numpy_view(block)).cast("B"))  # type: ignore[arg-type]  # a buffer
                self.release()

    @torch.no_grad()
    def load_(self, source: ClientStateBank | torch.Tensor | str | os.PathLike[str]) -> None:
        """Fill the bank from another bank, a tensor of the same shape or a file written by ``save``.

        A file is read straight into the bank's memory, block by block: resuming never holds a
        second copy of an O(N) bank.
        """
        if isinstance(source, ClientStateBank):
            source = source.flat
        if isinstance(source, torch.Tensor):
            if source.shape != self.flat.shape or source.dtype != self.flat.dtype:
                raise ValueError(
                    f"state bank of shape {tuple(self.flat.shape)} {self.flat.dtype} cannot load "
                    f"{tuple(source.shape)} {source.dtype}"
                )
            for lo in range(0, self.flat.shape[0], self._block_rows()):
                self.flat[lo : lo + self._block_rows()].copy_(source[lo : lo + self._block_rows()])
                self.release()
        else:
            read_npy_into(Path(source), self.flat, after_block=self.release)


def flatten(stacked: Params) -> torch.Tensor:
    """[M, *shape] per parameter -> one [M, P] tensor, parameters in dict order."""
    return torch.cat([v.reshape(v.shape[0], math.prod(v.shape[1:])) for v in stacked.values()], dim=1)  # M may be 0


def _unflatten(flat: torch.Tensor, shapes: dict[str, torch.Size], sizes: list[int]) -> Params:
    parts = torch.split(flat, sizes, dim=1)
    return {k: part.view(flat.shape[0], *shape) for (k, shape), part in zip(shapes.items(), parts, strict=True)}


# ----------------------------------------------------------------------------- raw tensor files

_READ_BLOCK = 64 << 20  # bytes per read() when loading a bank


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    """The tensor's memory as a numpy array; bfloat16, which numpy lacks, as its raw int16 bits."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _npy_header(f: Any, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an open .npy file, which must hold a C-ordered array and nothing after it."""
    version = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    size = os.fstat(f.fileno()).st_size
    payload = int(np.prod(shape)) * dtype.itemsize
    if fortran or size - f.tell() != payload:
        raise ValueError(f"{path.name}: {size - f.tell()} data bytes, expected {payload} (truncated or not ours)")
    return tuple(shape), dtype


def check_npy(path: Path, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``path`` is a complete .npy file of ``shape``."""
    with open(path, "rb") as f:
        got, _ = _npy_header(f, path)
    if got != tuple(shape):
        raise ValueError(f"{path.name}: holds shape {got}, expected {tuple(shape)}")


def read_npy_into(path: Path, out: torch.Tensor, after_block: Callable[[], None] | None = None) -> None:
    """Read a .npy file (``ClientStateBank.save``) into ``out`` (same shape and dtype), block by block."""
    target = out if out.device.type == "cpu" and out.is_contiguous() else torch.empty_like(out, device="cpu")
    arr = _numpy_view(target)
    with open(path, "rb") as f:
        shape, dtype = _npy_header(f, path)
        if shape != tuple(out.shape) or dtype != arr.dtype:
            raise ValueError(f"{path.name}: holds {shape} {dtype}, expected {tuple(out.shape)} {arr.dtype}")
        view = memoryview(arr).cast("B")  # type: ignore[arg-type]  # ndarray is a buffer
        pos = 0
        while pos < len(view):
            n = f.readinto(view[pos : pos + _READ_BLOCK])
            if not n:
                raise ValueError(f"{path.name}: truncated ({pos} of {len(view)} bytes)")
            pos += n
            if after_block is not None:
                after_block()
    if target is not out:
        out.copy_(target)
