"""The fast residual-Jacobian path on users' own conv blocks (branches that are not nn.Sequential,
read from a torch.fx trace) against the generic path and torch.func.jacrev, in float64."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.operators._operator_nets import randomise_bn, rel
from resgeom_fast.operators import jacobian
from resgeom_fast.operators import fast_path_supported, mark_residual_block, residual_blocks, residual_jacobians


class BasicBranch(nn.Module):
    """A user's BasicBlock branch bn2(conv2(relu(bn1(conv1(x))))) written as a forward, not a Sequential."""

    def __init__(self, cin: int, cout: int, stride: int, relu: str = "function") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu_kind = relu
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        z = self.bn1(self.conv1(x))
        if self.relu_kind == "function":
            z = F.relu(z)
        elif self.relu_kind == "inplace_function":
            z = F.relu(z, inplace=True)
        elif self.relu_kind == "method":
            z = z.relu()
        else:
            z = self.act(z)
        return self.bn2(self.conv2(z))


class UserBasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), marked with mark_residual_block."""

    def __init__(self, cin: int, cout: int, stride: int = 1, relu: str = "function") -> None:
        super().__init__()
        self.branch = BasicBranch(cin, cout, stride, relu)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        mark_residual_block(self, branch=self.branch, skip=self.shortcut, post=nn.ReLU())

    def forward(self, x):
        return F.relu(self.branch(x) + self.shortcut(x))


class BottleneckBranch(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class UserBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.f = BottleneckBranch(cin, mid, cout, stride)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        mark_residual_block(self, branch=self.f, skip=self.down, post=nn.ReLU())

    def forward(self, x):
        return F.relu(self.f(x) + self.down(x))


class Net(nn.Module):
    def __init__(self, blocks: nn.Module, cin: int, cout: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, cin, 3, padding=1)
        self.blocks = blocks
        self.head = nn.Linear(cout, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _net(kind: str) -> Net:
    torch.manual_seed(0)
    if kind == "basic":
        net = Net(nn.Sequential(UserBasicBlock(4, 4), UserBasicBlock(4, 4, relu="inplace_function")), 4, 4)
    elif kind == "basic_downsample":
        net = Net(nn.Sequential(UserBasicBlock(4, 6, stride=2, relu="method"), UserBasicBlock(6, 6, relu="module")),
                  4, 6)
    else:
        net = Net(nn.Sequential(UserBottleneck(4, 3, 8, stride=2)), 4, 8)
    net = net.double()
    randomise_bn(net, torch.Generator().manual_seed(1))
    return net.eval()


def _jacrev(branch: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobians [N, D_out, D_in] of the branch (eval mode) by torch.func.jacrev."""
    rows = []
    for b in range(h.shape[0]):
        J = torch.func.jacrev(lambda z: branch(z[None].clone())[0])(h[b])
        rows.append(J.reshape(-1, h[b].numel()))
    return torch.stack(rows)


@pytest.mark.parametrize("kind", ["basic", "basic_downsample", "bottleneck"])
def test_marked_user_blocks_take_the_fast_path_and_equal_jacrev(kind):
    net = _net(kind)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    infos = residual_blocks(net)
    assert infos and all(i.kind == "marked" and not isinstance(i.branch, nn.Sequential) for i in infos)
    auto = residual_jacobians(net, x)
    gen = residual_jacobians(net, x, path="generic")
    for a, g, info in zip(auto, gen, infos):
        assert fast_path_supported(info.branch)
        assert a.path == "fast" and a.fast_source == "fx" and a.reason is None
        assert g.path == "generic" and g.fast_source is None
        dense = _jacrev(info.branch, a.h)
        assert a.shape == tuple(dense.shape[1:])
        assert rel(a.to_dense(), dense) < 1e-10
        assert rel(g.to_dense(), dense) < 1e-10
        assert rel(a.T.to_dense(), dense.transpose(1, 2)) < 1e-10
        # a probe block shared by every sample (the randomized SVD's sketch) and chunking
        N, n = x.shape[0], a.shape[1]
        omega = torch.randn(n, 5, dtype=torch.float64)
        assert rel(a.matmat_shared(omega), dense @ omega) < 1e-10
        small = residual_jacobians(net, x, blocks=[info.block], path="fast", chunk_size=1)[0]
        U = torch.randn(N, a.shape[0], 2, dtype=torch.float64)
        assert rel(small.rmatmat(U), dense.transpose(1, 2) @ U) < 1e-10


def test_fast_path_leaves_the_block_inputs_and_modules_unchanged():
    net = _net("basic")
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    op = residual_jacobians(net, x, blocks=[1], path="fast")[0]
    h = op.h.clone()
    op.matmat(torch.randn(2, op.shape[1], 2, dtype=torch.float64))
    assert torch.equal(op.h, h)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert net.blocks[1].branch.act.inplace  # the in-place flag is restored


class TanhBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.conv(x))


class InnerResidualBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x) + x


