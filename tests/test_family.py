"""The normalization family: factory, BN with virtual workers, Batch Renorm, WS, convert_norms."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupnorm
from groupnorm import (
    BatchNorm,
    BatchRenorm,
    GroupNorm,
    WSConv1d,
    WSConv2d,
    WSConv3d,
    convert_norms,
    get_norm_layer,
    norm_layer,
    set_virtual_batch,
    split_ws,
    uses_batch_stats,
)

# --- factory ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,cls,groups", [
    ("gn", GroupNorm, 32), ("ln", GroupNorm, 1), ("in", GroupNorm, 64), ("bn", BatchNorm, None),
    ("brn", BatchRenorm, None), ("syncbn", groupnorm.SyncBatchNorm, None),
    ("none", nn.Identity, None),
])
def test_factory_kinds(kind, cls, groups):
    m = norm_layer(kind, 64)
    assert type(m) is cls
    if groups is not None:
        assert m.num_groups == groups
    x = torch.randn(4, 64, 3, 3)
    assert m(x).shape == x.shape


@pytest.mark.parametrize("kind", ["bn", "gn", "ln", "in", "brn", "syncbn", "none"])
@pytest.mark.parametrize("shape", [(4, 32), (4, 32, 5), (4, 32, 3, 3), (4, 32, 2, 3, 3)],
                         ids=["0d", "1d", "2d", "3d"])
def test_every_kind_every_rank(kind, shape):
    m = norm_layer(kind, 32)
    y = m(torch.randn(shape))
    assert y.shape == shape and torch.isfinite(y).all()


def test_factory_options_class_and_partial():
    assert norm_layer("gn", 64, group_size=16).num_groups == 4
    assert norm_layer("gn", 64, num_groups=8).num_groups == 8
    assert norm_layer("GroupNorm", 64).num_groups == 32  # alias
    assert type(norm_layer(nn.BatchNorm2d, 8)) is nn.BatchNorm2d
    m = norm_layer(functools.partial(nn.GroupNorm, 4), 8)
    assert isinstance(m, nn.GroupNorm) and m.num_groups == 4
    make = get_norm_layer("bn", momentum=0.2)
    assert make(16).momentum == 0.2 and make(8).num_features == 8
    assert split_ws("gn+ws") == ("gn", True) and split_ws("bn") == ("bn", False)
    assert type(norm_layer("gn+ws", 64)) is GroupNorm


def test_factory_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown norm kind 'groupy'; choose one of"):
        norm_layer("groupy", 8)
    with pytest.raises(TypeError, match=r"norm 'bn' got unknown option\(s\) \['num_groups'\]"):
        norm_layer("bn", 8, num_groups=4)
    with pytest.raises(ValueError, match=r"num_channels \(16\) must be divisible by num_groups"):
        norm_layer("gn", 16, num_groups=32)
    assert norm_layer("gn", 16, num_groups=32, on_indivisible="gcd").num_groups == 16
    assert type(get_norm_layer("bn", strict=False, num_groups=4)(8)) is BatchNorm


def test_uses_batch_stats():
    assert uses_batch_stats(norm_layer("bn", 4)) and uses_batch_stats(nn.BatchNorm2d(4))
    assert uses_batch_stats(norm_layer("brn", 4)) and uses_batch_stats(norm_layer("syncbn", 4))
    assert not uses_batch_stats(norm_layer("gn", 4, num_groups=2))
    assert not uses_batch_stats(nn.Identity())


# --- BatchNorm and virtual workers ------------------------------------------------------------


def test_bn_matches_torch_and_shares_state_dict():
    ours, theirs = BatchNorm(6), nn.BatchNorm2d(6)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(8, 6, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("shape", [(16, 6), (16, 6, 5), (16, 6, 3, 3), (16, 6, 2, 3, 3)])
def test_virtual_batch_equals_per_chunk_bn(shape):
    """BN with virtual_batch n on a batch of W*n ≡ W separate BNs, one per chunk."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64) + 0.5
    b = torch.randn(6, dtype=torch.float64)
    m = BatchNorm(6, virtual_batch=4).double()
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(b)
    y = m(x)
    x2 = x.detach().clone().requires_grad_(True)
    expected = torch.cat([F.batch_norm(c, None, None, w, b, True) for c in x2.split(4)])
    torch.testing.assert_close(y, expected)
    dy = torch.randn_like(y)
    y.backward(dy)
    expected.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    # Running stats: the average of the per-chunk statistics, folded in once.
    dims = [0] + list(range(2, len(shape)))
    means = torch.stack([c.mean(dims) for c in x.detach().split(4)]).mean(0)
    vars_ = torch.stack([c.var(dims, unbiased=True) for c in x.detach().split(4)]).mean(0)
    torch.testing.assert_close(m.running_mean, 0.1 * means)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * vars_)
    assert int(m.num_batches_tracked) == 1


