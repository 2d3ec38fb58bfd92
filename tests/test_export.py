"""torch.export and ONNX export on every backend: dynamic batch and spatial dims, fused activation.

Under export the dispatch takes the composite path (aten's group_norm + residual + activation),
so the exported program is the same for every backend and runs without this package's kernels.
The ONNX files are run in onnxruntime on shapes other than the example's. "auto" is forced onto
the C++ path (every CPU_AUTO_TABLE entry opened), which is what broke export before.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from groupnorm import GroupNorm, kernels

BACKENDS = ["auto", "torch", "reference", "cpu", "triton"]
# the dynamo-based exporters take seconds per call: by default the backends that used to break
# ("auto" on the C++ path, "cpu"); the others (same composite path) in the slow suite
FAST_DEFAULT = ("auto", "cpu")


def _params(values):
    return [pytest.param(v, marks=() if v in FAST_DEFAULT else pytest.mark.slow) for v in values]
HAS_ORT = all(importlib.util.find_spec(m) is not None
              for m in ("onnx", "onnxruntime", "onnxscript"))


@pytest.fixture(autouse=True)
def _auto_on_cpp(monkeypatch):
    for key in kernels.CPU_AUTO_TABLE:
        monkeypatch.setitem(kernels.CPU_AUTO_TABLE, key, (0, 1 << 62))


class Block(nn.Module):
    """conv → GN + residual + SiLU: the diffusion / ResNet block tail."""

    def __init__(self, backend: str, dims: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.conv = conv(8, 8, 3, padding=1)
        self.norm = GroupNorm(4, 8, activation="silu", backend=backend)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x), x)


def _torch_block(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The same block with torch.nn.GroupNorm's op."""
    n = block.norm
    return F.silu(F.group_norm(block.conv(x), 4, n.weight, n.bias, n.eps) + x)


def _dims(ndim: int):
    batch = torch.export.Dim("batch", min=1, max=64)
    spatial = {i: torch.export.Dim(f"s{i}", min=2, max=64) for i in range(2, ndim)}
    return {"x": {0: batch, **spatial}}


@pytest.mark.parametrize("dims", [2, pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_dynamic_batch_and_spatial(backend, dims):
    torch.manual_seed(0)
    block = Block(backend, dims).eval()
    example = torch.randn(2, 8, *(5,) * dims)
    ep = torch.export.export(block, (example,), dynamic_shapes=_dims(example.dim()))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("groupnorm" in op for op in ops), ops  # portable: aten ops only
    for shape in [(1, 8, *(3,) * dims), (5, 8, *(7,) * dims)]:
        x = torch.randn(shape)
        torch.testing.assert_close(ep.module()(x), _torch_block(block, x))


def _onnx_roundtrip(block, example, path, dynamo):
    import onnxruntime as ort

    if dynamo:
        torch.onnx.export(block, (example,), path, dynamo=True,
                          dynamic_shapes=_dims(example.dim()))
    else:
        axes = {0: "batch", **{i: f"s{i}" for i in range(2, example.dim())}}
        torch.onnx.export(block, (example,), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": axes})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 8, 3, 4), (6, 8, 9, 7)]:
        x = torch.randn(shape)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), _torch_block(block, x).detach(),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_ORT, reason="onnx / onnxruntime / onnxscript not installed")
@pytest.mark.parametrize("backend", _params(BACKENDS))
def test_onnx_export_runs_in_onnxruntime(backend, tmp_path):
    """torch.onnx.export (the torch.export-based exporter), then onnxruntime on other shapes."""
    torch.manual_seed(0)
    block = Block(backend).eval()
    _onnx_roundtrip(block, torch.randn(2, 8, 5, 5), tmp_path / "block.onnx", dynamo=True)


@pytest.mark.skipif(not HAS_ORT, reason="onnx / onnxruntime / onnxscript not installed")
@pytest.mark.parametrize("backend", BACKENDS)
def test_onnx_torchscript_exporter_runs_in_onnxruntime(backend, tmp_path):
    """The older TorchScript exporter (torch.jit.trace inside): also the composite path."""
    torch.manual_seed(0)
    block = Block(backend).eval()
    with pytest.warns(Warning):  # deprecation and tracer warnings: expected from this exporter
        _onnx_roundtrip(block, torch.randn(2, 8, 5, 5), tmp_path / "block.onnx", dynamo=False)


def test_export_of_fast_backend_in_training_graph():
    """torch.export's training IR (before decompositions) also holds no custom op, so a
    training program exported from a model on "cpu" runs where the extension is not built."""
    block = Block("cpu")
    example = torch.randn(2, 8, 5, 5)
    ep = torch.export.export(block, (example,), dynamic_shapes=_dims(4))
    assert all("groupnorm" not in str(n.target) for n in ep.graph.nodes)
