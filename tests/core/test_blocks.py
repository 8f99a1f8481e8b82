"""resgeom_fast.core.blocks: the block protocol recognised by type, BlockInfo.index, the registry."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from resgeom_fast.core import blocks as core_blocks
from resgeom_fast.core.blocks import (
    BlockInfo,
    ResidualBlockBase,
    ScalarBias,
    ScalarMultiplier,
    ZeroSkip,
    block_kinds,
    mark_residual_block,
    register_block_kind,
    residual_blocks,
    resolve_blocks,
    unregister_block_kind,
)
from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError


class _Plain(ResidualBlockBase):
    """A block of the base class; no resgeom_block attribute set by the subclass itself."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.branch = nn.Linear(d, d)
        self.skip = nn.Identity()
        self.scale = 0.5
        self.post = nn.Identity()

    def forward(self, h):
        return self.post(self.skip(h) + self.scale * self.branch(h))


class _AttrBlock(nn.Module):
    """The documented attribute protocol for user classes (no base class)."""

    resgeom_block = True

    def __init__(self, d: int) -> None:
        super().__init__()
        self.branch, self.skip, self.scale, self.post = nn.Linear(d, d), nn.Identity(), 1.0, nn.Identity()

    def forward(self, h):
        return h + self.branch(h)


def test_old_import_paths_are_the_same_objects():
    from resgeom_fast import models, operators
    from resgeom_fast.models import blocks as model_blocks
    from resgeom_fast.operators import blocks as op_blocks

    assert models.ZeroSkip is ZeroSkip and models.ScalarBias is ScalarBias and models.ScalarMultiplier is ScalarMultiplier
    assert model_blocks.ZeroSkip is ZeroSkip
    assert issubclass(models.ResidualBlock, ResidualBlockBase)
    assert operators.BlockInfo is BlockInfo and operators.residual_blocks is residual_blocks
    assert operators.mark_residual_block is mark_residual_block and op_blocks.resolve_blocks is resolve_blocks


def test_state_dict_keys_of_moved_modules_unchanged():
    assert list(ScalarBias().state_dict()) == ["bias"] and list(ScalarMultiplier().state_dict()) == ["weight"]
    assert list(ZeroSkip(4, 2).state_dict()) == []
    assert ZeroSkip(4, 2)(torch.ones(2, 3, 5, 5)).shape == (2, 4, 3, 3)
    with pytest.raises(ValueError, match=r"ZeroSkip: expected h of shape \[N, C, H, W\], got \(2, 3\)"):
        ZeroSkip(4)(torch.ones(2, 3))


def test_index_is_the_position_and_models_residual_blocks_is_the_same_discovery():
    from resgeom_fast.models import FCResNet, residual_blocks as model_residual_blocks

    m = FCResNet(4, 6, 3, 2)
    infos = residual_blocks(m)
    assert [i.index for i in infos] == [0, 1, 2] and [i.name for i in infos] == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(i.kind == "resgeom" for i in infos)
    assert model_residual_blocks(m) == [i.block for i in infos] == list(m.blocks)
    assert model_residual_blocks(nn.Linear(2, 2)) == []
    # a hand-built BlockInfo (positional, as before index existed) gets index -1
    b = infos[0]
    hand = BlockInfo(b.name, b.block, b.branch, b.skip, b.scale, b.post, b.kind)
    assert hand.index == -1
    assert "index" not in b.to_dict()  # to_dict (results.json) unchanged


def test_isinstance_recognition_survives_a_subclass_rename():
    renamed = type("SomethingElse", (_Plain,), {})
    net = nn.Sequential(renamed(3), nn.ReLU(), _Plain(3))
    infos = residual_blocks(net)
    assert [(i.name, i.kind, i.index) for i in infos] == [("0", "resgeom", 0), ("2", "resgeom", 1)]
    assert infos[0].scale == 0.5 and infos[0].branch is net[0].branch


def test_attribute_protocol_and_marks():
    net = nn.Sequential(_AttrBlock(2), nn.Sequential(nn.Linear(2, 2)))
    mark_residual_block(net[1], branch=net[1][0], scale=2)
    infos = residual_blocks(net)
    assert [(i.name, i.kind) for i in infos] == [("0", "resgeom"), ("1", "marked")]
    assert infos[1].scale == 2.0 and isinstance(infos[1].skip, nn.Identity)


def test_resgeom_block_without_attributes_is_named():
    class Bad(nn.Module):
        resgeom_block = True

    with pytest.raises(ValueError, match=r"residual_blocks: module '0' has resgeom_block = True but lacks \['branch'"):
        residual_blocks(nn.Sequential(Bad()))


