"""LeakyResNet (SCIENCE.md section 4) and BiasReg."""

import math

import pytest
import torch
from torch import nn

from resgeom_fast.models import BiasReg, FCResNet, LeakyResNet, ResidualBlock, relu_biases, step_sizes


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_forward_matches_recursion():
    m = LeakyResNet(3, 5, 4, 2, leak=1.5, steps="irregular", seed=2).double()
    x = torch.randn(7, 3, generator=_gen(), dtype=torch.float64)
    a = torch.cat([x, torch.zeros(7, 2, dtype=torch.float64)], dim=1)  # zero-padding embedding
    expected = [a]
    for rho, W in zip(m.rho.tolist(), m.weights):
        sig = torch.cat([torch.relu(a), torch.ones(7, 1, dtype=torch.float64)], dim=1)
        a = (1 - rho * 1.5) * a + rho * sig @ W.T
        expected.append(a)
    y, hs = m(x, return_hidden=True)
    assert len(hs) == 5
    for h, e in zip(hs, expected):
        torch.testing.assert_close(h, e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, a[:, :2])
    assert all(isinstance(b, ResidualBlock) and b.resgeom_block for b in m.blocks)
    torch.testing.assert_close(LeakyResNet.sigma(x), torch.cat([torch.relu(x), torch.ones(7, 1, dtype=x.dtype)], 1))


def test_step_schemes():
    eq = step_sizes(20, "equidistant")
    torch.testing.assert_close(eq, torch.full((20,), 0.05, dtype=torch.float64))
    ir = step_sizes(20, "irregular", irregular_a=2.0)
    l = torch.arange(1, 21, dtype=torch.float64)
    raw = (1 + 2.0 * (0.25 - (l / 20 - 0.5).abs())) / 20
    torch.testing.assert_close(ir, raw / raw.sum())
    assert ir.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert ir[9] > ir[0]  # irregular: larger steps in the middle
    torch.testing.assert_close(step_sizes(20, "adaptive"), eq)


def test_regularization_and_loss_formula():
    m = LeakyResNet(3, 4, 3, 3, leak=2.0, lam=0.1, steps="irregular").double()
    expected = 0.1 / (2 * 2.0) * sum(r * W.pow(2).sum() for r, W in zip(m.rho.tolist(), m.weights))
    torch.testing.assert_close(m.regularization(), expected)
    x = torch.randn(6, 3, generator=_gen(), dtype=torch.float64)
    y = torch.randn(6, 3, generator=_gen(1), dtype=torch.float64)
    torch.testing.assert_close(m.loss(x, y), (y - m(x)).pow(2).sum() / 6 + expected)


def test_adaptive_update_formula_and_constraints():
    m = LeakyResNet(4, 6, 5, 4, leak=3.0, steps="adaptive", seed=1).double()
    x = torch.randn(20, 4, generator=_gen(), dtype=torch.float64)
    _, hs = m(x, return_hidden=True)
    rho = m.rho.clone()
    c = torch.stack([(hs[l] - hs[l - 1]).norm() / (rho[l - 1] * hs[l].norm()) for l in range(1, 6)])
    expected = (1 / c) / (1 / c).sum()
    new = m.adapt_steps(x)
    assert (expected * 3.0).max() < 0.95  # no capping in this case
    torch.testing.assert_close(new, expected)
    assert [b.scale for b in m.blocks] == pytest.approx(new.tolist())
    assert [b.skip.factor for b in m.blocks] == pytest.approx((1 - 3.0 * new).tolist())


def test_adaptive_cap_keeps_sum_one_and_rho_lt_below_one():
    m = LeakyResNet(4, 6, 4, 4, leak=3.5, steps="adaptive", seed=0)
    x = torch.randn(20, 4, generator=_gen())
    with torch.no_grad():  # make layer 1 almost still so it would get a huge step
        m.weights[0].mul_(1e-4)
    for _ in range(3):
        rho = m.adapt_steps(x)
        assert rho.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (rho * 3.5).max().item() <= 0.95 + 1e-6
        assert (rho > 0).all()


def test_state_dict_roundtrip_resyncs_blocks():
    a = LeakyResNet(4, 6, 5, 4, leak=1.0, steps="adaptive", seed=1)
    a.adapt_steps(torch.randn(10, 4, generator=_gen()))
    b = LeakyResNet(4, 6, 5, 4, leak=1.0, steps="adaptive", seed=2)
    b.load_state_dict(a.state_dict())
    assert [blk.scale for blk in b.blocks] == pytest.approx(a.rho.tolist())
    x = torch.randn(3, 4)
    torch.testing.assert_close(a(x), b(x))


