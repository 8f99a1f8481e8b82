"""Tests of resgeom_fast.analysis.collapse: constructed collapse, dense float64 ground truth,
streaming vs full batch, pooled conv features, the PFC claim on trained nets, input checks."""
from __future__ import annotations

import copy
import json
import math

import matplotlib

matplotlib.use("Agg")

import pytest
import torch
from torch import nn

from resgeom_fast.analysis.collapse import (
    METRICS, RANK_RULE, collapse, collapse_metrics, plot_collapse, spearman,
)
from resgeom_fast.data import digits
from resgeom_fast.models import ConvResNet, FCResNet, resnet18

from tests.analysis._trained import digits_flat, trained_fc

D64 = torch.float64
#: pseudo-inverse cutoff of the dense float64 reference (its test features are well conditioned)
PINV_RTOL = 1e-12


# ----------------------------------------------------------------------------- helpers
def simplex_etf(c: int, d: int, scale: float = 2.0, seed: int = 0) -> torch.Tensor:
    """Class means [C, D] forming a simplex ETF (centred), rotated into R^D."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, c, generator=g, dtype=D64))
    m = math.sqrt(c / (c - 1)) * (torch.eye(c, dtype=D64) - 1.0 / c)  # columns: ETF vectors in R^C
    return scale * (q @ m).T


def dense_metrics(h: torch.Tensor, y: torch.Tensor, c: int, w: torch.Tensor | None = None) -> dict:
    """Every metric straight from the SCIENCE.md formulas with D x D matrices (float64)."""
    h = h.to(D64)
    n, d = h.shape
    means = torch.stack([h[y == k].mean(0) for k in range(c)])
    mu_g = h.mean(0)
    m = (means - mu_g).T  # D x C
    hw = h - means[y]
    sigma_w = hw.T @ hw / n
    sigma_b = m @ m.T / c
    nc1 = torch.trace(sigma_w @ torch.linalg.pinv(sigma_b, rtol=PINV_RTOL, hermitian=True)) / c
    gram = m.T @ m
    etf = (torch.eye(c, dtype=D64) - 1.0 / c) / math.sqrt(c - 1)
    etf_err = torch.linalg.norm(gram / torch.linalg.norm(gram) - etf)
    norms = m.norm(dim=0)
    equinorm = norms.std() / norms.mean()
    ncc = (torch.cdist(h, means).argmin(1) != y).double().mean()
    out = {"nc1": float(nc1), "etf_error": float(etf_err), "equinorm": float(equinorm), "ncc_mismatch": float(ncc),
           "tr_sigma_w": float(torch.trace(sigma_w)), "tr_sigma_b": float(torch.trace(sigma_b)),
           "rank_sigma_b": int(torch.linalg.matrix_rank(sigma_b, rtol=PINV_RTOL, hermitian=True)), "nc3": None}
    if w is not None:
        w = w.detach().to(D64)
        out["nc3"] = float(torch.linalg.norm(w / torch.linalg.norm(w) - m.T / torch.linalg.norm(m)))
    return out


def assert_metrics_close(got: dict, want: dict, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    for k, v in want.items():
        if v is None:
            assert got[k] is None, k
        else:
            assert got[k] == pytest.approx(v, rel=rtol, abs=atol), k


class TwoLayer(nn.Module):
    """A toy model with hidden states: h_0 = x, h_1 = x (identity), head W (for NC3 via collapse)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        out = self.head(x)
        return (out, [x, x.clone()]) if return_hidden else out


# ----------------------------------------------------------------------------- constructed cases
@pytest.mark.parametrize("c,d", [(5, 8), (3, 3), (10, 64)])
def test_perfect_collapse_is_zero(c: int, d: int) -> None:
    means = simplex_etf(c, d) + 3.0  # a global offset: mu_G != 0
    y = torch.arange(c).repeat(4)
    h = means[y]
    w = 0.7 * (means - means.mean(0))  # W = M^T up to scale
    got = collapse_metrics(h, y, c, weight=w)
    for k in METRICS + ("nc3",):
        assert abs(got[k]) < 1e-10, (k, got[k])
    assert got["rank_sigma_b"] == c - 1
    # the same through collapse() with a model whose head is M^T
    res = collapse(TwoLayer(w), (h, y))
    for k in METRICS:
        assert max(abs(v) for v in getattr(res, k)) < 1e-10, k
    assert res.nc3 is not None and abs(res.nc3) < 1e-10 and res.nc3_note == ""
    assert res.class_counts == [4] * c and res.num_samples == 4 * c


