"""Tests for mocosfl.models.resnet: split sizes, split == unsplit network, WS conv, GroupNorm rule, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mocosfl.models.resnet import (
    Encoder,
    GroupNorm,
    ProjectionHead,
    WSConv2d,
    build_split_model,
    client_stage_count,
    count_params,
    feature_dim,
    group_norm,
    resnet18_stages,
    standardize_weight,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("cut,expected", [(1, 1_856), (3, 75_840), (5, 149_824)])
def test_client_param_count_at_width_64(cut: int, expected: int) -> None:
    client, _ = build_split_model(64, cut)
    assert count_params(client) == expected


def test_client_and_server_together_are_resnet18() -> None:
    # torchvision's ImageNet resnet18 has 11,689,512 parameters. Without its 1000-class fc (513,000) and
    # with the 3x3x3 CIFAR stem instead of the 7x7x3 one (1,728 instead of 9,408) that is 11,168,832;
    # GroupNorm has the same 2 affine parameters per channel as BatchNorm.
    resnet18_cifar = 11_689_512 - 513_000 - 9_408 + 1_728
    client, server = build_split_model(64, 3, proj_hidden_dim=1024, proj_dim=1024)
    head = 512 * 1024 + 1024 + 1024 * 1024 + 1024
    assert count_params(client) + count_params(server) == resnet18_cifar + head
    assert sum(count_params(s) for s in resnet18_stages(64, 4)) == resnet18_cifar


def test_client_has_no_buffers() -> None:
    for cut in (1, 3, 5):
        client, _ = build_split_model(8, cut)
        assert list(client.buffers()) == []


# ---------------------------------------------------------------- split == unsplit

# An independent ResNet-18 (CIFAR stem) written out with torch.nn.functional, in float64, reading the
# split model's parameters by their ResNet names. It shares no code with mocosfl.models.resnet, so a
# wrong stage list (a missing block, a wrong stride, a shortcut in the wrong place) shows up as a
# missing/unused parameter or a different output.

RESNET_STAGES = ("stem", "layer1.0", "layer1.1", "layer2", "layer3", "layer4")  # what the split model's stages hold


def _resnet_names(client: nn.Module, server: nn.Module) -> dict[str, torch.Tensor]:
    """The split model's parameters under plain ResNet names (stem.conv.weight, layer2.0.shortcut.norm.bias, ...)."""
    params: dict[str, torch.Tensor] = {}
    k = len(client)

    def add(stage: int, rest: str, t: torch.Tensor) -> None:
        name = RESNET_STAGES[stage]
        if name == "stem":
            rest = {"0.weight": "conv.weight", "1.weight": "norm.weight", "1.bias": "norm.bias"}[rest]
        rest = rest.replace("shortcut.0.", "shortcut.conv.").replace("shortcut.1.", "shortcut.norm.")
        params[f"{name}.{rest}"] = t.detach().double()

    for n, t in client.named_parameters():
        i, rest = n.split(".", 1)
        add(int(i), rest, t)
    for n, t in server.named_parameters():
        part, i, rest = n.split(".", 2)
        if part == "backbone":
            add(k + int(i), rest, t)
        else:
            params[f"head.fc{1 if i == '0' else 2}.{rest}"] = t.detach().double()
    return params


def _ws(w: torch.Tensor) -> torch.Tensor:
    # Weight Standardization: per output channel, population variance, epsilon 1e-5 inside the sqrt.
    mean = w.mean(dim=(1, 2, 3), keepdim=True)
    var = ((w - mean) ** 2).mean(dim=(1, 2, 3), keepdim=True)
    return (w - mean) / torch.sqrt(var + 1e-5)


