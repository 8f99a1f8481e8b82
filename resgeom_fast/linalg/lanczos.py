"""Batched Lanczos with full reorthogonalisation (the engine of eigsh and slq_density)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from resgeom_fast import ops
from resgeom_fast.core.heap import keep_heap, release
from resgeom_fast.linalg._memory import basis_slots
from resgeom_fast.linalg._util import apply_flat, check_finite, gaussian
from resgeom_fast.linalg.operator import LinearOperator


REORTH = ("full", "local")
#: the one-sweep full reorthogonalisation runs for operators of at least this dimension (on the
#: CPU); below it the basis is read from cache and the sweep's bookkeeping (a few small float64
#: ops and a second op call per step, ~0.5 ms) costs more than the read it saves: measured
#: 2026-12-05, SLQ 10 x 100 at n = 300: 0.10 s vs 0.05 s with the two-sweep Gram-Schmidt
SWEEP_MIN_N = 16384


def sweep_tolerance(dtype: torch.dtype) -> float:
    """The largest overlap |v_i . v_{j+1}| the one-sweep full reorthogonalisation accepts before it
    runs a Gram-Schmidt pass on the new vector: ``0.01 sqrt(eps)`` of the basis's dtype (3.5e-6 in
    float32, 1.5e-10 in float64), a hundredth of the semi-orthogonality level under which T is the
    projection of the operator to working precision (Simon 1984)."""
    return 0.01 * torch.finfo(dtype).eps ** 0.5


class Lanczos:
    """Lanczos on ``P = b * p`` independent problems that advance together.

    Problem ``i * p + j`` runs on matrix i of ``op`` from start vector ``v0[i * p + j]``. Every
    step applies the operator once to all P current vectors (one batched matmat), then
    orthogonalises against the whole basis with the fused op :func:`resgeom_fast.ops.lanczos_reorth`,
    accumulating the scalars in float64.

    CPU, n >= :data:`SWEEP_MIN_N`: the one-sweep full reorthogonalisation. w = A v_j is first
    orthogonalised against v_j and v_{j-1} (Gram-Schmidt on the two rows: alpha_j and the coupling to v_{j-1}); its
    components along the older rows are then *predicted* instead of measured: A is symmetric, so
    ``v_k . A v_j = (A v_k) . v_j`` and ``A v_k`` is the combination of v_0..v_{k+1} that step k
    recorded (``H[:, k]``, every coefficient it removed plus beta_k), whence
    ``v_k . w = sum_i H[i, k] (v_i . v_j)`` with the overlaps ``G = V V^T`` tracked to rounding.
    One read of the basis (the op's sweep mode) subtracts them and measures ``V w``, from which the
    new vector's overlaps ``(V w - G h) / beta_j`` follow: every step measures the orthogonality
    of the whole basis (``orthogonality``: the largest |v_i . v_j|, i != j, seen). Where a new
    vector's overlap exceeds :func:`sweep_tolerance` (an operator whose products are not
    symmetric to that level, e.g. rounding at 1e-3 in a deep float32 net), it gets a full
    Gram-Schmidt pass (``fallbacks`` counts them) and its coefficients are folded into H. The
    basis is read once per step instead of twice (classical Gram-Schmidt's projection and
    update); T is that of the two-sweep algorithm to rounding (tests/linalg/test_lanczos_sweep.py).
    Smaller n on the CPU: the op's Gram-Schmidt (v_j and v_{j-1} first, one full pass, a second
    only by the DGKS criterion). CUDA: classical Gram-Schmidt twice (CGS2) every step (no host
    sync per step; the GPU's bandwidth makes the second read cheap).

    ``reorth="local"`` keeps only v_j and v_{j-1} (two basis rows, O(n) memory per problem) and
    orthogonalises against them (the plain three-term recurrence, as most SLQ codes run it):
    orthogonality to older vectors is lost as Ritz values converge, so T gains spurious copies of
    converged eigenvalues, but its Gauss quadrature still approximates the spectral measure of
    the start vector (Knizhnerman 1996; Greenbaum 1989) -- fine for densities and low moments,
    not for Ritz vectors (eigsh always uses "full").

    After ``steps`` steps: ``alpha[:, :steps]`` is the diagonal of T, ``beta[:, :steps-1]`` its
    off-diagonal and ``beta[:, steps-1]`` the norm of the next residual (the Ritz residual
    scale). On breakdown (an invariant subspace: beta ~ 0) the problem restarts from a random
    vector orthogonal to its basis and the coupling is set to exactly 0, so T splits into blocks;
    the blocks not holding the start vector get zero quadrature weight and their Ritz values are
    still eigenvalues of the operator.

    Host syncs: steps run in windows of ``sync_every`` without any device-to-host sync; each
    step records on the device whether its product had a non-finite sum or some problem broke
    down, and the window's flags are read once at its end (one sync per window). At the
    window's first flagged step its product (and with "local" the two basis rows) is saved on
    the device. A flagged window is rolled back to that step (T, the scale and the "full" basis
    before it are intact) and the step is redone on the checked path with the saved product: the
    exact non-finite check (naming the step and the values) and the restart of the problems that
    broke down, as a step-by-step run does; the results are those of the step-by-step run, bit
    for bit (the flagged step's product is not recomputed). The products of the window's steps
    after the flagged one are wasted (recomputed from the corrected state), so after a flagged
    window the next one is a single step, and windows double back to ``sync_every`` while they
    stay clean: a run that breaks down at every step (an exhausted, degenerate Krylov space)
    goes step by step (no waste, one sync per step), a clean run wastes nothing. An
    exception raised by the operator inside a window after a flagged step (e.g. it rejects the
    NaN vector a NaN product led to) triggers the same rollback, so the error names the first
    bad step as the step-by-step run does. Cost: one [P, n] buffer ([P, 3, n] with "local"), and
    on CUDA one extra pass over the product per step (two more over the two rows with "local")
    that keeps it when the step is flagged without a sync; the CPU reads the flag and copies only
    at a flagged step.
    """

    def __init__(self, op: LinearOperator, v0: Tensor, p: int, max_steps: int, where: str,
                 gen: torch.Generator, breakdown_tol: float = 1e-12, reorth: str = "full",
                 sync_every: int = 10, basis: Optional[Tensor] = None) -> None:
        """``basis``: optional storage for the basis, a contiguous tensor of the operator's dtype
        and device with at least ``P * slots * n`` elements (its first ones are used, overwritten),
        so that sequential runs (SLQ's probe groups) reuse one mapping instead of each faulting a
        fresh one in page by page (torchvision resnet18's 4 groups: 56 GB of first touches)."""
        n = op.shape[0]
        P = v0.shape[0]
        if reorth not in REORTH:
            raise ValueError(f"{where}: expected reorth one of {list(REORTH)}, got {reorth!r}")
        self.op, self.p, self.where, self.gen = op, p, where, gen
        self.max_steps = min(max_steps, n)
        self.breakdown_tol = breakdown_tol
        self.reorth = reorth
        if isinstance(sync_every, bool) or not isinstance(sync_every, int) or sync_every < 1:
            raise ValueError(f"{where}: expected sync_every an int >= 1, got {sync_every!r}")
        self.sync_every = sync_every
        self._window = sync_every                  # steps of the next window (adaptive)
        self._saved_w: Optional[Tensor] = None     # a flagged step's product, for the redo
        self._saved_V: Optional[Tensor] = None     # "local": the two basis rows at that step
        self._bufs: Optional[tuple[Tensor, Tensor]] = None   # apply_flat's layout copies (p > 1)
        # "full": the whole basis; "local": two slots, v_j in slot j % 2 (v_{j-1} in the other)
        slots = basis_slots(self.max_steps, n, reorth)
        if basis is None:
            release()   # a previous run's freed heap goes back before the basis is mapped beside it
            self.V = torch.empty(P, slots, n, dtype=op.dtype, device=op.device)
        else:
            if (not isinstance(basis, Tensor) or basis.dtype != op.dtype or basis.device != op.device
                    or not basis.is_contiguous() or basis.numel() < P * slots * n):
                got = (f"a {basis.dtype} tensor on {basis.device} of {basis.numel()} elements"
                       f"{'' if basis.is_contiguous() else ', not contiguous'}" if isinstance(basis, Tensor)
                       else type(basis).__name__)
                raise ValueError(f"{where}: expected basis a contiguous {op.dtype} tensor on {op.device} of at "
                                 f"least {P * slots * n} elements, got {got}")
            self.V = basis.view(-1)[: P * slots * n].view(P, slots, n)
        # the one-sweep full reorthogonalisation (CPU): H[:, i, k] the coefficient of v_i in A v_k,
        # G the basis's measured Gram matrix (class docstring)
        self._sweep = reorth == "full" and op.device.type == "cpu" and n >= SWEEP_MIN_N
        S = self.max_steps
        self._H = torch.zeros(P, S + 1, S, dtype=torch.float64) if self._sweep else None
        self._G = torch.zeros(P, S, S, dtype=torch.float64) if self._sweep else None
        if self._G is not None and S:
            self._G[:, 0, 0] = 1.0
        self._tol = sweep_tolerance(op.dtype)
        #: [P] float64: the largest overlap |v_i . v_j| (i != j) measured between basis vectors
        #: before any fallback pass (CPU "full" only; None elsewhere: not measured)
        self.orthogonality = torch.zeros(P, dtype=torch.float64) if self._sweep else None
        #: Gram-Schmidt passes run on new vectors whose measured overlap exceeded the tolerance
        self.fallbacks = 0
        self.alpha = torch.zeros(P, self.max_steps, dtype=torch.float64, device=op.device)
        self.beta = torch.zeros(P, self.max_steps, dtype=torch.float64, device=op.device)
        norm = torch.linalg.vector_norm(v0.double(), dim=1, keepdim=True)
        if bool((norm == 0).any()):
            raise ValueError(f"{where}: expected non-zero start vectors")
        if self.max_steps:
            self.V[:, 0] = (v0.double() / norm).to(op.dtype)
        self.steps = 0
        self.scale = torch.zeros(P, dtype=torch.float64, device=op.device)

    def advance(self, nsteps: int, until: Optional[Callable[["Lanczos"], bool]] = None) -> int:
        """Run up to ``nsteps`` more steps (never past max_steps); returns the steps done.

        ``until`` (CPU only, where reading the window's flags costs no host sync): called with
        this object after every step of a window whose steps so far are all clean (no non-finite
        product, no breakdown); when it returns True, the run stops after that step, as if the
        window had ended there. A window's heap scope still spans its steps (no per-step scope),
        and a flagged window is rolled back and redone exactly as without ``until`` (it is not
        called on the flagged steps). eigsh uses it to test convergence every step on the CPU.
        """
        if until is not None and self.V.device.type != "cpu":
            raise ValueError(f"{self.where}: Lanczos.advance(until=...) reads the step flags every step; "
                             f"CPU only, got an operator on {self.V.device}")
        target = min(self.max_steps, self.steps + nsteps)
        full = self.reorth == "full"
        while self.steps < target:
            start = self.steps
            count = min(self._window, target - start)
            scale0 = self.scale.clone()
            if self._saved_w is None:
                P, n = self.V.shape[0], self.V.shape[2]
                self._saved_w = torch.empty(P, n, dtype=self.V.dtype, device=self.V.device)
                self._saved_V = None if full else torch.empty_like(self.V)
                if self.p > 1:      # the product's layout copies, owned here (outside the heap scopes)
                    op = self.op
                    self._bufs = (torch.empty(*op.batch_shape, n, self.p, dtype=op.dtype, device=op.device),
                                  torch.empty(P, op.shape[0], dtype=op.dtype, device=op.device))
            seen = torch.zeros((), dtype=torch.bool, device=self.V.device)
            flags = torch.zeros(count, dtype=torch.bool, device=self.V.device)
            done, error, stop = 0, None, False
            try:
                # one heap scope (resgeom_fast.core.heap) per window: the products' temporaries,
                # their outputs (not copied out: their own scopes nest in this one) and the
                # orthogonalised vectors reuse the blocks freed by the window's earlier steps
                # instead of fresh memory faulted in page by page (SLQ 2 x 100 on torchvision
                # resnet18: 160-171 s with a scope per product, 132-141 s with this). Every large
                # block allocated inside dies inside: the basis, the saved product and the layout
                # copies are allocated above, and the scalars are updated in place, so that no
                # block kept across steps splits the heap (the plan counts the slack that remains,
                # linalg._memory.HEAP_SLACK_VECTORS); the exit restores glibc's settings and trims.
                with keep_heap():
                    for i in range(count):
                        flags[i], seen = self._step(checked=False, seen=seen)
                        done = i + 1
                        if until is not None and not bool(seen) and until(self):
                            stop = True
                            break
            except Exception as exc:  # noqa: BLE001 -- re-raised unless a flagged step led to it
                error = exc           # (an operator that rejects the NaN vector a NaN step made)
            hits = flags[:done].tolist()                    # the window's one host sync
            if not any(hits):
                if error is not None:
                    raise error
                self._window = min(self.sync_every, 2 * self._window)
                if stop:
                    break
                continue
            self._window = 1      # the products after the flagged step were wasted: speculate less
            first = start + hits.index(True)
            # roll back to just before step `first`: steps start..first-1 were clean, so
            # alpha/beta[:, :first] hold them, V[:, :first + 1] too ("full"; "local": the two
            # rows saved at that step), and the scale is their running maximum (no restart)
            self.steps = first
            a, b = self.alpha[:, start:first], self.beta[:, start:first]
            self.scale = torch.maximum(scale0, (a.abs() + b).amax(1)) if first > start else scale0
            if not full:
                self.V.copy_(self._saved_V)
            # redo it on the checked path with the product saved at that step (the operator is
            # not applied again): the exact finite check, the breakdown restart
            with keep_heap():
                self._step(checked=True, product=self._saved_w)
        return self.steps

    def _step(self, checked: bool, product: Optional[Tensor] = None,
              seen: Optional[Tensor] = None):
        """Step ``self.steps``; ``product``: the operator's output for it, flat [P, n] (applied
        now if None).

        ``checked``: the finite check of the product and the breakdown restart run now (host
        syncs); returns None. Unchecked: no sync; returns ``(flag, seen)``, 0-dim bool device
        tensors: whether this step needs the checked path (a non-finite product sum -- NaN, inf,
        or a sum that overflowed -- or a breakdown), and whether this or an earlier step of the
        window did; at the window's first flagged step its product (and, "local", the two basis
        rows it overwrites) are saved on the device for the redo.
        """
        j = self.steps
        full = self.reorth == "full"
        cur = j if full else j % 2
        what = f"at Lanczos step {j}"
        if product is None:
            w = apply_flat(self.op, self.V[:, cur], self.p, self.where, what, check=checked, bufs=self._bufs)
        else:
            w = product
            if checked:       # the operator's layout, so that the check names its indices
                m = self.op.shape[0]
                check_finite(w.reshape(*self.op.batch_shape, self.p, m).transpose(-1, -2), self.where, what)
        raw = w
        if self._sweep:
            w, alpha, norm = self._sweep_step(w, j)
        else:
            # full: against v_0..v_j; local: against v_j and v_{j-1} (the three-term recurrence)
            w, coeffs, norm = ops.lanczos_reorth(w, self.V[:, : j + 1] if full else self.V[:, : min(j + 1, 2)])
            alpha = coeffs[:, cur]
        self.alpha[:, j] = alpha
        self.beta[:, j] = norm
        torch.maximum(self.scale, alpha.abs() + norm, out=self.scale)   # in place (see advance)
        self.steps = j + 1
        last = j + 1 >= self.max_steps
        broke = None if last else norm <= self.breakdown_tol * self.scale.clamp_min(1e-300)
        if not checked:
            flag = ~torch.isfinite(raw.sum())
            if broke is not None:
                flag = flag | broke.any()
            new = flag & ~seen
            if raw.device.type == "cpu":
                # reading the flag costs no sync here: copy only at a flagged step, instead of a
                # pass of torch.where over the product (and "local"'s two rows) every step
                if bool(new):
                    self._saved_w.copy_(raw)
                    if not full:
                        self._saved_V.copy_(self.V)
            else:
                torch.where(new, raw, self._saved_w, out=self._saved_w)
                if not full:
                    torch.where(new, self.V, self._saved_V, out=self._saved_V)
            torch.logical_or(seen, flag, out=seen)
        if not last:
            nxt = j + 1 if full else (j + 1) % 2
            safe = torch.where(broke, torch.ones_like(norm), norm)
            # normalise in the working dtype, straight into the basis (no float64 round trip)
            torch.div(w, safe.to(w.dtype)[:, None], out=self.V[:, nxt])
            if checked and bool(broke.any()):
                self._restart(broke.nonzero().flatten(), j + 1)
        return None if checked else (flag, seen)

    def _sweep_step(self, w: Tensor, j: int) -> tuple[Tensor, Tensor, Tensor]:
        """The CPU's one-sweep full reorthogonalisation of ``w = A v_j`` (class docstring):
        returns ``(w_orth, alpha_j, beta_j)`` and records H[:, :, j] and the new vector's row of G."""
        lo = max(0, j - 1)
        # v_j and v_{j-1} (for j <= 1 the whole basis): Gram-Schmidt, measured
        w1, c, norm = ops.lanczos_reorth(w, self.V[:, lo : j + 1])
        H, G = self._H, self._G
        H[:, lo : j + 1, j] = c
        P = w.shape[0]
        if j >= 2:
            m = j - 1     # rows 0..j-2, predicted: v_k . w = sum_i H[i, k] G[j, i], less the local part
            h = torch.zeros(P, j + 1, dtype=torch.float64)
            h[:, :m] = (torch.einsum("pik,pi->pk", H[:, : j + 1, :m], G[:, j, : j + 1])
                        - c[:, -1:] * G[:, j, :m] - c[:, -2:-1] * G[:, j - 1, :m])
            w, dots, norm = ops.lanczos_reorth(w1, self.V[:, : j + 1], h)
            del w1
            H[:, :m, j] += h[:, :m]
            # overlaps of the new vector x = w1 - V^T h with the basis: V x = V w1 - G h
            over = (dots - torch.einsum("pik,pk->pi", G[:, : j + 1, :m], h[:, :m])) / norm.clamp_min(1e-300)[:, None]
            # a breakdown (beta ~ 0, restarted by _step) has no new vector to measure
            scale = torch.maximum(self.scale, H[:, j, j].abs() + norm)
            live = norm > self.breakdown_tol * scale.clamp_min(1e-300)
            over = torch.where(live[:, None], over, torch.zeros_like(over))
            worst = over.abs().amax(1)
            torch.maximum(self.orthogonality, worst, out=self.orthogonality)
            bad = worst > self._tol
            if bool(bad.any()):
                idx = bad.nonzero().flatten()
                self.fallbacks += int(idx.numel())
                # a Gram-Schmidt pass on the unit vector, its coefficients folded into H and alpha
                u = (w[idx].double() / norm[idx, None]).to(w.dtype)
                u2, c2, n2 = ops.lanczos_reorth(u, self.V[idx, : j + 1])
                H[idx, : j + 1, j] += norm[idx, None] * c2
                w = w.clone()
                w[idx] = (u2.double() * norm[idx, None]).to(w.dtype)
                norm = norm.clone()
                norm[idx] = norm[idx] * n2
                over[idx] = 0.0
        else:
            w = w1
            over = torch.zeros(P, j + 1, dtype=torch.float64)   # Gram-Schmidt on the whole basis
        if j + 1 < self.max_steps:
            H[:, j + 1, j] = norm
            G[:, j + 1, : j + 1] = over
            G[:, : j + 1, j + 1] = over
            G[:, j + 1, j + 1] = 1.0
        return w, H[:, j, j].clone(), norm

    def _restart(self, idx: Tensor, j: int) -> None:
        """Continue problems ``idx`` from a random vector orthogonal to their first j vectors
        (to the stored ones: the last two with ``reorth="local"``)."""
        n = self.op.shape[0]
        full = self.reorth == "full"
        r = gaussian((idx.numel(), n), self.gen, self.op.dtype, self.op.device)
        basis = self.V[idx, :j] if full else self.V[idx, : min(j, 2)]   # local: v_{j-1}, v_{j-2}
        r, _, rn = ops.lanczos_reorth(r, basis)
        r, _, rn2 = ops.lanczos_reorth((r.double() / rn[:, None]).to(self.op.dtype), basis)
        self.V[idx, j if full else j % 2] = (r.double() / rn2[:, None]).to(self.op.dtype)
        self.beta[idx, j - 1] = 0.0
        if self._sweep:     # the restart vector is orthogonal to the basis (two passes) and uncoupled
            self._H[idx, j, j - 1] = 0.0
            self._G[idx, j, :j] = 0.0
            self._G[idx, :j, j] = 0.0

    def tridiagonal(self) -> tuple[Tensor, Tensor]:
        """``(diag [P, s], offdiag [P, s-1])`` of the current T, float64."""
        s = self.steps
        return self.alpha[:, :s], self.beta[:, : max(s - 1, 0)]
