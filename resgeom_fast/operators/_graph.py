"""Structure recognition for the structured curvature products: a torch.fx trace of what a model
computes, read into a small DAG of the layers the R-operator of
:mod:`resgeom_fast.operators._structured_conv` covers, or refused with the reason.

The model is traced with :func:`torch.fx.symbolic_trace` (arguments of ``forward`` after the
first that have defaults are fixed to them) under the operator's module mode, so that
``training`` branches take the eval path. Every node of the trace becomes one :class:`GNode`:

- ``"input"``: the first argument of ``forward`` (the images / features x, [N, ...]);
- ``"affine"``: ``nn.Linear`` (2-D input) / ``nn.Conv2d`` (any stride, padding, dilation;
  ``groups=1``, zero padding), or ``F.linear`` / ``F.conv2d`` with fixed (non-chosen) weights,
  with an eval-mode ``BatchNorm1d`` / ``BatchNorm2d`` that is the only user of its output folded
  in: ``y = s (conv(x, W) + b - mu) + beta``, ``s = gamma / sqrt(var + eps)``;
- ``"bn"``: an eval-mode BatchNorm that does not follow such a layer (per channel, dim 1);
- ``"relu"``: ``nn.ReLU`` (also inplace), ``F.relu``, ``torch.relu``, ``Tensor.relu(_)``;
- ``"add"``: the sum of two traced tensors (``+``, ``out += identity``, ``torch.add``), and
  ``"shift"``: a traced tensor plus a constant (no tangent of its own);
- ``"scale"``: a traced tensor times / divided by a python number;
- ``"maxpool"`` (``nn.MaxPool2d`` / ``F.max_pool2d``), ``"avgpool"`` (``nn.AvgPool2d`` /
  ``F.avg_pool2d``), ``"adaptive_avgpool"`` (``nn.AdaptiveAvgPool2d`` / ``F.adaptive_avg_pool2d``);
- ``"reshape"``: ``flatten`` / ``view`` / ``reshape`` that keep the batch axis (checked on the
  first batch), and ``"identity"``: ``nn.Identity``, ``nn.Dropout`` / ``F.dropout`` in eval mode,
  ``Tensor.contiguous``;
- ``"const"``: values that do not depend on x (buffers, shapes, sizes), evaluated in the primal pass.

Anything else is refused, naming the node: ``"node 'layer1.0.gelu' (GELU) is not covered"``.
The model's output must be one tensor (the logits). Every chosen parameter must sit in a
recognised layer; a chosen parameter read by ``get_attr`` (used functionally) is refused.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resgeom_fast.operators._data import module_mode

__all__ = ["GNode", "TracedGraph", "trace_graph"]


@dataclass
class GNode:
    """One node of the recognised graph (module doc). ``args``: indices of the traced tensors it
    reads (into :attr:`TracedGraph.nodes`); ``fx``: the fx node, for messages and for evaluating
    constants / reshapes; the remaining fields by kind."""

    kind: str
    name: str
    args: list[int]
    fx: Optional[fx.Node] = None
    # affine: layer "conv" | "linear"; W/b the weight/bias tensors (parameters or fixed buffers);
    # conv geometry; bn an eval-mode BatchNorm folded in; i* the indices of chosen parameters
    layer: str = ""
    W: Optional[Tensor] = None
    b: Optional[Tensor] = None
    w_node: Optional[int] = None     # fixed weight / bias from a "const" node (F.linear / F.conv2d)
    b_node: Optional[int] = None
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    bn: Optional[_BatchNorm] = None
    iw: Optional[int] = None
    ib: Optional[int] = None
    ig: Optional[int] = None
    ibeta: Optional[int] = None
    factor: float = 1.0              # scale
    pool: dict = field(default_factory=dict)   # pooling arguments
    consts: list[Any] = field(default_factory=list)  # shift: constants (fx args) added


@dataclass
class TracedGraph:
    """The recognised graph: ``nodes`` in execution order, ``out`` the index of the logits."""

    nodes: list[GNode]
    out: int
    params: list[Tensor]
    fx_index: dict = field(default_factory=dict)   # fx node -> index of the GNode holding its value

    @property
    def known(self) -> set[int]:
        """Indices of the chosen parameters the graph's layers hold."""
        s: set[int] = set()
        for n in self.nodes:
            s.update(i for i in (n.iw, n.ib, n.ig, n.ibeta) if i is not None)
        return s


