"""The structured Hessian / GGN products over a traced graph (conv ResNets, users' own models)
against the double backward and dense float64 Hessians, and every refusal with its reason."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resgeom_fast.models import ConvResNet, StagedResNet
from resgeom_fast.operators import _structured_conv as SC
from resgeom_fast.operators import ggn, hessian
from resgeom_fast.operators._graph import trace_graph
from resgeom_fast.operators.curvature import CurvatureEngine
from tests.operators._operator_nets import ConvNet, assert_tuned, dense_hessian, randomise_bn, rel

CE = nn.CrossEntropyLoss()
MSE = nn.MSELoss()
torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402


def _down(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class TVNet(nn.Module):
    """torchvision's BasicBlock and Bottleneck, both downsampling, between a resnet stem
    (conv 3x3, BN, ReLU, max pool 3x3 stride 2) and a global-pool linear head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(2, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(4, 6, stride=2, downsample=_down(4, 6, 2))
        self.layer2 = Bottleneck(6, 2, stride=2, downsample=_down(6, 8, 2))     # 2 * expansion 4 = 8
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8, 3)
        randomise_bn(self, torch.Generator().manual_seed(seed + 1))

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class UserFC(nn.Module):
    """A user's FC ResNet h + W2 relu(W1 h + b1) + b2 (no stem / blocks names)."""

    def __init__(self, d: int = 5, width: int = 6, depth: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Linear(d, width)
        self.w1 = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.w2 = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.out = nn.Linear(width, classes)

    def forward(self, x):
        h = self.inp(x)
        for a, b in zip(self.w1, self.w2):
            h = h + b(F.relu(a(h)))
        return self.out(h)


class Functional(nn.Module):
    """Functional spellings: F.relu / torch.relu / Tensor.relu, ``out += identity``, scalar
    multiples and divisions, standalone BatchNorm (pre-activation, after an add), a dilated
    stride-2 conv with padding='same' elsewhere, average pooling, dropout (eval), view with
    x.size(0), a conv without bias followed by an affine-free BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(13)
        self.c0 = nn.Conv2d(2, 4, 3, padding="same", dilation=2)
        self.bn_pre = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, padding=1, dilation=1)
        self.skip = nn.Conv2d(4, 5, 1, stride=2)
        self.pool = nn.AvgPool2d(2, count_include_pad=False, ceil_mode=True)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(5 * 2 * 2, 3)
        randomise_bn(self, torch.Generator().manual_seed(14))

    def forward(self, x):
        h = torch.relu(self.c0(x))
        identity = h
        out = self.c1(F.relu(self.bn_pre(h)))
        out = self.bn1(out)
        out += identity
        out = 0.5 * out.relu()
        out = self.c2(out) + self.skip(out) / 2.0
        out = self.pool(F.relu(out))
        out = self.drop(out)
        return self.fc(out.view(out.size(0), -1))


class Aliasing(nn.Module):
    """Tangents read by several nodes, twice by one add, and passed through unchanged (a scale
    of 1): the tangent passes overwrite a buffer in place only when nothing else reads it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(17)
        self.c0 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4, 3)
        randomise_bn(self, torch.Generator().manual_seed(18))

    def forward(self, x):
        g0 = self.c0(x)
        h = self.bn(g0)
        y = h * 1.0                      # the same tangent as h
        a = F.relu(h)                    # h's last reader: must not overwrite y's tangent
        b = a + a
        c = F.relu(g0) + F.relu(b + y)   # backward: one tangent to two ReLUs of different masks
        d = self.c1(c) + c
        e = torch.relu(d) * 1.0
        f = e + e.relu()
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def _convres():
    m = ConvResNet(2, 4, 2, 3, seed=0).double().eval()
    randomise_bn(m, torch.Generator().manual_seed(2))
    return m


def _staged():
    m = StagedResNet("bottleneck", (1, 1), 3, in_channels=2, base_width=2, seed=0).double().eval()
    randomise_bn(m, torch.Generator().manual_seed(2))
    return m


