"""Numerical honesty of resgeom_fast.analysis.collapse (issue 12): the rank rule of Sigma_B's
pseudo-inverse against dense float64 ground truth, NC1 never negative, undefined values as None
with a reason, NaNs named (NonFiniteError), Spearman rho undefined for a constant metric."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from resgeom_fast.analysis.collapse import collapse, collapse_metrics, layer_spearman, spearman_with_reason
from resgeom_fast.linalg import NonFiniteError
from resgeom_fast.models import FCResNet
from resgeom_fast.train import train

from tests.analysis._trained import digits_flat, one_thread

D64 = torch.float64


def dense_nc1(h: torch.Tensor, y: torch.Tensor, c: int, rank: int | None = None) -> float:
    """Tr(Sigma_W Sigma_B^+) / C with D x D float64 matrices; Sigma_B^+ on its top ``rank``
    eigenpairs (all non-zero ones when None)."""
    h = h.to(D64)
    n = h.shape[0]
    means = torch.stack([h[y == k].mean(0) for k in range(c)])
    m = (means - h.mean(0)).T
    hw = h - means[y]
    sigma_w = hw.T @ hw / n
    e, v = torch.linalg.eigh(m @ m.T / c)
    e, v = e.flip(0), v.flip(1)
    r = int((e > 1e-12 * e[0]).sum()) if rank is None else rank
    e, v = e[:r], v[:, :r]
    return float(torch.trace(sigma_w @ (v / e) @ v.T)) / c


class Hidden(nn.Module):
    """h_0 = x, h_1 = 2 x; a linear head (for NC3)."""

    def __init__(self, d: int, c: int, dtype: torch.dtype = D64) -> None:
        super().__init__()
        self.head = nn.Linear(d, c).to(dtype)

    def forward(self, x: torch.Tensor, return_hidden: bool = False):
        hs = [x, 2.0 * x]
        out = self.head(hs[-1])
        return (out, hs) if return_hidden else out


# ----------------------------------------------------------------------------- constructed NC1
def test_known_nc1_class_means_plus_noise() -> None:
    """Features = class means + within-class noise (float64): NC1 equals the dense formula."""
    g = torch.Generator().manual_seed(0)
    c, d, per = 5, 12, 40
    y = torch.arange(c).repeat_interleave(per)
    means = 3.0 * torch.randn(c, d, generator=g, dtype=D64)
    h = means[y] + 0.5 * torch.randn(c * per, d, generator=g, dtype=D64)
    got = collapse_metrics(h, y, c)
    assert got["nc1"] == pytest.approx(dense_nc1(h, y, c), rel=1e-10)
    assert got["rank_sigma_b"] == c - 1 and got["ill_conditioned"] is False and got["nc1_note"] == ""
    assert got["sigma_b_condition"] is not None and got["sigma_b_condition"] >= 1.0


def test_rank_deficient_sigma_b_with_float32_rounding() -> None:
    """Class means spanning 2 directions (C = 6: Sigma_B has rank 2, not C - 1 = 5) on a large
    common offset, features rounded to float32. The rounding moves the class means by ~1e-5 in
    the 3 other directions; NC1 must be the true one on the 2 real directions (dense float64 on
    the unrounded features), not (within-class variance) / (rounding noise)^2."""
    g = torch.Generator().manual_seed(1)
    c, d, per = 6, 20, 50
    y = torch.arange(c).repeat_interleave(per)
    basis, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=D64))
    coef = torch.randn(c, 2, generator=g, dtype=D64)
    means = coef @ basis.T + 1e3  # rank-2 spread on an offset of 1e3 per coordinate
    noise = 0.3 * torch.randn(c * per, d, generator=g, dtype=D64)
    h64 = means[y] + noise
    # the exact class means of the float64 sample span exactly 2 directions
    h64 = h64 - torch.stack([noise[y == k].mean(0) for k in range(c)])[y]
    truth = dense_nc1(h64, y, c, rank=2)
    h32 = h64.float()
    got = collapse_metrics(h32, y, c)
    assert got["nc1"] is not None and got["nc1"] >= 0.0
    assert got["rank_sigma_b"] == 2
    assert got["ill_conditioned"] is True and "3 of 5 class-mean directions" in got["nc1_note"]
    assert got["nc1"] == pytest.approx(truth, rel=1e-3)
    # in float64 the same features resolve the same 2 directions: the rule is not what drops them
    got64 = collapse_metrics(h64, y, c)
    assert got64["rank_sigma_b"] == 2 and got64["nc1"] == pytest.approx(truth, rel=1e-9)


def test_float32_rule_keeps_resolved_small_directions() -> None:
    """A direction 1e-4 below the largest one (far above float32 rounding) is kept: the rule is
    on the singular values of M, not on the (squared) eigenvalues of Sigma_B."""
    g = torch.Generator().manual_seed(2)
    c, d, per = 4, 16, 100
    y = torch.arange(c).repeat_interleave(per)
    q, _ = torch.linalg.qr(torch.randn(d, c - 1, generator=g, dtype=D64))
    coef = torch.randn(c, c - 1, generator=g, dtype=D64) * torch.tensor([1.0, 1e-2, 1e-4], dtype=D64)
    means = coef @ q.T
    noise = 1e-5 * torch.randn(c * per, d, generator=g, dtype=D64)
    h = (means[y] + noise).float()
    got = collapse_metrics(h, y, c)
    assert got["rank_sigma_b"] == c - 1 and got["ill_conditioned"] is False
    assert got["nc1"] == pytest.approx(dense_nc1(h.double(), y, c), rel=1e-6)


def test_one_sample_per_class_is_undefined() -> None:
    h = torch.randn(3, 4, dtype=D64, generator=torch.Generator().manual_seed(0))
    got = collapse_metrics(h, torch.arange(3), 3)
    assert got["nc1"] is None and "one sample" in got["nc1_note"]
    assert got["etf_error"] is not None  # the class means are still there


def test_coinciding_class_means_are_undefined() -> None:
    """All features equal up to float32 rounding: no resolved class-mean direction."""
    base = torch.randn(1, 8, dtype=D64, generator=torch.Generator().manual_seed(0)) + 5.0
    y = torch.arange(40) % 4
    h = (base + 1e-12 * torch.randn(40, 8, dtype=D64, generator=torch.Generator().manual_seed(1))).float()
    got = collapse_metrics(h, y, 4)
    assert got["nc1"] is None and got["etf_error"] is None and got["equinorm"] is None
    assert got["rank_sigma_b"] == 0 and got["ill_conditioned"] is True
    assert "coincide" in got["nc1_note"]
    assert got["nc3"] is None
    w = torch.randn(4, 8)
    got_w = collapse_metrics(h, y, 4, weight=w)
    assert got_w["nc3"] is None and "coincide" in got_w["nc3_note"]


# ----------------------------------------------------------------------------- deep plain nets
def _collapsed_plain_net() -> FCResNet:
    """A plain (skip="none") 32-block FCResNet that did not train: strong weight decay shrinks the
    deep layers until the class means collapse to one direction (then to rounding)."""
    ds = digits_flat()
    model = FCResNet(64, 32, 32, 10, skip="none", seed=0)
    with one_thread():
        train(model, ds, 3, lr=0.05, momentum=0.9, batch_size=64, seed=0, weight_decay=0.1, schedule="cosine",
              progress=False)
    return model.eval()


def test_plain_deep_net_nc1_never_negative_and_matches_float64() -> None:
    """Before the fix: NC1 = -4e4 at a layer of this net (the pseudo-inverse kept float32 noise).
    Now every NC1 is >= 0 and finite, or None with the reason; every defined NC1 equals the
    float64 ground truth (the same net run in float64, dense NC1 on the kept rank)."""
    model = _collapsed_plain_net()
    ds = digits_flat()
    res = collapse(model, ds)
    assert res.feature_dtype == "float32"
    for l, v, note in zip(res.layers, res.nc1, res.nc1_note):
        if v is None:
            assert note, l
        else:
            assert math.isfinite(v) and v >= 0.0, (l, v)
    assert any(v is None for v in res.nc1) and any(res.ill_conditioned)
    assert all(r == 9 for r, ill in zip(res.rank_sigma_b, res.ill_conditioned) if not ill)
    x, y = ds.tensors("train")
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        _, hs = m64(x.double(), return_hidden=True)
    checked = 0
    for l, v, r in zip(res.layers, res.nc1, res.rank_sigma_b):
        if v is not None:
            assert v == pytest.approx(dense_nc1(hs[l], y, 10, rank=r), rel=1e-2), l
            checked += 1
    assert checked >= 8
    # the Spearman rho over layers is undefined when NC1 is undefined at some layer
    assert res.spearman["nc1"] is None and "undefined" in res.spearman_note["nc1"]


def test_untrained_plain_fixup_net_dead_layers() -> None:
    """Fixup init zeroes every branch's last layer: a plain net's h_1..h_L are exactly 0. Before:
    NC1 NaN silently; now None with the reason."""
    model = FCResNet(64, 16, 4, 10, skip="none", init="fixup", seed=0)
    res = collapse(model, digits_flat())
    assert res.nc1[0] is not None and res.nc1[0] > 0
    for i in range(1, len(res.layers)):
        assert res.nc1[i] is None and res.etf_error[i] is None and "coincide" in res.nc1_note[i]
    assert res.nc3 is None and "NC3 undefined" in res.nc3_note  # fixup also zeroes the head
    d = res.to_dict()
    assert d["nc1"][1] is None and d["ill_conditioned"][1] is True


# ----------------------------------------------------------------------------- NaN named
def test_nan_in_head_is_named() -> None:
    """Before: nc3 = nan returned silently."""
    model = FCResNet(64, 16, 2, 10, seed=0).eval()
    with torch.no_grad():
        model.head.weight[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match=r"collapse: expected finite model parameter 'head\.weight'.*got 1 NaN"):
        collapse(model, digits_flat())


def test_nan_in_block_weight_and_buffer_are_named() -> None:
    model = FCResNet(64, 16, 2, 10, seed=0).eval()
    name, p = next((n, p) for n, p in model.named_parameters() if n.startswith("blocks.1") and p.dim() == 2)
    with torch.no_grad():
        p[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=rf"parameter '{name}'.*got 0 NaN and 1 inf"):
        collapse(model, digits_flat())
    model = FCResNet(64, 16, 2, 10, seed=0).eval()
    bname, buf = next((n, b) for n, b in model.named_buffers() if n.endswith("running_var"))
    buf[2] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"buffer '{bname}'"):
        collapse(model, digits_flat())


def test_nan_input_and_overflow_are_named() -> None:
    x = torch.randn(20, 4, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    y = torch.arange(20) % 2
    model = Hidden(4, 2, torch.float32)
    xn = x.clone()
    xn[7, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"input x of batch 0"):
        collapse(model, (xn, y))
    xb = x.clone()
    xb[3, 0] = 3e38  # finite, but h_1 = 2 x overflows float32
    with pytest.raises(NonFiniteError, match=r"hidden state h_1 of batch 0"):
        collapse(model, (xb, y))


def test_collapse_metrics_nan_weight_named() -> None:
    h = torch.randn(20, 5, dtype=D64, generator=torch.Generator().manual_seed(0))
    w = torch.randn(4, 5, dtype=D64)
    w[1, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"collapse_metrics: expected finite weight, got 1 NaN"):
        collapse_metrics(h, torch.arange(20) % 4, 4, weight=w)


# ----------------------------------------------------------------------------- Spearman
def test_constant_ncc_mismatch_rho_is_none_with_reason() -> None:
    """Separated classes: NCC mismatch exactly 0 at every layer. Before: rho = NaN, no reason;
    now None, a reason saying the zero is trivial, and ncc_zero_from = the first layer."""
    g = torch.Generator().manual_seed(0)
    c, d = 3, 6
    y = torch.arange(c).repeat(10)
    h = 10.0 * torch.eye(c, d, dtype=D64)[y] + 0.01 * torch.randn(30, d, generator=g, dtype=D64)
    res = collapse(Hidden(d, c), (h, y))
    assert res.ncc_mismatch == [0.0, 0.0]
    assert res.spearman["ncc_mismatch"] is None
    assert "trivially zero" in res.spearman_note["ncc_mismatch"]
    assert res.ncc_zero_from == 0
    s = res.summary()
    assert math.isnan(s["spearman_ncc_mismatch"]) and s["ncc_zero_from"] == 0.0
    assert res.to_dict()["spearman"]["ncc_mismatch"] is None


def test_ncc_ties_at_zero_are_flagged() -> None:
    layers = list(range(6))
    ncc = [0.3, 0.1, 0.0, 0.0, 0.0, 0.0]  # decreases to 0 and stays: rho is only -0.85 (ties)
    rho, note, zero_from = layer_spearman(layers, {"ncc_mismatch": ncc, "nc1": [6, 5, 4, 3, 2, 1]})
    assert zero_from == 2 and rho["nc1"] == pytest.approx(-1.0)
    assert rho["ncc_mismatch"] is not None and -0.9 < rho["ncc_mismatch"] < -0.8
    assert "ties at the floor" in note["ncc_mismatch"] and note["nc1"] == ""
    rho2, note2, z2 = layer_spearman(layers, {"ncc_mismatch": [0.3, 0.2, 0.1, 0.05, 0.01, 0.0]})
    assert z2 == 5 and note2["ncc_mismatch"] == "" and rho2["ncc_mismatch"] == pytest.approx(-1.0)


def test_spearman_reasons() -> None:
    assert spearman_with_reason([0, 1, 2], [0.0, 0.0, 0.0])[0] is None
    assert "constant" in spearman_with_reason([0, 1, 2], [0.0, 0.0, 0.0])[1]
    r, why = spearman_with_reason([0, 1, 2], [1.0, None, 3.0])
    assert r is None and "undefined" in why
    r, why = spearman_with_reason([0], [1.0])
    assert r is None and "fewer than 2" in why
    assert spearman_with_reason([0, 1, 2], [3.0, 1.0, 2.0]) == (pytest.approx(-0.5), "")
