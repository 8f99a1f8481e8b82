"""The residual-block protocol: what a residual block is, how one is found, and the module types
the fast paths recognise.

A residual block computes ``post(skip(h) + scale * branch(h))``; its residual Jacobian is that of
``branch`` alone (docs/science.md section 1). :func:`residual_blocks` walks ``model.named_modules()``
and asks the registered *block kinds*, in order, whether a module is a block; the first that
matches describes it as a :class:`BlockInfo`. The built-in kinds, in this order:

- ``"marked"``: any module marked with :func:`mark_residual_block` (nothing is registered on it),
  or whose residual sublayers are marked with :func:`mark_residual_sublayers` (a user's pre-LN
  transformer block: one sublayer block per marked sublayer, as for the ViT kinds below);
- ``"resgeom"``: a :class:`ResidualBlockBase` (every block of :mod:`resgeom_fast.models`,
  recognised by ``isinstance``), or any module whose class (or instance) sets
  ``resgeom_block = True`` and has the attributes ``branch``, ``skip``, ``scale``, ``post`` (the
  documented attribute protocol for user classes);
- ``"torchvision_basic"`` / ``"torchvision_bottleneck"``: torchvision's ``BasicBlock`` /
  ``Bottleneck`` (every resnet, wide_resnet, resnext; branch = conv1, bn1, relu, conv2, bn2[,
  relu, conv3, bn3] as an ``nn.Sequential`` sharing the block's layers; skip = ``downsample`` or
  identity; post = ReLU);
- ``"timm_basic"`` / ``"timm_bottleneck"``: ``timm.models.resnet.BasicBlock`` / ``Bottleneck``
  (every timm ResNet / ResNeXt / SE-ResNet / ResNet-D built from them). branch = the block's
  layers in forward order, as an ``nn.Sequential`` sharing them: conv1, bn1, drop_block, act1,
  aa, conv2, bn2, se (BasicBlock) or conv1, bn1, act1, conv2, bn2, drop_block, act2, aa, conv3,
  bn3, se (Bottleneck), then drop_path; modules that are absent (None) or exactly
  ``nn.Identity`` are left out. skip = ``downsample`` or identity; post = act2 (BasicBlock) /
  act3 (Bottleneck). drop_block and drop_path are the identity in eval mode (where every
  operator evaluates branches); in train mode with drop_path_rate / drop_block_rate > 0 they are
  random and ``block(h)`` equals ``post(skip(h) + branch(h))`` only in distribution;
- ``"torchvision_inverted_residual"``: torchvision's MobileNetV2 ``InvertedResidual`` that uses
  its skip (``use_res_connect`` True: stride 1, as many output as input channels); branch =
  its ``conv`` Sequential, skip and post = identity. One without the skip is no residual block
  (not listed; its layers are part of the stack between blocks);
- ``"torchvision_convnext"``: torchvision's ConvNeXt ``CNBlock``, ``h + stochastic_depth(
  layer_scale * block(h))``. ``layer_scale`` is a per-channel tensor [C, 1, 1], not a scalar
  lam_l, so it is part of the branch: branch = :class:`LayerScaleBranch` (``layer_scale *
  block(h)`` then stochastic_depth, sharing the block's Sequential and its ``layer_scale``
  Parameter), ``scale = 1.0``, skip and post = identity. The residual Jacobian is therefore
  ``diag(layer_scale) dF/dh`` (the layer scale included, as the block applies it).
  stochastic_depth is the identity in eval mode; in train mode it is random (as in timm above);
- ``"torchvision_vit"``: torchvision's ViT ``EncoderBlock``, a pre-LN transformer block of two
  residual *sublayers*, each listed as a block of its own (in forward order, named
  ``"<module>:attention"`` and ``"<module>:mlp"``; ``residual_blocks(vit_b_16)`` lists 24):

  - attention: ``x = h + dropout(self_attention(ln_1(h)))``; branch = :class:`SelfAttentionBranch`
    (ln_1, self_attention called as the block calls it, ``need_weights=False``, dropout);
  - MLP: ``out = x + mlp(ln_2(x))``; branch = ``nn.Sequential(ln_2, mlp)``.

  Both have skip = identity, scale 1 and post = identity, so the residual Jacobian of a sublayer
  is that of its branch alone, dF/dh = d(h_l - h_{l-1})/dh_{l-1}: the attention branch's
  Jacobian includes ln_1 and the attention's dependence on every token (queries, keys and values
  all come from h), the MLP branch's is block-diagonal over tokens (the MLP acts per token). h is
  the whole token sequence [N, S, W] (class token and patch tokens), so a Jacobian acts on
  D = S x W.
- ``"timm_vit"``: timm's ViT ``Block`` (``timm.models.vision_transformer.Block``, used by
  timm's ViT / DeiT and other pre-LN transformers built from it), likewise two sublayers:
  attention ``x = h + drop_path1(ls1(attn(norm1(h))))`` (branch = norm1, :class:`MathAttention`
  (attn), ls1, drop_path1 as an ``nn.Sequential``; the layer scale is part of the branch, as for
  ConvNeXt) and MLP ``out = x + drop_path2(ls2(mlp(norm2(x))))`` (branch = norm2, mlp, ls2,
  drop_path2); ``ls`` / ``drop_path`` that are ``nn.Identity`` are left out. The attention is
  called without ``attn_mask`` (what ``Block`` gets from a plain ViT forward).

A *sublayer block* is a residual block that is not a module the model calls: the model computes
it inline inside a bigger module's forward. Its :class:`BlockInfo` therefore carries

- ``block``: a :class:`SublayerBlock`, ``h -> h + branch(h)``, so that ``info.block(h)`` computes
  the sublayer map; its parameters are exactly the sublayer's (ln_1 and self_attention for the
  attention sublayer, ln_2 and mlp for the MLP one) -- e.g. for a block Hessian. The model never
  calls it, so hooks on it never fire; it is kept on the owning module (a plain attribute, not a
  registered submodule: state_dict and ``modules()`` are unchanged) so that every call of
  :func:`residual_blocks` returns the same block modules;
- ``input_at`` / ``output_at``: where the model's forward pass shows h_{l-1} and h_l, as
  ``(module, "input" | "output")`` (the attention sublayer reads ``EncoderBlock``'s input and
  ``ln_2``'s input, the MLP sublayer ``ln_2``'s input and ``EncoderBlock``'s output); every
  capture of block inputs / outputs uses ``info.input_point`` / ``info.output_point``
  (:func:`resgeom_fast.core.modules.capture_points`), which default to the block's own input
  and output for every other kind;
- ``owner`` (the ``EncoderBlock``) and ``sublayer`` ("attention" / "mlp").

Attention inside a branch runs under :func:`resgeom_fast.core.modules.attention_math`
(scaled-dot-product attention on its math kernel, MHA's native fast path off) so that
forward-mode AD (the Jacobians' jvp) and double backward work; the values equal the model's
fused attention to rounding (~1e-16 relative in float64).

torchvision and timm are optional third-party libraries, so their kinds match on the class's
module and name (never imported here). Further kinds are added with :func:`register_block_kind`.

The module types a fast path may recognise by ``isinstance`` live here too: :class:`ZeroSkip`
(Q_l = 0), :class:`ScalarBias` and :class:`ScalarMultiplier` (Fixup's scalars).

This module imports only torch, the standard library and the floor's own ``core.checks`` /
``core.modules`` (the bottom floor of the package).
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_module, type_error
from resgeom_fast.core.modules import attention_math

__all__ = [
    "BlockInfo", "LayerScaleBranch", "MathAttention", "ResidualBlockBase", "ResidualSublayer", "ScalarBias",
    "ScalarMultiplier", "SelfAttentionBranch", "SublayerBlock", "ZeroSkip", "block_kinds", "mark_residual_block",
    "mark_residual_sublayers", "register_block_kind",
    "residual_blocks", "resolve_blocks", "unregister_block_kind",
]

_MARK = "_resgeom_mark"
_HINT = (
    "residual blocks are modules with `resgeom_block = True` (resgeom_fast.models), blocks of a "
    "registered kind (torchvision / timm ResNets, MobileNetV2, ConvNeXt, torchvision / timm ViT sublayers), "
    "or modules "
    "marked with resgeom_fast.operators.mark_residual_block(block, branch=..., skip=..., scale=...)"
)


@dataclass
class BlockInfo:
    """One residual block of a model.

    Attributes:
        name: qualified module name in the model ("" for the model itself); for a sublayer of a
            module, that module's name, ":" and the sublayer ("encoder.layers.encoder_layer_0:mlp").
        block: the block module, computing ``post(skip(h) + scale * branch(h))`` when called on
            the block input h (a sublayer's block is a :class:`SublayerBlock` the model never
            calls itself: its parameters are the sublayer's).
        branch: F_l, an ``nn.Module`` mapping h_{l-1} to the block's output shape.
        skip: Q_l. scale: lam_l (float or a 0-dim Parameter). post: applied after the sum.
        kind: the name of the block kind that recognised it (one of :func:`block_kinds`, e.g.
            "marked", "resgeom", "torchvision_basic", "timm_bottleneck").
        index: the block's position in ``residual_blocks(model)`` (-1 for a BlockInfo built by
            hand, not yet found in a model).
        input_at: where the model's forward pass shows h_{l-1}: ``(module, "input" | "output")``,
            the first positional input or the output of a module the model calls (None: the
            input of ``block``).
        output_at: where it shows h_l, likewise (None: the output of ``block``).
        owner: the model's module the block was found on (None: ``block`` itself); several
            sublayer blocks share one owner.
        sublayer: the sublayer's name within its owner ("attention", "mlp"), None for a whole
            module.
    """

    name: str
    block: nn.Module
    branch: nn.Module
    skip: nn.Module
    scale: Union[float, Tensor]
    post: nn.Module
    kind: str
    index: int = -1
    input_at: Optional[tuple[nn.Module, str]] = None
    output_at: Optional[tuple[nn.Module, str]] = None
    owner: Optional[nn.Module] = None
    sublayer: Optional[str] = None

    def __post_init__(self) -> None:
        for arg in ("input_at", "output_at"):
            p = getattr(self, arg)
            if p is not None and not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], nn.Module)
                                      and p[1] in ("input", "output")):
                raise ArgumentValueError(f"BlockInfo: expected {arg} None or a (module, 'input' | 'output') tuple, "
                                         f"got {p!r}")

    @property
    def input_point(self) -> tuple[nn.Module, str]:
        """``(module, "input" | "output")`` where h_{l-1} is captured (``input_at`` or the block's input)."""
        return self.input_at if self.input_at is not None else (self.block, "input")

    @property
    def output_point(self) -> tuple[nn.Module, str]:
        """``(module, "input" | "output")`` where h_l is captured (``output_at`` or the block's output)."""
        return self.output_at if self.output_at is not None else (self.block, "output")

    @property
    def module(self) -> nn.Module:
        """The model's module this block was found on (``owner``, else ``block``)."""
        return self.owner if self.owner is not None else self.block

    def to_dict(self) -> dict[str, Any]:
        """``{"name", "kind", "scale", "branch", "skip", "sublayer"}`` (class names of branch and
        skip; ``sublayer`` None for a whole module)."""
        scale = float(self.scale) if not isinstance(self.scale, Tensor) else float(self.scale.detach())
        return {"name": self.name, "kind": self.kind, "scale": scale,
                "branch": type(self.branch).__name__, "skip": type(self.skip).__name__, "sublayer": self.sublayer}


class ResidualBlockBase(nn.Module):
    """Base class of residual blocks recognised by type: ``post(skip(h) + scale * branch(h))``.

    A subclass sets, in ``__init__``, ``branch`` (F_l, an ``nn.Module``), ``skip`` (Q_l, an
    ``nn.Module``), ``scale`` (lam_l: a python float or a 0-dim ``nn.Parameter``) and ``post``
    (an ``nn.Module``, ``nn.Identity()`` when nothing follows the sum), and calls ``block(h)``
    with the block input as the first argument. :func:`residual_blocks` recognises every
    instance by ``isinstance`` (the class may be renamed or subclassed freely).
    """

    resgeom_block = True
    branch: nn.Module
    skip: nn.Module
    scale: Union[float, Tensor]
    post: nn.Module


class ZeroSkip(nn.Module):
    """Q_l = 0 (a plain, skip-free block): returns zeros of the block output's shape.

    Args:
        out_channels: channels of the output when they differ from the input's (staged conv
            nets); None keeps the input shape.
        stride: spatial stride of the block (staged conv nets); output spatial size is
            ceil(H / stride) x ceil(W / stride), as for a conv with padding k//2.
    """

    def __init__(self, out_channels: Optional[int] = None, stride: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = int(stride)

    def forward(self, h: Tensor) -> Tensor:
        """Zeros like ``h`` ([N, *]), or [N, out_channels, ceil(H/s), ceil(W/s)] for h [N, C, H, W]."""
        if self.out_channels is None and self.stride == 1:
            return torch.zeros_like(h)
        if h.dim() != 4:
            raise ArgumentValueError(f"ZeroSkip: expected h of shape [N, C, H, W], got {tuple(h.shape)}")
        n, c, hh, ww = h.shape
        oc = c if self.out_channels is None else self.out_channels
        s = self.stride
        return h.new_zeros((n, oc, -(-hh // s), -(-ww // s)))

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


class ScalarBias(nn.Module):
    """Fixup's learnable scalar bias (initialised to 0): ``x + b`` (``bias`` a 0-dim Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias


class ScalarMultiplier(nn.Module):
    """Fixup's learnable scalar multiplier (initialised to 1): ``s * x`` (``weight`` a 0-dim Parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * x


# ------------------------------------------------------------------------------ marks
@dataclass
class _Mark:
    branch: nn.Module
    skip: nn.Module
    scale: Union[float, Tensor]
    post: nn.Module


def mark_residual_block(module: nn.Module, branch: nn.Module, skip: Optional[nn.Module] = None,
                        scale: Union[float, Tensor] = 1.0, post: Optional[nn.Module] = None) -> nn.Module:
    """Declare ``module`` a residual block ``post(skip(h) + scale * branch(h))`` of a user model.

    Nothing is registered on the module (its state_dict is unchanged); the mark is a plain
    attribute read by :func:`residual_blocks`.

    Args:
        module: the block; its first forward argument must be the block input h.
        branch: F_l (usually a submodule of ``module``).
        skip: Q_l (default identity). scale: lam_l. post: after the sum (default identity).

    Returns:
        ``module`` itself.

    Raises:
        ArgumentTypeError (a TypeError): an argument of the wrong type.
    """
    check_module("mark_residual_block", "module", module)
    check_module("mark_residual_block", "branch", branch)
    for nm, m in (("skip", skip), ("post", post)):
        if m is not None and not isinstance(m, nn.Module):
            raise type_error("mark_residual_block", nm, "an nn.Module or None", m)
    if not isinstance(scale, (float, int, Tensor)):
        raise type_error("mark_residual_block", "scale", "a number or a tensor", scale)
    object.__setattr__(module, _MARK, _Mark(branch, skip if skip is not None else nn.Identity(),
                                            float(scale) if not isinstance(scale, Tensor) else scale,
                                            post if post is not None else nn.Identity()))
    return module


@dataclass
class _SublayerMark:
    sublayers: list[tuple[str, nn.Module]]
    between: list[nn.Module]


def mark_residual_sublayers(module: nn.Module, sublayers: Sequence[tuple[str, nn.Module]],
                            between: Sequence[nn.Module]) -> nn.Module:
    """Declare the residual sublayers of ``module`` (a pre-LN transformer block of a user model, or
    any module computing ``h_1 = h_0 + F_1(h_0), ..., h_n = h_{n-1} + F_n(h_{n-1})`` inside its
    forward), each a residual block of its own (skip identity, scale 1, post identity), as the
    built-in ViT kinds list torchvision's ``EncoderBlock`` (module docstring).

    Nothing is registered on the module (its state_dict is unchanged); the mark is a plain
    attribute read by :func:`residual_blocks`, under the kind "marked".

    Args:
        module: the block; its first forward input is h_0 and its output h_n.
        sublayers: ``[(name, branch), ...]`` in forward order; ``branch`` computes F_i(h_{i-1})
            from h_{i-1} [N, ...] with the module's own layers (e.g. ``nn.Sequential(norm1, attn)``
            when ``attn`` takes one input; wrap anything else in a small module). Branches are
            run under :func:`resgeom_fast.core.modules.attention_math` (:class:`MathAttention`),
            so attention inside them has forward-mode AD and double backward.
        between: ``len(sublayers) - 1`` modules the forward calls, the i-th first called with
            h_i as its first positional input (e.g. the norm before the MLP): where the model
            shows the state between two sublayers.

    Returns:
        ``module`` itself.

    Raises:
        ArgumentTypeError: an argument of the wrong type. ArgumentValueError: no sublayer,
        repeated names, or ``between`` of the wrong length.
    """
    fn = "mark_residual_sublayers"
    check_module(fn, "module", module)
    if isinstance(sublayers, (str, bytes)) or not isinstance(sublayers, Sequence):
        raise type_error(fn, "sublayers", "a sequence of (name, branch) tuples", sublayers)
    subs = []
    for i, item in enumerate(sublayers):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and item[0]):
            raise type_error(fn, f"sublayers[{i}]", "a (non-empty name, nn.Module) tuple", item)
        check_module(fn, f"sublayers[{i}][1]", item[1])
        subs.append((item[0], item[1]))
    if not subs:
        raise ArgumentValueError(f"{fn}: expected sublayers a non-empty sequence, got an empty one")
    names = [n for n, _ in subs]
    if len(set(names)) != len(names):
        raise ArgumentValueError(f"{fn}: expected sublayers with distinct names, got {names}")
    if isinstance(between, nn.Module) or not isinstance(between, Sequence):
        raise type_error(fn, "between", "a sequence of nn.Module", between)
    for i, b in enumerate(between):
        check_module(fn, f"between[{i}]", b)
    if len(between) != len(subs) - 1:
        raise ArgumentValueError(f"{fn}: expected between of length {len(subs) - 1} (one module per boundary "
                                 f"between sublayers), got {len(between)}")
    object.__setattr__(module, _MARK, _SublayerMark(subs, list(between)))
    return module


# ------------------------------------------------------------------------------ block kinds
MatchFn = Callable[[nn.Module], bool]
DescribeFn = Callable[[str, nn.Module], Union[BlockInfo, Sequence[BlockInfo]]]


@dataclass(frozen=True)
class _Kind:
    name: str
    match: MatchFn
    describe: DescribeFn


_KINDS: list[_Kind] = []


def register_block_kind(name: str, match: MatchFn, describe: DescribeFn, *, replace: bool = False) -> None:
    """Teach :func:`residual_blocks` a new kind of residual block.

    Kinds are asked in registration order (the built-in ones first); the first whose ``match``
    returns True for a module describes it.

    Args:
        name: the kind's name (``BlockInfo.kind``).
        match: ``match(module) -> bool``, whether ``module`` is a block of this kind.
        describe: ``describe(name, module) -> BlockInfo`` for a matching module at qualified
            name ``name`` (its ``index`` is filled in by :func:`residual_blocks`), or a sequence
            of BlockInfo s in forward order (the residual sublayers of one module, e.g. a
            transformer block; each with its ``input_at`` / ``output_at`` capture points).
        replace: replace an existing kind of that name (in its place) instead of refusing.

    Raises:
        ArgumentTypeError: ``name`` not a str, ``match`` / ``describe`` not callable.
        ArgumentValueError: a kind ``name`` exists and ``replace`` is False.
    """
    if not isinstance(name, str) or not name:
        raise type_error("register_block_kind", "name", "a non-empty str", name)
    for arg, fn in (("match", match), ("describe", describe)):
        if not callable(fn):
            raise type_error("register_block_kind", arg, "a callable", fn)
    kind = _Kind(name, match, describe)
    for i, k in enumerate(_KINDS):
        if k.name == name:
            if not replace:
                raise ArgumentValueError(f"register_block_kind: expected name a new kind, got {name!r} "
                                         "(already registered; pass replace=True to replace it)")
            _KINDS[i] = kind
            return
    _KINDS.append(kind)


def unregister_block_kind(name: str) -> None:
    """Remove the kind ``name`` (ArgumentValueError when there is none)."""
    for i, k in enumerate(_KINDS):
        if k.name == name:
            del _KINDS[i]
            return
    raise ArgumentValueError(f"unregister_block_kind: expected name one of {block_kinds()}, got {name!r}")


def block_kinds() -> list[str]:
    """The names of the registered block kinds, in the order they are asked."""
    return [k.name for k in _KINDS]


def _is_marked(m: nn.Module) -> bool:
    return m.__dict__.get(_MARK) is not None


def _describe_marked(name: str, m: nn.Module) -> Union[BlockInfo, list[BlockInfo]]:
    mark = m.__dict__[_MARK]
    if isinstance(mark, _SublayerMark):
        parts = [(sub, (branch,), lambda b=branch: MathAttention(b)) for sub, branch in mark.sublayers]
        return _sublayer_infos(name, m, "marked", parts, mark.between)
    return BlockInfo(name, m, mark.branch, mark.skip, mark.scale, mark.post, "marked")


def _is_resgeom(m: nn.Module) -> bool:
    return (isinstance(m, ResidualBlockBase) or bool(getattr(type(m), "resgeom_block", False))
            or getattr(m, "resgeom_block", False) is True)


def _describe_resgeom(name: str, m: nn.Module) -> BlockInfo:
    missing = [a for a in ("branch", "skip", "scale", "post") if not hasattr(m, a)]
    if missing:
        raise ArgumentValueError(f"residual_blocks: module {name!r} has resgeom_block = True but lacks {missing}")
    return BlockInfo(name, m, m.branch, m.skip, m.scale, m.post, "resgeom")


def _torchvision_class(m: nn.Module, cls_name: str) -> bool:
    # torchvision is optional: its classes are matched by module and name, never imported
    cls = type(m)
    return cls.__module__.startswith("torchvision.models") and cls.__name__ == cls_name


def _describe_torchvision(name: str, m: nn.Module, kind: str) -> BlockInfo:
    layers = [("conv1", m.conv1), ("bn1", m.bn1), ("relu", m.relu), ("conv2", m.conv2), ("bn2", m.bn2)]
    if kind == "torchvision_bottleneck":
        layers += [("relu2", m.relu), ("conv3", m.conv3), ("bn3", m.bn3)]
    skip = m.downsample if m.downsample is not None else nn.Identity()
    return BlockInfo(name, m, nn.Sequential(OrderedDict(layers)), skip, 1.0, m.relu, kind)


class LayerScaleBranch(nn.Module):
    """The branch of a ConvNeXt ``CNBlock``: ``drop(layer_scale * body(h))``.

    Args:
        body: the block's Sequential (shared, not copied).
        layer_scale: the block's per-channel ``layer_scale`` Parameter [C, 1, 1] (shared).
        drop: the block's stochastic depth (identity in eval mode); None: none.
    """

    def __init__(self, body: nn.Module, layer_scale: Tensor, drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.body = body
        self.layer_scale = layer_scale  # an nn.Parameter: registered here, the same object as the block's
        self.drop = drop if drop is not None else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        """h [N, C, H, W] -> [N, C, H, W]."""
        return self.drop(self.layer_scale * self.body(h))


class SelfAttentionBranch(nn.Module):
    """The attention branch of a pre-LN transformer block: ``dropout(attention(norm(h)))``.

    ``attention`` is an ``nn.MultiheadAttention`` called as self-attention with
    ``need_weights=False`` (its output tuple's first element is returned). It is called with
    MHA's native fast path disabled and scaled-dot-product attention on its math backend (both
    restored afterwards), so that torch.func's forward-mode AD (jvp) and double backward work
    through it; the values equal the block's own (fast-path) attention to rounding (~1e-16
    relative in float64). The switch of the fast-path flag is process-global while the call runs.

    Args:
        norm: the layer norm before the attention. attention: the attention module.
        dropout: the dropout after it (None: none). All shared with the block, not copied.
    """

    def __init__(self, norm: nn.Module, attention: nn.Module, dropout: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.norm = norm
        self.attention = attention
        self.dropout = dropout if dropout is not None else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        """h [N, S, W] (batch first) -> [N, S, W]."""
        x = self.norm(h)
        # MHA's native fast path (taken in eval mode without grad) has no forward-mode AD and the
        # fused SDPA kernels no double backward: the slow path and the math kernel are exact too
        with attention_math():
            x, _ = self.attention(x, x, x, need_weights=False)
        return self.dropout(x)


class ResidualSublayer(nn.Module):
    """A pre-LN residual sublayer ``x -> x + body(norm(x))`` (e.g. the MLP sublayer of a ViT
    ``EncoderBlock``). Not elementwise. Kept for user code; the built-in ViT kinds list each
    sublayer as a block of its own (:class:`SublayerBlock`) instead of using it as a ``post``.

    Args:
        norm: the layer norm. body: the sublayer's body (e.g. the MLP). Both shared, not copied.
    """

    def __init__(self, norm: nn.Module, body: nn.Module) -> None:
        super().__init__()
        self.norm = norm
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        """x [N, S, W] -> [N, S, W]."""
        return x + self.body(self.norm(x))


class MathAttention(nn.Module):
    """``attention(x)`` (one input, e.g. timm's ``Attention``) run under
    :func:`resgeom_fast.core.modules.attention_math`: scaled-dot-product attention on its math
    kernel, so that forward-mode AD and double backward work through it (values equal the fused
    kernels' to rounding).

    Args:
        attention: the attention module (shared, not copied).
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: Tensor) -> Tensor:
        """x [N, S, W] -> [N, S, W]."""
        with attention_math():
            return self.attention(x)


class SublayerBlock(nn.Module):
    """One residual sublayer of a transformer block as a module of its own: ``h -> h + branch(h)``.

    The model never calls it (its forward computes the sublayer inline); it exists so that the
    sublayer has a block module whose call computes the sublayer map and whose parameters are
    the sublayer's (those of ``branch``). Its :class:`BlockInfo` says where the model shows the
    sublayer's input and output (``input_at`` / ``output_at``).

    Args:
        branch: the sublayer's branch (e.g. :class:`SelfAttentionBranch`, or ``norm`` then the
            MLP as an ``nn.Sequential``), sharing the model's layers.
    """

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, h: Tensor) -> Tensor:
        """h [N, S, W] -> h + branch(h), [N, S, W]."""
        return h + self.branch(h)


_SUBLAYERS = "_resgeom_sublayers"


def _sublayer_blocks(m: nn.Module, parts: Sequence[tuple[str, Sequence[nn.Module], Callable[[], nn.Module]]]
                     ) -> list[SublayerBlock]:
    """The :class:`SublayerBlock` s of ``m``, one per ``(sublayer, modules it is built from,
    build the branch)``, kept on ``m`` (a plain attribute, not registered: the state_dict and
    ``m.modules()`` are unchanged) so that every call of :func:`residual_blocks` returns the same
    block modules (blocks are selected by identity); rebuilt when one of the modules was replaced."""
    key = tuple((name, tuple(id(x) for x in mods)) for name, mods, _ in parts)
    cached = m.__dict__.get(_SUBLAYERS)
    if cached is not None and cached[0] == key:
        return cached[1]
    blocks = [SublayerBlock(build()) for _, _, build in parts]
    object.__setattr__(m, _SUBLAYERS, (key, blocks))
    return blocks


def _third_party_class(m: nn.Module, module: str, cls_name: str) -> bool:
    # timm / torchvision are optional: their classes are matched by module and name, never imported
    cls = type(m)
    return cls.__module__ == module and cls.__name__ == cls_name


def _present(m: Optional[nn.Module]) -> bool:
    return m is not None and type(m) is not nn.Identity


def _describe_timm(name: str, m: nn.Module, kind: str) -> BlockInfo:
    if kind == "timm_basic":
        order = ("conv1", "bn1", "drop_block", "act1", "aa", "conv2", "bn2", "se", "drop_path")
        post = m.act2
    else:
        order = ("conv1", "bn1", "act1", "conv2", "bn2", "drop_block", "act2", "aa", "conv3", "bn3", "se",
                 "drop_path")
        post = m.act3
    layers = [(a, getattr(m, a)) for a in order if _present(getattr(m, a, None))]
    skip = m.downsample if m.downsample is not None else nn.Identity()
    return BlockInfo(name, m, nn.Sequential(OrderedDict(layers)), skip, 1.0, post, kind)


def _is_inverted_residual(m: nn.Module) -> bool:
    return (_third_party_class(m, "torchvision.models.mobilenetv2", "InvertedResidual")
            and getattr(m, "use_res_connect", False) is True)


def _describe_inverted_residual(name: str, m: nn.Module) -> BlockInfo:
    return BlockInfo(name, m, m.conv, nn.Identity(), 1.0, nn.Identity(), "torchvision_inverted_residual")


def _describe_convnext(name: str, m: nn.Module) -> BlockInfo:
    branch = LayerScaleBranch(m.block, m.layer_scale, m.stochastic_depth)
    return BlockInfo(name, m, branch, nn.Identity(), 1.0, nn.Identity(), "torchvision_convnext")


def _sublayer_infos(name: str, m: nn.Module, kind: str, parts: Sequence[tuple[str, Sequence[nn.Module],
                                                                               Callable[[], nn.Module]]],
                    between: Sequence[nn.Module]) -> list[BlockInfo]:
    """The residual sublayers of ``m`` in forward order (a pre-LN transformer block: attention,
    then MLP): sublayer 0 reads its input at ``m``'s input, sublayer i > 0 at the input of
    ``between[i - 1]`` (the first module the model calls on the state after sublayer i - 1, e.g.
    the norm before the MLP); the last sublayer's output is ``m``'s output."""
    blocks = _sublayer_blocks(m, parts)
    ins = [(m, "input")] + [(b, "input") for b in between]
    outs = [(b, "input") for b in between] + [(m, "output")]
    return [BlockInfo(f"{name}:{sub}", blk, blk.branch, nn.Identity(), 1.0, nn.Identity(), kind, -1, i_at, o_at, m, sub)
            for (sub, _, _), blk, i_at, o_at in zip(parts, blocks, ins, outs)]


def _describe_vit(name: str, m: nn.Module) -> list[BlockInfo]:
    parts = [
        ("attention", (m.ln_1, m.self_attention, m.dropout),
         lambda: SelfAttentionBranch(m.ln_1, m.self_attention, m.dropout)),
        ("mlp", (m.ln_2, m.mlp), lambda: nn.Sequential(OrderedDict([("ln_2", m.ln_2), ("mlp", m.mlp)]))),
    ]
    return _sublayer_infos(name, m, "torchvision_vit", parts, [m.ln_2])


def _timm_branch(layers: Sequence[tuple[str, Optional[nn.Module]]]) -> nn.Module:
    return nn.Sequential(OrderedDict([(a, x) for a, x in layers if a in ("norm", "body") or _present(x)]))


def _describe_timm_vit(name: str, m: nn.Module) -> list[BlockInfo]:
    parts = [
        ("attention", (m.norm1, m.attn, m.ls1, m.drop_path1),
         lambda: _timm_branch([("norm", m.norm1), ("body", MathAttention(m.attn)), ("ls", m.ls1),
                               ("drop_path", m.drop_path1)])),
        ("mlp", (m.norm2, m.mlp, m.ls2, m.drop_path2),
         lambda: _timm_branch([("norm", m.norm2), ("body", m.mlp), ("ls", m.ls2), ("drop_path", m.drop_path2)])),
    ]
    return _sublayer_infos(name, m, "timm_vit", parts, [m.norm2])


register_block_kind("marked", _is_marked, _describe_marked)
register_block_kind("resgeom", _is_resgeom, _describe_resgeom)
register_block_kind("torchvision_basic", lambda m: _torchvision_class(m, "BasicBlock"),
                    lambda name, m: _describe_torchvision(name, m, "torchvision_basic"))
register_block_kind("torchvision_bottleneck", lambda m: _torchvision_class(m, "Bottleneck"),
                    lambda name, m: _describe_torchvision(name, m, "torchvision_bottleneck"))
register_block_kind("timm_basic", lambda m: _third_party_class(m, "timm.models.resnet", "BasicBlock"),
                    lambda name, m: _describe_timm(name, m, "timm_basic"))
register_block_kind("timm_bottleneck", lambda m: _third_party_class(m, "timm.models.resnet", "Bottleneck"),
                    lambda name, m: _describe_timm(name, m, "timm_bottleneck"))
register_block_kind("torchvision_inverted_residual", _is_inverted_residual, _describe_inverted_residual)
register_block_kind("torchvision_convnext",
                    lambda m: _third_party_class(m, "torchvision.models.convnext", "CNBlock"), _describe_convnext)
register_block_kind("torchvision_vit",
                    lambda m: _third_party_class(m, "torchvision.models.vision_transformer", "EncoderBlock"),
                    _describe_vit)
register_block_kind("timm_vit", lambda m: _third_party_class(m, "timm.models.vision_transformer", "Block"),
                    _describe_timm_vit)


# ------------------------------------------------------------------------------ discovery
def _infos(name: str, m: nn.Module) -> list[BlockInfo]:
    for kind in _KINDS:
        if kind.match(m):
            got = kind.describe(name, m)
            infos = [got] if isinstance(got, BlockInfo) else list(got) if isinstance(got, (list, tuple)) else None
            if not infos or not all(isinstance(i, BlockInfo) for i in infos):
                raise ArgumentTypeError(f"residual_blocks: expected the describe of block kind {kind.name!r} to return "
                                        f"a BlockInfo or a non-empty sequence of them, got {type(got).__name__} "
                                        f"for module {name!r}")
            return infos
    return []


def residual_blocks(model: nn.Module, *, required: bool = True) -> list[BlockInfo]:
    """Every residual block of ``model``, in ``model.named_modules()`` order (the sublayers of
    one module in forward order).

    Args:
        model: any ``nn.Module``.
        required: raise when the model has no block (else return an empty list).

    Returns:
        a list of :class:`BlockInfo` (name, block, branch, skip, scale, post, kind, index), with
        ``index`` the position in this list.

    Raises:
        ArgumentTypeError: ``model`` is not an ``nn.Module``.
        ArgumentValueError naming the ways to declare blocks when the model has none (``required``).
    """
    check_module("residual_blocks", "model", model)
    found: list[BlockInfo] = []
    for name, m in model.named_modules():
        for info in _infos(name, m):
            found.append(dataclasses.replace(info, index=len(found)))
    if not found and required:
        raise ArgumentValueError(f"residual_blocks: found no residual blocks in {type(model).__name__}; " + _HINT
                                 + f"; the registered block kinds are {block_kinds()}")
    return found


def resolve_blocks(fn: str, model: nn.Module, blocks: Optional[Sequence[Any]]) -> list[BlockInfo]:
    """``blocks`` (None, or indices / block modules / BlockInfo s) to BlockInfo s of ``model``.

    Args:
        fn: the calling function's name (for messages).
        model: the model.
        blocks: None (every block), an index (negative counts from the end), a block module (a
            module holding sublayer blocks, e.g. a ViT ``EncoderBlock``, selects all its
            sublayers, in order), a :class:`BlockInfo`, or a sequence of these.

    Returns:
        the selected :class:`BlockInfo` s, in the order given.

    Raises:
        ArgumentTypeError: an entry of the wrong type. ArgumentValueError: an index out of range, a
        module that is no block of the model, or an empty selection.
    """
    all_blocks = residual_blocks(model)
    if blocks is None:
        return all_blocks
    if isinstance(blocks, (int, nn.Module, BlockInfo)):
        blocks = [blocks]
    by_id: dict[int, list[BlockInfo]] = {id(b.block): [b] for b in all_blocks}
    for b in all_blocks:
        if b.owner is not None and b.owner is not b.block:
            by_id.setdefault(id(b.owner), []).append(b)
    out = []
    for b in blocks:
        if isinstance(b, BlockInfo):
            out.append(b)
        elif isinstance(b, bool) or not isinstance(b, (int, nn.Module)):
            raise ArgumentTypeError(f"{fn}: blocks: expected indices, block modules or BlockInfo, got {type(b).__name__}")
        elif isinstance(b, int):
            if not -len(all_blocks) <= b < len(all_blocks):
                raise ArgumentValueError(f"{fn}: blocks: index {b} out of range for {len(all_blocks)} blocks")
            out.append(all_blocks[b])
        else:
            if id(b) not in by_id:
                raise ArgumentValueError(f"{fn}: blocks: module {type(b).__name__} is not a residual block of the model")
            out.extend(by_id[id(b)])
    if not out:
        raise ArgumentValueError(f"{fn}: blocks: expected None or a non-empty selection")
    return out
