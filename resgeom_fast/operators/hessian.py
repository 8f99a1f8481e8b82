"""Curvature operators of a loss: the Hessian and the generalised Gauss-Newton matrix.

Vector space: the flattened concatenation of the chosen parameters, in the order of
``model.named_parameters()`` (each parameter flattened row-major); ``op.param_names``,
``op.param_shapes``, :meth:`CurvatureOperator.flatten` and :meth:`CurvatureOperator.unflatten`
convert between that space and per-parameter tensors.

The loss is the mean over every sample of ``data``: ``loss_fn(model(x), y)`` must be the *mean*
loss over the batch (``reduction="mean"``), and batches of a DataLoader are accumulated with
weights ``batch size / total``. That contract is checked once, on the first batch and its two
halves (:func:`check_mean_contract`): a loss that sums over the samples (which would make the
curvature N times too large) is refused; ``op.loss_reduction`` says what was found. Classification
losses (integer labels) and regression losses (``F.mse_loss`` / ``nn.MSELoss()``, float targets
[N, d]) work with every product method. BatchNorm uses running statistics (``batchnorm="eval"``)
or batch statistics without updating the running ones (``batchnorm="train"``); the model's modes
and buffers are the same after every call as before.

The data must yield the same samples on every pass: an uncached DataLoader is read twice at
construction and every pass is fingerprinted (:class:`~resgeom_fast.operators._data.Batches`);
one that draws other samples (``shuffle=True`` with ``drop_last=True``, random augmentation) raises
:class:`~resgeom_fast.operators._data.NonRepeatableDataError`, whose message names the fix:
:func:`~resgeom_fast.operators.fixed_sample` freezes one pass of it.

Three exact ways to apply k vectors at once (``hvp=``):

- ``"structured"``: for fully-connected residual networks that
  :mod:`resgeom_fast.operators._structured` recognises (this package's FCResNet and the like,
  BatchNorm in eval mode, ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``): Pearlmutter's R-operator written out layer
  by layer, the k vectors stacked into GEMMs, no autograd; the primal forward/backward of each
  batch is cached like the double backward's graph. Its first product per (parameter subset, k)
  is checked against the double backward (relative difference <= 1e-8 in float64, 1e-4 in
  float32), and the recognised layers' logits against ``model(x)``; a mismatch turns it off
  (``"auto"``; ``op.structured_off`` says why) or raises (``hvp="structured"``).
- ``"double_backward"``: the gradient graph of each batch (``create_graph=True``) is built once
  and cached when ``cache`` is on, then k products are one batched backward through it
  (``torch.autograd.grad(..., is_grads_batched=True)``). Lanczos calls matmat ~100 times on the
  same data, so the forward and first backward are paid once.
- ``"forward_over_reverse"``: ``vmap(jvp(grad(loss)))`` with torch.func, recomputed per call.

``"auto"`` uses the structured path where it applies (on the benchmark FCResNet, CPU, 10 vectors
per pass, it took a third to a half of the autograd methods' time; see the README), else the double
backward for one vector (about 3x as fast as forward-over-reverse on CPU) and *measures* both
autograd methods for k >= 2 vectors per pass on the operator's own model and
data: the first calls with a given (parameter subset, k) alternate between the two methods
(every call returns its exact product, so nothing is wasted), two timings each, then the faster
one (by its best timing) is used for every later call with that key; where the candidates differ
only in the matmul library (below), a decision made for one pass width is reused for the others.
``op.hvp_timings`` shows the measurements and ``op.hvp_choice(k)`` the decision. Which wins depends on model size, k and the
device (forward-over-reverse was ~12% faster for 10 vectors on the benchmark ResNet on CPU,
several times slower on small nets where vmap's overhead dominates). Where forward-over-reverse
raises (a loss without a forward-mode derivative in PyTorch, e.g. ``F.huber_loss``), "auto" uses
the double backward from then on (``op.forward_over_reverse_off`` says why); an explicit
``hvp="forward_over_reverse"`` raises with the cause.

``deterministic=True``: timings make the choice, and so the float round-off of the products,
differ from run to run. With this flag "auto" follows a fixed rule that never looks at a clock:
the structured path where it applies (it is still verified; a failed check switches to the double
backward, the same way on every run), else the double backward, for every pass width; ``matmul``
"auto" means the default library. Explicit ``hvp`` / ``matmul`` values are kept; data must then
yield the same batches in the same order. ``op.hvp_method``, ``op.matmul_choice`` and
``op.deterministic`` read the choice. On the CPU two runs then give bitwise-identical products;
on CUDA, PyTorch's own kernels are deterministic only under
``torch.use_deterministic_algorithms(True)``, the caller's process-wide setting.

Matrix products (``matmul=``), float32 on the CPU only: ``"default"`` leaves PyTorch's BLAS
(MKL) in charge; ``"onednn"`` routes float32 matmuls through oneDNN instead, by allowing oneDNN's
bf16 math mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``) during the product.
On CPUs without AMX, oneDNN still computes those GEMMs in float32 (results agree with MKL's to
float32 round-off, ~1e-6 relative on the benchmark Hessian) and on AMD Zen 5 it is 2-3x as fast
as MKL's float32 GEMMs. On a CPU where oneDNN really rounds to bf16 (Intel AMX) the products
would lose ~3 digits, so oneDNN is *verified* before use: the first oneDNN product of every
(parameter subset, k) is compared with the double backward's under the default BLAS
(``op.verification``); a relative difference
above ``ONEDNN_TOLERANCE`` (1e-4; float32 reordering gives ~1e-6, bf16 ~1e-3) turns oneDNN off
for the operator (``"auto"``, the reference product is returned; ``op.onednn_off`` says why) or
raises (``matmul="onednn"``). ``"auto"`` (the default) adds the oneDNN variant of every candidate
method (``"structured+onednn"``, ``"double_backward+onednn"``, ...) to the measured candidates
where it applies (float32 on the CPU with oneDNN available); elsewhere it is ``"default"``. The
setting is PyTorch's process-wide one, changed only while one of our products runs and restored
after it: float32 matmuls that other threads run at the same moment also go to oneDNN.

Precision on CUDA (``precision=``): cuDNN runs float32 convolutions in TF32 by default on Ampere
and later GPUs, which loses ~3 digits per product. With ``precision="ieee"`` (the default) every
product, graph build and the one-off contract check run with IEEE float32 convolutions and
matmuls (TF32 off), PyTorch's settings restored afterwards, even on an exception; ``"tf32"``
leaves them as the caller set them (faster on tensor cores, ~1e-3 relative error).
See :mod:`resgeom_fast.operators._precision` for the cost.

Host syncs on CUDA: ``"auto"`` synchronises the device around the products it times (while it is
still measuring candidates); once the method is chosen (or when ``hvp`` names one), a product
issues no ``torch.cuda.synchronize``.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from resgeom_fast.linalg.operator import LinearOperator, NonFiniteError
from resgeom_fast.operators._precision import check_precision, product_precision
from resgeom_fast.operators._structured import StructuredHVP, parse_structured, structured_loss
from resgeom_fast.operators._data import (
    Batches,
    NonRepeatableDataError,
    ParamSpec,
    has_batchnorm,
    is_single_batch,
    module_mode,
    select_params,
)

LossFn = Callable[[Tensor, Any], Tensor]
HVP_METHODS = ("auto", "structured", "double_backward", "forward_over_reverse")
MATMUL_BACKENDS = ("auto", "default", "onednn")
ONEDNN_TOLERANCE = 1e-4
# first products of the structured path / oneDNN against the double backward: relative tolerance
_VERIFY_TOLERANCE = {torch.float64: 1e-8, torch.float32: ONEDNN_TOLERANCE}
_VERIFY_VECTORS = 2     # columns of the first pass recomputed by the reference

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "hessian", "ggn", "block_hessians"]


def _check_loss(fn: str, loss: Tensor) -> None:
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"{fn}: expected loss_fn to return a scalar (the mean loss of the batch), got {shape}")
    if not loss.is_floating_point():
        raise ValueError(f"{fn}: expected a floating-point loss, got {loss.dtype}")


# relative tolerance of the mean-contract check (values and output gradients of one batch and its
# two halves, all computed from the same outputs: they differ by summation round-off only)
_CONTRACT_TOLERANCE = {torch.float64: 1e-8}


def check_mean_contract(fn: str, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Any, batchnorm: str,
                        single_batch: bool) -> str:
    """Check once, on one batch, that ``loss_fn`` is the *mean* of per-sample losses.

    The batch's outputs o [n, ...] are computed once; the loss and its gradient in o are
    evaluated on the whole batch (L, g) and on its two halves (L1, g1 on the first n1 samples,
    L2, g2 on the other n2). A mean over samples gives ``L = (n1 L1 + n2 L2) / n`` and
    ``g = (n1/n) g1 + (n2/n) g2`` (``g1``, ``g2`` padded with zeros); a sum over samples gives
    ``L = L1 + L2``, ``g = g1 + g2`` and a curvature n times too large: refused (ValueError).
    A loss that is neither (class weights normalised by their batch sum, losses that couple
    samples) is refused when the data have several batches (their weights ``batch size /
    total`` assume the mean) and accepted for one batch (the operator is then the curvature of
    ``loss_fn`` on that batch as given). A mean over other axes too (``nn.MSELoss()``'s mean over
    every element) passes: it is a mean of per-sample losses. Where the loss and its gradient
    vanish (a perfect fit), the same relations are checked at randomly perturbed outputs (the
    contract is a property of ``loss_fn`` at any outputs). Cost: one forward of the batch.

    Returns:
        what was found: ``"mean"``, ``"neither mean nor sum (one batch: loss_fn as given)"`` or
        ``"not checked: <reason>"`` (batches of one sample, where sum and mean coincide;
        labels that are not a tensor; outputs without a leading batch dimension; a loss and
        output gradient that vanish there and at perturbed outputs).

    Raises:
        ValueError for a sum (or, with several batches, a non-mean); NonFiniteError when the loss
        or its gradient is NaN/Inf on the first batch.
    """
    n = int(x.shape[0])
    if n < 2:
        return "not checked: the first batch has one sample (sum and mean coincide)"
    if not isinstance(y, Tensor) or y.dim() == 0 or y.shape[0] != n:
        return "not checked: the labels are not a tensor with the batch dimension first"
    with torch.no_grad(), module_mode(model, batchnorm):
        out = model(x)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != n or not out.is_floating_point():
        return "not checked: the model's outputs are not a floating tensor with the batch dimension first"
    n1 = n // 2
    n2 = n - n1
    w1, w2 = n1 / n, n2 / n

    def evaluate(o: Tensor) -> tuple[list[float], list[Tensor]]:
        o = o.detach().requires_grad_(True)
        vals, grads = [], []
        with torch.enable_grad():
            for sl in (slice(0, n), slice(0, n1), slice(n1, n)):
                L = loss_fn(o[sl], y[sl])
                _check_loss(fn, L)
                if not L.requires_grad:
                    raise ValueError(f"{fn}: expected loss_fn(outputs, y) to depend differentiably on the "
                                     f"outputs, got a loss without a gradient (detached?)")
                (g,) = torch.autograd.grad(L, o, allow_unused=True)
                vals.append(float(L.detach().double()))
                grads.append(torch.zeros_like(o, dtype=torch.float64) if g is None else g.double())
        return vals, grads

    def finite(vals: list[float], grads: list[Tensor]) -> bool:
        return all(math.isfinite(v) for v in vals) and all(bool(t.isfinite().all()) for t in grads)

    vals, grads = evaluate(out)
    if not finite(vals, grads):
        raise NonFiniteError(f"{fn}: loss_fn gave a non-finite loss or output gradient on the first batch "
                             f"(loss {vals[0]:g}; on its two halves {vals[1]:g}, {vals[2]:g})")
    # Where the loss and its gradient vanish (a perfect fit of a squared error) mean and sum agree;
    # the contract is a property of loss_fn at any outputs, so it is then checked at perturbed ones.
    gen = torch.Generator().manual_seed(0)
    # drawn on the CPU on purpose (the same perturbation on every device), once, then moved
    noise = torch.randn(out.shape, generator=gen, dtype=torch.float64, device="cpu").to(device=out.device,
                                                                                        dtype=out.dtype)
    points = [None, 0.1 * (float(out.double().std()) + 1.0) * noise]
    for attempt, delta in enumerate(points):
        if delta is not None:
            vals, grads = evaluate(out + delta)
            if not finite(vals, grads):
                return "not checked: the loss and its output gradient vanish on the first batch"
        (L, L1, L2), (g, g1, g2) = vals, grads
        mean_pred, sum_pred = w1 * L1 + w2 * L2, L1 + L2
        r_mean = abs(L - mean_pred) + float((g - w1 * g1 - w2 * g2).norm())
        r_sum = abs(L - sum_pred) + float((g - g1 - g2).norm())
        scale = abs(L) + abs(L1) + abs(L2) + float(g.norm() + g1.norm() + g2.norm())
        tol = _CONTRACT_TOLERANCE.get(out.dtype, 1e-4) * scale
        if scale > 0 and not (r_mean <= tol and r_sum <= tol):
            break
    else:
        return "not checked: the loss and its output gradient vanish on the first batch"
    where = "" if attempt == 0 else " (at perturbed outputs: the loss vanishes at the model's)"
    nums = (f"on a batch of {n} samples{where} L = {L:.6g}; on its halves L1 = {L1:.6g} ({n1} samples), "
            f"L2 = {L2:.6g} ({n2}): a mean gives (n1 L1 + n2 L2)/n = {mean_pred:.6g}, a sum L1 + L2 = {sum_pred:.6g}")
    if r_mean <= tol:
        return "mean"
    if r_sum <= tol:
        raise ValueError(
            f"{fn}: expected loss_fn to return the mean loss over the batch (reduction='mean'), got a sum over "
            f"the samples ({nums}): the curvature would be {n} times too large; pass a mean-reduced loss (e.g. "
            f"nn.MSELoss() or nn.CrossEntropyLoss() with the default reduction='mean', or divide the sum by "
            f"the batch size)")
    if not single_batch:
        raise ValueError(
            f"{fn}: expected loss_fn to return the mean of per-sample losses (batches are combined with weights "
            f"batch size / total), got a loss that is neither a mean nor a sum over samples ({nums}; relative "
            f"misfit of the mean {r_mean / scale:.2g}); pass a per-sample mean loss, or one (x, y) batch to take "
            f"the curvature of this loss as it is")
    return "neither mean nor sum (one batch: loss_fn as given)"


def _resolve_hvp(fn: str, hvp: str, device: torch.device) -> str:
    if hvp not in HVP_METHODS:
        raise ValueError(f"{fn}: hvp: expected one of {list(HVP_METHODS)}, got {hvp!r}")
    return hvp


def onednn_applicable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``matmul="onednn"`` can apply: float32 on the CPU with oneDNN built in."""
    return (dtype == torch.float32 and device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"))


@contextlib.contextmanager
def onednn_matmul() -> Iterator[None]:
    """Route float32 CPU matmuls through oneDNN (its bf16 math mode allowed) inside the block;
    the previous setting is restored on exit. See the module doc for when this is exact."""
    mm = torch.backends.mkldnn.matmul
    saved = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = saved


def _resolve_matmul(fn: str, matmul: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    """The matmul backends to use (several: measured by "auto")."""
    if matmul not in MATMUL_BACKENDS:
        raise ValueError(f"{fn}: matmul: expected one of {list(MATMUL_BACKENDS)}, got {matmul!r}")
    ok = onednn_applicable(dtype, device)
    if matmul == "onednn" and not ok:
        raise ValueError(f"{fn}: matmul='onednn' needs float32 parameters on the CPU and a PyTorch built with "
                         f"oneDNN, got {dtype} on {device} (use matmul='auto' or 'default')")
    if matmul == "auto":
        return ["default", "onednn"] if ok else ["default"]
    return [matmul]


def _needs_check(cand: str) -> bool:
    """Candidates whose first product is verified: the structured path and oneDNN matmuls."""
    method, _, backend = cand.partition("+")
    return method == "structured" or backend == "onednn"


class _NotStructured(ValueError):
    """The structured path does not apply to these data / this model (found when computing)."""


class _ForwardOverReverseFailed(Exception):
    """torch.func's forward-over-reverse raised (e.g. a loss without a forward-mode derivative,
    such as ``F.huber_loss``); ``cause`` is the original exception."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _rel_diff(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """||a - b|| / ||b|| over all tensors (float64), read back with one host sync."""
    num2 = torch.stack([(x.double() - y.double()).pow(2).sum() for x, y in zip(a, b)]).sum()
    den2 = torch.stack([y.double().pow(2).sum() for y in b]).sum()
    num, den = (v ** 0.5 for v in torch.stack([num2, den2]).tolist())
    return num / den if den > 0 else (0.0 if num == 0 else float("inf"))


# "auto": timings per candidate (method, or method+onednn) collected before deciding (two each:
# the first of a candidate includes one-off warm-up such as torch.func tracing, the best of two
# is compared).
_AUTO_SAMPLES = 2
_TUNED = ("forward_over_reverse", "double_backward")


def _accumulate(acc: Optional[list[Tensor]], res: Sequence[Tensor], w: float) -> list[Tensor]:
    """``acc += w * res`` per parameter (the batch weight of a DataLoader's mean loss)."""
    if acc is None:
        return [w * r for r in res]
    for a, r in zip(acc, res):
        a.add_(r, alpha=w)
    return acc


class _Engine:
    """Per-batch state shared by operators on subsets of one parameter list."""

    def __init__(self, fn: str, kind: str, model: nn.Module, loss_fn: LossFn, data: Any,
                 names: list[str], params: list[Tensor], batchnorm: str, hvp: str,
                 cache: Optional[bool], matmul: str = "auto", deterministic: bool = False,
                 precision: str = "ieee") -> None:
        if not callable(loss_fn):
            raise TypeError(f"{fn}: expected loss_fn callable, got {type(loss_fn).__name__}")
        if batchnorm not in ("eval", "train"):
            raise ValueError(f"{fn}: batchnorm: expected 'eval' or 'train', got {batchnorm!r}")
        self.fn, self.kind, self.model, self.loss_fn = fn, kind, model, loss_fn
        self.precision = check_precision(fn, precision)
        self.names, self.params, self.batchnorm = names, params, batchnorm
        self.dtype, self.device = params[0].dtype, params[0].device
        self.hvp = _resolve_hvp(fn, hvp, self.device)
        if not isinstance(deterministic, bool):
            raise TypeError(f"{fn}: expected deterministic a bool, got {type(deterministic).__name__}")
        self.deterministic = deterministic
        self.matmul = matmul
        self.backends = _resolve_matmul(fn, matmul, self.dtype, self.device)
        if deterministic and matmul == "auto":
            self.backends = ["default"]         # the fixed rule: the default library
        # verification per (param subset, k): {candidate: relative difference of its first
        # product to the double backward's (default BLAS)}
        self.checks: dict[tuple[tuple[int, ...], int], dict[str, float]] = {}
        self.onednn_off: Optional[str] = None      # why "auto" stopped using oneDNN
        self.structured: Optional[StructuredHVP] = None
        self.structured_off: Optional[str] = None  # why the structured path is not used
        self.fwd_off: Optional[str] = None         # why "auto" stopped using forward-over-reverse
        self._primals: Optional[list[tuple[float, Any]]] = None
        self._forward_checked = False    # the structured logits matched model(x) over a whole pass
        if self.hvp in ("auto", "structured"):
            layers, why = (parse_structured(model, params, loss_fn, batchnorm) if kind == "hessian"
                           else (None, "the GGN has no structured path"))
            if layers is None:
                if self.hvp == "structured":
                    raise ValueError(f"{fn}: hvp='structured' does not apply: {why}; use hvp='auto'")
                self.structured_off = why
            else:
                self.structured = StructuredHVP(layers, params, loss=structured_loss(loss_fn) or "ce")
        self.cache = is_single_batch(data) if cache is None else bool(cache)
        strict_why = ("batchnorm='train' (batch statistics)" if batchnorm == "train" and has_batchnorm(model)
                      else "deterministic=True" if deterministic else "")
        self.batches = Batches(fn, data, self.dtype, self.device, materialise=self.cache,
                               strict=bool(strict_why), strict_why=strict_why)
        if batchnorm == "train" and has_batchnorm(model) and min(self.batches.sizes) < 2:
            raise ValueError(
                f"{fn}: batchnorm='train' needs batches of at least 2 samples (batch statistics of "
                f"one sample are degenerate), got a batch of size {min(self.batches.sizes)}"
            )
        self._graphs: Optional[list[tuple]] = None
        # "auto": {(param subset, k): {method: [seconds, ...]}}
        self.timings: dict[tuple[tuple[int, ...], int], dict[str, list[float]]] = {}
        x0, y0 = self.batches.first
        with product_precision(self.precision):
            self.loss_reduction = check_mean_contract(fn, model, loss_fn, x0, y0, batchnorm,
                                                      single_batch=len(self.batches.sizes) == 1)
            if self.cache and self.hvp in ("double_backward", "auto"):
                self._graphs = [self._build(w, x, y) for w, x, y in self.batches]
            else:  # validate the loss on the first batch
                with torch.no_grad(), module_mode(model, batchnorm):
                    _check_loss(fn, loss_fn(model(x0), y0))

    # -- graphs of the double-backward path -----------------------------------------------------
    def _build(self, w: float, x: Tensor, y: Any) -> tuple:
        with torch.enable_grad(), module_mode(self.model, self.batchnorm), product_precision(self.precision):
            out = self.model(x)
            if self.kind == "hessian":
                loss = self.loss_fn(out, y)
                _check_loss(self.fn, loss)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                return (w, grads)
            # GGN: outputs with their graph, gradient of the loss in output space, and J^T u
            # as a graph linear in a dummy u (so that J v = d<J^T u, v>/du).
            outd = out.detach().requires_grad_(True)
            loss = self.loss_fn(outd, y)
            _check_loss(self.fn, loss)
            (gout,) = torch.autograd.grad(loss, outd, create_graph=True)
            u = torch.zeros_like(out, requires_grad=True)
            jtu = torch.autograd.grad(out, self.params, u, create_graph=True, allow_unused=True)
            return (w, out, outd, gout, u, jtu)

    def _graphs_iter(self):
        if self._graphs is not None:
            yield from self._graphs
        else:
            for w, x, y in self.batches:
                yield self._build(w, x, y)

    @staticmethod
    def _grad(outputs: Sequence[Optional[Tensor]], inputs: Sequence[Tensor],
              grad_outputs: Sequence[Tensor], k: int) -> list[Tensor]:
        """Batched ``sum_i d<outputs_i, grad_outputs_i>/d inputs`` (k rows), zeros where unused."""
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
        if not pairs:
            return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) for p in inputs]
        if k == 1:  # a plain backward: vmap's overhead buys nothing for one vector
            res = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g[0] for _, g in pairs],
                                      retain_graph=True, allow_unused=True)
            res = tuple(None if r is None else r.unsqueeze(0) for r in res)
        else:
            res = torch.autograd.grad([o for o, _ in pairs], list(inputs), [g for _, g in pairs],
                                      retain_graph=True, is_grads_batched=True, allow_unused=True)
        return [torch.zeros((k, *p.shape), dtype=p.dtype, device=p.device) if r is None else r
                for r, p in zip(res, inputs)]

    def candidates(self, k: int) -> list[str]:
        """What "auto" measures for passes of ``k`` vectors: methods, each with every backend."""
        if self.hvp == "structured" or (self.hvp == "auto" and self.structured_off is None):
            methods = ["structured"]
        elif self.hvp == "auto":
            # deterministic: the fixed rule (the double backward), never a timing
            fixed = k == 1 or self.deterministic or self.fwd_off is not None
            methods = ["double_backward"] if fixed else list(_TUNED)
        else:
            methods = [self.hvp]
        backends = [b for b in self.backends if not (b == "onednn" and self.onednn_off)]
        return [m if b == "default" else f"{m}+onednn" for m in methods for b in backends]

    def choice(self, idx: Sequence[int], k: int) -> Optional[str]:
        """The candidate used for ``k`` vectors on params ``idx`` (None: still measuring)."""
        cands = self.candidates(k)
        if len(cands) == 1:
            return cands[0]
        rec = self.timings.get((tuple(idx), k))
        if rec is None or any(len(rec.get(c, ())) < _AUTO_SAMPLES for c in cands):
            if len({c.partition("+")[0] for c in cands}) == 1:
                # one method, two matmul libraries: which library is faster does not hinge on k,
                # so a decision measured for another pass width of these parameters is reused
                for (idx2, k2), rec2 in self.timings.items():
                    if idx2 == tuple(idx) and all(len(rec2.get(c, ())) >= _AUTO_SAMPLES for c in cands):
                        return min(cands, key=lambda c: min(rec2[c]))
            return None
        return min(cands, key=lambda c: min(rec[c]))

    def apply(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        """Curvature products restricted to params ``idx``: ``vs[j]`` is [k, *shape of idx[j]].

        Runs under the operator's ``precision`` (IEEE float32 on CUDA unless "tf32";
        :mod:`resgeom_fast.operators._precision`)."""
        with product_precision(self.precision):
            return self._apply_guarded(idx, vs, k)

    def _apply_guarded(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        try:
            return self._apply_any(idx, vs, k)
        except _ForwardOverReverseFailed as exc:
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
        # still measuring: the candidate with fewest timings so far (forward-over-reverse first)
        rec = self.timings.setdefault((tuple(idx), k), {})
        cand = min(self.candidates(k), key=lambda c: len(rec.get(c, ())))
        return self._run(cand, idx, vs, k, rec)

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
                    out = self._apply_method(method, idx, vs, k)
                except (NonRepeatableDataError, _NotStructured):
                    raise
                except (RuntimeError, NotImplementedError) as exc:
                    raise _ForwardOverReverseFailed(exc) from exc
            else:
                out = self._apply_method(method, idx, vs, k)
        if sync:
            torch.cuda.synchronize(self.device)
        if rec is not None:
            rec.setdefault(cand, []).append(time.perf_counter() - t0)
        return out

    def _run(self, cand: str, idx: list[int], vs: list[Tensor], k: int,
             rec: Optional[dict[str, list[float]]]) -> list[Tensor]:
        key = (tuple(idx), k)
        checks = self.checks.setdefault(key, {})
        cands = self.candidates(k)
        pending = [c for c in cands if _needs_check(c) and c not in checks]
        if cand not in pending:
            return self._timed(cand, idx, vs, k, rec)
        # The first products of the structured path and of oneDNN for this key are verified, all on
        # these vectors, against one product of the double backward with the default BLAS (an
        # independent computation of the same numbers). "structured" is checked before
        # "structured+onednn", so that a mismatch is put down to the right one.
        if "structured+onednn" in pending and "structured" not in checks and "structured" not in pending:
            pending.insert(pending.index("structured+onednn"), "structured")
        # The reference is computed for the first _VERIFY_VECTORS vectors only (what is checked is
        # the method and the matmul library on this key's shapes, not the vectors), so the check
        # costs little next to a pass of many vectors.
        m = min(k, _VERIFY_VECTORS)
        ref = self._timed("double_backward", idx, [v[:m] for v in vs], m, None)
        tol = _VERIFY_TOLERANCE.get(self.dtype, 1e-2)
        result: Optional[list[Tensor]] = None
        for c in pending:
            if c in cands and c not in self.candidates(k):
                continue                    # turned off by an earlier failure in this loop
            try:
                out = self._timed(c, idx, vs, k, rec if c in cands else None)
                diff, why = _rel_diff([o[:m] for o in out], ref), ""
            except _NotStructured as exc:   # found while computing (labels, logits): not verified
                out, diff, why = None, float("inf"), str(exc)
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

    def _primals_iter(self):
        if self._primals is not None:
            yield from self._primals
            return
        built = []              # kept only when caching: an uncached pass holds one batch at a time
        for w, x, y in self.batches:
            item = (w, self._primal(x, y))
            if self.cache:
                built.append(item)
            yield item
        self._forward_checked = True
        if self.cache:
            self._primals = built

    def _primal(self, x: Tensor, y: Any) -> Any:
        assert self.structured is not None
        if self.structured.loss == "mse":
            d = self.structured.layers[-1].mod.out_features           # the head's outputs
            if not (isinstance(y, Tensor) and tuple(y.shape) == (x.shape[0], d) and y.dtype == x.dtype):
                raise _NotStructured(f"the targets are not a float tensor [N, {d}] (the outputs' shape) of the "
                                     f"inputs' dtype")
        elif not (isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() and not y.is_complex()):
            raise _NotStructured("the labels are not a 1-D tensor of class indices")
        st = self.structured.primal(x, y)
        if self._forward_checked:   # every batch of a whole pass already matched model(x)
            return st
        with torch.no_grad(), module_mode(self.model, self.batchnorm):
            logits = self.model(x)
        tol = _VERIFY_TOLERANCE.get(self.dtype, 1e-2)
        if not (isinstance(logits, Tensor) and logits.shape == st.logits.shape
                and _rel_diff([st.logits], [logits]) <= tol):
            raise _NotStructured("the recognised layers do not reproduce model(x) (the model's forward "
                                 "is not the stem/blocks/head composition)")
        return st

    def _apply_method(self, method: str, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        if method == "forward_over_reverse":
            return self._apply_func(idx, vs, k)
        if method == "structured":
            acc_s: Optional[list[Tensor]] = None
            for w, st in self._primals_iter():
                acc_s = _accumulate(acc_s, self.structured.apply(st, idx, vs, k), w)
            assert acc_s is not None
            return acc_s
        acc: Optional[list[Tensor]] = None
        sub = [self.params[i] for i in idx]
        for g in self._graphs_iter():
            if self.kind == "hessian":
                w, grads = g
                res = self._grad([grads[i] for i in idx], sub, vs, k)
            else:
                w, out, outd, gout, u, jtu = g
                jv = self._grad([jtu[i] for i in idx], [u], vs, k)[0]           # [k, *out]
                hjv = self._grad([gout], [outd], [jv], k)[0]                     # [k, *out]
                res = self._grad([out], sub, [hjv], k)
            acc = _accumulate(acc, res, w)
        assert acc is not None
        return acc

    def _apply_func(self, idx: list[int], vs: list[Tensor], k: int) -> list[Tensor]:
        from torch.func import functional_call, grad, jvp, vjp, vmap

        names = [self.names[i] for i in idx]
        primals = tuple(self.params[i].detach() for i in idx)
        acc: Optional[list[Tensor]] = None
        nps = len(primals)
        for w, x, y in self.batches:
            def outputs(*ps: Tensor) -> Tensor:
                return functional_call(self.model, dict(zip(names, ps)), (x,))

            # Floating-point targets enter jvp as primals with a zero tangent (which changes
            # nothing): without one, PyTorch's forward derivative of mse_loss's backward
            # writes into the implicit zero tangent of the target ("ZeroTensors are immutable").
            y_dual = isinstance(y, Tensor) and y.is_floating_point()
            ys = (y,) if y_dual else ()
            yt = (torch.zeros_like(y),) if y_dual else ()
            with module_mode(self.model, self.batchnorm):
                if self.kind == "hessian":
                    def loss(*a: Any) -> Tensor:
                        return self.loss_fn(outputs(*a[:nps]), a[nps] if y_dual else y)

                    g = grad(loss, argnums=tuple(range(nps)))
                    res = vmap(lambda *t: jvp(g, primals + ys, t + yt)[1])(*vs)
                else:
                    out, vjp_fn = vjp(outputs, *primals)
                    out = out.detach()
                    jv = vmap(lambda *t: jvp(outputs, primals, t)[1])(*vs)
                    gl = grad(lambda o, *yy: self.loss_fn(o, yy[0] if y_dual else y))
                    hjv = vmap(lambda t: jvp(gl, (out,) + ys, (t,) + yt)[1])(jv)
                    res = vmap(vjp_fn)(hjv)
            acc = _accumulate(acc, [r.detach() for r in res], w)
        assert acc is not None
        return acc


class CurvatureOperator(LinearOperator):
    """A symmetric (P, P) curvature matrix of a loss w.r.t. chosen parameters (see the module doc).

    Attributes:
        param_names: names of the chosen parameters, in the order of the vector space.
        param_shapes: their shapes; ``param_offsets[i]`` is where parameter i starts.
        num_samples: samples of the data the loss is averaged over.
        hvp: the product method ("auto", "structured", "double_backward" or "forward_over_reverse").
        matmul: the matmul backend setting ("auto", "default" or "onednn").
        cached: whether per-batch graphs (and the batches) are kept between calls.
        deterministic: whether "auto" follows the fixed rule instead of timings (module doc).
        precision: "ieee" (IEEE float32 forced on CUDA during products) or "tf32" (PyTorch's
            settings as they are); see :func:`hessian`.
        loss_reduction: what the one-off check of the mean contract found: ``"mean"``,
            ``"neither mean nor sum (one batch: loss_fn as given)"`` or ``"not checked: <why>"``
            (:func:`check_mean_contract`).
        max_vectors_per_pass: a matmat with more columns is applied in passes of this many
            (default 10, the probes of a 10-probe SLQ; wider passes were no faster per vector on
            the benchmark ResNet, and they cost memory and longer "auto" measurements).
    """

    def __init__(self, engine: _Engine, idx: list[int]) -> None:
        self._engine, self._idx = engine, idx
        self.param_names = [engine.names[i] for i in idx]
        self.param_shapes = [tuple(engine.params[i].shape) for i in idx]
        self._numels = [engine.params[i].numel() for i in idx]
        offsets, o = [], 0
        for n in self._numels:
            offsets.append(o)
            o += n
        self.param_offsets = offsets
        super().__init__((o, o), engine.dtype, engine.device, (), symmetric=True)
        self.num_samples = engine.batches.total
        self.hvp, self.cached, self.matmul = engine.hvp, engine.cache, engine.matmul
        self.deterministic = engine.deterministic
        self.precision = engine.precision
        self.loss_reduction = engine.loss_reduction
        self.max_vectors_per_pass = 10

    def _matmat(self, X: Tensor) -> Tensor:
        k = X.shape[-1]
        if k == 0:
            return X.new_zeros(X.shape)
        Xt = X.detach().t()                                               # [k, P]
        outs = []
        for c0 in range(0, k, self.max_vectors_per_pass):                 # bounds memory
            Xc = Xt[c0:c0 + self.max_vectors_per_pass]
            kc = Xc.shape[0]
            vs = [Xc[:, o:o + n].reshape(kc, *s) for o, n, s in
                  zip(self.param_offsets, self._numels, self.param_shapes)]
            res = self._engine.apply(self._idx, vs, kc)
            outs.append(torch.cat([r.reshape(kc, -1) for r in res], dim=1))
        # [k, P] -> a [P, k] view: Lanczos reads it back transposed, so no copy is made here.
        return (outs[0] if len(outs) == 1 else torch.cat(outs)).t()

    @property
    def hvp_timings(self) -> dict[int, dict[str, list[float]]]:
        """``"auto"`` measurements of this operator: {k: {candidate: [seconds per pass, ...]}}, a
        candidate being a method, with ``"+onednn"`` when oneDNN ran its matmuls."""
        return {k: {m: list(t) for m, t in rec.items()}
                for (idx, k), rec in self._engine.timings.items() if list(idx) == self._idx}

    def hvp_choice(self, k: int) -> Optional[str]:
        """The product method used for passes of ``k`` vectors, with ``"+onednn"`` when oneDNN runs
        its matmuls (None: ``"auto"`` still measuring)."""
        return self._engine.choice(self._idx, k)

    @property
    def hvp_method(self) -> Optional[str]:
        """The product method of every pass ("structured", "double_backward" or
        "forward_over_reverse") when it is fixed: ``hvp`` names one, ``deterministic=True``, or
        "auto" found the structured path; None while "auto" picks per pass width by timing (see
        :meth:`hvp_choice`). It can change once: when the structured path fails its first check
        (or forward-over-reverse raises under "auto"), the double backward takes over."""
        methods = {c.partition("+")[0] for c in self._engine.candidates(2)}
        return methods.pop() if len(methods) == 1 else None

    @property
    def matmul_choice(self) -> Optional[str]:
        """The matmul library of every pass ("default" or "onednn") when it is fixed (``matmul``
        names one, ``deterministic=True``, or oneDNN does not apply); None while "auto" measures."""
        libs = {c.partition("+")[2] or "default" for c in self._engine.candidates(2)}
        return libs.pop() if len(libs) == 1 else None

    @property
    def forward_over_reverse_off(self) -> Optional[str]:
        """Why ``hvp="auto"`` stopped using forward-over-reverse (it raised on this model / loss);
        None: it did not."""
        return self._engine.fwd_off

    @property
    def verification(self) -> dict[int, dict[str, float]]:
        """{k: {candidate: relative difference of its first product to the double backward's}}
        for the structured path and oneDNN candidates (module doc)."""
        return {k: dict(d) for (idx, k), d in self._engine.checks.items() if list(idx) == self._idx and d}

    @property
    def structured_off(self) -> Optional[str]:
        """Why the structured path is not used (None: it is, or ``hvp`` names another method)."""
        return self._engine.structured_off

    @property
    def onednn_off(self) -> Optional[str]:
        """Why ``matmul="auto"`` stopped using oneDNN (None: it did not)."""
        return self._engine.onednn_off

    def flatten(self, tensors: Union[dict[str, Tensor], Sequence[Tensor]]) -> Tensor:
        """Per-parameter tensors (a dict by name or a sequence in order), each ``[*shape]`` or
        ``[*shape, k]``, to one ``[P]`` / ``[P, k]`` tensor of the vector space."""
        if isinstance(tensors, dict):
            missing = [n for n in self.param_names if n not in tensors]
            if missing:
                raise ValueError(f"flatten: expected tensors for every parameter, missing {missing}")
            tensors = [tensors[n] for n in self.param_names]
        tensors = list(tensors)
        if len(tensors) != len(self.param_shapes):
            raise ValueError(f"flatten: expected {len(self.param_shapes)} tensors, got {len(tensors)}")
        extra = tensors[0].dim() - len(self.param_shapes[0])
        if extra not in (0, 1):
            raise ValueError(f"flatten: expected tensors of the parameter shapes (optionally with a trailing k), "
                             f"got {tuple(tensors[0].shape)} for {self.param_shapes[0]}")
        if extra == 0:
            return torch.cat([t.reshape(-1) for t in tensors])
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in tensors])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """A ``[P]`` or ``[P, k]`` tensor to a dict ``name -> [*shape]`` (or ``[*shape, k]``) of views."""
        if vec.dim() not in (1, 2) or vec.shape[0] != self.shape[0]:
            raise ValueError(f"unflatten: expected a tensor of shape [{self.shape[0]}] or [{self.shape[0]}, k], "
                             f"got {tuple(vec.shape)}")
        tail = tuple(vec.shape[1:])
        return {n: vec[o:o + m].reshape(*s, *tail) for n, o, m, s in
                zip(self.param_names, self.param_offsets, self._numels, self.param_shapes)}

    def clear_cache(self) -> None:
        """Drop the cached graphs (rebuilt on the next call); call after changing the parameters."""
        self._engine._primals = None
        if self._engine._graphs is not None:
            self._engine._graphs = None
            if self._engine.cache and self._engine.hvp in ("double_backward", "auto"):
                self._engine._graphs = [self._engine._build(w, x, y) for w, x, y in self._engine.batches]


class HessianOperator(CurvatureOperator):
    """The Hessian of the mean loss (a :class:`CurvatureOperator`)."""


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``G = mean_b J_b^T H_out,b J_b`` (a :class:`CurvatureOperator`)."""


def _make(fn: str, kind: str, model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec,
          batchnorm: str, hvp: str, cache: Optional[bool], matmul: str, deterministic: bool,
          precision: str) -> _Engine:
    names, tensors = select_params(fn, model, params)
    return _Engine(fn, kind, model, loss_fn, data, names, tensors, batchnorm, hvp, cache, matmul, deterministic,
                   precision)


def hessian(model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec = None, *,
            batchnorm: str = "eval", hvp: str = "auto", cache: Optional[bool] = None,
            matmul: str = "auto", deterministic: bool = False, precision: str = "ieee") -> HessianOperator:
    """The Hessian of the mean loss over ``data`` w.r.t. the chosen parameters, as an operator.

    Args:
        model: an ``nn.Module`` mapping x to outputs.
        loss_fn: ``loss_fn(outputs, y) -> scalar``, the *mean* loss of a batch (checked once on
            the first batch, :func:`check_mean_contract`: a sum over samples is refused).
            Classification (integer labels) and regression (``F.mse_loss``, ``nn.MSELoss()``,
            float targets [N, d]) losses work with every method.
        data: one ``(x, y)`` batch or an iterable of batches (a DataLoader; iterated in order,
            once per matmat unless cached). It must yield the same samples on every pass: an
            uncached iterable is read twice at construction and fingerprinted on every pass
            (:class:`resgeom_fast.operators._data.Batches`), and one that changes (shuffle with
            drop_last, random augmentation) raises :class:`NonRepeatableDataError`; freeze such a
            loader with :func:`resgeom_fast.operators.fixed_sample`.
            x must be on the parameters' device, in their dtype when floating.
        params: None (all trainable parameters), names (parameters or modules), modules (e.g. one
            residual block) or parameter tensors. Order: that of ``model.named_parameters()``.
        batchnorm: "eval" (running statistics) or "train" (batch statistics, running statistics
            untouched; batches of >= 2 samples).
        hvp: "auto", "structured", "double_backward" or "forward_over_reverse" (module doc).
        cache: keep per-batch gradient graphs between calls (default: True for one batch, False
            for a DataLoader; True on a DataLoader keeps every batch's graph in memory).
        matmul: "auto", "default" or "onednn": which library runs float32 CPU matmuls (module
            doc; oneDNN is verified against the default before use).
        deterministic: make "auto" choose by a fixed rule, never by timing: the structured path
            where it applies and passes its check, else the double backward; the default matmul
            library. Explicit ``hvp`` / ``matmul`` values are kept. Also requires the data to
            yield the same batches in the same order. ``op.hvp_method``, ``op.matmul_choice``
            read the choice. Products are then bitwise reproducible on the CPU; on CUDA also set
            ``torch.use_deterministic_algorithms(True)`` (the caller's process-wide setting).
        precision: "ieee" (default) or "tf32": float32 arithmetic of cuDNN convolutions and
            cuBLAS matmuls on CUDA while the operator's products and graphs are computed.
            "ieee" forces IEEE float32 (no TF32) and restores PyTorch's settings afterwards;
            cost: on Ampere/Hopper tensor cores float32 convolutions / matmuls then run at the
            FP32 rate, up to several times slower than TF32 (peak 19.5 vs 156 TFLOP/s on an
            A100), but TF32 loses ~3 digits per product, below eigsh's float32 tolerance.
            "tf32" leaves PyTorch's process-wide settings as they are. No effect on the CPU or
            in float64 (:mod:`resgeom_fast.operators._precision`).

    Returns:
        a symmetric :class:`HessianOperator` of shape (P, P), dtype and device of the parameters;
        ``matmat(X [P, k]) -> [P, k]`` applies k Hessian-vector products in one pass over the data.
    """
    engine = _make("hessian", "hessian", model, loss_fn, data, params, batchnorm, hvp, cache, matmul,
                   deterministic, precision)
    return HessianOperator(engine, list(range(len(engine.names))))


def ggn(model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec = None, *,
        batchnorm: str = "eval", hvp: str = "auto", cache: Optional[bool] = None,
        matmul: str = "auto", deterministic: bool = False, precision: str = "ieee") -> GGNOperator:
    """The generalised Gauss-Newton matrix ``mean over samples of J^T H_loss J``, J = d outputs /
    d params, H_loss the Hessian of ``loss_fn`` in the outputs. Same arguments as :func:`hessian`
    (no structured path: "auto" and ``deterministic`` choose among the autograd methods).

    For the mean squared error ``nn.MSELoss()`` (mean over all N*d elements of outputs [N, d])
    ``H_loss = 2/(N d) I``, so ``G = (2/(N d)) sum_n J_n^T J_n``.

    Returns:
        a symmetric positive semi-definite (for convex losses) :class:`GGNOperator` (P, P).
    """
    engine = _make("ggn", "ggn", model, loss_fn, data, params, batchnorm, hvp, cache, matmul, deterministic,
                   precision)
    return GGNOperator(engine, list(range(len(engine.names))))


def block_hessians(model: nn.Module, loss_fn: LossFn, data: Any, blocks: Optional[Sequence[Any]] = None, *,
                   batchnorm: str = "eval", hvp: str = "auto",
                   cache: Optional[bool] = None, matmul: str = "auto",
                   deterministic: bool = False, precision: str = "ieee") -> list[HessianOperator]:
    """Per-block Hessians (diagonal blocks H_ll of the Hessian) of every residual block, in one call.

    The operators share one gradient graph per batch (built once when cached); block l's operator
    acts on the flattened trainable parameters of block l.

    Args:
        blocks: None (every block found by :func:`resgeom_fast.operators.residual_blocks`), or a
            sequence of block modules / :class:`BlockInfo` s / indices into that list.
        others: as in :func:`hessian`.

    Returns:
        one :class:`HessianOperator` per block, in order.
    """
    from resgeom_fast.operators.blocks import resolve_blocks

    infos = resolve_blocks("block_hessians", model, blocks)
    names, tensors = select_params("block_hessians", model, [b.block for b in infos])
    engine = _Engine("block_hessians", "hessian", model, loss_fn, data, names, tensors, batchnorm, hvp,
                     cache, matmul, deterministic, precision)
    pos = {id(t): i for i, t in enumerate(tensors)}
    ops = []
    for b in infos:
        idx = sorted(pos[id(p)] for p in b.block.parameters() if id(p) in pos)
        if not idx:
            raise ValueError(f"block_hessians: block {b.name!r} has no trainable parameters")
        ops.append(HessianOperator(engine, idx))
    return ops
