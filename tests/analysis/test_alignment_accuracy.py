"""residual_alignment after issue 12: adaptive randomized SVD by default with the accuracy
recorded, capped ranks reported as such, self alignment independent of k, one-block stages
without trivially perfect RA1 values, C from the classifier, RA4 with and without the first
block, the deterministic flag. Ground truth: dense float64 SVDs of jacrev Jacobians and
constructed linear nets."""
from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from torch import nn

from tests.analysis._trained import LinBlock, LinNet, one_thread, random_orthogonal
from resgeom_fast.analysis.alignment import depth_scaling, diag_ratio, residual_alignment
from resgeom_fast.data import digits
from resgeom_fast.models import ConvResNet, resnet18
from resgeom_fast.operators import residual_jacobians

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small problems: one thread is faster than contended many (restored after the module)."""
    with one_thread():
        yield


# -- a tiny conv ResNet with dense ground truth ----------------------------------------------------
@functools.lru_cache(maxsize=None)
def _conv():
    """ConvResNet(1, 8, 3, 10) (untrained, eval, float32) on 4 test digits; per block the dense
    Jacobians (jacrev on the branch, [N, 512, 512]) and their float64 SVDs."""
    model = ConvResNet(1, 8, 3, 10, seed=0).eval()
    x, y = digits(seed=0, image=True).tensors("test")
    x, y = x[:4], y[:4]
    dense = []
    for J in residual_jacobians(model, x):
        f = lambda v, br=J.info.branch: br(v.unsqueeze(0)).squeeze(0)  # noqa: E731
        D = J.shape[0]
        Jd = torch.stack([torch.func.jacrev(f)(J.h[n]).reshape(D, D) for n in range(x.shape[0])]).detach().double()
        U, S, Vh = torch.linalg.svd(Jd)
        dense.append((Jd, U, S, Vh.transpose(-1, -2)))
    return model, x, y, dense


def test_default_is_adaptive_and_accurate_against_dense_svd():
    """Measured (k = 15): the default run needs 20-30 power iterations per block; singular values
    agree with the dense SVD to < 1e-5 relative and the diag ratios to < 1e-3; at the old default
    power_iters=2, sigma_1..15 are up to 7% low and the result now says so."""
    model, x, y, dense = _conv()
    k = 15
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # converged: no warning
        res = residual_alignment(model, x, y=y)
    st = res.stages[0]
    assert res.k == k and res.power_iters == "auto" and res.tol == 1e-3
    acc = res.accuracy()
    assert acc["all_converged"] and acc["adaptive"] and acc["max_rel_error_bound"] <= 1e-3
    assert min(st.svd_iterations) > 2 and st.svd_converged.tolist() == [1.0] * 3
    s = res.summary()
    assert s["svd_converged"] is True and s["svd_max_rel_error_bound"] <= 1e-3
    S_true = torch.stack([d[2][:, :k] for d in dense])                            # [L, N, k]
    rel = (st.singular_values_mean - S_true.mean(1)).abs() / S_true.mean(1)
    assert float(rel.max()) <= 1e-3
    # cross alignment from the dense top-k vectors
    L = len(dense)
    dr = torch.empty(L, L, dtype=F64)
    for i in range(L):
        Ui, Vi = dense[i][1][..., :k], dense[i][3][..., :k]
        for j in range(L):
            dr[i, j] = diag_ratio(Ui.transpose(-1, -2) @ dense[j][0] @ Vi).mean()
    assert float((st.diag_ratio_mean - dr).abs().max()) < 1e-2
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["accuracy"]["all_converged"] is True and d["settings"]["power_iters"] == "auto"
    assert d["stages"][0]["svd"]["iterations"] == st.svd_iterations

    with pytest.warns(RuntimeWarning, match=r"residual_alignment: the randomized SVD did not reach tol=0.001 in 2 "
                                            r"fixed power iterations"):
        old = residual_alignment(model, x, y=y, power_iters=2)
    assert old.power_iters == 2 and not old.accuracy()["all_converged"]
    assert old.summary()["svd_converged"] is False and old.summary()["svd_max_rel_error_bound"] > 1e-2
    rel_old = (old.stages[0].singular_values_mean - S_true.mean(1)).abs() / S_true.mean(1)
    assert float(rel_old.max()) > 1e-2                                          # the flag is right
    # the reported bound covers the true error of the fixed-iteration run (mean over samples of s_r)
    assert float(rel_old.max()) <= old.accuracy()["max_rel_error_bound"]


def test_adaptive_cap_is_reported():
    model, x, y, _ = _conv()
    with pytest.warns(RuntimeWarning, match=r"max_iters=1 adaptive iterations"):
        res = residual_alignment(model, x, y=y, max_iters=1)
    assert res.stages[0].svd_iterations == [1, 1, 1] and not res.accuracy()["all_converged"]


def test_rank_capped_at_k_is_not_a_value():
    """The conv Jacobians have numerical rank >> 15 (dense: > 100): at k = 15 every rank reaches
    k. The old summary said max_numerical_rank 15.0; now None, capped, lower bound 15."""
    model, x, y, dense = _conv()
    true_rank = torch.stack([(d[2] > 1e-2 * d[2][:, :1]).sum(-1) for d in dense])
    assert int(true_rank.min()) > 15
    res = residual_alignment(model, x, k=15, y=y)
    st, s = res.stages[0], res.summary()
    assert s["max_numerical_rank"] is None and s["max_numerical_rank_capped"] is True
    assert st.rank_cap == 15 and st.rank_capped.tolist() == [1.0, 1.0, 1.0]
    assert s["max_numerical_rank_lower_bound"] == 15.0 and "capped at k = 15" in s["max_numerical_rank_reason"]
    assert s["rank_le_c_fraction"] == 0.0     # k > C: rank >= 15 > 10 = C is decided
    d = res.to_dict()["stages"][0]
    assert d["summary"]["max_numerical_rank"] is None and "capped at k = 15" in d["ra3"]["rank_note"]
    # k <= C: a capped rank may or may not be <= C
    s8 = residual_alignment(model, x, k=8, y=y).summary()
    assert s8["rank_le_c_fraction"] is None and "capped at k = 8 <= C = 10" in s8["rank_le_c_fraction_reason"]


def test_rank_below_k_and_k_equal_d_are_values():
    D, L = 12, 2
    mats = [random_orthogonal(D, 1 + l)[:, :3] @ torch.diag(torch.tensor([2.0, 1.0, 0.5], dtype=F64)) @ random_orthogonal(D, 7 + l)[:, :3].T
            for l in range(L)]
    net = LinNet(mats, num_classes=3).double()
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = residual_alignment(net, x, k=6).summary()
    assert s["max_numerical_rank"] == 3.0 and s["max_numerical_rank_capped"] is False
    assert "max_numerical_rank_reason" not in s
    full = [torch.diag(torch.linspace(2.0, 1.0, D, dtype=F64)) for _ in range(L)]   # rank D
    s = residual_alignment(LinNet(full).double(), x, k=D).summary()              # k = D: exact, not capped
    assert s["max_numerical_rank"] == float(D) and s["max_numerical_rank_capped"] is False


def test_self_alignment_uses_top_c_and_does_not_depend_on_k():
    """A_l = Q diag(s) P^T with P = Q on the first C = 3 columns (u_r = v_r: |u^T v| = 1) and
    unrelated trailing columns (|u^T v| ~ 0.2): self alignment is 1 at k = C and k = C + 5. The
    old code averaged over all k: 1 at k = 3, ~0.5 at k = 8."""
    D, C = 16, 3
    Q, R = random_orthogonal(D, 11), random_orthogonal(D, 12)
    P = torch.cat([Q[:, :C], R[:, C:]], 1)
    P = torch.linalg.qr(P)[0] * torch.sign(torch.diagonal(torch.linalg.qr(P)[1]))   # orthonormal, first C = Q's
    torch.testing.assert_close(P[:, :C], Q[:, :C])
    s = torch.linspace(4.0, 1.0, D, dtype=F64)
    A = Q @ torch.diag(s) @ P.T
    net = LinNet([A, 0.5 * A], num_classes=C).double()
    x = torch.randn(2, D, generator=torch.Generator().manual_seed(1), dtype=F64)
    for k in (C + 5, C):
        st = residual_alignment(net, x, k=k, power_iters=20).stages[0]
        torch.testing.assert_close(st.self_alignment_mean, torch.ones(2, dtype=F64), rtol=0, atol=1e-6)
        assert st.self_alignment_r == C
        prof = (Q[:, :k] * P[:, :k]).sum(0).abs()                                 # exact |u_r^T v_r|
        torch.testing.assert_close(st.self_alignment_per_r, prof.expand(2, k), rtol=0, atol=1e-6)
        if k > C:
            assert float(prof.mean()) < 0.8     # what the old reading (mean over all k) would give


def test_one_block_stages_leave_trajectory_metrics_undefined():
    """resnet18 (base width 8): stage 0 has 2 shape-preserving blocks, stages 1-3 one each. Old
    headline linearity 0.925 (stage 0: 0.70, three trivial 1.0); now 0.70 with a reason."""
    model = resnet18(num_classes=10, cifar_stem=True, base_width=8).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    res = residual_alignment(model, x, per_stage=True, k=6)
    per = [st.summary() for st in res.stages]
    assert [st.num_blocks for st in res.stages] == [2, 1, 1, 1]
    for p in per[1:]:
        for key in ("linearity", "equispacing", "step_cosine", "diag_ratio_offdiag", "diag_positive_offdiag",
                    "depth_product_excl_first", "first_block_ratio"):
            assert p[key] is None and p[f"{key}_reason"].startswith("one block")
        assert p["self_alignment"] is not None and p["depth_product"] > 0       # defined per block
    s = res.summary()
    assert s["linearity"] == per[0]["linearity"] and s["equispacing"] == per[0]["equispacing"]
    assert s["linearity"] < 0.99                                                 # not averaged with trivial 1s
    assert "mean over stages [0]; stages [1, 2, 3] left out (one block" in s["linearity_reason"]
    assert s["self_alignment"] == pytest.approx(sum(p["self_alignment"] for p in per) / 4)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["stages"][1]["ra1"]["linearity"] is None and d["stages"][1]["ra1"]["linearity_mean"] is None
    assert d["stages"][1]["ra1"]["undefined_reason"].startswith("one block")
    assert d["stages"][1]["ra1"]["pca"] is not None and d["stages"][0]["ra1"]["linearity_mean"] is not None
    assert set(d["stages"][1]["undefined"]) >= {"linearity", "equispacing", "step_cosine"}


@pytest.mark.filterwarnings("ignore:residual_alignment. the randomized SVD did not reach")
def test_num_classes_from_the_classifier_never_from_labels():
    import torchvision

    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 1, 2])                    # 4 images, max label 3: the old code said C = 4
    tv = torchvision.models.resnet18(num_classes=10).eval()
    res = residual_alignment(tv, x, y=y, per_stage=True, k=3, power_iters=0, blocks=[0, 1])
    assert res.num_classes == 10 and res.num_classes_source == "model.fc"
    assert res.to_dict()["settings"]["num_classes_source"] == "model.fc"

    class Seq(nn.Module):                             # classifier = Sequential(..., Linear(., 7))
        def __init__(self) -> None:
            super().__init__()
            self.block = LinBlock(torch.eye(5, dtype=F64))
            self.classifier = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 7)).double()

        def forward(self, v):
            return self.classifier(self.block(v))

    xs = torch.randn(2, 5, dtype=F64)
    r = residual_alignment(Seq().double(), xs, y=torch.tensor([0, 1]), k=2)
    assert r.num_classes == 7 and r.num_classes_source == "model.classifier (last nn.Linear)"

    class Plain(nn.Module):                           # no head/fc/classifier: the last Linear outside the blocks
        def __init__(self) -> None:
            super().__init__()
            self.block = LinBlock(torch.eye(5, dtype=F64))
            self.out = nn.Linear(5, 6).double()

        def forward(self, v):
            return self.out(self.block(v))

    r = residual_alignment(Plain().double(), xs, k=2)
    assert r.num_classes == 6 and "last nn.Linear outside the residual blocks (out)" in r.num_classes_source
    with pytest.raises(ValueError, match=r"residual_alignment: expected y class labels in \[0, 6\).*got max 6"):
        residual_alignment(Plain().double(), xs, k=2, y=torch.tensor([0, 6]))
    assert residual_alignment(Plain().double(), xs, k=2, num_classes=3).num_classes_source == "num_classes argument"


def test_depth_product_with_and_without_first_block():
    """sigma_1 per block [5, 1, 1, 1] (L = 4): L * mean = 8, without the first block 4 * 1 = 4,
    first-block ratio 5; across depths the excl-first products are constant where the plain
    ones are not."""
    D = 8

    def net(L: int, first: float) -> LinNet:
        mats = [(first if l == 0 else 1.0) / L * torch.diag(torch.tensor([1.0, 0.5] + [0.0] * (D - 2), dtype=F64))
                for l in range(L)]
        return LinNet([random_orthogonal(D, 30 + l) @ M @ random_orthogonal(D, 50 + l).T for l, M in enumerate(mats)]).double()

    x = torch.randn(2, D, generator=torch.Generator().manual_seed(3), dtype=F64)
    r4 = residual_alignment(net(4, 5.0), x, k=4)
    st, s = r4.stages[0], r4.summary()
    # rank-2 Jacobians: the rank-deficient sketch leaves ~1e-8 errors (CholeskyQR)
    torch.testing.assert_close(st.sigma1_mean, torch.tensor([5.0, 1.0, 1.0, 1.0], dtype=F64) / 4, rtol=1e-7, atol=0)
    assert s["depth_product"] == pytest.approx(2.0, rel=1e-7)                  # 4 * mean(1.25, .25, .25, .25)
    assert s["depth_product_excl_first"] == pytest.approx(1.0, rel=1e-7)       # 4 * 0.25
    assert s["first_block_ratio"] == pytest.approx(5.0, rel=1e-7)
    d = r4.to_dict()["stages"][0]["ra4"]
    assert d["depth_product_excl_first"] == pytest.approx(1.0) and len(d["sigma1_mean"]) == 4
    out = depth_scaling([residual_alignment(net(L, 5.0), x, k=4) for L in (2, 4, 8)])
    assert out["products_excl_first"] == pytest.approx([1.0, 1.0, 1.0], rel=1e-7)
    assert out["relative_spread_excl_first"] == pytest.approx(0.0, abs=1e-7)
    assert out["slope_excl_first"] == pytest.approx(-1.0, rel=1e-7)
    assert out["relative_spread"] > 0.1 and out["first_block_ratio"] == pytest.approx([5.0] * 3, rel=1e-7)
    json.dumps(out, allow_nan=False)


def test_deterministic_flag():
    model, x, y, _ = _conv()
    a = residual_alignment(model, x, k=4, y=y, deterministic=True)
    b = residual_alignment(model, x, k=4, y=y, deterministic=True)
    c = residual_alignment(model, x, k=4, y=y)
    assert a.deterministic and a.to_dict()["settings"]["deterministic"] is True and not c.deterministic
    for st_a, st_b, st_c in zip(a.stages, b.stages, c.stages):
        assert torch.equal(st_a.singular_values_mean, st_b.singular_values_mean)
        assert torch.equal(st_a.singular_values_mean, st_c.singular_values_mean)   # no timing-based choice
        assert torch.equal(st_a.diag_ratio_mean, st_b.diag_ratio_mean)
    with pytest.raises(TypeError, match="residual_alignment: expected deterministic a bool, got int"):
        residual_alignment(model, x, k=4, deterministic=1)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(power_iters="fast"), TypeError, r"expected power_iters an int >= 0, 'auto' or None, got str 'fast'"),
    (dict(power_iters=-1), ValueError, r"expected power_iters >= 0"),
    (dict(tol=0.0), ValueError, r"expected tol > 0"),
    (dict(tol=1.0), ValueError, r"expected tol in \(0, 1\)"),
    (dict(max_iters=-1), ValueError, r"expected max_iters >= 0"),
])
def test_new_setting_checks(kwargs, exc, match):
    model, x, _, _ = _conv()
    with pytest.raises(exc, match="residual_alignment: " + match):
        residual_alignment(model, x, k=2, **kwargs)


def test_progress_ticks_per_block(capsys):
    model, x, _, _ = _conv()
    residual_alignment(model, x, k=4, progress=True)
    err = capsys.readouterr().err                       # not a TTY: plain lines, the last one final
    last = [ln for ln in err.splitlines() if ln.startswith("[residual_alignment]")][-1]
    assert last.startswith("[residual_alignment] 3/3 blocks (100%)") and "blocks.2: " in last
    assert "power iterations" in last
    residual_alignment(model, x, k=4)
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="residual_alignment: expected progress a bool, got str"):
        residual_alignment(model, x, k=4, progress="yes")