def test_known_values_by_hand() -> None:
    # orthogonal means e_1..e_C (balanced): M = I - 11^T/C, already a simplex ETF of equal norms
    c = 4
    got = collapse_metrics(torch.eye(c, dtype=D64), torch.arange(c), c)
    assert got["etf_error"] < 1e-12 and got["equinorm"] < 1e-12
    # one sample per class: Sigma_W = 0 by construction, so NC1 is undefined, not a perfect 0
    assert got["nc1"] is None and "one sample" in got["nc1_note"]
    # 1-D, C = 2, unbalanced: class 0 = {0}, class 1 = {4, 4, 4}: mu_G = 3, M = [-3, 1];
    # equinorm = std([3, 1]) / mean = sqrt(2) / 2; G = [[9, -3], [-3, 1]], ||G||_F = 10,
    # ETF error = ||G / 10 - [[.5, -.5], [-.5, .5]]||_F = sqrt(0.4)
    h = torch.tensor([[0.0], [4.0], [4.0], [4.0]], dtype=D64)
    got = collapse_metrics(h, torch.tensor([0, 1, 1, 1]), 2)
    assert got["equinorm"] == pytest.approx(math.sqrt(2.0) / 2.0, rel=1e-14)
    assert got["etf_error"] == pytest.approx(math.sqrt(0.4), rel=1e-14)
    assert got["nc1"] == 0.0 and got["ncc_mismatch"] == 0.0
    assert got["tr_sigma_b"] == pytest.approx(5.0, rel=1e-14)  # (9 + 1) / 2
    # one sample of class 1 moved to 1: class means 0 and 3, so that sample is nearer to class 0's
    h2 = torch.tensor([[0.0], [4.0], [4.0], [1.0]], dtype=D64)
    got2 = collapse_metrics(h2, torch.tensor([0, 1, 1, 1]), 2)
    assert got2["ncc_mismatch"] == 0.25


@pytest.mark.parametrize("n,d,c,offset", [(90, 12, 4, 0.0), (120, 3, 6, 0.0), (200, 20, 5, 1e3), (50, 7, 2, 0.0)])
def test_random_features_against_dense(n: int, d: int, c: int, offset: float) -> None:
    g = torch.Generator().manual_seed(n + d)
    y = torch.cat([torch.arange(c), torch.randint(0, c, (n - c,), generator=g)])  # unbalanced, all present
    centres = 0.6 * torch.randn(c, d, generator=g, dtype=D64)
    h = centres[y] + torch.randn(n, d, generator=g, dtype=D64) + offset
    w = torch.randn(c, d, generator=g, dtype=D64)
    got = collapse_metrics(h, y, c, weight=w)
    want = dense_metrics(h, y, c, w)
    assert_metrics_close(got, want, rtol=1e-8 if offset else 1e-10)
    assert got["rank_sigma_b"] == min(d, c - 1)
    assert got["num_samples"] == n and got["width"] == d
    assert 0.0 < got["ncc_mismatch"] < 1.0  # noisy enough to be a real test of NCC


def test_trace_identity_dense() -> None:
    """Tr(Sigma_W Sigma_B^+) = C Tr((M^T Sigma_W M)(M^T M)^{+2}) for rank-deficient Sigma_B = M M^T / C."""
    g = torch.Generator().manual_seed(3)
    d, c = 9, 5
    m = torch.randn(d, c, generator=g, dtype=D64)
    m = m - m.mean(1, keepdim=True)  # rank C - 1
    a = torch.randn(d, d, generator=g, dtype=D64)
    sigma_w = a @ a.T
    lhs = torch.trace(sigma_w @ torch.linalg.pinv(m @ m.T / c, rtol=PINV_RTOL, hermitian=True))
    gp = torch.linalg.pinv(m.T @ m, rtol=PINV_RTOL, hermitian=True)
    rhs = c * torch.trace(m.T @ sigma_w @ m @ gp @ gp)
    assert float(lhs) == pytest.approx(float(rhs), rel=1e-10)


def test_float32_features_accumulate_in_float64() -> None:
    g = torch.Generator().manual_seed(5)
    y = torch.arange(60) % 3
    h = torch.randn(60, 6, generator=g) + y[:, None].float()
    assert_metrics_close(collapse_metrics(h, y, 3), dense_metrics(h.double(), y, 3))


