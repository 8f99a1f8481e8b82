"""The auto-tuner and verifier of the curvature products (``hvp="auto"``, ``matmul="auto"``).

A *candidate* is a product method, with ``"+onednn"`` when oneDNN runs its float32 matmuls
(``"double_backward"``, ``"structured+onednn"``, ...). For each (parameter subset, k vectors per
pass) :class:`AutoTuner`:

- lists the candidates (:meth:`AutoTuner.candidates`): the structured path where it applies, else
  the double backward for k = 1 or under ``deterministic=True``, else both autograd methods
  (:data:`TUNED`); each with every matmul library in use;
- *measures* them while there are several: the first calls alternate between the candidates
  (every call returns its exact product), :data:`AUTO_SAMPLES` timings each (a candidate timed
  over :data:`CLEAR_LOSS` times the best of a fully timed one is not timed again), then the
  fastest (by its best timing) serves every later call; a decision between matmul libraries of one method is
  reused for other pass widths (:meth:`AutoTuner.choice`); with several methods, the first call
  of a new width is served by the choice of the nearest measured width, verified alone, and the
  width is measured from its second call on (a one-off pass -- eigsh's residuals of its k Ritz
  vectors after single-vector Lanczos steps -- ran every candidate once: 7.4 s instead of 1.7 s
  for five vectors on resnet18, 14% of its top-5);
- *verifies* the first product of the structured path and of oneDNN against the double backward
  with the default BLAS (:data:`VERIFY_VECTORS` columns; relative tolerance
  :data:`VERIFY_TOLERANCE`): a mismatch turns the candidate off under "auto" (the reference
  product is returned; ``structured_off`` / ``onednn_off`` say why) or raises when it was asked
  for by name. Where the double backward is itself a candidate still to be timed, its first
  timed product (all k vectors, the call's product) is the reference; else the double backward
  of the first VERIFY_VECTORS columns is computed for it. A candidate checked on a call that
  another candidate serves is checked on those columns alone, untimed;
- turns forward-over-reverse off under "auto" when it raises (``fwd_off``), or raises with the
  cause when asked for by name.

The tuner owns no product mathematics: it calls ``product(method, idx, vs, k)`` (the operator's
data loop) and takes its clock, the device synchroniser and the oneDNN switch from its caller
(:mod:`resgeom_fast.operators.hessian` hands in the process's). The device is synchronised only
around products that are timed, so a chosen method runs without host syncs on CUDA.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from resgeom_fast.core import distributed as dist
from resgeom_fast.core.checks import check_choice
from resgeom_fast.operators._data import NonRepeatableDataError
from resgeom_fast.operators._precision import onednn_matmul
from resgeom_fast.operators._products import NotStructured, rel_diff

HVP_METHODS = ("auto", "structured", "double_backward", "forward_over_reverse")
ONEDNN_TOLERANCE = 1e-4
# first products of the structured path / oneDNN against the double backward: relative tolerance
VERIFY_TOLERANCE = {torch.float64: 1e-8, torch.float32: ONEDNN_TOLERANCE}
VERIFY_VECTORS = 2      # columns of the first pass recomputed by the reference
# timings per candidate collected before deciding (two each: the first of a candidate includes
# one-off warm-up such as torch.func tracing, the best of two is compared)
AUTO_SAMPLES = 2
# a candidate still short of its samples whose every timing so far (its first includes its
# warm-up) is over this many times the best of a fully measured candidate has lost: it is not
# timed again (ResNet-20's ten products on 32 images: the double backward 3.0 s against 1.47 s
# for the structured path; a second timing of it cost 1.5 s of a 150 s SLQ)
CLEAR_LOSS = 1.5
TUNED = ("forward_over_reverse", "double_backward")

Product = Callable[[str, list[int], list[Tensor], int], list[Tensor]]
Key = tuple[tuple[int, ...], int]

__all__ = ["AUTO_SAMPLES", "AutoTuner", "CLEAR_LOSS", "ForwardOverReverseFailed", "HVP_METHODS", "ONEDNN_TOLERANCE",
           "TUNED", "VERIFY_TOLERANCE", "VERIFY_VECTORS", "needs_check", "resolve_hvp"]


def resolve_hvp(fn: str, hvp: str) -> str:
    """``hvp`` if it is one of :data:`HVP_METHODS`, else a ValueError naming ``fn``."""
    return check_choice(None, f"{fn}: hvp", hvp, HVP_METHODS)


def verify_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of a verified product (and of the structured forward) in ``dtype``."""
    return VERIFY_TOLERANCE.get(dtype, 1e-2)


