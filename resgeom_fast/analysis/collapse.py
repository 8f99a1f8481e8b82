"""Progressive feedforward collapse (docs/science.md section 5): neural-collapse metrics layer by layer.

For every representation h_l (l = 0..L, h_0 = stem(x)) of the samples of a data set, with class
means mu_c, the global mean mu_G = (1/N) sum_i h_i (the sample mean, as in Papyan et al.; with
unbalanced classes it differs from the mean of the class means) and ``M = [mu_c - mu_G]_c``
(D x C), this module computes

- NC1 = Tr(Sigma_W Sigma_B^+) / C, with Sigma_W = (1/N) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T
  and Sigma_B = (1/C) sum_c (mu_c - mu_G)(mu_c - mu_G)^T = M M^T / C;
- ETF error = || M^T M / ||M^T M||_F - (I_C - 11^T / C) / sqrt(C - 1) ||_F;
- equinorm = std_c ||mu_c - mu_G|| / mean_c ||mu_c - mu_G|| (std with Bessel's correction,
  C - 1, as ``torch.std`` in Papyan et al.'s reference code);
- NCC mismatch = fraction of samples whose nearest class mean (Euclidean, ties to the lower
  class index) is not their label;
- NC3 (last layer only) = || W / ||W||_F - M^T / ||M||_F ||_F with the head weight W (C x D).

Streaming, in float64, never holding all features and never forming a D x D matrix:

- pass 1: per layer, class counts n_c, class sums (C x D) and sum_i ||h_i||^2 -> mu_c, mu_G, M,
  G = M^T M (C x C), the SVD of M^T and the kept directions (the rank rule below);
- pass 2: per layer, the NC1 sum of squares (below), Tr(Sigma_W) and the NCC mismatches
  (||h - mu_c||^2 = ||h - mu_G||^2 - 2 (h - mu_G)^T M e_c + G_cc).

Trace identity. Sigma_B = M M^T / C has rank <= C - 1; with the SVD M = U S V^T,
(M M^T)^+ = U S^-2 U^T = M (M^T M)^{+2} M^T, hence Sigma_B^+ = C M G^{+2} M^T and

    NC1 = Tr(Sigma_W Sigma_B^+) / C = Tr(M^T Sigma_W M G^{+2})
        = (1/N) sum_i sum_{k kept} (u_k^T (h_i - mu_{y_i}) / s_k)^2

with G = V diag(g) V^T, g_k = s_k^2 and u_k = M v_k / s_k the left singular vectors of M. The
last form is a sum of squares, accumulated in float64 in pass 2: NC1 is >= 0 by construction
(never the difference of two large numbers).

Rank rule (which directions of Sigma_B the pseudo-inverse keeps). The features carry the
rounding of their own dtype (float32 for a float32 model, even though the statistics are
accumulated in float64), so a class-mean direction whose spread is at that rounding level is
noise, and 1 / g_k of such a direction makes NC1 arbitrarily large (or, through cancellation,
negative: NC1 = -3.5e6 was reported on a deep plain net whose features had collapsed to rank 1).
The rounding sits in the entries of M (the class means of rounded features), so the rule is the
numpy ``matrix_rank`` rule on M -- not on Sigma_B = M M^T / C, whose eigenvalues are squares and
would drop directions that float32 features resolve exactly -- plus an absolute floor tied to the
size of the features: with eps = ``torch.finfo(feature dtype).eps``, n = max(D, C) and
h_rms^2 = (1/N) sum_i ||h_i||^2, a singular value s_k = sqrt(g_k) of M is kept iff

    s_k > max(s_max * n * eps,  sqrt(C n) * eps * h_rms),   i.e.
    g_k > tol = max(g_max * (n eps)^2,  C * n * eps^2 * h_rms^2).

A class mean of features of norm ~h_rms moves by about eps * h_rms when the features are rounded,
so the floor (a factor sqrt(C n) above that) is what catches a layer whose class means coincide up
to rounding, where a relative rule alone would keep pure noise. (Checked on a plain 32-block net:
the singular values of M from float32 features agree with those of the same net run in float64
down to about eps * h_rms; below that they are noise, and the floor sits above them.) The null
direction of G (sum_c n_c M e_c = 0) is below tol (its singular value is float64 rounding of the
class means, under the floor). The singular values come from an SVD of M^T (C x D, float64; their
error is ~1e-16 s_max, where the eigenvalues of G would carry ~1e-16 s_max^2). Per layer the
result reports the kept rank (``rank_sigma_b``), the condition number of Sigma_B on the kept
directions (``sigma_b_condition``) and ``ill_conditioned`` (True when fewer than min(C - 1, D)
directions were kept: NC1 is then measured on the resolved class-mean subspace only, and
``nc1_note`` says how many directions were dropped as rounding noise).

Undefined values (None, with the reason in ``nc1_note``):

- no direction kept (the class means coincide to the features' precision, e.g. dead or vanished
  features): NC1, ETF error and equinorm are None;
- every class has exactly one sample: Sigma_W = 0 by construction, NC1 is None (a trivially
  perfect value is not a measurement).

A layer whose within-class scatter is at the rounding level (Tr(Sigma_W) <= n eps^2 h_rms^2) but
whose class means are resolved keeps its (tiny, >= 0) NC1 value: that is collapse to the
features' precision, and ``nc1_note`` says so.

Non-finite values raise :class:`resgeom_fast.linalg.NonFiniteError` naming where they are: a
model parameter or buffer (checked before any forward pass), the input x of a batch, or a hidden
state h_l of a batch.

Models without ``forward(x, return_hidden=True)`` (torchvision / timm ResNets, any model whose
residual blocks :func:`resgeom_fast.core.blocks.residual_blocks` discovers): h_0..h_L come from
forward hooks on the blocks (h_0 = the first block's input, h_l = block l's output), one forward
pass per batch and pass.

Transformers (the residual sublayers of a torchvision / timm ViT, read by hooks): h_l is the token
sequence [N, S, W] after sublayer l (h_0 the tokens entering the first encoder block: patch
embeddings, class token and position embedding), and collapse is measured on one W-vector per
sample: the class token (``tokens="cls"``, token 0, what the ViT head reads; the default for
models with a class token: torchvision's ``class_token``, timm's ``cls_token``) or the mean over
the S tokens (``tokens="mean"``). The choice is recorded in the result (``tokens``). The head
reads ``ln(h_L)[:, 0]`` (a final LayerNorm) rather than h_L itself, so NC3 is not computed for them
unless the model has a ``head`` weight matching the width.

Layers of different widths (staged conv ResNets: pooled features have 64, 128, ... channels) are
fine: every layer is analysed on its own.

Data parallel (``distributed="split" | "sharded"``, docs/distributed.md): every rank streams its
share of the samples through both passes; after pass 1 one ``all_gather_object`` shares each
rank's layer layout (layers, widths, feature eps, inferred C; an empty rank has none and takes the
first rank's) and any local failure, then ONE ``all_reduce`` sums the float64 class sums, counts
and sum ||h||^2 of every layer; after pass 2 ONE ``all_reduce`` sums the NC1 sums of squares,
Tr(Sigma_W), the NCC mismatches, the sample count and a failure flag. Every rank then holds the
single-process statistics (up to the order of the float64 sums) and computes the same result.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.blocks import BlockInfo, block_kinds, residual_blocks
from resgeom_fast.core.checks import check_module, check_type
from resgeom_fast.core.modules import module_mode
from resgeom_fast.core.distributed import all_reduce_sum, world_size
from ._common import (
    Result, batches, check_choice, check_finite_parameters, check_finite_tensor, check_int, model_device_dtype,
)
from ._distributed import check_mode, check_model, gather_objects, local_batches, portable, raise_first, sync_failure
from ._hidden import block_representations
from .plotting import as_result_dict, figure_axes, get_path, join, lines, point

__all__ = [
    "CollapseResult", "METRICS", "RANK_RULE", "collapse",
    "collapse_metrics", "layer_spearman", "nc1_rank_tolerance", "plot_collapse", "spearman", "spearman_with_reason",
]

#: The rank rule of Sigma_B's pseudo-inverse (module docstring), as written into every result.
RANK_RULE: str = ("keep singular value s_k of M = [mu_c - mu_G] iff s_k > max(s_max * n * eps, "
                  "sqrt(C * n) * eps * h_rms), n = max(D, C), eps = finfo(feature dtype).eps, "
                  "h_rms^2 = mean_i ||h_i||^2")

#: The per-layer metrics, in plotting order.
METRICS: tuple[str, ...] = ("nc1", "etf_error", "equinorm", "ncc_mismatch")

_POOLS = ("auto", "avg", "flatten")
_TOKENS = ("auto", "cls", "mean")


# ----------------------------------------------------------------------------- finiteness
def nc1_rank_tolerance(s_max: float, h2_mean: float, width: int, num_classes: int, eps: float) -> float:
    """The rank rule's threshold on the singular values of M (module docstring):
    ``max(s_max * n * eps, sqrt(C n) * eps * sqrt(h2_mean))`` with n = max(width, num_classes).

    Args:
        s_max: the largest singular value of M (>= 0); h2_mean: (1/N) sum_i ||h_i||^2;
        width: D; num_classes: C; eps: machine epsilon of the features' dtype (>= float64's, so
            the rule also covers the float64 accumulation).
    """
    n = max(int(width), int(num_classes))
    return max(max(s_max, 0.0) * n * eps, math.sqrt(num_classes * n * max(h2_mean, 0.0)) * eps)


# ----------------------------------------------------------------------------- statistics
class _LayerStats:
    """Float64 accumulators of one layer (pass 1: counts, sums, sum ||h||^2; pass 2: the NC1 sum of
    squares per kept direction, Tr(Sigma_W), NCC mismatches)."""

    def __init__(self, width: int, num_classes: int, device: torch.device, eps: float) -> None:
        self.width = width
        self.eps = float(eps)
        self.sums = torch.zeros(num_classes, width, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sq = torch.zeros((), dtype=torch.float64, device=device)
        # set by finish_pass1
        self.means: Optional[Tensor] = None
        self.mean_g: Optional[Tensor] = None
        self.mt: Optional[Tensor] = None  # M^T, [C, D]
        self.gram: Optional[Tensor] = None  # G = M^T M, [C, C]
        self.svals: Optional[Tensor] = None  # singular values of M, descending [min(C, D)]
        self.keep: Optional[Tensor] = None  # bool [C]
        self.tol = 0.0
        self.proj: Optional[Tensor] = None  # [D, r]: column k = u_k / s_k (kept k; M = U S V^T)
        # pass 2
        self.w_sq: Optional[Tensor] = None  # [r]
        self.sw_trace = torch.zeros((), dtype=torch.float64, device=device)
        self.mismatches = torch.zeros((), dtype=torch.float64, device=device)
        self.seen2 = 0

    def grow(self, num_classes: int) -> None:
        """More classes seen in pass 1 (num_classes inferred from the labels)."""
        c = self.sums.shape[0]
        if num_classes > c:
            pad = num_classes - c
            self.sums = torch.cat([self.sums, self.sums.new_zeros(pad, self.width)])
            self.counts = torch.cat([self.counts, self.counts.new_zeros(pad)])

    def add1(self, h: Tensor, y: Tensor) -> None:
        self.sums.index_add_(0, y, h)
        self.counts += torch.bincount(y, minlength=self.counts.shape[0]).to(torch.float64)
        self.sq += h.square().sum()

    def finish_pass1(self) -> None:
        n = self.counts.sum()
        c = self.counts.shape[0]
        self.means = self.sums / self.counts[:, None]
        self.mean_g = self.sums.sum(0) / n
        self.mt = self.means - self.mean_g
        self.gram = self.mt @ self.mt.T
        # the SVD of M^T (not eigh of G): singular values accurate to eps * s_max, so the rule
        # below, not G's rounding (eps * s_max^2), decides what is resolved
        _, sv, vh = torch.linalg.svd(self.mt, full_matrices=False)
        self.svals = sv
        self.tol = nc1_rank_tolerance(float(sv.max()), float(self.sq / n), self.width, c, self.eps)
        self.keep = sv > self.tol
        sk = sv[self.keep]
        self.proj = vh[self.keep].T / sk  # [D, r]: u_k / s_k with u_k the left singular vectors of M
        self.w_sq = torch.zeros(sk.numel(), dtype=torch.float64, device=sv.device)

    def add2(self, h: Tensor, y: Tensor) -> None:
        assert self.mt is not None and self.gram is not None and self.means is not None
        assert self.proj is not None and self.w_sq is not None
        dev = h - self.means[y]  # [B, D]: h - mu_y
        w = dev @ self.proj  # [B, r]: u_k^T (h - mu_y) / s_k = v_k^T M^T (h - mu_y) / g_k
        self.w_sq += w.square().sum(0)
        self.sw_trace += dev.square().sum()
        p = (h - self.mean_g) @ self.mt.T  # [B, C]: (h - mu_G)^T M
        dist = self.gram.diagonal()[None, :] - 2.0 * p  # ||h - mu_c||^2 - ||h - mu_G||^2
        self.mismatches += (dist.argmin(1) != y).sum().to(torch.float64)
        self.seen2 += h.shape[0]

    def metrics(self, weight: Optional[Tensor] = None) -> dict[str, Any]:
        assert self.mt is not None and self.gram is not None and self.svals is not None
        assert self.keep is not None and self.w_sq is not None
        n = float(self.counts.sum())
        c = self.counts.shape[0]
        gram, sv = self.gram, self.svals
        sk = sv[self.keep]
        rank = int(sk.numel())
        full = min(c - 1, self.width)
        h2 = float(self.sq) / n
        nf = max(self.width, c)
        tr_w = float(self.sw_trace) / n
        eps = self.eps
        notes: list[str] = []
        nc1: Optional[float]
        etf_error: Optional[float]
        equinorm: Optional[float]
        cond: Optional[float] = None
        if rank == 0:
            s_max = float(sv.max())
            notes.append(f"the class means coincide to the features' precision (largest singular value of M "
                         f"{s_max:.3g} <= rounding level {self.tol:.3g} for features of rms norm "
                         f"{math.sqrt(h2):.3g} and eps {eps:.3g}): Sigma_B is numerically zero, NC1, ETF error and "
                         f"equinorm are undefined")
            nc1 = etf_error = equinorm = None
        else:
            cond = float(sk.max() / sk.min()) ** 2
            gnorm = torch.linalg.matrix_norm(gram)
            etf = torch.eye(c, dtype=torch.float64, device=gram.device) - 1.0 / c
            etf_error = float(torch.linalg.matrix_norm(gram / gnorm - etf / math.sqrt(c - 1)))
            norms = self.mt.norm(dim=1)
            equinorm = float(norms.std(unbiased=True) / norms.mean())
            if bool((self.counts == 1).all()):
                nc1 = None
                notes.append("every class has exactly one sample: Sigma_W = 0 by construction, NC1 undefined")
            else:
                nc1 = float(self.w_sq.sum()) / n  # a sum of squares: >= 0
                if tr_w <= nf * eps * eps * h2:
                    notes.append(f"within-class scatter at the features' rounding level (Tr Sigma_W = {tr_w:.3g}): "
                                 f"NC1 is 0 to the features' precision")
            if rank < full:
                notes.append(f"{full - rank} of {full} class-mean directions are at the features' rounding level "
                             f"and were dropped (singular values of M <= {self.tol:.3g}): NC1 is measured "
                             f"on the {rank} resolved direction(s) only")
        out: dict[str, Any] = {
            "nc1": nc1,
            "etf_error": etf_error,
            "equinorm": equinorm,
            "ncc_mismatch": float(self.mismatches) / n,
            "nc3": None,
            "nc3_note": "no head weight given",
            "tr_sigma_w": tr_w,
            "tr_sigma_b": float(gram.trace()) / c,
            "rank_sigma_b": rank,
            "sigma_b_condition": cond,
            "sigma_b_tol": self.tol ** 2 / c,
            "ill_conditioned": rank < full,
            "nc1_note": "; ".join(notes),
            "feature_eps": eps,
            "width": self.width,
            "num_samples": int(n),
        }
        if weight is not None:
            w = weight.to(torch.float64)
            wn = float(torch.linalg.matrix_norm(w))
            mn = float(torch.linalg.matrix_norm(self.mt))
            if wn == 0.0:
                out["nc3_note"] = "the head weight is zero: NC3 undefined"
            elif rank == 0 or mn == 0.0:
                out["nc3_note"] = "the class means coincide to the features' precision: NC3 undefined"
            else:
                out["nc3"] = float(torch.linalg.matrix_norm(w / wn - self.mt / mn))
                out["nc3_note"] = ""
        return out


def _check_labels(where: str, y: Any, n: int, num_classes: Optional[int], name: str = "labels") -> Tensor:
    check_type(where, name, y, Tensor, "a Tensor of int class labels")
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{where}: expected {name} of an integer dtype (class labels), got {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{where}: expected {name} of shape [{n}], got {tuple(y.shape)}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{where}: expected {name} >= 0, got {int(y.min())}")
    if n and num_classes is not None and int(y.max()) >= num_classes:
        raise ValueError(f"{where}: expected {name} in [0, {num_classes - 1}] (num_classes={num_classes}), "
                         f"got {int(y.max())}")
    return y.long()


def _check_counts(where: str, counts: Tensor) -> None:
    empty = [int(c) for c in torch.nonzero(counts == 0).flatten().tolist()]
    if empty:
        raise ValueError(f"{where}: expected at least one sample of every class, got none of class(es) {empty}")


def _check_weight(where: str, weight: Any, c: int, d: int) -> Tensor:
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{where}: expected weight a floating Tensor [C, D], got {type(weight).__name__}")
    if tuple(weight.shape) != (c, d):
        raise ValueError(f"{where}: expected weight of shape [{c}, {d}] (num_classes, width), "
                         f"got {tuple(weight.shape)}")
    check_finite_tensor(where, weight.detach(), "weight")
    return weight.detach()


def _feature_eps(h: Tensor) -> float:
    """Machine epsilon of the features' own dtype (before the float64 accumulation)."""
    return float(torch.finfo(h.dtype).eps)


