"""check_finite_parameters reads the host once per model (one float64 total of every tensor's
sum) and names the first bad tensor only when that total is not finite; a total that overflows
from huge but finite values must not be mistaken for a NaN."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.analysis._common import check_finite_parameters
from resgeom_fast.core.checks import NonFiniteError


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)).double()


def test_finite_model_passes():
    check_finite_parameters("f", _net())


def test_huge_finite_values_whose_total_overflows_pass():
    net = _net()
    with torch.no_grad():
        net[0].weight.fill_(1e308)
        net[2].weight.fill_(1e308)
    check_finite_parameters("f", net)


@pytest.mark.parametrize("where, value", [("2.weight", float("nan")), ("1.running_var", float("inf"))])
def test_the_first_bad_tensor_is_named(where, value):
    net = _net()
    with torch.no_grad():
        dict(net.named_parameters()).get(where, dict(net.named_buffers()).get(where))[0] = value
    with pytest.raises(NonFiniteError, match=rf"f: expected finite model \w+ '{where}'"):
        check_finite_parameters("f", net)
