"""Residual-branch Jacobians J_l(x_b) = dF_l/dh at the block inputs of a batch (docs/science.md section 1).

:func:`residual_jacobians` runs the model once with forward pre-hooks to capture the block inputs
h_{l-1} (stopping as soon as the last requested block has been reached), then returns one batched
:class:`ResidualJacobian` per block: member b of the batch is J_l(x_b), shape (D_out, D_in) with
D = numel of one sample's h (C*H*W for conv blocks). Jacobians are taken with the branch in eval
mode (BatchNorm running statistics), which makes them per-sample quantities, and with in-place
activations turned off (``ReLU(inplace=True)`` at the start of a branch would otherwise overwrite
the stored block inputs ``J.h``); the modules' settings are restored afterwards.

Two paths give identical results:

- ``"generic"``: torch.func ``vmap(jvp)`` / ``vmap(vjp)`` through any branch;
- ``"fast"``: the branch is linearised once: for branches that are a chain of Linear / Conv2d /
  BatchNorm / ReLU layers (FC Linear-ReLU-Linear, torchvision and resgeom BasicBlock and
  Bottleneck branches, with or without BatchNorm), read from the ``nn.Sequential`` itself or, for
  any other branch module (a user's block marked with ``mark_residual_block(block, branch=...)``),
  from a torch.fx trace of its forward (layer modules, ReLU as a module, function or method; the
  chain is then checked against the branch at sample 0: its output and one J^T u against
  autograd, and refused with the difference otherwise), ReLU masks and BatchNorm factors are captured
  at the block input, a BatchNorm not followed by a ReLU is folded into the weights of the layer
  before it, and J V / J^T U become plain GEMMs, convolutions and transposed convolutions with each
  ReLU mask and its BatchNorm scale applied in one in-place multiplication. The probe block keeps
  the operator's own layout ``[N, D, k]``, viewed as ``[N, C, H, W, k]`` (``ResidualJacobian.layout``
  "k_inner"): no copy at the boundary; 1x1 stride-1 convolutions and Linear layers are GEMMs on it,
  other convolutions conv3d with a ``[kh, kw, 1]`` kernel, or channels_last conv2d for runs of narrow
  ones (entered and left with one permuting copy; the plan: :func:`_plan`). When the probe
  block is shared by every sample (``X`` expanded along the batch, e.g. a common random sketch),
  the first linear layer is applied once for all samples.

``"auto"`` takes the fast path where the branch is recognised, the generic one elsewhere; the
operator's ``reason`` then says why (e.g. "branch MyBranch: call_function tanh (the fast path
linearises layer modules and ReLU only)"), and ``fast_source`` how a fast branch was read.

Precision on CUDA (``precision=``): with ``"ieee"`` (the default) the forward pass that captures
the block inputs, the linearisation and every J V / J^T U run with IEEE float32 convolutions and
matmuls (cuDNN's default TF32 off, PyTorch's settings restored afterwards); ``"tf32"`` leaves
PyTorch's settings as they are. Cost and details: :mod:`resgeom_fast.operators._precision`.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from resgeom_fast.core.blocks import ScalarBias, ScalarMultiplier
from resgeom_fast.core.checks import ArgumentValueError, check_choice, check_int, check_type, value_error
from resgeom_fast.core.modules import attention_math, capture_points
from resgeom_fast.linalg.operator import LinearOperator
from resgeom_fast.operators._data import module_mode, no_inplace
from resgeom_fast.operators._precision import check_precision, product_precision
from resgeom_fast.operators.blocks import BlockInfo, resolve_blocks
from resgeom_fast.ops import masked_scale

__all__ = ["ResidualJacobian", "residual_jacobians", "block_inputs", "fast_path_supported"]

PATHS = ("auto", "generic", "fast")
LAYOUTS = ("k_inner", "nchw")
_CHUNK_BYTES = 256 * 2**20


def block_inputs(model: nn.Module, x: Tensor, blocks: Sequence[BlockInfo]) -> list[Tensor]:
    """The inputs h_{l-1} [N, ...] of ``blocks`` from one eval-mode, no-grad forward pass of x
    (detached copies, :func:`resgeom_fast.core.modules.capture_points` at each block's
    ``input_point``: the block module's input, or for a sublayer block such as a ViT's MLP
    sublayer the point inside its owner where the model shows the sublayer's input).

    The pass stops after the last requested block's input is captured.
    """
    def first_input_is_a_tensor(i: int, h: Any) -> None:
        if cap.calls[i] == 0 and not isinstance(h, Tensor):
            raise ArgumentValueError(f"residual_jacobians: block {blocks[i].name!r} was called without a "
                                     f"tensor input")

    with capture_points([b.input_point for b in blocks], stop=True, on_call=first_input_is_a_tensor) as cap, \
            torch.no_grad(), module_mode(model, "eval"):
        model(x)
    missing = [blocks[i].name for i in cap.missing()]
    if missing:
        raise ArgumentValueError(f"residual_jacobians: blocks {missing} were not called in the forward pass of "
                                 f"the model")
    return list(cap.values)


# -- the linearised program of a branch ---------------------------------------------------------
def _scalar_module(m: nn.Module) -> Optional[str]:
    """Fixup's scalar modules (:class:`~resgeom_fast.core.blocks.ScalarBias`,
    :class:`~resgeom_fast.core.blocks.ScalarMultiplier`, subclasses included), recognised by type
    and structure (one 0-dim parameter)."""
    ps = dict(m.named_parameters(recurse=False))
    if isinstance(m, ScalarBias) and set(ps) == {"bias"} and ps["bias"].dim() == 0:
        return "shift"
    if isinstance(m, ScalarMultiplier) and set(ps) == {"weight"} and ps["weight"].dim() == 0:
        return "mult"
    return None


def _sequential_layers(branch: nn.Module) -> Optional[list[nn.Module]]:
    """The layers of an ``nn.Sequential`` branch (nested Sequentials flattened), else None (also
    for a Sequential subclass with a forward of its own: it is read from a trace instead)."""
    if not isinstance(branch, nn.Sequential) or type(branch).forward is not nn.Sequential.forward:
        return None
    out = []
    for m in branch:
        if isinstance(m, nn.Sequential):
            inner = _sequential_layers(m)
            if inner is None:
                return None
            out += inner
        else:
            out.append(m)
    return out


class _LayerTracer(torch.fx.Tracer):
    """torch.fx tracer keeping torch.nn layers (the default) and Fixup's scalar modules as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _scalar_module(m) is not None or super().is_leaf_module(m, module_qualified_name)


