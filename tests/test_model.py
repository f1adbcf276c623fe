"""Tests for mocosfl.models.resnet: split sizes, split == unsplit network, WS conv, GroupNorm rule, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocosfl.models.resnet import (
    Encoder,
    WSConv2d,
    build_split_model,
    client_stage_count,
    count_params,
    feature_dim,
    group_norm,
    resnet18_stages,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("cut,expected", [(1, 1_856), (3, 75_840), (5, 149_824)])
def test_client_param_count_at_width_64(cut: int, expected: int) -> None:
    client, _ = build_split_model(64, cut)
    assert count_params(client) == expected


def test_client_and_server_together_are_resnet18() -> None:
    # ResNet-18 (CIFAR stem, GN affine params instead of BN) has 11.17 M backbone params at width 64.
    client, server = build_split_model(64, 3, proj_hidden_dim=1024, proj_dim=1024)
    backbone = sum(count_params(s) for s in resnet18_stages(64, 32))
    head = 512 * 1024 + 1024 + 1024 * 1024 + 1024
    assert count_params(client) + count_params(server) == backbone + head
    assert 11_100_000 < backbone < 11_250_000


def test_client_has_no_buffers() -> None:
    for cut in (1, 3, 5):
        client, _ = build_split_model(8, cut)
        assert list(client.buffers()) == []


# ---------------------------------------------------------------- split == unsplit


def _unsplit_from(client: nn.Module, server: nn.Module, width: int, groups: int) -> tuple[nn.Sequential, nn.Module]:
    """A fresh, never-split network (stage list + head) loaded stage by stage with the split model's weights."""
    stages = resnet18_stages(width, groups)
    split_stages = list(client) + list(server.backbone)
    assert len(split_stages) == len(stages)
    for fresh, trained in zip(stages, split_stages, strict=True):
        fresh.load_state_dict(trained.state_dict())
    head = build_split_model(width, 1, 16, 12, groups)[1].head
    head.load_state_dict(server.head.state_dict())
    return nn.Sequential(*stages), head


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_server_of_client_equals_unsplit_network(cut: int) -> None:
    torch.manual_seed(0)
    client, server = build_split_model(8, cut, proj_hidden_dim=16, proj_dim=12, gn_groups=32)
    # Perturb the GN affine params so they are not the trivial 1/0 init.
    with torch.no_grad():
        for p in list(client.parameters()) + list(server.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    full, head = _unsplit_from(client, server, 8, 32)
    x = torch.randn(3, 3, 12, 12)
    split_out = server(client(x))
    assert split_out.shape == (3, 12)
    torch.testing.assert_close(split_out, head(full(x)), rtol=1e-5, atol=1e-6)


def test_all_cut_points_describe_the_same_network() -> None:
    torch.manual_seed(0)
    c1, s1 = build_split_model(8, 1, 16, 12)
    x = torch.randn(2, 3, 8, 8)
    ref = s1(c1(x))
    weights = [st.state_dict() for st in list(c1) + list(s1.backbone)]
    for cut in (3, 5):
        c, s = build_split_model(8, cut, 16, 12)
        for st, w in zip(list(c) + list(s.backbone), weights, strict=True):
            st.load_state_dict(w)
        s.head.load_state_dict(s1.head.state_dict())
        torch.testing.assert_close(s(c(x)), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cut,channels,size", [(1, 8, 10), (3, 8, 10), (5, 8, 10)])
def test_smashed_data_shape(cut: int, channels: int, size: int) -> None:
    client, _ = build_split_model(8, cut)
    assert client(torch.randn(2, 3, size, size)).shape == (2, channels, size, size)


@pytest.mark.parametrize("width", [4, 8])
def test_encoder_output_dim(width: int) -> None:
    client, server = build_split_model(width, 3, 16, 12)
    enc = Encoder(client, server.backbone)
    x = torch.randn(2, 3, 8, 8)
    out = enc(x)
    assert out.shape == (2, 8 * width) == (2, feature_dim(width))
    torch.testing.assert_close(out, server.backbone(client(x)))


# ---------------------------------------------------------------- weight standardization


def test_wsconv_matches_hand_standardization() -> None:
    torch.manual_seed(0)
    conv = WSConv2d(3, 5, kernel_size=3, stride=2, padding=1, bias=True)
    with torch.no_grad():
        conv.weight.mul_(3.0).add_(0.7)  # non-zero mean, non-unit variance
        conv.bias.normal_()
    w = conv.weight.detach().double().numpy()
    w_hat = np.empty_like(w)
    for o in range(w.shape[0]):
        flat = w[o].reshape(-1)
        mu = flat.sum() / flat.size
        var = ((flat - mu) ** 2).sum() / flat.size  # population variance
        w_hat[o] = (w[o] - mu) / np.sqrt(var + 1e-5)
    assert np.allclose(w_hat.reshape(5, -1).mean(axis=1), 0, atol=1e-6)
    x = torch.randn(2, 3, 9, 9)
    ref = F.conv2d(x.double(), torch.from_numpy(w_hat), conv.bias.detach().double(), stride=2, padding=1)
    out = conv(x)
    assert out.shape == (2, 5, 5, 5)
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)


def test_wsconv_is_invariant_to_weight_affine_rescale() -> None:
    conv = WSConv2d(2, 4, kernel_size=3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.normal_(0.0, 10.0)  # variance far above the 1e-5 epsilon
    x = torch.randn(1, 2, 6, 6)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(2.0)
    torch.testing.assert_close(conv(x), before, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- GroupNorm rule


@pytest.mark.parametrize(
    "channels,groups_at_64,width,expected",
    [
        (64, 32, 64, 32),
        (512, 32, 64, 32),
        (8, 32, 8, 4),
        (64, 32, 8, 4),
        (16, 32, 16, 8),
        (4, 32, 4, 2),
        (4, 32, 1, 1),  # 32 * 1 // 64 = 0 -> at least one group
        (12, 32, 16, 6),  # 8 groups do not divide 12 -> largest divisor below
        (10, 32, 64, 10),
    ],
)
def test_group_norm_group_count(channels: int, groups_at_64: int, width: int, expected: int) -> None:
    gn = group_norm(channels, groups_at_64, width)
    assert gn.num_groups == expected
    assert gn.num_channels == channels


@pytest.mark.parametrize("width,groups", [(64, 32), (8, 4), (16, 8)])
def test_every_norm_in_the_network_uses_the_scaled_group_count(width: int, groups: int) -> None:
    client, server = build_split_model(width, 1, 16, 12, gn_groups=32)
    norms = [m for m in list(client.modules()) + list(server.modules()) if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 8 * 2 + 3  # stem + two per block + three shortcut norms
    assert all(m.num_groups == groups for m in norms)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in server.modules())


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cut", [0, 2, 4, 6, "1"])
def test_invalid_cut_layers_raise(cut) -> None:
    with pytest.raises(ValueError, match="cut_layers"):
        build_split_model(8, cut)
    with pytest.raises(ValueError, match="cut_layers"):
        client_stage_count(cut)
