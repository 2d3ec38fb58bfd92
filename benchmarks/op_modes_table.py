"""Which path computes each autograd / tracing mode on each backend, and its error vs float64.

For every (mode, backend) it runs the mode once on float32 input (float64 where the mode is a
float64 check), counts what ran — the fast kernels' forward and backward, the composite aten
path, the composite backward — and compares the result with torch.nn.GroupNorm's maths
(``F.group_norm``) in float64 on the same rounded inputs: max |ours − oracle| / max(1, |oracle|).
Cells read ``native`` (kernels only), ``composite`` (aten ops only), ``native + composite``
(which parts ran where), ``oracle (aten ops)`` for the reference backend, or
``error: <message>``. "auto" is forced onto the C++ path (every CPU_AUTO_TABLE entry opened),
which is where it used to lose derivatives. The "triton" column needs the interpreter:

    TRITON_INTERPRET=1 python benchmarks/op_modes_table.py [--out table.md]

Input: x (2, 8, 4, 4) fp32 with offset 0.5 and scale 2, G = 4, γ in [0.5, 1.5], β ~ N(0, 1),
SiLU after a residual add (the modes that take a module use GroupNorm(4, 8, activation="silu")).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import os
import platform
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import groupnorm  # noqa: E402
from groupnorm import GroupNorm, functional, kernels  # noqa: E402
from groupnorm._sysinfo import cpu_model  # noqa: E402
from groupnorm.kernels import ops  # noqa: E402

SHAPE, G = (2, 8, 4, 4), 4


class Counter:
    """Counts calls into the kernels and into the composite path while a mode runs."""

    def __init__(self) -> None:
        self.n = {"kernel_fwd": 0, "kernel_bwd": 0, "composite": 0, "composite_bwd": 0}

    @contextlib.contextmanager
    def watch(self):
        saved_impls = dict(ops._IMPLS)
        saved_comp, saved_bwd = functional.group_norm_composite, ops.group_norm_backward_composite

        def count(key, fn):
            def wrapped(*a, **k):
                self.n[key] += 1
                return fn(*a, **k)
            return wrapped

        for name, (f, b) in saved_impls.items():
            ops._IMPLS[name] = (count("kernel_fwd", f), count("kernel_bwd", b))
        functional.group_norm_composite = count("composite", saved_comp)
        ops.group_norm_backward_composite = count("composite_bwd", saved_bwd)
        try:
            yield self
        finally:
            ops._IMPLS.update(saved_impls)
            functional.group_norm_composite = saved_comp
            ops.group_norm_backward_composite = saved_bwd

    def label(self) -> str:
        """native (kernels only) / composite (aten ops only) / both, with what ran."""
        n = self.n
        parts = [name for key, name in (("kernel_fwd", "kernel fwd"), ("kernel_bwd", "kernel bwd"),
                                        ("composite", "composite fwd"),
                                        ("composite_bwd", "composite bwd")) if n[key]]
        kernels_ran = n["kernel_fwd"] or n["kernel_bwd"]
        composite_ran = n["composite"] or n["composite_bwd"]
        if kernels_ran and not composite_ran:
            return "native"
        if composite_ran and not kernels_ran:
            return "composite"
        if not parts:
            return "oracle (aten ops)"
        return "native + composite (" + ", ".join(parts) + ")"


def inputs(dtype=torch.float32, fmt=torch.contiguous_format):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(SHAPE, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    w = (torch.rand(SHAPE[1], generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(SHAPE[1], generator=g, dtype=torch.float64).to(dtype)
    r = torch.randn(SHAPE, generator=g, dtype=torch.float64).to(dtype)
    return x.contiguous(memory_format=fmt), w, b, r.contiguous(memory_format=fmt)


def ours(backend):
    return lambda x, w, b, r: groupnorm.group_norm(x, G, w, b, activation="silu", residual=r,
                                                   backend=backend)


def theirs(x, w, b, r):
    return F.silu(F.group_norm(x.contiguous(), G, w, b) + r)


def leaves(*ts, dtype=None):
    return [t.detach().to(dtype or t.dtype).requires_grad_(True) for t in ts]


def module(backend):
    m = GroupNorm(G, SHAPE[1], activation="silu", backend=backend)
    ref = nn.GroupNorm(G, SHAPE[1])
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        ref.bias.normal_(generator=torch.Generator().manual_seed(2))
    m.load_state_dict(ref.state_dict())
    return m, ref.double()


# --- the modes: each returns (ours, oracle) tensors ---------------------------------------------

def m_forward(backend):
    x, w, b, r = inputs()
    with torch.no_grad():
        return [ours(backend)(x, w, b, r)], [theirs(*(t.double() for t in (x, w, b, r)))]


def m_backward(backend):
    x0 = inputs()
    a, e = leaves(*x0), leaves(*x0, dtype=torch.float64)
    return (list(torch.autograd.grad(ours(backend)(*a).square().sum(), a)),
            list(torch.autograd.grad(theirs(*e).square().sum(), e)))


def m_double_backward(backend):
    """R1-style penalty ‖∂⟨y, v⟩/∂x‖², then its gradient (create_graph=True)."""
    x0 = inputs()
    v = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))

    def run(f, ls, vv):
        (gx,) = torch.autograd.grad((f(*ls) * vv).sum(), ls[0], create_graph=True)
        return list(torch.autograd.grad(gx.square().sum(), ls))

    return run(ours(backend), leaves(*x0), v), run(theirs, leaves(*x0, dtype=torch.float64),
                                                   v.double())


def m_gradgradcheck(backend):
    x0 = inputs(torch.float64)
    ls = leaves(*x0)
    ok = torch.autograd.gradgradcheck(ours(backend), tuple(ls), check_fwd_over_rev=True,
                                      fast_mode=True)
    return [torch.tensor(0.0 if ok else 1.0)], [torch.tensor(0.0)]


def m_jvp(backend):
    x0 = inputs()
    t = [torch.randn(s.shape, generator=torch.Generator().manual_seed(4)) for s in x0]
    _, got = torch.func.jvp(ours(backend), tuple(x0), tuple(t))
    _, want = torch.func.jvp(theirs, tuple(s.double() for s in x0), tuple(s.double() for s in t))
    return [got], [want]


def m_dual(backend):
    x0 = inputs()
    t = [torch.randn(s.shape, generator=torch.Generator().manual_seed(4)) for s in x0]
    with fwAD.dual_level():
        got = fwAD.unpack_dual(ours(backend)(*(fwAD.make_dual(p, d) for p, d in zip(x0, t,
                                                                                   strict=True))))
    _, want = torch.func.jvp(theirs, tuple(s.double() for s in x0), tuple(s.double() for s in t))
    return [got.tangent], [want]


def _jac(jac, backend):
    x, w, b, r = inputs()

    def fo(w_):
        return ours(backend)(x, w_, b, r).mean(dim=(0, 2, 3))

    def ft(w_):
        return theirs(x.double(), w_, b.double(), r.double()).mean(dim=(0, 2, 3))

    return [jac(fo)(w)], [jac(ft)(w.double())]


def m_jacfwd(backend):
    return _jac(torch.func.jacfwd, backend)


def m_jacrev(backend):
    return _jac(torch.func.jacrev, backend)


def m_func_grad(backend):
    x0 = inputs()
    got = torch.func.grad(lambda *a: ours(backend)(*a).square().sum(), argnums=(0, 1, 2, 3))(*x0)
    want = torch.func.grad(lambda *a: theirs(*a).square().sum(), argnums=(0, 1, 2, 3))(
        *(t.double() for t in x0))
    return list(got), list(want)


def _vmap(backend, in_dim):
    x, w, b, r = inputs()
    xs = torch.stack([x * (1 + i) + i for i in range(3)], in_dim).contiguous()
    rs = torch.stack([r] * 3, in_dim).contiguous()
    got = torch.vmap(ours(backend), in_dims=(in_dim, None, None, in_dim))(xs, w, b, rs)
    want = torch.vmap(theirs, in_dims=(in_dim, None, None, in_dim))(
        xs.double(), w.double(), b.double(), rs.double())
    return [got], [want]


def m_vmap0(backend):
    return _vmap(backend, 0)


def m_vmap1(backend):
    return _vmap(backend, 1)


def m_functional_call(backend):
    m, ref = module(backend)
    x = inputs()[0]
    params = {k: v.detach().requires_grad_() for k, v in m.named_parameters()}
    y = torch.func.functional_call(m, params, (x,))
    got = list(torch.autograd.grad(y.square().sum(), list(params.values())))
    want = list(torch.autograd.grad(F.silu(ref(x.double())).square().sum(),
                                    list(ref.parameters())))
    return [y, *got], [F.silu(ref(x.double())), *want]


def m_per_sample(backend):
    from torch.nn.utils._per_sample_grad import call_for_per_sample_grads

    m, ref = module(backend)
    x = inputs()[0]
    call_for_per_sample_grads(m, loss_reduction="sum")(x).square().sum().backward()
    params = {k: v.detach() for k, v in ref.named_parameters()}

    def loss(p, xi):
        return F.silu(torch.func.functional_call(ref, p, (xi[None],))).square().sum()

    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x.double())
    return [m.weight.grad_sample, m.bias.grad_sample], [want["weight"], want["bias"]]


def m_fx(backend):
    m, ref = module(backend)
    gm = torch.fx.symbolic_trace(nn.Sequential(m))
    x = inputs()[0]
    return [gm(x)], [F.silu(ref(x.double()))]


def m_export(backend):
    m, ref = module(backend)
    x = inputs()[0]
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: torch.export.Dim("h", min=2, max=64)}
    ep = torch.export.export(m, (x,), dynamic_shapes={"input": dims})
    x2 = torch.randn(5, 8, 7, 4)
    return [ep.module()(x2)], [F.silu(ref(x2.double()))]


def m_onnx(backend):
    import onnxruntime as ort

    m, ref = module(backend)
    x = inputs()[0]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        path = os.path.join(tmp, "gn.onnx")
        dims = {0: torch.export.Dim("batch", min=1, max=64)}
        torch.onnx.export(m, (x,), path, dynamo=True, dynamic_shapes={"input": dims})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        x2 = torch.randn(5, 8, 4, 4)
        (got,) = session.run(None, {session.get_inputs()[0].name: x2.numpy()})
    return [torch.from_numpy(got)], [F.silu(ref(x2.double()))]


def m_compile(backend):
    x0 = inputs()
    a, e = leaves(*x0), leaves(*x0, dtype=torch.float64)
    f = torch.compile(ours(backend), fullgraph=True, backend="aot_eager")
    y = f(*a)
    return ([y, *torch.autograd.grad(y.square().sum(), a)],
            [theirs(*e), *torch.autograd.grad(theirs(*e).square().sum(), e)])


def m_compile_func_grad(backend):
    x0 = inputs()
    f = torch.compile(torch.func.grad(lambda *a: ours(backend)(*a).square().sum(),
                                      argnums=(0, 1, 2, 3)), fullgraph=True, backend="aot_eager")
    want = torch.func.grad(lambda *a: theirs(*a).square().sum(), argnums=(0, 1, 2, 3))(
        *(t.double() for t in x0))
    return list(f(*x0)), list(want)


def m_compile_vmap(backend):
    torch._dynamo.reset()
    x, w, b, r = inputs()
    xs = torch.stack([x * (1 + i) + i for i in range(3)]).contiguous()
    rs = torch.stack([r] * 3)
    f = torch.compile(torch.vmap(ours(backend), in_dims=(0, None, None, 0)), fullgraph=True,
                      backend="aot_eager")
    want = torch.vmap(theirs, in_dims=(0, None, None, 0))(xs.double(), w.double(), b.double(),
                                                           rs.double())
    return [f(xs, w, b, rs)], [want]


def m_compile_double_backward(backend):
    x0 = inputs()
    a = leaves(*x0)
    f = torch.compile(ours(backend), fullgraph=True, backend="aot_eager")
    (gx,) = torch.autograd.grad(f(*a).square().sum(), a[0], create_graph=True)
    return list(torch.autograd.grad(gx.square().sum(), a)), []


MODES: list[tuple[str, Callable]] = [
    ("forward (eager)", m_forward),
    ("backward (eager)", m_backward),
    ("double backward (create_graph, R1 penalty)", m_double_backward),
    ("gradgradcheck fp64 (rev-rev, fwd-over-rev)", m_gradgradcheck),
    ("forward AD: torch.func.jvp", m_jvp),
    ("forward AD: dual tensors", m_dual),
    ("torch.func.jacfwd", m_jacfwd),
    ("torch.func.jacrev", m_jacrev),
    ("torch.func.grad", m_func_grad),
    ("vmap in_dims=0", m_vmap0),
    ("vmap in_dims=1", m_vmap1),
    ("functional_call + backward", m_functional_call),
    ("per-sample grads (ExpandedWeights)", m_per_sample),
    ("FX symbolic_trace", m_fx),
    ("torch.export (dynamic batch, H)", m_export),
    ("ONNX (dynamo exporter) in onnxruntime", m_onnx),
    ("torch.compile fullgraph (aot_eager)", m_compile),
    ("torch.compile + torch.func.grad", m_compile_func_grad),
    ("torch.compile + vmap", m_compile_vmap),
    ("torch.compile + double backward", m_compile_double_backward),
]


def rel_err(got: list, want: list) -> float:
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        scale = max(1.0, b.abs().max().item())
        worst = max(worst, (a.detach().double() - b.detach().double()).abs().max().item() / scale)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--backends", default="auto,torch,reference,cpu,triton")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    for key in kernels.CPU_AUTO_TABLE:
        kernels.CPU_AUTO_TABLE[key] = (0, 1 << 62)
    kernels.CPU_AUTO_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
    backends = args.backends.split(",")
    if "triton" in backends and not kernels._interpreting():
        backends.remove("triton")
        print("(triton left out: run with TRITON_INTERPRET=1 to include it)", file=sys.stderr)
    rows = []
    for name, fn in MODES:
        cells = []
        for backend in backends:
            counter = Counter()
            try:
                with counter.watch():
                    got, want = fn(backend)
                if name.startswith("gradgradcheck"):
                    cell = f"{counter.label()}; passes"
                elif not want:
                    cell = f"{counter.label()}; ran"
                else:
                    cell = f"{counter.label()}; {rel_err(got, want):.1e}"
            except Exception as err:  # noqa: BLE001 - the table records errors as cells
                msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                cell = f"error: {msg[:90]}"
            cells.append(cell)
            print(f"{name:<45} {backend:<10} {cell}", file=sys.stderr, flush=True)
        rows.append((name, cells))
    head = (f"Measured {datetime.date.today()} on {cpu_model() or platform.machine()} "
            f"({os.cpu_count()} cores), torch {torch.__version__}, float32 input unless the "
            f"mode says fp64; error = max|ours − F.group_norm in float64| / max(1, |oracle|); "
            f"auto forced onto the C++ path.\n\n")
    table = "| mode | " + " | ".join(backends) + " |\n"
    table += "|---|" + "---|" * len(backends) + "\n"
    for name, cells in rows:
        table += f"| {name} | " + " | ".join(cells) + " |\n"
    print(head + table)
    if args.out:
        args.out.write_text(head + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
