"""The operators' fast paths recognise this package's module types by type, not by class name.

The structured Hessian path takes a :class:`~resgeom_fast.core.blocks.ZeroSkip` (subclasses under
any name included) and refuses an unrelated class that is merely called "ZeroSkip"; the fast
Jacobian path does the same for Fixup's :class:`~resgeom_fast.core.blocks.ScalarBias` /
:class:`~resgeom_fast.core.blocks.ScalarMultiplier`.
"""
from __future__ import annotations

import torch
from torch import nn

from resgeom_fast.core.blocks import ScalarBias, ScalarMultiplier, ZeroSkip
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import fast_path_supported, hessian, residual_jacobians
from resgeom_fast.operators._structured import parse_structured
from tests.operators._operator_nets import Block, dense_hessian, rel

CE = nn.CrossEntropyLoss()


class RenamedZeroSkip(ZeroSkip):
    """A ZeroSkip under another name."""


class _ZeroLike(nn.Module):
    """Not a ZeroSkip, though it has its attributes and output (renamed "ZeroSkip" below)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels, self.stride = None, 1

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


ImpostorZeroSkip = type("ZeroSkip", (_ZeroLike,), {"__doc__": "An unrelated class named ZeroSkip."})


class RenamedBias(ScalarBias):
    """A ScalarBias under another name."""


class RenamedMultiplier(ScalarMultiplier):
    """A ScalarMultiplier under another name."""


class _BiasLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias


ImpostorBias = type("ScalarBias", (_BiasLike,), {"__module__": "resgeom_fast.models.blocks"})


def _net(skip_cls: type) -> nn.Module:
    model = FCResNet(5, 6, 3, 3, skip="none", norm="none", seed=0).double().eval()
    for blk in model.blocks:
        blk.skip = skip_cls()
    return model


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)


def test_fcresnet_without_skip_uses_zero_skip():
    assert all(type(b.skip) is ZeroSkip for b in FCResNet(5, 6, 3, 3, skip="none", seed=0).blocks)


def test_zero_skip_subclass_takes_the_structured_path():
    model = _net(RenamedZeroSkip)
    layers, why = parse_structured(model, list(model.parameters()), CE, "eval")
    assert layers is not None, why
    x, y = _data()
    H = hessian(model, CE, (x, y), hvp="structured")
    V = torch.randn(H.shape[0], 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert H.hvp_method == "structured"
    assert rel(H.matmat(V), dense_hessian(model, CE, x, y) @ V) < 1e-10


def test_unrelated_class_named_zero_skip_is_refused():
    model = _net(ImpostorZeroSkip)
    assert type(model.blocks[0].skip).__name__ == "ZeroSkip"
    layers, why = parse_structured(model, list(model.parameters()), CE, "eval")
    assert layers is None and "skip ZeroSkip is not supported" in why
    x, y = _data()
    H = hessian(model, CE, (x, y))                   # "auto": the autograd methods, still exact
    assert "skip ZeroSkip is not supported" in H.structured_off
    V = torch.randn(H.shape[0], 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert rel(H.matmat(V), dense_hessian(model, CE, x, y) @ V) < 1e-10


def _fixup_branch(bias: type, mult: type) -> nn.Sequential:
    torch.manual_seed(2)
    return nn.Sequential(bias(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), mult()).double()


def test_scalar_module_subclasses_take_the_fast_jacobian_path():
    branch = _fixup_branch(RenamedBias, RenamedMultiplier)
    with torch.no_grad():
        branch[0].bias.fill_(0.3)
        branch[-1].weight.fill_(-1.7)
    assert fast_path_supported(branch)
    net = nn.Sequential(nn.Linear(5, 6), Block(branch)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    (fast,) = residual_jacobians(net, x, path="fast")
    (generic,) = residual_jacobians(net, x, path="generic")
    V = torch.randn(4, 6, 2, dtype=torch.float64)
    assert fast.path == "fast" and rel(fast.matmat(V), generic.matmat(V)) < 1e-12


def test_unrelated_class_named_scalar_bias_is_not_linearised():
    branch = _fixup_branch(ImpostorBias, ScalarMultiplier)
    assert type(branch[0]).__name__ == "ScalarBias"
    assert not fast_path_supported(branch)
    assert fast_path_supported(_fixup_branch(ScalarBias, ScalarMultiplier))
