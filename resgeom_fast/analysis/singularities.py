"""Singularities of the hidden units of a network (docs/science.md section 2, Orhan & Pitkow 2018).

Layers. A *layer* is one CALL of an elementwise activation module (``nn.ReLU``, ``nn.ReLU6``,
``nn.GELU``, ``nn.SiLU``, ``nn.LeakyReLU``, ``nn.Hardswish``) during the model's forward pass,
wherever the module sits (inside or outside an ``nn.Sequential``). A module called several times
per forward pass gives one layer per call, named ``"<module>#<k>"`` (k = 0, 1, ... in call order;
a module called once keeps its plain name): torchvision's ``BasicBlock.relu`` gives the branch's
hidden units (``relu#0``) and the units after the residual sum (``relu#1``). The layers are found
on the first non-empty batch by forward hooks on every module (execution order is
deterministic; :func:`find_activation_layers`) and the statistics are then streamed over all
batches; a batch on which a watched module runs a different number of times is an error.

Incoming weight. The nearest weight layer (``nn.Linear`` / ``nn.Conv{1,2,3}d``) whose output
reaches the activation through nothing but elementwise, normalisation and permutation modules:
``nn.Identity``, dropouts, stochastic depth / DropPath / DropBlock (identities in eval mode), the
Fixup scalars (:class:`~resgeom_fast.core.blocks.ScalarBias` / ``ScalarMultiplier``), BatchNorm
(also torchvision's FrozenBatchNorm2d), LayerNorm, GroupNorm, InstanceNorm, and torchvision's
``Permute`` (ConvNeXt's channels-last Linear layers); an activation that a normalisation module
applies inside its own forward (timm's ``BatchNormAct2d``) links through that module. The link
is followed by tensor identity: a module's input must be the very tensor object another module
returned, not modified in place since (its version counter is checked), so a residual sum, a
concatenation or any functional op in between (``out += identity`` included) breaks it. Its
weight is W [n, n_in] (a conv weight [C_out, C_in/groups, *kernel] flattened to
[C_out, C_in/groups * prod(kernel)]); with BatchNorm (or Fixup scalars) in between, W is still
that weight layer's weight (our reading).
A layer without such a weight (role "post", or an activation after a functional op) has its
weight metrics None / NaN, ``weight_name`` None and the reason in ``weight_reason``; its
activation metrics are defined.

Roles, from :func:`resgeom_fast.core.blocks.residual_blocks` and the call order: "post" (the last
call of a block's ``post`` module inside that block, applied after skip + branch: e.g. every
torchvision / timm ResNet block's ReLU after the sum, this package's staged ResNets' post ReLU);
"branch" (inside a block's call, a module of its branch, or of the body of a
:class:`~resgeom_fast.core.blocks.ResidualSublayer` post); "stem" (before the first block runs,
in a model with blocks); "other" (anything else: between or after blocks, in a block's skip, in
a model without blocks). ``block``: the index of the innermost block (in ``residual_blocks``
order) whose call contains the layer, else None. For a sublayer block (a transformer's residual
sublayer, found on an ``owner`` module) the owner's call is the scope.

Units (Z [N, n] holds the activation *outputs*): with an incoming Conv the units are its output
channels (dim 1 of the activation tensor) and every sample x position is an observation; with
an incoming Linear the units are the last dim and every other index (samples, tokens, ConvNeXt's
channels-last positions) is an observation; a Permute in between moves the unit dim along. A
layer without incoming weight: 2-D [N, n] -> dim 1; [N, C, *spatial] -> channels (dim 1); a 3-D
tensor takes the last dim when the latest weight layer run before it is a Linear (tokens
[N, S, W]), else dim 1. ``kind`` is "conv" (units in dim 1 of a tensor with positions) or
"linear" (units in the last dim); ``unit_dim`` gives the dim.

Dead units, per activation (``dead_rule`` records the rule used for each layer); a unit is dead
when the rule holds at EVERY observation of the data:

- ReLU: output 0 (pre-activation <= 0; then the derivative is 0 too);
- ReLU6: derivative 0, i.e. pre-activation <= 0 or >= 6 (zero or saturated at 6; its output
  ``<= 0`` or ``>= 6``);
- GELU (exact or tanh), SiLU, LeakyReLU, Hardswish: output and derivative both within ``dead_tol``
  of 0 (default 1e-6), evaluated in float64 from the pre-activation z. GELU: z <~ -5.3 at the
  default; SiLU: z <~ -16.6; Hardswish: z < -3 (exactly 0 there); LeakyReLU(a): z <= 0 and
  ``|a| <= dead_tol`` and ``|a z| <= dead_tol`` (so never dead for a slope above ``dead_tol``: its
  negative side carries gradient a).

Metrics per layer (exactly docs/science.md section 2):

- elimination: ``dead_fraction`` (the rule above); ``small_weight_fraction`` -- units whose
  incoming weight row norm (bias excluded) is below ``eps * median`` row norm.
- overlap: max and mean ``|cos|`` over distinct pairs of incoming weight rows (rows of exactly
  zero norm are excluded: cosine undefined), and over distinct pairs of activation columns
  (uncentred cosine ``G_ij / sqrt(G_ii G_jj)`` with ``G = Z^T Z``; all-zero columns are
  excluded); counts of pairs with ``|cos| > 1 - eps``.
- linear dependence: eigenvalues mu (descending) of the centred covariance
  ``C = G / N - m m^T`` (m the column means; population normalisation 1/N), clamped at 0 for
  the two ratios: participation ratio ``(sum mu)^2 / sum mu^2``, effective rank
  ``exp(-sum p log p)`` with ``p = mu / sum mu`` (0 log 0 = 0), and the fraction of the n
  eigenvalues with ``mu < eps * mu_1`` (dead units contribute zero eigenvalues). A layer whose
  covariance is exactly zero has participation ratio and effective rank 0 and fraction 1.

Model level: ``means``, ``total_units`` and ``total_dead`` are over the layers that are not
"post" (the stem / branch / other layers: for this package's FC / conv / staged nets exactly the
layers the earlier Sequential-only rule measured, so the studies' numbers are unchanged);
``post_means``, ``post_total_units`` and ``post_total_dead`` summarise the "post" layers apart.

Statistics stream over the data batch by batch through forward hooks, accumulated in float64
on the model's device (observation count, column sums, Gram ``Z^T Z``, per-unit count of
observations where the unit is not dead by its rule); activations are never held beyond one
call. The model runs under ``torch.no_grad`` in eval mode (BatchNorm uses running statistics);
every module's mode is restored afterwards.

Data parallel (``distributed="split" | "sharded"``, docs/distributed.md): every rank streams its
share of the samples. The layers are discovered on every rank on the same probe: the first sample
of the first non-empty batch of the lowest rank holding data (one ``all_gather_object``, which
also shares a failure of reading the first batch), so a rank without data still knows the layers
and takes part. After the stream ONE ``all_reduce`` sums every layer's float64 observation count,
column sums, Gram matrix and live counts (and a failure flag): every rank then holds the
single-process statistics (up to the order of the float64 sums) and computes the same result.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.blocks import BlockInfo, ResidualSublayer, ScalarBias, ScalarMultiplier, residual_blocks
from resgeom_fast.core.checks import check_module
from resgeom_fast.core.modules import module_mode
from resgeom_fast.linalg import NonFiniteError
from resgeom_fast.analysis._common import Result, batches, check_float, model_device_dtype
from resgeom_fast.analysis._common import check_finite_parameters, check_finite_tensor
from resgeom_fast.analysis._distributed import check_mode, check_model, gather_objects, local_batches, portable, raise_first
from resgeom_fast.analysis._distributed import sync_failure
from resgeom_fast.core.distributed import all_reduce_sum, world_size
from resgeom_fast.analysis.plotting import as_result_dict, bars, join, lines, new_figure

__all__ = [
    "ActivationLayer", "LayerSingularities", "SingularityResult", "find_activation_layers", "find_relu_layers",
    "plot_singularities", "singularities",
]

_WHERE = "singularities"
_WEIGHT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
ACTIVATION_TYPES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.Hardswish)
_TRANSPARENT_TYPES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, ScalarBias, ScalarMultiplier,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
# optional third-party modules (matched by module and class name, never imported): elementwise in
# eval mode (stochastic depth, DropPath, DropBlock) or a normalisation; Permute moves the unit dim
_TRANSPARENT_NAMES = {
    ("torchvision.ops.misc", "FrozenBatchNorm2d"), ("torchvision.ops.stochastic_depth", "StochasticDepth"),
    ("timm.layers.drop", "DropPath"), ("timm.layers.drop", "DropBlock2d"),
}
_PERMUTE_NAMES = {("torchvision.ops.misc", "Permute")}
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_ACT_WORDS = "nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU or nn.Hardswish"

# scalar per-layer metrics averaged into the model-level means
_SCALARS = (
    "dead_fraction", "small_weight_fraction", "weight_cos_max", "weight_cos_mean", "act_cos_max",
    "act_cos_mean", "participation_ratio", "effective_rank", "effective_rank_fraction", "small_eig_fraction",
)


@dataclass
class LayerSingularities(Result):
    """Singularity metrics of one layer of units (see the module doc for the definitions).

    Attributes:
        name: the layer's name: the activation module's qualified name, with ``"#k"`` appended
            when the module runs more than once per forward pass; module_name, call: that module
            and the call index k (0 for a module called once).
        activation: the activation's class name ("ReLU", "GELU", ...); dead_rule: the dead-unit
            rule applied (module doc).
        role: "stem", "branch", "post" or "other"; block: index of the innermost residual block
            whose call holds the layer, or None.
        kind: "conv" (units = channels, dim 1; observations = samples x positions) or "linear"
            (units = the last dim; observations = all other indices); unit_dim: that dim of the
            activation tensor.
        weight_name: qualified name of the incoming weight layer, or None (then weight_reason
            says why; the weight metrics are None / NaN).
        n_units: n; n_in: length of an incoming weight row (None without weight); observations: N.
        dead_units: [n_dead] int64 indices of dead units; dead_fraction = n_dead / n.
        weight_norms: [n] float64 incoming weight row norms (None without weight); small_weight_fraction.
        weight_cos_max, weight_cos_mean, weight_pairs_above: overlap of the weight rows
            (pairs over ``weight_units_used`` rows of non-zero norm; NaN with fewer than 2).
        act_cos_max, act_cos_mean, act_pairs_above: overlap of the activation columns (pairs over
            ``act_units_used`` non-zero columns; NaN with fewer than 2).
        cov_eigenvalues: [n] float64 eigenvalues of the centred covariance, descending.
        participation_ratio, effective_rank, effective_rank_fraction (= effective_rank / n),
        small_eig_fraction: linear dependence. Metrics of a layer with n = 0 are NaN.
    """

    name: str
    module_name: str
    call: int
    activation: str
    dead_rule: str
    weight_name: Optional[str]
    weight_reason: Optional[str]
    role: str
    block: Optional[int]
    kind: str
    unit_dim: int
    n_units: int
    n_in: Optional[int]
    observations: int
    dead_units: Tensor
    dead_fraction: float
    weight_norms: Optional[Tensor]
    small_weight_fraction: float
    weight_units_used: Optional[int]
    weight_cos_max: float
    weight_cos_mean: float
    weight_pairs_above: Optional[int]
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
        eps: the tolerance used; dead_tol: the dead-unit tolerance of GELU / SiLU / LeakyReLU /
            Hardswish layers.
        layers: one :class:`LayerSingularities` per layer, in call order.
        means: model-level means over the layers that are not "post" of every scalar metric
            (NaN layers skipped; NaN when no layer has a value): keys ``dead_fraction``,
            ``small_weight_fraction``, ``weight_cos_max``, ``weight_cos_mean``, ``act_cos_max``,
            ``act_cos_mean``, ``participation_ratio``, ``effective_rank``,
            ``effective_rank_fraction``, ``small_eig_fraction``.
        total_units, total_dead: units and dead units summed over the layers that are not "post".
        post_means, post_total_units, post_total_dead: the same over the "post" layers (their
            weight metrics are NaN: no incoming weight); NaN means and 0 totals without post layers.
        num_samples: samples seen (not observations).
    """

    eps: float
    dead_tol: float
    layers: list[LayerSingularities]
    means: dict[str, float]
    total_units: int
    total_dead: int
    post_means: dict[str, float]
    post_total_units: int
    post_total_dead: int
    num_samples: int

    def summary(self) -> dict[str, float]:
        """Headline scalars: dead-unit fractions, activation overlap and effective rank (over the
        layers that are not "post"), and, when post layers were measured,
        ``post_dead_fraction_total`` and ``post_mean_effective_rank_fraction``."""
        out = {
            "dead_fraction_total": self.total_dead / self.total_units if self.total_units else math.nan,
            "mean_dead_fraction": self.means["dead_fraction"],
            "mean_act_cos_max": self.means["act_cos_max"],
            "mean_effective_rank_fraction": self.means["effective_rank_fraction"],
            "mean_small_eig_fraction": self.means["small_eig_fraction"],
        }
        if self.post_total_units:
            out["post_dead_fraction_total"] = self.post_total_dead / self.post_total_units
            out["post_mean_effective_rank_fraction"] = self.post_means["effective_rank_fraction"]
        return out

    def layer(self, name: str) -> LayerSingularities:
        """The first layer whose name, activation module name or weight layer name is ``name``."""
        for l in self.layers:
            if name in (l.name, l.module_name, l.weight_name):
                return l
        raise ValueError(f"layer: no layer named {name!r}; layers are {[l.name for l in self.layers]}")


