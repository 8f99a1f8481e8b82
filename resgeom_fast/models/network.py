"""The base class shared by every residual network of this package, and its initialisation.

A :class:`ResidualNetwork` has ``.stem``, ``.blocks`` (an ``nn.ModuleList`` of
:class:`~resgeom_fast.models.blocks.ResidualBlock`), ``.pool`` (``nn.Identity`` for
fully-connected nets, global average pooling + flatten for conv nets) and ``.head`` (an
``nn.Linear``)::

    h_0 = stem(x),   h_l = block_l(h_{l-1}) (l = 1..L),   logits = head(pool(h_L)).

``forward(x, return_hidden=True)`` returns ``(logits, [h_0, ..., h_L])`` from one forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.blocks import residual_blocks as _block_infos
from resgeom_fast.core.checks import check_int

from ._options import ScaleSpec, check_common, resolve_scale
from .blocks import ScalarBias, ScalarMultiplier, fixup_factor

__all__ = ["ResidualNetwork", "seeded_construction"]

_WEIGHT_LAYERS = (nn.Linear, nn.Conv2d)
_NORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d)


@contextlib.contextmanager
def seeded_construction(seed: int) -> Iterator[torch.Generator]:
    """Build modules deterministically without touching the caller's global RNG state.

    Inside the block the global CPU RNG is seeded with ``seed`` (so PyTorch's own default
    initialisation is reproducible) and restored on exit; the yielded ``torch.Generator``
    (also seeded with ``seed``) drives this package's explicit initialisation. Modules are built
    on the CPU whatever the default device (``torch.set_default_device`` or a ``torch.device``
    context), because those CPU generators draw the weights: the same seed gives the same weights
    everywhere; move the model with ``.to(device)``.
    """
    check_int(None, "seed", seed)
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        yield gen


class ResidualNetwork(nn.Module):
    """Base class: stem -> residual blocks -> pool -> linear head.

    Subclasses set ``stem``, ``blocks``, ``pool``, ``head``, ``hyper`` and call
    :meth:`_initialise`. The hyper-residual rule is documented in
    :mod:`resgeom_fast.models.blocks`.
    """

    stem: nn.Module
    blocks: nn.ModuleList
    pool: nn.Module
    head: nn.Linear
    hyper: bool

    @property
    def num_blocks(self) -> int:
        """L, the number of residual blocks."""
        return len(self.blocks)

    def forward(self, x: Tensor, return_hidden: bool = False) -> Union[Tensor, tuple[Tensor, list[Tensor]]]:
        """Logits, and optionally the per-block representations of the same pass.

        Args:
            x: inputs ([N, in_dim] for FC nets -- images are flattened --, [N, C, H, W] for conv nets).
            return_hidden: also return ``[h_0, ..., h_L]`` (h_0 = stem(x), h_l = output of block l;
                [N, D] or [N, C, H, W]); tensors are part of the autograd graph.

        Returns:
            logits [N, num_classes], or ``(logits, hiddens)`` with ``len(hiddens) == L + 1``.
        """
        h = self.stem(x)
        hiddens: Optional[list[Tensor]] = [h] if return_hidden else None
        # running sums of the earlier outputs h_0..h_{l-2}, keyed by per-sample shape
        sums: dict[tuple[int, ...], list] = {}
        for block in self.blocks:
            if self.hyper:
                # called as a module (not block.residual / block.post) so that hooks -- block
                # discovery, residual Jacobians -- see the block input h_{l-1}
                out = block(h, hyper_sums=sums)
                key = tuple(h.shape[1:])
                if key in sums:
                    sums[key][0] = sums[key][0] + h
                    sums[key][1] += 1
                else:
                    sums[key] = [h, 1]
                h = out
            else:
                h = block(h)
            if hiddens is not None:
                hiddens.append(h)
        logits = self.head(self.pool(h))
        if hiddens is not None:
            return logits, hiddens
        return logits

    def _set_options(self, skip: str, hyper: bool, scale: ScaleSpec, init: str, norm: str,
                     num_blocks: int) -> Union[float, str]:
        """Validate the options every family shares, store them (``skip_kind``, ``hyper``,
        ``scale_spec``, ``init``, ``norm``) and return lam for ``num_blocks`` blocks
        (:func:`~resgeom_fast.models._options.resolve_scale`)."""
        check_common(skip, norm, init, hyper)
        lam = resolve_scale(scale, num_blocks)
        self.skip_kind, self.hyper, self.scale_spec, self.init, self.norm = skip, hyper, scale, init, norm
        return lam

    def readout(self, h_last: Tensor) -> Tensor:
        """Logits from the last representation h_L: ``head(pool(h_L))``."""
        return self.head(self.pool(h_last))

    # ------------------------------------------------------------------ initialisation
    def _initialise(self, init: str, generator: torch.Generator, norm: str) -> None:
        """Apply ``init`` ("kaiming", "fixup" or "torch") to every layer.

        - "torch": PyTorch's own defaults (drawn under :func:`seeded_construction`).
        - "kaiming": every Linear / Conv2d weight ~ N(0, 2 / fan_in), biases 0, BatchNorm
          weight 1 / bias 0; the head ~ N(0, 1 / fan_in), bias 0.
        - "fixup" (Zhang et al. 2019): as "kaiming", then in each branch the non-final weight
          layers are multiplied by L^(-1/(2m-2)) (m = weight layers per branch) and the final
          one is set to 0 -- or, with ``norm="batch"``, the branch's final BatchNorm weight is
          set to 0 instead -- so every block is the identity map at initialisation (times
          Q_l); the head is set to 0. Scalar biases / multipliers keep their 0 / 1.
        """
        if init == "torch":
            return
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, _WEIGHT_LAYERS):
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu", generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
                elif isinstance(m, _NORM_LAYERS):
                    if m.weight is not None:
                        m.weight.fill_(1.0)
                        m.bias.zero_()
                elif isinstance(m, ScalarBias):
                    m.bias.zero_()
                elif isinstance(m, ScalarMultiplier):
                    m.weight.fill_(1.0)
            fan_in = self.head.weight.shape[1]
            self.head.weight.normal_(0.0, fan_in ** -0.5, generator=generator)
            if self.head.bias is not None:
                self.head.bias.zero_()
            if init != "fixup":
                return
            L = self.num_blocks
            for block in self.blocks:
                layers = [m for m in block.branch.modules() if isinstance(m, _WEIGHT_LAYERS)]
                factor = fixup_factor(L, len(layers))
                for m in layers[:-1]:
                    m.weight.mul_(factor)
                norms = [m for m in block.branch.modules() if isinstance(m, _NORM_LAYERS)]
                if norm == "batch" and norms:
                    norms[-1].weight.zero_()
                else:
                    layers[-1].weight.zero_()
                    if layers[-1].bias is not None:
                        layers[-1].bias.zero_()
            self.head.weight.zero_()
            if self.head.bias is not None:
                self.head.bias.zero_()


def make_skip_scale(scale: Union[float, str]) -> Union[float, nn.Parameter]:
    """A block's ``scale``: the float itself, or a fresh learnable scalar 0 for "skipinit"."""
    if scale == "skipinit":
        return nn.Parameter(torch.zeros(()))
    return float(scale)


def residual_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual block modules of ``model`` in registration order (for this package's models
    its :class:`ResidualBlock` s; an empty list when there are none).

    The one discovery is :func:`resgeom_fast.core.blocks.residual_blocks`; this returns the
    ``block`` of each :class:`~resgeom_fast.core.blocks.BlockInfo` it finds.
    """
    return [info.block for info in _block_infos(model, required=False)]
