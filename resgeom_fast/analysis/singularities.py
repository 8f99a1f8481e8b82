"""Singularities of the hidden units of a network (docs/science.md section 2, Orhan & Pitkow 2018).

A *layer* here is one ``nn.ReLU`` module inside an ``nn.Sequential`` of the model, together with
the nearest preceding ``nn.Linear`` / ``nn.Conv{1,2,3}d`` in the same Sequential, whose weight is
the layer's incoming weight matrix W [n, n_in] (a conv weight [C_out, C_in/groups, *kernel] is
flattened to [C_out, C_in/groups * prod(kernel)]). For this package's models these are the stem's
ReLU and the hidden ReLU of every residual branch. With BatchNorm (or Fixup scalars) between the
weight layer and the ReLU, W is still that weight layer's weight (our reading). ReLUs applied
after a residual addition (staged ResNets' ``post``) and ReLUs outside any Sequential (e.g.
torchvision blocks that reuse one ``self.relu``) have no single incoming weight and are not
layers. Z [N, n] holds the ReLU *outputs* (post-activation) over the data; for conv layers the
units are channels and every spatial position of every input counts as one observation (N =
samples x positions).

Metrics per layer (exactly docs/science.md section 2):

- elimination: ``dead_fraction`` -- units with Z <= 0 for every observation; and
  ``small_weight_fraction`` -- units whose incoming weight row norm (bias excluded) is below
  ``eps * median`` row norm.
- overlap: max and mean ``|cos|`` over distinct pairs of incoming weight rows (rows of exactly
  zero norm are excluded: cosine undefined), and over distinct pairs of activation columns
  (uncentred cosine ``G_ij / sqrt(G_ii G_jj)`` with ``G = Z^T Z``; dead units are zero columns
  and are excluded); counts of pairs with ``|cos| > 1 - eps``.
- linear dependence: eigenvalues mu (descending) of the centred covariance
  ``C = G / N - m m^T`` (m the column means; population normalisation 1/N), clamped at 0 for
  the two ratios: participation ratio ``(sum mu)^2 / sum mu^2``, effective rank
  ``exp(-sum p log p)`` with ``p = mu / sum mu`` (0 log 0 = 0), and the fraction of the n
  eigenvalues with ``mu < eps * mu_1`` (dead units contribute zero eigenvalues). A layer whose
  covariance is exactly zero has participation ratio and effective rank 0 and fraction 1.

Statistics stream over the data batch by batch through forward hooks, accumulated in float64
on the model's device (observation count, column sums, Gram ``Z^T Z``, column max); activations
are never held beyond one batch. The model runs under ``torch.no_grad`` in eval mode (BatchNorm
uses running statistics); every module's mode is restored afterwards.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.checks import check_module
from resgeom_fast.core.modules import capture_outputs, module_mode
from resgeom_fast import operators
from resgeom_fast.linalg import NonFiniteError
from resgeom_fast.analysis._common import Result, batches, check_float, model_device_dtype
from resgeom_fast.analysis._common import check_finite_parameters, check_finite_tensor
from resgeom_fast.analysis.plotting import as_result_dict, bars, join, lines, new_figure

__all__ = ["LayerSingularities", "SingularityResult", "find_relu_layers", "plot_singularities", "singularities"]

_WHERE = "singularities"
_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# scalar per-layer metrics averaged into the model-level means
_SCALARS = (
    "dead_fraction", "small_weight_fraction", "weight_cos_max", "weight_cos_mean", "act_cos_max",
    "act_cos_mean", "participation_ratio", "effective_rank", "effective_rank_fraction", "small_eig_fraction",
)


@dataclass
class LayerSingularities(Result):
    """Singularity metrics of one layer of units (see the module doc for the definitions).

    Attributes:
        name: qualified name of the ReLU module; weight_name: that of its weight layer.
        role: "stem", "branch" (inside a residual branch) or "other".
        block: index of the residual block holding the layer, or None.
        kind: "linear" or "conv" (units = channels, observations = samples x positions).
        n_units: n; n_in: length of an incoming weight row; observations: N.
        dead_units: [n_dead] int64 indices of dead units; dead_fraction = n_dead / n.
        weight_norms: [n] float64 incoming weight row norms; small_weight_fraction.
        weight_cos_max, weight_cos_mean, weight_pairs_above: overlap of the weight rows
            (pairs over ``weight_units_used`` rows of non-zero norm; NaN with fewer than 2).
        act_cos_max, act_cos_mean, act_pairs_above: overlap of the activation columns (pairs over
            ``act_units_used`` live units; NaN with fewer than 2).
        cov_eigenvalues: [n] float64 eigenvalues of the centred covariance, descending.
        participation_ratio, effective_rank, effective_rank_fraction (= effective_rank / n),
        small_eig_fraction: linear dependence. Metrics of a layer with n = 0 are NaN.
    """

    name: str
    weight_name: str
    role: str
    block: Optional[int]
    kind: str
    n_units: int
    n_in: int
    observations: int
    dead_units: Tensor
    dead_fraction: float
    weight_norms: Tensor
    small_weight_fraction: float
    weight_units_used: int
    weight_cos_max: float
    weight_cos_mean: float
    weight_pairs_above: int
    act_units_used: int
    act_cos_max: float
    act_cos_mean: float
    act_pairs_above: int
    cov_eigenvalues: Tensor
    participation_ratio: float
    effective_rank: float
    effective_rank_fraction: float
    small_eig_fraction: float

    def summary(self) -> dict[str, float]:
        return {f: float(getattr(self, f)) for f in ("dead_fraction", "act_cos_max", "effective_rank",
                                                     "small_eig_fraction")}


@dataclass
class SingularityResult(Result):
    """Result of :func:`singularities`.

    Attributes:
        eps: the tolerance used.
        layers: one :class:`LayerSingularities` per layer, in module order.
        means: model-level means over layers of every scalar metric (NaN layers skipped; NaN when
            no layer has a value): keys ``dead_fraction``, ``small_weight_fraction``,
            ``weight_cos_max``, ``weight_cos_mean``, ``act_cos_max``, ``act_cos_mean``,
            ``participation_ratio``, ``effective_rank``, ``effective_rank_fraction``,
            ``small_eig_fraction``.
        total_units, total_dead: units and dead units summed over layers.
        num_samples: samples seen (not observations).
    """

    eps: float
    layers: list[LayerSingularities]
    means: dict[str, float]
    total_units: int
    total_dead: int
    num_samples: int

    def summary(self) -> dict[str, float]:
        """Headline scalars: dead-unit fractions, activation overlap and effective rank."""
        return {
            "dead_fraction_total": self.total_dead / self.total_units if self.total_units else math.nan,
            "mean_dead_fraction": self.means["dead_fraction"],
            "mean_act_cos_max": self.means["act_cos_max"],
            "mean_effective_rank_fraction": self.means["effective_rank_fraction"],
            "mean_small_eig_fraction": self.means["small_eig_fraction"],
        }

    def layer(self, name: str) -> LayerSingularities:
        for l in self.layers:
            if l.name == name or l.weight_name == name:
                return l
        raise ValueError(f"layer: no layer named {name!r}; layers are {[l.name for l in self.layers]}")


@dataclass
class _Layer:
    name: str
    relu: nn.Module
    weight_name: str
    weight_module: nn.Module
    role: str
    block: Optional[int]


def find_relu_layers(model: nn.Module) -> list[_Layer]:
    """Every ``nn.ReLU`` inside an ``nn.Sequential`` of ``model`` with a preceding Linear / Conv in
    the same Sequential (module order); see the module doc."""
    names = {id(m): n for n, m in model.named_modules()}
    try:  # blocks only label the layers (role, block index)
        infos = operators.residual_blocks(model)
    except (TypeError, ValueError):  # pragma: no cover
        infos = []
    branch_prefix = [(i, names.get(id(b.branch), None)) for i, b in enumerate(infos)]
    block_prefix = [(i, b.name) for i, b in enumerate(infos)]
    found: list[_Layer] = []
    seen: set[int] = set()
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for j, (cname, child) in enumerate(children):
            if not isinstance(child, nn.ReLU) or id(child) in seen:
                continue
            prev = next(((pn, pm) for pn, pm in reversed(children[:j]) if isinstance(pm, _WEIGHT_TYPES)), None)
            if prev is None:
                continue
            seen.add(id(child))
            full = f"{seq_name}.{cname}" if seq_name else cname
            wname = f"{seq_name}.{prev[0]}" if seq_name else prev[0]
            role, block = "other", None
            for i, pfx in branch_prefix:
                if pfx is not None and (full.startswith(pfx + ".")):
                    role, block = "branch", i
            if block is None:
                for i, pfx in block_prefix:
                    if pfx and full.startswith(pfx + "."):
                        block = i
                if full.split(".")[0] == "stem":
                    role = "stem"
            found.append(_Layer(full, child, wname, prev[1], role, block))
    return found


class _Stats:
    """Streaming float64 statistics of one layer's activations."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.n, self.count = n, 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.max = torch.full((n,), -math.inf, dtype=torch.float64, device=device)
        self.kind: Optional[str] = None

    def add(self, where: str, name: str, z: Tensor, batch: int = 0) -> None:
        if z.dim() < 2 or z.shape[1] != self.n:
            raise ValueError(f"{where}: expected the output of ReLU {name!r} to have {self.n} units (channels) "
                             f"in dimension 1, got shape {tuple(z.shape)}")
        check_finite_tensor(where, z.detach(), f"the output of ReLU {name!r} on batch {batch} (the model's "
                                               f"parameters and x are finite: the forward pass overflowed)")
        kind = "linear" if z.dim() == 2 else "conv"
        self.kind = self.kind or kind
        z = z.detach()
        zz = z.movedim(1, -1).reshape(-1, self.n).double() if z.dim() > 2 else z.double()  # [obs, n]
        self.count += zz.shape[0]
        if zz.shape[0] == 0:
            return
        self.sum += zz.sum(0)
        self.gram += zz.t() @ zz
        self.max = torch.maximum(self.max, zz.amax(0))