_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_RELU_METHODS = ("relu", "relu_")


def _node_text(n: torch.fx.Node) -> str:
    target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target))
    return f"{n.op} {target}"


def _traced_layers(branch: nn.Module) -> tuple[Optional[list[nn.Module]], Optional[str]]:
    """The layers of a branch whose forward is a chain ``h -> layer_m(... layer_1(h))``, read from a
    torch.fx trace: (layers, None), or (None, the reason it is not such a chain).

    Each node must take the previous node's result as its only tensor input and be used once; the
    nodes may be torch.nn layer modules (``call_module``, kept as they are) or a ReLU written as a
    function / method (``F.relu``, ``torch.relu``, ``x.relu()``, in place or not: an ``nn.ReLU``).
    Which layer types the fast path supports is then checked as for ``nn.Sequential`` branches.
    """
    name = type(branch).__name__
    try:
        graph = _LayerTracer().trace(branch)
    except Exception as exc:  # noqa: BLE001 -- any tracing failure is a reason, not an error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"branch {name} is not an nn.Sequential and torch.fx cannot trace it ({type(exc).__name__}: {first})"
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        return None, f"branch {name}'s forward takes {len(inputs)} inputs (expected one tensor)"
    prev, layers = inputs[0], []
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            if n.args[0] is not prev:
                return None, f"branch {name}'s output is not the result of its last layer"
            return layers, None
        if n.op == "get_attr":
            return None, f"branch {name} reads the tensor {n.target!r} outside a layer module ({_node_text(n)})"
        args = list(n.args) + list(n.kwargs.values())
        nodes_in = list(n.all_input_nodes)
        if len(prev.users) != 1:
            return None, (f"branch {name} is not a chain of layers: {prev.name!r} is used by "
                          f"{[_node_text(u) for u in prev.users]}")
        relu = (n.op == "call_function" and n.target in _RELU_FUNCTIONS) or \
            (n.op == "call_method" and n.target in _RELU_METHODS)
        if n.op != "call_module" and not relu:
            return None, f"branch {name}: {_node_text(n)} (the fast path linearises layer modules and ReLU only)"
        if nodes_in != [prev] or not args or args[0] is not prev:
            return None, (f"branch {name} is not a chain of layers: {_node_text(n)} reads "
                          f"{[a.name for a in nodes_in]}")
        if n.op == "call_module":
            if len(n.args) != 1 or n.kwargs:
                return None, f"branch {name} calls {n.target!r} with extra arguments"
            layers.append(branch.get_submodule(str(n.target)))
        else:
            layers.append(nn.ReLU())
        prev = n
    return None, f"branch {name}'s trace has no output"


def _branch_layers(branch: nn.Module) -> tuple[Optional[list[nn.Module]], Optional[str], str]:
    """(layers, None, source) of a branch the fast path can read as a chain of layers, source
    "sequential" (an ``nn.Sequential``) or "fx" (a torch.fx trace of its forward); else
    (None, reason, source)."""
    layers = _sequential_layers(branch)
    if layers is not None:
        return layers, None, "sequential"
    layers, reason = _traced_layers(branch)
    return layers, reason, "fx"


def _unsupported(branch: nn.Module) -> Optional[str]:
    """None when the fast path handles ``branch``, else the reason."""
    layers, reason, _ = _branch_layers(branch)
    if layers is None:
        return reason
    return _unsupported_layers(layers)


