"""Fully-connected "Type 1" residual networks (constant width, no downsampling)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ._options import ScaleSpec, check_common, check_positive_int, resolve_scale
from .blocks import OrthogonalSkip, ResidualBlock, ScalarMultiplier, ZeroSkip
from .network import ResidualNetwork, make_skip_scale, seeded_construction

__all__ = ["FCResNet", "fc_branch", "make_skip"]


def make_skip(skip: str, dim: int, conv: bool, generator: Optional[torch.Generator]) -> nn.Module:
    """Q_l for a Type-1 block of width ``dim``: Identity, ZeroSkip or OrthogonalSkip."""
    if skip == "identity":
        return nn.Identity()
    if skip == "none":
        return ZeroSkip()
    return OrthogonalSkip(dim, conv=conv, generator=generator)


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
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        check_common(skip, norm, init, hyper)
        lam = resolve_scale(scale, depth)
        self.in_dim, self.width, self.depth, self.num_classes = in_dim, width, depth, num_classes
        self.skip_kind, self.hyper, self.scale_spec, self.init, self.norm = skip, hyper, scale, init, norm
        with seeded_construction(seed) as gen:
            stem: list[nn.Module] = [nn.Flatten(), nn.Linear(in_dim, width)]
            if norm == "batch":
                stem.append(nn.BatchNorm1d(width))
            stem.append(nn.ReLU())
            self.stem = nn.Sequential(*stem)
            self.blocks = nn.ModuleList(
                ResidualBlock(
                    branch=fc_branch(width, norm, fixup=(init == "fixup")),
                    skip=make_skip(skip, width, conv=False, generator=gen),
                    scale=make_skip_scale(lam),
                    post=nn.Identity(),
                )
                for _ in range(depth)
            )
            self.pool = nn.Identity()
            self.head = nn.Linear(width, num_classes)
            self._initialise(init, gen, norm)