def _pair_cos(gram: Tensor, eps: float) -> tuple[int, float, float, int]:
    """Distinct-pair |cos| from a Gram matrix over the units with non-zero diagonal:
    (units used, max, mean, pairs with |cos| > 1 - eps)."""
    d = torch.diagonal(gram)
    keep = d > 0
    u = int(keep.sum())
    if u < 2:
        return u, math.nan, math.nan, 0
    g = gram[keep][:, keep]
    s = torch.sqrt(torch.diagonal(g))
    c = (g / s[:, None] / s[None, :]).abs().clamp(max=1.0)
    iu = torch.triu_indices(u, u, 1, device=c.device)
    pairs = c[iu[0], iu[1]]
    return u, float(pairs.max()), float(pairs.mean()), int((pairs > 1 - eps).sum())


def _layer_metrics(lay: _Layer, st: _Stats, eps: float) -> LayerSingularities:
    n = st.n
    if not (bool(torch.isfinite(st.gram).all()) and bool(torch.isfinite(st.sum).all())):
        raise NonFiniteError(f"{_WHERE}: expected finite activation statistics at ReLU {lay.name!r}, got NaN or "
                             "inf in the float64 Gram matrix (the activations overflow it)")
    W = lay.weight_module.weight.detach()
    W = W.reshape(W.shape[0], math.prod(W.shape[1:])).double()
    n_in = int(W.shape[1])
    nan = math.nan
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return LayerSingularities(
            lay.name, lay.weight_name, lay.role, lay.block, st.kind or "linear", 0, n_in, st.count,
            torch.zeros(0, dtype=torch.int64), nan, empty, nan, 0, nan, nan, 0, 0, nan, nan, 0, empty,
            nan, nan, nan, nan)
    # elimination
    dead = torch.nonzero(st.max <= 0).flatten().cpu()
    norms = torch.linalg.vector_norm(W, dim=1)
    med = float(norms.median())
    small_w = float((norms < eps * med).double().mean())
    # overlap
    wu, wmax, wmean, wpairs = _pair_cos(W @ W.t(), eps)
    au, amax, amean, apairs = _pair_cos(st.gram, eps)
    # linear dependence
    N = st.count
    mean = st.sum / N
    cov = st.gram / N - torch.outer(mean, mean)
    cov = 0.5 * (cov + cov.t())
    mu = torch.linalg.eigvalsh(cov).flip(0)  # descending
    mu1 = float(mu[0])
    mup = mu.clamp(min=0)
    tot = float(mup.sum())
    if tot > 0:
        pr = tot ** 2 / float((mup ** 2).sum())
        p = mup / tot
        ent = -float((p[p > 0] * torch.log(p[p > 0])).sum())
        erank = math.exp(ent)
        small_eig = float((mu < eps * mu1).double().mean())
    else:
        pr, erank, small_eig = 0.0, 0.0, 1.0
    return LayerSingularities(
        name=lay.name, weight_name=lay.weight_name, role=lay.role, block=lay.block, kind=st.kind or "linear",
        n_units=n, n_in=n_in, observations=N, dead_units=dead, dead_fraction=dead.numel() / n,
        weight_norms=norms.cpu(), small_weight_fraction=small_w, weight_units_used=wu, weight_cos_max=wmax,
        weight_cos_mean=wmean, weight_pairs_above=wpairs, act_units_used=au, act_cos_max=amax,
        act_cos_mean=amean, act_pairs_above=apairs, cov_eigenvalues=mu.cpu(), participation_ratio=pr,
        effective_rank=erank, effective_rank_fraction=erank / n, small_eig_fraction=small_eig,
    )