def _unsupported_layers(layers: list[nn.Module]) -> Optional[str]:
    n_lin = 0
    for m in layers:
        if isinstance(m, nn.Linear):
            n_lin += 1
        elif isinstance(m, nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                return f"Conv2d with padding {m.padding!r} / padding_mode {m.padding_mode!r}"
            n_lin += 1
        elif isinstance(m, _BatchNorm):
            if m.running_var is None:
                return "BatchNorm without running statistics"
        elif isinstance(m, (nn.ReLU, nn.Identity, nn.Dropout)) or _scalar_module(m) is not None:
            pass
        else:
            return f"layer {type(m).__name__}"
    if n_lin == 0:
        return "no Linear or Conv2d layer"
    return None


def fast_path_supported(branch: nn.Module) -> bool:
    """Whether :func:`residual_jacobians` can linearise ``branch`` (path="fast")."""
    return _unsupported(branch) is None


class _Lin:
    """A linear layer of the program; ``in_shape``/``out_shape`` per sample.

    Two layouts of the probe blocks (:data:`LAYOUTS`): ``fwd`` / ``bwd`` take ``[n k, *shape]``
    ("nchw": Conv2d / conv_transpose2d, Linear as a GEMM); ``fwd_k`` / ``bwd_k`` take
    ``[n, *shape, k]`` ("k_inner", the operator's own ``[N, D, k]`` block viewed per sample): a
    1x1 stride-1 ungrouped conv or a Linear is ``W @ z`` on ``[n, C, H W k]``, any other conv a
    conv3d / conv_transpose3d with the kernel ``[kh, kw, 1]`` (the probe index as a third spatial
    dimension that the kernel never mixes).
    """

    def __init__(self, m: nn.Module, in_shape: tuple, out_shape: tuple) -> None:
        self.conv = isinstance(m, nn.Conv2d)
        self.weight = m.weight.detach()
        self.in_shape, self.out_shape = in_shape, out_shape
        if self.conv:
            self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
            kh, kw = self.weight.shape[-2:]
            self.output_padding = tuple(
                in_shape[1 + i] - ((out_shape[1 + i] - 1) * self.stride[i] - 2 * self.padding[i]
                                   + self.dilation[i] * ((kh, kw)[i] - 1) + 1) for i in range(2))
            self.pointwise = (kh, kw) == (1, 1) and tuple(self.stride) == (1, 1) and \
                tuple(self.padding) == (0, 0) and self.groups == 1

    def scale_out(self, s: Tensor) -> None:
        self.weight = self.weight * s.reshape(-1, *([1] * (self.weight.dim() - 1)))

    def fwd(self, z: Tensor) -> Tensor:
        if self.conv:
            return F.conv2d(z, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(z, self.weight)

    def bwd(self, z: Tensor) -> Tensor:
        if self.conv:
            return F.conv_transpose2d(z, self.weight, None, self.stride, self.padding, self.output_padding,
                                      self.groups, self.dilation)
        return z @ self.weight

    def _matrix(self) -> Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)   # [C_out, C_in] (a 1x1 kernel or a Linear)

    @property
    def is_matrix(self) -> bool:
        """A Linear or a 1x1 stride-1 ungrouped conv: ``W @ z`` in the "k" mode."""
        return not self.conv or self.pointwise

    def fwd_k(self, z: Tensor, mode: str, out: Optional[Tensor] = None) -> Tensor:
        """J V of the layer on a tangent in ``mode`` (see :class:`_Program`); ``out`` (only for
        :attr:`is_matrix` in the "k" mode): a contiguous [n, *out_shape, k] buffer to write into."""
        if mode == "cl":
            n, k = z.shape[:2]
            x = z.reshape(n * k, *self.in_shape[1:], self.in_shape[0]).permute(0, 3, 1, 2)
            y = F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)
            return y.permute(0, 2, 3, 1).reshape(n, k, *self.out_shape[1:], self.out_shape[0])
        n, k = z.shape[0], z.shape[-1]
        if self.is_matrix:
            o = None if out is None else out.view(n, self.out_shape[0], -1)
            y = torch.matmul(self._matrix(), z.reshape(n, self.in_shape[0], -1), out=o)
            return y.reshape(n, *self.out_shape, k)
        return F.conv3d(z, self.weight.unsqueeze(-1), None, (*self.stride, 1), (*self.padding, 0),
                        (*self.dilation, 1), self.groups)

    def bwd_k(self, z: Tensor, mode: str, out: Optional[Tensor] = None) -> Tensor:
        """J^T U of the layer on a tangent in ``mode``; ``out`` as in :meth:`fwd_k`."""
        if mode == "cl":
            n, k = z.shape[:2]
            x = z.reshape(n * k, *self.out_shape[1:], self.out_shape[0]).permute(0, 3, 1, 2)
            y = F.conv_transpose2d(x, self.weight, None, self.stride, self.padding, self.output_padding,
                                   self.groups, self.dilation)
            return y.permute(0, 2, 3, 1).reshape(n, k, *self.in_shape[1:], self.in_shape[0])
        n, k = z.shape[0], z.shape[-1]
        if self.is_matrix:
            o = None if out is None else out.view(n, self.in_shape[0], -1)
            y = torch.matmul(self._matrix().t(), z.reshape(n, self.out_shape[0], -1), out=o)
            return y.reshape(n, *self.in_shape, k)
        return F.conv_transpose3d(z, self.weight.unsqueeze(-1), None, (*self.stride, 1), (*self.padding, 0),
                                  (*self.output_padding, 0), self.groups, (*self.dilation, 1))


