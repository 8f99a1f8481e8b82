"""Residual expansion (docs/science.md section 3, Dherin & Munn 2025, "On residual network depth").

For a plain stack of residual blocks ``h_l = Q_l h_{l-1} + lam_l F_l(h_{l-1})`` (l = 1..L):

- :func:`path_expansion`: the path-order decomposition of the linearised stack (our tool). With
  J_l = dF_l/dh at h_{l-1}(x_b) and c_0^(0) = v, the recursion
  ``c_l^(m) = Q_l c_{l-1}^(m) + lam_l J_l c_{l-1}^(m-1)`` splits the Jacobian-vector product
  ``d h_L / d h_0 v`` by path order m (the number of residual branches a path passes through):
  ``sum_{m=0..L} c_L^(m) = d h_L / d h_0 v``. Reports ||c_L^(m)|| (m = 0..M), the normalised
  path-order distribution and the mean path order.
- :func:`second_order_expansion` / :func:`remainder_scaling`: h_L against its second-order
  Taylor expansion in lam, ``E2 = h_0 + lam sum_i F_i(h_0) + lam^2 sum_{i<j} DF_j(h_0) F_i(h_0)``,
  and the log-log slope of the remainder against lam (expected 3).
- :func:`geometric_complexity`: GC = mean_x ||d f(x) / dx||_F^2 of the logits f.
- :func:`output_norm_vs_depth`: ||h_L|| / ||h_0|| of FCResNets at initialisation against depth
  for lam in {1, 1/sqrt(L), 1/L}.

Plot helpers: :func:`plot_path_orders`, :func:`plot_output_norms`.

Every quantity is evaluated with the model in eval mode (BatchNorm running statistics), so that
Jacobians are per-sample quantities; the modules' ``training`` flags are restored on return.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import jacfwd, jacrev, jvp, vmap

from resgeom_fast.core.checks import check_module, check_type
from resgeom_fast.core.modules import module_mode
from resgeom_fast.analysis._common import (
    Result,
    batches,
    check_finite_parameters,
    check_finite_tensor,
    check_int,
    model_device_dtype,
    to_jsonable,
)
from resgeom_fast.analysis.plotting import as_result_dict, band, figure_axes, get_path, join, lines
from resgeom_fast.models import FCResNet, OrthogonalSkip, ScaledIdentity, ZeroSkip
from resgeom_fast.operators import (
    BlockInfo,
    ResidualJacobian,
    block_inputs,
    residual_blocks,
    residual_jacobians,
)
from resgeom_fast.operators._data import no_inplace

__all__ = [
    "ExpansionResult",
    "GCResult",
    "PathExpansionResult",
    "geometric_complexity",
    "output_norm_vs_depth",
    "path_expansion",
    "plot_output_norms",
    "plot_path_orders",
    "remainder_scaling",
    "second_order_expansion",
]

OUTPUT_NORM_SCALES: tuple[str, ...] = ("1", "1/sqrt(L)", "1/L")


# -- plumbing ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode with in-place activations off (torch.func transforms); restores both."""
    with module_mode(module, False), no_inplace(module):
        yield


def _check_x(fn: str, model: nn.Module, x: Any) -> tuple[torch.device, torch.dtype]:
    check_module(fn, "model", model)
    device, dtype = model_device_dtype(fn, model)
    check_type(fn, "x", x, Tensor, "a torch.Tensor")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{fn}: expected x with a non-empty batch dimension [N, ...], got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{fn}: expected x on the model's device {device}, got {x.device}")
    if x.is_floating_point() and x.dtype != dtype:
        raise ValueError(f"{fn}: expected x of dtype {dtype} (the model's), got {x.dtype}")
    check_finite_parameters(fn, model)
    check_finite_tensor(fn, x, "x")
    return device, dtype


def _check_states(fn: str, infos: Sequence[BlockInfo], hs: Sequence[Tensor]) -> None:
    """The captured block inputs are finite (parameters and x are: else the forward overflowed)."""
    for info, h in zip(infos, hs):
        check_finite_tensor(fn, h, f"the input of block {info.name!r} (parameters and x are finite: the "
                                   f"forward pass overflowed)")


def _check_not_hyper(fn: str, model: nn.Module) -> None:
    if getattr(model, "hyper", False) is True:
        raise ValueError(
            f"{fn}: the model is a hyper-residual net (hyper=True): every block also receives the mean "
            "of earlier block outputs, so h_L is not the plain stack h_l = Q_l h_{l-1} + lam_l F_l(h_{l-1}) "
            "that the residual expansion decomposes; use a model with hyper=False")


def _scale_value(info: BlockInfo) -> float:
    s = info.scale
    return float(s.detach()) if isinstance(s, Tensor) else float(s)