def test_leaky_errors():
    with pytest.raises(ValueError, match=r"steps: expected one of \['equidistant', 'irregular', 'adaptive'\]"):
        LeakyResNet(3, 4, 5, 3, 1.0, steps="random")
    with pytest.raises(ValueError, match=r"leak: expected max_l rho_l \* leak < 1"):
        LeakyResNet(3, 4, 5, 3, leak=5.0)
    with pytest.raises(ValueError, match=r"in_dim: expected <= width"):
        LeakyResNet(8, 4, 5, 3, 1.0)
    with pytest.raises(ValueError, match=r"needs leak > 0"):
        LeakyResNet(3, 4, 5, 3, 0.0, lam=0.1)
    m = LeakyResNet(3, 4, 5, 3, 1.0)
    with pytest.raises(ValueError, match=r"rho: expected positive steps summing to 1"):
        m.set_rho(torch.full((5,), 0.3))


def test_biasreg_value_and_selection():
    m = FCResNet(3, 4, 2, 2, norm="none")
    biases = relu_biases(m)
    assert len(biases) == 3  # stem + one per branch
    assert biases[0] is m.stem[1].bias and biases[1] is m.blocks[0].branch[0].bias
    with torch.no_grad():
        for i, b in enumerate(biases):
            b.fill_(float(i))
    reg = BiasReg(beta=0.5, b0=0.25)
    expected = 0.5 * sum(4 * (i - 0.25) ** 2 for i in range(3))
    assert reg(m).item() == pytest.approx(expected)
    bn = FCResNet(3, 4, 2, 2, norm="batch")
    assert relu_biases(bn)[1] is bn.blocks[0].branch[1].bias  # BN shift feeds the ReLU
    with pytest.raises(ValueError, match=r"b0: expected a float > 0"):
        BiasReg(b0=0.0)
    assert math.isfinite(BiasReg()(bn).item())
    assert isinstance(BiasReg(), nn.Module)


def test_with_leak_keeps_weights_and_steps_and_rederives_skips():
    a = LeakyResNet(3, 5, 6, 2, leak=1.0, steps="irregular", lam=0.01, seed=3).double()
    b = a.with_leak(3.0)
    assert isinstance(b, LeakyResNet) and b is not a
    assert b.leak == 3.0 and a.leak == 1.0  # the original is untouched
    assert (b.in_dim, b.width, b.depth, b.out_dim, b.steps, b.lam) == (3, 5, 6, 2, "irregular", 0.01)
    torch.testing.assert_close(b.rho, a.rho, rtol=0, atol=0)
    for wa, wb in zip(a.weights, b.weights):
        torch.testing.assert_close(wb, wa, rtol=0, atol=0)
        assert wb.data_ptr() != wa.data_ptr()  # copies, not shared
    assert [blk.skip.factor for blk in b.blocks] == pytest.approx([1 - r * 3.0 for r in a.rho.tolist()], abs=1e-15)
    assert [blk.scale for blk in b.blocks] == pytest.approx(a.rho.tolist(), abs=1e-15)
    assert b.weights[0].dtype == torch.float64
    # forward equals a freshly built net with leak 3 (other seed) given the same weights
    fresh = LeakyResNet(3, 5, 6, 2, leak=3.0, steps="irregular", lam=0.01, seed=9).double()
    with torch.no_grad():
        for wf, wa in zip(fresh.weights, a.weights):
            wf.copy_(wa)
    x = torch.randn(7, 3, generator=_gen(), dtype=torch.float64)
    torch.testing.assert_close(b(x), fresh(x), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(b.regularization(), fresh.regularization(), rtol=1e-13, atol=0)
    assert not torch.allclose(b(x), a(x))  # the leak matters
    with torch.no_grad():
        b.weights[0].add_(1.0)
    assert not torch.equal(a.weights[0], b.weights[0])


def test_with_leak_carries_adapted_steps_and_mode():
    a = LeakyResNet(4, 6, 5, 4, leak=1.0, steps="adaptive", seed=1).double().eval()
    a.adapt_steps(torch.randn(10, 4, generator=_gen(), dtype=torch.float64))
    assert not torch.allclose(a.rho, torch.full((5,), 0.2, dtype=torch.float64))
    b = a.with_leak(2.0)
    torch.testing.assert_close(b.rho, a.rho, rtol=0, atol=0)
    assert [blk.skip.factor for blk in b.blocks] == pytest.approx([1 - 2.0 * r for r in a.rho.tolist()], abs=1e-15)
    assert not b.training


def test_with_leak_errors():
    m = LeakyResNet(3, 4, 5, 3, 1.0, lam=0.1)
    with pytest.raises(ValueError, match=r"with_leak: expected max_l rho_l \* leak < 1"):
        m.with_leak(5.0)
    with pytest.raises(ValueError, match=r"with_leak: expected leak a finite float >= 0"):
        m.with_leak(float("nan"))
    with pytest.raises(ValueError, match=r"with_leak: expected leak a finite float >= 0"):
        m.with_leak(-1.0)
    with pytest.raises(ValueError, match=r"needs leak > 0"):
        m.with_leak(0.0)
