"""Models × norms: forward/backward on tiny inputs, parameter counts, the paper's init."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import groupnorm
from groupnorm.models import VIDEO_MODELS, create_model, list_models

NORMS = ["bn", "gn", "ln", "in", "brn", "syncbn", "none", "gn+ws"]

# Tiny configurations (base width 4, a few pixels): every model × norm runs in milliseconds.
# name -> (create_model kwargs, input shape)
TINY = {
    "simplenet": ({"width": 4}, (2, 3, 16, 16)),
    "simplenetv2": ({"width": 4}, (2, 3, 16, 16)),
    "resnet20": ({"width": 4}, (2, 3, 8, 8)),
    "resnet32": ({"width": 4}, (2, 3, 8, 8)),
    "resnet56": ({"width": 4}, (2, 3, 8, 8)),
    "resnet110": ({"width": 4}, (2, 3, 8, 8)),
    "resnet18": ({"width": 4, "small_input": True}, (2, 3, 8, 8)),
    "resnet34": ({"width": 4, "small_input": True}, (2, 3, 8, 8)),
    "r3d_10": ({"width": 4, "small_input": True}, (2, 1, 4, 8, 8)),
    "r3d_18": ({"width": 4, "small_input": True}, (2, 1, 4, 8, 8)),
}
# The big ones: parameter counts at full width (on the meta device) and one tiny forward.
BIG = {
    "resnet50": ({"width": 4, "small_input": True}, (2, 3, 8, 8)),
    "resnet101": ({"width": 4, "small_input": True}, (2, 3, 8, 8)),
    "vgg16": ({"width": 4, "small_input": True}, (2, 3, 16, 16)),
}


ALL = TINY | BIG


def test_registry_lists_every_model():
    assert set(list_models()) == set(ALL)


# The deepest nets take seconds per norm on 2 cores: GN runs by default, the rest when slow.
DEEP = {"resnet56", "resnet110", "resnet101"}
GRID = [pytest.param(name, norm, marks=[pytest.mark.slow] if name in DEEP and norm != "gn" else [])
        for name in sorted(ALL) for norm in NORMS]


@pytest.mark.parametrize("name,norm", GRID)
def test_forward_backward_every_norm(name, norm):
    torch.manual_seed(0)
    kwargs, shape = ALL[name]
    model = create_model(name, 5, in_channels=shape[1], norm=norm, **kwargs)
    x = torch.randn(shape)
    y = model(x)
    assert y.shape == (shape[0], 5)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    ws = [isinstance(m, groupnorm.WSConv2d | groupnorm.WSConv3d) for m in convs]
    assert all(ws) if norm.endswith("+ws") else not any(ws)


def test_vgg16_without_norm_and_imagenet_head_forward():
    model = create_model("vgg16", 3, norm="none", width=4)  # 5 pools + 7x7 pool + MLP head
    assert not any(groupnorm.is_norm(m) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def _count(name: str, num_classes: int, norm: str = "gn", **kw) -> int:
    with torch.device("meta"):  # full-size nets without allocating or initializing memory
        model = create_model(name, num_classes, norm=norm, **kw)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,classes,expected,rel", [
    ("resnet20", 10, 0.27e6, 0.03),  # He et al. 2016, Table 6
    ("resnet56", 10, 0.85e6, 0.03),
    ("resnet110", 10, 1.7e6, 0.03),
    ("resnet18", 1000, 11_689_512, 1e-6),  # torchvision's counts, exactly
    ("resnet34", 1000, 21_797_672, 1e-6),
    ("resnet50", 1000, 25_557_032, 1e-6),
    ("resnet101", 1000, 44_549_160, 1e-6),
    ("r3d_18", 400, 33.4e6, 0.01),
])
@pytest.mark.parametrize("norm", ["gn", "bn"])
def test_parameter_counts(name, classes, expected, rel, norm):
    # GN and BN have the same parameters (γ, β); BN's running statistics are buffers.
    assert _count(name, classes, norm) == pytest.approx(expected, rel=rel)


def test_vgg16_parameter_count():
    # The original VGG-16 (biased convs, no norm): 138,357,544. With a norm the convs lose their
    # bias (13 layers, 4,224 values) and gain γ, β (2 × 4,224).
    assert _count("vgg16", 1000, "none") == 138_357_544
    assert _count("vgg16", 1000, "gn") == 138_357_544 + 4_224


def _residual_blocks(model: nn.Module):
    return [m for m in model.modules() if hasattr(m, "zero_init_last")]


def _last_norm(block: nn.Module) -> nn.Module:
    return block.norm3 if hasattr(block, "norm3") else block.norm2


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50", "r3d_10"])
@pytest.mark.parametrize("zero", [True, False])
def test_init_zero_gamma_on_last_norm_of_each_block(name, zero):
    model = create_model(name, 10, norm="gn", width=8, zero_init_residual=zero)
    blocks = _residual_blocks(model)
    assert blocks
    last = {id(_last_norm(b)) for b in blocks}
    for b in blocks:
        assert torch.all(_last_norm(b).weight == (0.0 if zero else 1.0))
    for m in model.modules():
        if groupnorm.is_norm(m) and id(m) not in last:
            assert torch.all(m.weight == 1.0) and torch.all(m.bias == 0.0)
    for b in blocks:
        assert torch.all(_last_norm(b).bias == 0.0)


@pytest.mark.parametrize("norm", ["none", "gn"])
def test_init_skips_norms_without_gamma(norm):
    opts = {"affine": False} if norm == "gn" else {}
    model = create_model("resnet20", 10, norm=norm, width=4, **opts)
    norms = [m for m in model.modules() if groupnorm.is_norm(m) or isinstance(m, nn.Identity)]
    assert len(norms) >= 19 and all(getattr(m, "weight", None) is None for m in norms)
    # the rest of the init still ran (small head) and the net trains
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.3)
    y = model(torch.randn(2, 3, 8, 8))
    y.sum().backward()
    assert torch.isfinite(y).all()


def test_conv_init_is_he_fan_out():
    torch.manual_seed(0)
    model = create_model("resnet18", 10, norm="gn")
    # 64 -> 128 channels, 3 x 3: fan_out = 1152 (std 0.0417), fan_in = 576 (std 0.0589)
    w = model.layer2[0].conv1.weight
    assert w.shape == (128, 64, 3, 3)
    assert w.std().item() == pytest.approx(math.sqrt(2.0 / (128 * 9)), rel=0.03)
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)


def test_norm_options_reach_the_layers():
    model = create_model("resnet20", 10, norm="gn", num_groups=4)
    gns = [m for m in model.modules() if isinstance(m, groupnorm.GroupNorm)]
    assert gns and all(m.num_groups == 4 for m in gns)
    # Default G=32: the 16-channel stage falls back to gcd(32, 16) = 16 groups instead of failing.
    default = create_model("resnet20", 10, norm="gn")
    assert {m.num_channels: m.num_groups for m in default.modules()
            if isinstance(m, groupnorm.GroupNorm)} == {16: 16, 32: 32, 64: 32}
    with pytest.raises(ValueError, match="divisible"):
        create_model("resnet20", 10, norm="gn", num_groups=32, on_indivisible="error")


def test_norm_as_partial_and_class():
    m = create_model("simplenet", 10, norm=functools.partial(nn.GroupNorm, 4), width=8)
    assert sum(isinstance(x, nn.GroupNorm) for x in m.modules()) == 4
    assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_video_norms_see_the_time_axis():
    model = create_model("r3d_10", 4, in_channels=1, norm="gn", width=8, small_input=True)
    seen = []
    norm = model.stem[1]
    # clone: the ReLU after the norm works in place
    norm.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.clone())))
    model(torch.randn(2, 1, 4, 8, 8) + torch.arange(4.0).view(1, 1, 4, 1, 1))  # drifts over T
    assert seen[0][0] == torch.Size([2, 8, 4, 8, 8])  # (N, C, T, H, W): GN groups span T too
    # γ = 1, β = 0 at init: each (sample, group) is zero-mean, unit-variance over (C/G, T, H, W),
    # while single frames are not (the statistics are not per frame).
    g = norm.num_groups
    out = seen[0][1].reshape(2, g, -1)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, g), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(2, g), atol=1e-3, rtol=0)
    per_frame = seen[0][1].reshape(2, g, 8 // g, 4, 64).mean((2, 4))  # (N, G, T)
    assert per_frame.abs().max() > 0.1
    with pytest.raises(ValueError, match=r"\(N, C, T, H, W\)"):
        model(torch.randn(2, 1, 8, 8))


def test_video_default_stem_and_bn3d():
    model = create_model("r3d_10", 3, in_channels=3, norm="bn", width=4)
    y = model(torch.randn(2, 3, 4, 32, 32))
    assert y.shape == (2, 3)
    assert set(VIDEO_MODELS) == {"r3d_10", "r3d_18"}


def test_small_input_changes_the_stem():
    big = create_model("resnet18", 10, width=4)
    small = create_model("resnet18", 10, width=4, small_input=True)
    # 32 px: ImageNet stem gives 1x1 at the last stage, the small-input stem 4x4 (stride 8).
    assert big.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 1
    assert small.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4


def test_simplenet_head_is_input_size_independent():
    m = create_model("simplenetv2", 10, in_channels=1, norm="gn")
    assert m(torch.randn(2, 1, 28, 28)).shape == m(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert m.fc1.in_features == 128 * 16


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown model 'resnet19'"):
        create_model("resnet19", 10)
    with pytest.raises(ValueError, match="small_input=False"):
        create_model("resnet20", 10, small_input=False)
    with pytest.raises(ValueError, match="unknown norm kind"):
        create_model("resnet20", 10, norm="xn")


def test_models_train_on_virtual_batches():
    model = create_model("resnet20", 10, norm="bn", width=4)
    groupnorm.set_virtual_batch(model, 2)
    y = model(torch.randn(4, 3, 8, 8))
    assert y.shape == (4, 10)