@dataclass
class ActivationLayer:
    """One layer of units found by :func:`find_activation_layers` (module doc).

    Attributes:
        name, module_name, call: the layer's name, its activation module's name and call index.
        module: the activation module. activation: its class name.
        role: "stem" / "branch" / "post" / "other"; block: innermost block index or None.
        weight_name, weight_module: the incoming weight layer (None without one; then
            ``weight_reason`` says why).
        unit_dim: the dim of the activation tensor holding the units; n_units: its size;
            ndim: the activation tensor's number of dims; kind: "conv" or "linear".
    """

    name: str
    module_name: str
    call: int
    module: nn.Module
    activation: str
    role: str
    block: Optional[int]
    weight_name: Optional[str]
    weight_module: Optional[nn.Module]
    weight_reason: Optional[str]
    unit_dim: int
    n_units: int
    ndim: int
    kind: str


# ------------------------------------------------------------------------------ legacy static rule
@dataclass
class _Layer:
    name: str
    relu: nn.Module
    weight_name: str
    weight_module: nn.Module
    role: str
    block: Optional[int]


def find_relu_layers(model: nn.Module) -> list[_Layer]:
    """The earlier, static rule (kept for callers of it; :func:`singularities` uses
    :func:`find_activation_layers`): every ``nn.ReLU`` inside an ``nn.Sequential`` of ``model``
    with a preceding Linear / Conv in the same Sequential (module order)."""
    names = {id(m): n for n, m in model.named_modules()}
    infos = residual_blocks(model, required=False)  # blocks only label the layers (role, block index)
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