def test_virtual_batch_uneven_tail_and_channels_last():
    m = BatchNorm(4, virtual_batch=4)
    x = torch.randn(10, 4, 3, 3).to(memory_format=torch.channels_last)
    y = m(x)
    chunks = x.split(4)  # 4 + 4 + 2: three workers, the last with the epoch's remainder
    expected = torch.cat([F.batch_norm(c, None, None, training=True) for c in chunks])
    torch.testing.assert_close(y, expected)
    # one optimizer step = one update of the running statistics (the workers' average)
    assert int(m.num_batches_tracked) == 1
    means = torch.stack([c.mean((0, 2, 3)) for c in chunks]).mean(0)
    vars_ = torch.stack([c.transpose(0, 1).flatten(1).var(1) for c in chunks]).mean(0)
    torch.testing.assert_close(m.running_mean, 0.1 * means)
    torch.testing.assert_close(m.running_var, 0.9 + 0.1 * vars_)
    m2 = BatchNorm(4, virtual_batch=5)
    assert m2(x).is_contiguous(memory_format=torch.channels_last)


def test_bn_dim_option_fixes_the_rank():
    m = norm_layer("bn", 8, dim=2)
    assert m(torch.randn(4, 8, 3, 3)).shape == (4, 8, 3, 3) and "dim=2" in repr(m)
    with pytest.raises(ValueError, match=r"dim=2 \(BatchNorm2d\) expects input of ndim 4, got "
                                         r"ndim=5 with shape \(4, 8, 2, 3, 3\)"):
        m(torch.randn(4, 8, 2, 3, 3))
    one = norm_layer("bn", 8, dim=1)  # BatchNorm1d: (N, C) or (N, C, L)
    assert one(torch.randn(4, 8)).shape == (4, 8) and one(torch.randn(4, 8, 5)).shape == (4, 8, 5)
    with pytest.raises(ValueError, match="ndim 2 or 3"):
        one(torch.randn(4, 8, 3, 3))
    assert norm_layer("brn", 8, dim=3).dim == 3 and norm_layer("syncbn", 8, dim=3).dim == 3
    with pytest.raises(ValueError, match=r"dim must be None, 1, 2 or 3.*got 4"):
        norm_layer("bn", 8, dim=4)
    # the state_dict is still torch's BatchNorm2d's
    assert set(m.state_dict()) == set(nn.BatchNorm2d(8).state_dict())


def test_virtual_batch_eval_uses_running_stats():
    m = BatchNorm(4, virtual_batch=2)
    m(torch.randn(8, 4, 3))
    m.eval()
    x = torch.randn(8, 4, 3)
    torch.testing.assert_close(m(x), F.batch_norm(x, m.running_mean, m.running_var))


def test_set_virtual_batch_leaves_gn_alone_and_refuses_torch_bn():
    model = nn.Sequential(norm_layer("bn", 4), norm_layer("gn", 4, num_groups=2),
                          norm_layer("brn", 4))
    set_virtual_batch(model, 2)
    assert model[0].virtual_batch == 2 and model[2].virtual_batch == 2
    gn = model[1]
    x = torch.randn(8, 4, 3)
    torch.testing.assert_close(gn(x), torch.cat([gn(c) for c in x.split(2)]))  # GN ⟂ W
    with pytest.raises(TypeError, match=r"module 1 is BatchNorm2d.*convert_norms"):
        set_virtual_batch(nn.Sequential(nn.Identity(), nn.BatchNorm2d(3)), 2)
    with pytest.raises(ValueError, match=r"positive int or None, got 0"):
        set_virtual_batch(model, 0)
    set_virtual_batch(model, None)
    assert model[0].virtual_batch is None


