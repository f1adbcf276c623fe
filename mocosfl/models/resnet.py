"""CIFAR ResNet-18 with GroupNorm + Weight Standardization, split into client and server models.

GroupNorm instead of BatchNorm because a client holds batch 1 and batch statistics
across clients would leak; Weight Standardization keeps GroupNorm nets trainable.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CUT_LAYERS = (1, 3, 5)


class WSConv2d(nn.Conv2d):
    """Conv2d whose weight is standardized (zero mean, unit variance per output channel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = (w - mean) / torch.sqrt(var + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def group_norm(channels: int, groups_at_64: int, width: int) -> nn.GroupNorm:
    # Scale the group count with width so channels-per-group stays what it is at width 64.
    groups = max(1, groups_at_64 * width // 64)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> WSConv2d:
    return WSConv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class Stem(nn.Sequential):
    """3x3 stride-1 conv + norm + ReLU (CIFAR stem, no max-pool): the MocoSFL-1 client."""

    def __init__(self, width: int, groups: int):
        super().__init__(conv3x3(3, width), group_norm(width, groups, width), nn.ReLU(inplace=False))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, width: int):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.norm1 = group_norm(c_out, groups, width)
        self.conv2 = conv3x3(c_out, c_out)
        self.norm2 = group_norm(c_out, groups, width)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                WSConv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                group_norm(c_out, groups, width),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def resnet18_stages(width: int = 64, gn_groups: int = 32) -> list[nn.Module]:
    """The encoder as a flat list cut-able by conv-layer count.

    [stem, layer1.0, layer1.1, layer2, layer3, layer4, pool]: the first 1 / 2 / 3
    entries hold 1 / 3 / 5 conv layers, the paper's MocoSFL-1/3/5 clients.
    """
    w = width

    def layer(c_in: int, c_out: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(c_in, c_out, stride, gn_groups, w), BasicBlock(c_out, c_out, 1, gn_groups, w))

    return [
        Stem(w, gn_groups),
        BasicBlock(w, w, 1, gn_groups, w),
        BasicBlock(w, w, 1, gn_groups, w),
        layer(w, 2 * w, 2),
        layer(2 * w, 4 * w, 2),
        layer(4 * w, 8 * w, 2),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    ]


def client_stage_count(cut_layers: int) -> int:
    if cut_layers not in CUT_LAYERS:
        raise ValueError(f"model.cut_layers={cut_layers!r} is invalid: allowed 1, 3, 5")
    return {1: 1, 3: 2, 5: 3}[cut_layers]


def feature_dim(width: int) -> int:
    return 8 * width


class ProjectionHead(nn.Sequential):
    """MoCo v2 MLP head (the reference's "V2"): Linear -> ReLU -> Linear."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=False), nn.Linear(hidden_dim, out_dim))


class ServerModel(nn.Module):
    """Rest of the backbone after the cut plus the projection head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, smashed: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(smashed))


def build_split_model(
    width: int, cut_layers: int, proj_hidden_dim: int = 1024, proj_dim: int = 1024, gn_groups: int = 32
) -> tuple[nn.Sequential, ServerModel]:
    """Fresh (client model, server model) pair; ``server(client(x))`` is the full network."""
    stages = resnet18_stages(width, gn_groups)
    k = client_stage_count(cut_layers)
    client = nn.Sequential(*stages[:k])
    backbone = nn.Sequential(*stages[k:])
    head = ProjectionHead(feature_dim(width), proj_hidden_dim, proj_dim)
    return client, ServerModel(backbone, head)


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
