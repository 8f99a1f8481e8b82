"""Randomized SVD (range finder with power iterations, or block Krylov) of batched operators,
with an a-posteriori error bound on every singular value and an adaptive mode that iterates to
a tolerance."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.linalg._util import apply_block, check_choice, check_int, gaussian, generator
from resgeom_fast.linalg.operator import aslinearoperator

METHODS = ("subspace", "block_krylov")
SKETCHES = ("shared", "independent")
DEFAULT_TOL = 1e-3
DEFAULT_MAX_ITERS = 50


@dataclass
class SVDResult:
    """Top-k singular triplets per problem: ``A ~ U diag(S) V^T``, with their accuracy.

    Attributes:
        U: [*batch, m, k]; S: [*batch, k] descending; V: [*batch, n, k] (the operator's dtype).
        matvecs: operator applications (columns, A and A^T together) per problem, including the
            block that measures the residuals.
        residuals: [*batch, k] float64, r_i = sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2).
        error_bound: [*batch, k] float64, b_i = r_i / sqrt(2) + rounding (see
            :func:`randomized_svd`): an absolute bound on the error of s_i.
        rel_error_bound: [*batch, k] float64, b_i / s_i (inf where s_i = 0).
        converged: [*batch] bool, every triplet of the problem met ``tol`` (or sits at the
            operator's rounding level).
        iterations: power iterations (Krylov steps) done.
        tol: the relative tolerance the flags refer to. adaptive: whether power_iters was "auto".
        rounding: [*batch] float64, the allowance for the operator's own floating-point error
            included in error_bound.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    matvecs: int
    residuals: Optional[Tensor] = None
    error_bound: Optional[Tensor] = None
    rel_error_bound: Optional[Tensor] = None
    converged: Optional[Tensor] = None
    iterations: int = 0
    tol: float = DEFAULT_TOL
    adaptive: bool = False
    rounding: Optional[Tensor] = None

    @property
    def max_rel_error_bound(self) -> float:
        """Largest relative error bound over all problems and triplets (inf if some s_i = 0)."""
        if self.rel_error_bound is None:
            return math.nan
        return float(self.rel_error_bound.max())

    @property
    def all_converged(self) -> bool:
        """Whether every problem met ``tol``."""
        return bool(self.converged.all()) if self.converged is not None else False

    def to_dict(self) -> dict:
        def fin(t: Optional[Tensor]):
            if t is None:
                return None
            return [v if math.isfinite(v) else None for v in t.double().flatten().tolist()]

        return {"S": self.S.tolist(), "matvecs": self.matvecs, "iterations": self.iterations,
                "adaptive": self.adaptive, "tol": self.tol,
                "residuals": fin(self.residuals), "error_bound": fin(self.error_bound),
                "rel_error_bound": fin(self.rel_error_bound),
                "max_rel_error_bound": (self.max_rel_error_bound
                                        if math.isfinite(self.max_rel_error_bound) else None),
                "converged": self.converged.flatten().tolist() if self.converged is not None else None,
                "all_converged": self.all_converged}


def _orth(Y: Tensor) -> Tensor:
    """Orthonormalise [*batch, r, c] blocks with the compiled CholeskyQR3 op."""
    r, c = Y.shape[-2:]
    return ops.orthonormalize(Y.reshape(-1, r, c)).reshape(Y.shape)


def _cheap_cond_limit(r: int, dtype: torch.dtype) -> float:
    """Largest condition number of an [r, c] block for which one Cholesky QR with the Gram matrix
    formed in ``dtype`` still gives a basis of condition <= sqrt(3): the Gram matrix's rounding,
    ~sqrt(r) eps ||Y||^2 (blocked BLAS summation), perturbs Q^T Q = I + R^-T dG R^-1 by at most
    sqrt(r) eps kappa^2, kept <= 1/2 (float32 at r = 802816: ~66; float64: ~4e6)."""
    return math.sqrt(0.5 / (math.sqrt(max(r, 1)) * float(torch.finfo(dtype).eps)))


def _inverse_factor(G: Tensor, limit: float) -> Optional[Tensor]:
    """R^-1 [*, c, c] (float64) of the upper Cholesky factor of float64 Gram matrices G = R^T R, or
    None when a factorisation fails (a rank-deficient block), R is not finite, or cond(R) > limit
    for some problem (the callers then take the compiled orthonormalisation)."""
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    if bool((info != 0).any()):
        return None
    sv = torch.linalg.svdvals(R)
    if not bool(torch.isfinite(sv).all()) or bool((sv[..., -1] * limit < sv[..., 0]).any()):
        return None
    eye = torch.eye(G.shape[-1], dtype=torch.float64, device=G.device).expand_as(R)
    return torch.linalg.solve_triangular(R, eye, upper=True)


def _normalise(Y: Tensor) -> Tensor:
    """A well-conditioned basis of span(Y) for the power iterations' intermediate blocks.

    In exact arithmetic the range finder's subspace after q iterations, span((A A^T)^q A Omega),
    does not depend on the bases of the intermediate blocks; they are normalised only so that
    floating point keeps every direction (sklearn's randomized_svd skips this for q <= 2, fbpca
    uses an LU). On the CPU one Cholesky QR does it: the Gram matrix by one BLAS product in Y's
    dtype, its Cholesky factor R in float64 and Q = Y R^-1 by one more product -- two reads of Y
    instead of the ~nine of the compiled CholeskyQR3 (0.22 s vs 0.87 s on four [802816, 20]
    float32 blocks here). Q spans span(Y) for any invertible R; the condition of Q stays below
    sqrt(3) while cond(Y) <= :func:`_cheap_cond_limit`, checked on R (exact: cond(R) = cond(Y)
    up to the Gram rounding). A block above the limit, a failed factorisation (a rank-deficient
    block, e.g. a zero operator) or any non-CPU block take the compiled op (:func:`_orth`), as
    does every block the Rayleigh-Ritz step reads, which must be orthonormal to working
    precision."""
    if Y.device.type != "cpu":
        return _orth(Y)    # one host decision per block would be a device sync; unmeasured on GPUs
    Rinv = _inverse_factor((Y.transpose(-1, -2) @ Y).double(), _cheap_cond_limit(Y.shape[-2], Y.dtype))
    return _orth(Y) if Rinv is None else Y @ Rinv.to(Y.dtype)


def _rayleigh_ritz(op, Q: Tensor, where: str, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """B^T = A^T Q and its thin SVD: returns (P = V, S) in float64 with all c columns, and for
    the first ``k`` only U = Q W [*, m, k] (in Q's dtype: its rounding, ~eps sqrt(c) s_i, lies
    inside the bounds' allowance eps sqrt(dim) s_1) and
    resid_T [*, k] = ||A^T u_i - s_i v_i|| (zero up to rounding: A^T U = B^T W = P S). Forming U
    and resid_T for the k wanted columns only saves ~0.6 s per SVD of four [802816, 20] blocks."""
    Bt = apply_block(op, Q, where, "in the Rayleigh-Ritz step", transpose=True)   # [*, n, c]
    return _ritz(Bt.double(), Q, None, k)


def _ritz(Btd: Tensor, Y: Tensor, M: Optional[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The triplets of B^T = Btd [*, n, c] (float64) = P S W^T, whose basis is Q = Y M (M None: the
    identity): (P, S) with all c columns, U = Q W [*, m, k] formed as Y (M W) in Y's dtype and
    resid_T = ||B^T w_i - s_i p_i|| for the first k."""
    P, S, Wh = _thin_svd(Btd, Y.dtype)
    Wk = Wh.transpose(-1, -2)[..., :k]
    U = Y @ (Wk if M is None else M @ Wk).to(Y.dtype)
    resid_T = (Btd @ Wk - P[..., :k] * S[..., :k].unsqueeze(-2)).norm(dim=-2)
    return P, S, U, resid_T


# largest condition of a block whose Rayleigh-Ritz step runs on it directly (see _rayleigh_ritz_implicit)
IMPLICIT_COND = 64.0


def _gram64(Y: Tensor) -> Tensor:
    """Y^T Y [*, c, c] in float64 of a float32 block [*, r, c], by row chunks of ~4 MiB converted in
    cache (no float64 copy of the block)."""
    c = Y.shape[-1]
    per = max(1, math.prod(Y.shape[:-2])) * c * 8
    rows = max(256, (4 << 20) // per)
    G = torch.zeros((*Y.shape[:-2], c, c), dtype=torch.float64, device=Y.device)
    for Yc in Y.split(rows, dim=-2):
        Yd = Yc.double()
        G += Yd.transpose(-1, -2) @ Yd
    return G


def _rayleigh_ritz_implicit(op, Y: Tensor, where: str, k: int):
    """The Rayleigh-Ritz step on span(Y) without an orthonormal basis of it (CPU, float32): Y = Q R
    with R the Cholesky factor of Y^T Y formed in float64 (exact products of the float32 entries,
    float64 sums), so Q = Y R^-1 is orthonormal to ~eps64 sqrt(r) cond(Y)^2 without being formed;
    B^T = A^T Q = (A^T Y) R^-1 and U = Q W = Y (R^-1 W). Replaces the compiled CholeskyQR3 of the
    last block (0.87 s of a resnet50 Bottleneck's 4.4 s SVD here) by one read of Y.

    The operator's float32 rounding of A^T Y is mixed by R^-1: at most cond(R) eps32 ||A|| per
    column, and U's by cond(R) eps32; both lie inside the bounds' allowance eps sqrt(dim) s_1 while
    cond(Y) <= min(IMPLICIT_COND, sqrt(dim)). The ``residuals`` of the result measure A^T u_i
    through Q (exact in float64 arithmetic), not through the rounded float32 U returned: at
    cond(Y) near the limit the true ||A^T u_i - s_i v_i|| of that U was measured up to 4.6x the
    reported one, still ~1% of ``error_bound``, which holds by its rounding allowance. Returns
    None (the caller orthonormalises Y with the compiled op) for another device or dtype, a failed
    factor (rank-deficient Y) or a worse conditioned block."""
    if Y.device.type != "cpu" or Y.dtype != torch.float32:
        return None
    G = _gram64(Y)
    # A^T Y is of size s_1 ||Y|| ~ s_1^2: outside float32's range for s_1 beyond ~1e+-19. Columns
    # of norms outside 2^+-20 are first scaled by a power of two (exact, per problem; the span,
    # hence the result, is unchanged), at the cost of one more pass over Y in that rare case.
    big = G.diagonal(dim1=-2, dim2=-1).amax(-1)
    if not bool(torch.isfinite(big).all()) or bool((big <= 0).any()):
        return None
    e = torch.round(0.5 * torch.log2(big))
    if bool((e.abs() > 20).any()):
        Y = Y * torch.exp2(-e).to(Y.dtype)[..., None, None]
        G = G * torch.exp2(-2 * e)[..., None, None]
    Rinv = _inverse_factor(G, min(IMPLICIT_COND, math.sqrt(max(op.shape))))
    if Rinv is None:
        return None
    Bt = apply_block(op, Y, where, "in the Rayleigh-Ritz step", transpose=True)   # A^T Y [*, n, c]
    return _ritz(Bt.double() @ Rinv, Y, Rinv, k)                                 # B^T = A^T Q


def _thin_svd(B: Tensor, source: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of tall float64 blocks [*, n, c] whose entries carry ``source``'s rounding.

    Float32 sources on the CPU: from the Gram matrix B^T B = Z diag(s^2) Z^T (float64 eigh) and
    P = B Z diag(1/s), one read of B for the Gram matrix and one for P, 3x faster than LAPACK's
    gesdd (0.13 s vs 0.38 s on four [200704, 20] blocks), whose bidiagonalisation of the tall
    block is BLAS-2. Its float64 errors, ~eps64 cond(B)^2 in s_i / s_1 and in P's orthogonality,
    stay below float32 rounding (eps32) while cond(B) <= 1e4, checked on the eigenvalues; worse
    conditioned (or rank-deficient) blocks, float64 sources and other devices take
    torch.linalg.svd."""
    c = B.shape[-1]
    if source == torch.float32 and B.device.type == "cpu" and B.shape[-2] >= c > 0:
        lam, Z = torch.linalg.eigh(B.transpose(-1, -2) @ B)                   # ascending
        if bool(torch.isfinite(lam).all()) and bool((lam[..., 0] >= 1e-8 * lam[..., -1]).all()) \
                and bool((lam[..., 0] > 0).all()):
            S = lam.flip(-1).sqrt()
            Zd = Z.flip(-1)
            return B @ (Zd / S.unsqueeze(-2)), S, Zd.transpose(-1, -2)
    return torch.linalg.svd(B, full_matrices=False)


def _bounds(AV: Tensor, U: Tensor, S: Tensor, resid_T: Tensor, eps: float, dim: int,
            tol: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Residuals, absolute and relative bounds, per-problem convergence and rounding allowance."""
    k = AV.shape[-1]
    # the difference and its norm in the operator's dtype: their rounding (<= 2 eps s_i per
    # column for the difference; a relative ~eps log2(m) for the pairwise-summed norm, with
    # r_i <~ 2 s_1) lies inside the allowance eps sqrt(dim) s_1 below. A float32 difference is
    # first scaled by a power of two near 1 / s_1 (exact), so that its squares neither underflow
    # (s_1 ~ 1e-20 would read as a zero residual) nor overflow (s_1 ~ 1e20); what still underflows
    # is below 1e-19 s_1, far inside the allowance. (A float64 copy for the norm costs 4x.)
    diff = AV - U[..., :k].to(AV.dtype) * S[..., :k].to(AV.dtype).unsqueeze(-2)
    if AV.dtype == torch.float64:
        resid_A = torch.linalg.vector_norm(diff, dim=-2)
    else:
        e = torch.floor(torch.log2(S[..., 0].clamp_min(torch.finfo(torch.float64).tiny))).clamp(-120.0, 120.0)
        diff.mul_(torch.exp2(-e).to(diff.dtype)[..., None, None])
        resid_A = torch.linalg.vector_norm(diff, dim=-2).double() * torch.exp2(e).unsqueeze(-1)
    r = torch.sqrt(resid_A.square() + resid_T[..., :k].square())
    rounding = eps * math.sqrt(dim) * S[..., 0]                                       # [*batch]
    half = r / math.sqrt(2.0)
    bound = half + rounding.unsqueeze(-1)
    Sk = S[..., :k]
    rel = torch.where(Sk > 0, bound / Sk.clamp_min(torch.finfo(torch.float64).tiny),
                      torch.full_like(bound, math.inf))
    ok = half <= torch.maximum(tol * Sk, rounding.unsqueeze(-1))
    return r, bound, rel, ok.all(-1), rounding


def _to_host(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """``tensors`` on the CPU, copied in one transfer: flattened into one float64 buffer (exact for
    float32 / float64 values and bools), moved, split and given back their shapes and dtypes."""
    if all(t.device.type == "cpu" for t in tensors):
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors]).cpu()
    parts = flat.split([t.numel() for t in tensors])
    return tuple(p.view(t.shape).to(t.dtype) for p, t in zip(parts, tensors))


def randomized_svd(
    op,
    k: int,
    oversample: int = 10,
    power_iters: Union[int, str] = 2,
    seed: Optional[int] = 0,
    method: str = "subspace",
    sketch: str = "shared",
    *,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    stop: Optional[Callable[[Tensor], bool]] = None,
) -> SVDResult:
    """Top-k singular triplets of each problem of a (batched) operator, with error bounds.

    "subspace" (Halko, Martinsson, Tropp 2011): Gaussian Omega [n, l] with l = k + oversample,
    Q = orth(A Omega), then ``power_iters`` rounds Q = orth(A orth(A^T Q)); B^T = A^T Q and the
    thin SVD of B^T gives the triplets. Matvecs: l (2 q + 2) + k.
    "block_krylov" (Musco & Musco 2015): Q = orth([A Omega, (A A^T) A Omega, ...,
    (A A^T)^q A Omega]) with each block orthonormalised as it is formed, then the same
    Rayleigh-Ritz step; better for slowly decaying spectra. Matvecs: l (3 q + 2) + k.
    Orthonormalisation uses :func:`resgeom_fast.ops.orthonormalize` (CholeskyQR3 in float64).

    Accuracy (a-posteriori, reported in the result). One extra block of k products A V gives
    the residuals r_i = sqrt(||A v_i - s_i u_i||^2 + ||A^T u_i - s_i v_i||^2) (the second term
    is zero up to rounding: the Rayleigh-Ritz step makes A^T U = V S). What is bounded:

    - (lower side, always) s_i <= sigma_i(A): the s_i are the singular values of the projection
      Q^T A, which interlace below those of A;
    - (residual bound) the unit vector w = [u_i; v_i] / sqrt(2) has residual r_i / sqrt(2) for
      the symmetric matrix H = [[0, A], [A^T, 0]], whose eigenvalues are +-sigma_j(A) (and 0),
      so (Weyl / Bauer-Fike for symmetric matrices) some singular value sigma_j of A lies in
      [s_i - r_i / sqrt(2), s_i + r_i / sqrt(2)], and by Kahan's theorem on the orthonormal W of
      all k pairs, k distinct singular values can be matched to the s_i within ||R||_2.
    - Hence ``error_bound`` b_i = r_i / sqrt(2) + rounding always bounds the distance from s_i
      to the nearest singular value of A (rigorous), and it bounds |s_i - sigma_i| -- sigma_i
      itself is then in [s_i, s_i + b_i] -- once the subspace has locked on to the top
      singular values, i.e. no singular value above s_i + b_i has been missed. Residuals cannot
      see a missed direction: before locking on (q = 0 on a slowly decaying spectrum, where the
      s_i sit 30% low, each within b_i of some smaller sigma_j) the bound is only of the first
      kind. Such results have bounds far above any useful tol, so they are never flagged
      converged; a converged result is accurate unless the Gaussian sketch was nearly
      orthogonal to a top singular vector (probability ~0, but not a certificate).
    - ``rounding`` = eps(dtype) * sqrt(max(m, n)) * s_1 is an allowance for the operator's own
      floating-point error (about 1e-7 relative in float32), which no residual can see below.

    The residual bound is first order: when s_i is off by delta, r_i ~ sqrt(2 sigma delta), so
    the bound is conservative (the true error is usually far smaller), and it also controls the
    singular vectors (sin angle(v_i, true) <= r_i / gap_i, Wedin).

    Modes. ``power_iters`` an int q: exactly q iterations (the historical behaviour); the
    result's ``converged`` tells whether that met ``tol``. ``power_iters="auto"``: after every
    iteration the Rayleigh-Ritz triplets and their residuals are computed (for "subspace" the
    next iteration's product A V gives the residuals, so a check costs nothing extra) and the
    iteration stops when every problem has b_i - rounding <= max(tol * s_i, rounding) for all
    i <= k, or after ``max_iters`` iterations; a result that did not reach tol has
    ``converged`` False and a RuntimeWarning is issued. Numerically zero singular values (at the
    rounding level) count as converged although their relative bound is large.

    Args:
        op: LinearOperator [*batch](m, n) with a transpose (``op.T``), or a dense tensor.
        k: 1 <= k <= min(m, n).
        oversample: extra sketch columns p >= 0 (l = min(k + p, min(m, n))).
        power_iters: q >= 0, or "auto" (iterate to ``tol``, at most ``max_iters``).
        seed: seed of the Gaussian sketch (drawn on the CPU).
        method: "subspace" or "block_krylov".
        sketch: "shared" (default): one Gaussian Omega [n, l] for every problem of a batched
            operator, passed as a stride-0 expanded view [*batch, n, l] -- each problem still
            sees a Gaussian sketch, and operators that can exploit it do (the fast path of
            :func:`resgeom_fast.operators.residual_jacobians` computes W_1 Omega once for all
            samples); "independent": one Omega per problem.
        tol: relative tolerance on s_1..s_k in (0, 1) (default 1e-3): the target of "auto" and
            the level ``converged`` refers to in both modes.
        max_iters: cap on the iterations of "auto" (>= 0, default 50); "block_krylov" also
            stops when its basis fills min(m, n) columns.
        stop: None (default: stop when every problem met ``tol``), or a callable that takes that
            decision instead in the adaptive mode (``power_iters="auto"``; not called with an
            int). It is called once per check -- after every iteration and the initial sketch,
            also at the last one, before the ``max_iters`` (and, for "block_krylov", the
            full-basis) cap is applied -- with ``conv``: a bool tensor [*batch] on the
            operator's device, whether each problem of this call meets ``tol`` now; it returns
            True to stop (the cap stops regardless). Number of calls ("subspace"): iterations +
            1, at most ``max_iters`` + 1. A sample-parallel caller whose ranks hold different
            problems passes a stop that combines the ranks' flags (one all_reduce per call), so
            every rank iterates the same number of times as one process on all the problems
            (:func:`resgeom_fast.analysis.residual_alignment`). The warning of an unconverged
            result still refers to this call's problems.

    Returns:
        :class:`SVDResult` with U, S, V in the operator's dtype and the float64 accuracy fields.
    """
    where = "randomized_svd"
    op = aslinearoperator(op)
    m, n = op.shape
    r = min(m, n)
    check_int(where, "k", k, 1, r, hint=f" (min(m, n) of the operator shape {op.shape})")
    check_int(where, "oversample", oversample, 0)
    adaptive = isinstance(power_iters, str)
    if adaptive:
        if power_iters != "auto":
            raise ValueError(f"{where}: expected power_iters an int >= 0 or 'auto', got {power_iters!r}")
    else:
        if isinstance(power_iters, bool) or not isinstance(power_iters, int):
            raise TypeError(f"{where}: expected power_iters an int >= 0 or 'auto', got "
                            f"{type(power_iters).__name__}")
        check_int(where, "power_iters", power_iters, 0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0.0 < float(tol) < 1.0):
        raise ValueError(f"{where}: expected tol a float in (0, 1), got {tol!r}")
    tol = float(tol)
    check_int(where, "max_iters", max_iters, 0)
    check_choice(where, "method", method, METHODS)
    check_choice(where, "sketch", sketch, SKETCHES)
    if not op.has_transpose:
        raise ValueError(f"{where}: expected an operator with a transpose (rmatmat), got {op!r}")
    if stop is not None and not callable(stop):
        raise TypeError(f"{where}: expected stop a callable (conv [*batch] bool tensor -> bool) or None, got "
                        f"{type(stop).__name__}")

    def done(conv: Tensor) -> bool:
        return bool(conv.all()) if stop is None else bool(stop(conv))

    gen = generator(seed, op)
    batch = op.batch_shape
    l = min(k + oversample, r)
    eps = float(torch.finfo(op.dtype).eps)
    dim = max(m, n)
    if sketch == "shared" and len(batch) > 0:
        omega = gaussian((n, l), gen, op.dtype, op.device).expand(*batch, n, l)
    else:
        omega = gaussian((*batch, n, l), gen, op.dtype, op.device)
    # the sketch's block is an intermediate one only when a power iteration follows it
    first = _normalise if (method == "subspace" and not adaptive and power_iters > 0) else _orth
    Q = first(apply_block(op, omega, where, "on the sketch"))
    matvecs = l
    iters = 0

    def finish(P, S, U, resid_T, AV) -> SVDResult:
        # the per-problem diagnostics come to the host in one transfer (one sync on a GPU)
        res, bound, rel, conv, rounding = _to_host(_bounds(AV, U, S, resid_T, eps, dim, tol))
        if adaptive and not bool(conv.all()):
            warnings.warn(
                f"{where}: power_iters='auto' stopped after {iters} iterations (max_iters={max_iters}) with "
                f"{int((~conv).sum())} of {conv.numel()} problems above tol={tol:g} (largest relative error bound "
                f"{float(rel.max()):.3g}); the result has converged=False for them", RuntimeWarning, stacklevel=3)
        return SVDResult(
            U=U[..., :k].to(op.dtype), S=S[..., :k].to(op.dtype), V=P[..., :k].to(op.dtype), matvecs=matvecs,
            residuals=res, error_bound=bound, rel_error_bound=rel, converged=conv,
            iterations=iters, tol=tol, adaptive=adaptive, rounding=rounding)

    if method == "subspace":
        if not adaptive:
            for it in range(power_iters):
                Z = _normalise(apply_block(op, Q, where, "in a power iteration", transpose=True))
                Q = apply_block(op, Z, where, "in a power iteration")
                if it < power_iters - 1:
                    Q = _normalise(Q)
                matvecs += 2 * l
            iters = power_iters
            # the last block feeds Rayleigh-Ritz: directly when well-conditioned, else orthonormalised
            # (q = 0: the sketch's block was orthonormalised already)
            rr = _rayleigh_ritz_implicit(op, Q, where, k) if power_iters > 0 else None
            if rr is None:
                rr = _rayleigh_ritz(op, _orth(Q) if power_iters > 0 else Q, where, k)
            P, S, U, resid_T = rr
            AV = apply_block(op, P[..., :k].to(op.dtype).contiguous(), where, "in the residual check")
            matvecs += l + k
            return finish(P, S, U, resid_T, AV)
        while True:
            P, S, U, resid_T = _rayleigh_ritz(op, Q, where, k)
            Y = apply_block(op, P.to(op.dtype).contiguous(), where, "in a power iteration")   # A V: [*, m, l]
            matvecs += 2 * l
            _, _, _, conv, _ = _bounds(Y[..., :k], U, S, resid_T, eps, dim, tol)
            if done(conv) or iters >= max_iters:
                return finish(P, S, U, resid_T, Y[..., :k])
            Q = _orth(Y)
            iters += 1
    # block Krylov
    blocks = [Q]
    cols = l
    steps = power_iters if not adaptive else max_iters
    while True:
        if adaptive or iters >= steps or cols >= r:
            K = torch.cat(blocks, dim=-1)[..., :r]
            Qk = _orth(K) if len(blocks) > 1 else Q
            P, S, U, resid_T = _rayleigh_ritz(op, Qk, where, k)
            AV = apply_block(op, P[..., :k].to(op.dtype).contiguous(), where, "in the residual check")
            matvecs += Qk.shape[-1] + k
            _, _, _, conv, _ = _bounds(AV, U, S, resid_T, eps, dim, tol)
            if (adaptive and done(conv)) or iters >= steps or cols >= r:
                return finish(P, S, U, resid_T, AV)
        # Z normalised first (its span is all the Krylov space needs): A A^T Q is of size s_1^2,
        # outside float32's range for s_1 beyond ~1e+-19 (an overflow blamed on the operator before)
        Z = _normalise(apply_block(op, blocks[-1], where, "in a Krylov step", transpose=True))
        Y = _orth(apply_block(op, Z, where, "in a Krylov step"))
        blocks.append(Y)
        cols += l
        matvecs += 2 * l
        iters += 1
