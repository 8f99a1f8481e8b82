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
weights, no label smoothing) or ``torch.nn.functional.cross_entropy`` itself, on integer labels, or
the mean squared error ``nn.MSELoss()`` (mean over every element) or ``F.mse_loss`` itself, on
float targets of the logits' shape [N, d].
The parse recognises the skips by type (:class:`~resgeom_fast.core.blocks.ZeroSkip`,
:class:`~resgeom_fast.models.blocks.OrthogonalSkip`, :class:`~resgeom_fast.models.blocks.ScaledIdentity`,
subclasses included) and the rest of the network by its structure, so the caller checks the
recognised network's logits against ``model(x)`` and its first product against autograd before
trusting it (:mod:`resgeom_fast.operators._autotune`).

Layer rules (x input, y output, g = dL/dy, R = directional derivative along V):
- Linear ``y = x W^T + b``: ``Ry = Rx W^T + x V_W^T + V_b``; ``R gx = Rg W + g V_W``,
  ``R gW = Rg^T x + g^T Rx``, ``R gb = sum_n Rg``.
- BatchNorm (eval) ``y = xhat * gamma + beta``, ``xhat = (x - mu) c``, ``c = 1/sqrt(var + eps)``:
  ``Ry = Rx * gamma c + xhat V_gamma + V_beta``; ``R gx = Rg * gamma c + g * c V_gamma``,
  ``R g_gamma = sum_n (Rg xhat + g Rx c)``, ``R g_beta = sum_n Rg``.
- A Linear followed by a BatchNorm is one affine layer ``y = diag(s) (W x + b - mu) + beta``,
  ``s = gamma c``: its output tangent is ``Rx W_s^T + [x, 1] M^T`` (``W_s = diag(s) W``, M the
  tangent weights of :meth:`StructuredHVP._tangent_weights`) and its parameter tangents come from
  two GEMMs and small reductions (:meth:`StructuredHVP._rbwd_linear`): six GEMMs per layer in
  all, and no elementwise pass over the [N, k, D] tangents.
- ReLU: ``Ry = mask Rx``, ``R gx = mask Rg``.
- Mean cross-entropy over N samples, p = softmax(logits): ``g = (p - onehot) / N``,
  ``R g = (p * Ro - p <p, Ro>) / N``.
- Mean squared error over the N*d elements of outputs o [N, d] and targets t:
  ``g = 2 (o - t) / (N d)``, ``R g = 2 Ro / (N d)``.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resgeom_fast.core.blocks import ZeroSkip
from resgeom_fast.models.blocks import OrthogonalSkip, ScaledIdentity

__all__ = ["StructuredHVP", "output_gradient", "output_tangent_gradient", "parse_structured", "structured_loss"]


class _Linear:
    """Linear, optionally followed by an eval-mode BatchNorm1d (folded into one affine layer)."""

    def __init__(self, mod: nn.Linear, pos: dict[int, int], bn: Optional[_BatchNorm] = None) -> None:
        self.mod, self.W, self.b, self.bn = mod, mod.weight, mod.bias, bn
        self.iw = pos.get(id(mod.weight))
        self.ib = None if mod.bias is None else pos.get(id(mod.bias))
        self.ig = None if bn is None or bn.weight is None else pos.get(id(bn.weight))
        self.ibeta = None if bn is None or bn.bias is None else pos.get(id(bn.bias))


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
            prev = out[-1] if out else None
            if isinstance(prev, _Linear) and prev.bn is None and prev.W.shape[0] == m.num_features:
                out[-1] = _Linear(prev.mod, pos, bn=m)     # Linear -> BatchNorm: one layer
            else:
                out.append(_Norm(m, pos))
        elif type(m) is nn.ReLU:
            out.append(_ReLU())
        else:
            return None, f"{where}: {type(m).__name__} is not supported"
    return out, None


