"""Residual expansion (SCIENCE.md section 3): path orders, second-order remainder, GC, output norms.

Ground truth: linear branches (exact binomial expansion, explicit enumeration of the 2^L paths),
dense per-sample Jacobians by torch.func.jacrev in float64, the JVP of the whole stack by
torch.func.jvp, and the closed forms of linear models.
"""
from __future__ import annotations

import copy
import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn
from torch.func import jacrev, jvp

from resgeom_fast.analysis.expansion import (
    ExpansionResult,
    GCResult,
    PathExpansionResult,
    _path_coefficients,
    geometric_complexity,
    output_norm_vs_depth,
    path_expansion,
    plot_output_norms,
    plot_path_orders,
    remainder_scaling,
    second_order_expansion,
)
from resgeom_fast.models import ConvResNet, FCResNet, OrthogonalSkip, ResidualBlock
from resgeom_fast.operators import mark_residual_block

from tests.analysis._trained import digits_flat, trained_fc  # tests/analysis/_trained.py (lru-cached nets)

D64 = torch.float64


# -- small constructed nets ----------------------------------------------------------------------
class Stack(nn.Module):
    """x -> blocks in sequence -> head (a plain residual stack; the stem is the identity)."""

    def __init__(self, blocks: list[nn.Module], dim: int, classes: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def linear_stack(A: torch.Tensor, L: int, lam: float) -> Stack:
    """Blocks h + lam A h (ResidualBlock with an nn.Sequential(Linear) branch: the fast path)."""
    d = A.shape[0]
    blocks = []
    for _ in range(L):
        lin = nn.Linear(d, d, bias=False, dtype=A.dtype)
        with torch.no_grad():
            lin.weight.copy_(A)
        blocks.append(ResidualBlock(nn.Sequential(lin), nn.Identity(), scale=lam))
    return Stack(blocks, d).double()


class MarkedBlock(nn.Module):
    """Q h + lam F(h) with a user branch module, declared by mark_residual_block (generic path)."""

    def __init__(self, branch: nn.Module, skip: nn.Module, lam: float) -> None:
        super().__init__()
        self.f, self.q, self.lam = branch, skip, lam
        mark_residual_block(self, branch=self.f, skip=self.q, scale=lam)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.q(h) + self.lam * self.f(h)


class TanhBranch(nn.Module):
    def __init__(self, d: int, gen: torch.Generator) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(d, d, generator=gen, dtype=D64) / math.sqrt(d))
        self.b1 = nn.Parameter(0.3 * torch.randn(d, generator=gen, dtype=D64))
        self.w2 = nn.Parameter(torch.randn(d, d, generator=gen, dtype=D64) / math.sqrt(d))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(h @ self.w1.T + self.b1) @ self.w2.T


def tanh_stack(lam: float, L: int = 6, d: int = 8, seed: int = 0) -> Stack:
    gen = torch.Generator().manual_seed(seed)
    blocks = [MarkedBlock(TanhBranch(d, gen), nn.Identity(), lam) for _ in range(L)]
    return Stack(blocks, d).double()


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype))
            with torch.no_grad():
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return model.eval()


def small_fc(skip: str = "identity", depth: int = 4, width: int = 8, norm: str = "batch", seed: int = 0) -> FCResNet:
    return randomise_bn(FCResNet(10, width, depth, 4, skip=skip, norm=norm, seed=seed).double(), seed)


def xs(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=D64)