class _Diag:
    """A diagonal factor: per-channel ``scale`` [C] and/or per-sample ``mask`` [N, C, S]."""

    def __init__(self, shape: tuple) -> None:
        self.shape = shape  # per-sample shape (C,) or (C, H, W)
        self.scale: Optional[Tensor] = None
        self.mask: Optional[Tensor] = None

    def mul_scale(self, s: Tensor) -> None:
        self.scale = s if self.scale is None else self.scale * s

    def apply(self, z: Tensor, n: int, k: int, sl: slice) -> Tensor:
        """z [n k, *shape] ("nchw" layout)."""
        if self.mask is None and self.scale is None:
            return z
        c = self.shape[0]
        if self.mask is None:
            return z * self.scale.reshape(1, c, *([1] * (len(self.shape) - 1)))
        scale = self.scale if self.scale is not None else self._ones
        out = masked_scale(z.reshape(n, k, c, -1), self.mask[sl], scale)
        return out.reshape(z.shape)

    def apply_k(self, z: Tensor, sl: slice, inplace: bool, mode: str = "k") -> Tensor:
        """z a tangent in ``mode`` ("k": [n, *shape, k]; "cl": [n, k, H, W, C]): one elementwise
        pass by the factor mask * scale (formed per chunk, 1/k of z's size), in place when
        ``inplace``."""
        if self.mask is None and self.scale is None:
            return z
        c = self.shape[0]
        if self.mask is None:
            f = self.scale.reshape(c, *([1] * len(self.shape))) if mode == "k" else self.scale
        else:
            f = self.mask[sl].to(z.dtype)
            if self.scale is not None:
                f = f * self.scale.reshape(1, c, 1)
            f = f.reshape(f.shape[0], *self.shape)
            f = f.unsqueeze(-1) if mode == "k" else f.permute(0, 2, 3, 1).contiguous().unsqueeze(1)
        return z.mul_(f) if inplace else z * f


class _NotLinearisable(ValueError):
    pass