# --- Batch Renorm -------------------------------------------------------------------------------


def test_brn_with_unit_limits_is_bn():
    torch.manual_seed(1)
    brn = BatchRenorm(5, momentum=0.1, r_max=1.0, d_max=0.0).double()
    bn = BatchNorm(5, momentum=0.1).double()
    with torch.no_grad():
        for m in (brn, bn):
            m.weight.copy_(torch.linspace(0.5, 1.5, 5))
            m.bias.copy_(torch.linspace(-1, 1, 5))
    for _ in range(3):  # several steps so the running stats differ from their init
        x = torch.randn(8, 5, 4, 4, dtype=torch.float64) * 3 + 2
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y1, y2 = brn(x1), bn(x2)
        torch.testing.assert_close(y1, y2)
        dy = torch.randn_like(y1)
        y1.backward(dy), y2.backward(dy)
        torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(brn.running_mean, bn.running_mean)
    torch.testing.assert_close(brn.running_var, bn.running_var)
    brn.eval(), bn.eval()
    x = torch.randn(4, 5, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(brn(x), bn(x))


def test_brn_corrects_towards_running_stats():
    """With loose limits and converged running stats, BRN output is the running-stat transform."""
    m = BatchRenorm(3, r_max=100.0, d_max=100.0, warmup_steps=0, r_max_steps=0, d_max_steps=0,
                    affine=False)
    with torch.no_grad():
        m.running_mean.fill_(1.0)
        m.running_var.fill_(4.0)
    x = torch.randn(6, 3, 5)
    expected = (x - 1.0) / torch.sqrt(torch.tensor(4.0 + m.eps))
    torch.testing.assert_close(m(x), expected, atol=1e-5, rtol=1e-5)


def test_brn_warmup_acts_as_bn_then_relaxes():
    """Default BRN: BN for the warm-up steps, then r, d pull towards the running statistics."""
    torch.manual_seed(0)
    brn = BatchRenorm(3, warmup_steps=2, r_max_steps=4, d_max_steps=4, momentum=0.0)
    with torch.no_grad():  # running statistics far from any batch's
        brn.running_mean.fill_(5.0)
        brn.running_var.fill_(9.0)
    x = torch.randn(8, 3, 4)
    bn_out = F.batch_norm(x, None, None, training=True)
    for _ in range(2):  # steps 0, 1: limits (1, 0), so exactly BN
        torch.testing.assert_close(brn(x), bn_out)
    brn(x), brn(x)  # steps 2, 3: relaxing
    assert int(brn.num_batches_tracked) == 4 and brn.current_limits() == (3.0, 5.0)
    relaxed = brn(x)  # r = clip(σ_B / 3), d = clip((μ_B − 5) / 3): far from BN's output
    assert (relaxed - bn_out).abs().max() > 0.5


def test_brn_warmup_schedule():
    m = BatchRenorm(2, r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=30, d_max_steps=20)
    limits = {}
    for step in range(40):
        m.num_batches_tracked.fill_(step)
        limits[step] = m.current_limits()
    assert limits[0] == (1.0, 0.0) and limits[10] == (1.0, 0.0)
    assert limits[20] == (2.0, 5.0)
    assert limits[30] == (3.0, 5.0) and limits[39] == (3.0, 5.0)
    assert limits[15] == (1.5, 2.5)
    with pytest.raises(ValueError, match=r"r_max >= 1 and d_max >= 0, got r_max=0.5"):
        BatchRenorm(2, r_max=0.5)


# --- Weight Standardization -----------------------------------------------------------------


@pytest.mark.parametrize("cls,shape", [(WSConv1d, (2, 3, 9)), (WSConv2d, (2, 3, 9, 9)),
                                       (WSConv3d, (2, 3, 5, 5, 5))])
def test_ws_weights_standardized(cls, shape):
    conv = cls(3, 8, kernel_size=3, bias=False)
    with torch.no_grad():
        conv.weight.mul_(5).add_(2)  # far from standardized on purpose
    w = groupnorm.standardize_weight(conv.weight).reshape(8, -1)
    torch.testing.assert_close(w.mean(1), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(w.var(1, unbiased=False), torch.ones(8), atol=1e-4, rtol=0)
    x = torch.randn(shape)
    plain = getattr(F, f"conv{len(shape) - 2}d")(x, groupnorm.standardize_weight(conv.weight))
    torch.testing.assert_close(conv(x), plain)
    assert conv.state_dict().keys() == {"weight"}
    conv(x).sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# --- convert_norms ------------------------------------------------------------------------------


def _nested_bn_model() -> nn.Module:
    block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Sequential(block, nn.Sequential(nn.Conv2d(16, 32, 1), nn.SyncBatchNorm(32))),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.BatchNorm1d(64),
    )


def test_convert_norms_leaves_no_bn_and_keeps_affine():
    model = _nested_bn_model()
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model[1].bias.fill_(-1.0)
    out = convert_norms(model, to="gn", num_groups=8)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in out.modules())
    gns = [m for m in out.modules() if isinstance(m, GroupNorm)]
    assert len(gns) == 4 and {m.num_groups for m in gns} == {8}
    assert torch.equal(out[1].weight, torch.full((8,), 2.0))
    assert torch.equal(out[1].bias, torch.full((8,), -1.0))
    y = out(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 64) and torch.isfinite(y).all()


