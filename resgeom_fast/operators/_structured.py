"""Exact Hessian-vector products of fully-connected residual networks without autograd.

Pearlmutter's R-operator written out layer by layer: one primal forward and backward per batch
(cached), then for k vectors V at once a tangent forward pass (R h) and a tangent backward pass
(R g), every product a GEMM over the k stacked vectors. It computes the same numbers as the
autograd methods of :mod:`resgeom_fast.operators.hessian` (exact Hessian of the mean
cross-entropy, ReLU's second derivative taken as 0, as autograd does) without autograd's
per-op bookkeeping, vmap's batching rules or BatchNorm's double backward, which cost several times
the GEMMs on fully-connected nets on a CPU.

Recognised models (anything else is refused with the reason, and the autograd methods are used):
``stem`` (an ``nn.Sequential`` of Flatten / Linear / BatchNorm1d / ReLU / Identity), ``blocks``
(residual blocks ``post(skip(h) + scale * branch(h))`` with a fixed float ``scale``, ``branch`` an
``nn.Sequential`` of Linear / BatchNorm1d / ReLU / Identity, ``skip`` identity, zero, a fixed
orthogonal matrix or a scaled identity, ``post`` Identity or ReLU), ``pool`` Identity, ``head``
Linear, no hyper-residual connections -- this package's FCResNet and the like; BatchNorm with
running statistics (``batchnorm="eval"``) only; the loss ``nn.CrossEntropyLoss()`` (mean, no class
weights, no label smoothing) on integer labels. The parse is duck-typed (this layer does not import
the models), so the caller checks the recognised network's logits against ``model(x)`` and its
first product against autograd before trusting it (``hessian.py``).

Layer rules (x input, y output, g = dL/dy, R = directional derivative along V):
- Linear ``y = x W^T + b``: ``Ry = Rx W^T + x V_W^T + V_b``; ``R gx = Rg W + g V_W``,
  ``R gW = Rg^T x + g^T Rx``, ``R gb = sum_n Rg``.
- BatchNorm (eval) ``y = xhat * gamma + beta``, ``xhat = (x - mu) c``, ``c = 1/sqrt(var + eps)``:
  ``Ry = Rx * gamma c + xhat V_gamma + V_beta``; ``R gx = Rg * gamma c + g * c V_gamma``,
  ``R g_gamma = sum_n (Rg xhat + g Rx c)``, ``R g_beta = sum_n Rg``.
- ReLU: ``Ry = mask Rx``, ``R gx = mask Rg``.
- Mean cross-entropy over N samples, p = softmax(logits): ``g = (p - onehot) / N``,
  ``R g = (p * Ro - p <p, Ro>) / N``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["StructuredHVP", "parse_structured"]


class _Linear:
    def __init__(self, mod: nn.Linear, pos: dict[int, int]) -> None:
        self.W, self.b = mod.weight, mod.bias
        self.iw = pos.get(id(mod.weight))
        self.ib = None if mod.bias is None else pos.get(id(mod.bias))


class _Norm:
    def __init__(self, mod: _BatchNorm, pos: dict[int, int]) -> None:
        self.mod = mod
        self.ig = None if mod.weight is None else pos.get(id(mod.weight))
        self.ib = None if mod.bias is None else pos.get(id(mod.bias))


class _ReLU:
    pass


class _Skip:
    """kind: "identity" | "zero" | "matrix" (y = h Q^T) | "scaled" (y = factor h)."""

    def __init__(self, kind: str, Q: Optional[Tensor] = None, factor: float = 1.0) -> None:
        self.kind, self.Q, self.factor = kind, Q, factor


class _Block:
    def __init__(self, branch: list, skip: _Skip, scale: float, post_relu: bool) -> None:
        self.branch, self.skip, self.scale, self.post_relu = branch, skip, scale, post_relu


Layer = Union[_Linear, _Norm, _ReLU, _Block, str]   # "flatten"


def _parse_seq(seq: nn.Module, pos: dict[int, int], where: str,
               stem: bool = False) -> tuple[Optional[list], Optional[str]]:
    mods = list(seq) if isinstance(seq, nn.Sequential) else [seq]
    out: list = []
    for m in mods:
        if isinstance(m, nn.Identity):
            continue
        if isinstance(m, nn.Flatten):
            if not (stem and not out and (m.start_dim, m.end_dim) == (1, -1)):
                return None, f"{where}: only Flatten(1, -1) as the first layer of the stem is supported"
            out.append("flatten")
        elif isinstance(m, nn.Linear):
            out.append(_Linear(m, pos))
        elif isinstance(m, nn.BatchNorm1d):
            if m.running_mean is None or m.running_var is None:
                return None, f"{where}: BatchNorm1d without running statistics"
            out.append(_Norm(m, pos))
        elif type(m) is nn.ReLU:
            out.append(_ReLU())
        else:
            return None, f"{where}: {type(m).__name__} is not supported"
    return out, None


def _parse_skip(skip: nn.Module, where: str) -> tuple[Optional[_Skip], Optional[str]]:
    name = type(skip).__name__
    if isinstance(skip, nn.Identity):
        return _Skip("identity"), None
    if name == "ZeroSkip" and getattr(skip, "out_channels", 0) is None and getattr(skip, "stride", 0) == 1:
        return _Skip("zero"), None
    if name == "OrthogonalSkip" and getattr(skip, "conv", True) is False:
        return _Skip("matrix", Q=skip.weight), None
    if name == "ScaledIdentity" and isinstance(getattr(skip, "factor", None), float):
        return _Skip("scaled", factor=skip.factor), None
    return None, f"{where}: skip {name} is not supported"


def parse_structured(model: nn.Module, params: Sequence[Tensor], loss_fn: Any,
                     batchnorm: str) -> tuple[Optional[list], Optional[str]]:
    """The layer list of a recognised fully-connected residual network, or (None, reason)."""
    if batchnorm != "eval":
        return None, "batchnorm='train' (batch statistics couple the samples)"
    if not (isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean"
            and loss_fn.weight is None and float(loss_fn.label_smoothing) == 0.0):
        return None, "the loss is not nn.CrossEntropyLoss() (mean, no class weights, no label smoothing)"
    for attr in ("stem", "blocks", "pool", "head"):
        if not isinstance(getattr(model, attr, None), nn.Module):
            return None, f"the model has no {attr!r} module (not a stem/blocks/pool/head residual network)"
    if getattr(model, "hyper", False):
        return None, "hyper-residual connections are not supported"
    pos = {id(p): i for i, p in enumerate(params)}
    layers, why = _parse_seq(model.stem, pos, "stem", stem=True)
    if layers is None:
        return None, why
    for i, blk in enumerate(model.blocks):
        where = f"blocks[{i}]"
        if not getattr(blk, "resgeom_block", False) or not all(hasattr(blk, a) for a in ("branch", "skip", "scale", "post")):
            return None, f"{where} is not a residual block with branch/skip/scale/post"
        if not isinstance(blk.scale, float):
            return None, f"{where}: a learnable scale is not supported"
        branch, why = _parse_seq(blk.branch, pos, f"{where}.branch")
        if branch is None:
            return None, why
        skip, why = _parse_skip(blk.skip, where)
        if skip is None:
            return None, why
        if isinstance(blk.post, nn.Identity):
            post_relu = False
        elif type(blk.post) is nn.ReLU:
            post_relu = True
        else:
            return None, f"{where}: post {type(blk.post).__name__} is not supported"
        layers.append(_Block(branch, skip, blk.scale, post_relu))
    if not isinstance(model.pool, nn.Identity):
        return None, f"pool {type(model.pool).__name__} is not supported"
    if not isinstance(model.head, nn.Linear):
        return None, f"head {type(model.head).__name__} is not supported"
    layers.append(_Linear(model.head, pos))
    # every chosen parameter must be one the layers know (and none may be unknown to them)
    known: set[int] = set()
    _collect(layers, known)
    missing = [i for i in range(len(params)) if i not in known]
    if missing:
        return None, f"{len(missing)} chosen parameters are not in a recognised layer"
    return layers, None


def _collect(layers: list, known: set[int]) -> None:
    for L in layers:
        if isinstance(L, _Linear):
            known.update(i for i in (L.iw, L.ib) if i is not None)
        elif isinstance(L, _Norm):
            known.update(i for i in (L.ig, L.ib) if i is not None)
        elif isinstance(L, _Block):
            _collect(L.branch, known)


# -- primal pass: every layer's input (and what its rules need) and its output gradient --------
class _Primal:
    """Per-batch cache: ``acts[id]`` what a layer's rules need from the forward pass, ``grads[id]``
    dL/d(layer output); ``p`` softmax of the logits, ``n`` samples."""

    def __init__(self) -> None:
        self.acts: dict[int, Any] = {}
        self.grads: dict[int, Tensor] = {}
        self.p: Optional[Tensor] = None
        self.logits: Optional[Tensor] = None
        self.n = 0


def _bn_consts(L: _Norm, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    m = L.mod
    c = torch.rsqrt(m.running_var.to(dtype) + m.eps)
    gamma = m.weight.detach() if m.weight is not None else torch.ones_like(c)
    return m.running_mean.to(dtype), c, gamma


def _forward(layers: list, h: Tensor, st: _Primal) -> Tensor:
    for L in layers:
        if isinstance(L, str):   # flatten
            h = h.flatten(1)
        elif isinstance(L, _Linear):
            st.acts[id(L)] = h
            h = torch.nn.functional.linear(h, L.W.detach(), None if L.b is None else L.b.detach())
        elif isinstance(L, _Norm):
            mu, c, gamma = _bn_consts(L, h.dtype)
            xhat = (h - mu) * c
            st.acts[id(L)] = (xhat, c, gamma)
            h = xhat * gamma
            if L.mod.bias is not None:
                h = h + L.mod.bias.detach()
        elif isinstance(L, _ReLU):
            mask = h > 0
            st.acts[id(L)] = mask
            h = h * mask
        else:
            s = _skip_fwd(L.skip, h)
            f = _forward(L.branch, h, st)
            out = f * L.scale if s is None else s + L.scale * f
            if L.post_relu:
                mask = out > 0
                st.acts[id(L)] = mask
                out = out * mask
            h = out
    return h


def _skip_fwd(skip: _Skip, h: Optional[Tensor]) -> Optional[Tensor]:
    if h is None or skip.kind == "zero":
        return None
    if skip.kind == "identity":
        return h
    if skip.kind == "scaled":
        return h * skip.factor
    return torch.matmul(h, skip.Q.t().to(h.dtype))


def _skip_bwd(skip: _Skip, g: Optional[Tensor]) -> Optional[Tensor]:
    if g is None or skip.kind == "zero":
        return None
    if skip.kind == "identity":
        return g
    if skip.kind == "scaled":
        return g * skip.factor
    return torch.matmul(g, skip.Q.to(g.dtype))


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _backward(layers: list, g: Tensor, st: _Primal) -> Optional[Tensor]:
    """Primal backward: stores dL/d(output) of every layer; returns dL/d(input)."""
    for L in reversed(layers):
        if isinstance(L, str):
            return None      # the flatten of the stem's input: nothing before it needs gradients
        st.grads[id(L)] = g
        if isinstance(L, _Linear):
            g = g @ L.W.detach()
        elif isinstance(L, _Norm):
            _, c, gamma = st.acts[id(L)]
            g = g * (gamma * c)
        elif isinstance(L, _ReLU):
            g = g * st.acts[id(L)]
        else:
            if L.post_relu:
                g = g * st.acts[id(L)]
            gb = _backward(L.branch, g * L.scale, st)
            g = _add(_skip_bwd(L.skip, g), gb)
    return g


class StructuredHVP:
    """Exact Hessian products of a recognised network (module doc); ``params`` in engine order."""

    def __init__(self, layers: list, params: Sequence[Tensor]) -> None:
        self.layers, self.params = layers, list(params)

    def primal(self, x: Tensor, y: Tensor) -> _Primal:
        st = _Primal()
        with torch.no_grad():
            logits = _forward(self.layers, x, st)
            n = logits.shape[0]
            p = torch.softmax(logits, dim=1)
            g = p.clone()
            g[torch.arange(n, device=g.device), y] -= 1
            g /= n
            _backward(self.layers, g, st)
        st.p, st.logits, st.n = p, logits, n
        return st

    def apply(self, st: _Primal, idx: Sequence[int], vs: Sequence[Tensor], k: int) -> list[Tensor]:
        """Products restricted to params ``idx`` (``vs[j]`` [k, *shape of param idx[j]]).

        Tangents are laid out sample-major, [N, k, D], so that every product of a layer is one 2-D
        GEMM over all k vectors (``x V^T`` is ``x @ [V_1; ...; V_k]^T``, an [N, k*out] result)."""
        V: dict[int, Tensor] = dict(zip(idx, vs))
        out: dict[int, Tensor] = {}
        want = set(idx)
        with torch.no_grad():
            tang: dict[int, Optional[Tensor]] = {}
            Ro = self._rfwd(self.layers, None, V, st, tang, k)
            if Ro is None:
                Rg = None
            else:  # R of (p - onehot)/n: (p * Ro - p <p, Ro>) / n, per sample and vector
                p = st.p.unsqueeze(1)                                   # [N, 1, C]
                pRo = p * Ro
                Rg = pRo.sub_(p * pRo.sum(-1, keepdim=True)).div_(st.n)
            self._rbwd(self.layers, Rg, V, st, tang, want, out, k)
        res = []
        for i in idx:
            r = out.get(i)
            res.append(torch.zeros((k, *self.params[i].shape), dtype=self.params[i].dtype,
                                   device=self.params[i].device) if r is None else r)
        return res

    # -- tangent forward: R h [N, k, D]; ``tang[id(L)]`` the tangent of layer L's input ----------
    def _rfwd(self, layers: list, Rh: Optional[Tensor], V: dict[int, Tensor], st: _Primal,
              tang: dict, k: int) -> Optional[Tensor]:
        for L in layers:
            if isinstance(L, str):
                continue      # the input does not depend on the parameters
            tang[id(L)] = Rh
            if isinstance(L, _Linear):
                x = st.acts[id(L)]                                      # [N, in]
                W = L.W.detach()
                n, out_f = x.shape[0], W.shape[0]
                r = None if Rh is None else torch.matmul(Rh, W.t())     # [N, k, out]
                if L.iw in V:                                           # x V_j^T for every j at once
                    xv = torch.mm(x, V[L.iw].reshape(k * out_f, -1).t()).view(n, k, out_f)
                    r = xv if r is None else r.add_(xv)
                if L.ib is not None and L.ib in V:
                    r = V[L.ib].unsqueeze(0).expand(n, k, out_f).clone() if r is None else r.add_(V[L.ib])
                Rh = r
            elif isinstance(L, _Norm):
                xhat, c, gamma = st.acts[id(L)]
                r = None if Rh is None else Rh * (gamma * c)
                if L.ig is not None and L.ig in V:
                    t = xhat.unsqueeze(1) * V[L.ig]                     # [N, k, D]
                    r = t if r is None else r.add_(t)
                if L.ib is not None and L.ib in V:
                    r = (V[L.ib].unsqueeze(0).expand(xhat.shape[0], k, -1).clone() if r is None
                         else r.add_(V[L.ib]))
                Rh = r
            elif isinstance(L, _ReLU):
                Rh = None if Rh is None else Rh * st.acts[id(L)].unsqueeze(1)
            else:
                s = _skip_fwd(L.skip, Rh)
                f = self._rfwd(L.branch, Rh, V, st, tang, k)
                if f is not None:
                    if f is Rh:     # an empty branch returns its input: never update that in place
                        f = f.clone()
                    f = f.mul_(L.scale) if L.scale != 1.0 else f
                    r = f if s is None else f.add_(s)
                else:
                    r = s
                if L.post_relu and r is not None:
                    r = r * st.acts[id(L)].unsqueeze(1)
                Rh = r
        return Rh

    # -- tangent backward: R g [N, k, D], and R of every wanted parameter gradient --------------
    def _rbwd(self, layers: list, Rg: Optional[Tensor], V: dict[int, Tensor], st: _Primal, tang: dict,
              want: set[int], out: dict[int, Tensor], k: int) -> Optional[Tensor]:
        for L in reversed(layers):
            if isinstance(L, str):
                return None
            g = st.grads[id(L)]                                         # [N, out]
            Rx = tang[id(L)]
            if isinstance(L, _Linear):
                x = st.acts[id(L)]
                W = L.W.detach()
                n, out_f, in_f = x.shape[0], W.shape[0], W.shape[1]
                if L.iw in want:
                    # R gW_j = Rg_j^T x + g^T Rx_j: [k*out, in] and [out, k*in] GEMMs
                    r = None if Rg is None else torch.mm(Rg.reshape(n, k * out_f).t(), x).view(k, out_f, in_f)
                    if Rx is not None:
                        t = torch.mm(g.t(), Rx.reshape(n, k * in_f)).view(out_f, k, in_f).transpose(0, 1)
                        r = t.contiguous() if r is None else r.add_(t)
                    if r is not None:
                        out[L.iw] = _add(out.get(L.iw), r)
                if L.ib is not None and L.ib in want and Rg is not None:
                    out[L.ib] = _add(out.get(L.ib), Rg.sum(0))
                r = None if Rg is None else torch.matmul(Rg, W)         # [N, k, in]
                if L.iw in V:                                           # g V_j for every j at once
                    Vp = V[L.iw].transpose(0, 1).reshape(out_f, k * in_f)
                    gv = torch.mm(g, Vp).view(n, k, in_f)
                    r = gv if r is None else r.add_(gv)
                Rg = r
            elif isinstance(L, _Norm):
                xhat, c, gamma = st.acts[id(L)]
                if L.ig is not None and L.ig in want:
                    r = None if Rg is None else (Rg * xhat.unsqueeze(1)).sum(0)
                    if Rx is not None:
                        t = (Rx * g.unsqueeze(1)).sum(0).mul_(c)
                        r = t if r is None else r.add_(t)
                    if r is not None:
                        out[L.ig] = _add(out.get(L.ig), r)
                if L.ib is not None and L.ib in want and Rg is not None:
                    out[L.ib] = _add(out.get(L.ib), Rg.sum(0))
                r = None if Rg is None else Rg * (gamma * c)
                if L.ig is not None and L.ig in V:
                    t = g.unsqueeze(1) * (c * V[L.ig])
                    r = t if r is None else r.add_(t)
                Rg = r
            elif isinstance(L, _ReLU):
                Rg = None if Rg is None else Rg * st.acts[id(L)].unsqueeze(1)
            else:
                if L.post_relu and Rg is not None:
                    Rg = Rg * st.acts[id(L)].unsqueeze(1)
                s = _skip_bwd(L.skip, Rg)
                rb = self._rbwd(L.branch, None if Rg is None else Rg * L.scale, V, st, tang, want, out, k)
                Rg = _add(s, rb)
        return Rg