class _Program:
    """Branch as D_m L_m ... D_1 L_1 D_0, captured at the block inputs h [N, ...].

    ``modes[i]`` (from :func:`_plan`) is how linear layer i runs in the "k_inner" layout: "k" on
    the tangent [n, C, H, W, k] (or [n, C, k]) itself, "cl" on [n, k, H, W, C] as a channels_last
    conv2d of [n k, C, H, W]; the diagonal after a layer is applied in that layer's mode.
    """

    def __init__(self, layers: list[nn.Module], h: Tensor, chunk: int) -> None:
        self.lins: list[_Lin] = []
        self.diags: list[_Diag] = [_Diag(tuple(h.shape[1:]))]
        shape = tuple(h.shape[1:])
        mods_after: list[list[tuple]] = [[]]
        # 1) structure and per-sample shapes from the first sample
        z = h[:1]
        with torch.no_grad():
            for m in layers:
                z2 = m(z)
                if isinstance(m, nn.Linear) and len(shape) != 1:
                    raise _NotLinearisable(f"Linear on per-sample inputs of shape {shape} (expected vectors)")
                if isinstance(m, nn.Conv2d) and len(shape) != 3:
                    raise _NotLinearisable(f"Conv2d on per-sample inputs of shape {shape} (expected [C, H, W])")
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    self.lins.append(_Lin(m, shape, tuple(z2.shape[1:])))
                    self.diags.append(_Diag(tuple(z2.shape[1:])))
                    mods_after.append([])
                elif isinstance(m, _BatchNorm):
                    s = m.running_var.detach() + m.eps
                    s = s.rsqrt()
                    if m.weight is not None:
                        s = s * m.weight.detach()
                    self.diags[-1].mul_scale(s.to(h.dtype))
                elif _scalar_module(m) == "mult":
                    self.diags[-1].mul_scale(m.weight.detach().to(h.dtype).expand(shape[0]).clone())
                if isinstance(m, nn.ReLU):
                    mods_after[-1].append(("relu", m))
                z = z2
                shape = tuple(z.shape[1:])
        self.in_shape, self.out_shape = tuple(h.shape[1:]), shape
        self.first_out = z   # the chain of layers on h[:1], compared with the branch's own output
        # 2) masks at the ReLUs, chunk by chunk
        mask_parts: dict[int, list[Tensor]] = {}
        with torch.no_grad():
            for s0 in range(0, h.shape[0], chunk):
                z = h[s0:s0 + chunk]
                di = 0
                for m in layers:
                    z = m(z)
                    if isinstance(m, (nn.Linear, nn.Conv2d)):
                        di += 1
                    if isinstance(m, nn.ReLU):
                        mk = (z > 0).reshape(z.shape[0], z.shape[1], -1).contiguous()
                        prev = mask_parts.setdefault(di, [])
                        if len(prev) > s0 // chunk:
                            prev[-1] = prev[-1] & mk
                        else:
                            prev.append(mk)
        for di, parts in mask_parts.items():
            self.diags[di].mask = torch.cat(parts)
        # 3) fold mask-free scales into the preceding linear layer; ones for masked diagonals
        for i, d in enumerate(self.diags):
            if d.mask is None and d.scale is not None and i > 0:
                self.lins[i - 1].scale_out(d.scale)
                d.scale = None
            d._ones = torch.ones(d.shape[0], dtype=h.dtype, device=h.device)
        self.modes: list[str] = _plan(self.lins, h.device)

    def apply(self, z: Tensor, n: int, k: int, sl: slice, shared: bool = False) -> Tensor:
        """z [n*k, *in_shape] (or [k, *in_shape] when ``shared``) -> [n*k, *out_shape]."""
        if shared:
            z = self.lins[0].fwd(z)                                   # once for all samples
            z = z.unsqueeze(0).expand(n, *z.shape).reshape(n * k, *z.shape[1:])
            z = self.diags[1].apply(z, n, k, sl)
            start = 1
        else:
            z = self.diags[0].apply(z, n, k, sl)
            start = 0
        for i in range(start, len(self.lins)):
            z = self.lins[i].fwd(z)
            z = self.diags[i + 1].apply(z, n, k, sl)
        return z

    def apply_t(self, z: Tensor, n: int, k: int, sl: slice) -> Tensor:
        for i in reversed(range(len(self.lins))):
            z = self.diags[i + 1].apply(z, n, k, sl)
            z = self.lins[i].bwd(z)
        return self.diags[0].apply(z, n, k, sl)

    def first_k(self, z: Tensor) -> Tensor:
        """The first linear layer on one probe block shared by every sample: z [1, *in_shape, k]
        -> [1, ...] in the mode ``self.modes[0]`` (for :meth:`apply_k`'s ``first``)."""
        return self.lins[0].fwd_k(_to_mode(z, "k", self.modes[0]), self.modes[0])

    def apply_k(self, z: Optional[Tensor], sl: slice, first: Optional[Tensor] = None,
                dest: Optional[Tensor] = None) -> Tensor:
        """J V in the "k_inner" layout: z [n, *in_shape, k] -> [n, *out_shape, k] for the samples
        ``sl`` (or, with ``first`` from :meth:`first_k`, the probe block shared by every sample).
        Each linear layer runs in its mode ``self.modes[i]`` (the tangent is permuted where
        consecutive modes differ); z itself is never written, the intermediates are scaled in
        place. ``dest``: a contiguous [n, *out_shape, k] buffer the result is written into (the
        last layer's GEMM writes there directly), else a new tensor is returned."""
        n = sl.stop - sl.start
        if first is not None:
            mode, start = self.modes[0], 1
            z = self.diags[1].apply_k(first.expand(n, *first.shape[1:]), sl, inplace=False, mode=mode)
        else:
            mode, start = "k", 0
            z = self.diags[0].apply_k(z, sl, inplace=False)
        last = len(self.lins) - 1
        for i in range(start, len(self.lins)):
            z, mode = _to_mode(z, mode, self.modes[i]), self.modes[i]
            direct = dest is not None and i == last and mode == "k" and self.lins[i].is_matrix
            z = self.lins[i].fwd_k(z, mode, out=dest if direct else None)
            z = self.diags[i + 1].apply_k(z, sl, inplace=True, mode=mode)
        return _into(z, mode, dest)

    def apply_t_k(self, z: Tensor, sl: slice, dest: Optional[Tensor] = None) -> Tensor:
        """J^T U in the "k_inner" layout: z [n, *out_shape, k] -> [n, *in_shape, k]; ``dest`` as
        in :meth:`apply_k`."""
        mode, owned = "k", False
        for i in reversed(range(len(self.lins))):
            z = self.diags[i + 1].apply_k(z, sl, inplace=owned, mode=mode)
            z, mode = _to_mode(z, mode, self.modes[i]), self.modes[i]
            direct = dest is not None and i == 0 and mode == "k" and self.lins[i].is_matrix
            z = self.lins[i].bwd_k(z, mode, out=dest if direct else None)
            owned = True
        if mode != "k":
            z = _into(z, mode, dest)
        return _into(self.diags[0].apply_k(z, sl, inplace=True), "k", dest)


def _into(z: Tensor, mode: str, dest: Optional[Tensor]) -> Tensor:
    """The tangent z (in ``mode``) as a contiguous "k"-mode tensor: written into ``dest`` (no copy
    when z already is dest), or z itself / one copy when ``dest`` is None."""
    zk = z if mode == "k" else _swap_outer_inner(z)
    if dest is None:
        return zk.contiguous()
    if zk.data_ptr() != dest.data_ptr() or zk.stride() != dest.stride():
        dest.copy_(zk)
    return dest


def _swap_outer_inner(z: Tensor) -> Tensor:
    """[n, A, H, W, B] -> a view [n, B, H, W, A], formed as the transpose of dims 1 and 3 of
    [n, A, H W, B] (a 4-d copy of this view runs ~2x faster than of the 5-d permutation)."""
    n, a, hh, ww, b = z.shape
    return z.reshape(n, a, hh * ww, b).transpose(1, 3).unflatten(2, (hh, ww))


def _to_mode(z: Tensor, mode: str, to: str) -> Tensor:
    """A conv tangent between the modes "k" [n, C, H, W, k] and "cl" [n, k, H, W, C] (the same
    permutation both ways: one copy); unchanged when the modes agree."""
    return z if mode == to else _swap_outer_inner(z).contiguous()