def _select(layers: list[_Layer], which: Optional[Sequence[Union[int, str]]]) -> list[_Layer]:
    if which is None:
        return layers
    if isinstance(which, (str, int)):
        which = [which]
    try:
        items = list(which)
    except TypeError:
        raise TypeError(f"{_WHERE}: expected layers None or a sequence of names / indices, "
                        f"got {type(which).__name__}") from None
    if not items:
        raise ValueError(f"{_WHERE}: expected layers None or a non-empty sequence, got an empty one")
    out: list[_Layer] = []
    for it in items:
        if isinstance(it, bool) or not isinstance(it, (int, str)):
            raise TypeError(f"{_WHERE}: expected layers entries ReLU / weight module names or indices, "
                            f"got {type(it).__name__}")
        if isinstance(it, int):
            if not 0 <= it < len(layers):
                raise ValueError(f"{_WHERE}: expected layer indices in [0, {len(layers) - 1}], got {it}")
            lay = layers[it]
        else:
            lay = next((l for l in layers if it in (l.name, l.weight_name)), None)
            if lay is None:
                raise ValueError(f"{_WHERE}: no layer named {it!r}; layers are {[l.name for l in layers]}")
        if lay not in out:
            out.append(lay)
    return out


def singularities(model: nn.Module, data: Any, *, eps: float = 1e-3,
                  layers: Optional[Sequence[Union[int, str]]] = None) -> SingularityResult:
    """Elimination, overlap and linear-dependence singularities of every ReLU layer's units.

    Args:
        model: an ``nn.Module`` whose hidden ReLUs are ``nn.ReLU`` modules inside
            ``nn.Sequential`` s, each after a Linear / Conv (module doc).
        data: one ``(x, y)`` batch, a resgeom_fast Dataset (its train split) or an iterable of
            batches (a DataLoader); x on the model's device and in its dtype. Streamed once.
        eps: tolerance in (0, 1): weight norms below ``eps * median``, pairs with
            ``|cos| > 1 - eps``, eigenvalues below ``eps * mu_1``.
        layers: None (every layer found) or names (of the ReLU or of its weight module) /
            indices into the discovered list.

    Returns:
        a :class:`SingularityResult` (tensors on the CPU, float64 / int64).

    Raises:
        NonFiniteError: a NaN / inf in a model parameter or buffer (named; checked before any
            forward pass), in the inputs x of a batch, or in a ReLU's output (named, with the batch).
    """
    check_module(_WHERE, "model", model)
    eps = check_float(_WHERE, "eps", eps, 0.0, 1.0, open_lo=True)
    if eps >= 1.0:
        raise ValueError(f"{_WHERE}: expected eps < 1, got {eps!r}")
    device, dtype = model_device_dtype(_WHERE, model)
    found = find_relu_layers(model)
    if not found:
        raise ValueError(f"{_WHERE}: found no nn.ReLU inside an nn.Sequential after a Linear / Conv in "
                         f"{type(model).__name__}; there are no layers of units to analyse")
    chosen = _select(found, layers)
    check_finite_parameters(_WHERE, model)
    stats = [_Stats(int(l.weight_module.weight.shape[0]), device) for l in chosen]
    batch = [0]

    def record(slot: int, out: Any) -> None:  # every call of a watched ReLU, as it happens
        stats[slot].add(_WHERE, chosen[slot].name, out, batch[0])

    n_samples = 0
    relus = [lay.relu for lay in chosen]
    with module_mode(model, False), torch.no_grad(), capture_outputs(relus, clone=False, on_call=record) as cap:
        for i, (x, _y) in enumerate(batches(_WHERE, data, device, dtype)):
            check_finite_tensor(_WHERE, x, f"the inputs x of batch {i}")
            batch[0] = i
            cap.reset()
            model(x)
            n_samples += int(x.shape[0])
            for lay, calls in zip(chosen, cap.calls):
                if calls != 1:
                    raise ValueError(f"{_WHERE}: expected ReLU {lay.name!r} to run once per forward pass, "
                                     f"it ran {calls} times on batch {i} (shared or unused ReLU modules "
                                     "are not supported)")
    if n_samples == 0:
        raise ValueError(f"{_WHERE}: expected data with at least one sample, got only empty batches")
    results = [_layer_metrics(l, st, eps) for l, st in zip(chosen, stats)]
    means: dict[str, float] = {}
    for key in _SCALARS:
        vals = [getattr(r, key) for r in results if not math.isnan(getattr(r, key))]
        means[key] = sum(vals) / len(vals) if vals else math.nan
    return SingularityResult(
        eps=eps, layers=results, means=means, total_units=sum(r.n_units for r in results),
        total_dead=sum(int(r.dead_units.numel()) for r in results), num_samples=n_samples,
    )