MODELS = {
    "torchvision_blocks": (lambda: TVNet().double().eval(), (2, 8, 8)),
    # 20 x 20: the stem and the strided BasicBlock (5 x 5 outputs) above SMALL_PAIRS output
    # positions, their tangent convolutions in the stacked layout (dilated 2-D and strided 3-D)
    "torchvision_blocks_20": (lambda: TVNet().double().eval(), (2, 20, 20)),
    "convresnet": (_convres, (2, 6, 6)),
    "stagedresnet": (_staged, (2, 6, 6)),
    "user_fc": (lambda: UserFC().double(), (5,)),
    "functional": (lambda: Functional().double().eval(), (2, 7, 7)),
    "duck_conv": (lambda: ConvNet().double().eval(), (1, 6, 6)),
    "aliasing": (lambda: Aliasing().double().eval(), (2, 5, 5)),
}


def _batch(shape, n=5, classes=3, mse=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g, dtype=torch.float64)
    y = (torch.randn(n, classes, generator=g, dtype=torch.float64) if mse
         else torch.randint(0, classes, (n,), generator=g))
    return x, y


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("case", list(MODELS))
def test_hessian_equals_double_backward(case, loss):
    build, shape = MODELS[case]
    model = build()
    x, y = _batch(shape, mse=loss == "mse")
    loss_fn = MSE if loss == "mse" else CE
    H = hessian(model, loss_fn, (x, y), hvp="structured")
    ref = hessian(model, loss_fn, (x, y), hvp="double_backward")
    assert H.structured_off is None and H.hvp_method == "structured"
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (1, 5):
        assert rel(H.matmat(V[:, :k]), ref.matmat(V[:, :k])) < 1e-10
    assert H.verification[5]["structured"] < 1e-10


