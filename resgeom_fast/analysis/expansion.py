"""Residual expansion (docs/science.md section 3, Dherin & Munn 2025, "On residual network depth").

For a plain stack of residual blocks ``h_l = post_l(Q_l h_{l-1} + lam_l F_l(h_{l-1}))`` (l = 1..L):

- :func:`path_expansion`: the path-order decomposition of the linearised stack (our tool). With
  J_l = dF_l/dh at h_{l-1}(x_b), P_l = d post_l/dz at the block's sum z_l (the identity without a
  post-activation) and c_0^(0) = v, the recursion
  ``c_l^(m) = P_l (Q_l c_{l-1}^(m) + lam_l J_l c_{l-1}^(m-1))`` splits the Jacobian-vector product
  ``d h_L / d h_0 v`` by path order m (the number of residual branches a path passes through):
  ``sum_{m=0..L} c_L^(m) = d h_L / d h_0 v``. Every path is gated by all the post Jacobians, so
  with posts order 0 is ``prod_l P_l Q_l v``, not v. Blocks may change shape (staged nets).
  Reports ||c_L^(m)|| (m = 0..M), the normalised path-order distribution and the mean path order.
- :func:`plain_runs`: the maximal runs of consecutive blocks forming plain stacks (block l's
  output is block l+1's input), each a valid ``blocks=`` of :func:`path_expansion`.
- :func:`second_order_expansion` / :func:`remainder_scaling`: h_L against its second-order
  Taylor expansion in lam, ``E2 = h_0 + lam sum_i F_i(h_0) + lam^2 sum_{i<j} DF_j(h_0) F_i(h_0)``,
  and the log-log slope of the remainder against lam (expected 3). They need identity skips, no
  post-activation and one shape (a plain Type-1 stack) and refuse anything else.
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
from resgeom_fast.core.modules import attention_math, module_mode
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
    "plain_runs",
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


def _stack_inputs(fn: str, model: nn.Module, x: Any) -> tuple[list[BlockInfo], list[Tensor]]:
    """Checked x (floating point, the model's device / dtype), not hyper-residual; every block and
    its captured, finite input."""
    _check_x(fn, model, x)
    if not x.is_floating_point():
        raise ValueError(f"{fn}: expected floating-point x, got {x.dtype}")
    _check_not_hyper(fn, model)
    infos = residual_blocks(model)
    hs = block_inputs(model, x, infos)
    _check_states(fn, infos, hs)
    return infos, hs


def _scale_value(info: BlockInfo) -> float:
    s = info.scale
    return float(s.detach()) if isinstance(s, Tensor) else float(s)


def _check_stack(fn: str, model: nn.Module, infos: Sequence[BlockInfo],
                 shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[int]:
    """Type 1 shapes, identity posts and consecutive blocks (the Taylor expansion in lam of
    :func:`second_order_expansion`; :func:`path_expansion` only needs :func:`_check_consecutive`)."""
    for info, (s_in, s_out) in zip(infos, shapes):
        if s_in != s_out:
            raise ValueError(
                f"{fn}: block {info.name!r} maps per-sample shape {s_in} to {s_out}; the expansion in lam "
                "needs a Type-1 stack where every h_l has one shape. For staged ResNets analyse one stage "
                "at a time: pass blocks= a run of consecutive equal-shape blocks (path_expansion handles "
                "shape-changing blocks)")
        if not isinstance(info.post, nn.Identity):
            raise ValueError(
                f"{fn}: block {info.name!r} applies post = {type(info.post).__name__} after the sum; the "
                "expansion in lam needs h_l = Q_l h_{l-1} + lam_l F_l(h_{l-1}) with no post-activation (an "
                "activation after the addition is not a plain residual stack; path_expansion linearises "
                "post-activations, the Taylor expansion in lam does not)")
    return _check_consecutive(fn, model, infos)


def _check_consecutive(fn: str, model: nn.Module, infos: Sequence[BlockInfo]) -> list[int]:
    """The blocks are consecutive residual blocks of ``model`` in its block order; returns their
    indices in ``residual_blocks(model)`` (by ``BlockInfo.index`` where the block found there has
    the same name and kind, else by the block module)."""
    found = residual_blocks(model)
    order = {id(b.block): i for i, b in enumerate(found)}
    idx: list[Optional[int]] = []
    for info in infos:
        i = info.index
        if 0 <= i < len(found) and found[i].name == info.name and found[i].kind == info.kind:
            idx.append(i)
        else:
            idx.append(order.get(id(info.block)))
    if any(i is None for i in idx) or any(b != a + 1 for a, b in zip(idx, idx[1:])):  # type: ignore[operator]
        raise ValueError(f"{fn}: blocks must be consecutive residual blocks of the model in order, got "
                         f"block indices {idx}")
    return [int(i) for i in idx]  # type: ignore[arg-type]


def _close(a: Tensor, b: Tensor) -> bool:
    """``a`` equals ``b`` to rounding of one recomputed forward pass (same shape; 1e3 eps relative
    to max |b|, at least 1e3 eps absolute)."""
    if a.shape != b.shape:
        return False
    tol = 1e3 * torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=tol, atol=tol * max(scale, 1.0)))


def _block_outputs(infos: Sequence[BlockInfo], hs: Sequence[Tensor]) -> list[Tensor]:
    """block_l(h_{l-1}) for each block (eval mode, no grad, in-place activations off)."""
    outs = []
    with torch.no_grad():
        for info, h in zip(infos, hs):
            with _eval_mode(info.block):
                outs.append(info.block(h))
    return outs


def _chain_breaks(infos: Sequence[BlockInfo], hs: Sequence[Tensor], outs: Sequence[Tensor]) -> list[int]:
    """Positions i where block i's output is not block i+1's captured input."""
    return [i for i in range(len(infos) - 1) if not _close(outs[i], hs[i + 1])]


def _runs(idx: Sequence[int], breaks: Sequence[int]) -> list[list[int]]:
    """The maximal runs of the block indices ``idx`` between the breaks."""
    runs: list[list[int]] = [[]]
    for i, b in enumerate(idx):
        runs[-1].append(int(b))
        if i in breaks:
            runs.append([])
    return runs


def _check_chain(fn: str, infos: Sequence[BlockInfo], hs: Sequence[Tensor], idx: Sequence[int]) -> Tensor:
    """Each block's output on its captured input is the next block's input; returns the last output."""
    return _chain_outputs(fn, infos, hs, idx)[-1]


def _chain_outputs(fn: str, infos: Sequence[BlockInfo], hs: Sequence[Tensor], idx: Sequence[int]) -> list[Tensor]:
    """block_l(h_{l-1}) of every block, after checking that each is the next block's input
    (``idx``: the blocks' indices in the model, for the message).

    Every break is found before raising: the error names each pair of blocks that breaks the chain
    and the maximal runs that form plain stacks (pass one as ``blocks=``; :func:`plain_runs`).
    """
    outs = _block_outputs(infos, hs)
    breaks = _chain_breaks(infos, hs, outs)
    if breaks:
        pairs = ", ".join(f"{infos[i].name!r} -> {infos[i + 1].name!r}" for i in breaks)
        runs = _runs(idx, breaks)
        raise ValueError(
            f"{fn}: the output of block {infos[breaks[0]].name!r} is not the input of block "
            f"{infos[breaks[0] + 1].name!r}; the expansion needs a plain stack h_l = block_l(h_{{l-1}}) "
            f"(nothing between blocks, no hyper-residual connections). The chain breaks between {pairs}; "
            f"the plain runs are blocks={runs} (pass one as blocks=; plain_runs(model, x) lists them)")
    return outs


def _sum_points(fn: str, infos: Sequence[BlockInfo], hs: Sequence[Tensor],
                outs: Sequence[Tensor]) -> list[Tensor]:
    """z_l = Q_l h_{l-1} + lam_l F_l(h_{l-1}) per block, checked: post_l(z_l) == block_l(h_{l-1})."""
    zs = []
    with torch.no_grad():
        for info, h, out in zip(infos, hs, outs):
            with _eval_mode(info.block), _eval_mode(info.skip), _eval_mode(info.branch), _eval_mode(info.post):
                z = info.skip(h) + _scale_value(info) * info.branch(h)
                y = info.post(z)
            if not _close(y, out):
                raise ValueError(
                    f"{fn}: block {info.name!r} ({info.kind}) does not compute post(skip(h) + scale * branch(h)) "
                    f"with its post = {type(info.post).__name__}, skip = {type(info.skip).__name__}, scale = "
                    f"{_scale_value(info):g}: the residual decomposition the expansion linearises is not the "
                    "block's map (declare the block with mark_residual_block(branch=, skip=, scale=, post=))")
            zs.append(z)
    return zs


_LINEAR_SKIPS = (nn.Identity, ZeroSkip, OrthogonalSkip, ScaledIdentity)


def _apply_skip(skip: nn.Module, h: Tensor, C: Tensor, in_shape: tuple[int, ...],
                out_shape: tuple[int, ...]) -> Tensor:
    """Q_l C for C [N, D_in, k] -> [N, D_out, k]: the skip itself where it is linear, its
    linearisation at h (torch.func.jvp: e.g. a conv + BatchNorm downsample, affine in eval mode) otherwise."""
    n, _, k = C.shape
    d_out = math.prod(out_shape)
    if isinstance(skip, nn.Identity):
        return C
    if k == 0:
        return C.new_zeros((n, d_out, 0))
    with torch.no_grad(), _eval_mode(skip):
        if isinstance(skip, _LINEAR_SKIPS):
            z = C.permute(0, 2, 1).reshape(n * k, *in_shape)
            return skip(z).reshape(n, k, d_out).permute(0, 2, 1)

        return _chunked_jvp(skip, h, C, in_shape, d_out)


def _apply_post(post: nn.Module, z: Tensor, C: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """P_l C = d post / dz at z_l (the sum before the post) on C [N, D_z, k] -> [N, D_out, k], by
    torch.func.jvp of the post module (exact for any post: elementwise activations, ViT's MLP
    sublayer, ...); C itself for an identity post."""
    if isinstance(post, nn.Identity):
        return C
    n, _, k = C.shape
    d_out = math.prod(out_shape)
    if k == 0:
        return C.new_zeros((n, d_out, 0))
    with torch.no_grad(), _eval_mode(post):
        return _chunked_jvp(post, z, C, tuple(z.shape[1:]), d_out)


_JVP_CHUNK_BYTES = 256 * 2**20


def _chunked_jvp(module: nn.Module, at: Tensor, C: Tensor, in_shape: tuple[int, ...], d_out: int) -> Tensor:
    """The JVP of ``module`` at ``at`` [N, *in_shape] on the k columns of C [N, D_in, k] -> [N, d_out, k]
    (vmap over the columns), a chunk of samples at a time (about 256 MiB of tangents per chunk), with
    scaled-dot-product attention on its math kernel and MHA's fast path off
    (:func:`resgeom_fast.core.modules.attention_math`: the fused kernels have no forward-mode AD)."""
    n, d_in, k = C.shape
    per = max(d_in, d_out) * k * C.element_size()
    cs = max(1, min(n, _JVP_CHUNK_BYTES // max(per, 1)))
    out = C.new_empty((n, d_out, k))
    with attention_math():     # forward-mode AD through attention: the math kernel, MHA's slow path
        for s0 in range(0, n, cs):
            s1 = min(n, s0 + cs)
            t = C[s0:s1].permute(2, 0, 1).reshape(k, s1 - s0, *in_shape)
            a = at[s0:s1]
            y = vmap(lambda u: jvp(module, (a,), (u,))[1])(t)
            out[s0:s1] = y.reshape(k, s1 - s0, d_out).permute(1, 2, 0)
    return out


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
        block_names, scales (lam_l), skips (type names of Q_l), posts (type names of the
            post-activations whose Jacobians P_l gate every path; "Identity" for none).
        in_shape, out_shape: the per-sample shapes of h_0 (the probe v) and of h_L (every c_L^(m));
            they differ when the run has shape-changing blocks (a stage's downsampling block).
        num_undefined: samples x probes with every c_L^(m) = 0 (p_m undefined: left out of
            distribution and mean_order). note: None, or why some / all of them are undefined.
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
    posts: list[str]
    in_shape: list[int]
    out_shape: list[int]
    num_undefined: int
    note: Optional[str]
    norms: Tensor = field(repr=False, default_factory=lambda: torch.empty(0, device="cpu"))

    _exclude = ("norms",)

    def summary(self) -> dict[str, float]:
        """Mean path order, the most weighted order, the relative tail beyond M and L (NaN where
        undefined: every probe mapped to 0, see ``note``)."""
        tail_rel = self.tail_norm_mean / self.total_norm_mean if self.total_norm_mean > 0 else float("nan")
        mode = (float(int(self.distribution.argmax())) if bool(torch.isfinite(self.distribution).all())
                else float("nan"))
        return {"mean_order": float(self.mean_order), "mode_order": mode,
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
    """The recursion of :func:`path_expansion`: ([c_L^(m) [N, D_L, P] or None (= 0)] for m = 0..M,
    the all-order sum d h_L / d h_0 v [N, D_L, P], c_0 = v [N, D_0, P], the blocks), model dtype."""
    orders, total, c0, infos, _ = _path_recursion(fn, model, x, max_order, v=v, blocks=blocks,
                                                  num_probes=num_probes, seed=seed)
    return orders, total, c0, infos


def _path_recursion(fn: str, model: nn.Module, x: Tensor, max_order: Optional[int], *, v: Optional[Tensor],
                    blocks: Optional[Sequence[Any]], num_probes: int, seed: int
                    ) -> tuple[list[Optional[Tensor]], Tensor, Tensor, list[BlockInfo],
                               tuple[tuple[int, ...], tuple[int, ...]]]:
    """:func:`_path_coefficients` and the per-sample shapes (of h_0, of h_L)."""
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
    idx = _check_consecutive(fn, model, infos)
    hs = [op.h for op in ops]
    _check_states(fn, infos, hs)
    outs = _chain_outputs(fn, infos, hs, idx)
    zs = _sum_points(fn, infos, hs, outs)
    L = len(ops)
    M = L if max_order is None else check_int(fn, "max_order", max_order, 0, L, hint=" (the number of blocks)")
    n = x.shape[0]
    c0 = _probes(fn, v, n, ops[0].in_shape, num_probes, seed, hs[0].dtype, hs[0].device)      # [N, D_0, P]
    P = c0.shape[-1]
    orders: list[Optional[Tensor]] = [c0] + [None] * M      # c^(m) [N, D_l, P]; None = exactly zero
    total = c0
    for l, (op, info) in enumerate(zip(ops, infos), start=1):
        lam = _scale_value(info)
        z_shape, out_shape = tuple(zs[l - 1].shape[1:]), tuple(outs[l - 1].shape[1:])
        live = [m for m in range(min(l - 1, M - 1) + 1) if orders[m] is not None]   # feed order m + 1
        kept = [m for m in range(min(l - 1, M) + 1) if orders[m] is not None]
        # Q_l on every live order and the total, in one call (nothing to do for identity skips)
        q_in = torch.cat([orders[m] for m in kept] + [total], dim=2)
        q_out = _apply_skip(info.skip, op.h, q_in, op.in_shape, z_shape)
        j_in = torch.cat([orders[m] for m in live] + [total], dim=2)
        with attention_math():     # the generic J V is a forward-mode JVP: attention on its math kernel
            j_out = op.matmat(j_in) * lam
        pre: list[Optional[Tensor]] = [None] * (M + 1)
        for i, m in enumerate(kept):
            pre[m] = q_out[:, :, i * P:(i + 1) * P]
        for i, m in enumerate(live):
            add = j_out[:, :, i * P:(i + 1) * P]
            pre[m + 1] = add if pre[m + 1] is None else pre[m + 1] + add
        # P_l (the post's Jacobian at z_l) on every nonzero order and the total, in one call
        nz = [m for m in range(M + 1) if pre[m] is not None]
        p_out = _apply_post(info.post, zs[l - 1],
                            torch.cat([pre[m] for m in nz] + [q_out[:, :, -P:] + j_out[:, :, -P:]], dim=2),
                            out_shape)
        new: list[Optional[Tensor]] = [None] * (M + 1)
        for i, m in enumerate(nz):
            new[m] = p_out[:, :, i * P:(i + 1) * P]
        total = p_out[:, :, -P:]
        check_finite_tensor(fn, total, f"d h_l / d h_0 v after block {info.name!r} (the linearised stack "
                                       f"overflowed)")
        orders = new
    return orders, total, c0, infos, (tuple(ops[0].in_shape), tuple(outs[-1].shape[1:]))


def path_expansion(model: nn.Module, x: Tensor, max_order: Optional[int] = None, *, v: Optional[Tensor] = None,
                   blocks: Optional[Sequence[Any]] = None, num_probes: int = 1, seed: int = 0) -> PathExpansionResult:
    """Split the linearised residual stack's JVP ``d h_L / d h_0 v`` by path order (docs/science.md section 3).

    A block computes ``h_l = post_l(z_l)``, ``z_l = Q_l h_{l-1} + lam_l F_l(h_{l-1})``. At each input
    x_b the stack is linearised: J_l = dF_l/dh at h_{l-1}(x_b) (the residual-branch Jacobians of
    :func:`resgeom_fast.operators.residual_jacobians`, eval mode), Q_l the block's skip (applied as
    a module where it is linear -- Identity, ZeroSkip, OrthogonalSkip, ScaledIdentity --, through
    its JVP at h_{l-1} otherwise, e.g. a conv + BatchNorm downsample), P_l = d post_l / dz at z_l
    (torch.func.jvp of the post module: exact for any post, an elementwise ReLU / GELU as well as
    a transformer's MLP sublayer; the identity when post is Identity), lam_l the block's scale. Then

        ``c_l^(m) = P_l (Q_l c_{l-1}^(m) + lam_l J_l c_{l-1}^(m-1))``, ``c_0^(0) = v``, m = 0..M,

    and ``sum_{m=0..L} c_L^(m) = d h_L / d h_0 v`` exactly (the chain rule through every block).
    Order m collects the paths through exactly m residual branches and L - m skips; with
    post-activations every path, whichever branches it takes, is gated by the post Jacobians of all
    L blocks (P_l multiplies both terms), so order 0 is ``P_L Q_L ... P_1 Q_1 v`` -- the skips'
    linear path through the ReLU masks, no longer v itself -- and order m is not a Taylor order
    in lam (P_l depends on the branches through z_l). Without posts (P_l = I) and identity skips,
    order 0 is v and order m is lam^m times the sum over m-subsets of branch Jacobian products.

    Blocks may change shape (the first block of a stage: strided branch, downsampling skip): the
    coefficients change shape along the stack, from h_0's (of v) to h_L's; the result records
    ``in_shape`` and ``out_shape``. Each J_l, Q_l and P_l is applied once to all live orders
    (c_{l-1}^(m) = 0 for m >= l) and to the all-order sum, as one batched product of at most
    P (M + 1) columns.

    Checked before any product: the blocks are consecutive blocks of the model and chain (block l's
    output on its captured input is block l+1's input: a plain stack, nothing between blocks; the
    error names every break and the plain runs, see :func:`plain_runs`), and each block computes
    ``post(skip(h) + scale * branch(h))`` to rounding (else the decomposition linearised here is
    not the block's map).

    Args:
        model: a model whose (selected) blocks form a plain stack: h_l = block_l(h_{l-1}), no
            hyper-residual connections. Posts and shape changes are allowed.
        x: inputs [N, ...] on the model's device, in its dtype.
        max_order: M in [0, L] (default L = number of blocks analysed).
        v: the probe: None (a random unit vector per sample and probe, float64-drawn from ``seed``,
            cast to the model dtype), or a tensor [N, *h_shape] / [N, D] (per sample) or
            [*h_shape] / [D] (shared), h_shape that of h_0, used as given (not normalised);
            requires ``num_probes=1``.
        blocks: None (all blocks), or a run of consecutive chained blocks (indices, modules or
            BlockInfo s, as in ``residual_jacobians``; e.g. an entry of :func:`plain_runs`): h_0 is
            then the first one's input.
        num_probes: P random probes per sample; statistics pool samples and probes.
        seed: seed of the random probes.

    Returns:
        a :class:`PathExpansionResult`: ||c_L^(m)|| per sample and probe (float64) and their
        statistics. Our reading of "path-length distribution": p_m = ||c_L^(m)|| / sum_m' ||c_L^(m')||
        per sample and probe (norms, not squared norms; orders m <= M only), then averaged over
        the samples and probes where it is defined (some c_L^(m) != 0; ``num_undefined`` counts the
        others, e.g. a probe every post-ReLU unit switches off; all undefined: NaN, None in JSON,
        with the reason in ``note``).

    Raises:
        ValueError for hyper-residual nets, blocks that are not consecutive or do not chain (the
        breaks and the plain runs named), a block whose forward is not post(skip + scale branch),
        bad x / v.
        NonFiniteError (a ValueError) naming a model parameter / buffer or x holding NaN / inf
        (checked before any work), or the block whose input or linearised output overflowed.
    """
    fn = "path_expansion"
    orders, total, c0, infos, (in_shape, out_shape) = _path_recursion(
        fn, model, x, max_order, v=v, blocks=blocks, num_probes=num_probes, seed=seed)
    L, M = len(infos), len(orders) - 1
    n, P = c0.shape[0], c0.shape[-1]
    zeros = torch.zeros(n, P, dtype=torch.float64, device=c0.device)
    norms = torch.stack([zeros if c is None else c.double().norm(dim=1) for c in orders], dim=-1)  # [N, P, M+1]
    partial = sum((c.double() for c in orders if c is not None), torch.zeros_like(total, dtype=torch.float64))
    tail = (total.double() - partial).norm(dim=1)
    norm_sum = norms.sum(dim=-1, keepdim=True)
    defined = (norm_sum > 0).flatten().cpu()                     # [N * P]: some order is nonzero
    dist = norms / norm_sum.clamp_min(torch.finfo(torch.float64).tiny)
    m_idx = torch.arange(M + 1, dtype=torch.float64, device=norms.device)
    mean_order = (dist * m_idx).sum(-1).flatten().cpu()[defined]
    flat = norms.reshape(-1, M + 1).cpu()
    dflat = dist.reshape(-1, M + 1).cpu()[defined]
    undefined = int((~defined).sum())
    note = None
    if undefined == defined.numel():
        note = (f"every c_L^(m) is 0 for all {undefined} samples x probes (the linearised stack maps the probes "
                "to 0, e.g. every unit after a post-ReLU is off): the path-order distribution is undefined")
    elif undefined:
        note = (f"{undefined} of {defined.numel()} samples x probes have every c_L^(m) = 0 (the linearised "
                "stack maps the probe to 0): left out of distribution and mean_order")

    def mean_std(t: Tensor) -> tuple[Tensor, Tensor]:
        if t.shape[0] == 0:
            nan = torch.full(t.shape[1:], float("nan"), dtype=torch.float64)
            return nan, nan.clone()
        return t.mean(0), t.std(0, correction=0)

    d_mean, d_std = mean_std(dflat)
    mo_mean, mo_std = mean_std(mean_order.unsqueeze(-1))
    return PathExpansionResult(
        orders=torch.arange(M + 1, device="cpu"), norms_mean=flat.mean(0), norms_std=flat.std(0, correction=0),
        distribution=d_mean, distribution_std=d_std,
        mean_order=float(mo_mean[0]), mean_order_std=float(mo_std[0]),
        total_norm_mean=float(total.double().norm(dim=1).mean()), tail_norm_mean=float(tail.mean()),
        input_norm_mean=float(c0.double().norm(dim=1).mean()), num_blocks=L, max_order=M, num_samples=n,
        num_probes=P, seed=seed, block_names=[i.name for i in infos], scales=[_scale_value(i) for i in infos],
        skips=[type(i.skip).__name__ for i in infos], posts=[type(i.post).__name__ for i in infos],
        in_shape=list(in_shape), out_shape=list(out_shape), num_undefined=undefined, note=note,
        norms=norms.cpu())


def plain_runs(model: nn.Module, x: Tensor) -> list[list[int]]:
    """The maximal runs of consecutive residual blocks of ``model`` that form plain stacks at ``x``.

    Blocks l and l+1 (in ``residual_blocks(model)`` order) are in one run when block l's output on
    its input equals block l+1's input (to rounding) for every sample of x: nothing sits between
    them. Non-residual layers between residual blocks (MobileNetV2's inverted residuals without a
    skip, ConvNeXt's downsampling layers, a stem or a pooling) split the stack into runs; a
    torchvision / timm ResNet, whose stage-opening blocks are blocks too, is one run. Each run can
    be passed as ``blocks=`` to :func:`path_expansion` (which also checks each block computes
    post(skip + scale branch)).

    Args:
        model: a model whose blocks :func:`resgeom_fast.operators.residual_blocks` finds (no
            hyper-residual net).
        x: inputs [N, ...] on the model's device, in its dtype (one eval-mode forward pass).

    Returns:
        the runs, in block order, as lists of block indices (``residual_blocks(model)[i]``); every
        block is in exactly one run (a block chained to neither neighbour is a run of one).

    Raises:
        ValueError: no blocks, a hyper-residual net, bad x; NonFiniteError naming a non-finite
        parameter / buffer / x or the block whose input overflowed.
    """
    fn = "plain_runs"
    infos, hs = _stack_inputs(fn, model, x)
    return _runs(range(len(infos)), _chain_breaks(infos, hs, _block_outputs(infos, hs)))


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
    infos, hs = _stack_inputs(fn, model, x)
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
    idx = _check_stack(fn, model, infos, shapes)
    hL = _check_chain(fn, infos, hs, idx)
    lams = [_scale_value(i) for i in infos]
    with torch.no_grad():
        u = torch.zeros_like(h0)          # sum_{i<j} lam_i F_i(h_0)
        second = torch.zeros_like(h0)
        for lam, info in zip(lams, infos):
            with _eval_mode(info.branch):
                if lam != 0.0 and bool((u != 0).any()):
                    with attention_math():     # forward-mode AD through attention
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
