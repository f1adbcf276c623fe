"""CIFAR ResNet-18 with GroupNorm + Weight Standardization, split into client and server models.

GroupNorm instead of BatchNorm because a client holds batch 1 and batch statistics
across clients would leak; Weight Standardization keeps GroupNorm nets trainable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from mocosfl.config import parse_bottleneck

if TYPE_CHECKING:
    from mocosfl.config import ModelConfig

CUT_LAYERS = (1, 3, 5)


# Stacked clients. The M participants' client models run as one call (mocosfl.sfl.clients): their
# weights are stacked, [M, *shape], and their inputs folded into channels, [b, M*C, H, W], so that
# participant i owns channels i*C .. (i+1)*C-1. A per-client convolution is then one grouped
# convolution (groups=M) and a per-client GroupNorm one GroupNorm with M times the groups, while ReLU
# and the residual add are elementwise anyway. WSConv2d and GroupNorm switch to this when
# functional_call gives them stacked weights; with their own weights they are the plain layers.

# A grouped convolution whose groups have fewer input channels than this is run with its groups
# zero-padded to this many. oneDNN's weight gradient for 3 input channels per group is ~7x slower
# than for 8 (7.2 vs 1.6 ms for the stem, M=100, width 16, 2 cores): padding makes a width-16
# client step ~5 ms faster; at width 64 the wider padded forward costs ~4.5 ms more than it saves
# (0.1 % of a 4.7 s step). The zero channels contribute nothing to outputs or gradients, but FLOP
# counts of stacked clients include them.
MIN_GROUP_CHANNELS = 8


def standardize_weight(w: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over each output channel's (in, kh, kw).  Shape: [..., O, I, kh, kw].

    Written as two means over the flattened rows: torch.var's reduction is ~5x slower on CPU (7.8 vs
    1.6 ms for a [512, 512, 3, 3] weight on 2 cores), and the target server's no-grad forwards pay it
    at every step.
    """
    flat = w.flatten(-3)
    centered = flat - flat.mean(dim=-1, keepdim=True)
    inv_std = torch.rsqrt((centered * centered).mean(dim=-1, keepdim=True) + 1e-5)
    return (centered * inv_std).view_as(w)