def _parse_skip(skip: nn.Module, where: str) -> tuple[Optional[_Skip], Optional[str]]:
    """The skip Q_l, recognised by type (subclasses included; a class of another package that
    merely shares a name is not): identity, zero, a fixed orthogonal matrix, a scaled identity."""
    if isinstance(skip, nn.Identity):
        return _Skip("identity"), None
    if isinstance(skip, ZeroSkip) and skip.out_channels is None and skip.stride == 1:
        return _Skip("zero"), None
    if isinstance(skip, OrthogonalSkip) and skip.conv is False:
        return _Skip("matrix", Q=skip.weight), None
    if isinstance(skip, ScaledIdentity) and isinstance(skip.factor, float):
        return _Skip("scaled", factor=skip.factor), None
    return None, f"{where}: skip {type(skip).__name__} is not supported"


def structured_loss(loss_fn: Any) -> Optional[str]:
    """"ce" (plain mean cross-entropy), "mse" (mean squared error) or None (not supported)."""
    if loss_fn is torch.nn.functional.cross_entropy or (
            isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.reduction == "mean"
            and loss_fn.weight is None and float(loss_fn.label_smoothing) == 0.0):
        return "ce"
    if loss_fn is torch.nn.functional.mse_loss or (
            isinstance(loss_fn, nn.MSELoss) and loss_fn.reduction == "mean"):
        return "mse"
    return None


def parse_structured(model: nn.Module, params: Sequence[Tensor], loss_fn: Any,
                     batchnorm: str) -> tuple[Optional[list], Optional[str]]:
    """The layer list of a recognised fully-connected residual network, or (None, reason)."""
    if batchnorm != "eval":
        return None, "batchnorm='train' (batch statistics couple the samples)"
    if structured_loss(loss_fn) is None:
        return None, ("the loss is not nn.CrossEntropyLoss() / F.cross_entropy (mean, no class weights, "
                      "no label smoothing) or nn.MSELoss() / F.mse_loss (mean)")
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
        if (not getattr(blk, "resgeom_block", False)
                or not all(hasattr(blk, a) for a in ("branch", "skip", "scale", "post"))):
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



def output_gradient(logits: Tensor, y: Any, loss: str) -> tuple[Optional[Tensor], Tensor]:
    """``(p, g)`` at the logits [N, C] of a batch: g = dL/dlogits of the mean loss ("ce": p the
    softmax, g = (p - onehot(y)) / N; "mse": p None, g = 2 (o - t) / (N d), ``y`` the targets)."""
    n = logits.shape[0]
    if loss == "mse":
        return None, (logits - y).mul_(2.0 / logits.numel())
    p = torch.softmax(logits, dim=1)
    g = p.clone()
    g[torch.arange(n, device=g.device), y] -= 1
    return p, g.div_(n)


def output_tangent_gradient(Ro: Tensor, p: Optional[Tensor], n: int, loss: str) -> Tensor:
    """R g from the logits' tangents ``Ro`` [n, k, C] of n samples (the output Hessian times Ro):
    "mse": 2 Ro / (n d); "ce": R of (p - onehot)/n, (p * Ro - p <p, Ro>) / n per sample and vector
    (``p`` [n, C] the softmax)."""
    if loss == "mse":
        return Ro * (2.0 / (n * Ro.shape[-1]))
    assert p is not None
    q = p.unsqueeze(1)                                            # [n, 1, C]
    pRo = q * Ro
    return pRo.sub_(q * pRo.sum(-1, keepdim=True)).div_(n)

def _collect(layers: list, known: set[int]) -> None:
    for L in layers:
        if isinstance(L, _Linear):
            known.update(i for i in (L.iw, L.ib, L.ig, L.ibeta) if i is not None)
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
        self.consts: dict[int, tuple] = {}       # per layer, independent of the samples
        self.gx: dict[int, Tensor] = {}          # per layer: g^T [x, 1] over these samples (lazy)
        self._chunks: dict[int, list[_Primal]] = {}

    def chunks(self, size: int) -> list[_Primal]:
        """Views of this cache on consecutive blocks of ``size`` samples (``n`` stays the batch's,
        the mean's denominator), built once per size."""
        if size >= self.n:
            return [self]
        if size not in self._chunks:
            parts = []
            for s0 in range(0, self.n, size):
                sl = slice(s0, s0 + size)
                c = _Primal()
                c.n, c.consts = self.n, self.consts
                c.p = None if self.p is None else self.p[sl]
                c.acts = {key: (a[0][sl], *a[1:]) if isinstance(a, tuple) else a[sl] for key, a in self.acts.items()}
                c.grads = {key: g[sl] for key, g in self.grads.items()}
                parts.append(c)
            self._chunks[size] = parts
        return self._chunks[size]


