"""Non-finite values in the residual-expansion analyses are named (issue 12): before, a NaN weight
made path_expansion and second_order_expansion fail with torch's "atol must be greater than or
equal to zero, but got -nan", and geometric_complexity returned gc = nan silently."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.analysis.expansion import geometric_complexity, path_expansion, second_order_expansion
from resgeom_fast.linalg import NonFiniteError
from resgeom_fast.models import FCResNet

D64 = torch.float64


def _net(poison: str | None = None, value: float = float("nan")) -> FCResNet:
    model = FCResNet(8, 6, 3, 4, seed=0).double().eval()
    if poison is not None:
        with torch.no_grad():
            dict(model.named_parameters())[poison].view(-1)[0] = value
    return model


def _x(n: int = 5) -> torch.Tensor:
    return torch.randn(n, 8, dtype=D64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fn", [
    lambda m, x: path_expansion(m, x),
    lambda m, x: second_order_expansion(m, x),
    lambda m, x: geometric_complexity(m, (x, torch.zeros(x.shape[0], dtype=torch.long))),
], ids=["path_expansion", "second_order_expansion", "geometric_complexity"])
@pytest.mark.parametrize("where,value,count", [
    ("blocks.1.branch.0.weight", float("nan"), "1 NaN and 0 inf"),
    ("blocks.2.branch.0.bias", float("inf"), "0 NaN and 1 inf"),
    ("head.weight", float("nan"), "1 NaN and 0 inf"),
])
def test_nonfinite_parameter_is_named(fn, where: str, value: float, count: str) -> None:
    with pytest.raises(NonFiniteError, match=rf"expected finite model parameter '{where}'.*got {count}"):
        fn(_net(where, value), _x())


def test_nonfinite_buffer_and_x_are_named() -> None:
    model = _net()
    name, buf = next((n, b) for n, b in model.named_buffers() if n.endswith("running_mean"))
    buf[0] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"path_expansion: expected finite model buffer '{name}'"):
        path_expansion(model, _x())
    x = _x()
    x[1, 2] = float("nan")
    with pytest.raises(NonFiniteError, match=r"path_expansion: expected finite x, got 1 NaN"):
        path_expansion(_net(), x)
    with pytest.raises(NonFiniteError, match=r"geometric_complexity: expected finite the inputs x of batch 0"):
        geometric_complexity(_net(), (x, torch.zeros(5, dtype=torch.long)))


def test_overflow_is_named() -> None:
    """Finite parameters and x, but the forward pass overflows float32: the block is named."""
    model = FCResNet(8, 6, 3, 4, norm="none", seed=0).eval()
    with torch.no_grad():
        for p in model.blocks[0].branch.parameters():
            p.mul_(1e25)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteError, match=r"path_expansion: expected finite the input of block 'blocks\.\d'"):
        path_expansion(model, x)


def test_finite_model_unchanged() -> None:
    """The checks do not change a finite result (the same numbers as the recursion's total)."""
    r = path_expansion(_net(), _x())
    assert r.tail_norm_mean < 1e-12 * r.total_norm_mean