def collapse_metrics(features: Tensor, labels: Tensor, num_classes: int, *,
                     weight: Optional[Tensor] = None) -> dict[str, Any]:
    """The collapse metrics of one layer held in memory (see the module docstring for formulas,
    the rank rule and when a value is None).

    Args:
        features: [N, D] floating features (any floating dtype; statistics are float64 on the
            features' device; the rank rule uses the epsilon of ``features.dtype``).
        labels: [N] integer class labels in [0, num_classes).
        num_classes: C >= 2; every class must have at least one sample.
        weight: optional classifier weight [C, D] (of a head ``W h + b``) -> ``nc3``.

    Returns:
        dict with ``nc1`` (float >= 0 or None), ``etf_error``, ``equinorm`` (float or None),
        ``ncc_mismatch`` (fraction in [0, 1]), ``nc3`` (None without ``weight`` or when undefined)
        and ``nc3_note`` (why), ``tr_sigma_w`` = Tr(Sigma_W), ``tr_sigma_b`` = Tr(Sigma_B), int
        ``rank_sigma_b`` (directions kept by the rank rule), ``sigma_b_condition`` (largest /
        smallest kept eigenvalue of Sigma_B, None when none is kept), ``sigma_b_tol`` (the rule's
        threshold on Sigma_B's eigenvalues), bool ``ill_conditioned`` (fewer than min(C - 1, D)
        directions kept), str ``nc1_note`` ("" when nothing to say), ``feature_eps``, ``width``
        (D) and ``num_samples`` (N).

    Raises:
        NonFiniteError: NaN or inf in ``features`` or ``weight``.
    """
    where = "collapse_metrics"
    check_int(where, "num_classes", num_classes, 2)
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise TypeError(f"{where}: expected features a floating Tensor [N, D], got "
                        f"{type(features).__name__ if not isinstance(features, Tensor) else features.dtype}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"{where}: expected features of shape [N, D] with N, D >= 1, got {tuple(features.shape)}")
    n, d = features.shape
    y = _check_labels(where, labels, n, num_classes)
    if y.device != features.device:
        raise ValueError(f"{where}: expected labels on the features' device {features.device}, got {y.device}")
    w = None if weight is None else _check_weight(where, weight, num_classes, d)
    check_finite_tensor(where, features.detach(), "features")
    h = features.detach().to(torch.float64)
    st = _LayerStats(d, num_classes, h.device, _feature_eps(features))
    st.add1(h, y)
    _check_counts(where, st.counts)
    st.finish_pass1()
    st.add2(h, y)
    return st.metrics(w)


# ----------------------------------------------------------------------------- Spearman
def _ranks(v: Tensor) -> Tensor:
    """1-based ranks of a 1-D float64 tensor, ties get their average rank."""
    order = torch.argsort(v, stable=True)
    sv = v[order]
    ranks = torch.empty_like(v)
    n = v.numel()
    i = 0
    while i < n:
        j = i
        while j + 1 < n and sv[j + 1] == sv[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman_with_reason(x: Sequence[float], y: Sequence[Optional[float]]) -> tuple[Optional[float], str]:
    """Spearman's rank correlation (the Pearson correlation of the tie-averaged ranks) and, when it
    is undefined, why: ``(rho, "")`` or ``(None, reason)``.

    Undefined: fewer than 2 points; a value of ``y`` is None or NaN (an undefined metric at that
    point); ``x`` or ``y`` constant (e.g. an NCC mismatch that is exactly 0 everywhere: no ranking,
    so no correlation -- not a finding either way).
    """
    xs = torch.as_tensor([float(v) for v in x], dtype=torch.float64, device="cpu")  # host maths
    ys = torch.as_tensor([float(v) if v is not None else math.nan for v in y], dtype=torch.float64, device="cpu")
    if xs.shape != ys.shape:
        raise ValueError(f"spearman: expected x and y of the same length, got {xs.numel()} and {ys.numel()}")
    if xs.numel() < 2:
        return None, f"fewer than 2 points ({xs.numel()})"
    bad = [i for i in range(ys.numel()) if math.isnan(float(ys[i]))]
    if bad:
        return None, f"undefined (None / NaN) at {len(bad)} of {ys.numel()} points (positions {bad[:10]})"
    if bool(torch.isnan(xs).any()):
        return None, "x holds NaN"
    if bool((ys == ys[0]).all()):
        return None, f"constant ({float(ys[0]):.6g} at all {ys.numel()} points): rank correlation undefined"
    if bool((xs == xs[0]).all()):
        return None, "x constant: rank correlation undefined"
    rx, ry = _ranks(xs), _ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den, ""


def spearman(x: Sequence[float], y: Sequence[Optional[float]]) -> Optional[float]:
    """Spearman's rank correlation, None when undefined (see :func:`spearman_with_reason`)."""
    return spearman_with_reason(x, y)[0]


def _zero_from(layers: Sequence[int], values: Sequence[float]) -> Optional[int]:
    """The first layer from which every value is exactly 0 (None when the last one is not 0)."""
    first = None
    for l, v in zip(reversed(list(layers)), reversed(list(values))):
        if v != 0.0:
            break
        first = l
    return first


def layer_spearman(layers: Sequence[int], per_metric: dict[str, Sequence[Optional[float]]]
                   ) -> tuple[dict[str, Optional[float]], dict[str, str], Optional[int]]:
    """Spearman rho(layer, metric) per metric with reasons, and the layer from which the NCC
    mismatch is exactly 0 (``ncc_zero_from``; None when it is not 0 at the last layer).

    A defined rho of the NCC mismatch gets a note when two or more trailing layers are tied at 0:
    ties at the floor pull rho towards 0 although the mismatch never rises, so the reading is the
    layer where it reaches 0, not rho.
    """
    rho: dict[str, Optional[float]] = {}
    note: dict[str, str] = {}
    for k, vals in per_metric.items():
        rho[k], note[k] = spearman_with_reason(layers, vals)
    zero_from = None
    if "ncc_mismatch" in per_metric:
        ncc = list(per_metric["ncc_mismatch"])
        zero_from = _zero_from(layers, ncc)
        if zero_from is not None:
            tied = sum(1 for l in layers if l >= zero_from)
            if rho["ncc_mismatch"] is None:
                note["ncc_mismatch"] = (f"NCC mismatch is exactly 0 at every analysed layer: "
                                        f"{note['ncc_mismatch']} (trivially zero mismatch, not a finding)")
            elif tied >= 2:
                note["ncc_mismatch"] = (f"NCC mismatch is exactly 0 from layer {zero_from} on ({tied} of "
                                        f"{len(ncc)} layers tied at 0): ties at the floor move rho towards 0; "
                                        f"read ncc_zero_from, not rho")
    return rho, note, zero_from


# ----------------------------------------------------------------------------- result
@dataclass(kw_only=True)
class CollapseResult(Result):
    """Per-layer collapse metrics of a model on a data set.

    Attributes:
        layers: the analysed layer indices l (h_0 = stem output, h_L = last block's output).
        widths: D of each analysed layer after pooling.
        nc1, etf_error, equinorm: one float (NC1 >= 0) or None (undefined: reason in nc1_note)
            per layer. ncc_mismatch, tr_sigma_w, tr_sigma_b: one float per layer.
        rank_sigma_b: rank of Sigma_B kept by the rank rule (module docstring), per layer.
        sigma_b_condition: largest / smallest kept eigenvalue of Sigma_B per layer (None when
            none is kept).
        ill_conditioned: per layer, True when fewer than min(C - 1, D) class-mean directions
            were resolved (some dropped as rounding noise, or none at all).
        nc1_note: per layer, why NC1 is None or what limits it ("" when nothing to say).
        feature_dtype: dtype of the hidden states (its eps sets the rank rule).
        nc3: NC3 of the last block's features against the head weight, or None (see nc3_note).
        nc3_note: why nc3 is None ("" when it is set).
        spearman: Spearman rho(layer, metric) for each metric of METRICS; None when undefined
            (a constant metric, e.g. an NCC mismatch of exactly 0 at every layer, or a metric
            undefined at some layer), the reason in spearman_note.
        spearman_note: per metric, why rho is None, or (NCC mismatch) that trailing layers are
            tied at 0 so that rho understates a monotone decrease; "" otherwise.
        ncc_zero_from: the first analysed layer from which the NCC mismatch is exactly 0 at every
            later analysed layer (None when the last layer's mismatch is not 0).
        num_classes, num_samples, class_counts: C, N and n_c.
        pool, split: the options used.
        tokens: how token sequences [N, S, W] became vectors: "cls" (token 0) or "mean" (mean
            over the tokens); None when the hidden states are not token sequences.
    """

    layers: list[int]
    widths: list[int]
    nc1: list[Optional[float]]
    etf_error: list[Optional[float]]
    equinorm: list[Optional[float]]
    ncc_mismatch: list[float]
    tr_sigma_w: list[float]
    tr_sigma_b: list[float]
    rank_sigma_b: list[int]
    sigma_b_condition: list[Optional[float]] = field(default_factory=list)
    ill_conditioned: list[bool] = field(default_factory=list)
    nc1_note: list[str] = field(default_factory=list)
    feature_dtype: str = ""
    nc3: Optional[float]
    nc3_note: str
    spearman: dict[str, Optional[float]]
    spearman_note: dict[str, str] = field(default_factory=dict)
    ncc_zero_from: Optional[int] = None
    num_classes: int
    num_samples: int
    class_counts: list[int]
    pool: str
    split: str = "train"
    tokens: Optional[str] = None

    _place = {"rank_rule": "feature_dtype"}

    def _extra(self) -> dict[str, Any]:
        return {"rank_rule": RANK_RULE}

    def summary(self) -> dict[str, float]:
        """NC1 at the first and last analysed layer, last-layer ETF error / NCC mismatch, NC3, the
        Spearman rho of each metric, ``ncc_zero_from`` and the number of ill-conditioned layers.
        Undefined values are NaN here (null in JSON); their reasons are in the result
        (``nc1_note``, ``spearman_note``, ``nc3_note``)."""
        nan = math.nan
        f = lambda v: nan if v is None else float(v)  # noqa: E731
        return {
            "nc1_first": f(self.nc1[0]),
            "nc1_last": f(self.nc1[-1]),
            "etf_error_last": f(self.etf_error[-1]),
            "ncc_mismatch_last": f(self.ncc_mismatch[-1]),
            "nc3": f(self.nc3),
            **{f"spearman_{k}": f(v) for k, v in self.spearman.items()},
            "ncc_zero_from": f(self.ncc_zero_from),
            "ill_conditioned_layers": float(sum(bool(b) for b in self.ill_conditioned)),
        }


# ----------------------------------------------------------------------------- collapse
def _pool(h: Tensor, pool: str) -> Tensor:
    if h.dim() < 2:
        raise ValueError(f"collapse: expected hidden states [N, ...] with a feature axis, got shape {tuple(h.shape)}")
    if h.dim() == 2:
        return h
    if pool == "flatten":
        return h.flatten(1)
    return h.flatten(2).mean(2)  # global average pooling over every axis after the channels


def _has_class_token(model: nn.Module) -> bool:
    """Whether ``model`` has a class token: torchvision ViT's ``class_token``, timm's ``cls_token``."""
    return any(isinstance(getattr(model, a, None), Tensor) for a in ("class_token", "cls_token"))


def _resolve_tokens(where: str, model: nn.Module, tokens: str) -> Optional[str]:
    """``tokens`` ("auto" -> "cls" for a model with a class token, else None: 3-D states refused)."""
    if tokens != "auto":
        return tokens
    return "cls" if _has_class_token(model) else None


def _forward_hidden(where: str, model: nn.Module, x: Tensor,
                    blocks: Optional[list[BlockInfo]] = None, tokens: Optional[str] = None
                    ) -> tuple[list[Tensor], bool]:
    """([h_0, ..., h_L], whether token sequences were reduced): ``model(x, return_hidden=True)[1]``,
    or (``blocks`` given: a model without return_hidden) the block representations from forward
    hooks; token sequences [N, S, W] are reduced to [N, W] by ``tokens`` ("cls": token 0, "mean":
    the mean over the S tokens)."""
    reduced = False
    if blocks is not None:
        hs = block_representations(model, x, blocks=blocks)
        for l, h in enumerate(hs):
            if h.dim() == 3:
                if tokens is None:
                    # [N, C, L] (1-D conv) and [N, S, W] (tokens) cannot be told apart from the shape
                    raise ValueError(f"{where}: expected hook-captured hidden states [N, D] or [N, C, H, W], got "
                                     f"h_{l} of shape {tuple(h.shape)}; for a token sequence [N, S, W] pass "
                                     f"tokens='cls' (token 0) or tokens='mean' (the default 'auto' picks 'cls' only "
                                     f"for a model with a class_token)")
                hs[l] = h[:, 0] if tokens == "cls" else h.mean(1)
                reduced = True
        return hs, reduced
    out = model(x, return_hidden=True)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (list, tuple))
            and len(out[1]) >= 1 and all(isinstance(h, Tensor) for h in out[1])):
        raise TypeError(f"{where}: expected model(x, return_hidden=True) to return (logits, [h_0, ..., h_L]), "
                        f"got {type(out).__name__}")
    return list(out[1]), reduced