_RELU_FNS = (F.relu, torch.relu, torch.relu_)
_ADD_FNS = (operator.add, operator.iadd, torch.add)
_MUL_FNS = (operator.mul, operator.imul, torch.mul)
_SHAPE_METHODS = ("size", "dim")


class _Refused(Exception):
    pass


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(t) for t in v)  # type: ignore[return-value]


def _describe(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        return f"node {node.target!r} ({type(model.get_submodule(str(node.target))).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"node {node.name!r} ({node.op} {target})"


def _concrete_args(model: nn.Module) -> Optional[dict[str, Any]]:
    """Defaults of forward's arguments after the first (fixed for the trace)."""
    sig = inspect.signature(model.forward)
    ps = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD,
                                                           p.KEYWORD_ONLY)]
    if not ps:
        raise _Refused("forward takes no input argument")
    out: dict[str, Any] = {}
    for p in ps[1:]:
        if p.default is inspect.Parameter.empty:
            raise _Refused(f"forward's argument {p.name!r} has no default (only forward(x) is traced)")
        out[p.name] = p.default
    return out or None


def trace_graph(model: nn.Module, params: Sequence[Tensor], batchnorm: str) -> tuple[Optional[TracedGraph], str]:
    """The recognised graph of ``model`` with the chosen ``params``, or (None, why not)."""
    if batchnorm != "eval":
        return None, "batchnorm='train' (batch statistics couple the samples)"
    try:
        concrete = _concrete_args(model)
        with module_mode(model, batchnorm):
            try:
                gm = fx.symbolic_trace(model, concrete_args=concrete)
            except Exception as exc:  # noqa: BLE001 -- any tracing failure is a stated refusal
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise _Refused(f"torch.fx could not trace the model ({type(exc).__name__}: {msg[:160]})")
            return _read(gm, model, params), ""
    except _Refused as exc:
        return None, str(exc)


