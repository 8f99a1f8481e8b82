"""IEEE float32 during the operators' products (issue 17: cuDNN's default TF32 on Ampere/Hopper).

The flags cannot change numbers on the CPU (no TF32 there), so what is tested is the setting
itself: a dispatch mode reads PyTorch's TF32 settings at every convolution and matmul aten op
that runs while a product (or a graph build) runs, including those of the backward passes; they must all read IEEE
float32 with ``precision="ieee"``, and the caller's settings (TF32 allowed, set before) must be
back afterwards, also after an exception. With ``precision="tf32"`` they are left as they are.
The products themselves are checked against dense float64 ground truth.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import resgeom_fast as rg
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import _precision
from tests.operators._operator_nets import ConvNet, FCNet, dense_hessian, rel

NEW_API = _precision._new_api()


def flags() -> dict:
    """PyTorch's TF32 settings as the caller sees them (legacy flags; per-op values on torch >= 2.9)."""
    f = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
         "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32}
    if NEW_API:
        f["cudnn.conv"] = _precision._effective(torch.backends.cudnn.conv.fp32_precision)
        f["cudnn.rnn"] = _precision._effective(torch.backends.cudnn.rnn.fp32_precision)
        f["cuda.matmul"] = _precision._effective(torch.backends.cuda.matmul.fp32_precision)
    return f


IEEE = {"cudnn.allow_tf32": False, "cuda.matmul.allow_tf32": False}
TF32 = {"cudnn.allow_tf32": True, "cuda.matmul.allow_tf32": True}
if NEW_API:
    IEEE.update({"cudnn.conv": "ieee", "cudnn.rnn": "ieee", "cuda.matmul": "ieee"})
    TF32.update({"cudnn.conv": "tf32", "cudnn.rnn": "tf32", "cuda.matmul": "tf32"})


# the aten ops whose float32 arithmetic TF32 changes: convolutions (cuDNN) and matmuls (cuBLAS)
_TF32_OPS = ("convolution", "conv", "mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addmv", "mv")


class FlagRecorder(TorchDispatchMode):
    """Records the TF32 settings at every convolution / matmul aten op (forward and backward
    passes) run while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__.lstrip("_")
        if name in _TF32_OPS or name.startswith("convolution") or "conv" in name:
            self.ops.add(name)
            self.seen.append(tuple(sorted(flags().items())))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def tf32_allowed():
    """The caller allowed TF32 (legacy flags True) before the test; PyTorch's settings restored after."""
    cudnn, mm = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = ([cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, mm.fp32_precision] if NEW_API
             else [cudnn.allow_tf32, mm.allow_tf32])
    cudnn.allow_tf32 = True
    mm.allow_tf32 = True
    assert flags() == TF32
    yield
    if NEW_API:
        cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision, mm.fp32_precision = saved
    else:
        cudnn.allow_tf32, mm.allow_tf32 = saved


def _conv_data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _fc_data(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _records(run) -> set:
    rec = FlagRecorder()
    with rec:
        run()
    assert rec.seen, "no convolution or matmul ran inside the instrumented call"
    return set(rec.seen)


CURVATURE_CASES = [
    ("hessian", "double_backward", "conv"),
    ("hessian", "forward_over_reverse", "conv"),
    ("hessian", "structured", "fc"),
    ("ggn", "double_backward", "conv"),
    ("block_hessians", "double_backward", "conv"),
]


@pytest.mark.parametrize("kind,hvp,net", CURVATURE_CASES)
def test_curvature_products_run_in_ieee_float32_and_restore_the_callers_flags(tf32_allowed, kind, hvp, net):
    model = (ConvNet() if net == "conv" else FCResNet(5, 6, 3, 3, seed=0)).double()
    x, y = _conv_data() if net == "conv" else _fc_data()
    loss = nn.CrossEntropyLoss()
    build = {}

    def construct():
        ops = getattr(rg.operators, kind)(model, loss, (x, y), hvp=hvp)
        build["op"] = ops[0] if isinstance(ops, list) else ops

    assert _records(construct) == {tuple(sorted(IEEE.items()))}      # graph build, contract check
    assert flags() == TF32
    op = build["op"]
    assert op.precision == "ieee"
    if hvp == "structured":
        assert op.hvp_method == "structured"
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = {}
    seen = _records(lambda: out.setdefault("HV", op.matmat(V)))
    assert seen == {tuple(sorted(IEEE.items()))}, seen
    assert flags() == TF32                                           # restored after the product
    if kind == "hessian":                                            # and the product is right
        H = dense_hessian(model, loss, x, y)
        assert rel(out["HV"], H @ V) < 1e-10


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_jacobian_products_run_in_ieee_float32_and_restore_the_callers_flags(tf32_allowed, path):
    model = ConvNet().double()
    x, _ = _conv_data()
    got = {}
    seen = _records(lambda: got.setdefault("J", rg.operators.residual_jacobians(model, x, path=path)))
    assert seen == {tuple(sorted(IEEE.items()))}
    J = got["J"][1]                                                  # the stride-2 block
    assert J.precision == "ieee" and J.path == path and flags() == TF32
    g = torch.Generator().manual_seed(2)
    V = torch.randn(x.shape[0], J.shape[1], 2, dtype=torch.float64, generator=g)
    U = torch.randn(x.shape[0], J.shape[0], 2, dtype=torch.float64, generator=g)
    res = {}
    assert _records(lambda: res.setdefault("JV", J.matmat(V))) == {tuple(sorted(IEEE.items()))}
    assert _records(lambda: res.setdefault("JTU", J.T.matmat(U))) == {tuple(sorted(IEEE.items()))}
    assert flags() == TF32
    # ground truth: the dense Jacobian of the branch of sample 0 (jacrev, float64)
    branch = J.info.branch.eval()
    Jd = torch.func.jacrev(lambda h: branch(h.reshape(1, *J.in_shape)).reshape(-1))(J.h[0].reshape(-1))
    assert rel(res["JV"][0], Jd @ V[0]) < 1e-12
    assert rel(res["JTU"][0], Jd.T @ U[0]) < 1e-12


def test_precision_tf32_leaves_the_callers_settings(tf32_allowed):
    model = ConvNet().double()
    x, y = _conv_data()
    op = rg.operators.hessian(model, nn.CrossEntropyLoss(), (x, y), hvp="double_backward", precision="tf32")
    V = torch.randn(op.shape[0], 1, dtype=torch.float64)
    assert _records(lambda: op.matmat(V)) == {tuple(sorted(TF32.items()))}
    J = rg.operators.residual_jacobians(model, x, path="fast", precision="tf32")[0]
    assert _records(lambda: J.matmat(torch.randn(x.shape[0], J.shape[1], 1, dtype=torch.float64))) \
        == {tuple(sorted(TF32.items()))}
    # on the CPU there is no TF32: the products agree with the IEEE ones bitwise
    op_ieee = rg.operators.hessian(model, nn.CrossEntropyLoss(), (x, y), hvp="double_backward")
    assert torch.equal(op.matmat(V), op_ieee.matmat(V))


def test_flags_restored_when_a_product_raises(tf32_allowed):
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3).double()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 2:          # construction: the contract check, the loss validation
                assert flags() == IEEE
                raise RuntimeError("boom inside the product")
            return self.lin(x)

    x, y = _fc_data()
    op = rg.operators.hessian(Boom(), nn.CrossEntropyLoss(), (x, y), hvp="forward_over_reverse", cache=False)
    with pytest.raises(RuntimeError, match="boom inside the product"):
        op.matmat(torch.randn(op.shape[0], 1, dtype=torch.float64))
    assert flags() == TF32