def dense_orders(model: FCResNet, x: torch.Tensor, v: torch.Tensor,
                 first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """c_L^(m) [N, D, L'+1] by dense jacrev Jacobians and explicit skips, from block ``first`` on."""
    _, hs = model(x, return_hidden=True)
    blocks = list(model.blocks)[first:]
    hs = hs[first:]
    n, d = v.shape
    L = len(blocks)
    c = torch.zeros(n, d, L + 1, dtype=D64)
    c[:, :, 0] = v
    for l, blk in enumerate(blocks):
        J = torch.stack([jacrev(blk.branch)(hs[l][b:b + 1].detach())[0, :, 0, :] for b in range(n)])  # [N, D, D]
        Qc = blk.skip(c.permute(0, 2, 1).reshape(n * (L + 1), d)).reshape(n, L + 1, d).permute(0, 2, 1)
        Jc = torch.einsum("nij,njm->nim", J, c) * blk.scale
        new = Qc.clone()
        new[:, :, 1:] += Jc[:, :, :-1]
        c = new
    return c, hs[0].detach()


# -- path expansion: exact cases -------------------------------------------------------------------
def test_linear_branches_exact_binomial():
    d, L, lam, n = 6, 7, 0.35, 5
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=D64) / math.sqrt(d)
    model = linear_stack(A, L, lam)
    v = xs(n, d, seed=4)
    res = path_expansion(model, xs(n, d), v=v)
    assert isinstance(res, PathExpansionResult)
    expected = torch.stack([(math.comb(L, m) * lam ** m * (torch.linalg.matrix_power(A, m) @ v.T).T).norm(dim=1)
                            for m in range(L + 1)], dim=-1)                                   # [N, L+1]
    torch.testing.assert_close(res.norms[:, 0, :], expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.norms_mean, expected.mean(0), rtol=1e-10, atol=1e-12)
    # (I + lam A)^L v = sum_m c_L^(m): the all-order column is the matrix power, the tail is 0
    full = (torch.linalg.matrix_power(torch.eye(d, dtype=D64) + lam * A, L) @ v.T).T
    orders, total, _, _ = _path_coefficients("t", model, xs(n, d), None, v=v, blocks=None, num_probes=1, seed=0)
    torch.testing.assert_close(total[:, :, 0], full, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(sum(orders)[:, :, 0], full, rtol=1e-11, atol=1e-12)
    assert res.tail_norm_mean < 1e-12 * res.total_norm_mean
    assert res.total_norm_mean == pytest.approx(float(full.norm(dim=1).mean()), rel=1e-12)
    # distribution and mean order from the same norms
    p = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(res.distribution, p.mean(0), rtol=1e-10, atol=1e-12)
    assert res.mean_order == pytest.approx(float((p * torch.arange(L + 1, dtype=D64)).sum(-1).mean()), rel=1e-10)
    # a shared probe [D] and a truncated expansion M = 3: same low orders, tail = the rest
    res3 = path_expansion(model, xs(n, d), 3, v=v[0])
    torch.testing.assert_close(res3.norms[:, 0, :], expected[:1, :4].expand(n, 4), rtol=1e-10, atol=1e-12)
    tail = (full[0] - sum(math.comb(L, m) * lam ** m * torch.linalg.matrix_power(A, m) @ v[0] for m in range(4)))
    assert res3.tail_norm_mean == pytest.approx(float(tail.norm()), rel=1e-9)


def test_enumerated_paths_orthogonal_skips_per_block_scales():
    """Linear branches A_l, skips Q_l, lam_l all different: c_L^(m) = sum over the C(L, m)
    subsets S of the product (l in S ? lam_l A_l : Q_l), l = L..1 (2^L paths in all)."""
    d, L, n = 5, 5, 3
    gen = torch.Generator().manual_seed(7)
    As = [torch.randn(d, d, generator=gen, dtype=D64) / math.sqrt(d) for _ in range(L)]
    lams = [0.3, 0.7, 1.1, 0.5, 0.9]
    blocks = []
    for l, (A, lam) in enumerate(zip(As, lams)):
        lin = nn.Linear(d, d, bias=False, dtype=D64)
        with torch.no_grad():
            lin.weight.copy_(A)
        # even blocks: OrthogonalSkip (applied as a module); odd: an affine skip (linearised by JVP)
        skip = OrthogonalSkip(d, generator=gen).double() if l % 2 == 0 else nn.Linear(d, d, dtype=D64)
        blocks.append(MarkedBlock(lin, skip, lam))
    model = Stack(blocks, d).double()
    Qs = [b.q.weight.detach() for b in blocks]
    v = xs(n, d, seed=8)
    c = torch.zeros(L + 1, n, d, dtype=D64)
    for S in itertools.product([0, 1], repeat=L):
        z = v.clone()
        for l in range(L):
            z = z @ (lams[l] * As[l]).T if S[l] else z @ Qs[l].T
        c[sum(S)] += z
    res = path_expansion(model, xs(n, d), v=v)
    torch.testing.assert_close(res.norms[:, 0, :], c.norm(dim=-1).T, rtol=1e-10, atol=1e-12)
    orders, total, _, _ = _path_coefficients("t", model, xs(n, d), 2, v=v, blocks=None, num_probes=1, seed=0)
    for m in range(3):
        torch.testing.assert_close(orders[m][:, :, 0], c[m], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total[:, :, 0], c.sum(0), rtol=1e-10, atol=1e-12)
    assert res.skips == ["OrthogonalSkip", "Linear"] * 2 + ["OrthogonalSkip"] and res.scales == pytest.approx(lams)


# -- path expansion on real FCResNets ------------------------------------------------------------
def _blocks_jvp(model, h0, v):
    """JVP of the whole block stack h_0 -> h_L at h0 along v (the ground truth of the order sum)."""
    def stack(h):
        for b in model.blocks:
            h = b(h)
        return h
    return jvp(stack, (h0,), (v,))[1]


@pytest.mark.parametrize("skip", ["identity", "orthogonal"])
def test_fcresnet_orders_match_dense_jacrev_and_jvp(skip):
    model = small_fc(skip, depth=4)
    x, n = xs(6, 10), 6
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(n, 8, generator=gen, dtype=D64)
    c_dense, h0 = dense_orders(model, x, v)
    orders, total, _, _ = _path_coefficients("t", model, x, None, v=v, blocks=None, num_probes=1, seed=0)
    got = torch.stack([o[:, :, 0] for o in orders], dim=-1)
    torch.testing.assert_close(got, c_dense, rtol=1e-10, atol=1e-12)
    # sum over orders = JVP of the whole stack d h_L / d h_0 v
    jv = _blocks_jvp(model, h0, v)
    torch.testing.assert_close(got.sum(-1), jv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(total[:, :, 0], jv, rtol=1e-10, atol=1e-12)


def test_convresnet_order_sum_is_full_jvp():
    model = ConvResNet(3, 4, 3, 5, seed=0).double()
    randomise_bn(model)
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(2), dtype=D64)
    orders, total, c0, _ = _path_coefficients("t", model, x, None, v=None, blocks=None, num_probes=2, seed=0)
    _, hs = model(x, return_hidden=True)
    for p in range(2):
        jv = _blocks_jvp(model, hs[0].detach(), c0[:, :, p].reshape(hs[0].shape))
        torch.testing.assert_close(sum(orders)[:, :, p], jv.reshape(3, -1), rtol=1e-10, atol=1e-12)
    res = path_expansion(model, x, v=torch.ones(4, 6, 6, dtype=D64))        # a shared probe [C, H, W]
    assert res.input_norm_mean == pytest.approx(12.0)


def test_trained_digits_net_order_sum_is_full_jvp():
    """A trained FCResNet (digits, BatchNorm, eval) in float64: orders sum to the stack's JVP."""
    model = copy.deepcopy(trained_fc()).double().eval()
    x = digits_flat().tensors("train")[0][:16].double()
    orders, total, c0, _ = _path_coefficients("t", model, x, None, v=None, blocks=None, num_probes=2, seed=3)
    _, hs = model(x, return_hidden=True)
    for p in range(2):
        jv = _blocks_jvp(model, hs[0].detach(), c0[:, :, p])
        torch.testing.assert_close(sum(o for o in orders if o is not None)[:, :, p], jv, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(total[:, :, p], jv, rtol=1e-9, atol=1e-10)
    res = path_expansion(model, x, num_probes=2, seed=3)
    assert res.norms.shape == (16, 2, 9)
    assert res.input_norm_mean == pytest.approx(1.0, rel=1e-12)
    assert res.tail_norm_mean < 1e-10 * res.total_norm_mean
    assert res.distribution.sum() == pytest.approx(1.0, rel=1e-12)
    assert 0.0 < res.mean_order < 8.0
    # the float32 model (the default in use) agrees with float64 to float32 accuracy
    res32 = path_expansion(trained_fc(), x.float(), num_probes=2, seed=3)
    torch.testing.assert_close(res32.norms_mean, res.norms_mean, rtol=1e-4, atol=1e-5)


def test_zero_skip_has_only_the_longest_path():
    model = small_fc("none", depth=4)
    res = path_expansion(model, xs(5, 10))
    assert torch.all(res.norms[..., :4] == 0)
    assert torch.all(res.norms[..., 4] > 0)
    assert res.mean_order == pytest.approx(4.0)
    torch.testing.assert_close(res.distribution, torch.tensor([0, 0, 0, 0, 1.0], dtype=D64))


def test_blocks_subset_starts_at_its_first_input():
    model = small_fc("identity", depth=5)
    x = xs(4, 10)
    v = xs(4, 8, seed=9)
    c_dense, _ = dense_orders(model, x, v, first=2)
    res = path_expansion(model, x, v=v, blocks=[2, 3, 4])
    torch.testing.assert_close(res.norms[:, 0, :], c_dense.norm(dim=1), rtol=1e-10, atol=1e-12)
    assert res.num_blocks == 3 and res.block_names == ["blocks.2", "blocks.3", "blocks.4"]


def test_probes_seeded_and_pooled():
    model = small_fc(depth=3)
    x = xs(4, 10)
    a = path_expansion(model, x, num_probes=3, seed=1)
    b = path_expansion(model, x, num_probes=3, seed=1)
    c = path_expansion(model, x, num_probes=3, seed=2)
    torch.testing.assert_close(a.norms, b.norms, rtol=0, atol=0)
    assert not torch.allclose(a.norms, c.norms)
    flat = a.norms.reshape(-1, 4)
    torch.testing.assert_close(a.norms_mean, flat.mean(0))
    torch.testing.assert_close(a.norms_std, flat.std(0, correction=0))
    assert a.num_probes == 3 and a.num_samples == 4


def test_result_json_summary_and_plot_match():
    model = small_fc(depth=4)
    res = path_expansion(model, xs(5, 10), num_probes=2)
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["orders"] == [0, 1, 2, 3, 4] and len(d["norms_mean"]) == 5
    s = res.summary()
    assert set(s) == {"mean_order", "mode_order", "tail_rel", "num_blocks"}
    assert all(isinstance(v, float) for v in s.values())
    fig = plot_path_orders(res)
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == d["orders"]
    assert list(map(float, line.get_ydata())) == pytest.approx(d["norms_mean"], rel=1e-12)


# -- path expansion: errors ------------------------------------------------------------------------
def test_path_expansion_errors():
    model = small_fc(depth=3)
    x = xs(4, 10)
    with pytest.raises(ValueError, match="path_expansion: expected max_order >= 0"):
        path_expansion(model, x, -1)
    with pytest.raises(ValueError, match=r"max_order in \[0, 3\]"):
        path_expansion(model, x, 4)
    with pytest.raises(TypeError, match="path_expansion: expected max_order an int"):
        path_expansion(model, x, 1.5)
    with pytest.raises(ValueError, match="path_expansion: expected num_probes >= 1"):
        path_expansion(model, x, num_probes=0)
    with pytest.raises(TypeError, match="path_expansion: expected x a torch.Tensor"):
        path_expansion(model, x.numpy())
    with pytest.raises(ValueError, match="path_expansion: expected x of dtype torch.float64"):
        path_expansion(model, x.float())
    with pytest.raises(ValueError, match="path_expansion: expected x with a non-empty batch"):
        path_expansion(model, x[:0])
    with pytest.raises(ValueError, match="path_expansion: expected v of shape"):
        path_expansion(model, x, v=torch.ones(4, 7, dtype=D64))
    with pytest.raises(ValueError, match="path_expansion: expected v of dtype"):
        path_expansion(model, x, v=torch.ones(4, 8))
    with pytest.raises(ValueError, match="expected num_probes 1 when v is given"):
        path_expansion(model, x, v=torch.ones(4, 8, dtype=D64), num_probes=2)
    with pytest.raises(ValueError, match="blocks must be consecutive"):
        path_expansion(model, x, blocks=[0, 2])


def test_path_expansion_rejects_hyper_nets():
    model = FCResNet(10, 8, 3, 4, hyper=True, seed=0).double().eval()
    with pytest.raises(ValueError, match="path_expansion: the model is a hyper-residual net"):
        path_expansion(model, xs(4, 10))


def test_post_activation_and_shape_change_allowed_second_order_refuses():
    """Was test_path_expansion_rejects_post_activation_and_shape_change: path_expansion now
    linearises post-activations and follows shape changes (issue 14); its sum over orders is the
    JVP of the composed blocks. The Taylor expansion in lam still refuses both, saying so."""
    d = 6
    post = Stack([ResidualBlock(nn.Sequential(nn.Linear(d, d)), nn.Identity(), 1.0, post=nn.ReLU())
                  for _ in range(2)], d).double()
    x, v = xs(3, d), xs(3, d, seed=5)
    orders, total, _, _ = _path_coefficients("t", post, x, None, v=v, blocks=None, num_probes=1, seed=0)
    jv = jvp(lambda h: post.blocks[1](post.blocks[0](h)), (x,), (v,))[1]
    torch.testing.assert_close(total[:, :, 0], jv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(o for o in orders if o is not None)[:, :, 0], jv, rtol=1e-12, atol=1e-12)
    assert path_expansion(post, x).posts == ["ReLU", "ReLU"]
    with pytest.raises(ValueError, match="second_order_expansion: block 'blocks.0' applies post = ReLU.*"
                                         "path_expansion linearises post-activations"):
        second_order_expansion(post, x)
    down = Stack([ResidualBlock(nn.Sequential(nn.Linear(d, 4)), nn.Linear(d, 4, bias=False)),
                  ResidualBlock(nn.Sequential(nn.Linear(4, 4)), nn.Identity())], 4).double()
    res = path_expansion(down, x, v=v)
    assert (res.in_shape, res.out_shape) == ([6], [4])
    jv = jvp(lambda h: down.blocks[1](down.blocks[0](h)), (x,), (v,))[1]
    assert res.total_norm_mean == pytest.approx(float(jv.detach().norm(dim=1).mean()), rel=1e-12)
    # only the equal-shape stage: fine
    res = path_expansion(down, x, blocks=[1])
    assert res.num_blocks == 1 and res.in_shape == res.out_shape == [4]


def test_path_expansion_rejects_non_chained_blocks():
    class Gap(Stack):
        def forward(self, x):
            h = self.blocks[0](x)
            h = 2.0 * h                      # something between the blocks
            return self.head(self.blocks[1](h))
    d = 5
    model = Gap([ResidualBlock(nn.Sequential(nn.Linear(d, d)), nn.Identity()) for _ in range(2)], d).double()
    with pytest.raises(ValueError, match="is not the input of block"):
        path_expansion(model, xs(3, d))
    with pytest.raises(ValueError, match=r"breaks between 'blocks.0' -> 'blocks.1'.*blocks=\[\[0\], \[1\]\]"):
        path_expansion(model, xs(3, d))


# -- second-order expansion ----------------------------------------------------------------------
def test_second_order_linear_branches_exact():
    d, L, lam, n = 6, 6, 0.2, 4
    A = torch.randn(d, d, generator=torch.Generator().manual_seed(11), dtype=D64) / math.sqrt(d)
    model = linear_stack(A, L, lam)
    h0 = xs(n, d)
    res = second_order_expansion(model, h0)
    assert isinstance(res, ExpansionResult)
    P = lambda m: (math.comb(L, m) * lam ** m * (torch.linalg.matrix_power(A, m) @ h0.T).T)
    hL = (torch.linalg.matrix_power(torch.eye(d, dtype=D64) + lam * A, L) @ h0.T).T
    torch.testing.assert_close(res.delta_norm, (hL - h0).norm(dim=1), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(res.first_term_norm, P(1).norm(dim=1), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(res.second_term_norm, P(2).norm(dim=1), rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(res.remainder1, sum(P(m) for m in range(2, L + 1)).norm(dim=1), rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(res.remainder2, sum(P(m) for m in range(3, L + 1)).norm(dim=1), rtol=1e-9, atol=1e-13)
    assert res.lam == pytest.approx(lam) and res.num_blocks == L
    json.dumps(res.to_dict(), allow_nan=False)
    assert set(res.summary()) >= {"lam", "remainder2_mean"}


def test_second_order_tanh_branches_against_dense_jacobians():
    lam, n = 0.4, 5
    model = tanh_stack(lam)
    h0 = xs(n, 8)
    Fs = [b.f for b in model.blocks]
    E2 = h0 + lam * sum(F(h0) for F in Fs)
    for j in range(len(Fs)):
        for i in range(j):
            for b in range(n):
                J = jacrev(Fs[j])(h0[b])
                E2[b] = E2[b] + lam ** 2 * J @ Fs[i](h0[b])
    with torch.no_grad():
        hL = h0
        for blk in model.blocks:
            hL = blk(hL)
    res = second_order_expansion(model, h0)
    torch.testing.assert_close(res.remainder2, (hL - E2).norm(dim=1), rtol=1e-10, atol=1e-12)


def test_remainder_scales_as_lam_cubed_tanh():
    x = xs(8, 8)
    lams = [1e-3, 3e-3, 1e-2, 3e-2]
    out = remainder_scaling(lambda lam: tanh_stack(lam), lams, x)
    # measured: slope 2.996 (second order), 1.994 (first order); 2.946 over [1e-2, 0.3]
    assert 2.9 <= out["slope"] <= 3.1
    assert 1.9 <= out["slope_first_order"] <= 2.1
    assert out["num_fit_points"] == 4 and out["lams"] == lams
    json.dumps(out, allow_nan=False)


def test_remainder_scales_as_lam_cubed_trained_relu_net():
    """The claim on bundled data: the trained digits FCResNet (BatchNorm, eval) rescaled to lam.

    ReLU branches are piecewise linear: while lam is small enough that no pre-activation along the
    stack changes sign, h_L is a polynomial in lam and the remainder is exactly O(lam^3). Measured
    on this net: 16 test digits keep their patterns up to lam = 1e-4 (slope 3.000); with 32 digits
    one pattern flips between 3e-5 and 1e-4 (slope over [1e-5, 1e-4]: 4.06; over [1e-5, 1e-3]:
    3.55), and below lam ~ 3e-6 the float64 rounding floor (~1e-15) flattens the fit.
    """
    base = copy.deepcopy(trained_fc()).double().eval()
    x = digits_flat().tensors("test")[0][:16].double()

    def make(lam):
        m = copy.deepcopy(base)
        for b in m.blocks:
            b.scale = lam
        return m
    out = remainder_scaling(make, [1e-5, 2e-5, 4e-5], x)
    assert 2.9 <= out["slope"] <= 3.1, out                 # measured 2.9996
    assert 1.95 <= out["slope_first_order"] <= 2.05, out   # measured 2.0000


def test_second_order_errors():
    with pytest.raises(ValueError, match="second_order_expansion: block 'blocks.0' has skip OrthogonalSkip"):
        second_order_expansion(small_fc("orthogonal"), xs(3, 10))
    with pytest.raises(ValueError, match="second_order_expansion: the model is a hyper-residual net"):
        second_order_expansion(FCResNet(10, 8, 3, 4, hyper=True).double(), xs(3, 10))
    with pytest.raises(ValueError, match="second_order_expansion: expected x of dtype"):
        second_order_expansion(small_fc(), xs(3, 10).float())
    with pytest.raises(ValueError, match="remainder_scaling: expected lams at least 2 distinct"):
        remainder_scaling(tanh_stack, [0.1, 0.1], xs(3, 8))
    with pytest.raises(ValueError, match="remainder_scaling: expected lams positive"):
        remainder_scaling(tanh_stack, [0.1, -0.1], xs(3, 8))
    with pytest.raises(TypeError, match="remainder_scaling: expected make_model a callable"):
        remainder_scaling(3, [0.1, 0.2], xs(3, 8))
    with pytest.raises(TypeError, match=r"remainder_scaling: expected make_model\(0.1\) to return an nn.Module"):
        remainder_scaling(lambda lam: None, [0.1, 0.2], xs(3, 8))


# -- geometric complexity ----------------------------------------------------------------------------
def test_gc_linear_model_is_frobenius_norm():
    gen = torch.Generator().manual_seed(0)
    for d_in, c in ((5, 3), (2, 6)):                  # jacrev, then jacfwd (input smaller than C)
        lin = nn.Linear(d_in, c).double()
        x = torch.randn(7, d_in, generator=gen, dtype=D64)
        res = geometric_complexity(lin, (x, torch.zeros(7)))
        assert isinstance(res, GCResult)
        w2 = float(lin.weight.detach().pow(2).sum())
        assert res.gc == pytest.approx(w2, rel=1e-12)
        assert res.std == pytest.approx(0.0, abs=1e-12)
        torch.testing.assert_close(res.per_class, lin.weight.detach().pow(2).sum(1), rtol=1e-12, atol=0)
        assert res.num_outputs == c and res.input_dim == d_in


def test_gc_against_dense_jacrev_streaming():
    model = small_fc(depth=3)
    model.train()                                   # GC is evaluated in eval mode; flags are restored
    x = xs(10, 10)
    y = torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        model.eval()
        Js = torch.stack([jacrev(lambda z: model(z[None])[0])(x[b]) for b in range(10)])    # [N, C, d]
        model.train()
    per = Js.pow(2).sum((1, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    res = geometric_complexity(model, loader, batch_size=3)
    assert model.training
    assert res.gc == pytest.approx(float(per.mean()), rel=1e-11)
    assert res.std == pytest.approx(float(per.std(correction=0)), rel=1e-9)
    torch.testing.assert_close(res.per_class, Js.pow(2).sum(2).mean(0), rtol=1e-11, atol=0)
    assert res.num_samples == 10 and res.min == pytest.approx(float(per.min()))
    assert geometric_complexity(model, (x, y)).gc == pytest.approx(res.gc, rel=1e-12)
    json.dumps(res.to_dict(), allow_nan=False)


def test_gc_errors():
    model = small_fc(depth=2)
    with pytest.raises(ValueError, match="geometric_complexity: expected batch_size >= 1"):
        geometric_complexity(model, (xs(3, 10), torch.zeros(3)), batch_size=0)
    with pytest.raises(ValueError, match="geometric_complexity: expected x of dtype torch.float64"):
        geometric_complexity(model, (xs(3, 10).float(), torch.zeros(3)))
    with pytest.raises(TypeError, match="geometric_complexity: expected model an nn.Module"):
        geometric_complexity(lambda z: z, (xs(3, 10), torch.zeros(3)))
    with pytest.raises(ValueError, match="geometric_complexity: expected data with at least one batch"):
        geometric_complexity(model, [])


# -- output norm against depth ---------------------------------------------------------------------
def test_output_norm_explodes_for_lam_one_and_stays_bounded_for_one_over_l():
    out = output_norm_vs_depth([8, 64], width=64, seed=0)
    m = out["mean"]
    # measured (width 64, 256 Gaussian inputs): lam=1: 66, 7e14; 1/sqrt(L): 2.4, 2.6; 1/L: 1.11, 1.015
    assert m["1"][1] > 1e10 and m["1"][1] > 1e6 * m["1"][0]
    assert 0.9 <= m["1/L"][1] <= 1.1 and 0.9 <= m["1/L"][0] <= 1.3
    assert 1.5 <= m["1/sqrt(L)"][1] <= 4.0
    assert m["1/L"][1] < m["1/sqrt(L)"][1] < m["1"][1]
    # RMS ratio against the mean-field prediction (1 + 2 lam^2)^(L/2)
    for lab in ("1/sqrt(L)", "1/L"):
        assert out["rms"][lab][1] == pytest.approx(out["mean_field"][lab][1], rel=0.1)
    assert abs(math.log10(out["rms"]["1"][1] / out["mean_field"]["1"][1])) < 1.0
    assert out["lams"]["1/L"] == pytest.approx([1 / 8, 1 / 64])
    d = json.loads(json.dumps(out, allow_nan=False))
    fig = plot_output_norms(d)
    for line, lab in zip(fig.axes[0].lines, d["scales"]):
        assert list(map(float, line.get_ydata())) == pytest.approx(d["mean"][lab], rel=1e-12)
        assert list(line.get_xdata()) == d["depths"]


def test_output_norm_errors():
    with pytest.raises(ValueError, match="output_norm_vs_depth: expected depths a non-empty"):
        output_norm_vs_depth([])
    with pytest.raises(ValueError, match="output_norm_vs_depth: expected depths entries >= 1"):
        output_norm_vs_depth([0])
    with pytest.raises(ValueError, match="output_norm_vs_depth: expected scales entries"):
        output_norm_vs_depth([2], scales=("2/L",))
    with pytest.raises(ValueError, match=r"output_norm_vs_depth: expected x a float64 CPU tensor \[N, 64\]"):
        output_norm_vs_depth([2], x=torch.zeros(3, 64))
