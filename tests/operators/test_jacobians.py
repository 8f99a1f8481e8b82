"""Residual block discovery and residual-branch Jacobians against torch.func.jacrev."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.operators._operator_nets import Block, ConvNet, FCNet, randomise_bn, rel
from resgeom_fast.operators import (
    block_inputs,
    fast_path_supported,
    mark_residual_block,
    residual_blocks,
    residual_jacobians,
)

tv = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck  # noqa: E402


class TVNet(nn.Module):
    """Stem + torchvision BasicBlock (stride 2, downsample) + Bottleneck, on tiny images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        down = nn.Sequential(nn.Conv2d(4, 6, 1, 2, bias=False), nn.BatchNorm2d(6))
        self.layer = nn.Sequential(BasicBlock(4, 6, stride=2, downsample=down),
                                   Bottleneck(6, 2, stride=1, downsample=nn.Sequential(
                                       nn.Conv2d(6, 8, 1, bias=False), nn.BatchNorm2d(8))))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.layer(self.stem(x)).mean((2, 3)))


def _tv_net() -> TVNet:
    net = TVNet().double()
    randomise_bn(net, torch.Generator().manual_seed(1))
    return net


def _models():
    return {
        "fc": (FCNet(width=6).double(), torch.randn(5, 5, dtype=torch.float64)),
        "fc_bn": (FCNet(width=6, bn=True).double(), torch.randn(5, 5, dtype=torch.float64)),
        "conv_bn": (ConvNet().double(), torch.randn(3, 1, 6, 6, dtype=torch.float64)),
        "torchvision": (_tv_net(), torch.randn(3, 1, 6, 6, dtype=torch.float64)),
    }


def _jacrev(info, h):
    """Dense per-sample Jacobians [N, D_out, D_in] of the branch (eval mode)."""
    branch = info.branch
    was = [(m, m.training) for m in branch.modules()]
    branch.eval()
    rows = []
    for b in range(h.shape[0]):
        J = torch.func.jacrev(lambda z: branch(z[None])[0])(h[b])
        rows.append(J.reshape(-1, h[b].numel()))
    for m, t in was:
        m.training = t
    return torch.stack(rows)


# -- discovery ----------------------------------------------------------------------------------
def test_discovers_protocol_torchvision_and_marked_blocks():
    fc, _ = _models()["fc"]
    infos = residual_blocks(fc)
    assert [i.name for i in infos] == ["blocks.0", "blocks.1"] and infos[0].kind == "resgeom"
    assert infos[0].scale == 0.7 and infos[0].branch is fc.blocks[0].branch
    tvnet = TVNet()
    infos = residual_blocks(tvnet)
    assert [i.kind for i in infos] == ["torchvision_basic", "torchvision_bottleneck"]
    assert infos[0].skip is tvnet.layer[0].downsample and isinstance(infos[0].post, nn.ReLU)
    assert list(infos[1].branch._modules) == [
        "conv1", "bn1", "relu", "conv2", "bn2", "relu2", "conv3", "bn3"]
    # user-marked blocks; the state_dict is unchanged by the mark
    user = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    keys = list(user.state_dict())
    mark_residual_block(user[1], branch=user[1], scale=0.5)
    assert list(user.state_dict()) == keys
    (info,) = residual_blocks(user)
    assert info.kind == "marked" and info.name == "1" and info.scale == 0.5
    assert info.to_dict()["kind"] == "marked"


def test_no_blocks_error():
    with pytest.raises(ValueError, match="found no residual blocks in Sequential; .*mark_residual_block"):
        residual_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))


def test_package_models_discovered():
    models = pytest.importorskip("resgeom_fast.models")
    net = models.FCResNet(8, 6, 3, 3, norm="batch").double()
    ops = residual_jacobians(net, torch.randn(4, 8, dtype=torch.float64))
    assert len(ops) == 3 and all(op.path == "fast" for op in ops)
    r18 = models.resnet18(num_classes=3, base_width=4).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ops = residual_jacobians(r18, x, blocks=[0, 2])
    assert [op.path for op in ops] == ["fast", "fast"]
    g = residual_jacobians(r18, x, blocks=[0, 2], path="generic")
    V = torch.randn(2, ops[1].shape[1], 3, dtype=torch.float64)
    assert rel(ops[1].matmat(V), g[1].matmat(V)) < 1e-10


def test_hyper_residual_block_inputs_are_the_hidden_states():
    models = pytest.importorskip("resgeom_fast.models")
    net = models.FCResNet(8, 6, 4, 3, hyper=True, seed=0).double().eval()
    x = torch.randn(5, 8, dtype=torch.float64)
    _, hs = net(x, return_hidden=True)
    infos = residual_blocks(net)
    for h_in, h in zip(block_inputs(net, x, infos), hs[:-1]):
        torch.testing.assert_close(h_in, h, rtol=0, atol=0)
    J = residual_jacobians(net, x)[2]
    b = 1
    dense = torch.func.jacrev(net.blocks[2].branch)(hs[2][b:b + 1]).reshape(6, 6)
    torch.testing.assert_close(J.matmat(torch.eye(6, dtype=torch.float64).expand(5, 6, 6))[b], dense)


