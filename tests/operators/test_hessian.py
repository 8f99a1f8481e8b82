"""Hessian / GGN operators against dense float64 ground truth, DataLoader accumulation, errors."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.operators._operator_nets import ConvNet, FCNet, assert_tuned, dense_hessian, dense_param_jacobian, rel
from resgeom_fast.operators import _autotune
from resgeom_fast.operators import block_hessians, ggn, hessian, residual_blocks
from resgeom_fast.operators.curvature import CurvatureEngine
from resgeom_fast.operators.hessian import ONEDNN_TOLERANCE, onednn_applicable, onednn_matmul

CE = nn.CrossEntropyLoss()
# the same numbers as CE, but not recognised by the structured path (which covers these nets through
# their torch.fx trace since issue 15): keeps the auto-tuner tests below on the autograd methods
SOFT_CE = lambda o, t: nn.functional.cross_entropy(o, t)  # noqa: E731
METHODS = ["auto", "double_backward", "forward_over_reverse"]


def _fc_data(n=20, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _conv_data(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("hvp", METHODS)
@pytest.mark.parametrize("case", ["fc", "fc_bn", "conv_bn"])
def test_equals_dense_hessian(case, hvp):
    model = (ConvNet() if case == "conv_bn" else FCNet(bn=case == "fc_bn")).double()
    x, y = _conv_data() if case == "conv_bn" else _fc_data()
    H = hessian(model, CE, (x, y), hvp=hvp)
    dense = dense_hessian(model, CE, x, y)
    assert H.shape == dense.shape and H.symmetric and H.dtype == torch.float64
    assert rel(H.to_dense(), dense) < 1e-6
    # k probes in one call equal k single products
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    assert rel(H.matmat(V), dense @ V) < 1e-6
    assert rel(H.matvec(V[:, 0]), dense @ V[:, 0]) < 1e-6


def test_auto_measures_both_methods_then_keeps_the_faster():
    model = FCNet(bn=True).double()
    x, y = _fc_data()
    H = hessian(model, SOFT_CE, (x, y))                # hvp="auto"
    dense = dense_hessian(model, CE, x, y)
    assert H.hvp_choice(1) == "double_backward" and H.hvp_choice(5) is None
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    for _ in range(4):                                 # two passes with each method, all exact
        assert rel(H.matmat(V), dense @ V) < 1e-6
    t = H.hvp_timings[5]
    assert sorted(t) == ["double_backward", "forward_over_reverse"]
    assert_tuned(t)
    best = min(t, key=lambda m: min(t[m]))
    assert H.hvp_choice(5) == best
    assert rel(H.matmat(V), dense @ V) < 1e-6
    assert H.hvp_timings[5] == t                       # decided: no more measuring
    assert H.hvp_choice(3) is None                     # other pass widths are measured on their own
    assert hessian(model, CE, (x, y), hvp="forward_over_reverse").hvp_choice(5) == "forward_over_reverse"


def test_vectors_in_passes():
    model = FCNet(bn=True).double()
    H = hessian(model, CE, _fc_data())
    V = torch.randn(H.shape[0], 7, dtype=torch.float64)
    full = H.matmat(V)
    H.max_vectors_per_pass = 3
    assert rel(H.matmat(V), full) < 1e-12


@pytest.mark.parametrize("hvp", METHODS)
def test_batchnorm_train(hvp):
    model = FCNet(bn=True).double().train()
    x, y = _fc_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    H = hessian(model, CE, (x, y), batchnorm="train", hvp=hvp)
    dense = dense_hessian(model, CE, x, y, batchnorm="train")
    assert rel(H.to_dense(), dense) < 1e-6
    # batch statistics differ from running statistics
    assert rel(H.to_dense(), dense_hessian(model, CE, x, y)) > 1e-3
    # modes and buffers untouched
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))


def test_mode_restored_eval():
    model = ConvNet().double()
    model.blocks[0].train(False)
    flags = [m.training for m in model.modules()]
    H = hessian(model, CE, _conv_data(), cache=False)
    H.matmat(torch.randn(H.shape[0], 2, dtype=torch.float64))
    assert [m.training for m in model.modules()] == flags


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("hvp", METHODS)
def test_dataloader_accumulation(cache, hvp):
    model = FCNet(bn=True).double()
    x, y = _fc_data(n=23)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)  # 7, 7, 7, 2
    Hl = hessian(model, CE, loader, cache=cache, hvp=hvp)
    Hf = hessian(model, CE, (x, y))
    assert Hl.num_samples == 23 and Hl.cached == cache
    V = torch.randn(Hl.shape[0], 3, dtype=torch.float64)
    assert rel(Hl.matmat(V), Hf.matmat(V)) < 1e-10


def test_param_subsets_and_flatten():
    model = FCNet().double()
    x, y = _fc_data()
    dense = dense_hessian(model, CE, x, y)
    names = [n for n, _ in model.named_parameters()]
    offs, o = {}, 0
    for n, p in model.named_parameters():
        offs[n] = (o, o + p.numel())
        o += p.numel()

    def sub(sel):
        idx = torch.cat([torch.arange(*offs[n]) for n in sel])
        return dense[idx][:, idx]

    block1 = [n for n in names if n.startswith("blocks.1.")]
    for spec in (block1, "blocks.1", model.blocks[1], residual_blocks(model)[1].block):
        H = hessian(model, CE, (x, y), params=spec)
        assert H.param_names == block1
        assert rel(H.to_dense(), sub(block1)) < 1e-6
    # mixed selection keeps the model order
    H = hessian(model, CE, (x, y), params=[model.head.bias, "stem.0.weight"])
    assert H.param_names == ["stem.0.weight", "head.bias"]
    assert rel(H.to_dense(), sub(H.param_names)) < 1e-6
    # flatten / unflatten round trip
    v = torch.randn(H.shape[0], dtype=torch.float64)
    parts = H.unflatten(v)
    assert parts["stem.0.weight"].shape == model.stem[0].weight.shape
    assert torch.equal(H.flatten(parts), v)
    assert torch.equal(H.flatten([parts[n] for n in H.param_names]), v)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert torch.equal(H.flatten(H.unflatten(V)), V)


def test_frozen_params_excluded():
    model = FCNet().double()
    model.stem.requires_grad_(False)
    H = hessian(model, CE, _fc_data())
    assert not any(n.startswith("stem") for n in H.param_names)


def test_block_hessians_are_diagonal_blocks():
    model = FCNet(bn=True, depth=3).double()
    x, y = _fc_data()
    dense = dense_hessian(model, CE, x, y)
    names = [n for n, _ in model.named_parameters()]
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    ops = block_hessians(model, CE, (x, y))
    assert len(ops) == 3
    for l, H in enumerate(ops):
        idx = []
        o = 0
        for n in names:
            if n.startswith(f"blocks.{l}."):
                idx += list(range(o, o + sizes[n]))
            o += sizes[n]
        idx = torch.tensor(idx)
        assert rel(H.to_dense(), dense[idx][:, idx]) < 1e-6


@pytest.mark.parametrize("hvp", METHODS)
@pytest.mark.parametrize("case", ["fc_bn", "conv_bn"])
def test_ggn_equals_dense(case, hvp):
    model = (ConvNet() if case == "conv_bn" else FCNet(bn=True)).double()
    x, y = _conv_data() if case == "conv_bn" else _fc_data()
    J = dense_param_jacobian(model, x)
    with torch.no_grad():
        out = model(x)
    Hout = torch.func.hessian(lambda o: CE(o.view(out.shape), y))(out.reshape(-1))
    dense = J.T @ Hout @ J
    G = ggn(model.train(), CE, (x, y), hvp=hvp)
    assert rel(G.to_dense(), dense) < 1e-6


def test_top_eigenvalues_match_dense():
    linalg = pytest.importorskip("resgeom_fast.linalg")
    model = FCNet(bn=True).double()
    x, y = _fc_data()
    H = hessian(model, CE, (x, y))
    evals = torch.linalg.eigvalsh(dense_hessian(model, CE, x, y))
    res = linalg.eigsh(H, k=6, which="both", seed=0)
    got = res.eigenvalues.sort().values
    want = torch.cat([evals[:3], evals[-3:]]).sort().values
    assert rel(got, want) < 1e-6
    # the same probes on the dense matrix give the same Hutch++ estimate
    dense = linalg.DenseOperator(dense_hessian(model, CE, x, y), symmetric=True)
    tr = linalg.trace(H, probes=30, method="hutch++", seed=0)
    tr_dense = linalg.trace(dense, probes=30, method="hutch++", seed=0)
    assert abs(float(tr.estimate) - float(tr_dense.estimate)) < 1e-6 * float(evals.abs().sum())


# -- errors -------------------------------------------------------------------------------------
def test_errors():
    model = FCNet(bn=True).double()
    x, y = _fc_data()
    with pytest.raises(ValueError, match="same batch size"):
        hessian(model, CE, (x, y[:-1]))
    with pytest.raises(ValueError, match="expected x of dtype torch.float64"):
        hessian(model, CE, (x.float(), y))
    mixed = [(x[:10], y[:10]), (x[10:].float(), y[10:])]
    with pytest.raises(ValueError, match="expected x of dtype"):
        hessian(model, CE, mixed)
    frozen = FCNet().double().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian(frozen, CE, (x, y))
    with pytest.raises(ValueError, match="expected loss_fn to return a scalar"):
        hessian(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="expected loss_fn to return a scalar"):
        ggn(model, nn.CrossEntropyLoss(reduction="none"), (x, y))
    with pytest.raises(ValueError, match="batchnorm='train' needs batches of at least 2 samples"):
        hessian(model, CE, [(x[:5], y[:5]), (x[5:6], y[5:6])], batchnorm="train")
    with pytest.raises(ValueError, match="expected inputs on the model's device"):
        hessian(model, CE, (x.to("meta"), y.to("meta")))
    with pytest.raises(ValueError, match="batchnorm: expected 'eval' or 'train'"):
        hessian(model, CE, (x, y), batchnorm="batch")
    with pytest.raises(ValueError, match="hvp: expected one of"):
        hessian(model, CE, (x, y), hvp="fast")
    with pytest.raises(ValueError, match="no parameter or module named 'nope'"):
        hessian(model, CE, (x, y), params="nope")
    with pytest.raises(TypeError, match="expected data an \\(x, y\\) batch or an iterable"):
        hessian(model, CE, 3)
    with pytest.raises(ValueError, match="data yielded no batches"):
        hessian(model, CE, [])
    H = hessian(model, CE, (x, y))
    with pytest.raises(ValueError, match="expected X of dtype"):
        H.matmat(torch.randn(H.shape[0], 2))


# -- matmul backends (float32 CPU: MKL or oneDNN, oneDNN verified before use) -----------------
def _f32_case():
    model = FCNet(bn=True, width=16)
    x, y = _fc_data(n=32)
    dense = dense_hessian(model.double(), CE, x, y)
    return model.float(), (x.float(), y), dense


def _onednn_exact_here() -> bool:
    """Whether this CPU's oneDNN computes float32 matmuls in float32 under the bf16 math mode (CPUs
    without AMX / AVX512-BF16) or rounds them to bf16 (e.g. Intel Xeons with AMX)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 128, generator=g), torch.randn(128, 64, generator=g)
    ref = a.double() @ b.double()
    with onednn_matmul():
        got = a @ b
    return rel(got.double(), ref) < 1e-5


