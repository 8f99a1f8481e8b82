"""Model families of the five studies (layer 5: imports torch only, never the compiled core).

- :class:`FCResNet`, :class:`ConvResNet`: "Type 1" nets, every h_l in one space.
- :func:`resnet18`, :func:`resnet34`, :func:`resnet50` (:class:`StagedResNet`): torchvision-style.
- :class:`LeakyResNet`: leaky ResNets with step schemes (docs/science.md section 4).
- :class:`BiasReg`: the bias regulariser of docs/science.md section 2.

Every residual block is a :class:`ResidualBlock` (``resgeom_block = True``, ``.branch``,
``.skip``, ``.scale``, ``.post``); every model has ``.stem``, ``.blocks``, ``.head`` and
``forward(x, return_hidden=False)`` returning ``(output, [h_0, ..., h_L])`` on request.
"""

from .blocks import (
    OrthogonalSkip,
    ResidualBlock,
    ScalarBias,
    ScalarMultiplier,
    ScaledIdentity,
    StochasticDepth,
    ZeroSkip,
    random_orthogonal,
)
from .conv import ConvResNet
from .fc import FCResNet
from .leaky import LeakyResNet, step_sizes
from .network import ResidualNetwork, residual_blocks
from .regularizers import BiasReg, relu_biases
from .resnet import StagedResNet, resnet18, resnet34, resnet50

__all__ = [
    "BiasReg",
    "ConvResNet",
    "FCResNet",
    "LeakyResNet",
    "OrthogonalSkip",
    "ResidualBlock",
    "ResidualNetwork",
    "ScalarBias",
    "ScalarMultiplier",
    "ScaledIdentity",
    "StagedResNet",
    "StochasticDepth",
    "ZeroSkip",
    "random_orthogonal",
    "relu_biases",
    "residual_blocks",
    "resnet18",
    "resnet34",
    "resnet50",
    "step_sizes",
]
