"""GroupNorm layer: drop-in for torch.nn.GroupNorm (state_dict both ways, outputs, repr)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from groupnorm import GroupNorm


@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_loads_both_ways_and_outputs_match(affine):
    ours, theirs = GroupNorm(4, 12, affine=affine), nn.GroupNorm(4, 12, affine=affine)
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 12, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    back = nn.GroupNorm(4, 12, affine=affine)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ours(x))


def test_gradients_match_torch_layer():
    ours, theirs = GroupNorm(2, 6), nn.GroupNorm(2, 6)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6, 7, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 6, 7)
    ours(x).backward(dy)
    theirs(x2).backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


def test_repr_and_attributes_like_torch():
    m = GroupNorm(3, 6, eps=1e-3)
    assert repr(m) == "GroupNorm(3, 6, eps=0.001, affine=True, bias=True)"
    assert repr(m) == repr(nn.GroupNorm(3, 6, eps=1e-3))
    no_bias = GroupNorm(3, 6, bias=False)
    assert no_bias.bias is None and repr(no_bias) == repr(nn.GroupNorm(3, 6, bias=False))
    assert no_bias.state_dict().keys() == nn.GroupNorm(3, 6, bias=False).state_dict().keys()
    assert (m.num_groups, m.num_channels, m.eps, m.affine) == (3, 6, 1e-3, True)
    assert "activation='silu'" in repr(GroupNorm(3, 6, activation="silu"))


@pytest.mark.parametrize("kwargs", [dict(), dict(affine=False), dict(bias=False),
                                    dict(eps=1e-3, dtype=torch.float64)], ids=str)
def test_is_a_torch_group_norm_with_its_attributes(kwargs):
    """A subclass of torch.nn.GroupNorm: isinstance-based tools (weight-decay exclusion lists,
    per-sample-gradient validators, fusion passes) find it, with torch's attributes."""
    ours, theirs = GroupNorm(2, 6, **kwargs), nn.GroupNorm(2, 6, **kwargs)
    assert isinstance(ours, nn.GroupNorm)
    assert type(ours).__constants__ == nn.GroupNorm.__constants__
    for name in ("num_groups", "num_channels", "eps", "affine", "training"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.extra_repr() == theirs.extra_repr()
    assert {k: (v.shape, v.dtype) for k, v in ours.state_dict().items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.state_dict().items()}
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


def test_numpy_scalars_accepted():
    """numpy integers and floats work wherever Python's do (layer and functional)."""
    import numpy as np

    from groupnorm import group_norm

    x = torch.randn(2, 4, 3, 3)
    m = GroupNorm(np.int64(2), np.int64(4), eps=np.float32(1e-5))
    assert (m.num_groups, m.num_channels) == (2, 4) and type(m.num_groups) is int
    assert isinstance(m.eps, float)
    want = nn.functional.group_norm(x, 2, eps=1e-5)
    torch.testing.assert_close(m(x), nn.functional.group_norm(x, 2, m.weight, m.bias))
    torch.testing.assert_close(group_norm(x, np.int32(2), eps=np.float32(1e-5)), want)
    torch.testing.assert_close(group_norm(x, group_size=np.int64(2), eps=np.float64(1e-5)), want)
    with pytest.raises(ValueError, match=r"num_groups must be a positive integer, got 2\.0"):
        group_norm(x, 2.0)


def test_group_size_and_reset_parameters():
    m = GroupNorm(None, 12, group_size=4)
    assert m.num_groups == 3
    with torch.no_grad():
        m.weight.fill_(3)
        m.bias.fill_(2)
    m.reset_parameters()
    assert torch.equal(m.weight, torch.ones(12)) and torch.equal(m.bias, torch.zeros(12))


def test_factory_kwargs_device_dtype():
    m = GroupNorm(2, 4, device="cpu", dtype=torch.float64)
    assert m.weight.dtype == torch.float64
    assert m(torch.randn(2, 4, 3, dtype=torch.float64)).dtype == torch.float64


def test_fused_residual_activation_forward():
    m = GroupNorm(2, 4, activation="relu")
    x, r = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(m(x, r), torch.relu(nn.functional.group_norm(x, 2) + r))


def test_channels_last_kept():
    x = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    assert GroupNorm(4, 8)(x).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("args,kwargs,match", [
    ((5, 12), {}, r"num_channels \(12\) must be divisible by num_groups \(5\)"),
    ((None, 12), {}, r"exactly one of num_groups / group_size"),
    ((2, 0), {}, r"num_channels must be a positive integer, got 0"),
    ((2, 4), {"activation": "swish"}, r"activation must be None or one of"),
])
def test_constructor_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupNorm(*args, **kwargs)


def test_wrong_channel_count_input():
    with pytest.raises(ValueError, match=r"expected input with 8 channels .* \(2, 6, 3\)"):
        GroupNorm(2, 8)(torch.randn(2, 6, 3))


def test_trains_in_a_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), GroupNorm(4, 8), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2))
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