class Conv2d(nn.Conv2d):
    """nn.Conv2d that also runs stacked clients: weight [M, O, I, kh, kw], input [b, M*I, H, W]."""

    def kernel(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.kernel()
        if w.dim() == 4:
            return F.conv2d(x, w, self.bias, self.stride, self.padding)
        # Stacked: w [M, O, I, kh, kw], x [b, M*I, H, W] -> [b, M*O, H', W'].
        m, _, c_in = w.shape[:3]
        if c_in < MIN_GROUP_CHANNELS:
            pad = (0, 0, 0, 0, 0, MIN_GROUP_CHANNELS - c_in)
            x = F.pad(x.unflatten(1, (m, c_in)), pad).flatten(1, 2)  # [b, M*8, H, W]
            w = F.pad(w, pad)
        bias = None if self.bias is None else self.bias.flatten()
        return F.conv2d(x, w.flatten(0, 1), bias, self.stride, self.padding, groups=m)


class WSConv2d(Conv2d):
    """Conv2d whose weight is standardized (zero mean, unit variance per output channel)."""

    def kernel(self) -> torch.Tensor:
        return standardize_weight(self.weight)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm that also runs stacked clients: weight [M, C], input [b, M*C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dim() == 1:
            return super().forward(x)
        m = self.weight.shape[0]  # a client's groups never straddle two clients: C is a multiple of G
        return F.group_norm(x, m * self.num_groups, self.weight.flatten(), self.bias.flatten(), self.eps)


def group_norm(channels: int, channels_per_group: int = 4) -> GroupNorm:
    """GroupNorm over groups of ``channels_per_group`` channels (the reference: 4, in every norm).

    A fixed group size, not a fixed group count, so narrow CPU widths normalize over as many channels as
    width 64 does.
    """
    if channels_per_group < 1 or channels % channels_per_group:
        raise ValueError(
            f"model.gn_channels_per_group={channels_per_group!r} is invalid: "
            f"must be a positive divisor of every layer's channel count, and {channels} is not a multiple"
        )
    return GroupNorm(channels // channels_per_group, channels)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> WSConv2d:
    return WSConv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class Stem(nn.Sequential):
    """3x3 stride-1 conv + norm + ReLU (CIFAR stem, no max-pool): the MocoSFL-1 client."""

    def __init__(self, width: int, gn_channels_per_group: int):
        super().__init__(conv3x3(3, width), group_norm(width, gn_channels_per_group), nn.ReLU(inplace=False))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, gn_channels_per_group: int):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.norm1 = group_norm(c_out, gn_channels_per_group)
        self.conv2 = conv3x3(c_out, c_out)
        self.norm2 = group_norm(c_out, gn_channels_per_group)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                WSConv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                group_norm(c_out, gn_channels_per_group),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18_stages(width: int = 64, gn_channels_per_group: int = 4) -> list[nn.Module]:
    """The encoder as a flat list cut-able by conv-layer count.

    [stem, layer1.0, layer1.1, layer2, layer3, layer4, pool]: the first 1 / 2 / 3
    entries hold 1 / 3 / 5 conv layers, the paper's MocoSFL-1/3/5 clients. Every norm has
    channels // gn_channels_per_group groups (16/32/64/128 at width 64 with 4 per group).
    """
    w, cpg = width, gn_channels_per_group
    if cpg < 1 or w % cpg:
        raise ValueError(f"model.gn_channels_per_group={cpg!r} is invalid: must be positive and divide model.width={w}")

    def layer(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride, cpg), BasicBlock(c_out, c_out, 1, cpg))

    return [
        Stem(w, cpg),
        BasicBlock(w, w, 1, cpg),
        BasicBlock(w, w, 1, cpg),
        layer(w, 2 * w, 2),
        layer(2 * w, 4 * w, 2),
        layer(4 * w, 8 * w, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ]


def client_stage_count(cut_layers: int) -> int:
    if cut_layers not in CUT_LAYERS:
        raise ValueError(f"model.cut_layers={cut_layers!r} is invalid: allowed 1, 3, 5")
    return {1: 1, 3: 2, 5: 3}[cut_layers]


class Bottleneck(nn.Sequential):
    """The client's last layer in the reference's privacy runs (``C{c}S{s}``): a strided 3x3 conv to c
    channels (with bias, no norm) + ReLU, so the smashed data shrink from [w, H, W] to [c, H/s, W/s]."""

    def __init__(self, width: int, channels: int, stride: int):
        super().__init__(Conv2d(width, channels, kernel_size=3, stride=stride, padding=1), nn.ReLU(inplace=False))


class Unbottleneck(nn.Sequential):
    """The server's first layer mirroring ``Bottleneck``: a 3x3 transposed conv back to [w, H, W] + ReLU."""

    def __init__(self, width: int, channels: int, stride: int):
        convt = nn.ConvTranspose2d(channels, width, kernel_size=3, stride=stride, padding=1, output_padding=stride - 1)
        super().__init__(convt, nn.ReLU(inplace=False))


def feature_dim(width: int) -> int:
    return 8 * width


class ProjectionHead(nn.Sequential):
    """MoCo v2 MLP head (the reference's "V2"): Linear -> ReLU -> Linear.

    Initialized as the reference's init_weights: Xavier-uniform weights (gain 1), zero biases.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=False), nn.Linear(hidden_dim, out_dim))
        for layer in self:
            if isinstance(layer, nn.Linear):
                nn.init.xavier_uniform_(layer.weight, gain=1.0)
                nn.init.zeros_(layer.bias)


class ServerModel(nn.Module):
    """Rest of the backbone after the cut plus the projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, smashed: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(smashed))


def build_split_model(
    width: int,
    cut_layers: int,
    proj_hidden_dim: int = 1024,
    proj_dim: int = 1024,
    gn_channels_per_group: int = 4,
    bottleneck: str = "none",
) -> tuple[nn.Sequential, ServerModel]:
    """Fresh (client model, server model) pair; ``server(client(x))`` is the full network.

    ``bottleneck`` ``C{c}S{s}`` appends ``Bottleneck`` to the client and prepends ``Unbottleneck`` to the
    server's backbone (the smashed data at every cut are [width, H, W] before it).
    """
    stages = resnet18_stages(width, gn_channels_per_group)
    k = client_stage_count(cut_layers)
    client_layers, server_layers = stages[:k], stages[k:]
    squeeze = parse_bottleneck(bottleneck)
    if squeeze is not None:
        client_layers = [*client_layers, Bottleneck(width, *squeeze)]
        server_layers = [Unbottleneck(width, *squeeze), *server_layers]
    head = ProjectionHead(feature_dim(width), proj_hidden_dim, proj_dim)
    return nn.Sequential(*client_layers), ServerModel(nn.Sequential(*server_layers), head)


def split_model(m: ModelConfig) -> tuple[nn.Sequential, ServerModel]:
    """``build_split_model`` of a config's ``model`` section."""
    return build_split_model(
        m.width, m.cut_layers, m.proj_hidden_dim, m.proj_dim, m.gn_channels_per_group, m.bottleneck
    )


class Encoder(nn.Module):
    """Client model followed by the server backbone: images -> [B, 8*width] features."""

    preprocess: dict[str, Any]  # image_size, mean, std the encoder was trained with

    def __init__(self, client: nn.Module, backbone: nn.Module):
        super().__init__()
        self.client = client
        self.backbone = backbone
        self.preprocess = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.client(x))


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
