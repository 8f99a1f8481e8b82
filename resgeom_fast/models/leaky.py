"""Leaky ResNets (Jacot & Kaiser 2024; docs/science.md section 4).

Width w, sigma(z) = (ReLU(z_1), ..., ReLU(z_w), 1), W_l in R^{w x (w+1)}, effective depth Lt
(``leak``), steps rho_l > 0 with sum_l rho_l = 1::

    a_0 = E x,    a_l = (1 - rho_l Lt) a_{l-1} + rho_l W_l sigma(a_{l-1}),    y = P a_L.

How the input and output enter (our reading). States a_l are w-dimensional while x is in R^d and
y in R^{d_out}; ``E`` [w, d] is the fixed zero-padding embedding ``[I_d; 0]`` (x occupies the first
d coordinates of a_0) and ``P`` [d_out, w] = ``[I_{d_out}, 0]`` reads the first d_out coordinates of
a_L. Both are buffers, never trained, so A_0 is the (padded) data and the loss compares Y with the
first d_out rows of A_L. The study's setting (x, y in R^30, w = 100, L = 20) is
``LeakyResNet(30, 100, 20, 30, leak)``.

Every layer is a :class:`~resgeom_fast.models.blocks.ResidualBlock` with ``skip =
ScaledIdentity(1 - rho_l Lt)``, ``scale = rho_l`` and ``branch = LeakyBranch`` (F_l(a) =
W_l sigma(a)), so the block protocol (and block discovery) applies. The steps live in the buffer
``rho`` [L] (saved in the state dict); the blocks' python floats are re-synchronised from it on
every :meth:`LeakyResNet.set_rho` and after ``load_state_dict``.

Loss: ``(1/N) ||Y - P A_L||_F^2 + (lam / (2 Lt)) sum_l rho_l ||W_l||_F^2`` (:meth:`LeakyResNet.loss`).

Row convention: representations are returned as [N, w] tensors (one row per sample); the
A_l = a_l(X) in R^{w x N} of docs/science.md section 4 is their transpose.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_number, describe, message

from ._options import check_choice, check_positive_int
from .blocks import ResidualBlock, ScaledIdentity
from .network import seeded_construction

__all__ = ["LeakyResNet", "LeakyBranch", "FixedLinear", "step_sizes", "STEP_SCHEMES"]

STEP_SCHEMES: tuple[str, ...] = ("equidistant", "irregular", "adaptive")


def sigma(a: Tensor) -> Tensor:
    """sigma(a) = (ReLU(a), 1): [..., w] -> [..., w + 1]."""
    return torch.cat([torch.relu(a), torch.ones_like(a[..., :1])], dim=-1)


class LeakyBranch(nn.Module):
    """F(a) = W sigma(a) with W [w, w + 1] (last column = bias): [N, w] -> [N, w]."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, width + 1))

    def forward(self, a: Tensor) -> Tensor:
        return F.linear(torch.relu(a), self.weight[:, :-1], self.weight[:, -1])


