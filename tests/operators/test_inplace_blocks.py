"""Issue 12: a marked block whose branch starts with ``ReLU(inplace=True)`` keeps its true block
inputs (``J.h``) and its Jacobians equal torch.func.jacrev of the branch at those inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.operators._operator_nets import rel
from resgeom_fast.operators import mark_residual_block, residual_blocks, residual_jacobians


class _InplaceBlock(nn.Module):
    """h + branch(h), the branch starting (and continuing) with in-place ReLUs."""

    def __init__(self, w: int, conv: bool) -> None:
        super().__init__()
        if conv:
            self.branch = nn.Sequential(nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, padding=1),
                                        nn.BatchNorm2d(w), nn.ReLU(inplace=True), nn.Conv2d(w, w, 3, padding=1))
        else:
            self.branch = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(w, w), nn.ReLU(inplace=True),
                                        nn.Linear(w, w))

    def forward(self, h):
        return h + self.branch(h.clone())


def _net(conv: bool) -> nn.Module:
    torch.manual_seed(0)
    w = 3 if conv else 6
    stem = nn.Conv2d(1, w, 3, padding=1) if conv else nn.Linear(4, w)
    head = nn.Sequential(nn.Flatten(), nn.LazyLinear(2)) if conv else nn.Linear(w, 2)
    model = nn.Sequential(stem, _InplaceBlock(w, conv), _InplaceBlock(w, conv), head).double()
    for b in (model[1], model[2]):
        mark_residual_block(b, branch=b.branch)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _true_inputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Block inputs captured by an independent pre-hook (cloned at once)."""
    got = []
    hs = [b.block.register_forward_pre_hook(lambda m, a: got.append(a[0].detach().clone()))
          for b in residual_blocks(model)]
    with torch.no_grad():
        model.eval()(x)
    for h in hs:
        h.remove()
    return got


def _dense(branch: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """[N, D_out, D_in] per-sample Jacobians by jacrev on a copy of the branch without in-place ops."""
    br = copy.deepcopy(branch).eval()
    for m in br.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    rows = []
    for b in range(h.shape[0]):
        J = torch.func.jacrev(lambda z: br(z[None])[0])(h[b].clone())
        rows.append(J.reshape(-1, h[b].numel()))               # [D_out, D_in]
    return torch.stack(rows)


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_inplace_relu_branch_keeps_block_inputs(conv, path):
    model = _net(conv)
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64) if conv else torch.randn(5, 4, dtype=torch.float64)
    want = _true_inputs(model, x)
    assert all(bool((h < 0).any()) for h in want)          # a ReLU would visibly change them
    Js = residual_jacobians(model, x, path=path)
    assert [J.path for J in Js] == [path, path]
    for J, h in zip(Js, want):
        assert torch.equal(J.h, h)                           # stored inputs not overwritten
        dense = _dense(J.info.branch, h)
        n, d_out, d_in = dense.shape
        eye = torch.eye(d_in, dtype=torch.float64).expand(n, d_in, d_in)
        assert rel(J.matmat(eye), dense) < 1e-12
        eye_o = torch.eye(d_out, dtype=torch.float64).expand(n, d_out, d_out)
        assert rel(J.T.matmat(eye_o), dense.transpose(1, 2)) < 1e-12
        assert torch.equal(J.h, h)                           # and not by the products either
    # the model's own modules keep their in-place setting
    assert all(m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
