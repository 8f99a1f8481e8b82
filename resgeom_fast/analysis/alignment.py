"""Residual Alignment, RA1-RA4 (Li & Papyan, NeurIPS 2023; docs/science.md section 1).

:func:`residual_alignment` takes a model and a batch of N inputs and measures, per sample and then
averaged over samples (mean and population std):

- RA1, trajectories h_0, ..., h_L are straight and equispaced: :func:`trajectory_metrics`
  (linearity, equispacing, step cosine) and a 2-D PCA of all trajectories
  (:func:`trajectory_pca`);
- RA2, singular vectors of the residual Jacobians J_l align: self alignment per block and the
  cross-alignment matrices A_ij = U_i^T J_j V_i (k x k) with their diagonal ratios
  (:func:`diag_ratio`) and the signs of their diagonals;
- RA3, the Jacobians have rank at most C: :func:`numerical_rank` and sigma_{C+1} / sigma_C;
- RA4, sigma_1(J_l) scales like 1 / depth: sigma_1 per block and L * mean_l sigma_1, also
  without the first block (:func:`depth_scaling` compares nets of several depths).

Accuracy. The triplets come from :func:`resgeom_fast.linalg.randomized_svd` in its adaptive
mode by default (``power_iters=None``: iterate until every singular value s_1..s_k of every
sample has a residual error bound <= tol * s_i, tol = 1e-3, at most ``max_iters`` iterations);
an int ``power_iters`` runs exactly that many iterations. Either way the result records the
accuracy reached (``AlignmentResult.accuracy()``, per block ``svd_*`` fields, summary keys
``svd_max_rel_error_bound``, ``svd_converged``) and a RuntimeWarning names an unconverged run.

The residual Jacobians are never materialised: one batched
:class:`~resgeom_fast.operators.ResidualJacobian` per block (batch_shape (N,)) is given to
:func:`resgeom_fast.linalg.randomized_svd`, and A_ij applies the operator J_j to the k right
singular vectors V_i of every sample.

Readings of the science chosen here (the paper leaves them open; docs/science.md section 1):

- Stages. Blocks are grouped, in the order of the selection, into maximal runs of consecutive
  blocks whose input and output have one per-sample shape (a Type-1 net is one stage). A block
  whose output shape differs from its input shape (a downsampling block of a staged ResNet)
  belongs to no stage: U and V live in different spaces, so neither the trajectory nor the
  cross alignment is defined for it; it is listed in ``skipped_blocks``.
- Trajectory of a stage: the inputs of its blocks followed by the output of its last block,
  flattened per sample (D = C*H*W for conv nets); for consecutive blocks l0..l1 that is
  h_{l0-1}, ..., h_{l1}. L is the number of blocks of the stage.
- Spreads over samples are population standard deviations (0 for one sample).
  equispacing uses the population std over the L steps.
- One-block stages (every stage of a torchvision ResNet but the first has one shape-preserving
  block): a two-point trajectory is trivially straight (linearity 1) and equispaced (0), has
  no pair of steps (step_cosine) and no block pair (diag_ratio_offdiag, diag_positive_offdiag),
  so these metrics are undefined there: None with the reason in the summaries (the per-sample
  RA1 arrays are exported as null), and headlines average only the stages where a metric is
  defined (``<key>_reason`` says which). Self alignment, ranks and sigma_1 are defined per block.
- numerical_rank counts among the top-k singular values only, so it saturates at k: a sample
  whose k computed singular values are all above tau * sigma_1 (with k < D) has rank >= k,
  "capped". ``rank_capped`` gives the fraction per block; rank statistics of such blocks are
  lower bounds, and the summary reports ``max_numerical_rank`` None with
  ``max_numerical_rank_capped`` True and ``max_numerical_rank_lower_bound``. With k <= C, whether
  a capped rank is <= C is unknown: ``rank_le_c`` is NaN for that block (summary None).
- Self alignment (read plainly: mean_{r<=k} |u_r^T v_r|) is averaged over the top min(C, k)
  triplets: RA2 is a statement about the top-C singular vectors (RA3: rank <= C), and the
  triplets beyond C -- the k = C + 5 default's oversampled extras, small singular values with
  poorly defined vectors -- would make the number depend on k (0.62 at k = C + 5 vs 0.87 at
  k = C in the issue's net). The per-r profile ``self_alignment_per_r`` [L, k] keeps all k.
- RA4: ``depth_product`` = L * mean_l sigma_1 over all L blocks; ``depth_product_excl_first`` =
  L * mean_{l >= 2} sigma_1 estimates the same constant c of sigma_1 ~ c / L without the first
  block, whose sigma_1 is often 5-50x the others (None for a one-block stage);
  ``first_block_ratio`` = sigma_1(J_1) / mean_{l >= 2} sigma_1(J_l).
- num_classes C: the argument, else the classifier's out_features (see
  :func:`residual_alignment`); never the labels of the batch.
- "The diagonal of A_ij should be positive": ``diag_positive[i, j]`` is the fraction of the
  diagonal entries over all samples that are > 0 (each entry u_{i,r}^T J_j v_{i,r} is invariant
  under the sign ambiguity of a singular pair), counted over the resolved triplets of block i
  only (s_{i,r} > tau * s_{i,1}, the rank's rule): a rounding-level singular pair has arbitrary
  vectors, so its sign would be noise (NaN when block i has no resolved triplet).
- Heatmaps: ``cross_abs_mean`` is the mean over samples of |A_ij| (the off-diagonal entries
  change sign with the singular vectors' signs, so a signed mean would cancel), stored for a few
  pairs (``cross_pairs``); ``cross_diag_mean`` is the signed sample mean of diag(A_ij).
- Each block's sketch is seeded with ``seed + position of the block in the selection`` so that
  the sketches of different blocks are independent.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.core.checks import check_module, check_type
from resgeom_fast.core.blocks import BlockInfo
from resgeom_fast.core.modules import capture_points, module_mode
from resgeom_fast._progress import progress as _progress_bar
from resgeom_fast.analysis._common import (
    FIRST,
    Result,
    check_choice,
    check_float,
    check_int,
    json_field,
    model_device_dtype,
    to_jsonable,
)
from resgeom_fast.analysis.plotting import (
    as_result_dict, errorbars, figure_axes, get_path, heatmaps, join, lines, pca_trajectories, pyplot, spectra_per_block,
)
from resgeom_fast.core import distributed as rdist
from resgeom_fast.analysis._distributed import check_mode, check_model, gather_objects, portable, raise_first
from resgeom_fast.linalg import randomized_svd
from resgeom_fast.linalg.svd import DEFAULT_MAX_ITERS, DEFAULT_TOL
from resgeom_fast.operators import ResidualJacobian, residual_blocks, residual_jacobians

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "AlignmentResult",
    "StageAlignment",
    "depth_scaling",
    "diag_ratio",
    "numerical_rank",
    "plot_cross_alignment",
    "plot_sigma1",
    "plot_singular_values",
    "plot_trajectories",
    "residual_alignment",
    "trajectory_metrics",
    "trajectory_pca",
]

_PATHS = ("auto", "generic", "fast")
_BYTES = 256 * 2**20  # working-set budget of the float64 chunks


# -- metric helpers (public: tested on constructed cases) ---------------------------------------
def _check_traj(where: str, traj: Any) -> Tensor:
    check_type(where, "traj", traj, Tensor, "a torch.Tensor [N, L+1, D]")
    if not traj.is_floating_point():
        raise TypeError(f"{where}: expected traj a floating-point tensor, got {traj.dtype}")
    if traj.dim() < 3 or traj.shape[0] < 1 or traj.shape[1] < 2:
        raise ValueError(f"{where}: expected traj of shape [N >= 1, L+1 >= 2, D, ...], got {tuple(traj.shape)}")
    return traj.flatten(2)


def _chunk_rows(per_row_elems: int) -> int:
    return max(1, _BYTES // max(1, 8 * per_row_elems))


def trajectory_metrics(traj: Tensor) -> dict[str, Tensor]:
    """RA1 scalars of each trajectory (docs/science.md section 1), computed in float64.

    Args:
        traj: [N, L+1, D] (or [N, L+1, *shape], flattened from dim 2): sample n's points
            h_0, ..., h_L, any floating dtype and device.

    Returns:
        dict of float64 CPU tensors [N]:
        ``linearity`` = s_1^2 / sum_i s_i^2, s the singular values of the trajectory matrix centred
        over its L+1 columns (1 = a straight line; NaN when all points coincide);
        ``equispacing`` = std_l ||h_l - h_{l-1}|| / mean_l ||h_l - h_{l-1}|| (population std;
        0 = equal steps; NaN when every step is 0);
        ``step_cosine`` = mean_{l=1..L-1} cos(h_l - h_{l-1}, h_{l+1} - h_l) (NaN when L = 1).
    """
    t = _check_traj("trajectory_metrics", traj)
    n, p, d = t.shape
    lin, eq, cos = [], [], []
    cs = _chunk_rows(3 * p * d)
    for s0 in range(0, n, cs):
        T = t[s0:s0 + cs].double()
        C = T - T.mean(dim=1, keepdim=True)
        s2 = torch.linalg.svdvals(C).square()
        tot = s2.sum(-1)
        lin.append(torch.where(tot > 0, s2[..., 0] / tot, torch.full_like(tot, math.nan)))
        steps = T[:, 1:] - T[:, :-1]
        norms = steps.norm(dim=-1)                                           # [n, L]
        mean = norms.mean(-1)
        std = norms.std(-1, unbiased=False) if norms.shape[1] > 1 else torch.zeros_like(mean)
        eq.append(torch.where(mean > 0, std / mean, torch.full_like(mean, math.nan)))
        if p >= 3:
            dots = (steps[:, :-1] * steps[:, 1:]).sum(-1)
            c = dots / (norms[:, :-1] * norms[:, 1:])
            cos.append(c.mean(-1))
        else:
            cos.append(torch.full_like(mean, math.nan))
    return {"linearity": torch.cat(lin).cpu(), "equispacing": torch.cat(eq).cpu(),
            "step_cosine": torch.cat(cos).cpu()}


def trajectory_pca(traj: Tensor) -> tuple[Tensor, Tensor]:
    """2-D PCA over all points h_l of all trajectories (float64).

    The points [N*(L+1), D] are centred by their common mean and projected on the two leading
    principal directions (eigenvectors of the covariance, computed through the smaller of the
    Gram matrix and the covariance matrix). Each component's sign is fixed so that its entry of
    largest magnitude is positive.

    Args:
        traj: [N, L+1, D] (or [N, L+1, *shape]).

    Returns:
        ``(coords, explained)``: coords [N, L+1, 2] float64 CPU, the projections; explained [2],
        each component's fraction of the total variance (0 for a missing component when D = 1
        or all points coincide).
    """
    t = _check_traj("trajectory_pca", traj)
    n, p, d = t.shape
    X = t.reshape(n * p, d)
    m = X.shape[0]
    cs = _chunk_rows(d)
    mu = torch.zeros(d, dtype=torch.float64, device=X.device)
    for s0 in range(0, m, cs):
        mu += X[s0:s0 + cs].double().sum(0)
    mu /= m
    if m <= d:  # Gram route: G = Xc Xc^T [m, m]
        G = torch.zeros(m, m, dtype=torch.float64, device=X.device)
        for a in range(0, m, cs):
            Xa = X[a:a + cs].double() - mu
            for b in range(0, m, cs):
                G[a:a + cs, b:b + cs] = Xa @ (X[b:b + cs].double() - mu).T
        evals, evecs = torch.linalg.eigh(G)
        lam = evals.flip(0)[:2].clamp_min(0)
        coords = evecs.flip(1)[:, :2] * lam.sqrt()
        total = evals.clamp_min(0).sum()
    else:  # covariance route: Xc^T Xc [d, d]
        Cv = torch.zeros(d, d, dtype=torch.float64, device=X.device)
        for s0 in range(0, m, cs):
            Xa = X[s0:s0 + cs].double() - mu
            Cv += Xa.T @ Xa
        evals, evecs = torch.linalg.eigh(Cv)
        lam = evals.flip(0)[:2].clamp_min(0)
        P = evecs.flip(1)[:, :2]
        coords = torch.cat([(X[s0:s0 + cs].double() - mu) @ P for s0 in range(0, m, cs)])
        total = evals.clamp_min(0).sum()
    if coords.shape[1] < 2:
        coords = torch.cat([coords, coords.new_zeros(m, 2 - coords.shape[1])], 1)
        lam = torch.cat([lam, lam.new_zeros(2 - lam.shape[0])])
    idx = coords.abs().argmax(0)
    sign = torch.sign(coords[idx, torch.arange(2, device=coords.device)])
    coords = coords * torch.where(sign == 0, torch.ones_like(sign), sign)
    explained = lam / total if float(total) > 0 else torch.zeros_like(lam)
    return coords.reshape(n, p, 2).cpu(), explained.cpu()


def numerical_rank(S: Tensor, tau: float = 1e-2) -> Tensor:
    """#{r : sigma_r > tau * sigma_1} per problem, from singular values S [..., k] (descending).

    Returns an int64 tensor of shape S.shape[:-1] (0 where sigma_1 = 0).
    """
    if not isinstance(S, Tensor) or S.dim() < 1 or S.shape[-1] < 1:
        raise ValueError("numerical_rank: expected S a tensor [..., k] with k >= 1")
    tau = check_float("numerical_rank", "tau", tau, 0.0, 1.0, open_lo=True)
    S = S.double()
    return (S > tau * S[..., :1]).sum(-1)


def diag_ratio(A: Tensor) -> Tensor:
    """||diag A||^2 / ||A||_F^2 of square matrices A [..., k, k], in float64 (NaN where A = 0)."""
    if not isinstance(A, Tensor) or A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"diag_ratio: expected A of shape [..., k, k], got "
                         f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}")
    A = A.double()
    num = A.diagonal(dim1=-2, dim2=-1).square().sum(-1)
    den = A.square().sum((-2, -1))
    return torch.where(den > 0, num / den, torch.full_like(den, math.nan))


def _mean_std(v: Tensor, dim: int = 0) -> tuple[Tensor, Tensor]:
    v = v.double()
    return v.mean(dim), (v.std(dim, unbiased=False) if v.shape[dim] > 1 else torch.zeros_like(v.mean(dim)))


def _nanmean(v: Tensor) -> float:
    v = v.double().flatten()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else math.nan


_ONE_BLOCK = ("one block: trajectory metrics need >= 2 blocks (a two-point trajectory is trivially straight and "
              "equispaced)")
_NO_PAIR = "one block: no block pair i != j for cross alignment"


# -- results ------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class StageAlignment(Result):
    """RA1-RA4 of one stage (a run of L blocks with one per-sample shape); float64 CPU tensors.

    Attributes:
        stage: stage number (0-based, in the order of the selected blocks).
        block_names, block_indices: the stage's blocks (qualified names; positions among all
            residual blocks of the model).
        shape: per-sample shape of h in this stage; dim: D = prod(shape). k: triplets per block.
        linearity, equispacing, step_cosine: [N] per-sample RA1 scalars (:func:`trajectory_metrics`).
        pca: [N, L+1, 2] PCA coordinates of every trajectory; pca_explained: [2] variance fractions.
        singular_values_mean, singular_values_std: [L, k] over samples.
        self_alignment_mean, self_alignment_std: [L] (mean over r <= self_alignment_r of
            |u_r^T v_r| per sample); self_alignment_r = min(C, k);
        self_alignment_per_r: [L, k] sample mean of |u_r^T v_r| for every r <= k.
        diag_ratio_mean, diag_ratio_std: [L, L], entry (i, j) = over samples of diag_ratio(A_ij).
        diag_positive: [L, L] fraction of positive diagonal entries of A_ij (over samples and the
            resolved r <= k of block i: s_{i,r} > tau * s_{i,1}).
        cross_pairs: [(i, j), ...] stage-local block pairs whose matrices are stored;
        cross_abs_mean: [P, k, k] mean over samples of |A_ij|; cross_diag_mean: [P, k] mean of diag A_ij.
        rank_mean, rank_std: [L] numerical rank; rank_min, rank_max: [L] (int64) -- lower bounds
            where ``rank_capped`` > 0.
        rank_le_c: [L] fraction of samples whose numerical rank is <= C (NaN where a capped rank
            with k <= C leaves it unknown).
        gap_ratio_mean, gap_ratio_std: [L] sigma_{C+1} / sigma_C (None when k <= C).
        sigma1_mean, sigma1_std: [L]. depth_product: L * mean_l sigma1_mean[l].
        num_classes: C. rank_cap: k when k < D (a rank reaching it is capped), else None.
        rank_capped: [L] fraction of samples whose numerical rank reached the cap k.
        depth_product_excl_first: L * mean_{l >= 2} sigma1_mean[l] (None for L = 1).
        svd_iterations: [L] power iterations of each block's randomized SVD.
        svd_converged: [L] fraction of samples whose k triplets met the tolerance.
        svd_max_rel_error_bound: [L] max over samples and resolved triplets (s_r > tau * s_1) of
            the relative error bound b_r / s_r; svd_max_error_bound_sigma1: [L] max of b_r / s_1
            over all k triplets (see :func:`resgeom_fast.linalg.randomized_svd`).
    """

    stage: int
    block_names: list[str]
    block_indices: list[int]
    shape: tuple[int, ...]
    dim: int
    k: int
    linearity: Tensor = json_field(group="ra1")
    equispacing: Tensor = json_field(group="ra1")
    step_cosine: Tensor = json_field(group="ra1")
    pca: Tensor = json_field(group="ra1")
    pca_explained: Tensor = json_field(group="ra1")
    self_alignment_mean: Tensor = json_field(group="ra2")
    self_alignment_std: Tensor = json_field(group="ra2")
    self_alignment_r: int = json_field(group="ra2")
    self_alignment_per_r: Tensor = json_field(group="ra2")
    diag_ratio_mean: Tensor = json_field(group="ra2")
    diag_ratio_std: Tensor = json_field(group="ra2")
    diag_positive: Tensor = json_field(group="ra2")
    cross_pairs: list[tuple[int, int]] = json_field(group="ra2")
    cross_abs_mean: Tensor = json_field(group="ra2")
    cross_diag_mean: Tensor = json_field(group="ra2")
    singular_values_mean: Tensor = json_field(group="ra3")
    singular_values_std: Tensor = json_field(group="ra3")
    rank_mean: Tensor = json_field(group="ra3")
    rank_std: Tensor = json_field(group="ra3")
    rank_min: Tensor = json_field(group="ra3")
    rank_max: Tensor = json_field(group="ra3")
    rank_le_c: Tensor = json_field(group="ra3")
    rank_cap: Optional[int] = json_field(group="ra3")
    rank_capped: Tensor = json_field(group="ra3")
    gap_ratio_mean: Optional[Tensor] = json_field(group="ra3")
    gap_ratio_std: Optional[Tensor] = json_field(group="ra3")
    sigma1_mean: Tensor = json_field(group="ra4")
    sigma1_std: Tensor = json_field(group="ra4")
    depth_product: float = json_field(group="ra4")
    depth_product_excl_first: Optional[float] = json_field(group="ra4")
    svd_iterations: list[int] = json_field(group="svd", key="iterations")
    svd_converged: Tensor = json_field(group="svd", key="converged_fraction")
    svd_max_rel_error_bound: Tensor = json_field(group="svd", key="max_rel_error_bound")
    svd_max_error_bound_sigma1: Tensor = json_field(group="svd", key="max_error_bound_sigma1")
    num_classes: int

    # to_dict(): the fields grouped as RA1-RA4 + svd; C is in the AlignmentResult's settings
    _exclude = ("num_classes",)
    _place = {"num_blocks": "k", "ra1.linearity_mean": "step_cosine", "ra1.linearity_std": "linearity_mean",
              "ra1.equispacing_mean": "linearity_std", "ra1.equispacing_std": "equispacing_mean",
              "ra1.step_cosine_mean": "equispacing_std", "ra1.step_cosine_std": "step_cosine_mean",
              "ra1.undefined_reason": "step_cosine_std", "ra2.diag_ratio_offdiag": "diag_ratio_std",
              "ra2.diag_positive_offdiag": "diag_positive", "ra2.random_baseline": "diag_positive_offdiag",
              "ra3.rank_note": "rank_capped"}

    @property
    def num_blocks(self) -> int:
        """L, the number of blocks of the stage."""
        return len(self.block_names)

    def _offdiag(self, M: Tensor) -> float:
        L = M.shape[0]
        if L < 2:
            return math.nan
        mask = ~torch.eye(L, dtype=torch.bool, device=M.device)
        return _nanmean(M[mask])

    @property
    def diag_ratio_offdiag(self) -> float:
        """Mean of diag_ratio_mean over block pairs i != j (NaN for a one-block stage)."""
        return self._offdiag(self.diag_ratio_mean)

    @property
    def diag_positive_offdiag(self) -> float:
        """Mean of diag_positive over block pairs i != j (NaN for a one-block stage)."""
        return self._offdiag(self.diag_positive)

    @property
    def first_block_ratio(self) -> Optional[float]:
        """sigma_1(J_1) / mean_{l >= 2} sigma_1(J_l) (None for a one-block stage)."""
        if self.num_blocks < 2:
            return None
        rest = float(self.sigma1_mean[1:].mean())
        return float(self.sigma1_mean[0]) / rest if rest > 0 else math.nan

    def undefined(self) -> dict[str, str]:
        """Metrics undefined for this stage, with the reason (empty for a stage of >= 2 blocks
        whose ranks are not capped)."""
        out: dict[str, str] = {}
        if self.num_blocks < 2:
            for key in ("linearity", "equispacing", "step_cosine"):
                out[key] = _ONE_BLOCK
            out["diag_ratio_offdiag"] = out["diag_positive_offdiag"] = _NO_PAIR
            out["depth_product_excl_first"] = out["first_block_ratio"] = "one block: no block after the first"
        if bool((self.rank_capped > 0).any()):
            out["max_numerical_rank"] = (
                f"capped at k = {self.k}: some samples have all k computed singular values above tau * sigma_1, "
                f"so their rank is >= {self.k} (raise k)")
        if bool(torch.isnan(self.rank_le_c).any()):
            out["rank_le_c_fraction"] = (
                f"capped at k = {self.k} <= C = {self.num_classes}: whether a rank >= k is <= C is unknown (raise k)")
        return out

    def summary(self) -> dict[str, Any]:
        """Headline scalars of the stage (means over samples; see :meth:`AlignmentResult.summary`).

        An undefined metric is None and ``<key>_reason`` says why (:meth:`undefined`).
        """
        und = self.undefined()
        rank_max = float(self.rank_mean.max())
        out: dict[str, Any] = {
            "linearity": _nanmean(self.linearity),
            "equispacing": _nanmean(self.equispacing),
            "step_cosine": _nanmean(self.step_cosine),
            "self_alignment": _nanmean(self.self_alignment_mean),
            "diag_ratio_offdiag": self.diag_ratio_offdiag,
            "diag_positive_offdiag": self.diag_positive_offdiag,
            "max_numerical_rank": rank_max,
            "max_numerical_rank_capped": "max_numerical_rank" in und,
            "rank_le_c_fraction": _nanmean(self.rank_le_c),
            "depth_product": float(self.depth_product),
            "depth_product_excl_first": self.depth_product_excl_first,
            "first_block_ratio": self.first_block_ratio,
            "svd_max_rel_error_bound": float(self.svd_max_rel_error_bound.max()),
            "svd_converged": bool((self.svd_converged == 1).all()),
            "svd_converged_fraction": float(self.svd_converged.mean()),
        }
        if "max_numerical_rank" in und:
            out["max_numerical_rank_lower_bound"] = rank_max
        for key, why in und.items():
            out[key] = None
            out[f"{key}_reason"] = why
        return out

    def _extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_blocks": self.num_blocks}
        for key in ("linearity", "equispacing", "step_cosine"):
            out[f"ra1.{key}_mean"], out[f"ra1.{key}_std"] = _mean_std(getattr(self, key))
        if self.num_blocks < 2:   # trivially perfect values are not published
            for key in ("linearity", "equispacing", "step_cosine"):
                out[f"ra1.{key}"] = out[f"ra1.{key}_mean"] = out[f"ra1.{key}_std"] = None
            out["ra1.undefined_reason"] = _ONE_BLOCK
        out.update({
            "ra2.diag_ratio_offdiag": self.diag_ratio_offdiag, "ra2.diag_positive_offdiag": self.diag_positive_offdiag,
            "ra2.random_baseline": 1.0 / self.k,
            "ra3.rank_note": (f"capped at k = {self.k}: rank statistics of blocks with rank_capped > 0 are lower "
                              "bounds" if bool((self.rank_capped > 0).any()) else None),
            "ra4.first_block_ratio": self.first_block_ratio,
            "undefined": self.undefined(),
            "summary": self.summary(),
        })
        return out


@dataclass(kw_only=True)
class AlignmentResult(Result):
    """Result of :func:`residual_alignment`: one :class:`StageAlignment` per stage.

    Attributes:
        stages: per-stage results (one for a Type-1 net).
        labels: [N] int64 CPU class labels (None when no ``y`` was given).
        num_classes: C; num_classes_source: where C came from ("num_classes argument",
            "model.head", "model.fc", ...).
        k, oversample, tau, seed, path: the settings used. power_iters: an int (fixed
            iterations) or "auto" (adaptive to ``tol``, at most ``max_iters``).
        n_samples: N. per_stage: as requested. deterministic: as requested.
        skipped_blocks: blocks in no stage (their output shape differs from their input shape):
            dicts with name, index, in_shape, out_shape.
    """

    num_classes: int = json_field(group="settings")
    num_classes_source: str = json_field(group="settings", default="")
    k: int = json_field(group="settings")
    oversample: int = json_field(group="settings")
    power_iters: Union[int, str] = json_field(group="settings")
    tol: float = json_field(group="settings", default=DEFAULT_TOL)
    max_iters: int = json_field(group="settings", default=DEFAULT_MAX_ITERS)
    tau: float = json_field(group="settings")
    seed: int = json_field(group="settings")
    path: str = json_field(group="settings")
    n_samples: int = json_field(group="settings")
    per_stage: bool = json_field(group="settings")
    deterministic: bool = json_field(group="settings", default=False)
    labels: Optional[Tensor]
    skipped_blocks: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageAlignment]

    _place = {"analysis": FIRST, "accuracy": "settings"}

    def accuracy(self) -> dict[str, Any]:
        """Accuracy reached by the randomized SVDs (every block of every stage).

        Keys: tol, adaptive (power_iters == "auto"), all_converged, converged_fraction (over
        blocks x samples), max_rel_error_bound (max b_r / s_r over resolved triplets, s_r > tau *
        s_1), max_error_bound_sigma1 (max b_r / s_1 over all k triplets), iterations_max.
        """
        conv = torch.cat([st.svd_converged for st in self.stages])
        return {
            "tol": self.tol, "adaptive": self.power_iters == "auto", "max_iters": self.max_iters,
            "all_converged": bool((conv == 1).all()),
            "converged_fraction": float(conv.mean()),
            "max_rel_error_bound": float(torch.cat([st.svd_max_rel_error_bound for st in self.stages]).max()),
            "max_error_bound_sigma1": float(torch.cat([st.svd_max_error_bound_sigma1 for st in self.stages]).max()),
            "iterations_max": max(max(st.svd_iterations) for st in self.stages),
        }

    def summary(self) -> dict[str, Any]:
        """Headline values: with one stage, that stage's; with several, means over the stages where
        the metric is defined (``max_numerical_rank`` the max).

        Keys: linearity, equispacing, step_cosine (sample means), self_alignment (mean over blocks
        of the top-min(C, k) self alignment), diag_ratio_offdiag (mean of the diag-ratio matrix off
        the diagonal; random baseline 1/k), diag_positive_offdiag, max_numerical_rank (max over
        blocks of the sample-mean rank; None when capped at k) with max_numerical_rank_capped
        (bool) and, when capped, max_numerical_rank_lower_bound; rank_le_c_fraction;
        depth_product (L * mean_l sigma_1), depth_product_excl_first (L * mean_{l>=2} sigma_1),
        first_block_ratio (sigma_1 of the first block / mean of the others); svd_max_rel_error_bound,
        svd_converged (bool), svd_converged_fraction (the randomized SVD's accuracy, see
        :meth:`accuracy`); num_stages. A value that is None, or a mean over only some of the
        stages, comes with ``<key>_reason``.
        """
        per = [s.summary() for s in self.stages]
        keys = [key for key in per[0] if not key.endswith("_reason")]
        out: dict[str, Any] = {}
        reasons: dict[str, str] = {}
        for key in keys:
            if key in ("max_numerical_rank_capped", "svd_converged"):
                out[key] = any(p[key] for p in per) if key.endswith("capped") else all(p[key] for p in per)
                continue
            if key == "max_numerical_rank_lower_bound":
                continue
            vals = [p.get(key) for p in per]
            used = [i for i, v in enumerate(vals) if v is not None and not (isinstance(v, float) and math.isnan(v))]
            if key == "max_numerical_rank":
                if any(p["max_numerical_rank_capped"] for p in per):
                    out[key] = None
                    out["max_numerical_rank_lower_bound"] = max(
                        p.get("max_numerical_rank_lower_bound", p["max_numerical_rank"]) or 0.0 for p in per)
                    capped = [i for i, p in enumerate(per) if p["max_numerical_rank_capped"]]
                    reasons[key] = (f"capped at k = {self.k} in stage(s) {capped}: the rank is >= k there; "
                                    "raise k")
                else:
                    out[key] = max(vals)
                continue
            if not used:
                out[key] = None
                why = sorted({p.get(f"{key}_reason") for p in per if p.get(f"{key}_reason")})
                reasons[key] = "; ".join(why) if why else "undefined in every stage"
                continue
            fn = max if key == "svd_max_rel_error_bound" else (lambda v: sum(v) / len(v))
            out[key] = float(fn([float(vals[i]) for i in used]))
            if len(used) < len(per):
                skipped = [i for i in range(len(per)) if i not in used]
                why = sorted({per[i].get(f"{key}_reason") or "undefined" for i in skipped})
                reasons[key] = f"mean over stages {used}; stages {skipped} left out ({'; '.join(why)})"
        out["svd_converged_fraction"] = self.accuracy()["converged_fraction"]   # over blocks x samples
        out["num_stages"] = float(len(self.stages))
        for key, why in reasons.items():
            out[f"{key}_reason"] = why
        return out

    def _extra(self) -> dict[str, Any]:
        return {"analysis": "residual_alignment", "accuracy": self.accuracy(), "summary": self.summary()}


# -- the analysis -------------------------------------------------------------------------------
def _last_outputs(model: nn.Module, x: Tensor, blocks: list[BlockInfo]) -> list[Tensor]:
    """Outputs h_l of ``blocks`` (read at each block's ``output_point``: the block module's output,
    or for a sublayer block the point inside its owner where the model shows it) from one
    eval-mode, no-grad forward pass (stops after the last)."""
    with module_mode(model, False), torch.no_grad(), capture_points([b.output_point for b in blocks],
                                                                      stop=True) as cap:
        model(x)
    if not cap.complete:
        raise ValueError("residual_alignment: some blocks were not called in the forward pass of the model")
    for b, out in zip(blocks, cap.values):
        if not isinstance(out, Tensor):
            raise ValueError(f"residual_alignment: block {b.name!r} returned "
                             f"{type(out).__name__}, expected a tensor")
    return list(cap.values)


def _local_rows(where: str, mode: str, x: Tensor, y: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """This rank's samples: a contiguous block of ``x`` (``"split"``, :func:`shard_sizes`) or ``x``."""
    if mode != "split":
        return x, y
    sizes = rdist.shard_sizes(int(x.shape[0]), rdist.world_size())
    a = sum(sizes[:rdist.rank()])
    b = a + sizes[rdist.rank()]
    return x[a:b], (y[a:b] if y is not None else None)


