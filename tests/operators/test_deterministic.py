"""Issue 12: ``deterministic=True`` makes "auto" follow a fixed rule instead of timings, so that two
fresh operators give bitwise-identical products and report the same choice."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from tests.operators._operator_nets import ConvNet, dense_hessian, randomise_bn, rel
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import _autotune
from resgeom_fast.operators import block_hessians, ggn, hessian
from resgeom_fast.operators.curvature import CurvatureEngine

CE = nn.CrossEntropyLoss()
# the same numbers as CE, but not recognised by the structured path (which now covers the MLP and
# ConvNet below through their torch.fx trace): keeps these tests on the autograd methods
SOFT_CE = lambda o, t: nn.functional.cross_entropy(o, t)  # noqa: E731


def _fc_data(n=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _fcresnet():
    """A net the structured path recognises (stem / blocks / pool / head, BatchNorm in eval mode)."""
    m = FCResNet(5, 6, 3, 3, seed=0)
    randomise_bn(m, torch.Generator().manual_seed(1))
    return m.eval()


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


class _FakeClock:
    """A clock for the auto-tuner's timings (operators/_autotune.py): it advances by ``cost[method]`` whenever a method runs."""

    def __init__(self, cost):
        self.cost, self.t = cost, 0.0

    def perf_counter(self):
        return self.t


@pytest.mark.parametrize("case", ["mlp", "fcresnet"])
def test_two_fresh_operators_are_bitwise_identical(case):
    """float32 on the CPU, where "auto" would otherwise time two methods and two matmul libraries."""
    data = _fc_data()
    V = torch.randn(sum(p.numel() for p in (_mlp() if case == "mlp" else _fcresnet()).parameters()), 4)
    outs, choices = [], []
    for _ in range(2):
        model = _mlp() if case == "mlp" else _fcresnet()
        H = hessian(model, SOFT_CE if case == "mlp" else CE, data, deterministic=True)
        outs.append([H.matmat(V), H.matmat(V), H.matmat(V[:, :1])])
        choices.append((H.hvp_method, H.matmul_choice, H.hvp_choice(4), H.hvp_choice(1)))
        assert H.deterministic and all(not t for t in H.hvp_timings.values())   # nothing timed
    want = "double_backward" if case == "mlp" else "structured"
    assert choices[0] == choices[1] == (want, "default", want, want)
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert torch.equal(outs[0][0], outs[0][1])                      # and call to call
    dense = dense_hessian(model.double(), CE, data[0].double(), data[1])
    assert rel(outs[0][0].double(), dense @ V.double()) < 1e-4


@pytest.mark.parametrize("timed_winner", ["forward_over_reverse", "double_backward"])
def test_choice_does_not_depend_on_the_timer(monkeypatch, timed_winner):
    model = _mlp(torch.float64)
    data = _fc_data(dtype=torch.float64)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    dense = dense_hessian(model, CE, *data)
    clock = _FakeClock({m: (1.0 if m == timed_winner else 2.0)
                        for m in ("forward_over_reverse", "double_backward", "structured")})
    real = CurvatureEngine._apply_method

    def apply_method(self, method, idx, vs, k):
        clock.t += clock.cost[method]
        return real(self, method, idx, vs, k)

    monkeypatch.setattr(_autotune, "time", clock)                  # the tuner's clock
    monkeypatch.setattr(CurvatureEngine, "_apply_method", apply_method)
    H = hessian(model, SOFT_CE, data)                              # not deterministic: the clock decides
    for _ in range(5):
        assert rel(H.matmat(V), dense @ V) < 1e-10
    assert H.hvp_choice(3) == timed_winner and H.hvp_method is None
    Hd = hessian(model, SOFT_CE, data, deterministic=True)
    for _ in range(5):
        assert rel(Hd.matmat(V), dense @ V) < 1e-10
    assert Hd.hvp_choice(3) == Hd.hvp_method == "double_backward" and Hd.matmul_choice == "default"
    assert all(not t for t in Hd.hvp_timings.values())             # nothing was timed


def test_other_constructors_and_explicit_settings():
    model = ConvNet().double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)
    G = ggn(model, SOFT_CE, (x, y), deterministic=True)
    assert G.deterministic and G.hvp_method == "double_backward"
    ops = block_hessians(model, SOFT_CE, (x, y), deterministic=True)
    assert [o.hvp_method for o in ops] == ["double_backward"] * len(ops)
    V = torch.randn(ops[0].shape[0], 3, dtype=torch.float64)
    ops2 = block_hessians(model, SOFT_CE, (x, y), deterministic=True)
    assert torch.equal(ops[0].matmat(V), ops2[0].matmat(V))
    H = hessian(model, CE, (x, y), hvp="forward_over_reverse", deterministic=True)
    assert H.hvp_method == "forward_over_reverse"                 # an explicit method is kept
    assert hessian(model, CE, (x, y)).deterministic is False
    with pytest.raises(TypeError, match="expected deterministic a bool"):
        hessian(model, CE, (x, y), deterministic="yes")


@pytest.mark.parametrize("loser_cost,timed_winner,loser_timings", [
    (3.0, "forward_over_reverse", 1),      # clearly slower (> CLEAR_LOSS): timed once
    (1.2, "forward_over_reverse", 2),      # close: both timed AUTO_SAMPLES times
    (3.0, "double_backward", 2),           # the winner is timed second: the loser finishes first
])
def test_a_clear_loser_is_not_timed_again(monkeypatch, loser_cost, timed_winner, loser_timings):
    """A candidate whose timing is over CLEAR_LOSS times the best of a fully timed candidate is
    not timed again; the products stay exact and the choice is the faster one."""
    assert loser_cost > _autotune.CLEAR_LOSS or loser_timings == _autotune.AUTO_SAMPLES
    model = _mlp(torch.float64)
    data = _fc_data(dtype=torch.float64)
    V = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    dense = dense_hessian(model, CE, *data)
    clock = _FakeClock({m: (1.0 if m == timed_winner else loser_cost)
                        for m in ("forward_over_reverse", "double_backward")})
    real = CurvatureEngine._apply_method
    calls = []

    def apply_method(self, method, idx, vs, k):
        clock.t += clock.cost[method]
        calls.append(method)
        return real(self, method, idx, vs, k)

    monkeypatch.setattr(_autotune, "time", clock)
    monkeypatch.setattr(CurvatureEngine, "_apply_method", apply_method)
    H = hessian(model, SOFT_CE, data)
    for _ in range(6):
        assert rel(H.matmat(V), dense @ V) < 1e-10
    loser = "double_backward" if timed_winner == "forward_over_reverse" else "forward_over_reverse"
    t = H.hvp_timings[3]
    assert len(t[timed_winner]) == _autotune.AUTO_SAMPLES and len(t[loser]) == loser_timings
    assert H.hvp_choice(3) == timed_winner
    assert calls.count(loser) == loser_timings and calls[-1] == timed_winner
