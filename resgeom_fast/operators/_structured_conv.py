"""Exact Hessian and GGN products over a traced graph (conv ResNets and users' own models) without autograd.

The R-operator of :mod:`resgeom_fast.operators._structured` carried over to the graphs that
:mod:`resgeom_fast.operators._graph` recognises (Linear / Conv2d with eval-mode BatchNorm folded
in, BatchNorm, ReLU, residual adds, scalar multiples, max / average pooling, reshapes): one primal
forward and backward per batch (cached), then for k vectors V at once a tangent forward pass
(R h) and a tangent backward pass (R g). Tangents are [N, k, C, H, W], so that every convolution
of a layer is ONE call over all k vectors; in memory (channels_last on CPUs) they are
``[N, H, W, k, C]`` -- the k vectors stacked along channels -- at convs with more than
:data:`SMALL_PAIRS` output positions, and ``[N, k, H, W, C]`` at the smaller ones:

- ``Rx W_s``: in the stacked layout a dilated convolution of the ``[N, C, H, W k]`` view (stride
  1) or a depth-1 3-D convolution of the ``[N, C, H, W, k]`` view (strided), else the tangents
  as an ``[N k, C, H, W]`` batch through ``conv(., W_s)`` (:func:`_tconv`);
- ``x M``: the input against the k tangent weights stacked along output channels
  (``conv(x, [M_1; ...; M_k])`` is ``[N, k O, H', W']``, i.e. ``[N, k, O, H', W']`` -- no copy);
- ``R gx = conv^T(Rg, W_s) + conv^T(g, M)`` (the latter with M stacked along input channels) and
  the parameter terms ``corr(Rg, x)`` / ``corr(g, Rx)`` as single weight gradients with stacked
  channels (``aten.convolution_backward``; in the stacked layout Rg and Rx are stacked without a
  copy; ``corr(Rg, x)`` of a stride-1 conv runs as the swapped ``corr(x, Rg)``,
  :func:`_swapped_padding`);
- in the stacked layout, float32 on a CPU, ``x M`` is added into ``Rx W_s`` and ``conv^T(g, M)``
  (stride 1: the forward convolution of the tap-flipped weights) into ``conv^T(Rg, W_s)`` by
  oneDNN's sum post-op in the convolution's own call (:func:`_conv_add`), not by a separate add.

Layer rules (x input, y output, g = dL/dy; an affine layer ``y = s (conv(x, W) + b - mu) + beta``,
``s = gamma c``, ``c = 1/sqrt(var + eps)``; s = 1, mu = beta = 0 without BatchNorm):

- ``Ry = conv(Rx, W_s) + conv(x, M_W) + M_b`` with ``M_W = s V_W + (c V_gamma) W``,
  ``M_b = s V_b + c V_gamma (b - mu) + V_beta``;
- ``R gx = conv^T(Rg, W_s) + conv^T(g, M_W)``;
- with ``RT = corr(Rg, x)``, ``GR = corr(g, Rx)``, ``G = corr(g, x)`` (per output channel) and
  ``RT_b = sum Rg``, ``G_b = sum g``: ``R gW = s (RT + GR) + c V_gamma G``,
  ``R gb = s RT_b + c V_gamma G_b``, ``R g_beta = RT_b``,
  ``R g_gamma = c (<RT, W> + RT_b (b - mu) + <GR, W> + <G, V_W> + G_b V_b)``;
- BatchNorm alone, ReLU (``mask``), add, scale, pooling (max pooling routes by the primal's
  indices), reshape: as in :mod:`resgeom_fast.operators._structured`; the linear ones apply
  themselves (or their adjoint) to the tangents;
- the loss: mean cross-entropy ``R g = (p Ro - p <p, Ro>) / N`` or mean squared error
  ``R g = 2 Ro / (N d)`` at the logits.

The GGN ``J^T H_out J`` uses the same passes without the terms of the primal gradient g (the
tangent forward is J V; the tangent backward of ``H_out J V`` is then a plain backward).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from resgeom_fast.operators._graph import GNode, TracedGraph
from resgeom_fast.operators._products import NotStructured, check_primal_logits, is_class_labels
from resgeom_fast.operators._structured import output_gradient, output_tangent_gradient

__all__ = ["GGN_JACOBIAN", "JACOBIAN_BUDGET", "JACOBIAN_MAX_CLASSES", "GraphHVP", "graph_primal"]

# tangent elements kept per chunk of samples (k x samples x the kept tangents per sample); the
# sample chunk of a pass is chosen so that the kept tangents stay under this (float32: 1 GiB)
TANGENT_BUDGET = 1 << 28
# GGN products through the logits' Jacobians (GraphHVP, "The GGN through the logits' Jacobians"):
# None chooses by the cost model (fewer multiply-adds per product, and the Jacobians of one batch
# within JACOBIAN_BUDGET elements: float32 1 GiB), True / False force it on / off (tests)
GGN_JACOBIAN: Optional[bool] = None
JACOBIAN_BUDGET = 1 << 28
# ... and at most this many logits: the Jacobians cost that many backward passes once per kept
# batch, which the first product pays (about classes / (2 k) passes of k products). More would
# make "auto"'s first timing of the structured path so slow that the tuner could drop it for the
# double backward (CLEAR_LOSS) although its later passes are faster
JACOBIAN_MAX_CLASSES = 32


def _vec(v: Tensor, ndim: int) -> Tensor:
    """A per-channel vector [..., C] viewed to broadcast over ``ndim - 2`` spatial axes."""
    return v.reshape(*v.shape, *([1] * (ndim - 2)))


def _pointwise(L: GNode, ksize: Sequence[int], spatial: Sequence[int]) -> bool:
    """A conv that is a plain GEMM over [N, C]: a 1x1 kernel on 1x1 inputs without padding (a
    3x3 conv at 1x1 becomes one once cropped to its live tap). oneDNN runs these 10-15x slower
    than ``torch.mm`` on the benchmark CPU (resnet18's last stage on CIFAR-sized images)."""
    return (L.layer == "conv" and tuple(ksize) == (1, 1) and tuple(spatial) == (1, 1)
            and tuple(L.padding) == (0, 0))


def _out_len(size: int, k: int, pad: int, stride: int, dil: int) -> int:
    """Output positions of a convolution along one spatial axis."""
    return (size + 2 * pad - dil * (k - 1) - 1) // stride + 1


# convs with at most this many output positions per sample run as one GEMM per (output position,
# input position) pair that a kernel tap connects, [N, C] x [C, O]: exactly the multiply-adds of
# the convolution (no padding, no im2col copy, no weight reorder). Measured on the Intel benchmark
# CPU (one thread, 2026-12-04): resnet18's third stage on CIFAR-sized images (2 x 2 positions, 256
# channels, 10 stacked vectors) 8-13 ms per call against 35-73 ms for oneDNN; resnet18's ten
# Hessian products 1.88 s with this bound at 16 (4 x 4), 2.0 s at 4, 2.04 s at 64 (8 x 8: 484
# small GEMMs per call), 2.9 s with oneDNN and the im2col GEMMs that this path replaced
SMALL_PAIRS = 16


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """Every (output position p, input position q, tap t) of a 2-D convolution where tap t reads
    input q for output p (positions and taps row-major), and the same triples grouped the three
    ways the GEMM paths read them."""
    out_hw: tuple[int, int]
    pairs: tuple[tuple[int, int, int], ...]
    by_out: tuple[tuple[tuple[int, int], ...], ...]      # [p] -> (q, t)
    by_in: tuple[tuple[tuple[int, int], ...], ...]       # [q] -> (p, t)
    by_tap: tuple[tuple[tuple[int, int], ...], ...]      # [t] -> (p, q)


@functools.lru_cache(maxsize=None)
def _tap_pairs(in_hw: tuple[int, int], ksize: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int]) -> _Pairs:
    """The tap pairs of a 2-D convolution (:class:`_Pairs`), computed once per geometry."""
    out_hw = tuple(_out_len(in_hw[d], ksize[d], padding[d], stride[d], dilation[d]) for d in range(2))
    axes = []
    for d in range(2):
        ax = []
        for p in range(out_hw[d]):
            for t in range(ksize[d]):
                q = p * stride[d] - padding[d] + t * dilation[d]
                if 0 <= q < in_hw[d]:
                    ax.append((p, q, t))
        axes.append(ax)
    pairs = tuple((p0 * out_hw[1] + p1, q0 * in_hw[1] + q1, t0 * ksize[1] + t1)
                  for p0, q0, t0 in axes[0] for p1, q1, t1 in axes[1])

    def group(n: int, key: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        return tuple(tuple(tuple(v for j, v in enumerate(pr) if j != key) for pr in pairs if pr[key] == g)
                     for g in range(n))

    return _Pairs(out_hw, pairs, group(out_hw[0] * out_hw[1], 0), group(in_hw[0] * in_hw[1], 1),
                  group(ksize[0] * ksize[1], 2))


def _pairs_of(L: GNode, in_hw: Sequence[int], ksize: Sequence[int]) -> _Pairs:
    return _tap_pairs(tuple(int(v) for v in in_hw), tuple(int(v) for v in ksize), tuple(int(v) for v in L.stride),
                      tuple(int(v) for v in L.padding), tuple(int(v) for v in L.dilation))


def _rows(t: Tensor) -> Tensor:
    """[N, C, H, W] as [N, H W, C] (a view of a channels_last tensor)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1, t.shape[1])


def _gemm_sum(dst: Tensor, terms: list[tuple[Tensor, Tensor]]) -> None:
    """``dst = sum a @ b`` over ``terms`` (zero when empty), written in place."""
    if not terms:
        dst.zero_()
        return
    torch.mm(*terms[0], out=dst)
    for a, b in terms[1:]:
        dst.addmm_(a, b)


def _pair_fwd(L: GNode, x: Tensor, W: Tensor, b: Optional[Tensor]) -> Tensor:
    N, O = x.shape[0], W.shape[0]
    P = _pairs_of(L, x.shape[2:], W.shape[2:])
    out_hw = P.out_hw
    x3, Wt = _rows(x), W.permute(0, 2, 3, 1).reshape(O, -1, W.shape[1])            # [N, Pin, C], [O, taps, C]
    out = x.new_empty((N, out_hw[0] * out_hw[1], O))
    for p, qts in enumerate(P.by_out):
        _gemm_sum(out[:, p], [(x3[:, q], Wt[:, t].t()) for q, t in qts])
    if b is not None:
        out += b
    return out.view(N, *out_hw, O).permute(0, 3, 1, 2)


def _pair_bwd_in(L: GNode, g: Tensor, W: Tensor, in_shape: Sequence[int]) -> Tensor:
    N, O, C = g.shape[0], W.shape[0], W.shape[1]
    P = _pairs_of(L, in_shape[2:], W.shape[2:])
    g3, Wt = _rows(g), W.permute(0, 2, 3, 1).reshape(O, -1, C)
    out = g.new_empty((N, int(in_shape[2]) * int(in_shape[3]), C))
    for q, pts in enumerate(P.by_in):
        _gemm_sum(out[:, q], [(g3[:, p], Wt[:, t]) for p, t in pts])
    return out.view(N, int(in_shape[2]), int(in_shape[3]), C).permute(0, 3, 1, 2)


def _pair_bwd_w(L: GNode, g: Tensor, x: Tensor, w_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    O, C = int(w_shape[0]), int(w_shape[1])
    taps = int(w_shape[2]) * int(w_shape[3])
    P = _pairs_of(L, x.shape[2:], w_shape[2:])
    g3, x3 = _rows(g), _rows(x)
    G = g.new_empty((O, taps, C))
    for t, pqs in enumerate(P.by_tap):
        _gemm_sum(G[:, t], [(g3[:, p].t(), x3[:, q]) for p, q in pqs])
    return G.view(O, int(w_shape[2]), int(w_shape[3]), C).permute(0, 3, 1, 2), g3.sum((0, 1))


def _fwd(L: GNode, x: Tensor, W: Tensor, b: Optional[Tensor]) -> Tensor:
    if L.layer == "conv":
        N, O = x.shape[0], W.shape[0]
        if _pointwise(L, W.shape[2:], x.shape[2:]):
            return F.linear(x.reshape(N, -1), W.reshape(O, -1), b).view(N, O, 1, 1)
        out_hw = [_out_len(x.shape[2 + d], W.shape[2 + d], L.padding[d], L.stride[d], L.dilation[d]) for d in range(2)]
        if out_hw[0] * out_hw[1] <= SMALL_PAIRS:
            return _pair_fwd(L, x, W, b)
        return F.conv2d(x, W, b, L.stride, L.padding, L.dilation)
    return F.linear(x, W, b)


def _bwd_in(L: GNode, g: Tensor, W: Tensor, in_shape: Sequence[int], cl: bool = False) -> Tensor:
    """conv^T(g, W) / g W: the gradient of the layer's input ([B, C, ...] of ``in_shape``;
    channels_last with ``cl``: the input's layout tells the kernel which one to produce)."""
    if L.layer == "conv":
        N, O = g.shape[0], g.shape[1]
        if _pointwise(L, W.shape[2:], in_shape[2:]):
            return torch.mm(g.reshape(N, -1), W.reshape(O, -1)).view(*in_shape)
        if g.shape[2] * g.shape[3] <= SMALL_PAIRS:
            return _pair_bwd_in(L, g, W, in_shape)
        like = (torch.empty(in_shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last) if cl
                else g.new_empty(1).expand(in_shape))
        return torch.ops.aten.convolution_backward(
            g, like, W, None, L.stride, L.padding, L.dilation, False, [0, 0], 1,
            [True, False, False])[0]
    return torch.mm(g, W)


def _swapped_padding(L: GNode, w_shape: Sequence[int]) -> Optional[list[int]]:
    """The padding at which ``corr(x, g)`` (x as the output gradient, g as the input) gives the
    weight gradient ``corr(g, x)`` of a stride-1 convolution with its taps flipped (tap t of one
    is tap K - 1 - t of the other, ``pad' = (K - 1) dil - pad`` per axis); None where that is not
    the faster call or does not apply (a stride, or ``pad'`` < 0). oneDNN runs the weight gradient
    with many output-gradient channels over few input channels well below the swapped one: the
    stacked ``corr(Rg, x)`` of ResNet-20's first stage (10 x 16 -> 16 channels, 32 x 32, 128
    images) 68 ms against 41 ms swapped, 48 / 41 ms at 32 channels, equal at 64 (one thread, the
    Intel benchmark CPU, 2026-12-05)."""
    if int(w_shape[0]) <= int(w_shape[1]):
        return None
    return _flipped_padding(L, w_shape[2:])


def _flipped_padding(L: GNode, ksize: Sequence[int]) -> Optional[list[int]]:
    """``pad' = (K - 1) dil - pad`` per axis: the padding at which a stride-1 convolution with
    the taps flipped gives the adjoint of conv ``L`` (kernel ``ksize``) -- the swapped weight
    gradient (:func:`_swapped_padding`) and conv^T as a forward convolution (:func:`_conv_t_add`);
    None for a strided conv or where ``pad'`` < 0 (a padding past the kernel's reach)."""
    if _two(L.stride) != [1, 1]:
        return None
    dil, pad = _two(L.dilation), _two(L.padding)
    pads = [(int(ksize[d]) - 1) * dil[d] - pad[d] for d in range(2)]
    return pads if min(pads) >= 0 else None


def _bwd_w(L: GNode, g: Tensor, x: Tensor, w_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """corr(g, x) / g^T x: the weight gradient of shape ``w_shape``, and the bias gradient (g
    summed over samples and positions, [w_shape[0]]) from the same kernel call."""
    if L.layer == "conv":
        N = g.shape[0]
        if _pointwise(L, w_shape[2:], x.shape[2:]):
            g2 = g.reshape(N, -1)
            return torch.mm(g2.t(), x.reshape(N, -1)).view(*w_shape), g2.sum(0)
        if g.shape[2] * g.shape[3] <= SMALL_PAIRS:
            return _pair_bwd_w(L, g, x, w_shape)
        pads = _swapped_padding(L, w_shape)
        if pads is not None:
            # corr(g, x) = the tap-flipped transpose of corr(x, g) at padding pads
            gwT = torch.ops.aten.convolution_backward(
                x, g, g.new_empty(1).expand(w_shape[1], w_shape[0], *w_shape[2:]), None, [1, 1], pads,
                L.dilation, False, [0, 0], 1, [False, True, False])[1]
            return gwT.flip(2, 3).transpose(0, 1), g.sum((0, 2, 3))
        _, gw, gb = torch.ops.aten.convolution_backward(
            g, x, g.new_empty(1).expand(w_shape), [w_shape[0]], L.stride, L.padding, L.dilation, False, [0, 0],
            1, [False, True, True])
        return gw, gb
    return torch.mm(g.t(), x), g.sum(0)


def _cl(t: Tensor, cl: bool) -> Tensor:
    """``t`` in channels_last when ``cl`` and t is 4-D, else as it is."""
    return t.contiguous(memory_format=torch.channels_last) if cl and t.dim() == 4 else t


def _stack(t: Tensor, k: int, cl: bool) -> Tensor:
    """Tangents [N, k, C, ...] as one tensor of k*C channels [N, k C, ...] (vector-major channels);
    with ``cl`` (5-D t) a channels_last view of the stacked layout (:func:`_bs`: a copy only
    when t is not in it), else a reshape."""
    if cl and t.dim() == 5:
        N, _, C, H, W = t.shape
        return _bs(t, True).view(N, k * C, H, W)
    return t.reshape(t.shape[0], -1, *t.shape[3:])


def _bl(t: Optional[Tensor], cl: bool) -> Optional[Tensor]:
    """Tangents [N, k, C, H, W] in the layout whose [N k, C, H, W] view is channels_last
    ([N, k, H, W, C] in memory) when ``cl``; a no-op when they already are."""
    if t is None or not cl or t.dim() != 5:
        return t
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _bs(t: Optional[Tensor], cl: bool) -> Optional[Tensor]:
    """Tangents [N, k, C, H, W] in the stacked layout ([N, H, W, k, C] in memory: the
    channels_last layout of the vectors stacked along channels, [N, k C, H, W]) when ``cl``; a
    no-op when they already are. The layout every conv above :data:`SMALL_PAIRS` output positions
    reads and writes (:func:`_tconv`): the stacked weight gradients ``corr(Rg, x)`` and
    ``corr(g, Rx)`` and the stacked ``conv(x, M)`` / ``conv^T(g, M)`` then need no copy."""
    if t is None or not cl or t.dim() != 5:
        return t
    return t.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def _stacked_path(L: GNode, in_hw: Sequence[int], ksize: Sequence[int], device: Any = "cpu") -> bool:
    """The conv's tangent convolutions run in the stacked layout (:func:`_tconv`): a conv with
    more than :data:`SMALL_PAIRS` output positions that is not a GEMM (:func:`_pointwise`), on
    a CPU (measured there with oneDNN; GPUs keep the batch of N k images, whose dilated and 3-D
    forms have not been measured with cuDNN)."""
    if (torch.device(device).type != "cpu" or L.layer != "conv" or len(in_hw) != 2
            or _pointwise(L, ksize, in_hw)):
        return False
    out_hw = [_out_len(int(in_hw[d]), int(ksize[d]), int(L.padding[d]), int(L.stride[d]), int(L.dilation[d]))
              for d in range(2)]
    return out_hw[0] * out_hw[1] > SMALL_PAIRS


def _w3(Ws: Tensor) -> Tensor:
    """A conv's weights [O, C, kh, kw] as the depth-1 kernel [O, C, kh, kw, 1] of the 3-D form
    of :func:`_tconv`, channels_last_3d (with channels_last_3d input oneDNN then writes the
    stacked layout)."""
    return Ws.unsqueeze(-1).contiguous(memory_format=torch.channels_last_3d)


def _tconv(L: GNode, Rx: Tensor, Ws: Tensor, cl: bool) -> Tensor:
    """``conv(Rx_j, W_s)`` of every vector j: tangents [N, k, C, H, W] -> [N, k, O, H', W'].

    With ``cl`` on a stacked-path conv (:func:`_stacked_path`) in the stacked layout
    (:func:`_bs`), without a copy: a stride-1 conv is one 2-D convolution of the
    ``[N, C, H, W k]`` view (each column w holds the k vectors side by side) with dilation
    ``k dil`` and padding ``k pad`` along the merged axis, which reads vector j's columns only;
    a strided one a 3-D convolution of the ``[N, C, H, W, k]`` view with a depth-1 kernel.
    oneDNN runs the first at the speed of the plain batch of N k images (ResNet-20's shapes on the
    Intel benchmark CPU, one thread, 2026-12-05: 49 / 40 / 32 ms against 48 / 38 / 35 ms at
    16 / 32 / 64 channels, where the 3-D form takes 59 / 44 / 33 ms), the second at its speed or
    faster for the strided convs. Otherwise the batch of N k images ([N k, C, H, W],
    channels_last with ``cl``)."""
    N, k = Rx.shape[:2]
    O = Ws.shape[0]
    if cl and Rx.dim() == 5 and _stacked_path(L, Rx.shape[3:], Ws.shape[2:], Rx.device):
        _, _, C, H, W = Rx.shape
        X = _bs(Rx, True).permute(0, 2, 3, 4, 1)                           # [N, C, H, W, k]
        st, pad, dil = _two(L.stride), _two(L.padding), _two(L.dilation)
        if st == [1, 1]:
            out = F.conv2d(X.reshape(N, C, H, W * k), Ws, None, 1, (pad[0], pad[1] * k), (dil[0], dil[1] * k))
            return out.view(N, O, out.shape[2], out.shape[3] // k, k).permute(0, 4, 1, 2, 3)
        out = F.conv3d(X, _w3(Ws), None, (*st, 1), (*pad, 0), (*dil, 1))
        return out.permute(0, 4, 1, 2, 3)
    Rx = _bl(Rx, cl)
    r = _fwd(L, Rx.reshape(N * k, *Rx.shape[2:]), Ws, None)
    return r.view(N, k, O, *r.shape[2:])


def _tconv_t(L: GNode, Rg: Tensor, Ws: Tensor, in_shape: Sequence[int], cl: bool) -> Tensor:
    """``conv^T(Rg_j, W_s)`` of every vector j (the adjoint of :func:`_tconv`): tangents
    [N, k, O, H', W'] -> [N, k, *in_shape] (``in_shape`` = [C, H, W] per sample), in the same
    layouts and calls as :func:`_tconv`."""
    N, k = Rg.shape[:2]
    C = int(in_shape[0])
    if cl and Rg.dim() == 5 and _stacked_path(L, in_shape[1:], Ws.shape[2:], Rg.device):
        H, W = int(in_shape[1]), int(in_shape[2])
        O, Ho, Wo = Rg.shape[2:]
        G = _bs(Rg, True).permute(0, 2, 3, 4, 1)                           # [N, O, H', W', k]
        st, pad, dil = _two(L.stride), _two(L.padding), _two(L.dilation)
        if st == [1, 1]:
            like = torch.empty((N, C, H, W * k), dtype=Rg.dtype, device=Rg.device, memory_format=torch.channels_last)
            r = torch.ops.aten.convolution_backward(
                G.reshape(N, O, Ho, Wo * k), like, Ws, None, [1, 1], [pad[0], pad[1] * k], [dil[0], dil[1] * k],
                False, [0, 0], 1, [True, False, False])[0]
            return r.view(N, C, H, W, k).permute(0, 4, 1, 2, 3)
        like = torch.empty((N, C, H, W, k), dtype=Rg.dtype, device=Rg.device, memory_format=torch.channels_last_3d)
        r = torch.ops.aten.convolution_backward(
            G, like, _w3(Ws), None, [*st, 1], [*pad, 0], [*dil, 1], False, [0, 0, 0], 1,
            [True, False, False])[0]
        return r.permute(0, 4, 1, 2, 3)
    Rg = _bl(Rg, cl)
    r = _bwd_in(L, Rg.reshape(N * k, *Rg.shape[2:]), Ws, (N * k, *in_shape), cl)
    return r.view(N, k, *in_shape)


def _conv_add_op() -> Any:
    """oneDNN's convolution with its sum post-op, ``out += conv(x, W) + b`` in one call
    (``torch.ops.mkldnn._convolution_pointwise_.binary``, the kernel Inductor's CPU fusions and
    AOTInductor's C shim call); None where this PyTorch has no oneDNN or not that op."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._convolution_pointwise_.binary
    except (AttributeError, RuntimeError):
        return None


_CONV_ADD = _conv_add_op()


def _stacked_view(t: Tensor) -> Optional[Tensor]:
    """Tangents [N, k, C, H, W] held in the stacked layout (:func:`_bs`) as their channels_last
    ``[N, k C, H, W]`` view (the same memory); None when they are in another layout."""
    if t.dim() != 5:
        return None
    N, k, C, H, W = t.shape
    p = t.permute(0, 3, 4, 1, 2)
    if not p.is_contiguous():
        return None
    return p.view(N, H, W, k * C).permute(0, 3, 1, 2)


def _conv_add(x: Tensor, W: Tensor, b: Optional[Tensor], out: Optional[Tensor], stride: Sequence[int],
              padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """``out += conv(x, W) + b`` in place by oneDNN's sum post-op (:func:`_conv_add_op`) where it
    applies -- float32 on the CPU, x and out channels_last ``[N, C, H, W]`` / ``[N, O, H', W']``
    -- and True; False, with nothing done, elsewhere (the caller adds a separate convolution).
    The tangent passes add ``conv(x, M)`` to ``conv(Rx, W_s)`` and ``conv^T(g, M)`` to
    ``conv^T(Rg, W_s)`` at every conv: in one call instead of a convolution and an add over a
    tensor of k times the activations (ResNet-20's shapes, 32 images, k = 10, one thread, the
    Intel benchmark CPU, 2026-12-05: 12.1 / 11.2 / 9.5 ms against 13.3 / 12.0 / 10.6 ms at
    16 / 32 / 64 channels; conv^T as the forward conv of flipped weights 12.4 / 11.4 / 10.2 ms
    against 13.5 / 12.0 / 10.5 ms; faster or equal at 8-32 positions per side, 16-128 channels,
    32 and 128 images)."""
    if not _fusable(x, out, W.shape[0]):
        return False
    try:
        _CONV_ADD(out, x, W, b, _two(padding), _two(stride), _two(dilation), 1, "add", None, None, [], None)
    except (RuntimeError, TypeError) as exc:
        # a private op whose schema or support may change between PyTorch releases: it fails before
        # it writes, so the caller's separate convolution and add give the same numbers
        _fused_add_failed(exc)
        return False
    return True


def _fusable(x: Tensor, out: Optional[Tensor], out_channels: int) -> bool:
    """:func:`_conv_add` applies to input ``x`` and output ``out`` of ``out_channels``."""
    return (_CONV_ADD is not None and out is not None and torch.backends.mkldnn.enabled
            and x.device.type == "cpu" and x.dtype == torch.float32 and out.dtype == torch.float32
            and x.dim() == 4 and out.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and out.is_contiguous(memory_format=torch.channels_last) and out.shape[1] == out_channels)


def _fused_add_failed(exc: BaseException) -> None:
    """Turn the fused conv add off for the process, with a warning naming the cause."""
    global _CONV_ADD
    _CONV_ADD = None
    warnings.warn(f"resgeom_fast: oneDNN's fused convolution + add failed ({type(exc).__name__}: {exc}); "
                  f"the conv structured products add separately from now on (same numbers, slower)",
                  RuntimeWarning, stacklevel=2)


def _conv_t_add(L: GNode, g: Tensor, W: Tensor, out: Optional[Tensor]) -> bool:
    """``out += conv^T(g, W)`` (W [O, C', kh, kw] of a stride-1 conv, out [N, C', H, W]) as the
    forward convolution of the tap-flipped transposed weights at padding ``(K - 1) dil - pad``
    by :func:`_conv_add`; False where it does not apply (a stride, a negative padding, or
    :func:`_conv_add` declines)."""
    pads = _flipped_padding(L, W.shape[2:]) if L.layer == "conv" else None
    if pads is None or not _fusable(g, out, W.shape[1]):
        return False                # (declined before the flipped copy of the weights)
    Wt = W.flip(2, 3).transpose(0, 1).contiguous(memory_format=torch.channels_last)
    return _conv_add(g, Wt, None, out, [1, 1], pads, L.dilation)


def _new_weights(shape: Sequence[int], like: Tensor, cl: bool) -> Tensor:
    """An uninitialised [k, O, C, kh, kw] tensor (of ``like``'s dtype and device) whose
    ``[k O, C, kh, kw]`` view is channels_last when ``cl`` ([k, O, kh, kw, C] in memory)."""
    if not cl or len(shape) != 5:
        return like.new_empty(shape)
    k, O, C, kh, kw = shape
    return like.new_empty((k, O, kh, kw, C)).permute(0, 1, 4, 2, 3)


# bytes of the vectors read per block of output channels when they are gathered from an [n, k]
# column block (the vectors innermost): small enough to stay in the L2 cache until all k are read
GATHER_BLOCK = 1 << 18


def _by_rows(fn: Any, V: Tensor) -> None:
    """``fn(slice)`` over blocks of V's axis 1 (output channels) when V [k, O, ...] is a view of
    column vectors (``V.stride(0) < V.stride(1)``: each element's k values lie side by side), else
    ``fn(slice(None))`` once. Written k-major, such a view is read k times over unless a block's
    rows stay in cache: resnet18's layer4 weights (94 MB for 10 vectors) 0.058 s at once, 0.026 s
    in blocks of 1-4 channels (one thread, the Intel benchmark CPU, 2026-12-04)."""
    k, O = V.shape[:2]
    row = V[0, 0].numel() * k * V.element_size()
    if V.stride(0) >= V.stride(1) or k == 1 or O * row <= GATHER_BLOCK:
        fn(slice(None))
        return
    b = max(1, GATHER_BLOCK // row)
    for o0 in range(0, O, b):
        fn(slice(o0, o0 + b))


def _gemm_layer(L: GNode, x: Tensor) -> bool:
    """A Linear layer on [N, C] inputs: its tangent terms are plain GEMMs whose sums the GEMM
    accumulates itself (``addmm_``: measured on the user FC ResNet's ten products, 2026-12-05,
    the separate adds were 12 of 137 ms)."""
    return L.layer != "conv" and x.dim() == 2


def _stack_in(MW: Tensor, cl: bool) -> Tensor:
    """Tangent weights [k, O, C, ...] stacked along input channels, [O, k C, ...] (vector-major),
    in ONE copy: channels_last ([O, kh, kw, k, C] in memory) when ``cl`` and MW is a conv's."""
    k, O, C = MW.shape[:3]
    if cl and MW.dim() == 5:
        kh, kw = MW.shape[3:]
        return MW.permute(1, 3, 4, 0, 2).contiguous().view(O, kh, kw, k * C).permute(0, 3, 1, 2)
    return MW.transpose(0, 1).reshape(O, k * C, *MW.shape[3:])


def _dots(A: Tensor, B: Tensor) -> Tensor:
    """``[k, O]`` inner products ``sum_f A[j, o, f] B[o, f]`` over the trailing axes (A [k, O, ...],
    B [O, ...]) as one batched matrix-vector product that reads A once in its own memory order
    (``(A * B).sum(...)`` writes and reads a temporary of A's size: on resnet18 470 MB per conv
    layer and product pass)."""
    k, O = A.shape[:2]
    rest = list(range(2, A.dim()))
    # A's trailing axes in memory order (outermost first); B laid out the same way
    order = sorted(rest, key=lambda d: -A.stride(d))
    Ap = A.permute(1, 0, *order)                                     # [O, k, ...] in memory order
    Bp = B.permute(0, *[d - 1 for d in order])
    F_ = math.prod(A.shape[d] for d in order)
    # a view when the trailing axes are dense (a copy only for a cropped kernel's slice)
    return torch.bmm(Ap.reshape(O, k, F_), Bp.reshape(O, F_, 1)).view(O, k).t()


def _live_taps(size: int, k: int, pad: int, stride: int, dil: int) -> Optional[tuple[int, int, int]]:
    """The kernel taps of one spatial axis that ever read the input (not only its zero padding):
    ``(t0, t1, pad')`` when they are a proper sub-range ``t0..t1`` of the ``k`` taps and the
    convolution by taps ``t0..t1`` with symmetric padding ``pad'`` produces the same output
    positions from the same input positions; None when every tap is live or no such crop exists."""
    out = _out_len(size, k, pad, stride, dil)
    if out < 1:
        return None
    live = [t for t in range(k) if any(0 <= o * stride - pad + t * dil < size for o in range(out))]
    if not live or len(live) == k or live != list(range(live[0], live[-1] + 1)):
        return None
    t0, t1 = live[0], live[-1]
    pad2 = pad - t0 * dil
    if pad2 < 0 or _out_len(size, t1 - t0 + 1, pad2, stride, dil) != out:
        return None
    return t0, t1, pad2


def _conv_crop(L: GNode, spatial: Sequence[int], ksize: Sequence[int]) -> Optional[tuple[GNode, tuple[slice, ...]]]:
    """An exact smaller convolution for a conv node on inputs of ``spatial`` size: the node with
    the padding of the cropped kernel, and the kernel slices (every axis; None when no tap reads
    only padding). A tap that reads only zero padding contributes nothing to the output, so its
    weights' gradient and Hessian rows and columns are exactly zero: at small spatial sizes
    (resnet18's last stage at 1x1 on CIFAR-sized images: 1 of 9 taps live) the tangent passes run
    on the live taps alone."""
    if L.layer != "conv" or len(spatial) != 2:
        return None
    crops = [_live_taps(int(spatial[d]), int(ksize[d]), int(L.padding[d]), int(L.stride[d]), int(L.dilation[d]))
             for d in range(2)]
    if crops[0] is None and crops[1] is None:
        return None
    sl, pad = [], []
    for d in range(2):
        if crops[d] is None:
            sl.append(slice(0, int(ksize[d])))
            pad.append(int(L.padding[d]))
        else:
            t0, t1, p2 = crops[d]
            sl.append(slice(t0, t1 + 1))
            pad.append(p2)
    return dataclasses.replace(L, padding=tuple(pad)), (slice(None), slice(None), *sl)


def _sum_but(t: Tensor, keep: int) -> Tensor:
    """Sum over axis 0 and every axis after ``keep`` (the spatial axes): [N, *kept, ...] -> kept."""
    dims = [0, *range(keep + 1, t.dim())]
    return t.sum(dims)


def _uncrop(r: Tensor, crop: tuple[slice, ...], shape: Sequence[int]) -> Tensor:
    """Products of a cropped conv's live taps [k, O, C, h, w] in the full kernel [k, *shape]
    (zero at the taps that read only padding: their Hessian rows are exactly zero)."""
    full = r.new_zeros((r.shape[0], *shape))
    full[(slice(None), *crop)] = r
    return full


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _acc(d: dict, i: Any, t: Optional[Tensor], inplace: bool = False) -> None:
    """``d[i] += t``; with ``inplace`` into d[i] itself when no other entry of d (nor t) shares
    its memory (the tangent passes' buffers: one pass over the tensor instead of a new one)."""
    if t is None:
        return
    if d.get(i) is None:
        d[i] = t
    elif inplace and _sole(d[i], d, i) and not _same_memory(d[i], t):
        d[i].add_(t)
    else:
        d[i] = d[i] + t


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _sole(t: Tensor, d: dict, key: Any) -> bool:
    """No entry of ``d`` but ``key``'s shares t's memory, and t has no broadcast (stride 0) axis:
    t can be overwritten in place."""
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        return False
    return not any(isinstance(v, Tensor) and j != key and _same_memory(v, t) for j, v in d.items())


class _GPrimal:
    """Per-batch cache: ``acts[i]`` what node i's rules need from the forward pass, ``grads[i]``
    dL/d(output of node i) (affine / BatchNorm nodes; Hessian only), ``consts[i]`` the folded
    weights of affine node i; ``p`` softmax of the logits, ``n`` samples of the batch."""

    def __init__(self) -> None:
        self.acts: dict[int, Any] = {}
        self.grads: dict[int, Tensor] = {}
        self.consts: dict[int, tuple] = {}
        self.shapes: dict[int, tuple[int, ...]] = {}     # per-sample shape of every traced node
        self.gx: dict[int, tuple[Tensor, Tensor]] = {}   # affine: (G, G_b) over these samples (lazy)
        # conv nodes whose kernel has taps that read only padding at this batch's spatial size:
        # the node with the cropped kernel's padding, and the kernel slices (``_conv_crop``);
        # their consts hold the cropped weights
        self.geo: dict[int, GNode] = {}
        self.crop: dict[int, tuple[slice, ...]] = {}
        self.p: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.n = 0
        # GGN through the logits' Jacobians: node i's d logits / d(output of i) transposed,
        # [n, F_i, classes] (the forward's bmm D A^T reads it contiguously: the user FC net's ten
        # products 3.5% faster than with [n, classes, F_i]; the backward's A^T view costs nothing)
        self.jac: dict[int, Tensor] = {}
        self._chunks: dict[int, list[_GPrimal]] = {}

    def chunks(self, size: int) -> list[_GPrimal]:
        """Views of this cache on consecutive blocks of ``size`` samples (``n`` stays the batch's)."""
        if size >= self.n:
            return [self]
        if size not in self._chunks:
            parts = []
            for s0 in range(0, self.n, size):
                sl = slice(s0, s0 + size)
                c = _GPrimal()
                c.n, c.consts, c.shapes, c.geo, c.crop = self.n, self.consts, self.shapes, self.geo, self.crop
                c.p = None if self.p is None else self.p[sl]
                c.acts = {i: (a[sl] if isinstance(a, Tensor) else (a[0][sl], *a[1:])) for i, a in self.acts.items()}
                c.grads = {i: g[sl] for i, g in self.grads.items()}
                c.jac = {i: a[sl] for i, a in self.jac.items()}
                parts.append(c)
            self._chunks[size] = parts
        return self._chunks[size]


class GraphHVP:
    """Exact Hessian (``curvature="hessian"``) or GGN (``"ggn"``) products of a traced graph
    (module doc); ``params`` the operator's parameters, ``loss`` "ce" or "mse".

    ``chunk``: samples per block of the tangent passes (None: as many as keep the stored tangents
    under :data:`TANGENT_BUDGET` elements).

    The GGN through the logits' Jacobians: ``J V = sum_i A_i D_i`` and ``(J^T u)_i`` from
    ``A_i^T u``, where ``A_i`` [n, classes, F_i] (kept transposed) is d logits / d(output of node i) per sample and
    ``D_i = conv(x, M) + M_b`` the direct change of node i's output by its own parameters (no
    tangent propagates through the graph). Per product and vector this runs ``conv(x, M)`` and
    ``corr(Rg, x)`` of every layer -- not ``conv(Rx, W_s)`` and ``conv^T(Rg, W_s)`` as well --
    plus two contractions of ``classes x F_i`` per sample; the Jacobians cost ``classes``
    backward passes once per primal pass (kept with it). Chosen (``jac_on``) for the GGN when
    :data:`GGN_JACOBIAN` is None, the operator keeps its primal passes, the logits are at most
    :data:`JACOBIAN_MAX_CLASSES` wide (the one-off cost), the Jacobians fit their
    share of :data:`JACOBIAN_BUDGET` elements (split over the kept batches) and their multiply-adds
    per product are fewer (:meth:`macs_per`). Exact: the same sums in another order. Measured on
    the benchmark CPU (one thread, 2026-12-05, ten GGN products, in one process alternating
    both): the user FC ResNet (10 classes, width 128, 512 digits) 0.067 s against 0.092 s with
    the tangents (6.0 against 11.0 GFLOP), CIFAR ResNet-20 on 128 images 2.53 s against 3.61 s,
    torchvision resnet18 on 64 CIFAR-sized images 1.14 s against 1.46 s."""

    def __init__(self, graph: TracedGraph, params: Sequence[Tensor], loss: str = "ce",
                 curvature: str = "hessian", chunk: Optional[int] = None) -> None:
        if loss not in ("ce", "mse"):
            raise ValueError(f"GraphHVP: expected loss 'ce' or 'mse', got {loss!r}")
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"GraphHVP: expected curvature 'hessian' or 'ggn', got {curvature!r}")
        self.graph, self.params, self.loss, self.curvature = graph, list(params), loss, curvature
        self.chunk = chunk
        # cl: the tangent passes' convolutions on channels_last tensors (oneDNN's fast layout on
        # CPUs: 1.5-2.5x faster per convolution than NCHW on the benchmark CPU, ResNet-20 shapes,
        # one thread); the primal pass stays in the model's own layout and operations (_forward)
        self.cl = True
        nodes = graph.nodes
        self.nodes = nodes
        # upstream[i]: a chosen parameter acts on node i's output (else its tangent is 0)
        up: list[bool] = []
        for n in nodes:
            own = any(j is not None for j in (n.iw, n.ib, n.ig, n.ibeta))
            up.append(own or any(up[a] for a in n.args))
        self.upstream = up
        # last reader of every node in the forward order (tangents are freed after it), and the
        # tangents the backward reads (inputs of affine / BatchNorm nodes, Hessian only)
        self.last_use = {a: i for i, n in enumerate(nodes) for a in n.args}
        self.keep = set()
        if curvature == "hessian":
            self.keep = {n.args[0] for n in nodes if n.kind in ("affine", "bn")}
        self.macs: Optional[dict[int, int]] = None      # per-sample multiply-adds of affine nodes
        self.shapes: dict[int, tuple[int, ...]] = {}    # per-sample output shapes (last primal pass)
        self.has_conv = any(n.kind == "affine" and n.layer == "conv" for n in nodes)
        # the GGN through the logits' Jacobians (class doc): the nodes whose parameters are chosen,
        # whether the operator keeps its primal passes between calls (set by the operator; the
        # Jacobians are worth their n_out backward passes only when they are kept), and the
        # choice of the last primal pass with the logits' width it was made for
        self.jnodes = [i for i, n in enumerate(nodes) if n.kind in ("affine", "bn")
                       and any(j is not None for j in (n.iw, n.ib, n.ig, n.ibeta))]
        self.cached = True
        self.kept_batches = 1                  # primal passes kept together (they share the budget)
        self.jac_on = False
        self.n_out = 0

    # -- primal ---------------------------------------------------------------------------------
    def primal(self, model: nn.Module, x: Tensor, y: Tensor) -> _GPrimal:
        """The cached forward (and, for the Hessian, backward) pass of one batch."""
        st = _GPrimal()
        with torch.no_grad():
            logits = self._forward(model, x, st)
            if logits.dim() != 2:
                raise NotStructured(f"the model's output is not [N, classes] logits (got shape {tuple(logits.shape)})")
            n = logits.shape[0]
            p, g = output_gradient(logits, y, self.loss)
            if self.curvature == "hessian":
                self._backward(g, st)
            st.p, st.logits, st.n = p, logits, n
            self.n_out = int(logits.shape[1])
            self.jac_on = self.curvature == "ggn" and self._want_jacobian(st)
            if self.jac_on:
                self._jacobians(st)
        return st

    def _want_jacobian(self, st: _GPrimal) -> bool:
        """Whether this primal pass's GGN products go through the logits' Jacobians (class doc)."""
        if GGN_JACOBIAN is not None:
            return bool(GGN_JACOBIAN)
        elems = st.n * self.n_out * sum(_numel(st.shapes[i]) for i in self.jnodes)
        budget = JACOBIAN_BUDGET // max(1, self.kept_batches)
        return (self.cached and self.n_out <= JACOBIAN_MAX_CLASSES and elems <= budget
                and self.macs_per(True) < self.macs_per(False))

    def _jacobians(self, st: _GPrimal) -> None:
        """``st.jac[i]``: d logits / d(output of node i), transposed [n, F_i, classes], by one
        backward pass of the classes' unit vectors stacked as tangents (in sample blocks)."""
        n, c = st.n, self.n_out
        assert st.logits is not None
        # written by the backward straight into their transposed layout (a [m, classes, *shape]
        # view of each block of rows): no second, transposing copy
        AT = {i: st.logits.new_zeros((n, _numel(st.shapes[i]), c)) for i in self.jnodes}
        size = max(1, self._chunk(st, c))
        eye = torch.eye(c, dtype=st.logits.dtype, device=st.logits.device)
        for j, part in enumerate(st.chunks(size)):
            s0 = j * size
            m = min(size, n - s0)
            rec = {i: a[s0:s0 + m].transpose(1, 2).unflatten(2, st.shapes[i]) for i, a in AT.items()}
            self._rbwd(eye.expand(m, c, c).clone(), {}, part, {}, set(), {}, c, record=rec)
        st.jac = AT
        st._chunks = {}         # the sample blocks made above hold no Jacobians

    def _fx_value(self, node: fx.Node, vals: list, model: nn.Module, contiguous: bool = False) -> Any:
        """Evaluate one fx node on the values computed so far (constants, reshapes, shifts); with
        ``contiguous`` on contiguous tensors (a model's ``view`` expects the layout it made, not
        the channels_last one of this engine)."""
        fi = self.graph.fx_index

        def look(a: Any) -> Any:
            v = vals[fi[a]]
            return v.contiguous() if contiguous and isinstance(v, Tensor) else v

        args = fx.node.map_arg(node.args, look)
        kwargs = fx.node.map_arg(node.kwargs, look)
        if node.op == "get_attr":
            obj: Any = model
            for part in str(node.target).split("."):
                obj = getattr(obj, part)
            return obj.detach() if isinstance(obj, Tensor) else obj
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], str(node.target))(*args[1:], **kwargs)
        return model.get_submodule(str(node.target))(*args, **kwargs)

    def _forward(self, model: nn.Module, x: Tensor, st: _GPrimal) -> Tensor:
        vals: list[Any] = [None] * len(self.nodes)
        N = x.shape[0]
        macs: dict[int, int] = {}
        for i, L in enumerate(self.nodes):
            k = L.kind
            a = vals[L.args[0]] if L.args else None
            if k == "input":
                h = x
            elif k == "const":
                h = self._fx_value(L.fx, vals, model)
            elif k == "affine":
                if L.layer == "linear" and a.dim() != 2:
                    raise NotStructured(f"node {L.name!r}: a Linear on a {a.dim()}-D input (only [N, features])")
                W = (L.W if L.W is not None else vals[L.w_node]).detach()
                b = L.b if L.w_node is None else (None if L.b_node is None else vals[L.b_node])
                b = None if b is None else b.detach()
                if L.bn is None:
                    Ws, beff, sc, c, shift = W, b, None, None, None
                else:
                    bn = L.bn
                    c = torch.rsqrt(bn.running_var.to(a.dtype) + bn.eps)
                    gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(c)
                    sc = gamma * c
                    shift = -bn.running_mean.to(a.dtype) if b is None else b - bn.running_mean.to(a.dtype)
                    Ws = W * _vec(sc, W.dim() + 1)
                    beff = sc * shift
                    if bn.bias is not None:
                        beff = beff + bn.bias.detach()
                Wt = W
                cr = _conv_crop(L, a.shape[2:], W.shape[2:]) if L.layer == "conv" else None
                if cr is not None:
                    st.geo[i], st.crop[i] = cr
                    Wt, Ws = W[cr[1]].contiguous(), Ws[cr[1]]
                Ws = _cl(Ws.contiguous(), self.cl)
                st.consts[i] = (Wt, Ws, sc, c, shift)
                st.acts[i] = _cl(a, self.cl and L.layer == "conv")
                # the model's own operations (the BatchNorm unfolded, the model's layout, the
                # convolution itself, not the GEMM forms of _fwd that the tangent passes use): the
                # ReLU masks and pooling indices are then the model's, also for units within
                # round-off of a kink (in float32 one flipped unit of resnet18 moved the products by
                # 2e-3 relative); the folded weights serve the tangent passes
                h = (F.conv2d(a, W, b, L.stride, L.padding, L.dilation) if L.layer == "conv"
                     else F.linear(a, W, b))
                if L.bn is not None:
                    h = F.batch_norm(h, L.bn.running_mean, L.bn.running_var,
                                     None if L.bn.weight is None else L.bn.weight.detach(),
                                     None if L.bn.bias is None else L.bn.bias.detach(), False, 0.0, L.bn.eps)
                macs[i] = int(Wt.numel() * (h[0].numel() // W.shape[0]))
            elif k == "bn":
                bn = L.bn
                c = _vec(torch.rsqrt(bn.running_var.to(a.dtype) + bn.eps), a.dim())
                gamma = (_vec(bn.weight.detach(), a.dim()) if bn.weight is not None else torch.ones_like(c))
                xhat = (a - _vec(bn.running_mean.to(a.dtype), a.dim())) * c
                st.acts[i] = (_cl(xhat, self.cl), c, gamma)
                h = F.batch_norm(a, bn.running_mean, bn.running_var,
                                 None if bn.weight is None else bn.weight.detach(),
                                 None if bn.bias is None else bn.bias.detach(), False, 0.0, bn.eps)
            elif k == "relu":
                mask = a > 0
                st.acts[i] = _cl(mask, self.cl)
                h = torch.relu(a)
            elif k == "add":
                b2 = vals[L.args[1]]
                if a.shape != b2.shape:
                    raise NotStructured(f"node {L.name!r} adds tensors of shapes {tuple(a.shape)} and "
                                        f"{tuple(b2.shape)} (broadcasting is not covered)")
                h = a + b2
            elif k == "shift":
                h = self._fx_value(L.fx, vals, model)
                if not isinstance(h, Tensor) or h.shape != a.shape:
                    raise NotStructured(f"node {L.name!r} adds a constant that changes the shape")
            elif k == "scale":
                h = a * L.factor
            elif k == "identity":
                h = a
            elif k == "reshape":
                h = self._fx_value(L.fx, vals, model, contiguous=True)
                if h.dim() == 0 or h.shape[0] != N:
                    raise NotStructured(f"node {L.name!r} reshapes across samples (to {tuple(h.shape)})")
            elif k == "maxpool":
                p = L.pool
                h, idx = F.max_pool2d(a, p["kernel_size"], p["stride"], p["padding"], p["dilation"],
                                      ceil_mode=p["ceil_mode"], return_indices=True)
                st.acts[i] = idx.flatten(2)
            elif k == "avgpool":
                p = L.pool
                h = F.avg_pool2d(a, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                                 p["count_include_pad"], p["divisor_override"])
            elif k == "adaptive_avgpool":
                h = F.adaptive_avg_pool2d(a, L.pool["output_size"])
            else:   # pragma: no cover -- the graph holds only the kinds above
                raise AssertionError(k)
            vals[i] = h
            if k != "const":
                if not isinstance(h, Tensor) or h.dim() == 0 or h.shape[0] != N:
                    raise NotStructured(f"node {L.name!r} does not keep the batch axis")
                st.shapes[i] = tuple(h.shape[1:])
        self.macs, self.shapes = macs, dict(st.shapes)
        return vals[self.graph.out]

    def _backward(self, g: Tensor, st: _GPrimal) -> None:
        """Primal backward: dL/d(output) of every affine / BatchNorm node into ``st.grads``."""
        G: dict[int, Tensor] = {self.graph.out: g}
        for i in range(len(self.nodes) - 1, -1, -1):
            g = G.pop(i, None)
            L = self.nodes[i]
            if g is None or not L.args:
                continue
            k = L.kind
            a = L.args[0]
            N = g.shape[0]
            if k == "affine":
                st.grads[i] = _cl(g, self.cl)
                if self.upstream[a]:
                    _acc(G, a, _bwd_in(st.geo.get(i, L), g, st.consts[i][1], (N, *st.shapes[a]), self.cl))
            elif k == "bn":
                st.grads[i] = _cl(g, self.cl)
                _, c, gamma = st.acts[i]
                _acc(G, a, g * (gamma * c))
            elif k == "add":
                _acc(G, a, g)
                _acc(G, L.args[1], g)
            else:
                _acc(G, a, self._linear_back(i, L, g, st, None))

    def _linear_back(self, i: int, L: GNode, g: Tensor, st: _GPrimal, k: Optional[int],
                     inplace: bool = False) -> Tensor:
        """The adjoint of the parameter-free linear / piecewise-linear nodes, applied to a
        gradient [N, ...] (``k`` None) or to tangents [N, k, ...]."""
        kind = L.kind
        a = L.args[0]
        N = g.shape[0]
        lead = (N,) if k is None else (N, k)
        if kind == "relu":
            m = st.acts[i]
            m = m if k is None else m.unsqueeze(1)
            return g.mul_(m) if inplace else g * m
        if kind == "scale":
            return g if L.factor == 1.0 else g * L.factor      # a residual scale of 1: no pass
        if kind in ("identity", "shift"):
            return g
        if kind == "reshape":
            return g.reshape(*lead, *st.shapes[a])
        C, H, W = st.shapes[a]
        if kind == "maxpool":
            idx = st.acts[i]                                      # [N, C, H'W']
            if k is not None:
                idx = idx.unsqueeze(1).expand(N, k, *idx.shape[1:])
            out = g.new_zeros((*lead, C, H * W))
            return out.scatter_add_(-1, idx, g.flatten(-2)).view(*lead, C, H, W)
        flat = g.reshape(-1, *g.shape[-3:])
        like = g.new_empty(1).expand(flat.shape[0], C, H, W)
        if kind == "avgpool":
            p = L.pool
            r = torch.ops.aten.avg_pool2d_backward(flat, like, _two(p["kernel_size"]), _two(p["stride"]),
                                                   _two(p["padding"]), p["ceil_mode"], p["count_include_pad"],
                                                   p["divisor_override"])
        else:
            r = torch.ops.aten._adaptive_avg_pool2d_backward(flat.contiguous(), like)
        return r.view(*lead, C, H, W)

    # -- products -------------------------------------------------------------------------------
    def apply(self, st: _GPrimal, idx: Sequence[int], vs: Sequence[Tensor], k: int) -> list[Tensor]:
        """Products restricted to params ``idx`` (``vs[j]`` [k, *shape of param idx[j]])."""
        V: dict[int, Tensor] = dict(zip(idx, vs))
        out: dict[int, Tensor] = {}
        want = set(idx)
        with torch.no_grad():
            for part in st.chunks(max(1, self._chunk(st, k))):
                if part.jac:
                    self._jac_products(V, part, want, out, k)
                    continue
                tang = self._rfwd(V, part, k)
                Ro = tang.pop(self.graph.out, None)
                if Ro is None:
                    continue
                Rg = output_tangent_gradient(Ro, part.p, part.n, self.loss)
                self._rbwd(Rg, V, part, tang, want, out, k)
        res = []
        for i in idx:
            r = out.get(i)
            p = self.params[i]
            res.append(torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if r is None else r)
        return res

    def _chunk(self, st: _GPrimal, k: int) -> int:
        if self.chunk is not None:
            return self.chunk
        per = sum(_numel(st.shapes[a]) for a in self.keep if a in st.shapes)
        per = max(per, max((_numel(s) for s in st.shapes.values()), default=1))
        return max(1, TANGENT_BUDGET // max(1, k * per))

    @staticmethod
    def _tangent_weights(L: GNode, V: dict[int, Tensor], consts: tuple, k: int,
                         crop: Optional[tuple[slice, ...]] = None,
                         cl: bool = False) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``M_W`` [k, O, C, ...] and ``M_b`` [k, O] (module doc); None where absent. ``crop``:
        the live kernel taps of a cropped conv (the weights in ``consts`` are cropped already);
        ``cl``: a conv's ``M_W`` made in the layout whose ``[k O, C, kh, kw]`` view is
        channels_last (no copy before the convolution)."""
        W, Ws, sc, c, shift = consts
        MW = Mb = None
        Vg = V.get(L.ig) if L.ig is not None else None
        if L.iw is not None and L.iw in V:
            Vw = V[L.iw] if crop is None else V[L.iw][(slice(None), *crop)]
            if sc is None and Vg is None:
                MW = Vw
            else:
                # one pass over k x the weights (resnet18: 470 MB) into the layout the
                # convolutions read: [k, O, C, kh, kw] whose [k O, C, kh, kw] view is channels_last
                MW = _new_weights(Vw.shape, Vw, cl)
                if sc is None:
                    _by_rows(lambda o: MW[:, o].copy_(Vw[:, o]), Vw)
                else:
                    s_ = _vec(sc, W.dim() + 1)
                    _by_rows(lambda o: torch.mul(Vw[:, o], s_[o], out=MW[:, o]), Vw)
        if Vg is not None:
            if MW is None:
                MW = _new_weights((k, *W.shape), W, cl)
                torch.mul(_vec(Vg * c, W.dim() + 1), W, out=MW)
            else:
                MW.addcmul_(_vec(Vg * c, W.dim() + 1), W)
            Mb = Vg * c * shift
        if L.ib is not None and L.ib in V:
            Mb = _add(Mb, V[L.ib] if sc is None else V[L.ib] * sc)
        if L.ibeta is not None and L.ibeta in V:
            Mb = _add(Mb, V[L.ibeta])
        return MW, Mb

    def _rfwd(self, V: dict[int, Tensor], st: _GPrimal, k: int) -> dict[int, Optional[Tensor]]:
        """Tangent forward: R h [N, k, ...] of the kept nodes (and the logits); ``("M", i)`` the
        tangent weights of affine node i."""
        T: dict[Any, Optional[Tensor]] = {}
        last, keep, out_i = self.last_use, self.keep, self.graph.out
        for i, L in enumerate(self.nodes):
            kind = L.kind
            if not self.upstream[i] or kind == "const":
                continue
            a = L.args[0] if L.args else None
            Rx = T.get(a) if a is not None else None
            r: Optional[Tensor] = None
            if kind == "affine":
                x = st.acts[i]
                N = x.shape[0]
                consts = st.consts[i]
                Ws = consts[1]
                O = Ws.shape[0]
                Lg = st.geo.get(i, L)
                MW, Mb = self._tangent_weights(L, V, consts, k, st.crop.get(i), self.cl and L.layer == "conv")
                T[("M", i)] = MW
                if Rx is not None and MW is not None and _gemm_layer(L, x):
                    # a Linear layer: x M^T + M_b first, then R x W^T accumulated into it by the
                    # GEMM itself (beta = 1), instead of a second output and a pass adding them
                    t = F.linear(x, MW.reshape(k * O, -1), None if Mb is None else Mb.reshape(-1))
                    t.view(N * k, O).addmm_(Rx.reshape(N * k, -1), Ws.t())
                    r = t.view(N, k, O)
                else:
                    if Rx is not None:
                        r = _tconv(Lg, Rx, Ws, self.cl)
                    if MW is not None:
                        Wst = _cl(MW.reshape(k * O, *MW.shape[2:]), self.cl)
                        bst = None if Mb is None else Mb.reshape(-1)
                        # r += conv(x, M) + M_b in one call where r is in the stacked layout
                        if not (r is not None and _stacked_path(Lg, x.shape[2:], Ws.shape[2:], x.device)
                                and _conv_add(x, Wst, bst, _stacked_view(r), Lg.stride, Lg.padding, Lg.dilation)):
                            t = _fwd(Lg, x, Wst, bst).unflatten(1, (k, O))
                            r = t if r is None else r.add_(t)
                    elif Mb is not None:
                        mb = _vec(Mb, len(st.shapes[i]) + 1).unsqueeze(0)     # [1, k, O, 1, ...]
                        r = mb.expand(N, k, *st.shapes[i]).clone() if r is None else r.add_(mb)
            elif kind == "bn":
                xhat, c, gamma = st.acts[i]
                r = None if Rx is None else Rx * (gamma * c).unsqueeze(0)
                if L.ig is not None and L.ig in V:
                    t = xhat.unsqueeze(1) * _vec(V[L.ig], xhat.dim()).unsqueeze(0)
                    r = t if r is None else r.add_(t)
                if L.ib is not None and L.ib in V:
                    t = _vec(V[L.ib], xhat.dim()).unsqueeze(0)
                    r = t.expand(xhat.shape[0], k, *xhat.shape[1:]).clone() if r is None else r.add_(t)
            elif kind == "add":
                Rb = T.get(L.args[1])
                if Rx is not None and Rb is not None and not _same_memory(Rx, Rb):
                    if self._owned(T, a, i):
                        r = Rx.add_(Rb)
                    elif self._owned(T, L.args[1], i):
                        r = Rb.add_(Rx)
                    else:
                        r = Rx + Rb
                else:
                    r = _add(Rx, Rb)
            elif Rx is not None:
                r = self._linear_fwd(i, L, Rx, st, k, inplace=self._owned(T, a, i))
            T[i] = r
            # free tangents no later node (nor the backward) reads
            for j in L.args:
                if last.get(j) == i and j not in keep and j != out_i:
                    T.pop(j, None)
        return T

    def _owned(self, T: dict, a: int, i: int) -> bool:
        """Node a's tangent is read by no node after i, nor by the backward, nor through another
        entry of T: node i may overwrite it."""
        t = T.get(a)
        return (t is not None and self.last_use.get(a) == i and a not in self.keep and a != self.graph.out
                and _sole(t, T, a))

    def _linear_fwd(self, i: int, L: GNode, Rx: Tensor, st: _GPrimal, k: int, inplace: bool = False) -> Tensor:
        kind = L.kind
        N = Rx.shape[0]
        if kind == "relu":
            m = st.acts[i].unsqueeze(1)
            return Rx.mul_(m) if inplace else Rx * m
        if kind == "scale":
            return Rx if L.factor == 1.0 else Rx * L.factor
        if kind in ("identity", "shift"):
            return Rx
        if kind == "reshape":
            return Rx.reshape(N, k, *st.shapes[i])
        C, H, W = Rx.shape[2:]
        if kind == "maxpool":
            idx = st.acts[i]
            idx = idx.unsqueeze(1).expand(N, k, *idx.shape[1:])
            return Rx.reshape(N, k, C, H * W).gather(-1, idx).view(N, k, *st.shapes[i])
        flat = Rx.reshape(N * k, C, H, W)
        if kind == "avgpool":
            p = L.pool
            r = F.avg_pool2d(flat, p["kernel_size"], p["stride"], p["padding"], p["ceil_mode"],
                             p["count_include_pad"], p["divisor_override"])
        else:
            r = F.adaptive_avg_pool2d(flat, L.pool["output_size"])
        return r.view(N, k, *st.shapes[i])

    def _rbwd(self, Rg: Tensor, V: dict[int, Tensor], st: _GPrimal, T: dict, want: set[int],
              out: dict[int, Tensor], k: int, record: Optional[dict[int, Tensor]] = None) -> None:
        """Tangent backward from ``Rg`` at the logits; ``record``: node i's tangent (the gradient
        of its output) is copied into ``record[i]`` as it is reached (a copy: the buffers of this
        pass are overwritten in place later)."""
        hess = self.curvature == "hessian"
        RG: dict[int, Optional[Tensor]] = {self.graph.out: Rg}
        for i in range(len(self.nodes) - 1, -1, -1):
            L = self.nodes[i]
            if not self.upstream[i] or L.kind in ("const", "input"):
                continue
            rg = RG.pop(i, None)
            if record is not None and rg is not None and i in record:
                record[i].copy_(rg)
            a = L.args[0]
            kind = L.kind
            g = st.grads.get(i) if hess else None
            if kind == "affine":
                x = st.acts[i]
                Ws = st.consts[i][1]
                Lg = st.geo.get(i, L)
                # the layout this node's tangent convolutions read (_tconv): its parameter terms
                # then stack Rg without a copy
                stacked = _stacked_path(Lg, x.shape[2:], Ws.shape[2:], x.device)
                rg = (_bs if stacked else _bl)(rg, self.cl)
                self._rbwd_params(i, L, rg, T.get(a) if hess else None, g, V, st, T, want, out, k)
                if self.upstream[a]:
                    N = x.shape[0]
                    r = None if rg is None else _tconv_t(Lg, rg, Ws, x.shape[1:], self.cl)
                    MW = T.get(("M", i))
                    if g is not None and MW is not None:
                        C = MW.shape[2]
                        Mst = _stack_in(MW, self.cl)
                        if r is not None and _gemm_layer(L, x) and r.is_contiguous():
                            # a Linear layer: r += g M, accumulated by the GEMM (beta = 1)
                            r.view(N, k * C).addmm_(g, Mst)
                        # r += conv^T(g, M) in one call where r is in the stacked layout
                        elif not (r is not None and stacked and _conv_t_add(Lg, g, Mst, _stacked_view(r))):
                            t = _bwd_in(Lg, g, Mst, (N, k * C, *x.shape[2:]), self.cl).unflatten(1, (k, C))
                            r = t if r is None else r.add_(t)
                    _acc(RG, a, r, inplace=True)
            elif kind == "bn":
                xhat, c, gamma = st.acts[i]
                Rx = T.get(a) if hess else None
                nd = xhat.dim()
                if L.ig is not None and L.ig in want:
                    r = None if rg is None else _sum_but(rg * xhat.unsqueeze(1), 2)
                    if Rx is not None and g is not None:
                        t = _sum_but(Rx * (g * c).unsqueeze(1), 2)
                        r = t if r is None else r.add_(t)
                    if r is not None:
                        _acc(out, L.ig, r)
                if L.ib is not None and L.ib in want and rg is not None:
                    _acc(out, L.ib, _sum_but(rg, 2))
                if self.upstream[a]:
                    r = None if rg is None else rg * (gamma * c).unsqueeze(0)
                    if g is not None and L.ig is not None and L.ig in V:
                        t = (g * c).unsqueeze(1) * _vec(V[L.ig], nd).unsqueeze(0)
                        r = t if r is None else r.add_(t)
                    _acc(RG, a, r, inplace=True)
            elif kind == "add":
                for j in L.args:
                    if self.upstream[j]:
                        _acc(RG, j, rg, inplace=True)
            elif rg is not None and self.upstream[a]:
                _acc(RG, a, self._linear_back(i, L, rg, st, k, inplace=_sole(rg, RG, None)), inplace=True)

    def _direct(self, i: int, V: dict[int, Tensor], st: _GPrimal, k: int, buf: Tensor) -> Optional[Tensor]:
        """``D_i`` [N, k, *shape of node i]: the change of node i's output by its own parameters
        alone (``conv(x, M) + M_b``; BatchNorm ``xhat V_gamma + V_beta``); None without any. A
        Linear layer's is written into ``buf`` (flat, at least N k O elements)."""
        L = self.nodes[i]
        if L.kind == "bn":
            xhat = st.acts[i][0]
            r = None
            if L.ig is not None and L.ig in V:
                r = xhat.unsqueeze(1) * _vec(V[L.ig], xhat.dim()).unsqueeze(0)
            if L.ib is not None and L.ib in V:
                t = _vec(V[L.ib], xhat.dim()).unsqueeze(0)
                r = t.expand(xhat.shape[0], k, *xhat.shape[1:]) if r is None else r.add_(t)
            return r
        x = st.acts[i]
        consts = st.consts[i]
        O = consts[1].shape[0]
        MW, Mb = self._tangent_weights(L, V, consts, k, st.crop.get(i), self.cl and L.layer == "conv")
        if MW is not None and _gemm_layer(L, x):
            # into the reused buffer (a fresh output each layer costs its first touch), the
            # bias added in place (F.linear copies it into the output before the GEMM anyway)
            D = buf[:x.shape[0] * k * O].view(x.shape[0], k * O)
            torch.mm(x, MW.reshape(k * O, -1).t(), out=D)
            if Mb is not None:
                D.add_(Mb.reshape(1, -1))
            return D.view(x.shape[0], k, O)
        if MW is not None:
            Wst = _cl(MW.reshape(k * O, *MW.shape[2:]), self.cl)
            return _fwd(st.geo.get(i, L), x, Wst, None if Mb is None else Mb.reshape(-1)).unflatten(1, (k, O))
        if Mb is not None:
            return _vec(Mb, len(st.shapes[i]) + 1).unsqueeze(0).expand(x.shape[0], k, *st.shapes[i])
        return None

    def _jac_products(self, V: dict[int, Tensor], st: _GPrimal, want: set[int], out: dict[int, Tensor],
                      k: int) -> None:
        """GGN products of one sample block through the logits' Jacobians (class doc):
        ``Ro = sum_i D_i A_i^T``, ``Rg`` = the output Hessian times Ro, then each node's
        parameter terms from its output gradient ``Rg A_i``."""
        Ro: Optional[Tensor] = None
        n = next(iter(st.jac.values())).shape[0]
        # one buffer for every node's D (then its rg): each is read before the next is written
        buf = st.jac[self.jnodes[0]].new_empty(n * k * max(_numel(st.shapes[i]) for i in self.jnodes))
        for i in self.jnodes:
            D = self._direct(i, V, st, k, buf)
            if D is None:
                continue
            if not D.is_contiguous():
                D = buf[:D.numel()].view(D.shape).copy_(D)
            D = D.view(n, k, -1)
            At = st.jac[i]
            Ro = torch.bmm(D, At) if Ro is None else Ro.baddbmm_(D, At)
        if Ro is None:
            return
        Rg = output_tangent_gradient(Ro, st.p, st.n, self.loss)
        for i in self.jnodes:
            L = self.nodes[i]
            if not any(j is not None and j in want for j in (L.iw, L.ib, L.ig, L.ibeta)):
                continue
            A = st.jac[i].transpose(1, 2)
            rg = torch.bmm(Rg, A, out=buf[:n * k * A.shape[2]].view(n, k, A.shape[2])).view(n, k, *st.shapes[i])
            if L.kind == "bn":
                if L.ig is not None and L.ig in want:
                    _acc(out, L.ig, _sum_but(rg * st.acts[i][0].unsqueeze(1), 2))
                if L.ib is not None and L.ib in want:
                    _acc(out, L.ib, _sum_but(rg, 2))
                continue
            x = st.acts[i]
            Lg = st.geo.get(i, L)
            stacked = _stacked_path(Lg, x.shape[2:], st.consts[i][1].shape[2:], x.device)
            self._rbwd_params(i, L, (_bs if stacked else _bl)(rg, self.cl), None, None, V, st, {}, want, out, k)

    def _rbwd_params(self, i: int, L: GNode, Rg: Optional[Tensor], Rx: Optional[Tensor], g: Optional[Tensor],
                     V: dict[int, Tensor], st: _GPrimal, T: dict, want: set[int], out: dict[int, Tensor],
                     k: int) -> None:
        """R of the parameter gradients of affine node i (module doc): two stacked weight
        gradients (RT, GR) and small reductions."""
        wanted = [j for j in (L.iw, L.ib, L.ig, L.ibeta) if j is not None and j in want]
        if not wanted:
            return
        W, Ws, sc, c, shift = st.consts[i]
        crop = st.crop.get(i)
        L = st.geo.get(i, L)
        x = st.acts[i]
        O, C = W.shape[0], W.shape[1]
        ksz = tuple(W.shape[2:])
        nd = W.dim()
        RT = RTb = GR = None
        if Rg is not None:
            RT, RTb = _bwd_w(L, _stack(Rg, k, self.cl), x, (k * O, C, *ksz))
            RT, RTb = RT.view(k, O, C, *ksz), RTb.view(k, O)
        if g is not None and Rx is not None and (L.iw in want or L.ig in want):
            GR = _bwd_w(L, g, _stack(Rx, k, self.cl), (O, k * C, *ksz))[0]
            GR = GR.view(O, k, C, *ksz).transpose(0, 1)
        Vg = V.get(L.ig) if L.ig is not None else None
        G = Gb = None
        if g is not None and sc is not None and (Vg is not None or L.ig in want):
            if i not in st.gx:
                st.gx[i] = _bwd_w(L, g, x, tuple(W.shape))
            G, Gb = st.gx[i]
        # S = RT + GR, summed in place into RT (a fresh kernel output): every pass over k x the
        # weights counts on wide nets (resnet18: 470 MB each)
        S = RT
        if GR is not None:
            S = GR.contiguous() if S is None else S.add_(GR)
        if L.ig is not None and L.ig in want:
            # <RT, W> + <GR, W> before S is scaled below
            r = None if S is None else _dots(S, W)
            if RTb is not None:
                r = _add(r, RTb * shift)
            if G is not None:
                Vw = V.get(L.iw) if L.iw is not None else None
                Vb = V.get(L.ib) if L.ib is not None else None
                if Vw is not None and crop is not None:
                    Vw = Vw[(slice(None), *crop)]
                if Vw is not None:
                    r = _add(r, _dots(Vw, G))
                if Vb is not None:
                    r = _add(r, Vb * Gb)
            if r is not None:
                _acc(out, L.ig, r * c)
        if L.iw in want:
            r = S
            if r is not None and sc is not None:
                r.mul_(_vec(sc, nd + 1))
            if Vg is not None and G is not None:
                if r is None:
                    r = _vec(Vg * c, nd + 1) * G
                else:
                    r.addcmul_(_vec(Vg * c, nd + 1), G)
            if r is not None:
                _acc(out, L.iw, r if crop is None else _uncrop(r, crop, self.params[L.iw].shape))
        if L.ib is not None and L.ib in want:
            r = None if RTb is None else (RTb * sc if sc is not None else RTb)
            if Vg is not None and Gb is not None:
                r = _add(r, Vg * c * Gb)
            _acc(out, L.ib, r)
        if L.ibeta is not None and L.ibeta in want and RTb is not None:
            _acc(out, L.ibeta, RTb)

    # -- cost -----------------------------------------------------------------------------------
    def flops(self, n: int, k: int) -> int:
        """Convolution / GEMM floating-point operations (2 per multiply-add) of one product of k
        vectors over n samples, every parameter chosen as the operator's, by the method of the
        last primal pass (:meth:`macs_per`; RuntimeError before the first primal pass)."""
        if self.macs is None:
            raise RuntimeError("GraphHVP.flops: no primal pass has run yet (the spatial sizes are not known)")
        return 2 * self.macs_per(self.jac_on) * n * k

    def macs_per(self, jacobian: bool) -> int:
        """Multiply-adds of the convolutions / GEMMs (and, through the Jacobians, of their two
        contractions) per sample and vector. Per affine layer: the tangent forward
        ``conv(Rx, W_s)`` (when its input has a tangent) and ``conv(x, M)``; the backward
        ``corr(Rg, x)``, ``conv^T(Rg, W_s)`` (input tangent needed) and, for the Hessian,
        ``corr(g, Rx)`` and ``conv^T(g, M)``. Through the logits' Jacobians (GGN): ``conv(x, M)``
        and ``corr(Rg, x)`` of each layer and ``2 classes F_i`` for each node with parameters."""
        assert self.macs is not None
        total = 0
        for i, m in self.macs.items():
            L = self.nodes[i]
            a_up = self.upstream[L.args[0]]
            has_m = L.iw is not None or L.ig is not None                  # conv(x, M) / conv^T(g, M)
            has_v = has_m or L.ib is not None or L.ibeta is not None
            if jacobian:
                total += m * (int(has_m) + int(has_v))
                continue
            calls = int(a_up) + int(has_m)                               # forward
            calls += int(has_v) + int(a_up)                              # corr(Rg, x), conv^T(Rg, W_s)
            if self.curvature == "hessian":
                calls += 2 * int(a_up and has_m)                         # corr(g, Rx), conv^T(g, M)
            total += m * calls
        if jacobian:
            # the shapes of the last primal pass (every node's output is in it)
            total += sum(2 * self.n_out * _numel(self.shapes[i]) for i in self.jnodes)
        return total


def _two(v: Any) -> list[int]:
    if v is None:
        return []
    return [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]


def _numel(shape: Sequence[int]) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def graph_primal(engine: GraphHVP, model: nn.Module, batchnorm: str, x: Tensor, y: Any, *,
                 check_forward: bool, tol: float) -> _GPrimal:
    """The primal pass of ``engine`` on one batch after checking the labels (class indices [N]
    for cross-entropy, float targets of the logits' shape and x's dtype for MSE); with
    ``check_forward`` its logits are compared with ``model(x)`` (relative difference <= ``tol``).

    Raises:
        NotStructured: the labels do not fit, a node's shapes are not covered, or the traced
            graph does not reproduce model(x).
    """
    if engine.loss == "ce" and not is_class_labels(y):
        raise NotStructured("the labels are not a 1-D tensor of class indices")
    if engine.loss == "mse" and not (isinstance(y, Tensor) and y.dtype == x.dtype):
        raise NotStructured("the targets are not a float tensor of the inputs' dtype")
    st = engine.primal(model, x, y) if engine.loss == "ce" else _mse_primal(engine, model, x, y)
    if check_forward:
        check_primal_logits(model, batchnorm, x, st.logits, tol, "the traced graph does not reproduce")
    return st


def _mse_primal(engine: GraphHVP, model: nn.Module, x: Tensor, y: Tensor) -> _GPrimal:
    try:
        st = engine.primal(model, x, y)
    except RuntimeError as exc:
        raise NotStructured(f"the targets do not fit the outputs ({exc})") from exc
    if tuple(y.shape) != tuple(st.logits.shape):
        raise NotStructured(f"the targets are not a float tensor {list(st.logits.shape)} (the outputs' shape)")
    return st