def _bn_consts(m: _BatchNorm, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    c = torch.rsqrt(m.running_var.to(dtype) + m.eps)
    gamma = m.weight.detach() if m.weight is not None else torch.ones_like(c)
    return m.running_mean.to(dtype), c, gamma


def _forward(layers: list, h: Tensor, st: _Primal) -> Tensor:
    for L in layers:
        if isinstance(L, str):   # flatten
            h = h.flatten(1)
        elif isinstance(L, _Linear):
            W = L.W.detach()
            st.acts[id(L)] = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)     # [x, 1]
            h = torch.nn.functional.linear(h, W, None if L.b is None else L.b.detach())
            if L.bn is None:
                st.consts[id(L)] = (W, None, None, None)
            else:   # y = (z - mu) c gamma + beta; W_s = diag(s) W with s = gamma c; A = [W, b - mu]
                mu, c, gamma = _bn_consts(L.bn, h.dtype)
                sc = gamma * c
                b = L.b.detach() if L.b is not None else torch.zeros_like(mu)
                A = torch.cat([W, (b - mu).unsqueeze(1)], dim=1)
                st.consts[id(L)] = (W * sc.unsqueeze(1), sc, c, A)
                h = (h - mu) * sc
                if L.bn.bias is not None:
                    h = h + L.bn.bias.detach()
        elif isinstance(L, _Norm):
            mu, c, gamma = _bn_consts(L.mod, h.dtype)
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
            s = _skip(L.skip, h)
            f = _forward(L.branch, h, st)
            out = f * L.scale if s is None else s + L.scale * f
            if L.post_relu:
                mask = out > 0
                st.acts[id(L)] = mask
                out = out * mask
            h = out
    return h


def _skip(skip: _Skip, h: Optional[Tensor], adjoint: bool = False) -> Optional[Tensor]:
    """Q h (``h @ Q^T``), or Q^T g with ``adjoint`` (``g @ Q``), for the skip kinds; None for 0."""
    if h is None or skip.kind == "zero":
        return None
    if skip.kind == "identity":
        return h
    if skip.kind == "scaled":
        return h * skip.factor
    Q = skip.Q.to(h.dtype)
    return torch.matmul(h, Q if adjoint else Q.t())


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _mm_acc(r: Optional[Tensor], a: Tensor, b: Tensor, k: int) -> Tensor:
    """``r + a @ b`` with ``a @ b`` [n, k * d] read as [n, k, d]: a fresh product when r is None,
    else accumulated into r (one of this module's own tensors) by the GEMM itself."""
    if r is None:
        return torch.mm(a, b).view(a.shape[0], k, -1)
    r.view(a.shape[0], -1).addmm_(a, b)
    return r


def _masked(t: Tensor, mask: Tensor, owned: bool) -> Tensor:
    """``t * mask`` over the k axis ([n, k, D] times an [n, D] mask), in place when ``owned``."""
    m = mask.unsqueeze(1)
    return t.mul_(m) if owned else t * m


def _acc(out: dict[int, Tensor], i: int, r: Tensor) -> None:
    """``out[i] += r`` (r is a fresh tensor this module owns)."""
    if i in out:
        out[i].add_(r)
    else:
        out[i] = r


def _backward(layers: list, g: Tensor, st: _Primal) -> Optional[Tensor]:
    """Primal backward: stores dL/d(output) of every layer; returns dL/d(input)."""
    for L in reversed(layers):
        if isinstance(L, str):
            return None      # the flatten of the stem's input: nothing before it needs gradients
        st.grads[id(L)] = g
        if isinstance(L, _Linear):
            g = g @ st.consts[id(L)][0]          # dL/dx = g diag(s) W
        elif isinstance(L, _Norm):
            _, c, gamma = st.acts[id(L)]
            g = g * (gamma * c)
        elif isinstance(L, _ReLU):
            g = g * st.acts[id(L)]
        else:
            if L.post_relu:
                g = g * st.acts[id(L)]
            gb = _backward(L.branch, g * L.scale, st)
            g = _add(_skip(L.skip, g, adjoint=True), gb)
    return g


