"""The inversion decoder: the reference's ``res_normN4C64`` family, smashed data [C, s, s] -> image [3, S, S].

Pre-activation residual blocks (BN, ReLU, conv 3x3, BN, ReLU, conv 3x3; a 1x1 conv + BN shortcut when the
channels change), ``log2(S / s)`` stride-2 transposed convolutions to reach the image size, a sigmoid out.
The reference's is ``width=64, blocks=4`` (plus the first and last blocks); smaller ones keep CPU attacks short.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin),
            nn.ReLU(),
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


def _upsample(width: int) -> list[nn.Module]:
    return [
        nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]


class InversionDecoder(nn.Sequential):
    """Smashed data [B, channels, size, size] -> images [B, 3, image_size, image_size] in [0, 1]."""

    def __init__(self, channels: int, size: int, image_size: int, width: int = 64, blocks: int = 4):
        ups = math.log2(image_size / size) if size else -1
        if ups < 0 or ups != int(ups):
            raise ValueError(f"smashed data of {size}x{size} cannot be decoded to {image_size}x{image_size} images")
        layers: list[nn.Module] = [ResBlock(channels, width), nn.ReLU()]
        for _ in range(blocks):
            layers += [ResBlock(width, width), nn.ReLU()]
        for k in (1, 2):  # the reference's two slots: an upsampling step where needed, else a block
            layers += _upsample(width) if ups >= k else [ResBlock(width, width), nn.ReLU()]
        for _ in range(int(ups) - 2):
            layers += _upsample(width)
        layers += [ResBlock(width, 3), nn.Sigmoid()]
        super().__init__(*layers)
