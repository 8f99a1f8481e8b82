"""Residual Alignment RA1-RA4: constructed cases with exact answers, dense float64 ground truth,
and the study's claim on digits."""
from __future__ import annotations

import functools
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from tests.analysis._trained import LinNet, digits_flat, one_thread, random_orthogonal, trained_fc  # noqa: E402
from resgeom_fast.analysis.alignment import (  # noqa: E402
    AlignmentResult,
    depth_scaling,
    diag_ratio,
    numerical_rank,
    plot_cross_alignment,
    plot_sigma1,
    plot_singular_values,
    plot_trajectories,
    residual_alignment,
    trajectory_metrics,
    trajectory_pca,
)
from resgeom_fast.models import ConvResNet, FCResNet, resnet18  # noqa: E402
from resgeom_fast.train import train  # noqa: E402

F64 = torch.float64


# -- constructed nets ---------------------------------------------------------------------------
def _from_svd(U: torch.Tensor, s: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    return U[:, : s.numel()] @ torch.diag(s) @ V[:, : s.numel()].T


# -- RA1: trajectory metrics on constructed trajectories ----------------------------------------
def test_straight_equispaced_trajectory():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 1, 7, generator=g, dtype=F64), torch.randn(4, 1, 7, generator=g, dtype=F64)
    traj = a + torch.arange(6, dtype=F64).reshape(1, 6, 1) * b                  # [4, 6, 7]
    m = trajectory_metrics(traj)
    torch.testing.assert_close(m["linearity"], torch.ones(4, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["equispacing"], torch.zeros(4, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(m["step_cosine"], torch.ones(4, dtype=F64), rtol=0, atol=1e-12)


def test_trajectory_metrics_known_values():
    pts = [
        [[0.0, 0.0], [1.0, 0.0], [4.0, 0.0]],  # straight, steps 1 and 3: equispacing std/mean = 1/2
        [[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]],  # back and forth: cosine -1, collinear
        [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]],  # right angle: centred scatter [[6,3],[3,6]]/9 -> 1/(1+1/3)
    ]
    m = trajectory_metrics(torch.tensor(pts, dtype=F64))
    torch.testing.assert_close(m["linearity"], torch.tensor([1.0, 1.0, 0.75], dtype=F64))
    torch.testing.assert_close(m["equispacing"], torch.tensor([0.5, 0.0, 0.0], dtype=F64))
    torch.testing.assert_close(m["step_cosine"], torch.tensor([1.0, -1.0, 0.0], dtype=F64))
    one = trajectory_metrics(torch.tensor([[[0.0, 0.0], [2.0, 1.0]]], dtype=F64))   # L = 1
    assert one["linearity"].item() == pytest.approx(1.0) and one["equispacing"].item() == 0.0
    assert math.isnan(one["step_cosine"].item())


@pytest.mark.parametrize("d", [3, 40])  # covariance route (N*(L+1) > D) and Gram route
def test_trajectory_pca_matches_dense_svd(d):
    g = torch.Generator().manual_seed(1)
    traj = torch.randn(5, 4, d, generator=g, dtype=F64) * torch.linspace(3, 0.5, d, dtype=F64)
    coords, explained = trajectory_pca(traj)
    X = traj.reshape(-1, d)
    Xc = X - X.mean(0)
    _, s, Vh = torch.linalg.svd(Xc, full_matrices=False)
    ref = Xc @ Vh[:2].T
    ref = ref * torch.sign(ref[ref.abs().argmax(0), torch.arange(2)])
    torch.testing.assert_close(coords.reshape(-1, 2), ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(explained, s[:2] ** 2 / (s ** 2).sum(), rtol=1e-9, atol=1e-12)


# -- RA3 / RA4 / RA2 on linear blocks of known SVD -----------------------------------------------
def test_known_rank_sigma_and_gap():
    D, r, L = 20, 3, 3
    mats, s_true = [], []
    for l in range(L):
        s = torch.tensor([2.0, 1.0, 0.5], dtype=F64) / (l + 1)
        mats.append(_from_svd(random_orthogonal(D, 10 + l), s, random_orthogonal(D, 20 + l)))
        s_true.append(s)
    net = LinNet(mats, num_classes=r).double()
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = residual_alignment(net, x, k=8)
    st = res.stages[0]
    assert res.num_classes == 3 and st.k == 8 and st.dim == D
    assert st.rank_min.tolist() == [r] * L and st.rank_max.tolist() == [r] * L
    assert st.rank_le_c.tolist() == [1.0] * L
    # the sketch (l = 18 < D) of a rank-3 matrix is rank-deficient: CholeskyQR leaves ~1e-9 errors
    torch.testing.assert_close(st.singular_values_mean[:, :r], torch.stack(s_true), rtol=1e-7, atol=1e-12)
    assert float(st.singular_values_mean[:, r:].abs().max()) < 1e-7
    assert float(st.gap_ratio_mean.abs().max()) < 1e-6                       # sigma_{C+1} / sigma_C, C = r
    torch.testing.assert_close(st.sigma1_mean, torch.tensor([2.0, 1.0, 2 / 3], dtype=F64), rtol=1e-7, atol=0)
    assert float(st.sigma1_std.max()) < 1e-7                                 # the same J at every sample
    assert st.depth_product == pytest.approx(L * (2.0 + 1.0 + 2 / 3) / 3, rel=1e-7)
    # numerical_rank helper with a threshold between sigma_2 and sigma_3
    S = torch.tensor([[1.0, 0.3, 0.02, 0.001]], dtype=F64)
    assert numerical_rank(S, 1e-2).tolist() == [3] and numerical_rank(S, 0.05).tolist() == [2]


def test_symmetric_shared_basis_is_perfectly_aligned():
    """A_l = Q diag(s_l) Q^T (PSD, one eigenbasis): u = v, A_ij = diag(s_j[:k]) exactly."""
    D, k, L = 12, 5, 4
    Q = random_orthogonal(D, 3)
    svals = [torch.linspace(3.0, 0.2, D, dtype=F64) * (1 + 0.3 * l) for l in range(L)]
    net = LinNet([_from_svd(Q, s, Q) for s in svals]).double()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(2), dtype=F64)
    st = residual_alignment(net, x, k=k).stages[0]
    torch.testing.assert_close(st.self_alignment_mean, torch.ones(L, dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(st.diag_ratio_mean, torch.ones(L, L, dtype=F64), rtol=0, atol=1e-10)
    assert st.diag_positive.min().item() == 1.0 and st.diag_ratio_offdiag == pytest.approx(1.0)
    for p, (i, j) in enumerate(st.cross_pairs):
        # randomized SVD (CholeskyQR3 orthonormalisation) is accurate to ~1e-8 here
        torch.testing.assert_close(st.cross_abs_mean[p], torch.diag(svals[j][:k]), rtol=0, atol=1e-6)
        torch.testing.assert_close(st.cross_diag_mean[p], svals[j][:k], rtol=0, atol=1e-6)


def test_antisymmetric_partner_gives_zero_cross_diagonal():
    """A_1 = Q S Q^T, A_2 = Q S' Q^T R with R a rotation by 90 degrees in each (2r, 2r+1) plane:
    u_{1,r}^T A_2 v_{1,r} = 0, so diag A_12 vanishes and diag_ratio_12 = 0."""
    D, k = 8, 4
    Q = random_orthogonal(D, 5)
    s1 = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.6, 0.4], dtype=F64)
    R = torch.zeros(D, D, dtype=F64)
    for a in range(0, D, 2):
        R[a, a + 1], R[a + 1, a] = -1.0, 1.0
    A1 = Q @ torch.diag(s1) @ Q.T
    A2 = Q @ torch.diag(torch.ones(D, dtype=F64)) @ R @ Q.T
    net = LinNet([A1, A2]).double()
    st = residual_alignment(net, torch.randn(2, D, generator=torch.Generator().manual_seed(0), dtype=F64),
                            k=k).stages[0]
    assert float(st.diag_ratio_mean[0, 1]) < 1e-12
    assert float(st.diag_ratio_mean[0, 0]) == pytest.approx(1.0)
    assert float(st.self_alignment_mean[0]) == pytest.approx(1.0)


def test_depth_scaling_constant_product():
    D, results = 10, []
    for L in (2, 4, 8):
        mats = [_from_svd(random_orthogonal(D, 40 + l), torch.tensor([1.0 / L, 0.5 / L], dtype=F64), random_orthogonal(D, 60 + l))
                for l in range(L)]
        net = LinNet(mats).double()
        results.append(residual_alignment(net, torch.randn(2, D, generator=torch.Generator().manual_seed(L),
                                                           dtype=F64), k=4))
    out = depth_scaling(results)
    assert out["depths"] == [2, 4, 8]
    assert out["products"] == pytest.approx([1.0, 1.0, 1.0], rel=1e-7)
    assert out["relative_spread"] == pytest.approx(0.0, abs=1e-7)
    assert out["slope"] == pytest.approx(-1.0, rel=1e-7)
    json.dumps(out, allow_nan=False)


# -- small real model against dense float64 ground truth ----------------------------------------
def _small_fc() -> FCResNet:
    """Width 10, 3 blocks, float64, random BatchNorm statistics; the first BatchNorm of every branch
    gets bias 2 so that its ReLUs are active and every J_l has distinct nonzero top singular values."""
    m = FCResNet(10, 10, 3, 4, norm="batch", seed=3).double().eval()
    g = torch.Generator().manual_seed(7)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            with torch.no_grad():
                mod.running_mean.copy_(0.3 * torch.randn(mod.running_mean.shape, generator=g, dtype=F64))
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=F64) + 0.5)
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g, dtype=F64))
    for blk in m.blocks:
        with torch.no_grad():
            blk.branch[1].bias.fill_(2.0)
    return m