def test_convert_norms_indivisible_error_and_gcd():
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.Sequential(nn.BatchNorm2d(24)))
    with pytest.raises(ValueError, match=r"cannot convert 1\.0 \(BatchNorm2d, 24 channels\) to "
                                         r"GN with num_groups=32.*'gcd' \(num_groups 8\)"):
        convert_norms(model, to="gn", num_groups=32)
    out = convert_norms(model, to="gn", num_groups=32, on_indivisible="gcd")
    assert out[1][0].num_groups == 8


@pytest.mark.parametrize("cls", [GroupNorm, nn.GroupNorm])
def test_group_norm_classes_as_kind(cls):
    assert norm_layer(cls, 8, num_groups=2).num_groups == 2
    assert norm_layer(cls, 64).num_groups == 32  # the family's default G
    model = nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24))
    out = convert_norms(model, to=cls, num_groups=8)
    assert type(out[1]) is cls and out[1].num_groups == 8
    with pytest.raises(ValueError, match=r"1 \(BatchNorm2d, 24 channels\).*num_groups=16"):
        convert_norms(nn.Sequential(nn.Conv2d(3, 24, 1), nn.BatchNorm2d(24)), to=cls,
                      num_groups=16)
    gcd = convert_norms(nn.Sequential(nn.BatchNorm2d(24)), to=cls, num_groups=16,
                        on_indivisible="gcd")
    assert gcd[0].num_groups == 8
    if cls is GroupNorm:
        assert norm_layer(cls, 8, group_size=2).num_groups == 4
        assert convert_norms(nn.BatchNorm2d(12), to=cls, group_size=3).num_groups == 4


def test_convert_norms_root_group_size_and_back_to_bn():
    root = convert_norms(nn.BatchNorm2d(16), to="gn", group_size=4)
    assert isinstance(root, GroupNorm) and root.num_groups == 4
    bn = nn.BatchNorm2d(6)
    bn(torch.randn(4, 6, 2, 2))
    ours = convert_norms(nn.Sequential(bn), to="bn")[0]
    assert type(ours) is BatchNorm
    torch.testing.assert_close(ours.running_mean, bn.running_mean)
    sync = groupnorm.SyncBatchNorm.convert_sync_batchnorm(_nested_bn_model())
    assert sum(isinstance(m, groupnorm.SyncBatchNorm) for m in sync.modules()) == 4