@pytest.mark.parametrize("jacobian", [False, True])
@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("case", list(MODELS))
def test_ggn_equals_double_backward(monkeypatch, case, loss, jacobian):
    """Both GGN methods: the tangents through the graph, and the logits' Jacobians (products
    from each node's direct change and its slice of d logits / d output)."""
    monkeypatch.setattr(SC, "GGN_JACOBIAN", jacobian)
    build, shape = MODELS[case]
    model = build()
    x, y = _batch(shape, mse=loss == "mse")
    loss_fn = MSE if loss == "mse" else CE
    G = ggn(model, loss_fn, (x, y), hvp="structured")
    ref = ggn(model, loss_fn, (x, y), hvp="double_backward")
    assert G.structured_off is None
    V = torch.randn(G.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for k in (1, 5):
        assert rel(G.matmat(V[:, :k]), ref.matmat(V[:, :k])) < 1e-10
    assert G._engine.structured.jac_on is jacobian
    # a parameter subset: the nodes of the other parameters add nothing
    names = [n for n, _ in model.named_parameters()][::2]
    Gs = ggn(model, loss_fn, (x, y), params=names, hvp="structured")
    refs = ggn(model, loss_fn, (x, y), params=names, hvp="double_backward")
    Vs = torch.randn(Gs.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert rel(Gs.matmat(Vs), refs.matmat(Vs)) < 1e-10


@pytest.mark.parametrize("case", ["torchvision_blocks", "user_fc", "functional"])
def test_equals_dense_hessian(case):
    """Against the dense float64 Hessian of torch.func, a parameter subset included."""
    build, shape = MODELS[case]
    model = build()
    x, y = _batch(shape)
    dense = dense_hessian(model, CE, x, y)
    H = hessian(model, CE, (x, y), hvp="structured")
    V = torch.randn(H.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(H.matmat(V), dense @ V) < 1e-10
    names = [n for n, _ in model.named_parameters()]
    sub = names[1::2]
    Hs = hessian(model, CE, (x, y), params=sub, hvp="structured")
    dense_s = dense_hessian(model, CE, x, y, names=sub)
    Vs = torch.randn(Hs.shape[0], 3, dtype=torch.float64)
    assert rel(Hs.matmat(Vs), dense_s @ Vs) < 1e-10


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case", list(MODELS))
def test_weights_gathered_in_blocks_and_either_vector_layout(monkeypatch, case, curvature):
    """The tangent weights gathered a few output channels at a time (GATHER_BLOCK: here one
    channel per block, as on resnet18's layer4) and vectors given either as rows of a [P, k]
    block or as a [P, k] view of contiguous vectors give the double backward's products."""
    build, shape = MODELS[case]
    model = build()
    x, y = _batch(shape)
    op = hessian if curvature == "hessian" else ggn
    want_op = op(model, CE, (x, y), hvp="double_backward")
    V = torch.randn(want_op.shape[0], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = want_op.matmat(V)
    monkeypatch.setattr(SC, "GATHER_BLOCK", 1)
    calls = []
    by_rows = SC._by_rows
    monkeypatch.setattr(SC, "_by_rows", lambda fn, W: (calls.append(W.shape[1]), by_rows(fn, W)))
    H = op(model, CE, (x, y), hvp="structured")
    assert rel(H.matmat(V), want) < 1e-10
    assert rel(H.matmat(V.t().contiguous().t()), want) < 1e-10
    if case in ("torchvision_blocks", "convresnet", "stagedresnet"):   # BatchNorm after the convs
        assert calls


def test_dots_and_stacked_weights_in_every_layout():
    """The [k, O] inner products and the [O, k C, ...] stacking of tangent weights agree with
    their plain definitions for contiguous, channels_last, column-vector and cropped layouts."""
    g = torch.Generator().manual_seed(0)
    k, O, C = 3, 4, 5
    base = torch.randn(k, O, C, 3, 3, dtype=torch.float64, generator=g)
    B = torch.randn(O, C, 3, 3, dtype=torch.float64, generator=g)
    cl = base.reshape(k * O, C, 3, 3).contiguous(memory_format=torch.channels_last).view(k, O, C, 3, 3)
    cols = base.reshape(k, -1).t().contiguous().t().reshape(k, O, C, 3, 3)     # vectors innermost
    assert cols.stride(0) == 1 and cl.stride(2) == 1
    for A in (base, cl, cols):
        torch.testing.assert_close(SC._dots(A, B), (A * B).sum((2, 3, 4)), rtol=1e-13, atol=0)
        crop = A[:, :, :, 1:2, 0:2]
        torch.testing.assert_close(SC._dots(crop, B[:, :, 1:2, 0:2]),
                                   (crop * B[:, :, 1:2, 0:2]).sum((2, 3, 4)), rtol=1e-13, atol=0)
        for use_cl in (False, True):
            S = SC._stack_in(A, use_cl)
            assert torch.equal(S, A.transpose(0, 1).reshape(O, k * C, 3, 3))
            assert S.is_contiguous(memory_format=torch.channels_last if use_cl else torch.contiguous_format)
    lin = torch.randn(k, O, C, dtype=torch.float64, generator=g)
    torch.testing.assert_close(SC._dots(lin, B[:, :, 0, 0]), (lin * B[:, :, 0, 0]).sum(2), rtol=1e-13, atol=0)
    assert torch.equal(SC._stack_in(lin, True), lin.transpose(0, 1).reshape(O, k * C))
    W = SC._new_weights((k, O, C, 3, 3), B, True)
    assert W.reshape(k * O, C, 3, 3).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("curvature", ["hessian", "ggn_jacobian"])
@pytest.mark.parametrize("chunk", [1, 2, 5])
@pytest.mark.parametrize("case", ["torchvision_blocks", "functional"])      # functional: a standalone BatchNorm
def test_tangent_passes_in_sample_blocks(monkeypatch, chunk, case, curvature):
    """Sample blocks of the tangent passes (and of the GGN's logit Jacobians, computed and read
    block by block)."""
    monkeypatch.setattr(SC, "GGN_JACOBIAN", True)
    build, shape = MODELS[case]
    model = build()
    x, y = _batch(shape)
    op = hessian if curvature == "hessian" else ggn
    ref = op(model, CE, (x, y), hvp="double_backward")
    H = op(model, CE, (x, y), hvp="structured")
    H._engine.structured.chunk = chunk
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    assert H._engine.structured.jac_on is (curvature != "hessian")


def test_float32_masks_are_the_models():
    """In float32 the primal pass runs the model's own operations, so its ReLU masks are the
    model's even at units within round-off of 0: the structured product matches the double
    backward to float32 accuracy on torchvision's resnet18 (a BatchNorm-folded primal flipped one
    unit here and was off by 2e-3)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_(0, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    model.eval()
    H = hessian(model, CE, (x, y), hvp="structured", matmul="default")
    V = torch.randn(H.shape[0], 2)
    out = H.matmat(V)
    assert H.verification[2]["structured"] < 1e-5
    assert rel(out, hessian(model, CE, (x, y), hvp="double_backward", matmul="default").matmat(V)) < 1e-5


def test_auto_measures_the_conv_structured_path_against_the_double_backward():
    """On conv nets "auto" times the structured path against the double backward (either can win:
    the weight-sized work of the structured path dominates on wide nets with small images), and
    every product it returns is exact; deterministic=True takes the structured path outright."""
    model = _convres()
    x, y = _batch((2, 6, 6))
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    H = hessian(model, CE, (x, y))
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for _ in range(5):
        assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    t = H.hvp_timings[3]
    assert sorted(t) == ["double_backward", "structured"]
    assert_tuned(t)
    assert H.hvp_choice(3) == min(t, key=lambda m: min(t[m])) and H.hvp_method is None
    assert H.verification[3]["structured"] < 1e-10
    Hd = hessian(model, CE, (x, y), deterministic=True)
    assert Hd.hvp_method == "structured" and rel(Hd.matmat(V), ref.matmat(V)) < 1e-10


def _decided(H, k, winner):
    """Decide width ``k`` for ``winner`` by handing the tuner its timings (the clock would make
    the winner vary from run to run)."""
    tuner = H._engine.tuner
    loser = "double_backward" if winner == "structured" else "structured"
    tuner.timings[(tuple(H._idx), k)] = {winner: [1.0, 1.0], loser: [2.0, 2.0]}
    assert H.hvp_choice(k) == winner


def _count_methods(monkeypatch):
    """Record (method, k) of every product the engine computes."""
    calls = []
    real = CurvatureEngine._apply_method

    def apply_method(self, method, idx, vs, k):
        calls.append((method, k))
        return real(self, method, idx, vs, k)
    monkeypatch.setattr(CurvatureEngine, "_apply_method", apply_method)
    return calls


@pytest.mark.parametrize("winner", ["structured", "double_backward"])
def test_a_new_pass_width_borrows_the_nearest_choice_then_is_measured(monkeypatch, winner):
    """The first pass of a width not seen before runs the choice of the nearest decided width
    alone (eigsh's one residual pass of k Ritz vectors used to run every candidate once), verified
    against the double backward when it is the structured path; the width is measured from its
    second call on, every product exact."""
    model = _convres()
    x, y = _batch((2, 6, 6))
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    calls = _count_methods(monkeypatch)          # (patched before the tuner takes the method)
    H = hessian(model, CE, (x, y))
    _decided(H, 1, winner)
    _decided(H, 16, "double_backward" if winner == "structured" else "structured")   # farther from 3
    calls.clear()
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    if winner == "structured":      # verified alone on VERIFY_VECTORS columns
        assert calls == [("double_backward", 2), ("structured", 3)]
        assert list(H.verification[3]) == ["structured"] and H.verification[3]["structured"] < 1e-10
    else:
        assert calls == [("double_backward", 3)] and not H.verification.get(3)
    assert {c: len(t) for c, t in H.hvp_timings[3].items() if t} == {winner: 1}
    assert H.hvp_choice(3) is None
    for _ in range(3):              # the other candidate is measured (and verified) from now on
        assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    t = H.hvp_timings[3]
    assert sorted(t) == ["double_backward", "structured"]
    assert_tuned(t)
    assert H.verification[3]["structured"] < 1e-10 and H.structured_off is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_double_backwards_first_timing_is_the_reference(monkeypatch, dtype):
    """While the structured path (and oneDNN, float32) wait for their check, "auto" first times the
    double backward on all k vectors: that product is the call's and the reference of the checks
    (no separate double backward of VERIFY_VECTORS columns), which run on those columns alone,
    untimed; the structured path is timed on calls of its own, every product exact."""
    from resgeom_fast.operators._autotune import VERIFY_VECTORS
    model = _convres().to(dtype)
    x, y = _batch((2, 6, 6))
    x = x.to(dtype)
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    calls = _count_methods(monkeypatch)          # (patched before the tuner takes the method)
    H = hessian(model, CE, (x, y))
    V = torch.randn(H.shape[0], 3, dtype=dtype)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert rel(H.matmat(V), ref.matmat(V)) < tol
    checked = list(H.verification[3])
    assert checked[0] == "structured" and H.verification[3]["structured"] < tol
    # (a check of oneDNN's double backward runs the double backward on those columns)
    assert calls == [("double_backward", 3)] + [(c.partition("+")[0], VERIFY_VECTORS) for c in checked]
    assert {c: len(t) for c, t in H.hvp_timings[3].items() if t} == {"double_backward": 1}
    for _ in range(8):
        assert rel(H.matmat(V), ref.matmat(V)) < tol
    t = H.hvp_timings[3]
    assert_tuned(t)
    assert "structured" in t
    assert calls.count(("double_backward", VERIFY_VECTORS)) == checked.count("double_backward+onednn")
    assert H.hvp_choice(3) == min(t, key=lambda c: min(t[c]))


def test_a_borrowed_choice_that_fails_its_check_goes_through_the_full_verification(monkeypatch):
    """A borrowed structured product that differs from the double backward is never returned;
    the width's full verification then turns the structured path off with the reason."""
    model = _convres()
    x, y = _batch((2, 6, 6))
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    real = CurvatureEngine._apply_method
    calls = []

    def apply_method(self, method, idx, vs, k):   # the structured path wrong at width 3 only
        calls.append((method, k))
        out = real(self, method, idx, vs, k)
        return [o * (1 + 1e-3) for o in out] if (method, k) == ("structured", 3) else out
    monkeypatch.setattr(CurvatureEngine, "_apply_method", apply_method)
    H = hessian(model, CE, (x, y))
    _decided(H, 1, "structured")
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    assert H.structured_off is not None and "differs from the double backward" in H.structured_off
    assert abs(H.verification[3]["structured"] - 1e-3) < 1e-4
    assert calls.count(("double_backward", 2)) == 1     # one reference for both checks
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    assert not [c for c in H._engine.tuner.candidates(3) if c.startswith("structured")]


def test_dataloader_and_float32():
    model = _convres()
    x, y = _batch((2, 6, 6), n=8)
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    H = hessian(model, CE, batches, hvp="structured")
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert rel(H.matmat(V), hessian(model, CE, (x, y), hvp="double_backward").matmat(V)) < 1e-10
    m32 = _convres().float()
    H32 = hessian(m32, CE, (x.float(), y), hvp="structured")
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    assert rel(H32.matmat(V.float()).double(), ref.matmat(V)) < 1e-4


@pytest.mark.skipif(SC._CONV_ADD is None, reason="this PyTorch has no oneDNN convolution with a sum post-op")
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("case", ["torchvision_blocks_20", "convresnet_8"])
def test_fused_conv_adds_in_float32_nets(monkeypatch, case, curvature):
    """In float32 on the CPU the tangent passes add ``conv(x, M)`` (and, Hessian, ``conv^T(g, M)``)
    into the stacked tangents by oneDNN's sum post-op: the calls are taken, and the products equal
    those with a separate convolution and add (to float32 rounding) and the double backward's."""
    build = {"torchvision_blocks_20": lambda: TVNet(), "convresnet_8": lambda: ConvResNet(2, 4, 2, 3, seed=0)}[case]
    shape = (2, 20, 20) if case == "torchvision_blocks_20" else (2, 8, 8)
    model = build().float().eval()
    randomise_bn(model, torch.Generator().manual_seed(2))
    x, y = _batch(shape, n=6)
    x = x.float()
    make = hessian if curvature == "hessian" else ggn
    monkeypatch.setattr(SC, "GGN_JACOBIAN", False)      # the GGN's tangents through the graph
    V = torch.randn(sum(p.numel() for p in model.parameters()), 4, generator=torch.Generator().manual_seed(3))
    fused = []
    real = SC._conv_add

    def conv_add(*a):
        done = real(*a)
        fused.append(done)
        return done
    monkeypatch.setattr(SC, "_conv_add", conv_add)
    out = make(model, CE, (x, y), hvp="structured", matmul="default").matmat(V)
    n = len(fused)
    assert n and all(fused)                         # every stacked-path conv with a tangent input
    monkeypatch.setattr(SC, "_CONV_ADD", None)      # the separate convolution and add
    sep = make(model, CE, (x, y), hvp="structured", matmul="default").matmat(V)
    assert len(fused) > n and not any(fused[n:])
    assert rel(out, sep) < 1e-5
    ref = make(model, CE, (x, y), hvp="double_backward", matmul="default").matmat(V)
    assert rel(out, ref) < 1e-4


@pytest.mark.skipif(SC._CONV_ADD is None, reason="this PyTorch has no oneDNN convolution with a sum post-op")
def test_a_failing_fused_add_is_turned_off_with_a_warning(monkeypatch):
    """The fused add is a private PyTorch op: if it raises (a release that changed it), the product
    is still exact -- the separate convolution and add run --, a RuntimeWarning names the cause and
    the fused path stays off for the process."""
    def broken(*args):
        raise RuntimeError("schema changed")
    monkeypatch.setattr(SC, "_CONV_ADD", broken)
    model = TVNet().float().eval()
    x, y = _batch((2, 20, 20), n=6)
    x = x.float()
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match=r"fused convolution \+ add failed \(RuntimeError: schema changed\)"):
        out = hessian(model, CE, (x, y), hvp="structured", matmul="default").matmat(V)
    assert SC._CONV_ADD is None
    assert rel(out, hessian(model, CE, (x, y), hvp="double_backward", matmul="default").matmat(V)) < 1e-4


def test_torchvision_resnet18_recognised():
    """The whole torchvision resnet18 (eval) is recognised, and its structured product equals the
    double backward on a tiny batch."""
    model = torchvision.models.resnet18(num_classes=3).double().eval()
    randomise_bn(model, torch.Generator().manual_seed(0))
    graph, why = trace_graph(model, list(model.parameters()), "eval")
    assert graph is not None, why
    assert sum(n.kind == "affine" and n.bn is not None for n in graph.nodes) == 20      # 20 conv+BN folded
    x, y = _batch((3, 16, 16), n=2)
    params = ["layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer1.0.conv1.weight", "fc.weight"]
    H = hessian(model, CE, (x, y), params=params, hvp="structured")
    ref = hessian(model, CE, (x, y), params=params, hvp="double_backward")
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10


def test_flops_count_of_a_constructed_net(monkeypatch):
    """conv 3->4 (3x3, pad 1) on 5x5, ReLU, flatten, Linear 100->3: per sample and vector the conv
    runs conv(x, M) and corr(Rg, x) (its input has no tangent), the Linear all six products."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3)).double()
    x, y = _batch((3, 5, 5), n=4)
    H = hessian(model, CE, (x, y), hvp="structured")
    assert H.structured_flops(7) is None          # no product yet: the spatial sizes are not known
    H.matmat(torch.randn(H.shape[0], 7, dtype=torch.float64))
    conv, lin = 4 * 3 * 9 * 25, 3 * 100
    assert H.structured_flops(7) == 2 * 4 * 7 * (2 * conv + 6 * lin)
    G = ggn(model, CE, (x, y), hvp="structured")
    G.matmat(torch.randn(G.shape[0], 2, dtype=torch.float64))
    assert G.structured_flops(7) == 2 * 4 * 7 * (2 * conv + 4 * lin)
    # through the logits' Jacobians: conv(x, M) and corr(Rg, x) of each layer, and two
    # contractions of classes x outputs (conv: 3 x 100, Linear: 3 x 3) -- here more than the
    # tangents' count (the conv's input has no tangent to save), so "auto" kept the tangents
    eng = G._engine.structured
    jac = 2 * conv + 2 * 3 * 100 + 2 * lin + 2 * 3 * 3
    assert eng.macs_per(True) == jac and eng.macs_per(False) == 2 * conv + 4 * lin and not eng.jac_on
    monkeypatch.setattr(SC, "GGN_JACOBIAN", True)
    G = ggn(model, CE, (x, y), hvp="structured")
    G.matmat(torch.randn(G.shape[0], 2, dtype=torch.float64))
    assert G.structured_flops(7) == 2 * 4 * 7 * jac


def _user_fc_ggn(data, **kw):
    build, shape = MODELS["user_fc"]
    model = build()
    G = ggn(model, CE, data, hvp="structured", **kw)
    G.matmat(torch.randn(G.shape[0], 2, dtype=torch.float64))
    return G._engine.structured


def test_ggn_jacobians_chosen_where_they_pay_and_fit(monkeypatch):
    """"auto" takes the logits' Jacobians for a kept batch whose Jacobians fit the budget and
    save multiply-adds (the user FC net: fewer classes than widths); not for batches read anew on
    every pass (data of several batches, not cached), nor past the budget, which the kept batches
    share, nor for more logits than JACOBIAN_MAX_CLASSES."""
    shape = MODELS["user_fc"][1]
    one = _batch(shape, n=8)
    eng = _user_fc_ggn(one)
    assert eng.jac_on and eng.macs_per(True) < eng.macs_per(False)
    two = [_batch(shape, n=4, seed=1), _batch(shape, n=4, seed=2)]
    assert not _user_fc_ggn(two).jac_on                     # not cached: no Jacobians
    assert _user_fc_ggn(two, cache=True).jac_on
    four = _batch(shape, n=4, seed=1)
    elems = 4 * 3 * sum(SC._numel(eng.shapes[i]) for i in eng.jnodes)      # 4 samples, 3 classes
    monkeypatch.setattr(SC, "JACOBIAN_BUDGET", elems)
    assert _user_fc_ggn(four).jac_on
    assert not _user_fc_ggn(two, cache=True).jac_on         # two kept batches of 4: half the budget each
    monkeypatch.setattr(SC, "JACOBIAN_BUDGET", elems - 1)
    assert not _user_fc_ggn(four).jac_on
    monkeypatch.setattr(SC, "JACOBIAN_BUDGET", 1 << 28)
    monkeypatch.setattr(SC, "JACOBIAN_MAX_CLASSES", 2)      # 3 logits: too many for the one-off passes
    assert not _user_fc_ggn(four).jac_on


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3, groups=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.c(x).mean((2, 3)))


class Gelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 4, 3)
        self.layer1 = nn.Sequential(nn.GELU())
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layer1(self.c(x)), 1), 1))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow: fx cannot trace it
            x = -x
        return self.fc(x.flatten(1))


class InplaceReused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        h = self.c(x)
        r = self.act(h)
        return self.fc((r + h).flatten(1))     # h was overwritten by the in-place ReLU


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x):
        o = self.fc(x.flatten(1))
        return o, o


class Functional_W(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 72))

    def forward(self, x):
        return F.linear(x.flatten(1), self.w)


class NoStats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3, track_running_stats=False)
        self.fc = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.c(x)).flatten(1))


@pytest.mark.parametrize("build,why", [
    (Grouped, "node 'c' (Conv2d) has groups=2 (only groups=1 is covered)"),
    (Gelu, "node 'layer1.0' (GELU) is not covered"),
    (Branchy, "torch.fx could not trace the model"),
    (InplaceReused, "node 'act' (ReLU) modifies 'c' in place, which is read again later"),
    (TwoOutputs, "the model's output is not one tensor computed from the input"),
    (Functional_W, "node 'w' (get_attr w) reads a chosen parameter functionally"),
    (NoStats, "node 'bn' (BatchNorm2d) has no running statistics"),
])
def test_refusals_name_the_node(build, why):
    model = build().double().eval()
    x, y = _batch((2, 6, 6), n=3)
    for op in (hessian, ggn):
        with pytest.raises(ValueError, match=f"hvp='structured' does not apply: {re.escape(why)}"):
            op(model, CE, (x, y), hvp="structured")
    if build is not TwoOutputs:
        H = hessian(model, CE, (x, y))
        assert why in H.structured_off
        if build is not InplaceReused:        # the double backward itself needs no in-place-free model
            ref = hessian(model, CE, (x, y), hvp="double_backward")
            V = torch.randn(H.shape[0], 2, dtype=torch.float64)
            assert rel(H.matmat(V), ref.matmat(V)) < 1e-12


def test_train_batchnorm_is_refused():
    model = TVNet().double()
    x, y = _batch((2, 8, 8))
    with pytest.raises(ValueError, match=re.escape("batchnorm='train' (batch statistics couple the samples)")):
        hessian(model, CE, (x, y), batchnorm="train", hvp="structured")