def _head_weight(model: nn.Module, hooked: bool = False) -> Optional[Tensor]:
    """``model.head.weight`` (2-D), or for a hook-read torchvision / timm ResNet (``hooked``) its
    ``fc.weight`` (their logits are fc(global average pool of h_L))."""
    if hooked:
        if type(model).__name__ == "ResNet" and type(model).__module__ in ("torchvision.models.resnet",
                                                                          "timm.models.resnet"):
            w = getattr(getattr(model, "fc", None), "weight", None)
            return w if isinstance(w, Tensor) and w.dim() == 2 else None
    head = getattr(model, "head", None)
    w = getattr(head, "weight", None) if head is not None else None
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


def collapse(model: nn.Module, data: Any, *, num_classes: Optional[int] = None,
             layers: Optional[Sequence[int]] = None, pool: str = "auto", split: str = "train",
             tokens: str = "auto", distributed: Optional[str] = None) -> CollapseResult:
    """Neural-collapse metrics of every representation h_0..h_L of ``model`` on ``data``.

    Two streaming passes over ``data`` in float64 (see the module docstring): nothing of size N x D
    or D x D is kept, only per-layer class sums (C x D) and C x C statistics.

    Args:
        model: a network of this package (``forward(x, return_hidden=True)`` ->
            ``(logits, [h_0, ..., h_L])``, used when forward accepts ``return_hidden``), or any
            model whose residual blocks are discovered (torchvision / timm ResNets, MobileNetV2,
            ConvNeXt, marked blocks): then h_0 = the first block's input and h_l = the output of
            block l, read by forward hooks in the same one pass per batch
            (:func:`resgeom_fast.analysis._hidden.block_representations`); [N, C, H, W] states
            are pooled as below, [N, D] used as they are, 3-D states (tokens / 1-D conv,
            ambiguous) are refused. NC3 then uses ``fc`` of a torchvision / timm ResNet (logits
            = fc(GAP(h_L))), else ``model.head``. It is run in eval mode under ``torch.no_grad`` (so
            that both passes see the same features and BatchNorm statistics are not updated);
            the train/eval mode of every submodule is restored afterwards.
        data: an ``(x, y)`` pair, a resgeom_fast Dataset (``split`` is used) or a re-iterable of
            ``(x, y)`` batches such as a DataLoader (iterated twice; shuffling is fine).
            Inputs on the model's device and of its dtype; y integer labels [B].
        num_classes: C >= 2. None: the Dataset's ``num_classes``, else the rows of
            ``model.head.weight``, else (max label + 1).
        layers: indices l in [0, L] to analyse (default all), distinct; reported in ascending order.
        pool: how a hidden state [N, C, H, W] (or any [N, C, ...]) becomes a vector:
            "auto" / "avg" global average pooling over the spatial axes (what the head sees, the
            reading of docs/science.md section 5), "flatten" keeps all C*H*W numbers. [N, D] states are used as
            they are.
        split: the Dataset split ("train" or "test").
        tokens: how a hook-read token sequence [N, S, W] (the sublayers of a ViT) becomes a
            vector: "cls" the class token (token 0), "mean" the mean over the S tokens, "auto"
            (default) "cls" for a model with a class token (``class_token`` / ``cls_token``),
            else such states are refused. Recorded in the result (``tokens``; None when no
            state was a token sequence).
        distributed: None (one process), or data-parallel in an initialised torch.distributed
            group (docs/distributed.md): ``"split"`` every rank passes the same full ``data`` and
            streams its share (:func:`resgeom_fast.core.distributed.shard`), ``"sharded"`` every
            rank passes its own share (possibly no batch at all). A collective: every rank calls
            it with the same model and arguments, and every rank gets the single-process result.

    Returns:
        :class:`CollapseResult`. NC3 is computed at l = L when L is analysed and ``model.head``
        has a weight [C, D_L] matching the pooled width (not with pool="flatten" on conv nets).

    Raises:
        NonFiniteError: a NaN / inf in a model parameter or buffer (named; checked before any
            forward pass), in the inputs x of a batch, or in a hidden state h_l of a batch.
    """
    where = "collapse"
    check_module(where, "model", model)
    check_choice(where, "pool", pool, _POOLS)
    check_choice(where, "split", split, ("train", "test"))
    check_choice(where, "tokens", tokens, _TOKENS)
    mode = check_mode(where, distributed)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    blocks: Optional[list[BlockInfo]] = None
    if "return_hidden" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        # any other model: h_0..h_L from forward hooks on its discovered residual blocks
        blocks = residual_blocks(model, required=False)
        if not blocks:
            raise TypeError(f"{where}: expected a model whose forward accepts return_hidden=True and returns "
                            f"(logits, [h_0, ..., h_L]) (this package's models) or a model with residual blocks "
                            f"({block_kinds()}, or marked with mark_residual_block), got {type(model).__name__} "
                            f"without hidden states")
    if num_classes is not None:
        check_int(where, "num_classes", num_classes, 2)
    elif hasattr(data, "tensors") and hasattr(data, "x_train"):
        num_classes = getattr(data, "num_classes", None)
        if num_classes is None:
            raise ValueError(f"{where}: expected a classification Dataset (num_classes set), got {data!r}")
        check_int(where, "num_classes", num_classes, 2)
    else:
        w = _head_weight(model, blocks is not None)
        if w is not None:
            num_classes = int(w.shape[0])
            src = "fc" if w is getattr(getattr(model, "fc", None), "weight", None) else "head"
            check_int(where, "num_classes", num_classes, 2, hint=f" (inferred from model.{src}.weight)")
    if layers is not None:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(f"{where}: expected layers a sequence of ints, got {type(layers).__name__}")
        layers = [check_int(where, "layers[i]", int_l, 0) for int_l in layers]
        if not layers or len(set(layers)) != len(layers):
            raise ValueError(f"{where}: expected layers a non-empty list of distinct indices, got {layers}")
        layers = sorted(layers)
    if isinstance(data, Iterator):
        raise TypeError(f"{where}: expected data that can be iterated twice (an (x, y) pair, a Dataset or a "
                        f"DataLoader), got a one-shot iterator {type(data).__name__}")
    device, dtype = model_device_dtype(where, model)
    check_finite_parameters(where, model)
    if mode is not None:
        check_model(where, model)     # a collective: the ranks' sums are combined

    # eval mode inside; every submodule's own mode restored after (e.g. frozen BatchNorm in a training net)
    tok = _resolve_tokens(where, model, tokens) if blocks is not None else None
    with module_mode(model, False), torch.no_grad():
        if mode is None:
            stats, sel, n_classes, n1, num_hidden, fdtype, used_tokens = _pass1(
                where, model, batches(where, data, device, dtype, split), device, num_classes, layers, pool,
                blocks, tok)
        else:
            stats, sel, n_classes, n1, num_hidden, fdtype, used_tokens = _pass1_distributed(
                where, model, data, mode, device, dtype, split, num_classes, layers, pool, blocks, tok)
        if n_classes < 2:
            raise ValueError(f"{where}: expected num_classes >= 2 (inferred from the labels), got {n_classes}")
        counts = stats[0].counts
        _check_counts(where, counts)
        for st in stats:
            st.finish_pass1()
        if mode is None:
            n2 = _pass2(where, model, batches(where, data, device, dtype, split), n_classes, sel, pool, stats,
                        blocks, tok)
        else:
            n2 = _pass2_distributed(where, model, data, mode, device, dtype, split, n_classes, sel, pool, stats,
                                    blocks, tok)
    if n2 != n1:
        raise ValueError(f"{where}: expected the same samples in both passes over data, got {n1} then {n2}")

    w = _head_weight(model, blocks is not None)
    nc3_note = ""
    weight = None
    if sel[-1] != num_hidden - 1:
        nc3_note = "the last layer h_L is not among the analysed layers"
    elif w is None:
        nc3_note = "the model has no head with a 2-D weight"
    elif tuple(w.shape) != (n_classes, stats[-1].width):
        nc3_note = (f"head weight shape {tuple(w.shape)} does not match (num_classes, width) = "
                    f"({n_classes}, {stats[-1].width}) of the pooled h_L")
    else:
        weight = w.detach()
    per = [st.metrics(weight if i == len(stats) - 1 else None) for i, st in enumerate(stats)]
    if weight is not None:
        nc3_note = per[-1]["nc3_note"]
    keys = METRICS + ("tr_sigma_w", "tr_sigma_b", "rank_sigma_b", "sigma_b_condition", "ill_conditioned", "nc1_note")
    res: dict[str, Any] = {k: [p[k] for p in per] for k in keys}
    rho, rho_note, zero_from = layer_spearman(sel, {k: res[k] for k in METRICS})
    return CollapseResult(
        layers=list(sel), widths=[st.width for st in stats], nc3=per[-1]["nc3"], nc3_note=nc3_note,
        spearman=rho, spearman_note=rho_note, ncc_zero_from=zero_from, num_classes=n_classes, num_samples=n1,
        class_counts=[int(c) for c in counts.tolist()], pool=pool, split=split, feature_dtype=fdtype,
        tokens=tok if used_tokens else None, **res,
    )


