"""Discovery of residual blocks: this package's models, torchvision ResNets, user-marked blocks.

A block computes ``post(skip(h) + scale * branch(h))``; the residual Jacobian is that of
``branch`` alone (SCIENCE.md section 1). Three kinds are recognised, by duck typing (this layer
never imports resgeom_fast.models):

- modules with ``resgeom_block = True`` and attributes ``branch``, ``skip``, ``scale``, ``post``;
- torchvision ``BasicBlock`` / ``Bottleneck`` (branch = conv1, bn1, relu, conv2, bn2[, relu,
  conv3, bn3] as an ``nn.Sequential`` sharing the block's layers; skip = ``downsample`` or
  identity; post = ReLU);
- any module marked with :func:`mark_residual_block`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

__all__ = ["BlockInfo", "mark_residual_block", "residual_blocks"]

_MARK = "_resgeom_mark"
_HINT = (
    "residual blocks are modules with `resgeom_block = True` (resgeom_fast.models), torchvision "
    "BasicBlock / Bottleneck, or modules marked with "
    "resgeom_fast.operators.mark_residual_block(block, branch=..., skip=..., scale=...)"
)


@dataclass
class BlockInfo:
    """One residual block of a model.

    Attributes:
        name: qualified module name in the model ("" for the model itself).
        block: the block module (its forward pre-hook sees the block input h_{l-1}).
        branch: F_l, an ``nn.Module`` mapping h_{l-1} to the block's output shape.
        skip: Q_l. scale: lam_l (float or a 0-dim Parameter). post: applied after the sum.
        kind: "resgeom", "torchvision_basic", "torchvision_bottleneck" or "marked".
    """

    name: str
    block: nn.Module
    branch: nn.Module
    skip: nn.Module
    scale: Union[float, Tensor]
    post: nn.Module
    kind: str

    def to_dict(self) -> dict[str, Any]:
        scale = float(self.scale) if not isinstance(self.scale, Tensor) else float(self.scale.detach())
        return {"name": self.name, "kind": self.kind, "scale": scale,
                "branch": type(self.branch).__name__, "skip": type(self.skip).__name__}


@dataclass
class _Mark:
    branch: nn.Module
    skip: nn.Module
    scale: Union[float, Tensor]
    post: nn.Module


def mark_residual_block(module: nn.Module, branch: nn.Module, skip: Optional[nn.Module] = None,
                        scale: Union[float, Tensor] = 1.0, post: Optional[nn.Module] = None) -> nn.Module:
    """Declare ``module`` a residual block ``post(skip(h) + scale * branch(h))`` of a user model.

    Nothing is registered on the module (its state_dict is unchanged); the mark is a plain
    attribute read by :func:`residual_blocks`.

    Args:
        module: the block; its first forward argument must be the block input h.
        branch: F_l (usually a submodule of ``module``).
        skip: Q_l (default identity). scale: lam_l. post: after the sum (default identity).

    Returns:
        ``module`` itself.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"mark_residual_block: expected module an nn.Module, got {type(module).__name__}")
    if not isinstance(branch, nn.Module):
        raise TypeError(f"mark_residual_block: expected branch an nn.Module, got {type(branch).__name__}")
    for nm, m in (("skip", skip), ("post", post)):
        if m is not None and not isinstance(m, nn.Module):
            raise TypeError(f"mark_residual_block: expected {nm} an nn.Module or None, got {type(m).__name__}")
    if not isinstance(scale, (float, int, Tensor)):
        raise TypeError(f"mark_residual_block: expected scale a number or a tensor, got {type(scale).__name__}")
    object.__setattr__(module, _MARK, _Mark(branch, skip if skip is not None else nn.Identity(),
                                            float(scale) if not isinstance(scale, Tensor) else scale,
                                            post if post is not None else nn.Identity()))
    return module


def _torchvision_kind(m: nn.Module) -> Optional[str]:
    cls = type(m)
    if not cls.__module__.startswith("torchvision.models"):
        return None
    if cls.__name__ == "BasicBlock":
        return "torchvision_basic"
    if cls.__name__ == "Bottleneck":
        return "torchvision_bottleneck"
    return None


def _info(name: str, m: nn.Module) -> Optional[BlockInfo]:
    mark = m.__dict__.get(_MARK)
    if mark is not None:
        return BlockInfo(name, m, mark.branch, mark.skip, mark.scale, mark.post, "marked")
    if getattr(type(m), "resgeom_block", False) or getattr(m, "resgeom_block", False) is True:
        missing = [a for a in ("branch", "skip", "scale", "post") if not hasattr(m, a)]
        if missing:
            raise ValueError(f"residual_blocks: module {name!r} has resgeom_block = True but lacks {missing}")
        return BlockInfo(name, m, m.branch, m.skip, m.scale, m.post, "resgeom")
    kind = _torchvision_kind(m)
    if kind is not None:
        layers = [("conv1", m.conv1), ("bn1", m.bn1), ("relu", m.relu), ("conv2", m.conv2), ("bn2", m.bn2)]
        if kind == "torchvision_bottleneck":
            layers += [("relu2", m.relu), ("conv3", m.conv3), ("bn3", m.bn3)]
        skip = m.downsample if m.downsample is not None else nn.Identity()
        return BlockInfo(name, m, nn.Sequential(OrderedDict(layers)), skip, 1.0, m.relu, kind)
    return None


def residual_blocks(model: nn.Module) -> list[BlockInfo]:
    """Every residual block of ``model``, in ``model.named_modules()`` order.

    Returns:
        a list of :class:`BlockInfo` (block, branch, skip, scale, post, kind, name).

    Raises:
        ValueError naming the ways to declare blocks when the model has none.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"residual_blocks: expected model an nn.Module, got {type(model).__name__}")
    found = []
    for name, m in model.named_modules():
        info = _info(name, m)
        if info is not None:
            found.append(info)
    if not found:
        raise ValueError(f"residual_blocks: found no residual blocks in {type(model).__name__}; " + _HINT)
    return found


def resolve_blocks(fn: str, model: nn.Module, blocks: Optional[Sequence[Any]]) -> list[BlockInfo]:
    """``blocks`` (None, or indices / block modules / BlockInfo s) to BlockInfo s of ``model``."""
    all_blocks = residual_blocks(model)
    if blocks is None:
        return all_blocks
    if isinstance(blocks, (int, nn.Module, BlockInfo)):
        blocks = [blocks]
    by_id = {id(b.block): b for b in all_blocks}
    out = []
    for b in blocks:
        if isinstance(b, BlockInfo):
            out.append(b)
        elif isinstance(b, bool) or not isinstance(b, (int, nn.Module)):
            raise TypeError(f"{fn}: blocks: expected indices, block modules or BlockInfo, got {type(b).__name__}")
        elif isinstance(b, int):
            if not -len(all_blocks) <= b < len(all_blocks):
                raise ValueError(f"{fn}: blocks: index {b} out of range for {len(all_blocks)} blocks")
            out.append(all_blocks[b])
        else:
            if id(b) not in by_id:
                raise ValueError(f"{fn}: blocks: module {type(b).__name__} is not a residual block of the model")
            out.append(by_id[id(b)])
    if not out:
        raise ValueError(f"{fn}: blocks: expected None or a non-empty selection")
    return out
