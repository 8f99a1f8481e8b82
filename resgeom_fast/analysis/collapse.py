"""Progressive feedforward collapse (SCIENCE.md section 5): neural-collapse metrics layer by layer.

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

- pass 1: per layer, class counts n_c and class sums (C x D) -> mu_c, mu_G, M;
- pass 2: per layer, the C x C matrix A = M^T Sigma_W M = (1/N) sum_i z_i z_i^T with
  z_i = M^T (h_i - mu_{y_i}) = M^T (h_i - mu_G) - G e_{y_i} (G = M^T M), Tr(Sigma_W) and the NCC
  mismatches (||h - mu_c||^2 = ||h - mu_G||^2 - 2 (h - mu_G)^T M e_c + G_cc).

Trace identity. Sigma_B = M M^T / C has rank <= C - 1; with the SVD M = U S V^T,
(M M^T)^+ = U S^-2 U^T = M (M^T M)^{+2} M^T, hence Sigma_B^+ = C M G^{+2} M^T and

    NC1 = Tr(Sigma_W Sigma_B^+) / C = Tr(M^T Sigma_W M G^{+2}) = Tr(A G^{+2}).

G^+ comes from the eigendecomposition G = V diag(g) V^T keeping the eigenvalues
g_k > ``PINV_RTOL`` * max_k g_k (the null direction of G -- sum_c n_c M e_c = 0 -- is dropped);
as G's eigenvalues are C times Sigma_B's, this is ``torch.linalg.pinv(Sigma_B, rtol=PINV_RTOL)``.

Layers of different widths (staged conv ResNets: pooled features have 64, 128, ... channels) are
fine: every layer is analysed on its own.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ._common import Result, batches, check_choice, check_int, model_device_dtype, to_jsonable, figure_axes

__all__ = [
    "CollapseResult", "METRICS", "PINV_RTOL", "collapse", "collapse_metrics", "plot_collapse",
    "spearman",
]

#: Relative eigenvalue cutoff of the pseudo-inverse of the C x C Gram G = M^T M (and so of
#: Sigma_B): eigenvalues <= PINV_RTOL * max eigenvalue count as zero. Eigenvalues of G are the
#: squared singular values of M, so this keeps class-mean directions down to 1e-6 of the largest.
PINV_RTOL: float = 1e-12

#: The per-layer metrics, in plotting order.
METRICS: tuple[str, ...] = ("nc1", "etf_error", "equinorm", "ncc_mismatch")

_POOLS = ("auto", "avg", "flatten")


# ----------------------------------------------------------------------------- statistics
class _LayerStats:
    """Float64 accumulators of one layer (pass 1: counts and sums; pass 2: A, Tr(Sigma_W), NCC)."""

    def __init__(self, width: int, num_classes: int, device: torch.device) -> None:
        self.width = width
        self.sums = torch.zeros(num_classes, width, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
        # set by finish_pass1
        self.means: Optional[Tensor] = None
        self.mean_g: Optional[Tensor] = None
        self.mt: Optional[Tensor] = None  # M^T, [C, D]
        self.gram: Optional[Tensor] = None  # G = M^T M, [C, C]
        # pass 2
        self.a = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
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
            self.a = self.a.new_zeros(num_classes, num_classes)

    def add1(self, h: Tensor, y: Tensor) -> None:
        self.sums.index_add_(0, y, h)
        self.counts += torch.bincount(y, minlength=self.counts.shape[0]).to(torch.float64)

    def finish_pass1(self) -> None:
        n = self.counts.sum()
        self.means = self.sums / self.counts[:, None]
        self.mean_g = self.sums.sum(0) / n
        self.mt = self.means - self.mean_g
        self.gram = self.mt @ self.mt.T

    def add2(self, h: Tensor, y: Tensor) -> None:
        assert self.mt is not None and self.gram is not None and self.means is not None
        hc = h - self.mean_g
        p = hc @ self.mt.T  # [B, C]: (h - mu_G)^T M
        z = p - self.gram[y]  # [B, C]: M^T (h - mu_y)
        self.a += z.T @ z
        self.sw_trace += (h - self.means[y]).square().sum()
        dist = self.gram.diagonal()[None, :] - 2.0 * p  # ||h - mu_c||^2 - ||h - mu_G||^2
        self.mismatches += (dist.argmin(1) != y).sum().to(torch.float64)
        self.seen2 += h.shape[0]

    def metrics(self, weight: Optional[Tensor] = None) -> dict[str, Any]:
        assert self.mt is not None and self.gram is not None
        n = float(self.counts.sum())
        c = self.counts.shape[0]
        a = self.a / n
        gram = self.gram
        g, v = torch.linalg.eigh(gram)
        keep = g > PINV_RTOL * g.max().clamp_min(0.0)
        vk, gk = v[:, keep], g[keep]
        nc1 = float(((vk.T @ a @ vk).diagonal() / gk.square()).sum()) if gk.numel() else math.nan
        gnorm = torch.linalg.matrix_norm(gram)
        etf = torch.eye(c, dtype=torch.float64, device=gram.device) - 1.0 / c
        etf_error = float(torch.linalg.matrix_norm(gram / gnorm - etf / math.sqrt(c - 1)))
        norms = self.mt.norm(dim=1)
        equinorm = float(norms.std(unbiased=True) / norms.mean())
        out: dict[str, Any] = {
            "nc1": nc1,
            "etf_error": etf_error,
            "equinorm": equinorm,
            "ncc_mismatch": float(self.mismatches) / n,
            "nc3": None,
            "tr_sigma_w": float(self.sw_trace) / n,
            "tr_sigma_b": float(gram.trace()) / c,
            "rank_sigma_b": int(keep.sum()),
            "width": self.width,
            "num_samples": int(n),
        }
        if weight is not None:
            w = weight.to(torch.float64)
            out["nc3"] = float(torch.linalg.matrix_norm(
                w / torch.linalg.matrix_norm(w) - self.mt / torch.linalg.matrix_norm(self.mt)))
        return out


def _check_labels(where: str, y: Any, n: int, num_classes: Optional[int], name: str = "labels") -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"{where}: expected {name} a Tensor of int class labels, got {type(y).__name__}")
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


def _check_finite(where: str, h: Tensor, what: str) -> None:
    if not bool(torch.isfinite(h).all()):
        raise ValueError(f"{where}: expected finite features, got NaN or inf in {what}")


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
    return weight.detach()


def collapse_metrics(features: Tensor, labels: Tensor, num_classes: int, *,
                     weight: Optional[Tensor] = None) -> dict[str, Any]:
    """The collapse metrics of one layer held in memory (see the module docstring for formulas).

    Args:
        features: [N, D] floating features (any floating dtype; statistics are float64 on the
            features' device).
        labels: [N] integer class labels in [0, num_classes).
        num_classes: C >= 2; every class must have at least one sample.
        weight: optional classifier weight [C, D] (of a head ``W h + b``) -> ``nc3``.

    Returns:
        dict with float ``nc1``, ``etf_error``, ``equinorm``, ``ncc_mismatch`` (fraction in
        [0, 1]), ``nc3`` (None without ``weight``), ``tr_sigma_w`` = Tr(Sigma_W),
        ``tr_sigma_b`` = Tr(Sigma_B), int ``rank_sigma_b`` (eigenvalues of G kept by the
        pseudo-inverse), ``width`` (D) and ``num_samples`` (N).
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
    h = features.detach().to(torch.float64)
    _check_finite(where, h, "features")
    st = _LayerStats(d, num_classes, h.device)
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


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (tie-averaged) ranks.

    Returns NaN when fewer than 2 points, when a value is NaN, or when either side is constant.
    """
    xs = torch.as_tensor([float(v) for v in x], dtype=torch.float64)
    ys = torch.as_tensor([float(v) if v is not None else math.nan for v in y], dtype=torch.float64)
    if xs.shape != ys.shape:
        raise ValueError(f"spearman: expected x and y of the same length, got {xs.numel()} and {ys.numel()}")
    if xs.numel() < 2 or bool(torch.isnan(xs).any() or torch.isnan(ys).any()):
        return math.nan
    rx, ry = _ranks(xs), _ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / den if den > 0 else math.nan


# ----------------------------------------------------------------------------- result
@dataclass
class CollapseResult(Result):
    """Per-layer collapse metrics of a model on a data set.

    Attributes:
        layers: the analysed layer indices l (h_0 = stem output, h_L = last block's output).
        widths: D of each analysed layer after pooling.
        nc1, etf_error, equinorm, ncc_mismatch, tr_sigma_w, tr_sigma_b: one float per layer.
        rank_sigma_b: rank of Sigma_B kept by the pseudo-inverse, per layer.
        nc3: NC3 of the last block's features against the head weight, or None (see nc3_note).
        nc3_note: why nc3 is None ("" when it is set).
        spearman: Spearman rho(layer, metric) for each metric of METRICS (NaN when undefined).
        num_classes, num_samples, class_counts: C, N and n_c.
        pool, split: the options used.
    """

    layers: list[int]
    widths: list[int]
    nc1: list[float]
    etf_error: list[float]
    equinorm: list[float]
    ncc_mismatch: list[float]
    tr_sigma_w: list[float]
    tr_sigma_b: list[float]
    rank_sigma_b: list[int]
    nc3: Optional[float]
    nc3_note: str
    spearman: dict[str, float]
    num_classes: int
    num_samples: int
    class_counts: list[int]
    pool: str
    split: str = "train"

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable({
            "layers": self.layers, "widths": self.widths, "nc1": self.nc1, "etf_error": self.etf_error,
            "equinorm": self.equinorm, "ncc_mismatch": self.ncc_mismatch, "tr_sigma_w": self.tr_sigma_w,
            "tr_sigma_b": self.tr_sigma_b, "rank_sigma_b": self.rank_sigma_b, "nc3": self.nc3,
            "nc3_note": self.nc3_note, "spearman": self.spearman, "num_classes": self.num_classes,
            "num_samples": self.num_samples, "class_counts": self.class_counts, "pool": self.pool,
            "split": self.split, "pinv_rtol": PINV_RTOL,
        })

    def summary(self) -> dict[str, float]:
        """NC1 at the first and last analysed layer, last-layer ETF error / NCC mismatch, NC3 and
        the Spearman rho of each metric (NaN where undefined)."""
        return {
            "nc1_first": self.nc1[0],
            "nc1_last": self.nc1[-1],
            "etf_error_last": self.etf_error[-1],
            "ncc_mismatch_last": self.ncc_mismatch[-1],
            "nc3": math.nan if self.nc3 is None else self.nc3,
            **{f"spearman_{k}": v for k, v in self.spearman.items()},
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


def _forward_hidden(where: str, model: nn.Module, x: Tensor) -> list[Tensor]:
    out = model(x, return_hidden=True)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], (list, tuple))
            and len(out[1]) >= 1 and all(isinstance(h, Tensor) for h in out[1])):
        raise TypeError(f"{where}: expected model(x, return_hidden=True) to return (logits, [h_0, ..., h_L]), "
                        f"got {type(out).__name__}")
    return list(out[1])


def _head_weight(model: nn.Module) -> Optional[Tensor]:
    head = getattr(model, "head", None)
    w = getattr(head, "weight", None) if head is not None else None
    return w if isinstance(w, Tensor) and w.dim() == 2 else None


def collapse(model: nn.Module, data: Any, *, num_classes: Optional[int] = None,
             layers: Optional[Sequence[int]] = None, pool: str = "auto", split: str = "train") -> CollapseResult:
    """Neural-collapse metrics of every representation h_0..h_L of ``model`` on ``data``.

    Two streaming passes over ``data`` in float64 (see the module docstring): nothing of size N x D
    or D x D is kept, only per-layer class sums (C x D) and C x C statistics.

    Args:
        model: a network of this package (``forward(x, return_hidden=True)`` ->
            ``(logits, [h_0, ..., h_L])``). It is run in eval mode under ``torch.no_grad`` (so
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
            reading of SCIENCE.md), "flatten" keeps all C*H*W numbers. [N, D] states are used as
            they are.
        split: the Dataset split ("train" or "test").

    Returns:
        :class:`CollapseResult`. NC3 is computed at l = L when L is analysed and ``model.head``
        has a weight [C, D_L] matching the pooled width (not with pool="flatten" on conv nets).
    """
    where = "collapse"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected model an nn.Module, got {type(model).__name__}")
    check_choice(where, "pool", pool, _POOLS)
    check_choice(where, "split", split, ("train", "test"))
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        params = {}
    if "return_hidden" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"{where}: expected a model whose forward accepts return_hidden=True and returns "
                        f"(logits, [h_0, ..., h_L]) (this package's models), got {type(model).__name__} without "
                        f"hidden states")
    if num_classes is not None:
        check_int(where, "num_classes", num_classes, 2)
    elif hasattr(data, "tensors") and hasattr(data, "x_train"):
        num_classes = getattr(data, "num_classes", None)
        if num_classes is None:
            raise ValueError(f"{where}: expected a classification Dataset (num_classes set), got {data!r}")
        check_int(where, "num_classes", num_classes, 2)
    else:
        w = _head_weight(model)
        if w is not None:
            num_classes = int(w.shape[0])
            check_int(where, "num_classes", num_classes, 2, hint=" (inferred from model.head.weight)")
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

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            stats, sel, n_classes, n1, num_hidden = _pass1(where, model, data, device, dtype, split, num_classes,
                                                           layers, pool)
            counts = stats[0].counts
            _check_counts(where, counts)
            for st in stats:
                st.finish_pass1()
            n2 = _pass2(where, model, data, device, dtype, split, n_classes, sel, pool, stats)
    finally:
        for m, mode in modes:  # every submodule's own mode (e.g. frozen BatchNorm inside a training net)
            m.training = mode
    if n2 != n1:
        raise ValueError(f"{where}: expected the same samples in both passes over data, got {n1} then {n2}")

    w = _head_weight(model)
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
    res: dict[str, Any] = {k: [p[k] for p in per] for k in METRICS + ("tr_sigma_w", "tr_sigma_b", "rank_sigma_b")}
    return CollapseResult(
        layers=list(sel), widths=[st.width for st in stats], nc3=per[-1]["nc3"], nc3_note=nc3_note,
        spearman={k: spearman(sel, res[k]) for k in METRICS}, num_classes=n_classes, num_samples=n1,
        class_counts=[int(c) for c in counts.tolist()], pool=pool, split=split, **res,
    )


def _pass1(where: str, model: nn.Module, data: Any, device: torch.device, dtype: torch.dtype, split: str,
           num_classes: Optional[int], layers: Optional[list[int]], pool: str):
    stats: list[_LayerStats] = []
    sel: list[int] = []
    c = num_classes if num_classes is not None else 0
    n = num_hidden = 0
    for b, (x, y) in enumerate(batches(where, data, device, dtype, split)):
        y = _check_labels(where, y, x.shape[0], num_classes, name=f"y of batch {b}")
        if y.device != device:
            raise ValueError(f"{where}: expected y on the model's device {device}, got {y.device}")
        hs = _forward_hidden(where, model, x)
        if b == 0:
            num_hidden = len(hs)
            if layers is not None and layers[-1] >= len(hs):
                raise ValueError(f"{where}: expected layers in [0, {len(hs) - 1}] (the model has "
                                 f"L = {len(hs) - 1} blocks), got {layers[-1]}")
            sel = list(range(len(hs))) if layers is None else layers
            widths = [_pool(hs[l], pool).shape[1] for l in sel]
            stats = [_LayerStats(d, max(c, 1), device) for d in widths]
        if num_classes is None and y.numel():
            c = max(c, int(y.max()) + 1)
            for st in stats:
                st.grow(c)
        for st, l in zip(stats, sel):
            h = _pool(hs[l], pool).to(torch.float64)
            _check_finite(where, h, f"h_{l} of batch {b}")
            st.add1(h, y)
        n += x.shape[0]
    if c < 2:
        raise ValueError(f"{where}: expected num_classes >= 2 (inferred from the labels), got {c}")
    return stats, sel, c, n, num_hidden


def _pass2(where: str, model: nn.Module, data: Any, device: torch.device, dtype: torch.dtype, split: str,
           num_classes: int, sel: list[int], pool: str, stats: list[_LayerStats]) -> int:
    n = 0
    for b, (x, y) in enumerate(batches(where, data, device, dtype, split)):
        y = _check_labels(where, y, x.shape[0], num_classes, name=f"y of batch {b}")
        hs = _forward_hidden(where, model, x)
        for st, l in zip(stats, sel):
            st.add2(_pool(hs[l], pool).to(torch.float64), y)
        n += x.shape[0]
    return n


# ----------------------------------------------------------------------------- plot
def plot_collapse(result: CollapseResult, ax: Any = None) -> Any:
    """NC1, ETF error, equinorm and NCC mismatch against the layer index, log y-axis.

    Zeros (e.g. NCC mismatch of a separated layer) are masked by the log scale, not altered:
    every line's data are the exported values. NC3 (when set) is one marker at the last layer.

    Args:
        result: a :class:`CollapseResult`.
        ax: a matplotlib Axes to draw on (default: a new figure).

    Returns:
        the matplotlib Figure.
    """
    if not isinstance(result, CollapseResult):
        raise TypeError(f"plot_collapse: expected result a CollapseResult, got {type(result).__name__}")
    fig, ax = figure_axes(ax, (6.0, 4.0))
    labels = {"nc1": "NC1 Tr(Σ_W Σ_B⁺)/C", "etf_error": "ETF error", "equinorm": "equinorm (CV)",
              "ncc_mismatch": "NCC mismatch"}
    for k in METRICS:
        rho = result.spearman.get(k, math.nan)
        ax.plot(result.layers, getattr(result, k), marker="o", ms=3,
                label=f"{labels[k]} (ρ={rho:.2f})" if rho == rho else labels[k])
    finish_metric_axes(ax, result.layers, result.nc3, "NC3 (last layer)", "layer l",
                       f"Feedforward collapse ({result.split}, N={result.num_samples}, C={result.num_classes})")
    return fig


def finish_metric_axes(ax: Any, layers: list[int], nc3: Optional[float], nc3_label: str, xlabel: str,
                       title: str) -> None:
    """The common end of the per-layer metric plots (here and in mufm): NC3 as a star at the last
    layer, a log y axis, integer layer ticks (up to 20 layers), labels, title and legend."""
    if nc3 is not None:
        ax.plot([layers[-1]], [nc3], marker="*", ms=10, ls="none", color="k", label=nc3_label)
    ax.set_yscale("log", nonpositive="mask")
    if len(layers) <= 20:
        ax.set_xticks(layers)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("metric")
    ax.set_title(title)
    ax.legend(fontsize=7)