def _pass1(where: str, model: nn.Module, source: Iterable[tuple[Tensor, Tensor]], device: torch.device,
           num_classes: Optional[int], layers: Optional[list[int]], pool: str,
           blocks: Optional[list[BlockInfo]] = None, tokens: Optional[str] = None):
    """Pass 1 over the validated batches ``source``: per-layer statistics, the analysed layers,
    C (given or inferred, may be < 2: the caller checks), the sample count, L + 1, the feature
    dtypes and whether token sequences were reduced. No batch: empty ``stats`` and ``sel``."""
    stats: list[_LayerStats] = []
    used_tokens = False
    sel: list[int] = []
    c = num_classes if num_classes is not None else 0
    n = num_hidden = 0
    fdtypes: set[str] = set()
    for b, (x, y) in enumerate(source):
        y = _check_labels(where, y, x.shape[0], num_classes, name=f"y of batch {b}")
        if y.device != device:
            raise ValueError(f"{where}: expected y on the model's device {device}, got {y.device}")
        check_finite_tensor(where, x, f"the input x of batch {b}")
        hs, reduced = _forward_hidden(where, model, x, blocks, tokens)
        used_tokens = used_tokens or reduced
        if b == 0:
            num_hidden = len(hs)
            if layers is not None and layers[-1] >= len(hs):
                raise ValueError(f"{where}: expected layers in [0, {len(hs) - 1}] (the model has "
                                 f"L = {len(hs) - 1} blocks), got {layers[-1]}")
            sel = list(range(len(hs))) if layers is None else layers
            pooled = [_pool(hs[l], pool) for l in sel]
            stats = [_LayerStats(p.shape[1], max(c, 1), device, _feature_eps(p)) for p in pooled]
        if num_classes is None and y.numel():
            c = max(c, int(y.max()) + 1)
            for st in stats:
                st.grow(c)
        for st, l in zip(stats, sel):
            hp = _pool(hs[l], pool)
            check_finite_tensor(where, hp, f"the hidden state h_{l} of batch {b} (the model's parameters and x "
                                           f"are finite: the forward pass overflowed)")
            st.eps = max(st.eps, _feature_eps(hp))
            fdtypes.add(str(hp.dtype).replace("torch.", ""))
            st.add1(hp.to(torch.float64), y)
        n += x.shape[0]
    return stats, sel, c, n, num_hidden, ",".join(sorted(fdtypes)), used_tokens


