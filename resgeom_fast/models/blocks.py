"""The residual block protocol and the skip / scalar modules it is built from.

Every residual block of this package is a :class:`ResidualBlock`::

    forward(h) = post(skip(h) + scale * branch(h))

with

- a subclass of :class:`~resgeom_fast.core.blocks.ResidualBlockBase` (``resgeom_block = True``):
  :func:`resgeom_fast.core.blocks.residual_blocks` recognises it by ``isinstance``,
- ``branch``: the residual branch F_l, an ``nn.Module`` (for the known families an
  ``nn.Sequential`` of standard layers, so that a fast path can recognise it),
- ``skip``: Q_l -- ``nn.Identity()`` ("identity"), :class:`ZeroSkip` ("none"),
  :class:`OrthogonalSkip` ("orthogonal"), a ``conv1x1 + BN`` downsample in staged ResNets, or
  :class:`ScaledIdentity` (leaky ResNets),
- ``scale``: lam_l, a python ``float`` or an ``nn.Parameter`` (skipinit: learnable, init 0),
- ``post``: ``nn.Identity()`` for "Type 1" nets, ``nn.ReLU()`` for torchvision-style staged
  ResNets that apply ReLU after the addition.

Hyper-residual connections (``hyper=True``, docs/science.md section 2, our reading). Block l receives,
besides its input h_{l-1}, the mean of all *earlier* block outputs that are not its input::

    h_l = post( Q_l h_{l-1} + lam_l F_l(h_{l-1}) + m_l ),
    m_l = mean_{k = 0 .. l-2} h_k            (m_1 = 0: block 1 has no earlier outputs),

where h_0 = stem(x). h_{l-1} itself enters only through Q_l, so it is not counted twice. In
staged ResNets the mean runs over those earlier outputs h_k (k <= l-2) that have the same shape as
the block's output (in practice the earlier outputs of the same stage); m_l = 0 where there are
none. ``branch`` stays the pure F_l: the residual
Jacobian J_l = dF_l/dh is unaffected, and the network (not the block) supplies m_l, through
``forward(h, earlier_mean=m_l)``. Called on its own (``block(h)``) a block computes
``post(Q_l h + lam_l F_l(h))``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# the protocol's base class and the module types the fast paths recognise live on the bottom
# floor (core.blocks); ZeroSkip, ScalarBias and ScalarMultiplier are re-exported here
from resgeom_fast.core.blocks import ResidualBlockBase, ScalarBias, ScalarMultiplier, ZeroSkip

from ._options import check_drop_prob

__all__ = [
    "ResidualBlock",
    "ZeroSkip",
    "OrthogonalSkip",
    "ScaledIdentity",
    "ScalarBias",
    "StochasticDepth",
    "ScalarMultiplier",
    "random_orthogonal",
    "fixup_factor",
]


class ResidualBlock(ResidualBlockBase):
    """One residual block: ``forward(h) = post(skip(h) + scale * branch(h) [+ earlier_mean])``.

    Args:
        branch: the residual branch F_l, mapping h_{l-1} to the shape of the block output.
        skip: Q_l, mapping h_{l-1} to the shape of the block output.
        scale: lam_l, a python float (fixed) or an ``nn.Parameter`` (learnable, e.g. skipinit).
        post: module applied after the sum (``nn.Identity()`` if None).

    Shapes: h is [N, D] for fully-connected blocks, [N, C, H, W] for convolutional blocks.
    """

    resgeom_block = True

    def __init__(
        self,
        branch: nn.Module,
        skip: nn.Module,
        scale: Union[float, nn.Parameter] = 1.0,
        post: Optional[nn.Module] = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.skip = skip
        if isinstance(scale, nn.Parameter):
            self.scale = scale
        else:
            self.scale = float(scale)
        self.post = post if post is not None else nn.Identity()

    def residual(self, h: Tensor) -> Tensor:
        """``skip(h) + scale * branch(h)``, the pre-``post`` sum without hyper connections."""
        return self.skip(h) + self.scale * self.branch(h)

    def forward(self, h: Tensor, earlier_mean: Optional[Tensor] = None,
                hyper_sums: Optional[dict] = None) -> Tensor:
        """Block output ``post(skip(h) + scale * branch(h) [+ earlier_mean])``.

        Args:
            h: block input h_{l-1}.
            earlier_mean: the hyper-residual term m_l (same shape as the output), or None.
            hyper_sums: the network's running sums ``{per-sample shape: [sum, count]}`` of earlier
                outputs; the entry matching this block's output shape adds ``sum / count``
                (how :class:`~resgeom_fast.models.network.ResidualNetwork` applies hyper).
        """
        out = self.residual(h)
        if hyper_sums is not None:
            entry = hyper_sums.get(tuple(out.shape[1:]))
            if entry is not None:
                out = out + entry[0] / entry[1]
        if earlier_mean is not None:
            out = out + earlier_mean
        return self.post(out)

    def extra_repr(self) -> str:
        if isinstance(self.scale, nn.Parameter):
            return "scale=learnable"
        return f"scale={self.scale:.6g}"


class StochasticDepth(nn.Module):
    """Stochastic depth (Huang et al. 2016) as the last layer of a residual branch.

    Train mode: the whole branch output is kept or dropped, once per forward call (one Bernoulli
    draw per mini-batch, as in the paper), with drop probability ``p``: ``z * b``, b = 1 with
    probability 1 - p, else 0, so a dropped branch makes the block exactly its skip
    (``skip(h) + scale * 0``). The draw comes from the global RNG on z's device (like
    ``nn.Dropout``; :func:`resgeom_fast.train.train` seeds it). Eval mode: ``(1 - p) z``, the
    expected branch (Huang et al.'s test-time rescaling; deterministic).

    It sits inside ``branch`` (an ``nn.Sequential``), so the residual-block protocol
    ``post(skip(h) + scale * branch(h))`` holds in eval mode and the residual Jacobian of the
    block is that of the branch as the eval-mode net applies it: ``(1 - p) dF/dh``. It holds no
    parameters or buffers (a net's state dict is the same with and without it).

    Args:
        p: drop probability in [0, 1).

    Shapes: z any shape -> the same shape.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = check_drop_prob("p", p)

    def forward(self, z: Tensor) -> Tensor:
        if not self.training:
            return z * (1.0 - self.p)
        if self.p == 0.0:
            return z
        keep = (torch.rand((), device=z.device) >= self.p).to(z.dtype)   # one draw per call
        return z * keep

    def extra_repr(self) -> str:
        return f"p={self.p:.6g}"


def random_orthogonal(dim: int, generator: Optional[torch.Generator] = None,
                      dtype: torch.dtype = torch.float32) -> Tensor:
    """A Haar-distributed random orthogonal matrix [dim, dim] (QR of a Gaussian, sign-fixed)."""
    g = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    return (q * d).to(dtype)


class OrthogonalSkip(nn.Module):
    """Q_l = a fixed random orthogonal matrix (a buffer ``weight`` [D, D], never trained).

    Fully-connected (``conv=False``): Q h = h @ weight.T for h [N, D].
    Convolutional (``conv=True``): an orthogonal 1x1 channel mixing, D = channels, h [N, D, H, W].

    Args:
        dim: D.
        conv: channel mixing of images instead of a matrix on vectors.
        generator: source of randomness (a ``torch.Generator``); required for reproducibility.
    """

    def __init__(self, dim: int, conv: bool = False, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.conv = bool(conv)
        self.register_buffer("weight", random_orthogonal(dim, generator))

    def forward(self, h: Tensor) -> Tensor:
        if self.conv:
            return F.conv2d(h, self.weight[:, :, None, None])
        return F.linear(h, self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, conv={self.conv}"


class ScaledIdentity(nn.Module):
    """Q h = factor * h with a python float ``factor`` (the leaky skip 1 - rho_l * Lt)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, h: Tensor) -> Tensor:
        return self.factor * h

    def extra_repr(self) -> str:
        return f"factor={self.factor:.6g}"


def fixup_factor(num_blocks: int, layers_per_branch: int) -> float:
    """Fixup's rescaling L^(-1/(2m-2)) of the non-final branch layers (m = layers per branch)."""
    if layers_per_branch < 2:
        return 1.0
    return float(num_blocks) ** (-1.0 / (2 * layers_per_branch - 2))