# ------------------------------------------------------------------------------ discovery
def _third_party(m: nn.Module, names: set[tuple[str, str]]) -> bool:
    return (type(m).__module__, type(m).__name__) in names


def _is_transparent(m: nn.Module) -> bool:
    return isinstance(m, _TRANSPARENT_TYPES) or _third_party(m, _TRANSPARENT_NAMES) or _third_party(m, _PERMUTE_NAMES)


def _traced(m: nn.Module) -> bool:
    return (next(m.children(), None) is None or isinstance(m, _WEIGHT_TYPES + ACTIVATION_TYPES)
            or _is_transparent(m))


@dataclass
class _Event:
    """One call of a traced module during the discovery pass."""

    module: nn.Module
    name: str
    src: Optional[int]                  # the event whose output is this call's input (same tensor, unmodified)
    in_shape: Optional[tuple[int, ...]]
    scope: Optional[int]                # index into _Trace.scopes of the innermost running scope call
    out_ndim: Optional[int] = None
    post_of: Optional[int] = None       # block index when this call is that block's post


@dataclass
class _ScopeCall:
    module: nn.Module
    blocks: list[int]                   # the blocks found on this module
    start: int
    post_spans: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # block -> [(start, end)]


def _first_tensor(args: tuple[Any, ...]) -> Optional[Tensor]:
    return next((a for a in args if isinstance(a, Tensor)), None)