def _pass2(where: str, model: nn.Module, source: Iterable[tuple[Tensor, Tensor]],
           num_classes: int, sel: list[int], pool: str, stats: list[_LayerStats],
           blocks: Optional[list[BlockInfo]] = None, tokens: Optional[str] = None) -> int:
    n = 0
    for b, (x, y) in enumerate(source):
        y = _check_labels(where, y, x.shape[0], num_classes, name=f"y of batch {b}")
        check_finite_tensor(where, x, f"the input x of batch {b} (second pass)")
        hs, _ = _forward_hidden(where, model, x, blocks, tokens)
        for st, l in zip(stats, sel):
            hp = _pool(hs[l], pool)
            check_finite_tensor(where, hp, f"the hidden state h_{l} of batch {b} (second pass)")
            st.add2(hp.to(torch.float64), y)
        n += x.shape[0]
    return n


def _pass1_distributed(where: str, model: nn.Module, data: Any, mode: str, device: torch.device,
                       dtype: torch.dtype, split: str, num_classes: Optional[int], layers: Optional[list[int]],
                       pool: str, blocks: Optional[list[BlockInfo]], tokens: Optional[str]):
    """Pass 1 on this rank's share, then the layout of the first rank with data and the summed
    statistics on every rank (one all_gather_object, one all_reduce). Returns as :func:`_pass1`."""
    exc: Optional[BaseException] = None
    local = None
    try:
        local = _pass1(where, model, local_batches(where, data, mode, device, dtype, split), device, num_classes,
                       layers, pool, blocks, tokens)
    except Exception as e:  # shared below: every rank raises it
        exc = e
    meta = None
    if local is not None and local[3] > 0:
        st_, sel_, c_, _, nh_, fd_, used_ = local
        meta = (sel_, nh_, [s.width for s in st_], [s.eps for s in st_], c_, fd_, used_)
    infos = gather_objects(where, (portable(exc), meta))
    raise_first(where, [i[0] for i in infos], exc)
    metas = [m for _, m in infos if m is not None]
    if not metas:
        raise ValueError(f"{where}: expected data with at least one sample on some rank, got none on any of the "
                         f"{world_size()} ranks")
    sel, num_hidden, widths = metas[0][0], metas[0][1], metas[0][2]
    eps = [max(m[3][i] for m in metas) for i in range(len(widths))]
    c = num_classes if num_classes is not None else max(m[4] for m in metas)
    fdtype = ",".join(sorted({d for m in metas for d in m[5].split(",") if d}))
    used_tokens = any(m[6] for m in metas)
    stats = local[0] if meta is not None else [_LayerStats(w, max(c, 1), device, e) for w, e in zip(widths, eps)]
    for st, e in zip(stats, eps):
        st.grow(max(c, 1))
        st.eps = e
    summed = all_reduce_sum([t for st in stats for t in (st.sums, st.counts, st.sq)], fn=where)
    for i, st in enumerate(stats):
        st.sums, st.counts, st.sq = summed[3 * i:3 * i + 3]
    return stats, sel, c, int(stats[0].counts.sum()), num_hidden, fdtype, used_tokens