def _reference_features(p: dict[str, torch.Tensor], x: torch.Tensor, channels_per_group: int = 4) -> torch.Tensor:
    """Plain CIFAR ResNet-18 (GN + WS): x [B, 3, H, W] -> [B, 8*width]. Consumes the parameters it uses from p.

    Every GroupNorm has channels // channels_per_group groups, as the reference's num_groups = planes // 4.
    """

    def conv(h: torch.Tensor, name: str, stride: int, padding: int) -> torch.Tensor:
        return F.conv2d(h, _ws(p.pop(f"{name}.weight")), stride=stride, padding=padding)

    def gn(h: torch.Tensor, name: str) -> torch.Tensor:
        groups = h.shape[1] // channels_per_group
        return F.group_norm(h, groups, p.pop(f"{name}.weight"), p.pop(f"{name}.bias"), eps=1e-5)

    h = F.relu(gn(conv(x.double(), "stem.conv", 1, 1), "stem.norm"))  # 3x3 stride 1, no max-pool
    for layer, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2), ("layer4", 2)):
        for block in (0, 1):
            b = f"{layer}.{block}"
            s = stride if block == 0 else 1
            out = F.relu(gn(conv(h, f"{b}.conv1", s, 1), f"{b}.norm1"))
            out = gn(conv(out, f"{b}.conv2", 1, 1), f"{b}.norm2")
            # Projection shortcut (1x1 conv + norm) where the block changes resolution and width.
            short = gn(conv(h, f"{b}.shortcut.conv", s, 0), f"{b}.shortcut.norm") if block == 0 and s == 2 else h
            h = F.relu(out + short)
    return h.mean(dim=(2, 3))  # adaptive average pool to 1x1, flattened


def _reference_head(p: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    h = F.relu(F.linear(f, p.pop("head.fc1.weight"), p.pop("head.fc1.bias")))
    return F.linear(h, p.pop("head.fc2.weight"), p.pop("head.fc2.bias"))


def _perturbed_split_model(width: int, cut: int) -> tuple[nn.Sequential, nn.Module]:
    torch.manual_seed(0)
    client, server = build_split_model(width, cut, proj_hidden_dim=16, proj_dim=12, gn_channels_per_group=4)
    # Perturb every parameter so the GN affine params are not the trivial 1/0 init.
    with torch.no_grad():
        for param in list(client.parameters()) + list(server.parameters()):
            param.add_(0.1 * torch.randn_like(param))
    return client, server


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_server_of_client_equals_unsplit_network(cut: int) -> None:
    client, server = _perturbed_split_model(8, cut)
    assert sum(1 for n, t in client.named_parameters() if t.dim() == 4) == cut  # cut = conv layers on the client
    p = _resnet_names(client, server)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    split_out = server(client(x))
    assert split_out.shape == (3, 12)
    ref = _reference_head(p, _reference_features(p, x, channels_per_group=4))
    assert not p, f"parameters the reference ResNet-18 does not have: {sorted(p)}"
    torch.testing.assert_close(split_out.double(), ref, rtol=1e-4, atol=1e-5)


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
    x = torch.randn(2, 3, 16, 16)  # layer4 output 2x2, so the pool is visibly an average
    out = enc(x)
    assert out.shape == (2, 8 * width) == (2, feature_dim(width))
    p = _resnet_names(client, server)
    ref = _reference_features(p, x, channels_per_group=4)
    assert sorted(p) == ["head.fc1.bias", "head.fc1.weight", "head.fc2.bias", "head.fc2.weight"]
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


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
    torch.testing.assert_close(standardize_weight(conv.weight).double(), torch.from_numpy(w_hat), rtol=1e-5, atol=1e-6)
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
    "channels,per_group,expected",
    [(64, 4, 16), (128, 4, 32), (256, 4, 64), (512, 4, 128), (8, 4, 2), (4, 4, 1), (16, 8, 2), (12, 1, 12)],
)
def test_group_norm_group_count(channels: int, per_group: int, expected: int) -> None:
    gn = group_norm(channels, per_group)
    assert gn.num_groups == expected
    assert gn.num_channels == channels


@pytest.mark.parametrize("channels,per_group", [(12, 8), (2, 4), (8, 0), (8, -4)])
def test_group_norm_rejects_groups_that_do_not_divide(channels: int, per_group: int) -> None:
    with pytest.raises(ValueError, match=f"model.gn_channels_per_group={per_group} is invalid"):
        group_norm(channels, per_group)