# ----------------------------------------------------------------------------- streaming
def _double_fc() -> FCResNet:
    return copy.deepcopy(trained_fc()).double().eval()


def test_streaming_equals_full_batch_and_dense() -> None:
    model = _double_fc()
    ds = digits_flat().to(dtype=D64)
    x, y = ds.tensors("train")
    full = collapse(model, (x, y))
    streamed = collapse(model, ds.loader("train", batch_size=37, shuffle=True, seed=1))
    via_dataset = collapse(model, ds)
    for k in METRICS + ("tr_sigma_w", "tr_sigma_b"):
        assert getattr(streamed, k) == pytest.approx(getattr(full, k), rel=1e-9, abs=1e-13), k
        assert getattr(via_dataset, k) == pytest.approx(getattr(full, k), rel=1e-12, abs=1e-14), k
    assert streamed.nc3 == pytest.approx(full.nc3, rel=1e-10)
    assert full.layers == list(range(model.num_blocks + 1)) and full.widths == [64] * (model.num_blocks + 1)
    assert full.num_samples == x.shape[0] and sum(full.class_counts) == x.shape[0]
    # every layer against the dense formulas on the in-memory hidden states
    with torch.no_grad():
        _, hs = model(x, return_hidden=True)
    for i, l in enumerate(full.layers):
        want = dense_metrics(hs[l], y, 10, model.head.weight if l == full.layers[-1] else None)
        got = {k: getattr(full, k)[i] for k in METRICS + ("tr_sigma_w", "tr_sigma_b", "rank_sigma_b")}
        got["nc3"] = full.nc3 if l == full.layers[-1] else None
        assert_metrics_close(got, want, rtol=1e-8)


def test_test_split_and_layers_subset() -> None:
    model = _double_fc()
    ds = digits_flat().to(dtype=D64)
    res = collapse(model, ds, split="test", layers=[5, 0, 2])
    assert res.layers == [0, 2, 5] and res.split == "test" and res.num_samples == ds.x_test.shape[0]
    assert res.nc3 is None and "not among" in res.nc3_note
    with torch.no_grad():
        _, hs = model(ds.x_test, return_hidden=True)
    for i, l in enumerate(res.layers):
        assert res.nc1[i] == pytest.approx(dense_metrics(hs[l], ds.y_test, 10)["nc1"], rel=1e-8)