def _pass2_distributed(where: str, model: nn.Module, data: Any, mode: str, device: torch.device,
                       dtype: torch.dtype, split: str, num_classes: int, sel: list[int], pool: str,
                       stats: list[_LayerStats], blocks: Optional[list[BlockInfo]], tokens: Optional[str]) -> int:
    """Pass 2 on this rank's share, then the summed pass-2 statistics and sample count on every
    rank (one all_reduce, which also carries a failure flag). Returns the global sample count."""
    exc: Optional[BaseException] = None
    n = 0
    try:
        n = _pass2(where, model, local_batches(where, data, mode, device, dtype, split), num_classes, sel, pool,
                   stats, blocks, tokens)
    except Exception as e:  # shared below: every rank raises it
        exc = e
    head = torch.tensor([float(exc is not None), float(n)], dtype=torch.float64, device=device)
    parts = [head] + [t for st in stats for t in (st.w_sq, st.sw_trace, st.mismatches)]
    summed = all_reduce_sum(parts, fn=where)
    sync_failure(where, bool(summed[0][0] > 0), exc)
    for i, st in enumerate(stats):
        st.w_sq, st.sw_trace, st.mismatches = summed[1 + 3 * i:4 + 3 * i]
    return int(summed[0][1])


# ----------------------------------------------------------------------------- plot
METRIC_LABELS = {"nc1": "NC1 Tr(Σ_W Σ_B⁺)/C", "etf_error": "ETF error", "equinorm": "equinorm (CV)",
                 "ncc_mismatch": "NCC mismatch"}


