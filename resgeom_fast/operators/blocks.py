"""Discovery of residual blocks: this package's models, the registered kinds of other libraries
(torchvision and timm ResNets, MobileNetV2 inverted residuals, ConvNeXt blocks, the attention and
MLP sublayers of torchvision / timm ViT blocks), user-marked blocks.

The residual-block protocol lives on the bottom floor, :mod:`resgeom_fast.core.blocks` (block
kinds recognised by type, a registry later kinds extend); this module re-exports it where the
operators layer has always offered it.
"""
from __future__ import annotations

from resgeom_fast.core.blocks import (  # noqa: F401 - re-exports
    _HINT,
    _MARK,
    BlockInfo,
    SublayerBlock,
    mark_residual_block,
    mark_residual_sublayers,
    register_block_kind,
    residual_blocks,
    resolve_blocks,
)

__all__ = ["BlockInfo", "SublayerBlock", "mark_residual_block", "mark_residual_sublayers", "register_block_kind",
           "residual_blocks", "resolve_blocks"]