class _Rows:
    """This rank's rows ``[offset, offset + n)`` of the N samples of a sample-parallel run, and the
    gather of per-sample results (``counts``: every rank's rows)."""

    def __init__(self, counts: list[int]) -> None:
        self.counts = counts
        self.offset, self.n, self.N = sum(counts[:rdist.rank()]), counts[rdist.rank()], sum(counts)

    def gather(self, parts: list[Tensor], exc: Optional[BaseException] = None) -> list[Tensor]:
        """Every rank's rows (dim 0) of each tensor, concatenated in rank order on every rank (ONE
        all_reduce with the ranks' failure flags; exact)."""
        return rdist.gather_shares("residual_alignment", parts, self.counts, dim=0, exc=exc)


def _sample_parallel(where: str, model: nn.Module, x: Tensor, y: Optional[Tensor], blocks: Optional[Sequence[Any]],
                     jac_kwargs: dict[str, Any]) -> tuple[list[ResidualJacobian], Any, Optional[Tensor], _Rows]:
    """Sample-parallel residual Jacobians (docs/distributed.md): this rank's operators on its own
    samples, the global sample count and offsets, and the gathered labels.

    Returns ``(ops, last_fn, labels, rows)``: ``ops`` this rank's own :class:`ResidualJacobian` s
    (on an empty rank: those of the shared probe sample, for their shapes only),
    ``last_fn(infos)`` this rank's block outputs [n, ...] of the given blocks, ``labels`` the
    gathered int64 CPU labels (None when not given), ``rows`` this rank's rows. A collective."""
    exc: Optional[BaseException] = None
    n_loc, probe = int(x.shape[0]), None
    if n_loc:
        probe = x[:1].detach().cpu()
    infos = gather_objects(where, (None, n_loc, probe, y is not None))
    counts = [i[1] for i in infos]
    N = sum(counts)
    if N == 0:
        raise ValueError(f"{where}: expected x with at least one sample on some rank, got none on any of the "
                         f"{len(counts)} ranks")
    if len({i[3] for i in infos}) > 1:
        raise ValueError(f"{where}: expected y given on every rank or on none, got it on ranks "
                         f"{[r for r, i in enumerate(infos) if i[3]]} only")
    first = next(i[2] for i in infos if i[2] is not None).to(x.device)
    template_x = x if n_loc else first
    templates: list[ResidualJacobian] = []
    try:
        templates = residual_jacobians(model, template_x, blocks, **jac_kwargs)
    except Exception as e:  # shared below: every rank raises it
        exc = e
    gathered = gather_objects(where, portable(exc))
    raise_first(where, gathered, exc)
    rows = _Rows(counts)
    lab = None
    if infos[0][3]:
        (lab,) = rows.gather([y.detach().to("cpu", torch.int64) if n_loc else torch.zeros(0, dtype=torch.int64)])

    def local_last(block_infos: list[BlockInfo]) -> list[Tensor]:
        if n_loc:
            return _last_outputs(model, x, block_infos)
        out_shape = {id(J.info): J.out_shape for J in templates}
        return [x.new_zeros((0, *out_shape[id(b)])) for b in block_infos]

    return templates, local_last, lab, rows


