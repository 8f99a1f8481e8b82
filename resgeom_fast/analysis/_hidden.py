"""Representations h_0..h_L of any discovered residual stack, from forward hooks on its blocks.

:func:`block_representations` gives the analyses (``collapse``) the per-block hidden states of a
model that has no ``forward(x, return_hidden=True)`` -- a torchvision / timm ResNet, a
MobileNetV2, a ConvNeXt, a model with marked blocks -- from one forward pass: h_0 is the input of
the first block and h_l the output of block l, in :func:`resgeom_fast.core.blocks.residual_blocks`
order. For this package's networks the result equals ``forward(x, return_hidden=True)[1]``
exactly (their h_0 = stem(x) is the first block's input). Sublayer blocks (the attention and MLP
sublayers of a ViT ``EncoderBlock``) are read at their capture points (``BlockInfo.input_point``
/ ``output_point``): h_l of a transformer is the token sequence [N, S, W] after sublayer l.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from torch import Tensor, nn

from resgeom_fast.core.blocks import BlockInfo, residual_blocks
from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_module
from resgeom_fast.core.modules import capture_points

__all__ = ["block_representations"]


def block_representations(model: nn.Module, x: Tensor, *,
                          blocks: Optional[Sequence[BlockInfo]] = None) -> list[Tensor]:
    """The hidden states ``[h_0, ..., h_L]`` of the residual stack of ``model`` on ``x``.

    One forward pass of ``model(x)`` with forward hooks on the blocks (removed on exit, also on an
    exception); the pass stops after the last block has returned (the head is not run). The
    model is run as it is: the caller chooses eval / train mode and ``torch.no_grad`` (under
    grad the tensors are detached copies either way).

    Args:
        model: any module whose residual blocks :func:`~resgeom_fast.core.blocks.residual_blocks`
            discovers (or ``blocks``, a list of its :class:`BlockInfo`, to skip the discovery).
        x: the model input [N, ...].
        blocks: the blocks to use (default: every block of the model), in forward order.

    Returns:
        ``L + 1`` tensors (detached clones, so later in-place operations of the model cannot alter
        them): h_0 = the first block's input, h_l = the output of block l, each [N, ...] (shapes
        may change across the stages of a staged net).

    Raises:
        ArgumentTypeError: ``model`` not a module; a block input / output that is not a Tensor.
        ArgumentValueError: no residual blocks (the message lists the ways to declare them); two
            blocks that are one module; a block not called, or called more than once, in the
            forward pass (its h_l would be ambiguous).
    """
    where = "block_representations"
    check_module(where, "model", model)
    infos = residual_blocks(model) if blocks is None else list(blocks)
    if not infos:
        raise ArgumentValueError(f"{where}: expected at least one residual block, got none")
    outs = [b.output_point for b in infos]
    if len({(id(m), w) for m, w in outs}) != len(outs):
        raise ArgumentValueError(f"{where}: expected every residual block to be its own module, got blocks "
                                 f"sharing one module (their outputs cannot be told apart by hooks)")
    with contextlib.ExitStack() as stack:
        cap_in = stack.enter_context(capture_points([infos[0].input_point]))
        cap_out = stack.enter_context(capture_points(outs, stop=True))
        model(x)
    if not cap_out.complete:
        names = [infos[i].name or "<model>" for i in cap_out.missing()]
        raise ArgumentValueError(f"{where}: expected every residual block to be called in model(x), got "
                                 f"{len(names)} not called: {names[:5]}")
    twice = [infos[i].name or "<model>" for i, c in enumerate(cap_out.calls) if c > 1]
    if twice:
        raise ArgumentValueError(f"{where}: expected every residual block to be called once in model(x), got "
                                 f"{twice[:5]} called more than once")
    h0 = cap_in.values[0]
    if not isinstance(h0, Tensor):
        raise ArgumentTypeError(f"{where}: expected the input of block {infos[0].name!r} a Tensor, got "
                                f"{type(h0).__name__}")
    for info, h in zip(infos, cap_out.values):
        if not isinstance(h, Tensor):
            raise ArgumentTypeError(f"{where}: expected the output of block {info.name!r} a Tensor, got "
                                    f"{type(h).__name__}")
    return [h0, *cap_out.values]