def _read(gm: fx.GraphModule, model: nn.Module, params: Sequence[Tensor]) -> TracedGraph:
    pos = {id(p): i for i, p in enumerate(params)}
    nodes: list[GNode] = []
    where: dict[fx.Node, int] = {}     # fx node -> index of its GNode
    live: set[fx.Node] = set()         # nodes that depend on the input
    seen_input = False
    fixed: set[fx.Node] = set()        # forward's fixed arguments and fx's checks of them
    out_idx: Optional[int] = None

    def arg_nodes(node: fx.Node) -> list[fx.Node]:
        return list(node.all_input_nodes)

    def add(node: fx.Node, g: GNode) -> None:
        where[node] = len(nodes)
        nodes.append(g)

    def idx_of(t: Optional[Tensor]) -> Optional[int]:
        return None if t is None else pos.get(id(t))

    def refuse(node: fx.Node, why: str = "is not covered") -> _Refused:
        return _Refused(f"{_describe(node, model)} {why}")

    def check_inplace_input(node: fx.Node, src: fx.Node) -> None:
        """An in-place op must be the last reader of its input (else the functional graph differs)."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        if any(order[u] > order[node] for u in src.users if u is not node):
            raise refuse(node, f"modifies {src.name!r} in place, which is read again later")

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if seen_input:   # an argument fixed to its default (concrete_args): only fx's own checks read it
                fixed.add(node)
                continue
            seen_input = True
            live.add(node)
            add(node, GNode("input", node.name, [], node))
            continue
        if node.op == "output":
            res = node.args[0]
            if not isinstance(res, fx.Node) or res not in live:
                raise _Refused("the model's output is not one tensor computed from the input (the logits)")
            out_idx = where[res]
            continue
        ins = arg_nodes(node)
        lv = [a for a in ins if a in live]
        if any(a in fixed for a in ins):
            if lv:
                raise refuse(node, "reads an argument of forward other than the input")
            fixed.add(node)     # fx's check of a fixed argument (eq, _assert): not part of the model
            continue
        if node.op == "get_attr":
            obj = _fetch_attr(gm, str(node.target))
            if isinstance(obj, Tensor) and id(obj) in pos:
                raise refuse(node, "reads a chosen parameter functionally (get_attr); only module layers are covered")
            add(node, GNode("const", node.name, [], node))
            continue
        if not lv:        # depends on constants only: evaluated as it is
            if node.op == "call_module":
                mod = model.get_submodule(str(node.target))
                if any(id(p) in pos for p in mod.parameters()):
                    raise refuse(node, "does not depend on the input but holds chosen parameters")
            add(node, GNode("const", node.name, [], node))
            continue
        live.add(node)
        if node.op == "call_module":
            mod = model.get_submodule(str(node.target))
            _read_module(node, mod, lv, where, nodes, add, idx_of, refuse, check_inplace_input)
        elif node.op == "call_function":
            _read_function(node, lv, where, nodes, add, idx_of, refuse, check_inplace_input, live)
        elif node.op == "call_method":
            _read_method(node, lv, where, nodes, add, refuse, check_inplace_input, live)
        else:
            raise refuse(node)
    if out_idx is None:
        raise _Refused("the trace has no output")
    folded, new_index = _fold_bn(nodes)
    g = TracedGraph(folded, new_index[out_idx], list(params),
                    {n.fx: new_index[i] for i, n in enumerate(nodes)})
    missing = [i for i in range(len(params)) if i not in g.known]
    if missing:
        raise _Refused(f"{len(missing)} chosen parameters are not in a recognised layer (e.g. parameter {missing[0]})")
    return g


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _read_module(node: fx.Node, mod: nn.Module, lv: list[fx.Node], where: dict, nodes: list, add: Callable,
                 idx_of: Callable, refuse: Callable, check_inplace: Callable) -> None:
    a = [where[lv[0]]]
    if len(lv) != 1 or len(node.args) != 1 or node.kwargs:
        raise refuse(node, "is called with other arguments than one traced tensor")
    if type(mod) is nn.Linear:
        add(node, GNode("affine", node.name, a, node, layer="linear", W=mod.weight, b=mod.bias,
                        iw=idx_of(mod.weight), ib=idx_of(mod.bias)))
    elif type(mod) is nn.Conv2d:
        if mod.groups != 1:
            raise refuse(node, f"has groups={mod.groups} (only groups=1 is covered)")
        if mod.padding_mode != "zeros":
            raise refuse(node, f"has padding_mode={mod.padding_mode!r} (only 'zeros' is covered)")
        add(node, GNode("affine", node.name, a, node, layer="conv", W=mod.weight, b=mod.bias,
                        stride=_pair(mod.stride), padding=_conv_padding(node, mod.padding, mod.kernel_size,
                                                                         mod.dilation, refuse),
                        dilation=_pair(mod.dilation), iw=idx_of(mod.weight), ib=idx_of(mod.bias)))
    elif type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if mod.running_mean is None or mod.running_var is None:
            raise refuse(node, "has no running statistics (it normalises by batch statistics)")
        add(node, GNode("bn", node.name, a, node, bn=mod, ig=idx_of(mod.weight), ib=idx_of(mod.bias)))
    elif type(mod) is nn.ReLU:
        if mod.inplace:
            check_inplace(node, lv[0])
        add(node, GNode("relu", node.name, a, node))
    elif type(mod) in (nn.Identity, nn.Dropout):
        add(node, GNode("identity", node.name, a, node))
    elif type(mod) is nn.Flatten:
        add(node, GNode("reshape", node.name, a, node))
    elif type(mod) is nn.MaxPool2d:
        add(node, GNode("maxpool", node.name, a, node, pool=dict(
            kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
            ceil_mode=mod.ceil_mode)))
    elif type(mod) is nn.AvgPool2d:
        add(node, GNode("avgpool", node.name, a, node, pool=dict(
            kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, ceil_mode=mod.ceil_mode,
            count_include_pad=mod.count_include_pad, divisor_override=mod.divisor_override)))
    elif type(mod) is nn.AdaptiveAvgPool2d:
        add(node, GNode("adaptive_avgpool", node.name, a, node, pool=dict(output_size=mod.output_size)))
    else:
        raise refuse(node)


def _conv_padding(node: fx.Node, padding: Any, kernel: Any, dilation: Any, refuse: Callable) -> tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        tot = [d * (k - 1) for d, k in zip(_pair(dilation), _pair(kernel))]
        if any(t % 2 for t in tot):
            raise refuse(node, "has padding='same' with asymmetric padding (not covered)")
        return (tot[0] // 2, tot[1] // 2)
    return _pair(padding)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _read_function(node: fx.Node, lv: list[fx.Node], where: dict, nodes: list, add: Callable, idx_of: Callable,
                   refuse: Callable, check_inplace: Callable, live: set) -> None:
    t, args, kw = node.target, node.args, node.kwargs
    a = [where[lv[0]]]
    if t in _RELU_FNS:
        if t is torch.relu_ or kw.get("inplace", False) or (len(args) > 1 and args[1]):
            check_inplace(node, lv[0])
        add(node, GNode("relu", node.name, a, node))
    elif t in _ADD_FNS:
        _read_add(node, lv, where, add, refuse, check_inplace, inplace=t is operator.iadd)
    elif t in _MUL_FNS or t is operator.truediv:
        _read_scale(node, lv, where, add, refuse, div=t is operator.truediv)
    elif t is torch.flatten:
        add(node, GNode("reshape", node.name, a, node))
    elif t in (F.dropout,):
        training = kw.get("training", args[2] if len(args) > 2 else True)
        p = kw.get("p", args[1] if len(args) > 1 else 0.5)
        if training and p != 0:
            raise refuse(node, "is dropout in training mode")
        add(node, GNode("identity", node.name, a, node))
    elif t in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d):
        add(node, GNode("adaptive_avgpool", node.name, a, node, pool=dict(
            output_size=kw.get("output_size", args[1] if len(args) > 1 else None))))
    elif t is F.max_pool2d or getattr(t, "__name__", "") == "_max_pool2d":
        if kw.get("return_indices", False):
            raise refuse(node, "returns indices (not covered)")
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        vals = dict(zip(names, args[1:]))
        vals.update({k: v for k, v in kw.items() if k in names})
        vals.setdefault("stride", None)
        add(node, GNode("maxpool", node.name, a, node, pool=_pool_defaults(vals, dict(
            padding=0, dilation=1, ceil_mode=False))))
    elif t in (F.avg_pool2d, torch._C._nn.avg_pool2d):
        names = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
        vals = dict(zip(names, args[1:]))
        vals.update({k: v for k, v in kw.items() if k in names})
        add(node, GNode("avgpool", node.name, a, node, pool=_pool_defaults(vals, dict(
            stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None))))
    elif t in (F.linear, F.conv2d):
        _read_functional_affine(node, lv, where, add, refuse)
    elif t is getattr and len(args) == 2 and args[1] in ("shape", "ndim", "dtype", "device"):
        live.discard(node)
        add(node, GNode("const", node.name, [], node))
    else:
        raise refuse(node)


def _pool_defaults(vals: dict, defaults: dict) -> dict:
    for k, v in defaults.items():
        vals.setdefault(k, v)
    if vals.get("stride") in (None, [], ()):
        vals["stride"] = vals["kernel_size"]
    return vals


def _read_functional_affine(node: fx.Node, lv: list[fx.Node], where: dict, add: Callable, refuse: Callable) -> None:
    t, args, kw = node.target, node.args, node.kwargs
    names = (("input", "weight", "bias") if t is F.linear
             else ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
    vals = dict(zip(names, args))
    vals.update(kw)
    if len(lv) != 1 or vals.get("input") is not lv[0]:
        raise refuse(node, "has a weight computed from the input (not covered)")
    w, b = vals.get("weight"), vals.get("bias")
    if not isinstance(w, fx.Node) or (b is not None and not isinstance(b, fx.Node)):
        raise refuse(node, "has a weight that is not a traced constant")
    g = GNode("affine", node.name, [where[lv[0]]], node, layer="linear" if t is F.linear else "conv",
              w_node=where[w], b_node=None if b is None else where[b])
    if t is F.conv2d:
        if int(vals.get("groups", 1)) != 1:
            raise refuse(node, "has groups != 1 (only groups=1 is covered)")
        g.stride = _pair(vals.get("stride", 1))
        g.dilation = _pair(vals.get("dilation", 1))
        pad = vals.get("padding", 0)
        if isinstance(pad, str):
            raise refuse(node, "has string padding on a functional conv2d (not covered)")
        g.padding = _pair(pad)
    add(node, g)


def _read_add(node: fx.Node, lv: list[fx.Node], where: dict, add: Callable, refuse: Callable,
              check_inplace: Callable, inplace: bool) -> None:
    args, kw = node.args, node.kwargs
    if kw.get("alpha", 1) != 1 or len(args) != 2 or set(kw) - {"alpha"}:
        raise refuse(node, "is an add with other arguments than two summands")
    if inplace:
        check_inplace(node, args[0]) if isinstance(args[0], fx.Node) else None
    tensors = [a for a in args if isinstance(a, fx.Node) and a in lv]
    if len(tensors) == 2:
        add(node, GNode("add", node.name, [where[tensors[0]], where[tensors[1]]], node))
    else:
        other = args[1] if args[0] is tensors[0] else args[0]
        add(node, GNode("shift", node.name, [where[tensors[0]]], node, consts=[other]))


def _read_scale(node: fx.Node, lv: list[fx.Node], where: dict, add: Callable, refuse: Callable, div: bool) -> None:
    args = node.args
    if len(args) != 2 or node.kwargs or len(lv) != 1:
        raise refuse(node, "is not a product of a traced tensor and a python number")
    if div:
        if args[0] is not lv[0] or not _number(args[1]) or args[1] == 0:
            raise refuse(node, "is not a traced tensor divided by a nonzero python number")
        factor = 1.0 / float(args[1])
    else:
        other = args[1] if args[0] is lv[0] else args[0]
        if not _number(other):
            raise refuse(node, "multiplies by something other than a python number")
        factor = float(other)
    add(node, GNode("scale", node.name, [where[lv[0]]], node, factor=factor))


def _read_method(node: fx.Node, lv: list[fx.Node], where: dict, nodes: list, add: Callable, refuse: Callable,
                 check_inplace: Callable, live: set) -> None:
    m, args = str(node.target), node.args
    self_is_live = isinstance(args[0], fx.Node) and args[0] in lv
    if m in _SHAPE_METHODS and self_is_live:
        live.discard(node)
        add(node, GNode("const", node.name, [], node))
        return
    if not self_is_live:
        raise refuse(node, "uses a traced tensor as an argument of a constant's method")
    a = [where[args[0]]]
    if m in ("relu", "relu_"):
        if m == "relu_":
            check_inplace(node, args[0])
        add(node, GNode("relu", node.name, a, node))
    elif m in ("add", "add_"):
        _read_add(node, lv, where, add, refuse, check_inplace, inplace=m == "add_")
    elif m in ("mul", "mul_", "div", "div_"):
        if m.endswith("_"):
            check_inplace(node, args[0])
        _read_scale(node, lv, where, add, refuse, div=m.startswith("div"))
    elif m in ("view", "reshape", "flatten"):
        add(node, GNode("reshape", node.name, a, node))
    elif m == "contiguous":
        add(node, GNode("identity", node.name, a, node))
    else:
        raise refuse(node)


def _fold_bn(nodes: list[GNode]) -> tuple[list[GNode], dict[int, int]]:
    """Fold every BatchNorm whose input is an affine layer used only by it into that layer;
    returns the new nodes and old index -> new index (a folded BN maps to its layer)."""
    drop: dict[int, int] = {}          # index of a folded BN -> index of its affine layer
    for i, n in enumerate(nodes):
        if n.kind != "bn":
            continue
        j = n.args[0]
        src = nodes[j]
        if (src.kind == "affine" and src.bn is None and src.fx is not None and len(src.fx.users) == 1
                and src.W is not None and src.W.shape[0] == n.bn.num_features):
            src.bn, src.ig, src.ibeta = n.bn, n.ig, n.ib
            drop[i] = j
    new_index: dict[int, int] = {}
    out: list[GNode] = []
    for i, n in enumerate(nodes):
        if i in drop:
            new_index[i] = new_index[drop[i]]
            continue
        new_index[i] = len(out)
        out.append(n)
    for n in out:
        n.args = [new_index[a] for a in n.args]
        if n.w_node is not None:
            n.w_node = new_index[n.w_node]
        if n.b_node is not None:
            n.b_node = new_index[n.b_node]
    return out, new_index