# -- Jacobians ----------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["generic", "fast"])
@pytest.mark.parametrize("case", ["fc", "fc_bn", "conv_bn", "torchvision"])
def test_equals_jacrev_row_by_row(case, path):
    model, x = _models()[case]
    ops = residual_jacobians(model, x, path=path)
    infos = residual_blocks(model)
    for op, info in zip(ops, infos):
        assert op.path == path and op.batch_shape == (x.shape[0],)
        dense = _jacrev(info, op.h)
        assert op.shape == tuple(dense.shape[1:])
        got = op.to_dense()
        for b in range(x.shape[0]):
            assert rel(got[b], dense[b]) < 1e-10
        assert rel(op.T.to_dense(), dense.transpose(1, 2)) < 1e-10


@pytest.mark.parametrize("case", ["fc_bn", "conv_bn", "torchvision"])
def test_adjoint_and_fast_equals_generic(case):
    model, x = _models()[case]
    fast = residual_jacobians(model, x, path="fast")
    gen = residual_jacobians(model, x, path="generic")
    for f, g in zip(fast, gen):
        N, (m, n) = x.shape[0], f.shape
        V = torch.randn(N, n, 4, dtype=torch.float64)
        U = torch.randn(N, m, 4, dtype=torch.float64)
        lhs = (f.matmat(V) * U).sum((1, 2))
        rhs = (V * f.T.matmat(U)).sum((1, 2))
        assert rel(lhs, rhs) < 1e-12
        assert rel(f.matmat(V), g.matmat(V)) < 1e-12
        assert rel(f.rmatmat(U), g.rmatmat(U)) < 1e-12
        # a sketch shared by every sample (expanded along the batch) and chunking
        omega = torch.randn(n, 3, dtype=torch.float64)
        assert rel(f.matmat_shared(omega), g.matmat(omega.expand(N, n, 3).contiguous())) < 1e-12
        small = residual_jacobians(model, x, blocks=[f.info.block], path="fast", chunk_size=2)[0]
        assert rel(small.matmat(V), f.matmat(V)) < 1e-12 and rel(small.rmatmat(U), f.rmatmat(U)) < 1e-12


def test_generic_for_unsupported_branch():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), Block(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5))))
    net = net.double()
    x = torch.randn(3, 4, dtype=torch.float64)
    (op,) = residual_jacobians(net, x)
    assert op.path == "generic" and not fast_path_supported(net[1].branch)
    dense = _jacrev(residual_blocks(net)[0], op.h)
    assert rel(op.to_dense(), dense) < 1e-10
    with pytest.raises(ValueError, match="path='fast' does not support block '1': layer Tanh"):
        residual_jacobians(net, x, path="fast")


def test_float32_fast_matches_float64():
    model, x = _models()["conv_bn"]
    ref = residual_jacobians(model, x)
    ops32 = residual_jacobians(model.float(), x.float())
    V = torch.randn(3, ref[1].shape[1], 2, dtype=torch.float64)
    assert rel(ops32[1].matmat(V.float()).double(), ref[1].matmat(V)) < 1e-5


def test_randomized_svd_matches_dense():
    linalg = pytest.importorskip("resgeom_fast.linalg")
    model, x = _models()["conv_bn"]
    op = residual_jacobians(model, x)[0]
    dense = op.to_dense()
    S = torch.linalg.svdvals(dense)[:, :4]
    res = linalg.randomized_svd(op, k=4, oversample=40, power_iters=4, seed=0)
    assert rel(res.S, S) < 1e-6


def test_errors():
    model, x = _models()["fc"]
    with pytest.raises(ValueError, match="path: expected one of"):
        residual_jacobians(model, x, path="quick")
    with pytest.raises(ValueError, match="expected x of dtype torch.float64"):
        residual_jacobians(model, x.float())
    with pytest.raises(ValueError, match="expected x on the model's device"):
        residual_jacobians(model, x.to("meta"))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int"):
        residual_jacobians(model, x, chunk_size=0)
    with pytest.raises(ValueError, match="index 5 out of range"):
        residual_jacobians(model, x, blocks=[5])
    with pytest.raises(ValueError, match="is not a residual block"):
        residual_jacobians(model, x, blocks=[model.head])
    op = residual_jacobians(model, x)[0]
    with pytest.raises(ValueError, match="expected X of shape"):
        op.matmat(torch.randn(6, 4, 2, dtype=torch.float64))
