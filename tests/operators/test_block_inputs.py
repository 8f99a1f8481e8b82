"""block_inputs: the captured block inputs, the early stop, its refusals, and nothing left behind."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from resgeom_fast.operators import block_inputs, residual_blocks
from tests.operators._operator_nets import Block


class _Net(nn.Module):
    def __init__(self, call: str = "positional") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(4, 5)
        self.blocks = nn.ModuleList([Block(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5))) for _ in range(3)])
        self.head = nn.Linear(5, 2)
        self.call, self.after_last = call, 0

    def forward(self, x):
        h = self.stem(x)
        for i, b in enumerate(self.blocks):
            if self.call == "keyword" and i == 1:
                h = b(h=h)
            elif self.call == "skip_last" and i == 2:
                continue
            else:
                h = b(h)
        self.after_last += 1
        return self.head(h)


def _manual_inputs(net: _Net, x: torch.Tensor) -> list[torch.Tensor]:
    hs, h = [], net.stem(x)
    for b in net.blocks:
        hs.append(h)
        h = b(h)
    return hs


def test_inputs_detached_copies_and_early_stop():
    net = _Net().train()
    x = torch.randn(6, 4)
    infos = residual_blocks(net)
    with torch.no_grad():
        want = [h.clone() for h in _manual_inputs(net.eval(), x)]
    net.train()
    hs = block_inputs(net, x, infos[:2])
    assert len(hs) == 2 and all(torch.equal(h, w) for h, w in zip(hs, want[:2]))
    assert all(not h.requires_grad for h in hs)
    assert net.after_last == 0                          # stopped at the second block's input
    assert net.training and all(m.training for m in net.modules())       # modes restored
    assert all(not b.block._forward_pre_hooks for b in infos)           # hooks removed
    assert [torch.equal(h, w) for h, w in zip(block_inputs(net, x, infos), want)] == [True] * 3


def test_block_called_without_a_tensor_input_is_refused():
    net = _Net("keyword")
    infos = residual_blocks(net)
    with pytest.raises(ValueError, match=r"residual_jacobians: block '.*1' was called without a tensor input"):
        block_inputs(net, torch.randn(3, 4), infos)
    assert all(not b.block._forward_pre_hooks for b in infos)


def test_block_not_called_is_named():
    net = _Net("skip_last")
    infos = residual_blocks(net)
    with pytest.raises(ValueError, match=r"residual_jacobians: blocks \['.*2'\] were not called in the forward"):
        block_inputs(net, torch.randn(3, 4), infos)
    assert all(not b.block._forward_pre_hooks for b in infos)