class FixedLinear(nn.Module):
    """x -> x @ weight.T with a fixed (buffer, untrained) ``weight`` [out, in]."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x.flatten(1), self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, fixed=True"


def step_sizes(depth: int, steps: str, irregular_a: float = 2.0) -> Tensor:
    """Initial steps rho [depth] (float64, sum 1) of a scheme.

    - "equidistant" and "adaptive" (its starting point): rho_l = 1/L;
    - "irregular": rho_l = (1/L)(1 + a (1/4 - |l/L - 1/2|)), l = 1..L, renormalised to sum 1
      (``irregular_a`` = a, |a| < 4 keeps every rho_l > 0).
    """
    check_positive_int("depth", depth)
    check_choice("steps", steps, STEP_SCHEMES)
    if steps == "irregular":
        if not isinstance(irregular_a, (int, float)):
            raise ArgumentTypeError(message(None, "irregular_a", "a float with |a| < 4", describe(irregular_a)))
        if not abs(irregular_a) < 4:
            raise ArgumentValueError(message(None, "irregular_a", "a float with |a| < 4", repr(irregular_a)))
        l = torch.arange(1, depth + 1, dtype=torch.float64)
        rho = (1.0 + irregular_a * (0.25 - (l / depth - 0.5).abs())) / depth
        return rho / rho.sum()
    return torch.full((depth,), 1.0 / depth, dtype=torch.float64)


def _capped_normalise(weights: Tensor, cap: float) -> Tensor:
    """rho proportional to ``weights`` (> 0), sum 1, every rho_l <= cap (water-filling)."""
    rho = weights / weights.sum()
    capped = torch.zeros_like(rho, dtype=torch.bool)
    for _ in range(rho.numel()):
        over = (rho > cap) & ~capped
        if not bool(over.any()):
            break
        capped |= over
        free = ~capped
        rho = torch.where(capped, torch.full_like(rho, cap), rho)
        rest = 1.0 - cap * int(capped.sum())
        if bool(free.any()):
            rho[free] = weights[free] / weights[free].sum() * rest
    return rho


def _resync_after_load(module: "LeakyResNet", incompatible_keys: object) -> None:
    module._sync_blocks()


class LeakyResNet(nn.Module):
    """Leaky ResNet of docs/science.md section 4 (see the module docstring for the exact reading).

    Args:
        in_dim: d, input dimension (<= width).
        width: w, the dimension of every state a_l.
        depth: L, the number of layers.
        out_dim: d_out, output dimension (<= width).
        leak: Lt >= 0, the effective depth (0 = a ResNet).
        steps: "equidistant" | "irregular" | "adaptive" (starts equidistant, updated by
            :meth:`adapt_steps`, which the trainer calls every ``adapt_every`` optimizer steps).
        lam: weight-decay strength lam of the loss (needs ``leak > 0`` when lam > 0).
        irregular_a: the constant a of the irregular scheme.
        max_step: adaptive updates keep rho_l * Lt <= max_step (< 1).
        adapt_every: how often (optimizer steps) the trainer calls :meth:`adapt_steps`.
        seed: seeds the weights W_l ~ N(0, 2/w) (bias column 0).

    Every scheme is checked to satisfy rho_l * Lt < 1 (a ValueError says which bound fails).
    """

    resgeom_leaky = True

    def __init__(
        self,
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int,
        leak: float,
        steps: str = "equidistant",
        *,
        lam: float = 0.0,
        irregular_a: float = 2.0,
        max_step: float = 0.95,
        adapt_every: int = 10,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("in_dim", in_dim)
        check_positive_int("width", width)
        check_positive_int("depth", depth)
        check_positive_int("out_dim", out_dim)
        check_positive_int("adapt_every", adapt_every)
        if in_dim > width:
            raise ArgumentValueError(f"in_dim: expected <= width ({width}), got {in_dim}")
        if out_dim > width:
            raise ArgumentValueError(f"out_dim: expected <= width ({width}), got {out_dim}")
        check_number(None, "leak", leak, nonnegative=True)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)):
            raise ArgumentTypeError(message(None, "lam", "a float >= 0", describe(lam)))
        if not lam >= 0:
            raise ArgumentValueError(message(None, "lam", "a float >= 0", repr(lam)))
        if lam > 0 and leak == 0:
            raise ArgumentValueError("lam: the weight-decay term lam / (2 Lt) needs leak > 0; got leak=0 with lam > 0")
        if not (0 < max_step < 1):
            raise ArgumentValueError(f"max_step: expected a float in (0, 1), got {max_step!r}")
        with torch.device("cpu"):  # host numbers, whatever the default device (as the weights)
            rho = step_sizes(depth, steps, irregular_a)
        if steps == "adaptive" and leak > 0 and depth * max_step / leak < 1:
            raise ArgumentValueError(
                f"leak: adaptive steps need leak <= max_step * depth = {max_step * depth:g} so that "
                f"rho_l * leak <= max_step is feasible, got {leak}")
        if float(rho.max()) * leak >= 1:
            raise ArgumentValueError(f"leak: expected max_l rho_l * leak < 1 (rho_max = {float(rho.max()):.4g}), got {leak}")
        self.in_dim, self.width, self.depth, self.out_dim = in_dim, width, depth, out_dim
        self.leak, self.steps, self.lam = float(leak), steps, float(lam)
        self.irregular_a, self.max_step, self.adapt_every = float(irregular_a), float(max_step), adapt_every
        with seeded_construction(seed) as gen:
            self.stem = FixedLinear(torch.eye(width, in_dim))
            self.blocks = nn.ModuleList(
                ResidualBlock(branch=LeakyBranch(width), skip=ScaledIdentity(1.0), scale=0.0, post=nn.Identity())
                for _ in range(depth)
            )
            self.head = FixedLinear(torch.eye(out_dim, width))
            with torch.no_grad():
                for block in self.blocks:
                    w = block.branch.weight
                    w.normal_(0.0, math.sqrt(2.0 / width), generator=gen)
                    w[:, -1] = 0.0
        self.register_buffer("rho", rho.to(torch.get_default_dtype()))
        self._sync_blocks()
        self.register_load_state_dict_post_hook(_resync_after_load)

    # ------------------------------------------------------------------ steps
    def _sync_blocks(self) -> None:
        for r, block in zip(self.rho.tolist(), self.blocks):
            block.scale = float(r)
            block.skip.factor = 1.0 - float(r) * self.leak

    def set_rho(self, rho: Tensor) -> None:
        """Set the steps (positive, summing to 1 within 1e-6, rho_l * leak < 1) [L]."""
        rho = torch.as_tensor(rho, dtype=torch.float64).detach().cpu()
        if rho.shape != (self.depth,):
            raise ArgumentValueError(f"rho: expected shape ({self.depth},), got {tuple(rho.shape)}")
        if not bool((rho > 0).all()) or abs(float(rho.sum()) - 1.0) > 1e-6:
            raise ArgumentValueError(f"rho: expected positive steps summing to 1, got sum {float(rho.sum()):.8g}, min {float(rho.min()):.4g}")
        if float(rho.max()) * self.leak >= 1:
            raise ArgumentValueError(f"rho: expected rho_l * leak < 1, got max {float(rho.max()) * self.leak:.4g}")
        with torch.no_grad():
            self.rho.copy_(rho.to(self.rho.dtype))
        self._sync_blocks()

    def with_leak(self, leak: float) -> "LeakyResNet":
        """A new :class:`LeakyResNet` with this one's configuration, weights and steps but effective
        depth ``leak``; skips become 1 - rho_l * leak. Same dtype, device and train/eval mode; the
        weights are copies (training one does not move the other). Used to warm-start a larger Lt
        from a net trained at a smaller one (continuation in Lt).

        Raises:
            ValueError: ``leak`` not a finite float >= 0, max_l rho_l * leak >= 1 for the current
                steps, or leak == 0 with lam > 0 (the constructor's checks).
        """
        check_number("with_leak", "leak", leak, nonnegative=True)
        rho_max = float(self.rho.max())
        if rho_max * leak >= 1:
            raise ArgumentValueError(f"with_leak: expected max_l rho_l * leak < 1 (rho_max = {rho_max:.4g}), got leak={leak}")
        ref = self.weights[0]
        new = LeakyResNet(self.in_dim, self.width, self.depth, self.out_dim, float(leak), self.steps, lam=self.lam,
                          irregular_a=self.irregular_a, max_step=self.max_step, adapt_every=self.adapt_every)
        new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(self.state_dict())  # copies weights and rho; the post-load hook re-derives the skips
        return new.train(self.training)

    @torch.no_grad()
    def adapt_steps(self, x: Tensor) -> Tensor:
        """One adaptive update of the steps from a batch x [N, in_dim]; returns the new rho [L].

        c_l = ||A_l - A_{l-1}||_F / (rho_l ||A_l||_F),  rho_l <- (1/c_l) / sum_i (1/c_i),
        then capped at rho_l * Lt <= ``max_step`` (the excess is redistributed proportionally
        over the uncapped layers, so sum rho = 1 still holds). No-op for other schemes.
        The model's train/eval mode is irrelevant (no normalisation layers).
        """
        if self.steps != "adaptive":
            return self.rho.clone()
        _, hiddens = self.forward(x, return_hidden=True)
        rho = self.rho.to(torch.float64).cpu()
        tiny = torch.finfo(torch.float64).tiny
        diffs = torch.stack([(hiddens[l] - hiddens[l - 1]).double().norm() for l in range(1, self.depth + 1)]).cpu()
        norms = torch.stack([hiddens[l].double().norm() for l in range(1, self.depth + 1)]).cpu()
        c = diffs / (rho * norms).clamp_min(tiny)
        inv = 1.0 / c.clamp_min(1e-12)
        cap = self.max_step / self.leak if self.leak > 0 else float("inf")
        new = _capped_normalise(inv, cap)
        self.set_rho(new)
        return self.rho.clone()

    # ------------------------------------------------------------------ forward and loss
    @staticmethod
    def sigma(a: Tensor) -> Tensor:
        """sigma(a) = (ReLU(a), 1): [..., w] -> [..., w + 1]."""
        return sigma(a)

    @property
    def weights(self) -> list[Tensor]:
        """[W_1, ..., W_L], each [w, w + 1] (last column multiplies the constant 1)."""
        return [block.branch.weight for block in self.blocks]

    def forward(self, x: Tensor, return_hidden: bool = False) -> Union[Tensor, tuple[Tensor, list[Tensor]]]:
        """Output y = P a_L [N, out_dim]; with ``return_hidden`` also [a_0, ..., a_L], each [N, w]."""
        a = self.stem(x)
        hiddens: Optional[list[Tensor]] = [a] if return_hidden else None
        for block in self.blocks:
            a = block(a)
            if hiddens is not None:
                hiddens.append(a)
        y = self.head(a)
        return (y, hiddens) if hiddens is not None else y

    def regularization(self) -> Tensor:
        """(lam / (2 Lt)) sum_l rho_l ||W_l||_F^2 (a 0-dim tensor; 0 when lam == 0)."""
        if self.lam == 0:
            return self.weights[0].new_zeros(())
        total = sum(float(r) * w.pow(2).sum() for r, w in zip(self.rho.tolist(), self.weights))
        return (self.lam / (2.0 * self.leak)) * total

    @staticmethod
    def data_loss(output: Tensor, target: Tensor) -> Tensor:
        """(1/N) ||Y - output||_F^2 for [N, out_dim] tensors."""
        return (target - output).pow(2).sum() / output.shape[0]

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The full objective (1/N)||Y - P A_L||_F^2 + regularization() for x [N, d], y [N, d_out]."""
        return self.data_loss(self.forward(x), y) + self.regularization()