def _default_pairs(L: int) -> list[tuple[int, int]]:
    cand = [(0, 1), (0, L - 1), (L // 2, L // 2 + 1), (L - 1, 0), (L - 1, L - 2), (0, 0)]
    out: list[tuple[int, int]] = []
    for i, j in cand:
        if 0 <= i < L and 0 <= j < L and (i, j) not in out:
            out.append((i, j))
    return out[:4]


def _cross_row(U: Tensor, V: Tensor, ops: list[ResidualJacobian]) -> Tensor:
    """A_ij = U_i^T J_j V_i for every j: [L, N, k, k] float64."""
    rows = []
    for J in ops:
        Y = J.matmat(V)                                   # [N, D, k]
        rows.append(U.transpose(-1, -2).double() @ Y.double())
    return torch.stack(rows)


class _RankStop:
    """The adaptive stop of a sample-local randomized SVD (``randomized_svd(..., stop=)``): every
    rank holds other samples, yet all ranks must iterate as one process on all N samples does --
    until EVERY sample converged (or ``max_iters``). Each call is ONE all_reduce (float64, on the
    operator's device) of two flags per rank: "some problem of mine has not converged" and "I
    failed"; the sums give MIN over ranks of "all mine converged" and MAX of "failed", and the
    call returns True (stop) when every rank's problems converged or some rank failed. Every rank
    thus sees the same answer and runs the same iterations (the problems are independent: shared
    sketch, per-problem orthonormalisation), so each sample's result equals the single-process one.

    Collective-count discipline: the SVD calls it once per check (iterations + 1 times, at most
    ``max_iters + 1``, the same cap on every rank). A rank that runs no SVD (no samples) or whose
    SVD raised calls :meth:`finish`, which keeps calling the same all_reduce (contributing
    "converged", and "failed" if it failed) until the answer is stop or the cap is reached -- and
    not at all once an answer was already stop (``done``): the other ranks then left their loops.
    """

    def __init__(self, device: torch.device, max_iters: int) -> None:
        self.device, self.cap = device, max_iters + 1
        self.calls, self.done, self.failed = 0, False, False

    def __call__(self, conv: Tensor) -> bool:
        if self.done or self.calls >= self.cap:   # an invariant: a call past the end would hang the others
            raise RuntimeError("residual_alignment: the sample-local SVD stop was called after its last check")
        mine = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.failed:
            mine[1] = 1.0
        else:
            mine[0] = (~conv.all()).to(torch.float64)
        (red,) = rdist.all_reduce_sum([mine], fn="residual_alignment")
        not_converged, failed = red.tolist()      # one host transfer (the check's sync, as bool(conv.all()))
        self.calls += 1
        self.done = not_converged == 0 or failed > 0
        return self.done

    def finish(self, failed: bool) -> None:
        """After this rank's SVD (or none): join the other ranks' remaining checks."""
        self.failed = failed
        while not self.done and self.calls < self.cap:
            self(torch.ones(0, dtype=torch.bool, device=self.device))

    @property
    def iterations(self) -> int:
        """The iterations every rank ran ("subspace": one check per iteration, plus the first)."""
        return self.calls - 1


def _block_svd(i: int, J: ResidualJacobian, ops: list[ResidualJacobian], k: int, oversample: int,
               power_iters: Union[int, str], seed: int, tol: float, max_iters: int, rows: Optional[_Rows]
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Block i's randomized SVD and its cross row: ``(S [N, k], self-alignment |u_r . v_r| [N, k],
    converged [N], rel_error_bound [N, k], error_bound [N, k], A [L, N, k, k], iterations)``,
    float64 CPU. ``rows`` (sample-local mode): this rank's samples only, the per-sample results
    gathered (ONE all_reduce that also carries a failure); an empty rank runs no SVD and
    contributes no rows. Adaptive (``power_iters="auto"``) in sample-local mode: a
    :class:`_RankStop` makes every rank iterate as one process on all N samples (one all_reduce
    per check; an empty or failed rank joins the remaining checks)."""
    L = len(ops)
    exc: Optional[BaseException] = None
    out: Optional[tuple[Tensor, ...]] = None
    its = power_iters if isinstance(power_iters, int) else 0
    stop = _RankStop(J.h.device, max_iters) if rows is not None and power_iters == "auto" else None
    if rows is None or rows.n:
        try:
            with warnings.catch_warnings():   # one warning for the whole analysis instead (residual_alignment)
                warnings.filterwarnings("ignore", message="randomized_svd: power_iters='auto' stopped",
                                        category=RuntimeWarning)
                svd = randomized_svd(J, k, oversample=oversample, power_iters=power_iters, seed=seed,
                                     tol=tol, max_iters=max_iters, stop=stop)
            its = int(svd.iterations)
            out = (svd.S.double().cpu(), (svd.U.double() * svd.V.double()).sum(-2).abs().cpu(),
                   svd.converged.cpu(), svd.rel_error_bound.double().cpu(), svd.error_bound.double().cpu(),
                   _cross_row(svd.U, svd.V, ops).cpu().transpose(0, 1))           # [N, L, k, k]
            del svd
        except Exception as e:  # sample-local mode: raised on every rank by the gather
            if rows is None:
                raise
            exc = e
    if stop is not None:
        stop.finish(exc is not None)     # a rank without samples, or whose SVD raised, joins the others' checks
        its = stop.iterations
    if rows is not None:
        if out is None:
            f64 = dict(dtype=torch.float64)
            out = (torch.zeros(rows.n, k, **f64), torch.zeros(rows.n, k, **f64), torch.zeros(rows.n, dtype=torch.bool),
                   torch.zeros(rows.n, k, **f64), torch.zeros(rows.n, k, **f64), torch.zeros(rows.n, L, k, k, **f64))
        out = tuple(rows.gather(list(out), exc))
    assert out is not None
    S, selfr, converged, rel_bound, err_bound, A = out
    return S, selfr, converged, rel_bound, err_bound, A.transpose(0, 1), its


def _stage(stage_no: int, ops: list[ResidualJacobian], indices: list[int], last_out: Tensor, k: int,
           C: int, oversample: int, power_iters: Union[int, str], tol: float, max_iters: int, tau: float,
           seed: int, offset: int, bar: Any, rows: Optional[_Rows] = None) -> StageAlignment:
    """One stage's metrics. ``rows`` (sample-local mode of a sample-parallel run): ``ops`` are
    this rank's own Jacobians (its ``rows.n`` samples; none on an empty rank) and ``last_out``
    its rows; the trajectories and the per-sample SVD results are gathered for the metrics."""
    L = len(ops)
    if rows is not None and not rows.n:   # an empty rank: its ops hold the probe sample, for the shapes only
        traj = last_out.new_zeros((0, L + 1, *last_out.shape[1:]))
    else:
        traj = torch.stack([J.h for J in ops] + [last_out], dim=1)       # [N, L+1, *shape] (or this rank's rows)
    if rows is not None:
        (traj,) = rows.gather([traj])
    N = traj.shape[0]
    ra1 = trajectory_metrics(traj)
    pca, explained = trajectory_pca(traj)
    del traj
    pairs = _default_pairs(L)
    r_self = min(C, k)
    # the stage's results live on the host (filled from .cpu() copies, one block at a time)
    host = torch.device("cpu")
    S_all = torch.empty(L, N, k, dtype=torch.float64, device=host)
    self_r = torch.empty(L, N, k, dtype=torch.float64, device=host)
    dr = torch.empty(L, L, N, dtype=torch.float64, device=host)
    pos = torch.empty(L, L, dtype=torch.float64, device=host)
    cross_abs = torch.zeros(len(pairs), k, k, dtype=torch.float64, device=host)
    cross_diag = torch.zeros(len(pairs), k, dtype=torch.float64, device=host)
    iters: list[int] = []
    conv = torch.empty(L, dtype=torch.float64, device=host)
    rel_max = torch.empty(L, dtype=torch.float64, device=host)
    abs_max = torch.empty(L, dtype=torch.float64, device=host)
    for i, J in enumerate(ops):
        S, selfr, converged, rel_bound, err_bound, A, its = _block_svd(
            i, J, ops, k, oversample, power_iters, seed + offset + i, tol, max_iters, rows)
        S_all[i] = S
        self_r[i] = selfr
        iters.append(its)
        conv[i] = converged.double().mean()
        s1 = S[..., :1]
        resolved = S > tau * s1
        rel = torch.where(resolved, rel_bound, torch.zeros_like(rel_bound))
        rel_max[i] = float(rel.max()) if bool(resolved.any()) else math.nan
        abs_max[i] = float((err_bound / s1).max()) if bool((s1 > 0).all()) else math.nan
        dr[i] = diag_ratio(A)
        # only the resolved triplets of block i (s_r > tau s_1, as for the rank): a rounding-level
        # singular pair has arbitrary vectors, and the sign of u_r^T J_j v_r would be noise
        res_n = int(resolved.sum())
        pos[i] = (((A.diagonal(dim1=-2, dim2=-1) > 0) & resolved).sum((-2, -1)).double() / res_n if res_n
                  else torch.full((L,), math.nan, dtype=torch.float64))
        for p, (a, b) in enumerate(pairs):
            if a == i:
                cross_abs[p] = A[b].abs().mean(0)
                cross_diag[p] = A[b].diagonal(dim1=-2, dim2=-1).mean(0)
        bar.set_postfix_str(f"stage {stage_no}, {J.info.name}: {iters[-1]} power iterations")
        bar.update(1)
    sv_m, sv_s = _mean_std(S_all, 1)
    sa_m, sa_s = _mean_std(self_r[..., :r_self].mean(-1), 1)
    dr_m, dr_s = _mean_std(dr, 2)
    ranks = numerical_rank(S_all, tau)                                    # [L, N]
    rk_m, rk_s = _mean_std(ranks.double(), 1)
    shape = tuple(ops[0].in_shape)
    D = int(math.prod(shape))
    cap = k if k < D else None                                            # k = D: the rank is exact
    capped = (ranks >= k) if cap is not None else torch.zeros_like(ranks, dtype=torch.bool)
    rank_le_c = (ranks <= C).double().mean(1)
    if k <= C:   # a capped rank (>= k) may or may not be <= C
        rank_le_c = torch.where(capped.any(1), torch.full_like(rank_le_c, math.nan), rank_le_c)
    if k > C:
        sC, sC1 = S_all[..., C - 1], S_all[..., C]
        gap = torch.where(sC > 0, sC1 / sC, torch.full_like(sC, math.nan))
        gap_m, gap_s = _mean_std(gap, 1)
    else:
        gap_m = gap_s = None
    s1_m, s1_s = _mean_std(S_all[..., 0], 1)
    return StageAlignment(
        stage=stage_no, block_names=[J.info.name for J in ops], block_indices=indices, shape=shape,
        dim=D, k=k,
        linearity=ra1["linearity"], equispacing=ra1["equispacing"], step_cosine=ra1["step_cosine"],
        pca=pca, pca_explained=explained,
        singular_values_mean=sv_m, singular_values_std=sv_s,
        self_alignment_mean=sa_m, self_alignment_std=sa_s,
        diag_ratio_mean=dr_m, diag_ratio_std=dr_s, diag_positive=pos,
        cross_pairs=pairs, cross_abs_mean=cross_abs, cross_diag_mean=cross_diag,
        rank_mean=rk_m, rank_std=rk_s, rank_min=ranks.min(1).values, rank_max=ranks.max(1).values,
        rank_le_c=rank_le_c,
        gap_ratio_mean=gap_m, gap_ratio_std=gap_s,
        sigma1_mean=s1_m, sigma1_std=s1_s, depth_product=float(L * s1_m.mean()),
        num_classes=C, self_alignment_r=r_self, self_alignment_per_r=self_r.mean(1),
        rank_cap=cap, rank_capped=capped.double().mean(1),
        depth_product_excl_first=float(L * s1_m[1:].mean()) if L >= 2 else None,
        svd_iterations=iters, svd_converged=conv, svd_max_rel_error_bound=rel_max,
        svd_max_error_bound_sigma1=abs_max,
    )


def _classifier_classes(model: nn.Module) -> tuple[Optional[int], str]:
    """C from the model's classifier: the first of ``model.head``, ``model.fc``,
    ``model.classifier`` that is an nn.Linear or contains one (its last nn.Linear's
    out_features), else the last nn.Linear (in ``named_modules`` order) outside the residual
    blocks; (None, "") when there is none."""
    for name in ("head", "fc", "classifier"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            lins = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            if lins:
                return int(lins[-1].out_features), f"model.{name}" + ("" if lins[-1] is mod else " (last nn.Linear)")
    inside: set[int] = set()
    for b in residual_blocks(model):
        inside.update(id(m) for m in b.block.modules())
    last: Optional[tuple[str, nn.Linear]] = None
    for qn, m in model.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in inside:
            last = (qn, m)
    if last is not None:
        return int(last[1].out_features), f"last nn.Linear outside the residual blocks ({last[0]})"
    return None, ""


def residual_alignment(
    model: nn.Module,
    x: Tensor,
    k: Optional[int] = None,
    y: Optional[Tensor] = None,
    *,
    blocks: Optional[Sequence[Any]] = None,
    per_stage: bool = False,
    num_classes: Optional[int] = None,
    oversample: int = 10,
    power_iters: Union[int, str, None] = None,
    tol: float = DEFAULT_TOL,
    max_iters: int = DEFAULT_MAX_ITERS,
    tau: float = 1e-2,
    path: str = "auto",
    chunk_size: Optional[int] = None,
    seed: int = 0,
    deterministic: bool = False,
    progress: bool = False,
    distributed: Optional[str] = None,
) -> AlignmentResult:
    """Residual Alignment RA1-RA4 of ``model`` at the inputs ``x`` (docs/science.md section 1).

    Jacobians are those of the residual branches alone, in eval mode (BatchNorm running
    statistics), at the block inputs of ``x``; top-k singular triplets per sample and block come
    from :func:`resgeom_fast.linalg.randomized_svd` (oversampling ``oversample``; by default
    adaptive: power iterations until every singular value s_1..s_k has a relative error bound
    <= ``tol``) of the batched :func:`resgeom_fast.operators.residual_jacobians`. See the
    module docstring for the metrics and the readings chosen.

    Args:
        model: a model whose residual blocks :func:`resgeom_fast.operators.residual_blocks` finds.
        x: [N, ...] inputs, on the model's device and in its floating dtype.
        k: singular triplets per block, 1 <= k <= D (the smallest block dimension among the
            stages). Default: C + 5, capped at D.
        y: optional [N] integer class labels in [0, C) (plot colours only; never used for C).
        blocks: None (all residual blocks) or a selection (indices, block modules, BlockInfo s).
        per_stage: analyse each stage (maximal run of consecutive blocks of one shape) separately;
            required when the blocks do not all share one input/output shape.
        num_classes: C. Default: the classifier's out_features -- the first of ``model.head``,
            ``model.fc`` (torchvision), ``model.classifier`` that is an nn.Linear or contains one
            (its last nn.Linear), else the last nn.Linear of the model outside its residual
            blocks; a model with none needs ``num_classes`` (C is never inferred from labels:
            a batch need not contain every class).
        oversample: randomized SVD oversampling p >= 0.
        power_iters: None or "auto" (default): adaptive, iterate until tol is met (at most
            ``max_iters`` iterations); an int q >= 0: exactly q power iterations (the result
            still records the accuracy reached, and a warning names an unconverged run).
        tol: relative tolerance of the adaptive mode on s_1..s_k, in (0, 1) (default 1e-3).
        max_iters: cap on the adaptive iterations (default 50).
        tau: relative threshold of the numerical rank, in (0, 1).
        path, chunk_size: passed to :func:`resgeom_fast.operators.residual_jacobians`.
        seed: seed of the Gaussian sketches (block b of the selection uses ``seed + b``).
        deterministic: accepted for the API-wide flag and passed on to
            :func:`resgeom_fast.operators.residual_jacobians` when that function takes it. The
            alignment makes no timing-based choice (the path choice is structural, the sketches
            are seeded), so it is deterministic given ``seed`` with either value (bit for bit on
            one machine and thread count).
        progress: show a progress bar that ticks once per analysed block (SVD and cross
            alignment done), with the block's power iterations (plain lines off a TTY).
        distributed: None (one process), or sample-parallel in an initialised torch.distributed
            group (docs/distributed.md): ``"split"`` every rank passes the same full ``x`` (and
            ``y``) and computes the Jacobian products of its contiguous block of samples
            (:func:`resgeom_fast.core.distributed.shard_sizes`); ``"sharded"`` every rank passes
            its own samples (possibly none: x [0, ...]; the global order is rank 0's samples,
            then rank 1's, ...). Every sample's SVD is independent of the others (one shared
            sketch), so each rank runs the randomized SVDs and the cross products of its OWN
            samples only (it holds its samples' block inputs and SVD blocks [n, D, k + p]); the
            per-sample results (singular values, bounds, the cross rows [L, n, k, k]), the
            stage's trajectories and the labels are gathered to every rank for the metrics (one
            all_reduce each). With the adaptive default (``power_iters=None``) the iterations
            stop when EVERY sample of all ranks has converged (or after ``max_iters``): each
            check of the randomized SVD is one all_reduce of the ranks' "all mine converged" and
            "I failed" flags (``randomized_svd(stop=)``), so every rank runs the same iterations
            as one process on all N samples. Either way every rank computes the metrics, equal
            to the single-process result. A collective: every rank calls it with the same model (its parameters are
            compared with rank 0's: DivergentRanksError on every rank) and arguments.

    Returns:
        an :class:`AlignmentResult` (float64 CPU tensors), one :class:`StageAlignment` per stage.

    Raises:
        ValueError: blocks of different shapes without ``per_stage``; k larger than D; x not on the
            model's device / dtype; bad settings. TypeError: arguments of the wrong type.
    """
    where = "residual_alignment"
    check_module(where, "model", model)
    check_type(where, "x", x, Tensor, "a torch.Tensor [N, ...]")
    device, dtype = model_device_dtype(where, model)
    mode = check_mode(where, distributed)
    if x.device != device:
        raise ValueError(f"{where}: expected x on the model's device {device}, got {x.device}")
    if not x.is_floating_point() or x.dtype != dtype:
        raise ValueError(f"{where}: expected x of dtype {dtype} (the model's), got {x.dtype}")
    if x.dim() < 1 or (x.shape[0] < 1 and mode != "sharded"):
        raise ValueError(f"{where}: expected x with a non-empty batch dimension [N, ...], got {tuple(x.shape)}")
    N = x.shape[0]
    labels: Optional[Tensor] = None
    if y is not None:
        check_type(where, "y", y, Tensor, "a torch.Tensor [N] of class labels or None")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or tuple(y.shape) != (N,):
            raise ValueError(f"{where}: expected y integer class labels of shape [{N}], got {y.dtype} "
                             f"{tuple(y.shape)}")
        labels = y.detach().to("cpu", torch.int64)
        if bool((labels < 0).any()):
            raise ValueError(f"{where}: expected y non-negative class labels, got min {int(labels.min())}")
    check_type(where, "per_stage", per_stage, bool, "a bool")
    check_int(where, "oversample", oversample, 0)
    if power_iters is None or power_iters == "auto":
        power_iters = "auto"
    elif isinstance(power_iters, bool) or not isinstance(power_iters, int):
        raise TypeError(f"{where}: expected power_iters an int >= 0, 'auto' or None, got {type(power_iters).__name__}"
                        + (f" {power_iters!r}" if isinstance(power_iters, str) else ""))
    else:
        check_int(where, "power_iters", power_iters, 0)
    tol = check_float(where, "tol", tol, 0.0, 1.0, open_lo=True)
    if tol >= 1.0:
        raise ValueError(f"{where}: expected tol in (0, 1), got {tol}")
    check_int(where, "max_iters", max_iters, 0)
    check_type(where, "deterministic", deterministic, bool, "a bool")
    check_type(where, "progress", progress, bool, "a bool")
    tau = check_float(where, "tau", tau, 0.0, 1.0, open_lo=True)
    check_int(where, "seed", seed, 0)
    check_choice(where, "path", path, _PATHS)
    if chunk_size is not None:
        check_int(where, "chunk_size", chunk_size, 1)
    if num_classes is not None:
        C = check_int(where, "num_classes", num_classes, 1)
        c_source = "num_classes argument"
    else:
        got, c_source = _classifier_classes(model)
        if got is None:
            raise ValueError(f"{where}: cannot infer the number of classes C (the model has no nn.Linear classifier: "
                             "no `head`, `fc` or `classifier` and no nn.Linear outside its residual blocks): pass "
                             "num_classes (C is never inferred from the labels of a batch)")
        C = got
    if labels is not None and labels.numel() and int(labels.max()) >= C:
        raise ValueError(f"{where}: expected y class labels in [0, {C}) (num_classes C = {C} from the {c_source}), "
                         f"got max {int(labels.max())}")

    # every sample's SVD is independent of the others (shared sketch, per-problem orthonormalisation),
    # so each rank keeps its own samples in both modes; "auto" stops when EVERY sample converged, a
    # global decision that _RankStop takes with one all_reduce per check, so every rank runs the
    # iterations of one process on all N samples
    sample_local = mode is not None
    jac_kwargs: dict[str, Any] = {"path": path, "chunk_size": chunk_size}
    if "deterministic" in inspect.signature(residual_jacobians).parameters:
        jac_kwargs["deterministic"] = deterministic
    if mode is None:
        ops = residual_jacobians(model, x, blocks, **jac_kwargs)
    else:
        x_loc, y_loc = _local_rows(where, mode, x, y)
        check_model(where, model)     # a collective: the ranks' products are combined
        ops, last_fn, gathered_labels, rows = _sample_parallel(where, model, x_loc, y_loc, blocks, jac_kwargs)
        N = rows.N
        labels = gathered_labels if labels is not None else None
    all_ids = {id(b.block): i for i, b in enumerate(residual_blocks(model))}
    idx = [all_ids.get(id(J.info.block), -1) for J in ops]

    # stages: maximal runs of consecutive shape-preserving blocks of one shape
    groups: list[list[int]] = []
    skipped: list[dict[str, Any]] = []
    for b, J in enumerate(ops):
        if J.in_shape != J.out_shape:
            skipped.append({"name": J.info.name, "index": idx[b], "in_shape": list(J.in_shape),
                            "out_shape": list(J.out_shape)})
            groups.append([])
            continue
        if groups and groups[-1] and ops[groups[-1][-1]].in_shape == J.in_shape:
            groups[-1].append(b)
        else:
            groups.append([b])
    groups = [g for g in groups if g]
    if not per_stage and (skipped or len(groups) > 1):
        shapes = sorted({(tuple(J.in_shape), tuple(J.out_shape)) for J in ops})
        desc = ", ".join(f"{list(a)}->{list(o)}" for a, o in shapes)
        raise ValueError(f"{where}: the analysis needs equal widths across blocks (every block input and output "
                         f"of one shape, a Type-1 net), but the blocks have shapes {desc}; pass per_stage=True "
                         "to analyse each stage (a run of blocks of one shape) separately")
    if not groups:
        raise ValueError(f"{where}: no stage to analyse: every selected block changes the shape of h")
    dims = [math.prod(ops[g[0]].in_shape) for g in groups]
    d_min = min(dims)
    if k is None:
        k = min(C + 5, d_min)
    else:
        check_int(where, "k", k, 1, d_min,
                  hint=f" (the block dimension D = {d_min} of stage {dims.index(d_min)} is the limit)")

    last_blocks = [ops[g[-1]].info for g in groups]
    local_exc: Optional[BaseException] = None
    try:
        last = _last_outputs(model, x, last_blocks) if mode is None else last_fn(last_blocks)
        for J in ops:
            if not bool(torch.isfinite(J.h).all()):
                raise ValueError(f"{where}: the input of block {J.info.name!r} has non-finite values (NaN or inf) at "
                                 "x; check the model (diverged training?) and the data")
        for g, h in zip(groups, last):
            if not bool(torch.isfinite(h).all()):
                raise ValueError(f"{where}: the output of block {ops[g[-1]].info.name!r} has non-finite values "
                                 "(NaN or inf) at x; check the model (diverged training?) and the data")
    except Exception as e:
        if not sample_local:
            raise
        local_exc = e
    if sample_local:   # each rank checked its own samples: a failure on one rank raises on every rank
        rdist.raise_together(where, local_exc)
    with _progress_bar(sum(len(g) for g in groups), where, enabled=progress, unit="blocks") as bar:
        stages = [
            _stage(s, [ops[b] for b in g], [idx[b] for b in g], last[s], k, C, oversample, power_iters, tol,
                   max_iters, tau, seed, g[0], bar, rows if sample_local else None)
            for s, g in enumerate(groups)
        ]
    res = AlignmentResult(stages=stages, labels=labels, num_classes=C, k=k, oversample=oversample,
                          power_iters=power_iters, tau=tau, seed=seed, path=path, n_samples=N,
                          per_stage=per_stage, skipped_blocks=skipped, tol=tol, max_iters=max_iters,
                          deterministic=deterministic, num_classes_source=c_source)
    acc = res.accuracy()
    if not acc["all_converged"]:
        how = (f"{power_iters} fixed power iterations" if power_iters != "auto"
               else f"max_iters={max_iters} adaptive iterations")
        warnings.warn(
            f"{where}: the randomized SVD did not reach tol={tol:g} in {how} for "
            f"{100 * (1 - acc['converged_fraction']):.0f}% of the block-samples (largest relative error bound "
            f"{acc['max_rel_error_bound']:.3g}); singular values and vectors are less accurate than tol -- the result "
            "records it (accuracy(), summary svd_converged=False); use power_iters=None (adaptive) or raise max_iters",
            RuntimeWarning, stacklevel=2)
    return res


# -- RA4 across depths --------------------------------------------------------------------------
def depth_scaling(results: Sequence[AlignmentResult]) -> dict[str, Any]:
    """RA4 across nets of several depths: is L * mean_l sigma_1 nearly constant in L?

    Args:
        results: one :class:`AlignmentResult` per net (same number of stages each).

    Returns:
        JSON-friendly dict. ``stages``: per stage, ``depths`` (L of each net), ``mean_sigma1``
        (mean over blocks of sigma_1), ``products`` (L * mean_sigma1), ``relative_spread``
        ((max - min) / mean of the products), ``cv`` (population std / mean of the products) and
        ``slope`` (least-squares slope of log mean_sigma1 against log L; -1 is exact 1/L scaling;
        None with fewer than two distinct depths); the same without each net's first block
        (``mean_sigma1_excl_first``: mean over l >= 2; ``products_excl_first``: L * that;
        ``relative_spread_excl_first``, ``cv_excl_first``, ``slope_excl_first``; None where a net
        has one block) and ``first_block_ratio`` per net (sigma_1 of block 1 / mean of the others).
        The keys of stage 0 are repeated at the top.
    """
    where = "depth_scaling"
    if isinstance(results, AlignmentResult) or not isinstance(results, Sequence) or len(results) == 0:
        raise ValueError(f"{where}: expected results a non-empty sequence of AlignmentResult")
    for i, r in enumerate(results):
        check_type(where, f"results[{i}]", r, AlignmentResult, "an AlignmentResult")
    n_st = len(results[0].stages)
    if any(len(r.stages) != n_st for r in results):
        raise ValueError(f"{where}: expected every result to have the same number of stages, got "
                         f"{[len(r.stages) for r in results]}")
    def scaling(depths: list[int], ms1: list[float]) -> tuple[list[float], float, float, Optional[float]]:
        prods = [L * m for L, m in zip(depths, ms1)]
        pt = torch.tensor(prods, dtype=torch.float64, device="cpu")      # host floats: host math
        mean = float(pt.mean())
        spread = (float(pt.max() - pt.min()) / mean) if mean > 0 else math.nan
        cv = (float(pt.std(unbiased=False)) / mean) if mean > 0 else math.nan
        slope = None
        if len(set(depths)) >= 2 and all(m > 0 for m in ms1):
            lx = torch.tensor(depths, dtype=torch.float64, device="cpu").log()
            ly = torch.tensor(ms1, dtype=torch.float64, device="cpu").log()
            lxc = lx - lx.mean()
            slope = float((lxc * (ly - ly.mean())).sum() / lxc.square().sum())
        return prods, spread, cv, slope

    stages = []
    for s in range(n_st):
        depths = [r.stages[s].num_blocks for r in results]
        ms1 = [float(r.stages[s].sigma1_mean.mean()) for r in results]
        prods, spread, cv, slope = scaling(depths, ms1)
        entry: dict[str, Any] = {"depths": depths, "mean_sigma1": ms1, "products": prods, "relative_spread": spread,
                                 "cv": cv, "slope": slope,
                                 "first_block_ratio": [r.stages[s].first_block_ratio for r in results]}
        if all(L >= 2 for L in depths):
            ms1x = [float(r.stages[s].sigma1_mean[1:].mean()) for r in results]
            px, sx, cx, slx = scaling(depths, ms1x)
            entry.update({"mean_sigma1_excl_first": ms1x, "products_excl_first": px,
                          "relative_spread_excl_first": sx, "cv_excl_first": cx, "slope_excl_first": slx})
        else:
            entry.update({"mean_sigma1_excl_first": None, "products_excl_first": None,
                          "relative_spread_excl_first": None, "cv_excl_first": None, "slope_excl_first": None,
                          "excl_first_reason": "a net has a one-block stage: no block after the first"})
        stages.append(entry)
    out: dict[str, Any] = dict(stages[0])
    out["stages"] = stages
    return to_jsonable(out)


# -- plots --------------------------------------------------------------------------------------
# Every plot draws from the dict form (``result.to_dict()`` or results.json) through
# resgeom_fast.analysis.plotting: ``result`` is an AlignmentResult, its to_dict(), or a results
# dict holding that dict at the path ``at``; the tagged artists name paths of that dict.
_REQUIRED = ("settings", "labels", "stages")


def _stage_of(where: str, result: Any, stage: int, at: str) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """``(root, at, d, stage path)`` of the dict form (checks ``stage``)."""
    root, at, d = as_result_dict(where, result, AlignmentResult, at, _REQUIRED)
    check_int(where, "stage", stage, 0, len(d["stages"]) - 1)
    return root, at, d, join(at, f"stages.{stage}")


def _fmt(v: Optional[float], spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def plot_trajectories(result: Union[AlignmentResult, dict[str, Any]], ax: Any = None, stage: int = 0, *,
                      at: str = "") -> "Figure":
    """2-D PCA of the trajectories of one stage (``ra1.pca``), one line per sample, coloured by
    class (``labels``; one colour without labels); a dot marks h_0.

    Returns the matplotlib Figure.
    """
    root, at, d, sp = _stage_of("plot_trajectories", result, stage, at)
    st = get_path(root, sp) if sp else d
    fig, ax = figure_axes(ax, (5.0, 4.0))
    cmap = "tab10" if d["settings"]["num_classes"] <= 10 else "tab20"
    pca_trajectories(ax, root, join(sp, "ra1.pca"), join(at, "labels") if d["labels"] is not None else None, "",
                     cmap=cmap)
    ev = st["ra1"]["pca_explained"]
    ax.set_xlabel(f"PC 1 ({_fmt(None if ev[0] is None else 100 * ev[0], '.0f')}%)")
    ax.set_ylabel(f"PC 2 ({_fmt(None if ev[1] is None else 100 * ev[1], '.0f')}%)")
    ax.set_title(f"trajectories, stage {st['stage']} (linearity {_fmt(st['ra1']['linearity_mean'], '.3f')})")
    return fig


def plot_singular_values(result: Union[AlignmentResult, dict[str, Any]], ax: Any = None, stage: int = 0, *,
                         at: str = "") -> "Figure":
    """Mean singular values of each block's residual Jacobian (``ra3.singular_values_mean``),
    log scale, one line per block coloured by depth; a dashed line at r = C.

    Returns the matplotlib Figure.
    """
    root, at, d, sp = _stage_of("plot_singular_values", result, stage, at)
    st = get_path(root, sp) if sp else d
    fig, ax = figure_axes(ax, (5.0, 4.0))
    C, L = d["settings"]["num_classes"], len(st["block_indices"])
    spectra_per_block(ax, root, join(sp, "ra3.singular_values_mean"), f"residual Jacobian spectra, stage {st['stage']}",
                      num_classes=C if C <= st["k"] else None,
                      block_labels=[f"block {i}" for i in st["block_indices"]] if L <= 12 else None)
    ax.set_xlabel("index r")
    ax.set_ylabel("mean sigma_r(J_l)")
    return fig


def plot_cross_alignment(result: Union[AlignmentResult, dict[str, Any]], ax: Any = None, stage: int = 0,
                         pairs: Optional[Sequence[tuple[int, int]]] = None, *, at: str = "") -> "Figure":
    """Heatmaps of the sample mean of |A_ij| = |U_i^T J_j V_i| (``ra2.cross_abs_mean``) for the
    stored pairs (``ra2.cross_pairs``, stage-local block indices) or the subset ``pairs``.

    ``ax``: None (a new figure, one panel per pair), one Axes (exactly one pair) or a sequence of
    Axes (one per pair). Returns the matplotlib Figure.
    """
    where = "plot_cross_alignment"
    root, at, d, sp = _stage_of(where, result, stage, at)
    ra2 = (get_path(root, sp) if sp else d)["ra2"]
    stored = [tuple(p) for p in ra2["cross_pairs"]]
    if pairs is None:
        chosen = stored if (ax is None or isinstance(ax, (list, tuple))) else stored[:1]
    else:
        chosen = [tuple(p) for p in pairs]
        bad = [p for p in chosen if p not in stored]
        if bad or not chosen:
            raise ValueError(f"{where}: expected pairs a non-empty subset of the stored pairs {stored}, "
                             f"got {list(pairs)}")
    if ax is None:
        fig, axes = pyplot().subplots(1, len(chosen), figsize=(3.8 * len(chosen), 3.3), squeeze=False,
                                      constrained_layout=True)
        axes = list(axes[0])
    elif isinstance(ax, (list, tuple)):
        axes = list(ax)
        if len(axes) != len(chosen):
            raise ValueError(f"{where}: expected {len(chosen)} axes for pairs {chosen}, got {len(axes)}")
        fig = axes[0].figure
    else:
        if len(chosen) != 1:
            raise ValueError(f"{where}: one Axes draws one pair; got pairs {chosen}")
        axes, fig = [ax], ax.figure
    panels = [(f"mean |A_{i},{j}| (diag ratio {_fmt(ra2['diag_ratio_mean'][i][j], '.2f')})",
               join(sp, f"ra2.cross_abs_mean.{stored.index((i, j))}")) for i, j in chosen]
    heatmaps(axes, root, panels, fig)
    for a in axes:
        a.set_xlabel("s")
        a.set_ylabel("r")
    return fig


def plot_sigma1(result: Union[AlignmentResult, dict[str, Any]], ax: Any = None, *, at: str = "") -> "Figure":
    """sigma_1(J_l) per block (``ra4.sigma1_mean`` with ``sigma1_std`` error bars) against the
    block's index in the model, one series per stage. Returns the matplotlib Figure."""
    root, at, d = as_result_dict("plot_sigma1", result, AlignmentResult, at, _REQUIRED)
    fig, ax = figure_axes(ax, (5.0, 4.0))
    for s, st in enumerate(d["stages"]):
        sp = join(at, f"stages.{s}")
        x, y = join(sp, "block_indices"), join(sp, "ra4.sigma1_mean")
        lines(ax, root, [(f"stage {st['stage']}: L*mean = {_fmt(st['ra4']['depth_product'], '.3g')}", x, y)],
              styles=[{"ms": 3, "color": f"C{s}"}], legend=False)
        errorbars(ax, root, x, y, join(sp, "ra4.sigma1_std"), color=f"C{s}")
    ax.set_xlabel("block")
    ax.set_ylabel("sigma_1(J_l)")
    ax.set_title("top singular value per block")
    ax.legend(fontsize=7)
    return fig
