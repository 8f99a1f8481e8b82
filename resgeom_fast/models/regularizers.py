"""Regularisers the trainer can add to the loss (``train(..., regularizers=[...])``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, describe, message

__all__ = ["BiasReg", "relu_biases"]

_BIASED = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


def relu_biases(model: nn.Module) -> list[nn.Parameter]:
    """The biases that feed a ReLU directly, found inside every ``nn.Sequential`` of ``model``.

    For each ``nn.ReLU`` in a Sequential, the closest preceding Linear / Conv2d / BatchNorm
    (skipping Fixup scalar modules) whose bias exists is taken: with BatchNorm before the ReLU
    its shift ``beta`` is the unit's bias, otherwise the bias of the Linear / Conv. This covers
    the stems and the branches of this package's models (ReLUs applied after a residual addition,
    as in staged ResNets, have no bias of their own and are not included). Order: module order.
    """
    found: list[nn.Parameter] = []
    seen: set[int] = set()
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.children())
        for i, child in enumerate(children):
            if not isinstance(child, nn.ReLU):
                continue
            for prev in reversed(children[:i]):
                if isinstance(prev, _BIASED):
                    bias = getattr(prev, "bias", None)
                    if isinstance(bias, nn.Parameter) and id(bias) not in seen:
                        seen.add(id(bias))
                        found.append(bias)
                    break
    return found


class BiasReg(nn.Module):
    """BiasReg (docs/science.md section 2, our reading): R = beta * sum_l ||b_l - b0 * 1||^2.

    Pulls the biases that feed ReLUs towards ``b0 > 0`` so units stay alive. ``BiasReg(...)(model)``
    returns the 0-dim penalty; pass it to ``train(..., regularizers=[BiasReg(1e-3)])``.

    Args:
        beta: strength (>= 0).
        b0: target bias (> 0).
        parameters: the biases to regularise; None = :func:`relu_biases` of the model at call time.
    """

    def __init__(self, beta: float = 1e-3, b0: float = 0.1, parameters: Optional[list[Tensor]] = None) -> None:
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, (int, float)):
            raise ArgumentTypeError(message(None, "beta", "a float >= 0", describe(beta)))
        if beta < 0:
            raise ArgumentValueError(message(None, "beta", "a float >= 0", repr(beta)))
        if isinstance(b0, bool) or not isinstance(b0, (int, float)):
            raise ArgumentTypeError(message(None, "b0", "a float > 0", describe(b0)))
        if not b0 > 0:
            raise ArgumentValueError(message(None, "b0", "a float > 0", repr(b0)))
        self.beta, self.b0 = float(beta), float(b0)
        self._params = list(parameters) if parameters is not None else None

    def forward(self, model: nn.Module) -> Tensor:
        params = self._params if self._params is not None else relu_biases(model)
        if not params:
            first = next(model.parameters(), None)
            return torch.zeros((), device=first.device if first is not None else None)
        total = sum((p - self.b0).pow(2).sum() for p in params)
        return self.beta * total

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, b0={self.b0:g}"