class BranchingControlFlow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class Doubling(nn.Sequential):
    """A Sequential whose forward is not the chain of its layers: the verification refuses it."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class Holder(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Module()
        self.block.branch = branch
        self.block.forward = lambda h: h + branch(h)
        mark_residual_block(self.block, branch=branch)

    def forward(self, x):
        return self.block(self.stem(x))


@pytest.mark.parametrize("branch, reason", [
    (TanhBranch(), r"branch TanhBranch: call_function tanh \(the fast path linearises layer modules and ReLU only\)"),
    (InnerResidualBranch(), r"branch InnerResidualBranch is not a chain of layers: 'x' is used by \['call_module conv', "
                             r"'call_function add'\]"),
    (BranchingControlFlow(), r"branch BranchingControlFlow is not an nn.Sequential and torch.fx cannot trace it "
                             r"\(TraceError"),
])
def test_unsupported_branches_name_their_reason(branch, reason):
    net = Holder(branch).double()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    assert not fast_path_supported(branch)
    (op,) = residual_jacobians(net, x)
    assert op.path == "generic" and op.fast_source is None
    assert op.reason is not None and re.search(reason, op.reason)
    with pytest.raises(ValueError, match="path='fast' does not support block 'block': " + reason):
        residual_jacobians(net, x, path="fast")
    dense = _jacrev(branch, op.h)
    assert rel(op.to_dense(), dense) < 1e-10


def test_a_sequential_with_its_own_forward_is_read_from_its_trace():
    torch.manual_seed(0)
    branch = Doubling(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    net = Holder(branch).double()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    (op,) = residual_jacobians(net, x)
    assert op.path == "generic" and op.reason == ("branch Doubling: call_function mul (the fast path "
                                                                "linearises layer modules and ReLU only)")
    assert rel(op.to_dense(), _jacrev(branch, op.h)) < 1e-10


def test_verification_refuses_a_trace_that_misses_a_layer(monkeypatch):
    """The fx path checks the layers read from the trace against the branch (output and J^T u of
    sample 0): a reading that drops bn2 is refused with the measured difference."""
    net = _net("basic")
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    real = jacobian._traced_layers

    def drops_last(branch):
        layers, reason = real(branch)
        return layers[:-1], reason

    monkeypatch.setattr(jacobian, "_traced_layers", drops_last)
    ops = residual_jacobians(net, x)
    assert all(op.path == "generic" for op in ops)
    assert all(re.match(r"the layers read from the branch give an output \S+ \(relative\) away from the branch's own$",
                        op.reason) for op in ops)
    with pytest.raises(ValueError, match="path='fast' does not support block 'blocks.0': the layers read"):
        residual_jacobians(net, x, path="fast")
    assert rel(ops[0].to_dense(), _jacrev(ops[0].info.branch, ops[0].h)) < 1e-10


# -- the probe layouts of the fast path ---------------------------------------------------------
class PreActBranch(nn.Module):
    """bn-relu first (a mask and a scale at the block input), a grouped dilated 3x3 conv, a 1x1
    stride-2 conv (not a GEMM: it subsamples) and a 1x1 stride-1 conv after a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 1, stride=2, bias=False)
        self.conv3 = nn.Conv2d(6, 6, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(6)

    def forward(self, x):
        x = self.conv1(F.relu(self.bn0(x)))
        x = self.conv2(torch.relu(self.bn1(x)))
        return self.bn3(self.conv3(x.relu()))


class PreActBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.f = PreActBranch()
        self.down = nn.Conv2d(4, 6, 1, stride=2, bias=False)
        mark_residual_block(self, branch=self.f, skip=self.down)

    def forward(self, x):
        return self.f(x) + self.down(x)


def _layout_net(kind: str) -> nn.Module:
    """Tiny float64 nets (random BatchNorm statistics, eval mode) whose blocks cover the layout
    logic: torchvision Bottleneck / BasicBlock with stride 2 and a downsampling shortcut (odd
    7x7 inputs: output_padding of the transposed convs), the user blocks of this file (ReLU as a
    module, function, method, in place), a pre-activation branch (grouped, dilated, strided 1x1)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck   # optional dependency (skip below)

    torch.manual_seed(0)
    if kind == "tv_bottleneck_s2":
        blocks = nn.Sequential(Bottleneck(4, 2, stride=2, downsample=nn.Sequential(
            nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))))
        net = Net(blocks, 4, 8)
    elif kind == "tv_basic_s2":
        net = Net(nn.Sequential(BasicBlock(4, 6, stride=2, downsample=nn.Sequential(
            nn.Conv2d(4, 6, 1, 2, bias=False), nn.BatchNorm2d(6)))), 4, 6)
    elif kind == "preact":
        net = Net(nn.Sequential(PreActBlock()), 4, 6)
    else:
        return _net(kind)
    net = net.double()
    randomise_bn(net, torch.Generator().manual_seed(1))
    return net.eval()


def _plans(op) -> dict[str, list[str]]:
    """Mode plans to force on a fast operator: its own, every layer "k", every conv "cl", and
    alternating "cl" / "k" on the convs (a permuting copy between every two layers)."""
    lins = op._program.lins
    return {"default": list(op._program.modes),
            "all_k": ["k"] * len(lins),
            "all_cl": ["cl" if L.conv else "k" for L in lins],
            "alternating": ["cl" if L.conv and i % 2 == 0 else "k" for i, L in enumerate(lins)]}


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kind", ["tv_bottleneck_s2", "tv_basic_s2", "preact", "basic", "basic_downsample",
                                  "bottleneck"])
def test_every_layout_and_mode_plan_equals_jacrev(kind, channels_last):
    """Both probe layouts ("k_inner", "nchw") and every plan of layer modes give J V, J^T U, the
    shared-sketch J Omega and the chunked products of jacrev's Jacobian (float64, 1e-10), with
    channels_last block inputs too, and never write to the probe blocks they are given."""
    pytest.importorskip("torchvision")
    net = _layout_net(kind)
    x = torch.randn(3, 1, 7, 7, dtype=torch.float64)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(2)
    for op in residual_jacobians(net, x, path="fast"):
        assert op.path == "fast" and op.layout == "k_inner"
        if channels_last:
            assert op.h.is_contiguous(memory_format=torch.channels_last) and not op.h.is_contiguous()
        dense = _jacrev(op.info.branch, op.h)
        (m, n), N = op.shape, x.shape[0]
        V = torch.randn(N, n, 4, generator=gen, dtype=torch.float64)
        U = torch.randn(N, m, 4, generator=gen, dtype=torch.float64)
        omega = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        Vt = torch.randn(N, 4, n, generator=gen, dtype=torch.float64).transpose(1, 2)   # not contiguous
        inputs = [t.clone() for t in (V, U, omega, Vt)]
        for layout in ("k_inner", "nchw"):
            for name, plan in _plans(op).items():
                op.layout, op._program.modes = layout, plan
                for chunk in (None, 2):
                    op.chunk_size = chunk
                    where = f"{kind} {layout} {name} chunk={chunk}"
                    assert rel(op.matmat(V), dense @ V) < 1e-10, where
                    assert rel(op.rmatmat(U), dense.transpose(1, 2) @ U) < 1e-10, where
                    assert rel(op.matmat_shared(omega), dense @ omega) < 1e-10, where
                    assert rel(op.matmat(Vt), dense @ Vt) < 1e-10, where
                assert rel(op.to_dense(), dense) < 1e-10, where
        for before, after in zip(inputs, (V, U, omega, Vt)):
            assert torch.equal(before, after)


def test_default_mode_plans():
    """On the CPU the fast path keeps the operator's [N, D, k] block ("k_inner"): a Bottleneck runs
    its 1x1 convs as GEMMs and its lone 3x3 conv as a conv3d ("k" throughout, no copy); a
    BasicBlock's two 3x3 convs run as channels_last conv2d ("cl")."""
    pytest.importorskip("torchvision")
    x = torch.randn(2, 1, 7, 7, dtype=torch.float64)
    (bott,) = residual_jacobians(_layout_net("tv_bottleneck_s2"), x, path="fast")
    (basic,) = residual_jacobians(_layout_net("tv_basic_s2"), x, path="fast")
    (pre,) = residual_jacobians(_layout_net("preact"), x, path="fast")
    assert bott.layout == basic.layout == pre.layout == "k_inner"
    assert bott._program.modes == ["k", "k", "k"]
    assert basic._program.modes == ["cl", "cl"]
    assert pre._program.modes == ["cl", "cl", "k"]   # a run of two convs (3x3, strided 1x1), then a GEMM
    assert [L.pointwise for L in pre._program.lins] == [False, False, True]
    gen = residual_jacobians(_layout_net("tv_basic_s2"), x, path="generic")[0]
    assert gen.layout is None
    # a BasicBlock wider than _CL_MAX_CHANNELS: conv3d ("k"), the permuting copies would cost more
    from torchvision.models.resnet import BasicBlock   # optional dependency (skipped above)

    torch.manual_seed(0)
    wide = Net(nn.Sequential(BasicBlock(33, 33)), 33, 33).double().eval()
    (w,) = residual_jacobians(wide, torch.randn(2, 1, 3, 3, dtype=torch.float64), path="fast")
    assert jacobian._CL_MAX_CHANNELS == 32 and w._program.modes == ["k", "k"]
    assert rel(w.to_dense(), _jacrev(w.info.branch, w.h)) < 1e-10
    # other devices: channels_last conv2d for every spatial conv, GEMMs for the 1x1 stride-1 ones
    assert jacobian._plan(bott._program.lins, torch.device("cuda")) == ["k", "cl", "k"]
    assert jacobian._plan(pre._program.lins, torch.device("cuda")) == ["cl", "cl", "k"]
