"""Staged (torchvision-style) ResNet-18/34/50 built from the residual block protocol.

Stages of widths 64, 128, 256, 512 (times ``base_width / 64``; x4 channels out of bottleneck
blocks), stride 2 at the first block of stages 2-4. Branches follow torchvision exactly and are
``nn.Sequential`` s with named children:

- BasicBlock: ``conv1 (3x3, stride), bn1, relu, conv2 (3x3), bn2``,
- Bottleneck (v1.5, stride on the 3x3): ``conv1 (1x1), bn1, relu1, conv2 (3x3, stride), bn2,
  relu2, conv3 (1x1, x4), bn3``,

with ``post = ReLU`` after the addition. A block that changes shape uses torchvision's
downsample ``conv1x1 (stride) + BN`` as its skip Q_l for ``skip="identity"`` and
``skip="orthogonal"`` (orthogonal skips replace only the shape-preserving identities, by fixed
orthogonal 1x1 channel mixings); ``skip="none"`` uses :class:`ZeroSkip` everywhere.
``norm="none"`` drops every BN (convs then carry biases); ``init="fixup"`` with ``norm="none"``
inserts Fixup's scalar biases (``bias1a, bias1b, ...``) and multiplier (``scale``).
``.blocks`` lists all blocks of all stages in order; the hidden representations therefore change
shape at stage boundaries (analyses treat them stage by stage).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
from torch import nn

from resgeom_fast.core.checks import check_bool

from ._options import ScaleSpec, check_choice, check_drop_prob, check_positive_int
from .blocks import OrthogonalSkip, ResidualBlock, ScalarBias, ScalarMultiplier, StochasticDepth, ZeroSkip
from .network import ResidualNetwork, make_skip_scale, seeded_construction

__all__ = ["StagedResNet", "resnet18", "resnet34", "resnet50"]


def _conv(cin: int, cout: int, k: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


def basic_branch(cin: int, cout: int, stride: int, norm: str, fixup: bool) -> nn.Sequential:
    """torchvision BasicBlock branch: [N, cin, H, W] -> [N, cout, H/stride, W/stride]."""
    bias = norm == "none" and not fixup
    if fixup and norm == "none":
        return nn.Sequential(OrderedDict([
            ("bias1a", ScalarBias()), ("conv1", _conv(cin, cout, 3, stride, False)), ("bias1b", ScalarBias()),
            ("relu", nn.ReLU()), ("bias2a", ScalarBias()), ("conv2", _conv(cout, cout, 3, 1, False)),
            ("scale", ScalarMultiplier()), ("bias2b", ScalarBias()),
        ]))
    layers: list[tuple[str, nn.Module]] = [("conv1", _conv(cin, cout, 3, stride, bias))]
    if norm == "batch":
        layers.append(("bn1", nn.BatchNorm2d(cout)))
    layers += [("relu", nn.ReLU()), ("conv2", _conv(cout, cout, 3, 1, bias))]
    if norm == "batch":
        layers.append(("bn2", nn.BatchNorm2d(cout)))
    return nn.Sequential(OrderedDict(layers))


def bottleneck_branch(cin: int, planes: int, stride: int, norm: str, fixup: bool) -> nn.Sequential:
    """torchvision Bottleneck branch: [N, cin, H, W] -> [N, 4 planes, H/stride, W/stride]."""
    cout = 4 * planes
    bias = norm == "none" and not fixup
    if fixup and norm == "none":
        return nn.Sequential(OrderedDict([
            ("bias1a", ScalarBias()), ("conv1", _conv(cin, planes, 1, 1, False)), ("bias1b", ScalarBias()),
            ("relu1", nn.ReLU()), ("bias2a", ScalarBias()), ("conv2", _conv(planes, planes, 3, stride, False)),
            ("bias2b", ScalarBias()), ("relu2", nn.ReLU()), ("bias3a", ScalarBias()),
            ("conv3", _conv(planes, cout, 1, 1, False)), ("scale", ScalarMultiplier()), ("bias3b", ScalarBias()),
        ]))
    layers: list[tuple[str, nn.Module]] = [("conv1", _conv(cin, planes, 1, 1, bias))]
    if norm == "batch":
        layers.append(("bn1", nn.BatchNorm2d(planes)))
    layers += [("relu1", nn.ReLU()), ("conv2", _conv(planes, planes, 3, stride, bias))]
    if norm == "batch":
        layers.append(("bn2", nn.BatchNorm2d(planes)))
    layers += [("relu2", nn.ReLU()), ("conv3", _conv(planes, cout, 1, 1, bias))]
    if norm == "batch":
        layers.append(("bn3", nn.BatchNorm2d(cout)))
    return nn.Sequential(OrderedDict(layers))


def _staged_skip(skip: str, cin: int, cout: int, stride: int, norm: str,
                 generator: Optional[torch.Generator]) -> nn.Module:
    if skip == "none":
        if cin == cout and stride == 1:
            return ZeroSkip()
        return ZeroSkip(out_channels=cout, stride=stride)
    if cin != cout or stride != 1:
        layers: list[tuple[str, nn.Module]] = [("0", _conv(cin, cout, 1, stride, norm == "none"))]
        if norm == "batch":
            layers.append(("1", nn.BatchNorm2d(cout)))
        return nn.Sequential(OrderedDict(layers))
    if skip == "orthogonal":
        return OrthogonalSkip(cout, conv=True, generator=generator)
    return nn.Identity()


class StagedResNet(ResidualNetwork):
    """A torchvision-style staged ResNet (see the module docstring).

    Args:
        block: "basic" or "bottleneck".
        layers: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
        num_classes: C.
        cifar_stem: True: ``conv3x3 (stride 1), [BN], ReLU`` for 32x32 images; False: the ImageNet
            stem ``conv7x7 (stride 2), [BN], ReLU, maxpool 3x3 (stride 2)``.
        in_channels: input image channels.
        base_width: width of the first stage (64 as in torchvision; smaller for quick tests).
        skip, hyper, scale, init, norm, seed: as in :class:`FCResNet`; "1/L" uses L = all blocks.
        stochastic_depth: as in :class:`FCResNet` (p > 0: every branch ends with a child ``drop``,
            a :class:`StochasticDepth`; the downsampling blocks' branches too, their skips never).

    Shapes: x [N, in_channels, H, W] -> logits [N, num_classes].
    """

    def __init__(
        self,
        block: str,
        layers: tuple[int, ...],
        num_classes: int,
        *,
        cifar_stem: bool = True,
        in_channels: int = 3,
        base_width: int = 64,
        skip: str = "identity",
        hyper: bool = False,
        scale: ScaleSpec = 1.0,
        init: str = "kaiming",
        norm: str = "batch",
        seed: int = 0,
        stochastic_depth: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("block", block, ("basic", "bottleneck"))
        self.stochastic_depth = check_drop_prob("stochastic_depth", stochastic_depth)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("base_width", base_width)
        check_bool(None, "cifar_stem", cifar_stem, expected="one of [False, True]")
        lam = self._set_options(skip, hyper, scale, init, norm, sum(layers))
        self.block_kind, self.layers, self.num_classes = block, tuple(layers), num_classes
        fixup = init == "fixup"
        expansion = 4 if block == "bottleneck" else 1
        with seeded_construction(seed) as gen:
            bias = norm == "none"
            if cifar_stem:
                stem: list[tuple[str, nn.Module]] = [("conv1", _conv(in_channels, base_width, 3, 1, bias))]
            else:
                stem = [("conv1", nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=bias))]
            if norm == "batch":
                stem.append(("bn1", nn.BatchNorm2d(base_width)))
            stem.append(("relu", nn.ReLU()))
            if not cifar_stem:
                stem.append(("maxpool", nn.MaxPool2d(3, stride=2, padding=1)))
            self.stem = nn.Sequential(OrderedDict(stem))
            blocks: list[ResidualBlock] = []
            self.stage_of_block: list[int] = []
            cin = base_width
            for stage, n in enumerate(layers):
                planes = base_width * 2 ** stage
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    cout = planes * expansion
                    if block == "basic":
                        branch = basic_branch(cin, cout, stride, norm, fixup)
                    else:
                        branch = bottleneck_branch(cin, planes, stride, norm, fixup)
                    if self.stochastic_depth > 0:
                        branch.add_module("drop", StochasticDepth(self.stochastic_depth))
                    blocks.append(ResidualBlock(
                        branch=branch,
                        skip=_staged_skip(skip, cin, cout, stride, norm, gen),
                        scale=make_skip_scale(lam),
                        post=nn.ReLU(),
                    ))
                    self.stage_of_block.append(stage)
                    cin = cout
            self.blocks = nn.ModuleList(blocks)
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.head = nn.Linear(cin, num_classes)
            self._initialise(init, gen, norm)


def resnet18(num_classes: int = 10, *, cifar_stem: bool = True, **kwargs) -> StagedResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2). Keyword options as in :class:`StagedResNet`."""
    return StagedResNet("basic", (2, 2, 2, 2), num_classes, cifar_stem=cifar_stem, **kwargs)


def resnet34(num_classes: int = 10, *, cifar_stem: bool = True, **kwargs) -> StagedResNet:
    """ResNet-34: BasicBlocks (3, 4, 6, 3). Keyword options as in :class:`StagedResNet`."""
    return StagedResNet("basic", (3, 4, 6, 3), num_classes, cifar_stem=cifar_stem, **kwargs)


def resnet50(num_classes: int = 10, *, cifar_stem: bool = True, **kwargs) -> StagedResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3), 2048 features. Options as in :class:`StagedResNet`."""
    return StagedResNet("bottleneck", (3, 4, 6, 3), num_classes, cifar_stem=cifar_stem, **kwargs)