def plot_collapse(result: Union[CollapseResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """NC1, ETF error, equinorm and NCC mismatch against the layer index, log y-axis.

    Zeros (e.g. NCC mismatch of a separated layer) are masked by the log scale, not altered:
    every line's data are the exported values (None -> a gap). NC3 (when set) is one marker at
    the last layer. The legend shows rho where it is defined. Drawn from the dict form through
    :mod:`resgeom_fast.analysis.plotting` (tagged artists).

    Args:
        result: a :class:`CollapseResult`, its ``to_dict()``, or a results dict holding that
            dict at the path ``at``.
        ax: a matplotlib Axes to draw on (default: a new figure).
        at: see ``result``.

    Returns:
        the matplotlib Figure.
    """
    root, at, d = as_result_dict("plot_collapse", result, CollapseResult, at,
                                 ("layers", "nc3", "spearman", "split", "num_samples", "num_classes", *METRICS))
    fig, ax = figure_axes(ax, (6.0, 4.0))
    labels = []
    for k in METRICS:
        rho = d["spearman"].get(k)
        labels.append(f"{METRIC_LABELS[k]} (ρ={rho:.2f})" if rho is not None else METRIC_LABELS[k])
    lines(ax, root, [(lab, join(at, "layers"), join(at, k)) for lab, k in zip(labels, METRICS)],
          marker="o", styles=[{"ms": 3}] * len(METRICS), legend=False)
    finish_metric_axes(ax, root, at, "NC3 (last layer)", "layer l",
                       f"Feedforward collapse ({d['split']}, N={d['num_samples']}, C={d['num_classes']})")
    return fig


def finish_metric_axes(ax: Any, results: dict[str, Any], at: str, nc3_label: str, xlabel: str, title: str) -> None:
    """The common end of the per-layer metric plots (here and in mufm), drawn from the dict form
    (``results`` at ``at`` holds ``layers`` and ``nc3``): NC3 as a tagged star at the last
    layer, a log y axis, integer layer ticks (up to 20 layers), labels, title and legend."""
    layers = get_path(results, join(at, "layers"))
    if get_path(results, join(at, "nc3")) is not None:
        point(ax, results, join(at, "layers.-1"), join(at, "nc3"), marker="*", ms=10, color="k", label=nc3_label)
    ax.set_yscale("log", nonpositive="mask")
    if len(layers) <= 20:
        ax.set_xticks(layers)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("metric")
    ax.set_title(title)
    ax.legend(fontsize=7)