def test_matmul_onednn_equals_dense_and_is_verified():
    if not onednn_applicable(torch.float32, torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN")
    model, data, dense = _f32_case()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3)
    if not _onednn_exact_here():
        # this CPU rounds oneDNN's float32 matmuls to bf16: the verification must refuse them
        with pytest.raises(RuntimeError, match="reduced precision"):
            hessian(model, CE, data, hvp="double_backward", matmul="onednn").matmat(V)
        assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"    # restored after the call
        return
    H = hessian(model, CE, data, hvp="double_backward", matmul="onednn")
    for _ in range(2):
        assert rel(H.matmat(V).double(), dense @ V.double()) < 1e-4
    assert list(H.verification) == [3] and H.verification[3]["double_backward+onednn"] <= ONEDNN_TOLERANCE
    assert H.hvp_choice(3) == "double_backward+onednn" and H.onednn_off is None
    assert torch.backends.mkldnn.matmul.fp32_precision != "bf16"    # restored after the call


def test_matmul_auto_measures_every_method_and_backend():
    if not onednn_applicable(torch.float32, torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN")
    model, data, dense = _f32_case()
    H = hessian(model, SOFT_CE, data)                                 # hvp="auto", matmul="auto"
    V = torch.randn(H.shape[0], 4)
    cands = ["double_backward", "double_backward+onednn", "forward_over_reverse", "forward_over_reverse+onednn"]
    for _ in range(8):
        assert rel(H.matmat(V).double(), dense @ V.double()) < 1e-4
    t = H.hvp_timings[4]
    if not _onednn_exact_here():
        # the first oneDNN candidate fails its check: oneDNN is switched off with the reason, the
        # product of that round comes from the default BLAS, the choice is among the MKL methods
        assert H.onednn_off is not None and "reduced precision" in H.onednn_off
        bad = [c for c in H.verification[4] if c.endswith("+onednn")]
        assert len(bad) == 1 and H.verification[4][bad[0]] > ONEDNN_TOLERANCE
        assert H.hvp_choice(4) in ("double_backward", "forward_over_reverse")
        assert_tuned({c: t[c] for c in ("double_backward", "forward_over_reverse")})
        return
    # two timings each (a clear loser one); the oneDNN check recomputes its first product with the
    # default BLAS
    assert sorted(t) == cands
    assert_tuned(t)
    assert H.hvp_choice(4) == min(cands, key=lambda c: min(t[c]))
    assert all(H.verification[4][c] <= ONEDNN_TOLERANCE for c in cands if c.endswith("+onednn"))


@pytest.mark.parametrize("matmul", ["auto", "onednn"])
def test_matmul_onednn_rejected_when_inexact(monkeypatch, matmul):
    """A CPU whose oneDNN rounds to bf16 (simulated: products off by 1e-3) never gets oneDNN's
    numbers: "auto" returns the default BLAS's product and turns oneDNN off, "onednn" raises."""
    if not onednn_applicable(torch.float32, torch.device("cpu")):
        pytest.skip("this PyTorch has no oneDNN")
    state = {"on": False}
    real = CurvatureEngine._apply_method

    @contextlib.contextmanager
    def fake_onednn():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    def apply_method(self, method, idx, vs, k):
        out = real(self, method, idx, vs, k)
        return [o * (1 + 1e-3) for o in out] if state["on"] else out

    monkeypatch.setattr(_autotune, "onednn_matmul", fake_onednn)   # the tuner's oneDNN switch
    monkeypatch.setattr(CurvatureEngine, "_apply_method", apply_method)
    model, data, dense = _f32_case()
    H = hessian(model, CE, data, hvp="double_backward", matmul=matmul)
    V = torch.randn(H.shape[0], 2)
    if matmul == "onednn":
        with pytest.raises(RuntimeError, match="matmul='onednn'.*reduced precision"):
            H.matmat(V)
        return
    for _ in range(4):
        assert rel(H.matmat(V).double(), dense @ V.double()) < 1e-4   # never the inexact product
    assert H.onednn_off is not None and "reduced precision" in H.onednn_off
    assert abs(H.verification[2]["double_backward+onednn"] - 1e-3) < 1e-4
    assert H.hvp_choice(2) == "double_backward"


def test_matmul_bad_input():
    model = FCNet().double()
    with pytest.raises(ValueError, match="matmul: expected one of"):
        hessian(model, CE, _fc_data(), matmul="mkl")
    with pytest.raises(ValueError, match="matmul='onednn' needs float32"):
        hessian(model, CE, _fc_data(), matmul="onednn")              # float64
    H = hessian(model, SOFT_CE, _fc_data())                           # float64: oneDNN not a candidate
    assert H.hvp_choice(1) == "double_backward" and H.verification == {}