@pytest.mark.parametrize("path", ["fast", "generic"])
def test_small_model_against_dense_jacobians(path):
    model = _small_fc()
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(4), dtype=F64)
    k = 4
    res = residual_alignment(model, x, k=k, path=path, oversample=10)  # k + p >= D = 10: exact sketch
    st = res.stages[0]
    with torch.no_grad():
        _, hs = model(x, return_hidden=True)
    L = model.num_blocks
    Js = []
    for l, blk in enumerate(model.blocks):
        f = lambda v, br=blk.branch: br(v.unsqueeze(0)).squeeze(0)  # noqa: E731
        Js.append(torch.stack([torch.func.jacrev(f)(hs[l][n]) for n in range(x.shape[0])]).detach())  # [N, D, D]
    U, S, V = [], [], []
    for J in Js:
        u, s, vh = torch.linalg.svd(J)
        assert float((s[..., : k + 1] / s[..., :1]).min()) > 1e-2          # well-defined top-k vectors
        U.append(u[..., :k]), S.append(s[..., :k]), V.append(vh[..., :k, :].transpose(-1, -2))
    S_all = torch.stack(S)                                                     # [L, N, k]
    torch.testing.assert_close(st.singular_values_mean, S_all.mean(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(st.sigma1_mean, S_all[..., 0].mean(1), rtol=1e-9, atol=1e-12)
    self_al = torch.stack([(U[l] * V[l]).sum(-2).abs().mean(-1).mean(0) for l in range(L)])
    torch.testing.assert_close(st.self_alignment_mean, self_al, rtol=1e-8, atol=1e-10)
    dr = torch.empty(L, L, dtype=F64)
    for i in range(L):
        for j in range(L):
            A = U[i].transpose(-1, -2) @ Js[j] @ V[i]                           # [N, k, k]
            dr[i, j] = (A.diagonal(dim1=-2, dim2=-1).square().sum(-1) / A.square().sum((-2, -1))).mean()
            if (i, j) in st.cross_pairs:
                p = st.cross_pairs.index((i, j))
                torch.testing.assert_close(st.cross_abs_mean[p], A.abs().mean(0), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(st.diag_ratio_mean, dr, rtol=1e-8, atol=1e-10)
    # trajectories are the model's own hidden states
    traj = torch.stack(hs, 1)
    ref = trajectory_metrics(traj)
    torch.testing.assert_close(st.linearity, ref["linearity"])
    torch.testing.assert_close(st.step_cosine, ref["step_cosine"])
    torch.testing.assert_close(st.pca, trajectory_pca(traj)[0])
    ranks = numerical_rank(S_all, 1e-2)
    torch.testing.assert_close(st.rank_mean, ranks.double().mean(1))
    # a selection of blocks: its trajectory is the input of the first and the outputs of each
    sub = residual_alignment(model, x, k=k, blocks=[1, 2], path=path).stages[0]
    assert sub.block_indices == [1, 2] and sub.block_names == ["blocks.1", "blocks.2"]
    torch.testing.assert_close(sub.linearity, trajectory_metrics(torch.stack(hs[1:], 1))["linearity"])
    torch.testing.assert_close(sub.singular_values_mean, S_all[1:].mean(1), rtol=1e-9, atol=1e-12)


def test_diag_ratio_helper():
    A = torch.tensor([[[2.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.0]]], dtype=F64)
    out = diag_ratio(A)
    assert out[:2].tolist() == [1.0, 0.5] and math.isnan(out[2].item())


# -- the claim on digits ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _wd_fc(skip: str) -> FCResNet:
    """FCResNet (width 64, depth 8, BatchNorm) trained on digits with strong weight decay:
    SGD lr 0.05, momentum 0.9, weight decay 5e-2, cosine schedule, 30 epochs (~8 s)."""
    model = FCResNet(64, 64, 8, 10, skip=skip, norm="batch", seed=0)
    with one_thread():
        train(model, digits_flat(), 30, lr=0.05, momentum=0.9, weight_decay=5e-2, schedule="cosine",
              batch_size=64, seed=0, progress=False)
    return model.eval()


def _test_inputs(n: int = 100):
    x, y = digits_flat().tensors("test")
    return x[:n], y[:n]


def test_digits_weight_decay_net_shows_ra_plain_net_does_not():
    """Measured (seed 0, 100 test digits, k = 15): with skips linearity 0.999, equispacing 0.03,
    step cosine 0.996, off-diagonal diag ratio 0.82 (random baseline 1/k = 0.067), self alignment
    (top C = 10 triplets) 0.77 (0.56 averaged over all k = 15 before issue 12), per-block mean
    rank 6.5-10.0 (96% of block-samples <= C); without skips linearity 0.90
    (one huge final step), equispacing 1.2, step cosine -0.4, diag ratio 0.067, self alignment
    0.10 (linearity 0.96 when trained on 2 threads) -- but its rank is low too (<= C): RA3 does not separate the two under weight decay."""
    x, y = _test_inputs()
    res = residual_alignment(_wd_fc("identity"), x, y=y)
    plain = residual_alignment(_wd_fc("none"), x, y=y)
    s, p = res.summary(), plain.summary()
    st = res.stages[0]
    assert res.k == 15 and st.num_blocks == 8
    # RA1
    assert s["linearity"] > 0.99 and p["linearity"] < 0.98   # plain: 0.90 (1 thread), 0.96 (2 threads)
    assert s["equispacing"] < 0.15 and p["equispacing"] > 0.5
    assert s["step_cosine"] > 0.95 and p["step_cosine"] < 0.0
    # RA2: strong cross alignment vs the random baseline 1/k
    assert s["diag_ratio_offdiag"] > 0.6 > 5 / res.k
    assert p["diag_ratio_offdiag"] < 1.5 / plain.k
    assert s["self_alignment"] > 0.7 and p["self_alignment"] < 0.2   # top-C triplets (0.56 over all k before)
    assert s["diag_positive_offdiag"] > 0.75 and p["diag_positive_offdiag"] < 0.6
    # RA3: rank <= C for most blocks
    assert s["rank_le_c_fraction"] > 0.85
    assert int((st.rank_mean <= 10.0 + 1e-9).sum()) >= 7
    assert float(st.gap_ratio_mean[1:].mean()) < 0.5
    # RA4: sigma_1 decreases with depth after the first block
    assert bool((st.sigma1_mean[1:-1] > st.sigma1_mean[2:]).all())


def test_digits_default_fixture_ra1_gap():
    """trained_fc() (15 epochs, no weight decay) shows only part of RA1. Measured: linearity 0.67 vs
    0.21 without skips, step cosine 0.08 vs -0.51; cross alignment stays at the random baseline
    (0.07 vs 1/k = 0.067) and ranks are full (15) in both: RA2/RA3 need weight decay here."""
    x, y = _test_inputs()
    s = residual_alignment(trained_fc(), x, y=y).summary()
    p = residual_alignment(trained_fc(skip="none"), x, y=y).summary()
    assert s["linearity"] > 0.55 and p["linearity"] < 0.35 and s["linearity"] - p["linearity"] > 0.3
    assert s["step_cosine"] - p["step_cosine"] > 0.4
    assert s["diag_ratio_offdiag"] < 0.1
    # ranks reach k = 15 (all computed singular values above tau): reported as capped, not as 15 (issue 12)
    assert s["max_numerical_rank"] is None and s["max_numerical_rank_capped"] is True
    assert s["max_numerical_rank_lower_bound"] > 10 and "capped at k = 15" in s["max_numerical_rank_reason"]


# -- staged nets, conv nets, result export, plots -----------------------------------------------
def test_staged_resnet_needs_per_stage():
    model = resnet18(num_classes=10, cifar_stem=True, base_width=8).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"equal widths across blocks.*per_stage=True"):
        residual_alignment(model, x)
    res = residual_alignment(model, x, per_stage=True)
    assert [st.block_indices for st in res.stages] == [[0, 1], [3], [5], [7]]
    assert [st.dim for st in res.stages] == [8 * 8 * 8, 16 * 4 * 4, 32 * 2 * 2, 64]
    assert [b["index"] for b in res.skipped_blocks] == [2, 4, 6]
    assert res.k == 15 and res.stages[0].pca.shape == (2, 3, 2)
    assert math.isnan(res.stages[1].diag_ratio_offdiag)        # one-block stage: no pair
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert len(d["stages"]) == 4 and d["stages"][1]["ra1"]["step_cosine_mean"] is None
    with pytest.raises(ValueError, match=r"expected k in \[1, 64\].*block dimension D = 64"):
        residual_alignment(model, x, k=65, per_stage=True)


def test_conv_type1_flattened_and_plots():
    model = ConvResNet(1, 3, 3, 5, seed=0).eval()
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    res = residual_alignment(model, x, k=6, y=y)
    st = res.stages[0]
    assert st.dim == 48 and st.pca.shape == (4, 4, 2) and st.singular_values_mean.shape == (3, 6)
    assert st.gap_ratio_mean is not None and st.diag_ratio_mean.shape == (3, 3)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["labels"] == [0, 1, 2, 1]
    s0 = d["stages"][0]
    fig = plot_sigma1(res)
    ys = fig.axes[0].lines[0].get_ydata()
    assert list(ys) == pytest.approx(s0["ra4"]["sigma1_mean"])
    fig = plot_singular_values(res)
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx(s0["ra3"]["singular_values_mean"][0])
    fig = plot_trajectories(res)
    assert fig.axes[0].lines[0].get_xydata().ravel().tolist() == pytest.approx(
        [c for pt in s0["ra1"]["pca"][0] for c in pt])
    fig = plot_cross_alignment(res)
    assert len([a for a in fig.axes if a.images]) == len(st.cross_pairs)
    assert fig.axes[0].images[0].get_array().ravel().tolist() == pytest.approx(
        [v for row in s0["ra2"]["cross_abs_mean"][0] for v in row])
    fig = plot_cross_alignment(res, pairs=[st.cross_pairs[1]])
    import matplotlib.pyplot as plt
    plt.close("all")


# -- input checks -------------------------------------------------------------------------------
def _fc_small():
    return FCResNet(6, 8, 2, 3, seed=0).eval()


_X = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(k=9), ValueError, r"expected k in \[1, 8\].*block dimension D = 8"),
    (dict(k=0), ValueError, r"expected k in \[1, 8\]"),
    (dict(x=_X.double()), ValueError, r"expected x of dtype torch.float32"),
    (dict(x=torch.empty(3, 6, device="meta")), ValueError, r"expected x on the model's device cpu"),
    (dict(x=_X[:0]), ValueError, r"expected x with a non-empty batch"),
    (dict(x=[[0.0] * 6]), TypeError, r"expected x a torch.Tensor"),
    (dict(y=torch.zeros(2, dtype=torch.long)), ValueError, r"expected y integer class labels of shape \[3\]"),
    (dict(y=torch.zeros(3)), ValueError, r"expected y integer class labels"),
    (dict(per_stage=1), TypeError, r"expected per_stage a bool"),
    (dict(tau=0.0), ValueError, r"expected tau > 0"),
    (dict(oversample=-1), ValueError, r"expected oversample >= 0"),
    (dict(power_iters=1.5), TypeError, r"expected power_iters an int"),
    (dict(path="dense"), ValueError, r"expected path one of"),
    (dict(num_classes=0), ValueError, r"expected num_classes >= 1"),
    (dict(chunk_size=0), ValueError, r"expected chunk_size >= 1"),
])
def test_input_checks(kwargs, exc, match):
    kwargs = dict(kwargs)
    x = kwargs.pop("x", _X)
    with pytest.raises(exc, match="residual_alignment: " + match):
        residual_alignment(_fc_small(), x, **kwargs)