class StructuredHVP:
    """Exact Hessian products of a recognised network (module doc); ``params`` in engine order."""

    def __init__(self, layers: list, params: Sequence[Tensor], chunk: Optional[int] = None,
                 loss: str = "ce") -> None:
        if loss not in ("ce", "mse"):
            raise ValueError(f"StructuredHVP: expected loss 'ce' or 'mse', got {loss!r}")
        self.layers, self.params, self.loss = layers, list(params), loss
        # samples per block of the tangent passes (see apply): bounds the memory of the tangents
        # (k x chunk x width per layer); one block of 512 samples was fastest on the benchmark
        # FCResNet (2-core CPU; blocks of 256 took 1.13x as long, of 128 1.5x)
        self.chunk = 1024 if chunk is None else chunk
        self.first = next((L for L in layers if not isinstance(L, str)), None)

    def primal(self, x: Tensor, y: Tensor) -> _Primal:
        """The cached forward/backward of one batch; ``y`` class indices [N] ("ce") or targets of
        the logits' shape ("mse")."""
        st = _Primal()
        with torch.no_grad():
            logits = _forward(self.layers, x, st)
            n = logits.shape[0]
            p, g = output_gradient(logits, y, self.loss)
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
            # samples are independent up to the parameter sums: blocks of ``chunk`` samples
            for part in st.chunks(max(1, self.chunk)):
                tang: dict[int, Optional[Tensor]] = {}
                Ro = self._rfwd(self.layers, None, V, part, tang, k)
                Rg = None if Ro is None else output_tangent_gradient(Ro, part.p, part.n, self.loss)
                self._rbwd(self.layers, Rg, V, part, tang, want, out, k)
        res = []
        for i in idx:
            r = out.get(i)
            res.append(torch.zeros((k, *self.params[i].shape), dtype=self.params[i].dtype,
                                   device=self.params[i].device) if r is None else r)
        return res

    # -- tangent forward: R h [N, k, D]; ``tang[id(L)]`` the tangent of layer L's input ----------
    def _rfwd(self, layers: list, Rh: Optional[Tensor], V: dict[int, Tensor], st: _Primal,
              tang: dict, k: int) -> Optional[Tensor]:
        owned = False       # Rh was made here (not the caller's, not aliased): may be updated in place
        for L in layers:
            if isinstance(L, str):
                continue      # the input does not depend on the parameters
            tang[id(L)] = Rh
            if isinstance(L, _Linear):
                xa = st.acts[id(L)]                                     # [n, in + 1]: [x, 1]
                Ws = st.consts[id(L)][0]
                out_f = Ws.shape[0]
                M = self._tangent_weights(L, V, st, k)
                tang[("M", id(L))] = M
                r = None if Rh is None else torch.matmul(Rh, Ws.t())    # [n, k, out]
                if M is not None:                                       # + [x, 1] M_j^T for every j at once
                    r = _mm_acc(r, xa, M.reshape(k * out_f, -1).t(), k)
                Rh, owned = r, r is not None
            elif isinstance(L, _Norm):
                xhat, c, gamma = st.acts[id(L)]
                r = None if Rh is None else Rh * (gamma * c)
                if L.ig is not None and L.ig in V:
                    t = xhat.unsqueeze(1) * V[L.ig]                     # [N, k, D]
                    r = t if r is None else r.add_(t)
                if L.ib is not None and L.ib in V:
                    r = (V[L.ib].unsqueeze(0).expand(xhat.shape[0], k, -1).clone() if r is None
                         else r.add_(V[L.ib]))
                Rh, owned = r, r is not None
            elif isinstance(L, _ReLU):
                if Rh is not None:
                    Rh = _masked(Rh, st.acts[id(L)], owned)
                    owned = True
            else:
                s = _skip(L.skip, Rh)
                f = self._rfwd(L.branch, Rh, V, st, tang, k)
                if f is not None:
                    if f is Rh:     # an empty branch returns its input: never update that in place
                        f = f.clone()
                    f = f.mul_(L.scale) if L.scale != 1.0 else f
                    r = f if s is None else f.add_(s)
                else:
                    r = s
                r_owned = f is not None
                if L.post_relu and r is not None:
                    r, r_owned = _masked(r, st.acts[id(L)], r_owned), True
                Rh, owned = r, r_owned
        return Rh

    # -- tangent backward: R g [N, k, D], and R of every wanted parameter gradient --------------
    def _rbwd(self, layers: list, Rg: Optional[Tensor], V: dict[int, Tensor], st: _Primal, tang: dict,
              want: set[int], out: dict[int, Tensor], k: int) -> Optional[Tensor]:
        owned = False       # as in _rfwd
        for L in reversed(layers):
            if isinstance(L, str):
                return None
            g = st.grads[id(L)]                                         # [N, out]
            Rx = tang[id(L)]
            if isinstance(L, _Linear):
                self._rbwd_linear(L, Rg, Rx, g, V, st, tang, want, out, k)
                if L is self.first:
                    return None     # the network's input has no tangent: R of dL/dx is not needed
                Ws = st.consts[id(L)][0]
                M = tang[("M", id(L))]
                r = None if Rg is None else torch.matmul(Rg, Ws)        # [n, k, in]
                if M is not None:                                       # + g M_j[:, :in] for every j at once
                    out_f, in_f = Ws.shape
                    r = _mm_acc(r, g, M[..., :in_f].transpose(0, 1).reshape(out_f, k * in_f), k)
                Rg, owned = r, r is not None
            elif isinstance(L, _Norm):
                xhat, c, gamma = st.acts[id(L)]
                if L.ig is not None and L.ig in want:
                    r = None if Rg is None else (Rg * xhat.unsqueeze(1)).sum(0)
                    if Rx is not None:
                        t = (Rx * g.unsqueeze(1)).sum(0).mul_(c)
                        r = t if r is None else r.add_(t)
                    if r is not None:
                        _acc(out, L.ig, r)
                if L.ib is not None and L.ib in want and Rg is not None:
                    _acc(out, L.ib, Rg.sum(0))
                r = None if Rg is None else Rg * (gamma * c)
                if L.ig is not None and L.ig in V:
                    t = g.unsqueeze(1) * (c * V[L.ig])
                    r = t if r is None else r.add_(t)
                Rg, owned = r, r is not None
            elif isinstance(L, _ReLU):
                if Rg is not None:
                    Rg = _masked(Rg, st.acts[id(L)], owned)
                    owned = True
            else:
                if L.post_relu and Rg is not None:
                    Rg, owned = _masked(Rg, st.acts[id(L)], owned), True
                s = _skip(L.skip, Rg, adjoint=True)
                gin = None if Rg is None else (Rg if L.scale == 1.0 else Rg * L.scale)
                rb = self._rbwd(L.branch, gin, V, st, tang, want, out, k)
                if rb is None or rb is gin:     # no branch term / an empty branch (returns its input)
                    Rg, owned = _add(s, rb), False
                    if Rg is not None and rb is not None and s is not None:
                        owned = True            # _add made a new tensor
                else:
                    Rg, owned = (rb if s is None else rb.add_(s)), True
        return Rg

    # -- the affine layer y = diag(s) (W x + b - mu) + beta (s = gamma c; s = 1, mu = beta = 0 without BN)
    @staticmethod
    def _tangent_weights(L: _Linear, V: dict[int, Tensor], st: _Primal, k: int) -> Optional[Tensor]:
        """M [k, out, in + 1] with ``Ry = Rx W_s^T + [x, 1] M_j^T``: the tangent of the layer's
        output that does not come through its input, as weights on [x, 1]:
        ``M_j = [diag(s) V_W, s V_b] + diag(c V_gamma) [W, b - mu] + [0, V_beta]``."""
        Ws, sc, c, A = st.consts[id(L)]
        out_f, in_f = Ws.shape
        terms = [i for i in (L.iw, L.ib, L.ig, L.ibeta) if i is not None and i in V]
        if not terms:
            return None
        M = Ws.new_zeros((k, out_f, in_f + 1))
        if L.iw in V:
            M[..., :in_f] = V[L.iw] if sc is None else V[L.iw] * sc.unsqueeze(1)
        if L.ib is not None and L.ib in V:
            M[..., in_f] = V[L.ib] if sc is None else V[L.ib] * sc
        if L.ig is not None and L.ig in V:
            M.add_((V[L.ig] * c).unsqueeze(-1) * A)
        if L.ibeta is not None and L.ibeta in V:
            M[..., in_f].add_(V[L.ibeta])
        return M

    @staticmethod
    def _rbwd_linear(L: _Linear, Rg: Optional[Tensor], Rx: Optional[Tensor], g: Tensor, V: dict[int, Tensor],
                     st: _Primal, tang: dict, want: set[int], out: dict[int, Tensor], k: int) -> None:
        """R of the parameter gradients of the affine layer, from two GEMMs and small reductions:
        ``RT_j = Rg_j^T [x, 1]`` and ``GR_j = g^T Rx_j``, with ``gW = g_z^T x``, ``g_z = s g``:

        - ``R gW_j = diag(s) (RT_j[:, :in] + GR_j) + diag(c V_gamma,j) G[:, :in]``, ``G = g^T [x, 1]``
        - ``R gb_j = s RT_j[:, in] + c V_gamma,j G[:, in]``; ``R g_beta,j = RT_j[:, in]``
        - ``R g_gamma,j = c (rowsum(RT_j A) + rowsum(GR_j W) + rowsum(G M'_j))``, ``M'_j = [V_W, V_b]_j``
        """
        wanted = [i for i in (L.iw, L.ib, L.ig, L.ibeta) if i is not None and i in want]
        if not wanted:
            return
        Ws, sc, c, A = st.consts[id(L)]
        xa = st.acts[id(L)]
        n, out_f, in_f = g.shape[0], Ws.shape[0], Ws.shape[1]
        RT = None if Rg is None else torch.mm(Rg.reshape(n, k * out_f).t(), xa).view(k, out_f, in_f + 1)
        GR = None
        if Rx is not None and (L.iw in want or L.ig in want):
            GR = torch.mm(g.t(), Rx.reshape(n, k * in_f)).view(out_f, k, in_f).transpose(0, 1)
        G = None
        Vg = V.get(L.ig) if L.ig is not None else None
        if sc is not None and (Vg is not None or L.ig in want):
            G = st.gx.get(id(L))
            if G is None:
                G = st.gx[id(L)] = torch.mm(g.t(), xa)                  # [out, in + 1]
        if L.iw in want:
            r = None
            if RT is not None:
                r = RT[..., :in_f].clone()
            if GR is not None:
                r = GR.contiguous() if r is None else r.add_(GR)
            if r is not None and sc is not None:
                r.mul_(sc.unsqueeze(1))
            if Vg is not None and G is not None:
                t = (Vg * c).unsqueeze(-1) * G[:, :in_f]
                r = t if r is None else r.add_(t)
            if r is not None:
                _acc(out, L.iw, r)
        if L.ib is not None and L.ib in want:
            r = None if RT is None else (RT[..., in_f] * sc if sc is not None else RT[..., in_f].clone())
            if Vg is not None and G is not None:
                t = Vg * c * G[:, in_f]
                r = t if r is None else r.add_(t)
            if r is not None:
                _acc(out, L.ib, r)
        if L.ibeta is not None and L.ibeta in want and RT is not None:
            _acc(out, L.ibeta, RT[..., in_f].clone())
        if L.ig is not None and L.ig in want:
            r = None if RT is None else (RT * A).sum(-1)
            if GR is not None:
                t = (GR * L.W.detach()).sum(-1)
                r = t if r is None else r.add_(t)
            Vw = V.get(L.iw)
            Vb = V.get(L.ib) if L.ib is not None else None
            if Vw is not None:
                t = (Vw * G[:, :in_f]).sum(-1)
                r = t if r is None else r.add_(t)
            if Vb is not None:
                t = Vb * G[:, in_f]
                r = t if r is None else r.add_(t)
            if r is not None:
                _acc(out, L.ig, r.mul_(c))