def _check_stack(fn: str, model: nn.Module, infos: Sequence[BlockInfo],
                 shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> None:
    """Type 1 shapes, identity posts and consecutive blocks (in the model's block order)."""
    for info, (s_in, s_out) in zip(infos, shapes):
        if s_in != s_out:
            raise ValueError(
                f"{fn}: block {info.name!r} maps per-sample shape {s_in} to {s_out}; the residual expansion "
                "needs a Type-1 stack where every h_l has one shape. For staged ResNets analyse one stage "
                "at a time: pass blocks= a run of consecutive equal-shape blocks")
        if not isinstance(info.post, nn.Identity):
            raise ValueError(
                f"{fn}: block {info.name!r} applies post = {type(info.post).__name__} after the sum; the "
                "expansion needs h_l = Q_l h_{l-1} + lam_l F_l(h_{l-1}) with no post-activation (an "
                "activation after the addition is not a plain residual stack)")
    order = {id(b.block): i for i, b in enumerate(residual_blocks(model))}
    idx = [order.get(id(info.block)) for info in infos]
    if any(i is None for i in idx) or any(b != a + 1 for a, b in zip(idx, idx[1:])):
        raise ValueError(f"{fn}: blocks must be consecutive residual blocks of the model in order, got "
                         f"block indices {idx}")


def _check_chain(fn: str, infos: Sequence[BlockInfo], hs: Sequence[Tensor]) -> Tensor:
    """Each block's output on its captured input is the next block's input; returns the last output."""
    out = None
    with torch.no_grad():
        for i, info in enumerate(infos):
            with _eval_mode(info.block):
                out = info.block(hs[i])
            if i + 1 < len(infos):
                nxt = hs[i + 1]
                tol = 1e3 * torch.finfo(nxt.dtype).eps if nxt.is_floating_point() else 0.0
                scale = float(nxt.abs().max()) if nxt.numel() else 0.0
                if out.shape != nxt.shape or not torch.allclose(out, nxt, rtol=tol, atol=tol * max(scale, 1.0)):
                    raise ValueError(
                        f"{fn}: the output of block {info.name!r} is not the input of block {infos[i + 1].name!r}; "
                        "the expansion needs a plain stack h_l = block_l(h_{l-1}) (nothing between blocks, "
                        "no hyper-residual connections)")
    assert out is not None
    return out


_LINEAR_SKIPS = (nn.Identity, ZeroSkip, OrthogonalSkip, ScaledIdentity)


def _apply_skip(skip: nn.Module, h: Tensor, C: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Q_l C for C [N, D, k]: the skip itself where it is linear, its linearisation at h otherwise."""
    n, d, k = C.shape
    if isinstance(skip, nn.Identity):
        return C
    if k == 0:
        return C
    with torch.no_grad(), _eval_mode(skip):
        if isinstance(skip, _LINEAR_SKIPS):
            z = C.permute(0, 2, 1).reshape(n * k, *shape)
            return skip(z).reshape(n, k, d).permute(0, 2, 1)

        t = C.permute(2, 0, 1).reshape(k, n, *shape)
        y = vmap(lambda u: jvp(skip, (h,), (u,))[1])(t)
        return y.reshape(k, n, d).permute(1, 2, 0)


# -- path expansion ----------------------------------------------------------------------------
@dataclass
class PathExpansionResult(Result):
    """Path-order decomposition of d h_L / d h_0 v (docs/science.md section 3, our tool).

    Attributes:
        orders: [M + 1] int64, m = 0..M.
        norms_mean, norms_std: [M + 1] float64, mean / population std over samples and probes of
            ||c_L^(m)||.
        distribution, distribution_std: [M + 1] float64, mean / std over samples and probes of the
            normalised distribution p_m = ||c_L^(m)|| / sum_{m'<=M} ||c_L^(m')|| (our reading:
            norms, not squared norms, weight the orders).
        mean_order, mean_order_std: mean / std over samples and probes of sum_m m p_m.
        total_norm_mean: mean ||d h_L / d h_0 v|| (all orders, the same recursion with one extra
            column). tail_norm_mean: mean ||sum_{m > M} c_L^(m)|| (0 up to rounding when M = L).
        input_norm_mean: mean ||v||.
        num_blocks (L), max_order (M), num_samples (N), num_probes, seed.
        block_names, scales (lam_l), skips (type names of Q_l).
        norms: [N, P, M + 1] float64, per sample and probe (kept on the object, not exported by
            ``to_dict``).
    """

    orders: Tensor
    norms_mean: Tensor
    norms_std: Tensor
    distribution: Tensor
    distribution_std: Tensor
    mean_order: float
    mean_order_std: float
    total_norm_mean: float
    tail_norm_mean: float
    input_norm_mean: float
    num_blocks: int
    max_order: int
    num_samples: int
    num_probes: int
    seed: int
    block_names: list[str]
    scales: list[float]
    skips: list[str]
    norms: Tensor = field(repr=False, default_factory=lambda: torch.empty(0, device="cpu"))

    _exclude = ("norms",)

    def summary(self) -> dict[str, float]:
        """Mean path order, the most weighted order, the relative tail beyond M and L."""
        tail_rel = self.tail_norm_mean / self.total_norm_mean if self.total_norm_mean > 0 else float("nan")
        return {"mean_order": float(self.mean_order), "mode_order": float(int(self.distribution.argmax())),
                "tail_rel": float(tail_rel), "num_blocks": float(self.num_blocks)}


def _probes(fn: str, v: Optional[Tensor], n: int, shape: tuple[int, ...], num_probes: int, seed: int,
            dtype: torch.dtype, device: torch.device) -> Tensor:
    """Starting vectors [N, D, P]."""
    d = math.prod(shape)
    if v is None:
        # drawn on the CPU on purpose (the same probes on every device), moved once
        gen = torch.Generator(device="cpu").manual_seed(seed)
        g = torch.randn(n, num_probes, d, generator=gen, dtype=torch.float64, device="cpu")
        g = g / g.norm(dim=-1, keepdim=True)
        return g.to(dtype=dtype, device=device).permute(0, 2, 1).contiguous()
    check_type(fn, "v", v, Tensor, "a torch.Tensor or None")
    if num_probes != 1:
        raise ValueError(f"{fn}: expected num_probes 1 when v is given (v is the probe), got {num_probes}")
    if v.dtype != dtype or v.device != device:
        raise ValueError(f"{fn}: expected v of dtype {dtype} on {device} (those of h_0), got {v.dtype} on {v.device}")
    if tuple(v.shape) in (shape, (d,)):
        v = v.reshape(1, d).expand(n, d)
    elif tuple(v.shape) in ((n, *shape), (n, d)):
        v = v.reshape(n, d)
    else:
        raise ValueError(f"{fn}: expected v of shape {[n, *shape]}, {[n, d]}, {list(shape)} or {[d]} "
                         f"(per sample or shared), got {list(v.shape)}")
    return v.unsqueeze(-1).contiguous()


def _path_coefficients(fn: str, model: nn.Module, x: Tensor, max_order: Optional[int], *, v: Optional[Tensor],
                       blocks: Optional[Sequence[Any]], num_probes: int, seed: int
                       ) -> tuple[list[Optional[Tensor]], Tensor, Tensor, list[BlockInfo]]:
    """The recursion of :func:`path_expansion`: ([c_L^(m) [N, D, P] or None (= 0)] for m = 0..M,
    the all-order sum d h_L / d h_0 v [N, D, P], c_0 = v [N, D, P], the blocks), model dtype."""
    _check_x(fn, model, x)
    if not x.is_floating_point():
        raise ValueError(f"{fn}: expected floating-point x, got {x.dtype}")
    check_int(fn, "num_probes", num_probes, 1)
    check_int(fn, "seed", seed, 0)
    if max_order is not None:
        check_int(fn, "max_order", max_order, 0)
    _check_not_hyper(fn, model)
    ops: list[ResidualJacobian] = residual_jacobians(model, x, blocks)
    infos = [op.info for op in ops]
    _check_stack(fn, model, infos, [(op.in_shape, op.out_shape) for op in ops])
    hs = [op.h for op in ops]
    _check_states(fn, infos, hs)
    _check_chain(fn, infos, hs)
    L = len(ops)
    M = L if max_order is None else check_int(fn, "max_order", max_order, 0, L, hint=" (the number of blocks)")
    shape = ops[0].in_shape
    n = x.shape[0]
    c0 = _probes(fn, v, n, shape, num_probes, seed, hs[0].dtype, hs[0].device)      # [N, D, P]
    P = c0.shape[-1]
    orders: list[Optional[Tensor]] = [c0] + [None] * M      # c^(m) [N, D, P]; None = exactly zero
    total = c0
    for l, (op, info) in enumerate(zip(ops, infos), start=1):
        lam = _scale_value(info)
        live = [m for m in range(min(l - 1, M - 1) + 1) if orders[m] is not None]   # feed order m + 1
        kept = [m for m in range(min(l - 1, M) + 1) if orders[m] is not None]
        # Q_l on every live order and the total, in one call (nothing to do for identity skips)
        q_in = torch.cat([orders[m] for m in kept] + [total], dim=2)
        q_out = q_in if isinstance(info.skip, nn.Identity) else _apply_skip(info.skip, op.h, q_in, shape)
        j_in = torch.cat([orders[m] for m in live] + [total], dim=2)
        j_out = op.matmat(j_in) * lam
        new: list[Optional[Tensor]] = [None] * (M + 1)
        for i, m in enumerate(kept):
            new[m] = q_out[:, :, i * P:(i + 1) * P]
        for i, m in enumerate(live):
            add = j_out[:, :, i * P:(i + 1) * P]
            new[m + 1] = add if new[m + 1] is None else new[m + 1] + add
        total = q_out[:, :, -P:] + j_out[:, :, -P:]
        check_finite_tensor(fn, total, f"d h_l / d h_0 v after block {info.name!r} (the linearised stack "
                                       f"overflowed)")
        orders = new
    return orders, total, c0, infos


def path_expansion(model: nn.Module, x: Tensor, max_order: Optional[int] = None, *, v: Optional[Tensor] = None,
                   blocks: Optional[Sequence[Any]] = None, num_probes: int = 1, seed: int = 0) -> PathExpansionResult:
    """Split the linearised residual stack's JVP ``d h_L / d h_0 v`` by path order (docs/science.md section 3).

    At each input x_b the stack is linearised: J_l = dF_l/dh at h_{l-1}(x_b) (the residual-branch
    Jacobians of :func:`resgeom_fast.operators.residual_jacobians`, eval mode), Q_l the block's
    skip (applied as a module where it is linear -- Identity, ZeroSkip, OrthogonalSkip,
    ScaledIdentity --, through its JVP at h_{l-1} otherwise), lam_l the block's scale. Then
    ``c_l^(m) = Q_l c_{l-1}^(m) + lam_l J_l c_{l-1}^(m-1)``, ``c_0^(0) = v``, m = 0..M. Each J_l is
    applied once to all live orders (c_{l-1}^(m) = 0 for m >= l) and to the all-order sum, as one
    batched matmat of at most P (M + 1) columns: L matmats in all.

    Args:
        model: a model whose blocks form a plain Type-1 stack: h_l = block_l(h_{l-1}), equal shapes,
            ``post`` = Identity, no hyper-residual connections.
        x: inputs [N, ...] on the model's device, in its dtype.
        max_order: M in [0, L] (default L = number of blocks analysed).
        v: the probe: None (a random unit vector per sample and probe, float64-drawn from ``seed``,
            cast to the model dtype), or a tensor [N, *h_shape] / [N, D] (per sample) or
            [*h_shape] / [D] (shared), used as given (not normalised); requires ``num_probes=1``.
        blocks: None (all blocks), or a run of consecutive equal-shape blocks (indices, modules or
            BlockInfo s, as in ``residual_jacobians``): h_0 is then the first one's input.
        num_probes: P random probes per sample; statistics pool samples and probes.
        seed: seed of the random probes.

    Returns:
        a :class:`PathExpansionResult`: ||c_L^(m)|| per sample and probe (float64) and their
        statistics. Our reading of "path-length distribution": p_m = ||c_L^(m)|| / sum_m' ||c_L^(m')||
        per sample and probe (norms, not squared norms; orders m <= M only), then averaged.

    Raises:
        ValueError for hyper-residual nets, post-activations other than Identity, blocks that change
        shape (analyse staged nets per stage with ``blocks=``), non-consecutive blocks, bad x / v.
        NonFiniteError (a ValueError) naming a model parameter / buffer or x holding NaN / inf
        (checked before any work), or the block whose input or linearised output overflowed.
    """
    fn = "path_expansion"
    orders, total, c0, infos = _path_coefficients(fn, model, x, max_order, v=v, blocks=blocks,
                                                  num_probes=num_probes, seed=seed)
    L, M = len(infos), len(orders) - 1
    n, P = c0.shape[0], c0.shape[-1]
    zeros = torch.zeros(n, P, dtype=torch.float64, device=c0.device)
    norms = torch.stack([zeros if c is None else c.double().norm(dim=1) for c in orders], dim=-1)  # [N, P, M+1]
    partial = sum((c.double() for c in orders if c is not None), torch.zeros_like(total, dtype=torch.float64))
    tail = (total.double() - partial).norm(dim=1)
    dist = norms / norms.sum(dim=-1, keepdim=True)
    m_idx = torch.arange(M + 1, dtype=torch.float64, device=norms.device)
    mean_order = (dist * m_idx).sum(-1)
    flat = norms.reshape(-1, M + 1).cpu()
    dflat = dist.reshape(-1, M + 1).cpu()
    return PathExpansionResult(
        orders=torch.arange(M + 1, device="cpu"), norms_mean=flat.mean(0), norms_std=flat.std(0, correction=0),
        distribution=dflat.mean(0), distribution_std=dflat.std(0, correction=0),
        mean_order=float(mean_order.mean()), mean_order_std=float(mean_order.std(correction=0)),
        total_norm_mean=float(total.double().norm(dim=1).mean()), tail_norm_mean=float(tail.mean()),
        input_norm_mean=float(c0.double().norm(dim=1).mean()), num_blocks=L, max_order=M, num_samples=n,
        num_probes=P, seed=seed, block_names=[i.name for i in infos], scales=[_scale_value(i) for i in infos],
        skips=[type(i.skip).__name__ for i in infos], norms=norms.cpu())


def plot_path_orders(result: Union[PathExpansionResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> Any:
    """||c_L^(m)|| against path order m (mean over samples and probes, band of +- one std).

    Log y-axis (zero norms, e.g. every m < L of a skip-free net, are not drawn). Plotted numbers:
    ``orders``, ``norms_mean``, ``norms_std`` of the dict form (``result``: a
    :class:`PathExpansionResult`, its ``to_dict()``, or a results dict holding it at ``at``;
    tagged artists, :mod:`resgeom_fast.analysis.plotting`). Returns the Figure.
    """
    root, at, d = as_result_dict("plot_path_orders", result, PathExpansionResult, at,
                                 ("orders", "norms_mean", "norms_std", "num_blocks", "mean_order"))
    fig, ax = figure_axes(ax, (5, 3.5))
    (line,) = lines(ax, root, [("mean ||c_L^(m)||", join(at, "orders"), join(at, "norms_mean"))], logy=True,
                    legend=False, xlabel="path order m (branches on the path)", ylabel="||c_L^(m)||")
    band(ax, root, join(at, "orders"), join(at, "norms_mean"), join(at, "norms_std"), color=line.get_color(),
         label="+- std")
    ax.set_title(f"path-order decomposition (L={d['num_blocks']}, mean order {d['mean_order']:.2f})")
    ax.legend()
    return fig


# -- second-order expansion ----------------------------------------------------------------------
@dataclass
class ExpansionResult(Result):
    """h_L against its first- and second-order expansions in lam (docs/science.md section 3).

    E1 = h_0 + sum_i lam_i F_i(h_0); E2 = E1 + sum_{i<j} lam_i lam_j DF_j(h_0) F_i(h_0) (one
    common lam in the study; per-block lam_l are allowed and enter as written).

    Attributes:
        delta_norm, remainder1, remainder2: [N] float64, ||h_L - h_0||, ||h_L - E1||, ||h_L - E2||.
        first_term_norm, second_term_norm: [N] float64, ||E1 - h_0||, ||E2 - E1||.
        delta_mean, remainder1_mean, remainder2_mean: means over samples.
        scales: lam_l per block; lam: the common lam (max |lam_l|; they are equal in the study).
        num_blocks, num_samples.
    """

    delta_norm: Tensor
    remainder1: Tensor
    remainder2: Tensor
    first_term_norm: Tensor
    second_term_norm: Tensor
    delta_mean: float
    remainder1_mean: float
    remainder2_mean: float
    scales: list[float]
    lam: float
    num_blocks: int
    num_samples: int

    def summary(self) -> dict[str, float]:
        rel = self.remainder2_mean / self.delta_mean if self.delta_mean > 0 else float("nan")
        return {"lam": self.lam, "delta_mean": self.delta_mean, "remainder1_mean": self.remainder1_mean,
                "remainder2_mean": self.remainder2_mean, "remainder2_rel": rel}


def second_order_expansion(model: nn.Module, x: Tensor) -> ExpansionResult:
    """h_L (exact) against ``E2 = h_0 + lam sum_i F_i(h_0) + lam^2 sum_{i<j} DF_j(h_0) F_i(h_0)``.

    The blocks must be ``h_l = h_{l-1} + lam_l F_l(h_{l-1})``: identity skips, post = Identity, one
    plain Type-1 stack (no hyper-residual connections). DF_j(h_0) sum_{i<j} lam_i F_i(h_0) is one
    JVP of branch j at h_0 (torch.func.jvp, batched over samples; eval mode). h_0 is the first
    block's input and h_L the last block's output for ``x``.

    Args:
        model: the network. x: inputs [N, ...] on its device, in its dtype.

    Returns:
        an :class:`ExpansionResult` (norms per sample, float64). In float32 the remainders have a
        rounding floor of about 1e-7 ||h||: use float64 models to see lam^3 at small lam.

    Raises:
        NonFiniteError: NaN / inf in a model parameter or buffer or in x (named), or an overflow
            (the block input or expansion term named).
    """
    fn = "second_order_expansion"
    _check_x(fn, model, x)
    if not x.is_floating_point():
        raise ValueError(f"{fn}: expected floating-point x, got {x.dtype}")
    _check_not_hyper(fn, model)
    infos = residual_blocks(model)
    hs = block_inputs(model, x, infos)
    _check_states(fn, infos, hs)
    for info in infos:
        if not isinstance(info.skip, nn.Identity):
            raise ValueError(f"{fn}: block {info.name!r} has skip {type(info.skip).__name__}; the Taylor "
                             "expansion h_l = h_{l-1} + lam F_l(h_{l-1}) needs identity skips")

    h0 = hs[0]
    with torch.no_grad():
        shapes = []
        for info, h in zip(infos, hs):
            with _eval_mode(info.branch):
                shapes.append((tuple(h.shape[1:]), tuple(info.branch(h[:1]).shape[1:])))
    _check_stack(fn, model, infos, shapes)
    hL = _check_chain(fn, infos, hs)
    lams = [_scale_value(i) for i in infos]
    with torch.no_grad():
        u = torch.zeros_like(h0)          # sum_{i<j} lam_i F_i(h_0)
        second = torch.zeros_like(h0)
        for lam, info in zip(lams, infos):
            with _eval_mode(info.branch):
                if lam != 0.0 and bool((u != 0).any()):
                    second = second + lam * jvp(info.branch, (h0,), (u,))[1]
                u = u + lam * info.branch(h0)
    n = h0.shape[0]

    def nrm(t: Tensor) -> Tensor:
        return t.reshape(n, -1).norm(dim=1).cpu()

    check_finite_tensor(fn, hL, "h_L (the forward pass overflowed)")
    check_finite_tensor(fn, u, "the first-order term sum_i lam_i F_i(h_0) (overflow)")
    check_finite_tensor(fn, second, "the second-order term (overflow)")
    h0d, hLd, e1 = h0.double(), hL.double(), h0.double() + u.double()
    e2 = e1 + second.double()
    res = ExpansionResult(
        delta_norm=nrm(hLd - h0d), remainder1=nrm(hLd - e1), remainder2=nrm(hLd - e2),
        first_term_norm=nrm(u.double()), second_term_norm=nrm(second.double()),
        delta_mean=0.0, remainder1_mean=0.0, remainder2_mean=0.0, scales=lams,
        lam=max(abs(s) for s in lams), num_blocks=len(infos), num_samples=n)
    res.delta_mean = float(res.delta_norm.mean())
    res.remainder1_mean = float(res.remainder1.mean())
    res.remainder2_mean = float(res.remainder2.mean())
    return res


def _loglog_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, int]:
    pts = [(math.log(a), math.log(b)) for a, b in zip(xs, ys) if a > 0 and math.isfinite(b) and b > 0]
    if len(pts) < 2:
        return float("nan"), float("nan"), len(pts)
    t = torch.tensor(pts, dtype=torch.float64, device="cpu")                      # host floats: host math
    A = torch.stack([t[:, 0], torch.ones(len(pts), dtype=torch.float64, device="cpu")], dim=1)
    coef = torch.linalg.lstsq(A, t[:, 1:2]).solution.flatten()
    return float(coef[0]), float(coef[1]), len(pts)


def remainder_scaling(make_model: Callable[[float], nn.Module], lams: Sequence[float], x: Tensor) -> dict[str, Any]:
    """Remainders of the expansion against lam, with least-squares slopes on a log-log scale.

    For each lam, ``second_order_expansion(make_model(lam), x)``; the claim (docs/science.md section 3) is
    ``||h_L - E2|| = O(lam^3)`` (slope 3) and ``||h_L - E1|| = O(lam^2)`` (slope 2). Points with a
    zero or non-finite mean remainder are left out of a fit; fewer than 2 points give a NaN
    slope. ReLU branches are piecewise linear: the slope is 3 only while lam is small enough that
    the activation patterns along the stack stay those at h_0; float32 rounding flattens it at
    very small lam (use float64 models).

    Args:
        make_model: lam -> model (same architecture and weights for every lam, scale = lam).
        lams: at least 2 distinct positive lams.
        x: inputs [N, ...] for every model.

    Returns:
        dict with ``lams``, ``remainder1_mean``, ``remainder2_mean``, ``delta_mean`` (lists),
        ``slope`` (remainder 2 vs lam; expected 3), ``intercept``, ``slope_first_order``
        (expected 2), ``expected_slope`` (3.0) and ``num_fit_points``.
    """
    fn = "remainder_scaling"
    if not callable(make_model):
        raise TypeError(f"{fn}: expected make_model a callable lam -> model, got {type(make_model).__name__}")
    if isinstance(lams, (str, bytes)) or not isinstance(lams, Sequence):
        raise TypeError(f"{fn}: expected lams a sequence of positive numbers, got {type(lams).__name__}")
    vals = []
    for lam in lams:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam <= 0:
            raise ValueError(f"{fn}: expected lams positive finite numbers, got {lam!r}")
        vals.append(float(lam))
    if len(set(vals)) < 2:
        raise ValueError(f"{fn}: expected lams at least 2 distinct values, got {vals}")
    r1, r2, d = [], [], []
    for lam in vals:
        model = make_model(lam)
        check_type(fn, f"make_model({lam})", model, nn.Module, "to return an nn.Module")
        res = second_order_expansion(model, x)
        r1.append(res.remainder1_mean)
        r2.append(res.remainder2_mean)
        d.append(res.delta_mean)
    slope, intercept, npts = _loglog_fit(vals, r2)
    slope1, _, _ = _loglog_fit(vals, r1)
    return to_jsonable({"lams": vals, "remainder1_mean": r1, "remainder2_mean": r2, "delta_mean": d,
                        "slope": slope, "intercept": intercept, "slope_first_order": slope1,
                        "expected_slope": 3.0, "num_fit_points": npts})


# -- geometric complexity ------------------------------------------------------------------------
@dataclass
class GCResult(Result):
    """Geometric complexity GC = mean_x ||d f(x)/dx||_F^2 of the logits (docs/science.md section 3).

    Attributes:
        gc: the mean over samples (float64 accumulation). std: population std of the per-sample
            values; sem: std / sqrt(N). min, max: per-sample extremes.
        per_class: [C] float64, mean_x ||d f_c(x)/dx||^2 (sums to gc).
        num_samples (N), num_outputs (C), input_dim (numel of one input).
    """

    gc: float
    std: float
    sem: float
    min: float
    max: float
    per_class: Tensor
    num_samples: int
    num_outputs: int
    input_dim: int

    def summary(self) -> dict[str, float]:
        return {"gc": self.gc, "sem": self.sem}


def geometric_complexity(model: nn.Module, data: Any, *, batch_size: Optional[int] = None) -> GCResult:
    """GC = mean over samples of ||d f(x)/dx||_F^2, f = the model's logits (eval mode).

    Per-sample input-output Jacobians [C, numel(x)] by ``torch.func.vmap(jacrev)`` (C backward
    passes batched over samples; ``jacfwd`` when the input has fewer entries than C), streamed
    over the data, ``batch_size`` samples at a time.

    Args:
        model: maps x [n, ...] to logits [n, C] (a tensor).
        data: an (x, y) pair, a resgeom_fast Dataset (train split) or an iterable of (x, y) batches
            (a DataLoader); x on the model's device, in its dtype.
        batch_size: samples per Jacobian chunk (bounds memory: about batch_size * C * numel(x)
            entries); None = whole batches.

    Returns:
        a :class:`GCResult`.

    Raises:
        NonFiniteError: NaN / inf in a model parameter or buffer (named), in the inputs x of a
            batch, or in the Jacobians (overflow; the samples named).
    """
    fn = "geometric_complexity"
    check_module(fn, "model", model)
    device, dtype = model_device_dtype(fn, model)
    if batch_size is not None:
        check_int(fn, "batch_size", batch_size, 1)
    check_finite_parameters(fn, model)

    def f1(xi: Tensor) -> Tensor:
        out = model(xi.unsqueeze(0))
        if not isinstance(out, Tensor) or out.dim() != 2:
            raise ValueError(f"{fn}: expected the model to return logits [n, C], got "
                             f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        return out[0]

    vals: list[Tensor] = []
    per_class: Optional[Tensor] = None
    c_out = in_dim = 0
    with _eval_mode(model):
        for b, (x, _) in enumerate(batches(fn, data, device, dtype)):
            if not x.is_floating_point():
                raise ValueError(f"{fn}: expected floating-point inputs x, got {x.dtype}")
            check_finite_tensor(fn, x, f"the inputs x of batch {b}")
            if x.dim() < 2 or x.shape[0] == 0:
                raise ValueError(f"{fn}: expected x [n, ...] with n >= 1, got shape {tuple(x.shape)}")
            in_dim = math.prod(x.shape[1:])
            if not c_out:
                with torch.no_grad():
                    c_out = int(f1(x[0]).shape[0])
            jac = vmap(jacfwd(f1) if in_dim < c_out else jacrev(f1))
            step = batch_size or x.shape[0]
            for s in range(0, x.shape[0], step):
                J = jac(x[s:s + step]).detach().reshape(-1, c_out, in_dim).double()   # [n, C, d]
                check_finite_tensor(fn, J, f"the input-output Jacobians of samples {s}..{s + J.shape[0] - 1} "
                                           f"of batch {b} (parameters and x are finite: overflow)")
                sq = J.pow(2).sum(-1)                                                  # [n, C]
                vals.append(sq.sum(-1).cpu())
                pc = sq.sum(0).cpu()
                per_class = pc if per_class is None else per_class + pc
    v = torch.cat(vals)
    n = v.shape[0]
    assert per_class is not None
    std = float(v.std(correction=0))
    return GCResult(gc=float(v.mean()), std=std, sem=std / math.sqrt(n), min=float(v.min()), max=float(v.max()),
                    per_class=per_class / n, num_samples=n, num_outputs=c_out, input_dim=in_dim)


# -- output norm against depth -------------------------------------------------------------------
def _scale_label(fn: str, s: Any) -> tuple[str, Union[str, float]]:
    if isinstance(s, str):
        if s == "1":
            return "1", 1.0
        if s in ("1/L", "1/sqrt(L)"):
            return s, s
        raise ValueError(f"{fn}: expected scales entries in {list(OUTPUT_NORM_SCALES)} or floats >= 0, got {s!r}")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
        raise ValueError(f"{fn}: expected scales entries in {list(OUTPUT_NORM_SCALES)} or finite floats >= 0, "
                         f"got {s!r}")
    return f"{float(s):g}", float(s)


def output_norm_vs_depth(depths: Sequence[int], scales: Sequence[Union[str, float]] = OUTPUT_NORM_SCALES, *,
                         width: int = 64, in_dim: int = 64, seed: int = 0,
                         x: Optional[Tensor] = None) -> dict[str, Any]:
    """||h_L|| / ||h_0|| of FCResNets at initialisation against depth, for several branch scales.

    For each depth L and scale, ``FCResNet(in_dim, width, L, 10, scale=..., norm="none", seed=seed)``
    (kaiming init, identity skips) is built in float64 (lam = 1 overflows float32 near L = 160) and
    run on x; per sample r = ||h_L|| / ||h_0||. Mean-field reference (our derivation for kaiming
    init and zero biases: E||F(h)||^2 = 2 ||h||^2, E<h, F(h)> = 0): E||h_L||^2 / ||h_0||^2 =
    (1 + 2 lam^2)^L, so the RMS ratio is about (1 + 2 lam^2)^(L/2): 3^(L/2) for lam = 1, tending to
    e for lam = 1/sqrt(L) and to 1 for lam = 1/L.

    Args:
        depths: positive ints. scales: entries "1", "1/sqrt(L)", "1/L" or floats >= 0.
        width, in_dim: of the nets. seed: weights (the same seed at every depth) and the default x.
        x: inputs [N, in_dim] float64 (CPU); None draws N = 256 standard Gaussian inputs from seed.

    Returns:
        dict with ``depths``, ``scales`` (labels), ``lams`` {label: [lam per depth]},
        ``mean`` / ``std`` / ``rms`` {label: [ratio per depth]} (float64; inf -> None in JSON),
        ``mean_field`` {label: [(1 + 2 lam^2)^(L/2)]}, ``width``, ``in_dim``, ``num_samples``, ``seed``.
    """
    fn = "output_norm_vs_depth"
    if isinstance(depths, (str, bytes)) or not isinstance(depths, Sequence) or len(depths) == 0:
        raise ValueError(f"{fn}: expected depths a non-empty sequence of positive ints, got {depths!r}")
    ds = [check_int(fn, "depths entries", d, 1) for d in depths]
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or len(scales) == 0:
        raise ValueError(f"{fn}: expected scales a non-empty sequence, got {scales!r}")
    specs = [_scale_label(fn, s) for s in scales]
    check_int(fn, "width", width, 1)
    check_int(fn, "in_dim", in_dim, 1)
    check_int(fn, "seed", seed, 0)
    if x is None:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(256, in_dim, generator=gen, dtype=torch.float64, device="cpu")   # CPU by contract
    elif not isinstance(x, Tensor):
        raise TypeError(f"{fn}: expected x a torch.Tensor or None, got {type(x).__name__}")
    elif x.dtype != torch.float64 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != in_dim or x.shape[0] == 0:
        raise ValueError(f"{fn}: expected x a float64 CPU tensor [N, {in_dim}] with N >= 1, got "
                         f"{x.dtype} {tuple(x.shape)} on {x.device}")
    out: dict[str, Any] = {"depths": ds, "scales": [lab for lab, _ in specs], "lams": {}, "mean": {}, "std": {},
                           "rms": {}, "mean_field": {}, "width": width, "in_dim": in_dim,
                           "num_samples": int(x.shape[0]), "seed": seed}
    for lab, spec in specs:
        for key in ("lams", "mean", "std", "rms", "mean_field"):
            out[key][lab] = []
        for L in ds:
            model = FCResNet(in_dim, width, L, 10, scale=spec, norm="none", seed=seed).double().eval()
            lam = float(model.blocks[0].scale)
            with torch.no_grad():
                _, hs = model(x, return_hidden=True)
            r = hs[-1].norm(dim=1) / hs[0].norm(dim=1)
            out["lams"][lab].append(lam)
            out["mean"][lab].append(float(r.mean()))
            out["std"][lab].append(float(r.std(correction=0)))
            out["rms"][lab].append(float(r.pow(2).mean().sqrt()))
            out["mean_field"][lab].append(math.exp(0.5 * L * math.log1p(2 * lam * lam)))
    return to_jsonable(out)


def plot_output_norms(result_dict: dict[str, Any], ax: Any = None, *, at: str = "") -> Any:
    """Mean ||h_L|| / ||h_0|| against depth, one line per scale (log-log; from ``result_dict["mean"]``,
    the dict of :func:`output_norm_vs_depth`, or a results dict holding it at the path ``at``).

    Missing (None / non-finite) values are gaps. Returns the Figure.
    """
    where = "plot_output_norms: expected result_dict the dict of output_norm_vs_depth"
    if not isinstance(result_dict, dict):
        raise TypeError(where)
    try:
        d = get_path(result_dict, at) if at else result_dict
    except (KeyError, IndexError, ValueError, TypeError):
        raise TypeError(f"{where} at {at!r}") from None
    if not isinstance(d, dict) or not all(k in d for k in ("depths", "scales", "mean")):
        raise TypeError(where)
    fig, ax = figure_axes(ax, (5, 3.5))
    for lab in d["scales"]:
        if "." in str(lab):  # a key with a dot (lam = 0.5) has no path: drawn untagged, the same numbers
            ax.plot(d["depths"], [math.nan if v is None else v for v in d["mean"][lab]], marker="o", ms=3.5,
                    label=f"lam = {lab}")
        else:
            lines(ax, result_dict, [(f"lam = {lab}", join(at, "depths"), join(at, f"mean.{lab}"))], legend=False)
    ax.set_xscale("log", nonpositive="mask")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("depth L")
    ax.set_ylabel("mean ||h_L|| / ||h_0|| at init")
    ax.set_title("output norm against depth (FCResNet, no norm)")
    ax.legend()
    return fig