def test_mode_restored_and_no_side_effects() -> None:
    model = _double_fc().train()
    model.blocks[2].eval()  # a mixed-mode net: the per-module modes come back
    ds = digits_flat().to(dtype=D64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = collapse(model, ds.loader(batch_size=200))
    assert model.training and not model.blocks[2].training and model.blocks[3].training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running statistics untouched (eval mode inside)
    # eval-mode features do not depend on the batching: same metrics as a full-batch run
    ref = collapse(copy.deepcopy(model).eval(), ds)
    assert res.nc1 == pytest.approx(ref.nc1, rel=1e-9)
    assert model.training


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no visible CUDA GPU")
def test_collapse_on_cuda_matches_cpu() -> None:
    model = _double_fc()
    ds = digits_flat().to(dtype=D64)
    cpu = collapse(model, ds)
    gpu = collapse(copy.deepcopy(model).cuda(), ds.to("cuda").loader(batch_size=100))
    for k in METRICS:
        assert getattr(gpu, k) == pytest.approx(getattr(cpu, k), rel=1e-8, abs=1e-12), k
    assert gpu.nc3 == pytest.approx(cpu.nc3, rel=1e-8)


# ----------------------------------------------------------------------------- conv nets
def _image_subset(n: int = 150):
    ds = digits(seed=0, image=True, dtype=D64)
    return ds.x_train[:n], ds.y_train[:n]


def test_pooled_conv_features() -> None:
    x, y = _image_subset()
    model = ConvResNet(1, 6, 3, 10, seed=1).double().eval()
    with torch.no_grad():
        _, hs = model(x, return_hidden=True)
    avg = collapse(model, (x, y))
    assert avg.widths == [6] * 4 and avg.pool == "auto"
    for i, h in enumerate(hs):
        w = model.head.weight if i == len(hs) - 1 else None
        want = dense_metrics(h.mean((2, 3)), y, 10, w)
        got = {k: getattr(avg, k)[i] for k in METRICS}
        got["nc3"] = avg.nc3 if w is not None else None
        assert_metrics_close(got, {k: want[k] for k in METRICS + ("nc3",)}, rtol=1e-8)
    assert collapse(model, (x, y), pool="avg").nc1 == avg.nc1
    flat = collapse(model, model_loader(x, y, 40), pool="flatten")
    assert flat.widths == [6 * 64] * 4
    assert flat.nc3 is None and "does not match" in flat.nc3_note
    for i, h in enumerate(hs):
        got = collapse_metrics(h.flatten(1), y, 10)
        assert flat.nc1[i] == pytest.approx(got["nc1"], rel=1e-8)
        assert flat.ncc_mismatch[i] == pytest.approx(got["ncc_mismatch"])


def model_loader(x: torch.Tensor, y: torch.Tensor, batch: int):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def test_staged_resnet_widths_per_stage() -> None:
    x, y = _image_subset(120)
    model = resnet18(10, in_channels=1, base_width=4, seed=0).double().eval()
    res = collapse(model, model_loader(x, y, 50))
    assert res.widths == [4, 4, 4, 8, 8, 16, 16, 32, 32]  # stem + 8 blocks; each layer stands alone
    with torch.no_grad():
        _, hs = model(x, return_hidden=True)
    for i in (0, 4, 8):
        assert res.nc1[i] == pytest.approx(dense_metrics(hs[i].mean((2, 3)), y, 10)["nc1"], rel=1e-8)
    assert res.nc3 is not None


# ----------------------------------------------------------------------------- Spearman
def test_spearman_against_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    assert spearman([0, 1, 2, 3], [4.0, 3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        a = torch.randint(0, 4, (9,), generator=g).double().tolist()  # with ties
        b = torch.randn(9, generator=g, dtype=D64).tolist()
        assert spearman(b, a) == pytest.approx(stats.spearmanr(b, a).statistic, rel=1e-12)
    assert spearman([0, 1, 2], [1.0, 1.0, 1.0]) is None  # constant: undefined, not NaN
    assert spearman([0], [1.0]) is None


# ----------------------------------------------------------------------------- the claim
# Measured on trained_fc (digits train split, depth 8, float32, one thread). Spearman rho(l, NC1) =
# -1.00 for identity, plain and orthogonal skips on both machines measured. The ETF and NCC trends depend on
# the float32 rounding of the training run, i.e. on the CPU's GEMM kernels:
#   AMD EPYC (Zen 5):    ETF -0.87 (identity) / -0.85 (plain); NCC -0.58 / -0.99
#   Intel Xeon (AVX512): ETF -0.47 (identity) / -0.98 (plain); NCC -0.55 / -0.52
#   (float64 training, Intel: ETF -0.85 / -0.93; NCC -0.63 / -0.86)
# so the test asserts NC1's monotone decrease and only the sign (with margin) of the ETF and NCC
# trends; SCIENCE.md's rho < -0.9 for every metric does not hold robustly on these small nets.
# Equinorm does NOT decrease with depth (+0.33 / -0.27 on Zen 5, +0.40 / -0.47 on Xeon): reported,
# not asserted.
@pytest.mark.parametrize("skip,etf_max,ncc_max", [("identity", -0.4, -0.4), ("none", -0.4, -0.4)])
def test_claim_collapse_decreases_with_depth(skip: str, etf_max: float, ncc_max: float) -> None:
    res = collapse(trained_fc(skip=skip), digits_flat())
    assert res.spearman["nc1"] < -0.99
    assert res.nc1[-1] < 0.5 * res.nc1[0]
    assert res.spearman["etf_error"] < etf_max
    assert res.spearman["ncc_mismatch"] < ncc_max
    assert res.ncc_mismatch[-1] < res.ncc_mismatch[0]
    assert math.isfinite(res.spearman["equinorm"])  # measured, no direction claimed
    assert res.nc3 is not None and 0.0 < res.nc3 < 1.0


# ----------------------------------------------------------------------------- result / plot
def test_result_json_summary_and_plot() -> None:
    res = collapse(trained_fc(), digits_flat())
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert set(METRICS) <= set(d) and d["layers"] == res.layers and d["rank_rule"] == RANK_RULE
    s = res.summary()
    assert all(isinstance(v, float) for v in s.values())
    assert s["nc1_last"] == res.nc1[-1] and s["spearman_nc1"] == res.spearman["nc1"]
    fig = plot_collapse(res)
    lines = fig.axes[0].get_lines()
    assert len(lines) == len(METRICS) + 1  # + the NC3 marker
    for line, k in zip(lines, METRICS):
        assert list(line.get_xdata()) == d["layers"]
        assert list(line.get_ydata()) == d[k]
    assert list(lines[-1].get_ydata()) == [d["nc3"]]
    import matplotlib.pyplot as plt
    plt.close(fig)
    fig2, ax = plt.subplots()
    assert plot_collapse(res, ax=ax) is fig2
    plt.close(fig2)


# ----------------------------------------------------------------------------- input checks
def _small():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(20) % 4
    return torch.randn(20, 5, generator=g, dtype=D64), y


def test_collapse_metrics_label_out_of_range() -> None:
    h, y = _small()
    with pytest.raises(ValueError, match=r"collapse_metrics: expected labels in \[0, 2\]"):
        collapse_metrics(h, y, 3)


def test_collapse_metrics_negative_label() -> None:
    h, y = _small()
    with pytest.raises(ValueError, match="expected labels >= 0"):
        collapse_metrics(h, y - 1, 4)


def test_collapse_metrics_num_classes_lt_2() -> None:
    h, _ = _small()
    with pytest.raises(ValueError, match="num_classes >= 2"):
        collapse_metrics(h, torch.zeros(20, dtype=torch.long), 1)


def test_collapse_metrics_empty_class_named() -> None:
    h, y = _small()
    with pytest.raises(ValueError, match=r"none of class\(es\) \[2, 5\]"):
        collapse_metrics(h, torch.tensor([0, 1, 3, 4] * 5), 6)


def test_collapse_metrics_float_labels() -> None:
    h, y = _small()
    with pytest.raises(TypeError, match="integer dtype"):
        collapse_metrics(h, y.double(), 4)


def test_collapse_metrics_bad_features_shape() -> None:
    h, y = _small()
    with pytest.raises(ValueError, match=r"features of shape \[N, D\]"):
        collapse_metrics(h[:, :, None], y, 4)


def test_collapse_metrics_nonfinite() -> None:
    h, y = _small()
    h[3, 1] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        collapse_metrics(h, y, 4)


def test_collapse_metrics_weight_shape() -> None:
    h, y = _small()
    with pytest.raises(ValueError, match=r"weight of shape \[4, 5\]"):
        collapse_metrics(h, y, 4, weight=torch.zeros(5, 4, dtype=D64))


def test_collapse_model_without_hidden_states() -> None:
    with pytest.raises(TypeError, match="return_hidden"):
        collapse(nn.Sequential(nn.Linear(64, 10)), digits_flat())


class NoHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        return self.lin(x)


def test_collapse_model_returning_no_hidden_list() -> None:
    with pytest.raises(TypeError, match=r"to return \(logits, \[h_0, \.\.\., h_L\]\)"):
        collapse(NoHidden(), digits_flat())


def test_collapse_labels_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"collapse: expected y of batch 0 in \[0, 4\]"):
        collapse(trained_fc(), digits_flat(), num_classes=5)


def test_collapse_missing_class() -> None:
    with pytest.raises(ValueError, match=r"collapse: .*none of class\(es\) \[10\]"):
        collapse(trained_fc(), digits_flat(), num_classes=11)


def test_collapse_num_classes_lt_2() -> None:
    with pytest.raises(ValueError, match="num_classes >= 2"):
        collapse(trained_fc(), digits_flat(), num_classes=1)


def test_collapse_layers_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"layers in \[0, 8\]"):
        collapse(trained_fc(), digits_flat(), layers=[0, 9])


def test_collapse_layers_duplicates() -> None:
    with pytest.raises(ValueError, match="distinct"):
        collapse(trained_fc(), digits_flat(), layers=[1, 1])


def test_collapse_bad_pool() -> None:
    with pytest.raises(ValueError, match="pool one of"):
        collapse(trained_fc(), digits_flat(), pool="max")


def test_collapse_one_shot_iterator() -> None:
    ds = digits_flat()
    with pytest.raises(TypeError, match="iterated twice"):
        collapse(trained_fc(), iter(ds.loader()))


def test_collapse_dtype_mismatch() -> None:
    with pytest.raises(ValueError, match="dtype"):
        collapse(trained_fc(), digits_flat().to(dtype=D64))


def test_collapse_not_a_module() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        collapse(lambda x: x, digits_flat())


def test_plot_collapse_wrong_type() -> None:
    with pytest.raises(TypeError, match="CollapseResult"):
        plot_collapse({"nc1": [1.0]})