def needs_check(cand: str) -> bool:
    """Candidates whose first product is verified: the structured path and oneDNN matmuls."""
    method, _, backend = cand.partition("+")
    return method == "structured" or backend == "onednn"


def _winner(rec: Optional[dict[str, list[float]]], cands: list[str]) -> Optional[str]:
    """The fastest of ``cands`` by its best timing in ``rec`` once the measurement is finished
    (:data:`AUTO_SAMPLES` timings each, or fewer for a candidate timed over :data:`CLEAR_LOSS`
    times the best of a fully timed one); None before."""
    if rec is None:
        return None
    done = [c for c in cands if len(rec.get(c, ())) >= AUTO_SAMPLES]
    if not done:
        return None
    best = min(min(rec[c]) for c in done)
    if not all(rec.get(c) and min(rec[c]) > CLEAR_LOSS * best for c in cands if c not in done):
        return None
    return min(done, key=lambda c: min(rec[c]))


class ForwardOverReverseFailed(Exception):
    """torch.func's forward-over-reverse raised (e.g. a loss without a forward-mode derivative,
    such as ``F.huber_loss``); ``cause`` is the original exception."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class AutoTuner:
    """Chooses, times and verifies the product candidate of every (parameter subset, k).

    Args:
        fn: the public function's name, for messages.
        hvp: the ``hvp`` argument (checked); ``matmul``: the ``matmul`` argument, ``backends`` the
            libraries it resolved to (:func:`resgeom_fast.operators._precision.resolve_matmul`).
        deterministic: the fixed rule instead of timings (the default library for ``matmul="auto"``).
        dtype, device: of the parameters.
        product: ``product(method, idx, vs, k)`` computes one product by ``method``.
        structured_off: why the structured path does not apply (None: it may).
        time_structured: under "auto" (not deterministic) the structured path is measured against
            the double backward instead of being taken outright (conv nets: measured 1.4x as fast
            as the double backward on a CIFAR ResNet-20 with 128 images, and 0.65x on torchvision's
            resnet18 with 64 CIFAR-sized images before the structured path cropped kernels to their
            live taps, 1.3x after; which wins depends on the net, the batch and the CPU).
        distributed: the products are data-parallel (every rank runs the same tuner): every
            timing and every verification result is rank 0's, broadcast, so that all ranks
            decide alike and run the same products (and collectives) in the same order.

    Timing reads this module's ``time.perf_counter``, waits with ``torch.cuda.synchronize`` and
    routes float32 matmuls to oneDNN with :func:`~resgeom_fast.operators._precision.onednn_matmul`,
    each looked up when called (a test replaces ``_autotune.time`` by a fake clock or
    ``_autotune.onednn_matmul`` by a rounding oneDNN).

    Attributes:
        timings: ``{(idx, k): {candidate: [seconds, ...]}}`` measured by "auto".
        checks: ``{(idx, k): {candidate: relative difference of its first product}}``.
        structured_off, onednn_off, fwd_off: why the structured path / oneDNN /
            forward-over-reverse is not used (None: it may be).
    """

    def __init__(self, fn: str, hvp: str, matmul: str, backends: list[str], deterministic: bool,
                 dtype: torch.dtype, device: torch.device, product: Product, *,
                 structured_off: Optional[str], distributed: bool = False, time_structured: bool = False) -> None:
        self.fn, self.hvp, self.matmul, self.deterministic = fn, hvp, matmul, deterministic
        self.distributed = distributed
        self.backends = ["default"] if deterministic and matmul == "auto" else backends  # the fixed rule
        self.dtype, self.device, self.product = dtype, device, product
        self.timings: dict[Key, dict[str, list[float]]] = {}
        self.checks: dict[Key, dict[str, float]] = {}
        self.structured_off = structured_off
        self.time_structured = time_structured
        self.onednn_off: Optional[str] = None
        self.fwd_off: Optional[str] = None

    def candidates(self, k: int) -> list[str]:
        """What "auto" measures for passes of ``k`` vectors: methods, each with every backend."""
        if self.hvp == "structured" or (self.hvp == "auto" and self.structured_off is None):
            methods = ["structured"]
            if self.hvp == "auto" and self.time_structured and not self.deterministic:
                methods.append("double_backward")      # measured against each other (class doc)
        elif self.hvp == "auto":
            # deterministic: the fixed rule (the double backward), never a timing
            fixed = k == 1 or self.deterministic or self.fwd_off is not None
            methods = ["double_backward"] if fixed else list(TUNED)
        else:
            methods = [self.hvp]
        backends = [b for b in self.backends if not (b == "onednn" and self.onednn_off)]
        return [m if b == "default" else f"{m}+onednn" for m in methods for b in backends]

    def choice(self, idx: Sequence[int], k: int) -> Optional[str]:
        """The candidate used for ``k`` vectors on params ``idx`` (None: still measuring)."""
        cands = self.candidates(k)
        if len(cands) == 1:
            return cands[0]
        won = _winner(self.timings.get((tuple(idx), k)), cands)
        if won is None and len({c.partition("+")[0] for c in cands}) == 1:
            # one method, two matmul libraries: which library is faster does not hinge on k, so a
            # decision measured for another pass width of these parameters is reused
            for (idx2, _), rec2 in self.timings.items():
                won = _winner(rec2, cands) if idx2 == tuple(idx) else None
                if won is not None:
                    break
        return won

    def apply(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        """The product of the chosen (or next measured) candidate; forward-over-reverse failing
        under "auto" hands over to the double backward."""
        try:
            return self._apply_any(idx, vs, k)
        except ForwardOverReverseFailed as exc:
            why = (f"forward-over-reverse (torch.func) failed on this model and loss: "
                   f"{type(exc.cause).__name__}: {exc.cause}")
            if self.hvp != "auto":
                raise RuntimeError(f"{self.fn}: hvp='forward_over_reverse': {why}; use hvp='double_backward' "
                                   f"or 'auto'") from exc.cause
            self.fwd_off = why              # "auto" falls back to the double backward, says why
            return self._apply_any(idx, vs, k)

    def _apply_any(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        cand = self.choice(idx, k)
        if cand is not None:
            return self._run(cand, idx, vs, k, None)
        key = (tuple(idx), k)
        rec = self.timings.setdefault(key, {})
        if not any(rec.values()) and not self.checks.get(key):
            # a pass width seen for the first time: served by the choice made for the nearest
            # width of these parameters, verified alone; measuring starts at its second call
            borrowed = self._borrowed(idx, k)
            if borrowed is not None:
                return self._run(borrowed, idx, vs, k, rec, alone=True)
        # still measuring: the candidate with fewest timings so far (forward-over-reverse first);
        # while first products wait for their check and the double backward is an untimed
        # candidate, the double backward: its timing is then also the check's reference (_run)
        cands = self.candidates(k)
        if "double_backward" in cands and not rec.get("double_backward") and self._pending(key, cands):
            return self._run("double_backward", idx, vs, k, rec)
        cand = min(cands, key=lambda c: len(rec.get(c, ())))
        return self._run(cand, idx, vs, k, rec)

    def _pending(self, key: Key, cands: list[str]) -> list[str]:
        """The candidates of ``key`` whose first product is still to be checked."""
        checks = self.checks.get(key, {})
        return [c for c in cands if needs_check(c) and c not in checks]

    def _borrowed(self, idx: Sequence[int], k: int) -> Optional[str]:
        """The candidate chosen for the width nearest to ``k`` (by ratio; the wider on a tie) of
        the parameters ``idx``, if one is chosen there and is still a candidate for ``k``."""
        cands = self.candidates(k)
        ranked = [(abs(math.log(k2 / k)), -k2, c) for (idx2, k2) in self.timings
                  if idx2 == tuple(idx) and k2 != k for c in [self.choice(idx2, k2)] if c in cands]
        return min(ranked)[2] if ranked else None

    def _timed(self, cand: str, idx: list[int], vs: list[Tensor], k: int,
               rec: Optional[dict[str, list[float]]]) -> list[Tensor]:
        method, _, backend = cand.partition("+")
        # the device is synchronised only while "auto" is timing candidates (rec given): once the
        # choice is made, products are queued without a host sync
        sync = self.device.type == "cuda" and rec is not None
        if sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        with onednn_matmul() if backend == "onednn" else contextlib.nullcontext():
            if method == "forward_over_reverse":
                try:
                    out = self.product(method, idx, vs, k)
                except (NonRepeatableDataError, NotStructured, dist.DivergentRanksError, dist.RankFailureError):
                    raise
                except (RuntimeError, NotImplementedError) as exc:
                    raise ForwardOverReverseFailed(exc) from exc
            else:
                out = self.product(method, idx, vs, k)
        if sync:
            torch.cuda.synchronize(self.device)
        if rec is not None:
            elapsed = time.perf_counter() - t0
            # data-parallel: rank 0's clock decides for every rank (its product includes the
            # all_reduce, so it waited for the slowest rank)
            rec.setdefault(cand, []).append(dist.broadcast_object(elapsed, fn=self.fn) if self.distributed
                                            else elapsed)
        return out

    def _reference(self, idx: list[int], vs: list[Tensor], k: int) -> tuple[list[Tensor], int]:
        """(the double backward with the default BLAS on the first m = min(k, VERIFY_VECTORS)
        vectors, m): what a first product is checked against. Only those vectors are recomputed
        (what is checked is the method and the matmul library on this key's shapes, not the
        vectors), so the check costs little next to a pass of many vectors."""
        m = min(k, VERIFY_VECTORS)
        return self._timed("double_backward", idx, [v[:m] for v in vs], m, None), m

    def _checked(self, cand: str, idx: list[int], vs: list[Tensor], k: int,
                 rec: Optional[dict[str, list[float]]], ref: list[Tensor],
                 m: int) -> tuple[Optional[list[Tensor]], float, str]:
        """(``cand``'s product, its relative difference from ``ref`` on the first m vectors, why it
        could not be checked: "" when it could)."""
        try:
            out = self._timed(cand, idx, vs, k, rec)
            diff, why = rel_diff([o[:m] for o in out], ref), ""
            if self.distributed:        # rank 0's verdict for every rank
                diff = dist.broadcast_object(diff, fn=self.fn)
        except NotStructured as exc:    # found while computing (labels, logits): not verified
            out, diff, why = None, float("inf"), str(exc)
        return out, diff, why

    def _run(self, cand: str, idx: list[int], vs: list[Tensor], k: int,
             rec: Optional[dict[str, list[float]]], alone: bool = False,
             reference: Optional[tuple[list[Tensor], int]] = None) -> list[Tensor]:
        key = (tuple(idx), k)
        checks = self.checks.setdefault(key, {})
        cands = self.candidates(k)
        pending = self._pending(key, cands)
        result: Optional[list[Tensor]] = None
        if cand == "double_backward" and pending and not alone:
            # the reference computed on all k vectors: the call's product and the double
            # backward's timing (measured against the structured path on conv nets, ResNet-20 on
            # 32 images: 3.0 s), instead of a separate product of VERIFY_VECTORS columns (0.9 s)
            result = self._timed(cand, idx, vs, k, rec)
            m = min(k, VERIFY_VECTORS)
            ref = [o[:m] for o in result]
        elif cand not in pending:
            return self._timed(cand, idx, vs, k, rec)
        else:
            ref, m = reference or self._reference(idx, vs, k)
        if alone:
            # a borrowed choice (_apply_any) is verified by itself; on a mismatch nothing is
            # turned off yet: the width's full verification below, against the same reference,
            # decides which one is at fault
            out, diff, _ = self._checked(cand, idx, vs, k, rec, ref, m)
            if diff <= verify_tolerance(self.dtype):
                checks[cand] = diff
                return out
            rec.pop(cand, None)             # its timing is measured again with the others
            fresh = min(cands, key=lambda c: len(rec.get(c, ())))
            return self._run(fresh, idx, vs, k, rec, reference=(ref, m))
        # The first products of the structured path and of oneDNN for this key are verified, all on
        # these vectors, against one product of the double backward with the default BLAS (an
        # independent computation of the same numbers). "structured" is checked before
        # "structured+onednn", so that a mismatch is put down to the right one.
        if "structured+onednn" in pending and "structured" not in checks and "structured" not in pending:
            pending.insert(pending.index("structured+onednn"), "structured")
        tol = verify_tolerance(self.dtype)
        for c in pending:
            if c in cands and c not in self.candidates(k):
                continue                    # turned off by an earlier failure in this loop
            if c == cand:                   # the call's product: timed, checked on its first m columns
                out, diff, why = self._checked(c, idx, vs, k, rec if c in cands else None, ref, m)
            else:
                # the others are checked on the m columns alone, untimed (timed on calls of their
                # own): a full product of oneDNN's structured path that failed its check cost
                # ResNet-20 on 32 images 1.4 s of a 1.4 s pass
                out, diff, why = self._checked(c, idx, [v[:m] for v in vs], m, None, ref, m)
            checks[c] = diff
            if diff <= tol:
                if c == cand:
                    result = out
                continue
            if out is not None and c == cand:
                out = None                  # never returned
            if not why:
                why = f"its first product differs from the double backward's by {diff:.1e} relative (> {tol:g})"
            if c == "structured":
                why = f"the structured path: {why}"
                if self.hvp == "structured":
                    raise RuntimeError(f"{self.fn}: hvp='structured': {why}; use hvp='auto'")
                self.structured_off = why
            else:
                why = f"oneDNN's float32 matmuls: {why}: this CPU computes them in reduced precision"
                if self.matmul == "onednn":
                    raise RuntimeError(f"{self.fn}: matmul='onednn': {why}; use matmul='auto' or 'default'")
                self.onednn_off = why
        if result is None:                  # cand failed: the product of the (new) choice for this key
            return self._apply_any(idx, vs, k)
        return result