_CL_MAX_CHANNELS = 32


def _plan(lins: list[_Lin], device: torch.device) -> list[str]:
    """The mode of each linear layer. On the CPU (measured there with oneDNN, one thread, k = 20,
    benchmarks/results/bench_operators_conv_cpu_20261202_jacobian_v2.md): "k" (the k_inner layout
    itself) for Linear layers and 1x1 stride-1 convolutions (a GEMM on [n, C, H W k]: no copy, as
    fast as a channels_last conv) and for spatial convolutions with more than
    ``_CL_MAX_CHANNELS`` channels (conv3d on [n, C, H, W, k]: ~1.4x the time of a channels_last
    conv2d at 64 channels, 56x56, less than the two permuting copies it saves: a resnet50
    Bottleneck 0.38 s vs 0.56 s per J V of 4 x 20 columns, a resnet18 BasicBlock 0.55 s vs 0.74 s);
    "cl" (channels_last conv2d on [n k, C, H, W], entered and left with one permuting copy) for a
    run of >= 2 spatial convolutions of <= ``_CL_MAX_CHANNELS`` channels, where oneDNN's conv3d
    is 2-3x slower than its conv2d and the copies are shared (a ResNet-20 BasicBlock at 16
    channels: 52 ms vs 64 ms per J V of 16 x 20 columns; at 32 and 64 channels on 16x16 and 8x8
    the two are within the noise). On other devices (not measured): "cl" for every spatial
    convolution (cuDNN's channels_last conv2d; a copy in device memory is cheap there), "k" for
    the GEMMs."""
    if device.type != "cpu":
        return ["cl" if L.conv and not L.pointwise else "k" for L in lins]
    modes = ["k"] * len(lins)
    i = 0
    while i < len(lins):
        j = i
        while j < len(lins) and lins[j].conv and not lins[j].pointwise:
            j += 1
        narrow = all(max(L.weight.shape[0], L.in_shape[0]) <= _CL_MAX_CHANNELS for L in lins[i:j])
        if j - i >= 2 and narrow:
            modes[i:j] = ["cl"] * (j - i)
        i = max(j, i + 1)
    return modes


def _rel_diffs(pairs: Sequence[tuple[Tensor, Tensor]]) -> list[float]:
    """||a - b|| / ||b|| in float64 for each pair (0 when both are zero, inf when only b is); one
    host read for all of them."""
    nums = [(a.detach().double() - b.detach().double()).norm() for a, b in pairs]
    dens = [b.detach().double().norm() for _, b in pairs]
    vals = torch.stack(nums + dens).tolist()
    k = len(pairs)
    return [n / d if d > 0 else (0.0 if n == 0 else math.inf) for n, d in zip(vals[:k], vals[k:])]


