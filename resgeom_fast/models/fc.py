"""Fully-connected "Type 1" residual networks (constant width, no downsampling)."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import nn

from ._options import ScaleSpec, check_drop_prob, check_positive_int
from .blocks import OrthogonalSkip, ResidualBlock, ScalarMultiplier, StochasticDepth, ZeroSkip
from .network import ResidualNetwork, make_skip_scale, seeded_construction

__all__ = ["FCResNet", "fc_branch", "make_skip", "type1_blocks"]


def make_skip(skip: str, dim: int, conv: bool, generator: Optional[torch.Generator]) -> nn.Module:
    """Q_l for a Type-1 block of width ``dim``: Identity, ZeroSkip or OrthogonalSkip."""
    if skip == "identity":
        return nn.Identity()
    if skip == "none":
        return ZeroSkip()
    return OrthogonalSkip(dim, conv=conv, generator=generator)


def type1_blocks(make_branch: Callable[[], nn.Module], skip: str, width: int, conv: bool,
                 lam: Union[float, str], depth: int, generator: torch.Generator,
                 stochastic_depth: float = 0.0) -> nn.ModuleList:
    """``depth`` Type-1 blocks ``Q_l h + lam F_l(h)`` (no post-activation): branches from
    ``make_branch()``, skips from :func:`make_skip`, scales from ``make_skip_scale(lam)``,
    built in that order per block (the order fixes the random draws). With
    ``stochastic_depth`` p > 0 every branch (an ``nn.Sequential``) ends with a
    :class:`~resgeom_fast.models.blocks.StochasticDepth` (p) (no parameters, no random draws at
    construction: the weights are those of p = 0)."""
    def branch() -> nn.Module:
        b = make_branch()
        if stochastic_depth > 0:
            b.append(StochasticDepth(stochastic_depth))
        return b

    return nn.ModuleList(
        ResidualBlock(
            branch=branch(),
            skip=make_skip(skip, width, conv=conv, generator=generator),
            scale=make_skip_scale(lam),
            post=nn.Identity(),
        )
        for _ in range(depth)
    )


def fc_branch(width: int, norm: str, fixup: bool = False) -> nn.Sequential:
    """F_l of a fully-connected block: ``Linear -> [BN1d] -> ReLU -> Linear [-> BN1d]``.

    With ``fixup`` and ``norm="none"`` a learnable :class:`ScalarMultiplier` (init 1) ends the
    branch (the Linear biases play the role of Fixup's scalar biases).
    Maps [N, width] -> [N, width].
    """
    layers: list[nn.Module] = [nn.Linear(width, width)]
    if norm == "batch":
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, width)]
    if norm == "batch":
        layers.append(nn.BatchNorm1d(width))
    elif fixup:
        layers.append(ScalarMultiplier())
    return nn.Sequential(*layers)


class FCResNet(ResidualNetwork):
    """Fully-connected Type-1 ResNet: every h_l lives in R^width.

    ``h_0 = stem(x) = ReLU([BN](Linear(flatten(x))))``, then ``depth`` blocks
    ``h_l = Q_l h_{l-1} + lam_l F_l(h_{l-1})`` (plus the hyper-residual mean, see
    :mod:`resgeom_fast.models.blocks`), ``logits = head(h_L)``.

    Args:
        in_dim: input dimension d (inputs [N, d], or anything that flattens to it).
        width: D, the width of every h_l.
        depth: L, the number of residual blocks (>= 1).
        num_classes: C, outputs of the linear head.
        skip: "identity" | "none" (plain net) | "orthogonal" (fixed random orthogonal Q_l).
        hyper: add the mean of earlier block outputs to every block (hyper-residual).
        scale: lam, a float, "1/L", "1/sqrt(L)" or "skipinit" (learnable, init 0).
        init: "kaiming" | "fixup" | "torch" (see :meth:`ResidualNetwork._initialise`).
        norm: "batch" | "none".
        seed: seeds every random choice (weights, orthogonal skips); the global RNG is untouched.
        stochastic_depth: p in [0, 1), default 0 (off): in train mode each block's branch is
            dropped (the block is its skip) with probability p, one draw per forward call, and in
            eval mode scaled by 1 - p (Huang et al. 2016; :class:`~resgeom_fast.models.blocks.
            StochasticDepth`, the last layer of every branch when p > 0). The state dict is the
            same for every p, and so are the weights drawn from ``seed``.

    Built on the CPU whatever the default device (the seeded CPU generators draw the weights, so
    every device gets the same net): move it with ``.to(device)``.

    Shapes: x [N, in_dim] -> logits [N, num_classes]; hiddens are [N, width].
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        num_classes: int,
        *,
        skip: str = "identity",
        hyper: bool = False,
        scale: ScaleSpec = 1.0,
        init: str = "kaiming",
        norm: str = "batch",
        seed: int = 0,
        stochastic_depth: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        self.stochastic_depth = check_drop_prob("stochastic_depth", stochastic_depth)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        self.in_dim, self.width, self.depth, self.num_classes = in_dim, width, depth, num_classes
        lam = self._set_options(skip, hyper, scale, init, norm, depth)
        # built on the CPU whatever the default device: seeded_construction's CPU generators draw
        # the weights (the same weights on every device); model.to(device) moves them
        with seeded_construction(seed) as gen, torch.device("cpu"):
            stem: list[nn.Module] = [nn.Flatten(), nn.Linear(in_dim, width)]
            if norm == "batch":
                stem.append(nn.BatchNorm1d(width))
            stem.append(nn.ReLU())
            self.stem = nn.Sequential(*stem)
            self.blocks = type1_blocks(lambda: fc_branch(width, norm, fixup=(init == "fixup")),
                                       skip, width, False, lam, depth, gen, self.stochastic_depth)
            self.pool = nn.Identity()
            self.head = nn.Linear(width, num_classes)
            self._initialise(init, gen, norm)