@pytest.mark.parametrize("setup", [
    "pass",
    "torch.backends.cudnn.allow_tf32 = False; torch.backends.cuda.matmul.allow_tf32 = False",
    "torch.backends.cudnn.allow_tf32 = True; torch.backends.cuda.matmul.allow_tf32 = True",
    "torch.backends.cudnn.fp32_precision = 'tf32'",
    "torch.backends.fp32_precision = 'tf32'",
    "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "torch.backends.cudnn.conv.fp32_precision = 'ieee'; torch.backends.cudnn.rnn.fp32_precision = 'tf32'",
])
def test_ieee_float32_forces_ieee_in_every_state_and_restores_it_exactly(setup):
    """Legacy and new-API states (a mix of both included): inside, every operator's effective
    precision is IEEE; after, every setting is as before, also when the block raises."""
    if "fp32_precision" in setup and not NEW_API:
        pytest.skip("this PyTorch has no per-operator fp32_precision settings")
    names = (["backends.fp32_precision", "backends.cudnn.fp32_precision", "backends.cudnn.conv.fp32_precision",
              "backends.cudnn.rnn.fp32_precision", "backends.cuda.matmul.fp32_precision"] if NEW_API
             else ["backends.cudnn.allow_tf32", "backends.cuda.matmul.allow_tf32"])

    def state():
        out = {}
        for n in names:
            obj = torch
            for part in n.split("."):
                obj = getattr(obj, part)
            out[n] = obj
        return out

    original = state()
    try:
        exec(setup, {"torch": torch})
        before = state()
        legacy = [_precision._legacy(torch.backends.cudnn), _precision._legacy(torch.backends.cuda.matmul)]
        for fail in (False, True):
            with contextlib.suppress(KeyError):
                with _precision.ieee_float32(), _precision.ieee_float32():          # nested, as in a build
                    if NEW_API:
                        assert {_precision._effective(getattr(torch.backends.cudnn, op).fp32_precision)
                                for op in ("conv", "rnn")} == {"ieee"}
                        assert _precision._effective(torch.backends.cuda.matmul.fp32_precision) == "ieee"
                    # the legacy flags read False, except where the caller's own mix of the two
                    # APIs makes PyTorch refuse to read them (then the per-operator values count)
                    if legacy[0] is not None:
                        assert torch.backends.cudnn.allow_tf32 is False
                    if legacy[1] is not None:
                        assert torch.backends.cuda.matmul.allow_tf32 is False
                    if fail:
                        raise KeyError("inside")
            assert state() == before
            assert [_precision._legacy(torch.backends.cudnn), _precision._legacy(torch.backends.cuda.matmul)] == legacy
    finally:
        if NEW_API:
            # parents first: setting one propagates to its children
            for n in names:
                parts = n.split(".")
                obj = torch
                for part in parts[:-1]:
                    obj = getattr(obj, part)
                setattr(obj, parts[-1], original[n])
        else:
            torch.backends.cudnn.allow_tf32 = original["backends.cudnn.allow_tf32"]
            torch.backends.cuda.matmul.allow_tf32 = original["backends.cuda.matmul.allow_tf32"]
    assert state() == original


@pytest.mark.parametrize("call", ["hessian", "ggn", "block_hessians", "residual_jacobians"])
def test_precision_argument_is_checked(call):
    model = FCNet().double()
    x, y = _fc_data()
    args = (model, x) if call == "residual_jacobians" else (model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match=rf"{call}: precision: expected one of \['ieee', 'tf32'\], got 'fp16'"):
        getattr(rg.operators, call)(*args, precision="fp16")