@pytest.mark.parametrize("width,groups", [(64, {16, 32, 64, 128}), (8, {2, 4, 8, 16}), (16, {4, 8, 16, 32})])
def test_every_norm_has_four_channels_per_group(width: int, groups: set[int]) -> None:
    client, server = build_split_model(width, 1, 16, 12)  # the default is the reference's 4 per group
    norms = [m for m in list(client.modules()) + list(server.modules()) if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 8 * 2 + 3  # stem + two per block + three shortcut norms
    assert all(m.num_groups * 4 == m.num_channels for m in norms)
    assert {m.num_groups for m in norms} == groups
    assert norms[0].num_groups == width // 4  # the stem too
    shortcuts = [m for name, m in server.named_modules() if name.endswith("shortcut.1")]
    assert [m.num_groups for m in shortcuts] == [width // 2, width, 2 * width]  # 2w, 4w, 8w channels // 4
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in server.modules())


def test_width_not_divisible_by_channels_per_group_is_one_line_error() -> None:
    with pytest.raises(ValueError, match=r"^model.gn_channels_per_group=3 is invalid: .*model.width=8$"):
        build_split_model(8, 1, 16, 12, gn_channels_per_group=3)


def test_stacked_group_norm_equals_one_norm_per_client() -> None:
    # M clients folded into channels: a client's 4-channel groups never mix with another client's channels.
    m, c = 3, 8
    gn = group_norm(c)
    weights = torch.randn(m, c, generator=torch.Generator().manual_seed(0))
    biases = torch.randn(m, c, generator=torch.Generator().manual_seed(1))
    x = torch.randn(2, m * c, 5, 5, generator=torch.Generator().manual_seed(2)) * torch.arange(1, m * c + 1).view(
        1, -1, 1, 1
    )
    stacked = torch.func.functional_call(gn, {"weight": weights, "bias": biases}, (x,))
    loop = [F.group_norm(x[:, i * c : (i + 1) * c], c // 4, weights[i], biases[i], gn.eps) for i in range(m)]
    assert isinstance(gn, GroupNorm)
    torch.testing.assert_close(stacked, torch.cat(loop, dim=1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- projection head init


def test_projection_head_is_xavier_uniform_with_zero_bias() -> None:
    # As the reference's init_weights: xavier_uniform_(gain=1) weights, zero biases. A uniform on
    # [-b, b], b = sqrt(6 / (fan_in + fan_out)), has std b / sqrt(3); PyTorch's default Linear init
    # (b = 1 / sqrt(fan_in)) would fail the bound and std checks for these shapes.
    torch.manual_seed(0)
    head = ProjectionHead(512, 1024, 256)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert len(linears) == 2
    for lin in linears:
        fan_out, fan_in = lin.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = lin.weight.detach().double()
        assert w.abs().max() <= bound
        assert w.abs().max() > 0.99 * bound  # fills the range
        assert abs(w.std().item() - bound / 3**0.5) < 0.01 * bound
        assert abs(w.mean().item()) < 0.01 * bound
        assert torch.count_nonzero(lin.bias) == 0
    client, server = build_split_model(8, 1, 32, 16)
    assert torch.count_nonzero(server.head[0].bias) == 0 and torch.count_nonzero(server.head[2].bias) == 0


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("cut", [0, 2, 4, 6, "1"])
def test_invalid_cut_layers_raise(cut) -> None:
    with pytest.raises(ValueError, match="cut_layers"):
        build_split_model(8, cut)
    with pytest.raises(ValueError, match="cut_layers"):
        client_stage_count(cut)


def test_encoder_files_round_trip_and_old_layout_is_a_clear_error(tmp_path) -> None:
    from mocosfl.data.prepare import DataError
    from mocosfl.workflow import ENCODER_FORMAT, load_encoder

    client, server = build_split_model(8, 1, 16, 12)
    model = {"width": 8, "cut_layers": 1, "gn_channels_per_group": 4, "proj_hidden_dim": 16, "proj_dim": 12}
    payload = {
        "format": ENCODER_FORMAT,
        "model": model,
        "client": client.state_dict(),
        "backbone": server.backbone.state_dict(),
        "image_size": 32,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
    }
    torch.save(payload, tmp_path / "encoder.pt")
    enc = load_encoder(tmp_path)
    assert {m.num_groups for m in enc.modules() if isinstance(m, nn.GroupNorm)} == {2, 4, 8, 16}
    # An encoder saved with the old group count (32 at width 64, scaled) cannot be rebuilt: GroupNorm's
    # state dict does not hold the group count, so loading it silently would normalize differently.
    old = {k: v for k, v in model.items() if k != "gn_channels_per_group"} | {"gn_groups": 32}
    torch.save(payload | {"model": old}, tmp_path / "old.pt")
    with pytest.raises(DataError, match=r"old GroupNorm layout \(model.gn_groups\); pretrain it again"):
        load_encoder(tmp_path / "old.pt")