def test_errors():
    with pytest.raises(ArgumentValueError, match="found no residual blocks in Linear; "):
        residual_blocks(nn.Linear(2, 2))
    assert residual_blocks(nn.Linear(2, 2), required=False) == []
    with pytest.raises(ArgumentTypeError, match="^residual_blocks: expected model an nn.Module, got int$"):
        residual_blocks(3)
    with pytest.raises(TypeError, match="^mark_residual_block: expected branch an nn.Module, got int$"):
        mark_residual_block(nn.Linear(2, 2), 3)
    with pytest.raises(TypeError, match="^mark_residual_block: expected skip an nn.Module or None, got str$"):
        mark_residual_block(nn.Linear(2, 2), nn.Linear(2, 2), skip="x")
    with pytest.raises(TypeError, match="^mark_residual_block: expected scale a number or a tensor, got str$"):
        mark_residual_block(nn.Linear(2, 2), nn.Linear(2, 2), scale="1")


def test_resolve_blocks():
    net = nn.Sequential(_Plain(2), _Plain(2), _Plain(2))
    assert [b.index for b in resolve_blocks("f", net, [-1, net[0]])] == [2, 0]
    assert [b.index for b in resolve_blocks("f", net, 1)] == [1]
    with pytest.raises(ValueError, match="^f: blocks: index 3 out of range for 3 blocks$"):
        resolve_blocks("f", net, [3])
    with pytest.raises(TypeError, match="^f: blocks: expected indices, block modules or BlockInfo, got bool$"):
        resolve_blocks("f", net, [True])
    with pytest.raises(ValueError, match="^f: blocks: module Linear is not a residual block of the model$"):
        resolve_blocks("f", net, [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="^f: blocks: expected None or a non-empty selection$"):
        resolve_blocks("f", net, [])


class _Gated(nn.Module):
    """A third-party style block: out = h + g * body(h)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 3)
        self.g = 0.25

    def forward(self, h):
        return h + self.g * self.body(h)


def test_registry_extension_with_a_custom_kind():
    assert block_kinds()[:4] == ["marked", "resgeom", "torchvision_basic", "torchvision_bottleneck"]

    def describe(name, m):
        return BlockInfo(name, m, m.body, nn.Identity(), m.g, nn.Identity(), "gated")

    net = nn.Sequential(_Gated(), _Plain(3), _Gated())
    assert len(residual_blocks(net)) == 1
    register_block_kind("gated", lambda m: isinstance(m, _Gated), describe)
    try:
        assert block_kinds()[-1] == "gated"
        infos = residual_blocks(net)
        assert [(i.name, i.kind, i.index) for i in infos] == [("0", "gated", 0), ("1", "resgeom", 1), ("2", "gated", 2)]
        assert infos[2].branch is net[2].body and infos[2].scale == 0.25
        with pytest.raises(ArgumentValueError, match="already registered"):
            register_block_kind("gated", lambda m: False, describe)
        register_block_kind("gated", lambda m: False, describe, replace=True)
        assert len(residual_blocks(net)) == 1 and block_kinds()[-1] == "gated"
        with pytest.raises(ArgumentTypeError, match="^register_block_kind: expected match a callable, got int$"):
            register_block_kind("other", 3, describe)
    finally:
        unregister_block_kind("gated")
    assert "gated" not in block_kinds()
    with pytest.raises(ArgumentValueError, match="unregister_block_kind: expected name one of"):
        unregister_block_kind("gated")


def test_a_marked_module_wins_over_its_class():
    blk = _Plain(2)
    other = nn.Linear(2, 2)
    mark_residual_block(blk, branch=other, scale=3.0)
    (info,) = residual_blocks(nn.Sequential(blk))
    assert info.kind == "marked" and info.branch is other


def test_torchvision_kinds():
    tv = pytest.importorskip("torchvision")
    from torchvision.models.resnet import BasicBlock, Bottleneck

    down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
    net = nn.Sequential(BasicBlock(4, 8, stride=2, downsample=down), Bottleneck(8, 2))
    infos = residual_blocks(net)
    assert [(i.kind, i.index) for i in infos] == [("torchvision_basic", 0), ("torchvision_bottleneck", 1)]
    assert infos[0].skip is down and isinstance(infos[1].skip, nn.Identity) and isinstance(infos[0].post, nn.ReLU)
    assert list(infos[0].branch._modules) == ["conv1", "bn1", "relu", "conv2", "bn2"]
    assert infos[1].branch.conv3 is net[1].conv3
    # the same class name outside torchvision is no block
    fake = type("BasicBlock", (nn.Module,), {})
    assert residual_blocks(nn.Sequential(fake()), required=False) == []
    del tv


def test_blockinfo_fields_order():
    assert [f.name for f in dataclasses.fields(BlockInfo)] == [
        "name", "block", "branch", "skip", "scale", "post", "kind", "index", "input_at", "output_at", "owner",
        "sublayer"]
    assert core_blocks.__all__
