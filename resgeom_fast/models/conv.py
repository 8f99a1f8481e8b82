"""Convolutional "Type 1" residual networks (constant channels and resolution)."""

from __future__ import annotations

from torch import nn

from ._options import ScaleSpec, check_drop_prob, check_positive_int
from .blocks import ScalarBias, ScalarMultiplier
from .fc import type1_blocks
from .network import ResidualNetwork, seeded_construction

__all__ = ["ConvResNet", "conv_branch"]


def conv_branch(width: int, norm: str, fixup: bool = False) -> nn.Sequential:
    """F_l of a conv Type-1 block: ``Conv3x3 -> [BN2d] -> ReLU -> Conv3x3 -> [BN2d]``.

    Padding 1, stride 1, ``width`` channels in and out: [N, width, H, W] -> same shape.
    Convs carry a bias only when there is no BatchNorm and no Fixup. With ``fixup`` and
    ``norm="none"`` the branch is Fixup's
    ``bias, conv, bias, ReLU, bias, conv, multiplier, bias`` (scalar biases init 0,
    multiplier init 1).
    """
    if fixup and norm == "none":
        return nn.Sequential(
            ScalarBias(), nn.Conv2d(width, width, 3, padding=1, bias=False), ScalarBias(), nn.ReLU(),
            ScalarBias(), nn.Conv2d(width, width, 3, padding=1, bias=False), ScalarMultiplier(), ScalarBias(),
        )
    bias = norm == "none"
    layers: list[nn.Module] = [nn.Conv2d(width, width, 3, padding=1, bias=bias)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(width))
    layers += [nn.ReLU(), nn.Conv2d(width, width, 3, padding=1, bias=bias)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(width))
    return nn.Sequential(*layers)


class ConvResNet(ResidualNetwork):
    """Convolutional Type-1 ResNet: every h_l is [N, width, H, W] (no downsampling).

    ``h_0 = stem(x) = ReLU([BN](Conv3x3(x)))``, ``depth`` blocks as in :class:`FCResNet` with
    :func:`conv_branch` branches (orthogonal skips are fixed orthogonal 1x1 channel mixings),
    ``logits = head(global_avg_pool(h_L))``.

    Args:
        in_channels: channels of the input images [N, in_channels, H, W].
        width: channels of every h_l.
        depth, num_classes, skip, hyper, scale, init, norm, seed, stochastic_depth: as in :class:`FCResNet`.
    """

    def __init__(
        self,
        in_channels: int,
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
        check_positive_int("in_channels", in_channels)
        self.stochastic_depth = check_drop_prob("stochastic_depth", stochastic_depth)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("num_classes", num_classes)
        self.in_channels, self.width, self.depth, self.num_classes = in_channels, width, depth, num_classes
        lam = self._set_options(skip, hyper, scale, init, norm, depth)
        with seeded_construction(seed) as gen:
            stem: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1, bias=(norm == "none"))]
            if norm == "batch":
                stem.append(nn.BatchNorm2d(width))
            stem.append(nn.ReLU())
            self.stem = nn.Sequential(*stem)
            self.blocks = type1_blocks(lambda: conv_branch(width, norm, fixup=(init == "fixup")),
                                       skip, width, True, lam, depth, gen, self.stochastic_depth)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(width, num_classes)
            self._initialise(init, gen, norm)