def plot_singularities(result: Union[SingularityResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """Per-layer dead-unit fraction, overlap and effective rank.

    With ``ax=None`` a figure with three panels: dead fraction (bars), overlap (max |cos| of the
    activation columns and of the weight rows) and effective rank with participation ratio. With
    one Axes: the three [0, 1] series dead_fraction, act_cos_max and effective_rank_fraction on
    it; with a sequence of three Axes: the three panels on them. ``result``: a
    :class:`SingularityResult`, its ``to_dict()``, or a results dict holding that dict at the
    path ``at``; drawn from the dict form through :mod:`resgeom_fast.analysis.plotting`.

    Returns:
        the matplotlib Figure.
    """
    root, at, d = as_result_dict("plot_singularities", result, SingularityResult, at,
                                 ("layers", "eps", "total_dead", "total_units"))
    layers = d["layers"]
    xs = list(range(len(layers)))
    labels = [l["role"] if l["block"] is None else f"b{l['block']}" for l in layers]

    def col(key: str) -> str:
        return join(at, f"layers.*.{key}")

    def finish(a: Any) -> None:
        a.set_xticks(xs)
        a.set_xticklabels(labels, fontsize=7)
        a.set_xlabel("layer")

    if ax is not None and not isinstance(ax, (list, tuple)) and not hasattr(ax, "__len__"):
        lines(ax, root, [("dead fraction", "index", col("dead_fraction")),
                         ("max |cos| activations", "index", col("act_cos_max")),
                         ("effective rank / units", "index", col("effective_rank_fraction"))],
              styles=[{"marker": "o"}, {"marker": "s"}, {"marker": "^"}])
        finish(ax)
        return ax.figure
    if ax is None:
        fig, axes = new_figure(3, width=4.0, height=3.5)
    else:
        axes = list(ax)
        if len(axes) != 3:
            raise ValueError(f"plot_singularities: expected ax one Axes or three, got {len(axes)}")
        fig = axes[0].figure
    bars(axes[0], root, [str(i) for i in xs], [("dead fraction", join(at, "layers.{g}.dead_fraction"))],
         ylabel="dead-unit fraction", colors=["tab:red"], ticklabels=labels)
    lines(axes[1], root, [("max |cos| activations", "index", col("act_cos_max")),
                          ("max |cos| weights", "index", col("weight_cos_max"))],
          ylabel="overlap", styles=[{"marker": "o"}, {"marker": "s"}])
    lines(axes[2], root, [("effective rank", "index", col("effective_rank")),
                          ("participation ratio", "index", col("participation_ratio")),
                          ("units", "index", col("n_units"))],
          ylabel="linear dependence", styles=[{"marker": "o"}, {"marker": "s"}, {"marker": "", "ls": ":", "color": "k"}])
    for a in axes:
        finish(a)
    fig.suptitle(f"Singularities (eps={d['eps']:g}): {d['total_dead']}/{d['total_units']} units dead", fontsize=9)
    fig.tight_layout()
    return fig