def test_no_class_count_refused():
    net = LinNet([torch.eye(4, dtype=F64)]).double()
    del net.head
    net.forward = lambda x: net.blocks[0](x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="residual_alignment: cannot infer the number of classes C"):
        residual_alignment(net, torch.randn(2, 4, dtype=F64))
    # labels never give C (issue 12: a batch need not contain every class); the old code said C = 3 here
    with pytest.raises(ValueError, match="residual_alignment: cannot infer the number of classes C"):
        residual_alignment(net, torch.randn(2, 4, dtype=F64), y=torch.tensor([0, 2]))
    assert residual_alignment(net, torch.randn(2, 4, dtype=F64), y=torch.tensor([0, 2]), num_classes=5).num_classes == 5


def test_non_finite_hidden_states_refused():
    model = _fc_small()
    with torch.no_grad():
        model.blocks[0].branch[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="residual_alignment: .*non-finite"):
        residual_alignment(model, _X)


def test_helper_and_plot_checks():
    with pytest.raises(ValueError, match=r"trajectory_metrics: expected traj of shape"):
        trajectory_metrics(torch.zeros(2, 1, 3))
    with pytest.raises(ValueError, match="depth_scaling: expected results a non-empty sequence"):
        depth_scaling([])
    res = residual_alignment(_fc_small(), _X)
    with pytest.raises(TypeError, match=r"depth_scaling: expected results\[1\] an AlignmentResult"):
        depth_scaling([res, "x"])
    with pytest.raises(ValueError, match=r"plot_trajectories: expected stage in \[0, 0\]"):
        plot_trajectories(res, stage=1)
    with pytest.raises(ValueError, match="plot_cross_alignment: expected pairs a non-empty subset"):
        plot_cross_alignment(res, pairs=[(5, 5)])
    assert isinstance(res, AlignmentResult)