# -- the operator -------------------------------------------------------------------------------
class ResidualJacobian(LinearOperator):
    """Batched residual-branch Jacobians of one block: member b is J_l(x_b), shape (D_out, D_in).

    ``matmat(X [N, D_in, k]) -> [N, D_out, k]`` (J V); ``.T.matmat(U [N, D_out, k]) -> [N, D_in, k]``
    (J^T U). Vectors are flattened per sample in the layout of h ([C, H, W] row-major).

    Attributes:
        info: the :class:`BlockInfo`. h: the block inputs [N, *in_shape]. in_shape, out_shape:
        per-sample shapes. path: "generic" or "fast". chunk_size: samples per chunk (None: auto,
        about 256 MiB of probe intermediates per chunk). precision: "ieee" (IEEE float32 forced on
        CUDA while products run) or "tf32" (PyTorch's settings as they are). fast_source: how the
        fast path read the branch, "sequential" (an ``nn.Sequential``) or "fx" (a torch.fx trace of
        its forward); None on the generic path. reason: why the generic path was taken (None on the
        fast path, and when path="generic" was asked for). layout: how the fast path lays out a probe block
        (one of :data:`LAYOUTS`; same numbers either way, up to rounding): "k_inner" (the default)
        keeps the operator's own ``[N, D, k]`` block, viewed as ``[N, C, H, W, k]``, at the
        boundary (no copy in or out): 1x1 stride-1 convolutions and Linear layers are ``W @ z``,
        other convolutions a conv3d with a ``[kh, kw, 1]`` kernel or, for runs of them chosen by
        the device's plan (``_program.modes``), channels_last conv2d entered and left with one
        permuting copy, and each ReLU mask with its BatchNorm scale one in-place multiplication;
        "nchw" (the previous layout, kept for comparison) transposes the block to
        ``[N k, C, H, W]`` for Conv2d and back (one copy each way). None on the generic path.
    """

    def __init__(self, info: BlockInfo, h: Tensor, path: str, chunk_size: Optional[int],
                 precision: str = "ieee", reason: Optional[str] = None) -> None:
        self.info, self.h, self.path, self.chunk_size = info, h, path, chunk_size
        self.reason: Optional[str] = reason
        self.fast_source: Optional[str] = None
        self.layout: Optional[str] = "k_inner" if path == "fast" else None
        self.precision = check_precision("ResidualJacobian", precision)
        with product_precision(self.precision):
            self._setup(info, h, path)

    def _setup(self, info: BlockInfo, h: Tensor, path: str) -> None:
        # every evaluation of the branch on h runs with in-place activations turned off: a branch
        # starting with ReLU(inplace=True) would otherwise overwrite the stored block inputs
        with torch.no_grad(), module_mode(info.branch, "eval"), no_inplace(info.branch):
            out = info.branch(h[:1])
        self.in_shape, self.out_shape = tuple(h.shape[1:]), tuple(out.shape[1:])
        super().__init__((math.prod(self.out_shape), math.prod(self.in_shape)), h.dtype, h.device,
                         (h.shape[0],), symmetric=False)
        self._program: Optional[_Program] = None
        if path == "fast":
            with module_mode(info.branch, "eval"), no_inplace(info.branch):
                layers, reason, source = _branch_layers(info.branch)
                if layers is None:
                    raise _NotLinearisable(reason)
                self._program = _Program(layers, h, self._chunk(1))
                self.fast_source = source
                if source == "fx":
                    self._verify(out)
                self._program.first_out = None

    def _verify(self, out: Tensor) -> None:
        """For a branch read from a torch.fx trace: the linearised program reproduces the branch (one
        host read; ``nn.Sequential`` branches are their layers by construction): its layers' output on h[:1] equals the
        branch's (a trace that missed an operation fails here), and J^T u for one random u of
        sample 0 equals autograd's vector-Jacobian product of the branch (one backward of one
        sample), both to a relative ``1e3 * eps`` of the dtype; raises :class:`_NotLinearisable`
        otherwise."""
        prog, h0 = self._program, self.h[:1]
        tol = 1e3 * torch.finfo(self.dtype).eps
        gen = torch.Generator(device=self.h.device).manual_seed(0)
        u = torch.randn((1, *self.out_shape), generator=gen, dtype=self.dtype, device=self.h.device)
        with torch.no_grad():
            if self.layout == "k_inner":
                got = prog.apply_t_k(u.unsqueeze(-1), slice(0, 1)).squeeze(-1)
            else:
                got = prog.apply_t(u, 1, 1, slice(0, 1))
        with torch.enable_grad(), module_mode(self.info.branch, "eval"), no_inplace(self.info.branch):
            hg = h0.detach().clone().requires_grad_(True)
            ref = torch.autograd.grad(self.info.branch(hg), hg, u)[0]
        d_out, d_jt = _rel_diffs([(prog.first_out, out), (got, ref)])   # one host read
        prog.first_out = None
        if not d_out <= tol:
            raise _NotLinearisable(f"the layers read from the branch give an output {d_out:.2e} (relative) away from "
                                   f"the branch's own")
        if not d_jt <= tol:
            raise _NotLinearisable(f"the linearised branch's J^T u is {d_jt:.2e} (relative) away from autograd's at "
                                   f"sample 0")

    def _chunk(self, k: int) -> int:
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        per = max(self.shape) * max(k, 1) * self.h.element_size() * 3
        return max(1, min(self.h.shape[0], _CHUNK_BYTES // max(per, 1)))

    def _apply(self, X: Tensor, transpose: bool) -> Tensor:
        with product_precision(self.precision):
            return self._apply_chunks(X, transpose)

    def _apply_chunks(self, X: Tensor, transpose: bool) -> Tensor:
        N, _, k = X.shape
        d_in, d_out = (self.shape[0], self.shape[1]) if transpose else (self.shape[1], self.shape[0])
        s_in, s_out = (self.out_shape, self.in_shape) if transpose else (self.in_shape, self.out_shape)
        out = X.new_empty((N, d_out, k))
        if N == 0 or k == 0:
            return out.zero_()
        cs = self._chunk(k)
        shared = (not transpose and self.path == "fast" and X.stride(0) == 0 and N > 1
                  and self._program.diags[0].mask is None and self._program.diags[0].scale is None)
        if self.path == "fast" and self.layout == "k_inner":
            return self._apply_k(X, transpose, shared, cs, s_in, d_out)
        with torch.no_grad():
            for s0 in range(0, N, cs):
                sl = slice(s0, min(N, s0 + cs))
                n = sl.stop - sl.start
                if self.path == "fast":
                    if shared:
                        z = X[0].t().reshape(k, *s_in)
                    else:
                        z = X[sl].transpose(1, 2).reshape(n * k, *s_in)
                    prog = self._program
                    y = prog.apply_t(z, n, k, sl) if transpose else prog.apply(z, n, k, sl, shared)
                    out[sl] = y.reshape(n, k, d_out).transpose(1, 2)
                else:
                    t = X[sl].permute(2, 0, 1).reshape(k, n, *s_in)
                    out[sl] = self._generic(self.h[sl], t, transpose).reshape(k, n, d_out).permute(1, 2, 0)
        return out

    def _apply_k(self, X: Tensor, transpose: bool, shared: bool, cs: int, s_in: tuple, d_out: int) -> Tensor:
        """The fast path in the "k_inner" layout: X [N, D_in, k] is viewed per chunk as
        [n, *s_in, k] (no copy for a contiguous X); one chunk's result is returned as it is, several
        chunks write into one output (the last GEMM directly). A shared probe block (``shared``)
        goes through the first layer once for all chunks."""
        N, _, k = X.shape
        prog = self._program
        s_out = self.in_shape if transpose else self.out_shape
        out = None if cs >= N else X.new_empty((N, d_out, k))
        with torch.no_grad():
            first = prog.first_k(X[0].reshape(1, *s_in, k)) if shared else None
            for s0 in range(0, N, cs):
                sl = slice(s0, min(N, s0 + cs))
                n = sl.stop - sl.start
                dest = None if out is None else out[sl].view(n, *s_out, k)
                if transpose:
                    y = prog.apply_t_k(X[sl].reshape(n, *s_in, k), sl, dest=dest)
                else:
                    y = prog.apply_k(None if shared else X[sl].reshape(n, *s_in, k), sl, first=first, dest=dest)
                if out is None:
                    return y.reshape(N, d_out, k)
        return out

    def _generic(self, h: Tensor, t: Tensor, transpose: bool) -> Tensor:
        branch = self.info.branch
        # attention (nn.MultiheadAttention, F.scaled_dot_product_attention) inside a branch: the
        # fused kernels and MHA's fast path have no forward-mode AD; the math kernel is exact too
        with module_mode(branch, "eval"), no_inplace(branch), attention_math():
            if transpose:
                _, fn = vjp(branch, h)
                return vmap(lambda u: fn(u)[0])(t)
            return vmap(lambda v: jvp(branch, (h,), (v,))[1])(t)

    def _matmat(self, X: Tensor) -> Tensor:
        return self._apply(X, transpose=False)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._apply(U, transpose=True)

    def matmat_shared(self, omega: Tensor) -> Tensor:
        """``J_b Omega`` for one probe block ``Omega [D_in, k]`` shared by every sample -> [N, D_out, k]."""
        return self.matmat(omega.expand(self.batch_shape[0], *omega.shape))


def residual_jacobians(model: nn.Module, x: Tensor, blocks: Optional[Sequence[Any]] = None, *,
                       path: str = "auto", chunk_size: Optional[int] = None,
                       precision: str = "ieee") -> list[ResidualJacobian]:
    """Residual-branch Jacobians of ``model``'s blocks at the inputs ``x``.

    Args:
        model: a model whose blocks :func:`resgeom_fast.operators.residual_blocks` finds.
        x: a batch of N inputs on the model's device, in the parameters' dtype.
        blocks: None (all), or indices / block modules / BlockInfo s.
        path: "auto" (fast where supported), "generic" (torch.func, any branch) or "fast"
            (error if a branch is not supported).
        chunk_size: samples per chunk when applying (bounds memory); None picks it from the size.
        precision: "ieee" (default) or "tf32": float32 arithmetic of cuDNN convolutions and cuBLAS
            matmuls on CUDA in the forward pass, the linearisation and every product. "ieee" forces
            IEEE float32 (TF32 off, PyTorch's settings restored afterwards); cost: float32
            convolutions run at the FP32 rate of Ampere/Hopper tensor cores, up to several times
            slower than TF32, which loses ~3 digits per product. "tf32" leaves PyTorch's settings
            as they are. No effect on the CPU or in float64.

    Returns:
        one :class:`ResidualJacobian` per block, batch_shape (N,), shape (D_out, D_in).
    """
    fn = "residual_jacobians"
    check_choice(None, f"{fn}: path", path, PATHS)
    check_precision(fn, precision)
    check_type(fn, "x", x, Tensor, "a torch.Tensor")
    if chunk_size is not None:
        chunk_size = check_int(None, f"{fn}: chunk_size", chunk_size, minimum=1, expected="a positive int or None")
    infos = resolve_blocks(fn, model, blocks)
    ref = next(model.parameters(), None)
    if ref is not None:
        if x.device != ref.device:
            raise value_error(fn, "x", f"on the model's device {ref.device}", f"{x.device}")
        if x.is_floating_point() and x.dtype != ref.dtype:
            raise value_error(fn, "x", f"of dtype {ref.dtype} (the model's)", f"{x.dtype}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise value_error(fn, "x", "with a non-empty batch dimension", f"{tuple(x.shape)}")
    with product_precision(precision):
        hs = block_inputs(model, x, infos)
    ops = []
    for info, h in zip(infos, hs):
        reason = _unsupported(info.branch) if path != "generic" else None
        if path == "fast" and reason is not None:
            raise ArgumentValueError(f"residual_jacobians: path='fast' does not support block {info.name!r}: {reason}; "
                                     "use path='generic' or 'auto'")
        if path == "generic" or reason is not None:
            ops.append(ResidualJacobian(info, h, "generic", chunk_size, precision, reason=reason))
            continue
        try:
            ops.append(ResidualJacobian(info, h, "fast", chunk_size, precision))
        except _NotLinearisable as exc:
            if path == "fast":
                raise ArgumentValueError(f"residual_jacobians: path='fast' does not support block {info.name!r}: {exc}; "
                                         "use path='generic' or 'auto'") from None
            ops.append(ResidualJacobian(info, h, "generic", chunk_size, precision, reason=str(exc)))
    return ops