class _Trace:
    """Forward hooks recording, for one forward pass, every call of the traced modules (in call
    order), which earlier call produced each call's input, and the residual blocks' scopes."""

    def __init__(self, model: nn.Module, infos: list[BlockInfo]) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.events: list[_Event] = []
        self.scopes: list[_ScopeCall] = []
        self.stack: list[int] = []      # running scope calls (indices into scopes)
        self.open: dict[int, list[int]] = {}
        self.running: list[int] = []    # traced calls still running (events), innermost last
        self.post_open: dict[int, list[int]] = {}
        self.produced: dict[int, tuple[Any, int, int]] = {}
        self.infos = infos
        self.scope_blocks: dict[int, list[int]] = {}
        for i, b in enumerate(infos):
            owner = getattr(b, "owner", None)
            self.scope_blocks.setdefault(id(owner if owner is not None else b.block), []).append(i)
        self.post_ids = {id(b.post) for b in infos}
        self.handles: list[Any] = []
        for _name, m in model.named_modules():
            if _traced(m) or id(m) in self.scope_blocks or id(m) in self.post_ids:
                self.handles.append(m.register_forward_pre_hook(self._pre))
                self.handles.append(m.register_forward_hook(self._post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _producer(self, x: Optional[Tensor]) -> Optional[int]:
        if x is None:
            return None
        rec = self.produced.get(id(x))
        if rec is None:
            return None
        ref, version, idx = rec
        try:
            same = ref() is x and x._version == version
        except RuntimeError:  # pragma: no cover - inference tensors have no version counter
            same = False
        return idx if same else None

    def _pre(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        key = id(m)
        if key in self.scope_blocks:
            self.scopes.append(_ScopeCall(m, self.scope_blocks[key], len(self.events)))
            self.stack.append(len(self.scopes) - 1)
        if key in self.post_ids:
            self.post_open.setdefault(key, []).append(len(self.events))
        if _traced(m):
            x = _first_tensor(args)
            src = self._producer(x)
            if src is None and self.running:
                # a child of a normalisation module that applies it inside (timm's BatchNormAct2d:
                # functional batch norm, then its drop and act children): the norm's call is the link
                outer = self.events[self.running[-1]].module
                if isinstance(outer, _NORM_TYPES) and any(c is m for c in outer.children()):
                    src = self.running[-1]
            self.open.setdefault(key, []).append(len(self.events))
            self.running.append(len(self.events))
            self.events.append(_Event(m, self.names.get(key, type(m).__name__), src,
                                      tuple(x.shape) if x is not None else None,
                                      self.stack[-1] if self.stack else None))

    def _post(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        key = id(m)
        if _traced(m) and self.open.get(key):
            idx = self.open[key].pop()
            if idx in self.running:
                self.running.remove(idx)
            if isinstance(out, Tensor):
                self.events[idx].out_ndim = out.dim()
                self.produced[id(out)] = (weakref.ref(out), out._version, idx)
        if key in self.post_ids and self.post_open.get(key):
            start = self.post_open[key].pop()
            for s in reversed(self.stack):  # the innermost running block whose post this is
                blocks = [b for b in self.scopes[s].blocks if self.infos[b].post is m]
                if blocks:
                    self.scopes[s].post_spans.setdefault(blocks[0], []).append((start, len(self.events)))
                    break
        if key in self.scope_blocks and self.stack:
            call = self.scopes[self.stack.pop()]
            for b, spans in call.post_spans.items():  # the post is the LAST call of the post module
                s, e = spans[-1]
                for i in range(s, e):
                    self.events[i].post_of = b


def _unit_dim_of_weight(w: nn.Module, out_ndim: int) -> int:
    if isinstance(w, _CONV_TYPES):
        spatial = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[next(t for t in _CONV_TYPES if isinstance(w, t))]
        return 1 if out_ndim == spatial + 2 else 0  # batched [N, C, *s] or unbatched [C, *s]
    return out_ndim - 1


def _resolve_weight(trace: _Trace, i: int) -> tuple[Optional[_Event], Optional[int], Optional[str]]:
    """Follow the producer links back from activation call ``i``: (weight event, unit dim of the
    activation tensor, reason when there is no incoming weight)."""
    permutes: list[_Event] = []
    ev = trace.events[i]
    j = ev.src
    while j is not None:
        e = trace.events[j]
        if isinstance(e.module, _WEIGHT_TYPES):
            if e.out_ndim is None:  # pragma: no cover - a weight layer returns a tensor
                return None, None, f"its weight layer {e.name!r} returned no tensor"
            ud = _unit_dim_of_weight(e.module, e.out_ndim)
            for p in reversed(permutes):  # from the weight towards the activation
                dims = [d % e.out_ndim for d in p.module.dims]
                ud = dims.index(ud)
            return e, ud, None
        if not _is_transparent(e.module):
            return None, None, (f"the module before it, {e.name!r} ({type(e.module).__name__}), is not a Linear / "
                                "Conv, normalisation, elementwise or permutation layer")
        if _third_party(e.module, _PERMUTE_NAMES):
            permutes.append(e)
        j = e.src
    return None, None, ("its input is not the unmodified output of a module (a residual sum, a concatenation "
                        "or another functional operation comes first)")


def _roles(trace: _Trace, infos: list[BlockInfo], i: int) -> tuple[str, Optional[int]]:
    ev = trace.events[i]
    if ev.post_of is not None:
        return "post", ev.post_of
    if ev.scope is None:
        return ("stem" if trace.scopes and i < trace.scopes[0].start else "other"), None
    blocks = trace.scopes[ev.scope].blocks
    for b in blocks:
        info = infos[b]
        mods = {id(m) for m in info.branch.modules()}
        if isinstance(info.post, ResidualSublayer):
            mods |= {id(m) for m in info.post.body.modules()}
        if id(ev.module) in mods:
            return "branch", b
    return "other", blocks[0]


def _discover(model: nn.Module, x: Tensor) -> list[ActivationLayer]:
    """The layers of ``model`` from one forward pass on ``x`` (modes and no_grad set by the caller)."""
    infos = residual_blocks(model, required=False)
    trace = _Trace(model, infos)
    try:
        model(x)
    finally:
        trace.remove()
    acts = [i for i, e in enumerate(trace.events) if isinstance(e.module, ACTIVATION_TYPES)]
    calls: dict[int, int] = {}
    for i in acts:
        calls[id(trace.events[i].module)] = calls.get(id(trace.events[i].module), 0) + 1
    seen: dict[int, int] = {}
    out: list[ActivationLayer] = []
    for i in acts:
        ev = trace.events[i]
        k = seen.get(id(ev.module), 0)
        seen[id(ev.module)] = k + 1
        name = ev.name if calls[id(ev.module)] == 1 else f"{ev.name}#{k}"
        role, block = _roles(trace, infos, i)
        shape = ev.in_shape or ()
        ndim = len(shape)
        if role == "post":
            w, ud, reason = None, None, ("a post-activation, applied after skip + branch: its input is a residual "
                                         "sum, with no single incoming weight")
        else:
            w, ud, reason = _resolve_weight(trace, i)
        if w is not None and ud is not None:
            n_rows = int(w.module.weight.shape[0])
            if ud >= ndim or shape[ud] != n_rows:
                reason = (f"its unit dim {ud} of shape {list(shape)} does not hold the {n_rows} output units of "
                          f"the weight layer {w.name!r} before it")
                w, ud = None, None
        if ud is None:  # no incoming weight: units by layout
            if ndim <= 2:
                ud = ndim - 1 if ndim else 0
            elif ndim == 3:
                last_w = next((e for e in reversed(trace.events[:i]) if isinstance(e.module, _WEIGHT_TYPES)), None)
                ud = 2 if last_w is not None and isinstance(last_w.module, nn.Linear) else 1
            else:
                ud = 1
        kind = "conv" if ndim > 2 and ud == 1 else "linear"
        out.append(ActivationLayer(
            name=name, module_name=ev.name, call=k, module=ev.module, activation=type(ev.module).__name__,
            role=role, block=block, weight_name=w.name if w is not None else None,
            weight_module=w.module if w is not None else None, weight_reason=reason, unit_dim=ud,
            n_units=int(shape[ud]) if ndim else 1, ndim=ndim, kind=kind))
    return out


def find_activation_layers(model: nn.Module, x: Tensor) -> list[ActivationLayer]:
    """The layers of units of ``model`` (module doc): one forward pass on ``x`` under
    ``torch.no_grad`` in eval mode (every module's mode restored), hooks removed afterwards.

    Args:
        model: any ``nn.Module``. x: one input batch, on the model's device and in its dtype.

    Returns:
        one :class:`ActivationLayer` per call of an elementwise activation module, in call order.
    """
    check_module("find_activation_layers", "model", model)
    with module_mode(model, False), torch.no_grad():
        return _discover(model, x)


# ------------------------------------------------------------------------------ dead rules
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _out_and_derivative(act: nn.Module, z: Tensor) -> tuple[Tensor, Tensor]:
    """Output and derivative of the activation at z (float64), as torch defines them."""
    if isinstance(act, nn.GELU):
        if act.approximate == "tanh":
            u = _SQRT_2_OVER_PI * (z + 0.044715 * z ** 3)
            t = torch.tanh(u)
            d = 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * z * z)
            return 0.5 * z * (1 + t), d
        cdf = 0.5 * (1 + torch.erf(z / _SQRT2))
        return z * cdf, cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
    if isinstance(act, nn.SiLU):
        s = torch.sigmoid(z)
        return z * s, s * (1 + z * (1 - s))
    if isinstance(act, nn.Hardswish):
        out = z * (z + 3).clamp(0, 6) / 6
        d = torch.where(z < -3, torch.zeros_like(z), torch.where(z <= 3, (2 * z + 3) / 6, torch.ones_like(z)))
        return out, d
    if isinstance(act, nn.LeakyReLU):
        a = float(act.negative_slope)
        return torch.where(z > 0, z, a * z), torch.where(z > 0, torch.ones_like(z), torch.full_like(z, a))
    raise AssertionError(f"no derivative for {type(act).__name__}")  # pragma: no cover


def _dead_rule(act: nn.Module, dead_tol: float) -> str:
    if isinstance(act, nn.ReLU):
        return "ReLU: output 0 (pre-activation <= 0) at every observation"
    if isinstance(act, nn.ReLU6):
        return "ReLU6: derivative 0 (pre-activation <= 0 or >= 6: zero or saturated) at every observation"
    return (f"{type(act).__name__}: |output| <= dead_tol and |derivative| <= dead_tol (dead_tol={dead_tol:g}, "
            "float64 from the pre-activation) at every observation")


def _from_output(act: nn.Module) -> bool:
    """Whether the dead rule is read off the output (ReLU, ReLU6) instead of the pre-activation."""
    return isinstance(act, (nn.ReLU, nn.ReLU6))


def _inactive_from_output(act: nn.Module, zz: Tensor) -> Tensor:
    if isinstance(act, nn.ReLU6):
        return (zz <= 0) | (zz >= 6)   # clamp(z, 0, 6): output 0 or 6 <=> z <= 0 or z >= 6
    return zz <= 0                     # ReLU: output 0 <=> z <= 0


def _inactive_from_input(act: nn.Module, zz: Tensor, dead_tol: float) -> Tensor:
    out, d = _out_and_derivative(act, zz)
    return (out.abs() <= dead_tol) & (d.abs() <= dead_tol)


# ------------------------------------------------------------------------------ statistics
def _flat(t: Tensor, unit_dim: int, n: int) -> Tensor:
    """[..., n at unit_dim, ...] -> [obs, n] float64."""
    t = t.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    t = t.movedim(unit_dim, -1)
    return t.reshape(math.prod(t.shape[:-1]), n).double()


class _Stats:
    """Streaming float64 statistics of one layer's activations."""

    def __init__(self, lay: ActivationLayer, device: torch.device) -> None:
        n = lay.n_units
        self.lay, self.n, self.count = lay, n, 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.live = torch.zeros(n, dtype=torch.int64, device=device)

    def _check(self, t: Any, what: str) -> Tensor:
        lay = self.lay
        if not isinstance(t, Tensor) or t.dim() != lay.ndim or (t.dim() and t.shape[lay.unit_dim] != self.n):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{_WHERE}: expected the {what} of {lay.activation} {lay.name!r} to have {self.n} units "
                             f"in dimension {lay.unit_dim} of a {lay.ndim}-dim tensor (as on the first batch), "
                             f"got {got}")
        return t

    def add_input(self, z: Any, dead_tol: float) -> None:
        z = self._check(z, "input")
        zz = _flat(z, self.lay.unit_dim, self.n)
        if zz.shape[0]:
            self.live += (~_inactive_from_input(self.lay.module, zz, dead_tol)).sum(0)

    def add_output(self, out: Any, batch: int) -> None:
        out = self._check(out, "output")
        check_finite_tensor(_WHERE, out.detach(), f"the output of {self.lay.activation} {self.lay.name!r} on batch "
                                                  f"{batch} (the model's parameters and x are finite: the forward "
                                                  "pass overflowed)")
        zz = _flat(out, self.lay.unit_dim, self.n)  # [obs, n]
        self.count += zz.shape[0]
        if zz.shape[0] == 0:
            return
        if _from_output(self.lay.module):
            self.live += (~_inactive_from_output(self.lay.module, zz)).sum(0)
        self.sum += zz.sum(0)
        self.gram += zz.t() @ zz


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


def _layer_metrics(lay: ActivationLayer, st: _Stats, eps: float, dead_tol: float) -> LayerSingularities:
    n = st.n
    if not (bool(torch.isfinite(st.gram).all()) and bool(torch.isfinite(st.sum).all())):
        raise NonFiniteError(f"{_WHERE}: expected finite activation statistics at {lay.activation} {lay.name!r}, got "
                             "NaN or inf in the float64 Gram matrix (the activations overflow it)")
    nan = math.nan
    head = dict(name=lay.name, module_name=lay.module_name, call=lay.call, activation=lay.activation,
                dead_rule=_dead_rule(lay.module, dead_tol), weight_name=lay.weight_name,
                weight_reason=lay.weight_reason, role=lay.role, block=lay.block, kind=lay.kind,
                unit_dim=lay.unit_dim, n_units=n, observations=st.count)
    # weights
    if lay.weight_module is not None:
        W = lay.weight_module.weight.detach()
        W = W.reshape(W.shape[0], math.prod(W.shape[1:])).double()
        n_in: Optional[int] = int(W.shape[1])
        norms: Optional[Tensor] = torch.linalg.vector_norm(W, dim=1)
        small_w = float((norms < eps * float(norms.median())).double().mean()) if n else nan
        wu, wmax, wmean, wpairs = _pair_cos(W @ W.t(), eps)
        w_used: Optional[int] = wu
        w_pairs: Optional[int] = wpairs
        norms = norms.cpu()
    else:
        n_in, norms, small_w, w_used, wmax, wmean, w_pairs = None, None, nan, None, nan, nan, None
    weights = dict(n_in=n_in, weight_norms=norms, small_weight_fraction=small_w, weight_units_used=w_used,
                   weight_cos_max=wmax, weight_cos_mean=wmean, weight_pairs_above=w_pairs)
    if n == 0:
        empty = torch.zeros(0, dtype=torch.float64)
        return LayerSingularities(
            **head, **weights, dead_units=torch.zeros(0, dtype=torch.int64), dead_fraction=nan, act_units_used=0,
            act_cos_max=nan, act_cos_mean=nan, act_pairs_above=0, cov_eigenvalues=empty, participation_ratio=nan,
            effective_rank=nan, effective_rank_fraction=nan, small_eig_fraction=nan)
    # elimination: dead by the activation's rule at every observation
    dead = torch.nonzero(st.live == 0).flatten().cpu() if st.count else torch.zeros(0, dtype=torch.int64)
    # overlap
    au, amax, amean, apairs = _pair_cos(st.gram, eps)
    # linear dependence
    N = st.count
    mean = st.sum / max(N, 1)
    cov = st.gram / max(N, 1) - torch.outer(mean, mean)
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
        **head, **weights, dead_units=dead, dead_fraction=dead.numel() / n, act_units_used=au, act_cos_max=amax,
        act_cos_mean=amean, act_pairs_above=apairs, cov_eigenvalues=mu.cpu(), participation_ratio=pr,
        effective_rank=erank, effective_rank_fraction=erank / n, small_eig_fraction=small_eig,
    )


def _select(layers: list[ActivationLayer], which: Optional[Sequence[Union[int, str]]]) -> list[ActivationLayer]:
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
    out: list[ActivationLayer] = []
    for it in items:
        if isinstance(it, bool) or not isinstance(it, (int, str)):
            raise TypeError(f"{_WHERE}: expected layers entries layer / activation module / weight module names "
                            f"or indices, got {type(it).__name__}")
        if isinstance(it, int):
            if not 0 <= it < len(layers):
                raise ValueError(f"{_WHERE}: expected layer indices in [0, {len(layers) - 1}], got {it}")
            picked = [layers[it]]
        else:
            picked = [l for l in layers if it == l.name]  # a layer name; else every call of a module / weight
            picked = picked or [l for l in layers if it in (l.module_name, l.weight_name)]
            if not picked:
                raise ValueError(f"{_WHERE}: no layer named {it!r}; layers are {[l.name for l in layers]}")
        out.extend(l for l in picked if l not in out)
    return out


def _means(results: list[LayerSingularities]) -> dict[str, float]:
    means: dict[str, float] = {}
    for key in _SCALARS:
        vals = [getattr(r, key) for r in results if not math.isnan(getattr(r, key))]
        means[key] = sum(vals) / len(vals) if vals else math.nan
    return means


class _Watch:
    """Measurement hooks on the chosen layers' activation modules (one pre- and one forward hook
    per module; a call counter per module maps each call to its layer)."""

    def __init__(self, chosen: list[ActivationLayer], stats: list[_Stats], dead_tol: float) -> None:
        self.dead_tol = dead_tol
        self.batch = 0
        self.slot: dict[tuple[int, int], int] = {(id(l.module), l.call): s for s, l in enumerate(chosen)}
        self.stats = stats
        self.modules = list({id(l.module): l.module for l in chosen}.values())
        self.calls: dict[int, int] = {}
        self.current: dict[int, Optional[int]] = {}
        self.handles: list[Any] = []
        for m in self.modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))

    def reset(self, batch: int) -> None:
        self.batch = batch
        self.calls = {id(m): 0 for m in self.modules}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        k = self.calls[id(m)]
        self.calls[id(m)] = k + 1
        slot = self.slot.get((id(m), k))
        self.current[id(m)] = slot
        if slot is not None and not _from_output(m):
            self.stats[slot].add_input(_first_tensor(args), self.dead_tol)

    def _post(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        slot = self.current.get(id(m))
        if slot is not None:
            self.stats[slot].add_output(out, self.batch)


def singularities(model: nn.Module, data: Any, *, eps: float = 1e-3,
                  layers: Optional[Sequence[Union[int, str]]] = None, dead_tol: float = 1e-6,
                  distributed: Optional[str] = None) -> SingularityResult:
    """Elimination, overlap and linear-dependence singularities of every layer of units.

    Args:
        model: any ``nn.Module`` with elementwise activation modules (module doc: one layer per
            call of an nn.ReLU / ReLU6 / GELU / SiLU / LeakyReLU / Hardswish).
        data: one ``(x, y)`` batch, a resgeom_fast Dataset (its train split) or an iterable of
            batches (a DataLoader); x on the model's device and in its dtype. Streamed once; the
            layers are found on the first non-empty batch.
        eps: tolerance in (0, 1): weight norms below ``eps * median``, pairs with
            ``|cos| > 1 - eps``, eigenvalues below ``eps * mu_1``.
        layers: None (every layer found) or layer names (``"<module>"`` / ``"<module>#k"``),
            activation module names (every call of it), weight module names, or indices into the
            discovered list (:func:`find_activation_layers` on the first batch).
        dead_tol: in [0, 1): the dead-unit tolerance of GELU / SiLU / LeakyReLU / Hardswish
            layers (|output| and |derivative| <= dead_tol at every observation). ReLU and ReLU6
            layers use exact rules (module doc).
        distributed: None (one process), or data-parallel in an initialised torch.distributed
            group (docs/distributed.md): ``"split"`` every rank passes the same full ``data`` and
            streams its share (:func:`resgeom_fast.core.distributed.shard`), ``"sharded"`` every
            rank passes its own share (possibly no batch). The layers are found on one probe
            sample shared by the lowest rank with data (module doc). A collective: every rank
            calls it with the same model and arguments, and every rank gets the single-process
            result.

    Returns:
        a :class:`SingularityResult` (tensors on the CPU, float64 / int64).

    Raises:
        NonFiniteError: a NaN / inf in a model parameter or buffer (named; checked before any
            forward pass), in the inputs x of a batch, or in an activation's output (named, with
            the batch).
        ValueError: no activation layer in the model, a layer selection that names none, a
            watched module running a different number of times than on the first batch.
    """
    check_module(_WHERE, "model", model)
    eps = check_float(_WHERE, "eps", eps, 0.0, 1.0, open_lo=True)
    if eps >= 1.0:
        raise ValueError(f"{_WHERE}: expected eps < 1, got {eps!r}")
    dead_tol = check_float(_WHERE, "dead_tol", dead_tol, 0.0, 1.0)
    if dead_tol >= 1.0:
        raise ValueError(f"{_WHERE}: expected dead_tol < 1, got {dead_tol!r}")
    device, dtype = model_device_dtype(_WHERE, model)
    check_finite_parameters(_WHERE, model)
    mode = check_mode(_WHERE, distributed)
    if mode is not None:
        check_model(_WHERE, model)    # a collective: the ranks' sums are combined
        chosen, stats, n_samples = _stream_distributed(model, data, mode, device, dtype, layers, dead_tol)
        return _result(chosen, stats, n_samples, eps, dead_tol)
    chosen: list[ActivationLayer] = []
    stats: list[_Stats] = []
    expected: dict[int, int] = {}
    watch: Optional[_Watch] = None
    n_samples = 0
    try:
        with module_mode(model, False), torch.no_grad():
            for i, (x, _y) in enumerate(batches(_WHERE, data, device, dtype)):
                check_finite_tensor(_WHERE, x, f"the inputs x of batch {i}")
                if int(x.shape[0]) == 0:
                    continue  # no observations
                if watch is None:
                    found = _discover(model, x)
                    if not found:
                        raise ValueError(f"{_WHERE}: found no {_ACT_WORDS} module called in the forward pass of "
                                         f"{type(model).__name__}; there are no layers of units to analyse")
                    chosen = _select(found, layers)
                    for lay in found:
                        expected[id(lay.module)] = expected.get(id(lay.module), 0) + 1
                    stats = [_Stats(l, device) for l in chosen]
                    watch = _Watch(chosen, stats, dead_tol)
                _run_batch(model, x, i, watch, expected, chosen)
                n_samples += int(x.shape[0])
    finally:
        if watch is not None:
            watch.remove()
    if n_samples == 0:
        raise ValueError(f"{_WHERE}: expected data with at least one sample, got only empty batches")
    return _result(chosen, stats, n_samples, eps, dead_tol)


def _result(chosen: list[ActivationLayer], stats: list[_Stats], n_samples: int, eps: float,
            dead_tol: float) -> SingularityResult:
    results = [_layer_metrics(l, st, eps, dead_tol) for l, st in zip(chosen, stats)]
    main = [r for r in results if r.role != "post"]
    post = [r for r in results if r.role == "post"]
    return SingularityResult(
        eps=eps, dead_tol=dead_tol, layers=results, means=_means(main), total_units=sum(r.n_units for r in main),
        total_dead=sum(int(r.dead_units.numel()) for r in main), post_means=_means(post),
        post_total_units=sum(r.n_units for r in post), post_total_dead=sum(int(r.dead_units.numel()) for r in post),
        num_samples=n_samples,
    )


def _run_batch(model: nn.Module, x: Tensor, i: int, watch: _Watch, expected: dict[int, int],
               chosen: list[ActivationLayer]) -> None:
    """One measured forward pass; every watched module must run as often as on the probe."""
    watch.reset(i)
    model(x)
    for m in watch.modules:
        if watch.calls[id(m)] != expected[id(m)]:
            name = next(l.module_name for l in chosen if l.module is m)
            raise ValueError(f"{_WHERE}: expected {type(m).__name__} {name!r} to run {expected[id(m)]} "
                             f"time(s) per forward pass as on the first batch, it ran "
                             f"{watch.calls[id(m)]} times on batch {i}")


def _stream_distributed(model: nn.Module, data: Any, mode: str, device: torch.device, dtype: torch.dtype,
                        layers: Optional[Sequence[Union[int, str]]], dead_tol: float
                        ) -> tuple[list[ActivationLayer], list[_Stats], int]:
    """This rank's share streamed, the layers found on the shared probe, the statistics summed
    over the ranks (module doc): ``(chosen layers, their summed stats, global sample count)``."""
    exc: Optional[BaseException] = None
    probe: Optional[Tensor] = None
    source = local_batches(_WHERE, data, mode, device, dtype)
    first: Optional[tuple[int, Tensor]] = None
    try:
        for i, (x, _y) in enumerate(source):
            check_finite_tensor(_WHERE, x, f"the inputs x of batch {i}")
            if int(x.shape[0]) > 0:
                first = (i, x)
                probe = x[:1].detach().cpu()
                break
    except Exception as e:  # shared below: every rank raises it
        exc = e
    infos = gather_objects(_WHERE, (portable(exc), probe))
    raise_first(_WHERE, [e for e, _ in infos], exc)
    probes = [p for _, p in infos if p is not None]
    if not probes:
        raise ValueError(f"{_WHERE}: expected data with at least one sample on some rank, got none on any of the "
                         f"{world_size()} ranks")
    watch: Optional[_Watch] = None
    n_samples = 0
    with module_mode(model, False), torch.no_grad():
        found = _discover(model, probes[0].to(device))
        if not found:
            raise ValueError(f"{_WHERE}: found no {_ACT_WORDS} module called in the forward pass of "
                             f"{type(model).__name__}; there are no layers of units to analyse")
        chosen = _select(found, layers)   # the same on every rank: raises on every rank alike
        expected: dict[int, int] = {}
        for lay in found:
            expected[id(lay.module)] = expected.get(id(lay.module), 0) + 1
        stats = [_Stats(l, device) for l in chosen]
        watch = _Watch(chosen, stats, dead_tol)
        try:
            if first is not None:
                _run_batch(model, first[1], first[0], watch, expected, chosen)
                n_samples += int(first[1].shape[0])
                for i, (x, _y) in enumerate(source, start=first[0] + 1):
                    check_finite_tensor(_WHERE, x, f"the inputs x of batch {i}")
                    if int(x.shape[0]) == 0:
                        continue
                    _run_batch(model, x, i, watch, expected, chosen)
                    n_samples += int(x.shape[0])
        except Exception as e:  # shared below: every rank raises it
            exc = e
        finally:
            watch.remove()
    head = torch.tensor([float(exc is not None), float(n_samples)], dtype=torch.float64, device=device)
    parts = [head] + [t for st in stats for t in (torch.tensor(float(st.count), dtype=torch.float64, device=device),
                                                  st.sum, st.gram, st.live)]
    summed = all_reduce_sum(parts, fn=_WHERE)
    sync_failure(_WHERE, bool(summed[0][0] > 0), exc)
    for i, st in enumerate(stats):
        cnt, st.sum, st.gram, st.live = summed[1 + 4 * i:5 + 4 * i]
        st.count = int(cnt)
    return chosen, stats, int(summed[0][1])


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
    labels = [l["role"] if l["block"] is None else f"{'p' if l['role'] == 'post' else 'b'}{l['block']}" for l in layers]

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
