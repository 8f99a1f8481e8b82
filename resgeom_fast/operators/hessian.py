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

- ``"structured"`` (Hessian and GGN): Pearlmutter's R-operator written out layer by layer, no
  autograd; the primal forward/backward of each batch is cached like the double backward's graph.
  The model's structure is recognised from what it computes: a torch.fx trace of ``forward``
  (:mod:`resgeom_fast.operators._graph`) made of Linear / Conv2d (``groups=1``) / BatchNorm in
  eval mode (folded into the preceding layer) / ReLU / residual adds / scalar multiples / max and
  average pooling / flatten and view / Identity / Dropout (eval) -- torchvision's ResNets, this
  package's conv and FC nets and users' own residual networks alike -- with the loss
  ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()`` (mean); any other node is refused with a reason
  naming it (``op.structured_off``). Every layer applies the k vectors at once: one GEMM, or one
  convolution over the k tangents as an ``[N k, C, H, W]`` batch plus one with the k tangent
  weights stacked along the channels (:mod:`resgeom_fast.operators._structured_conv`, channels_last);
  the GGN is the same tangent forward, the output Hessian and a plain tangent backward. This
  package's FC ResNets keep the FC engine (:mod:`resgeom_fast.operators._structured`, GEMMs
  laid out for them), which was ~8% faster than the traced graph's on the benchmark FCResNet.
  ``op.structured_flops(k)`` counts the convolution / GEMM operations of one product. Its first
  product per (parameter subset, k) is checked against the double backward (relative difference
  <= 1e-8 in float64, 1e-4 in float32), and the recognised graph's logits against ``model(x)``; a mismatch turns it off
  (``"auto"``; ``op.structured_off`` says why) or raises (``hvp="structured"``).
- ``"double_backward"``: the gradient graph of each batch (``create_graph=True``) is built once
  and cached when ``cache`` is on, then k products are one batched backward through it
  (``torch.autograd.grad(..., is_grads_batched=True)``). Lanczos calls matmat ~100 times on the
  same data, so the forward and first backward are paid once.
- ``"forward_over_reverse"``: ``vmap(jvp(grad(loss)))`` with torch.func, recomputed per call.

``"auto"`` uses the structured path where it applies (on the benchmark FCResNet, CPU, 10 vectors
per pass, it took a third to a half of the autograd methods' time; see the README) -- on conv nets
it measures it against the double backward, as below, and keeps the faster (10 products, one
thread: 0.70x the double backward's time on a CIFAR ResNet-20 with 128 images, 1.55x on
torchvision's resnet18 with 64 CIFAR-sized images, where 11.7M parameters x k vectors of
weight-sized work outweigh the small activations) --, else the double
backward for one vector (about 3x as fast as forward-over-reverse on CPU) and *measures* both
autograd methods for k >= 2 vectors per pass on the operator's own model and
data: the first calls with a given (parameter subset, k) alternate between the two methods
(every call returns its exact product, so nothing is wasted), two timings each, then the faster
one (by its best timing) is used for every later call with that key; where the candidates differ
only in the matmul library (below), a decision made for one pass width is reused for the others;
where they differ in the method, the first call with a new pass width is served by the decision of
the nearest decided width (verified alone when it needs a check) and that width is measured from
its second call on, so a one-off pass (eigsh's residual product of its k Ritz vectors) does not
run every candidate.
``op.hvp_timings`` shows the measurements and ``op.hvp_choice(k)`` the decision. Which wins
depends on model size, k and the device (forward-over-reverse was ~12% faster for 10 vectors on the benchmark ResNet on CPU,
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

Attention (transformers): every graph build and product selects the math kernel of
scaled-dot-product attention and turns ``nn.MultiheadAttention``'s native fast path off while it
runs (:func:`resgeom_fast.core.modules.attention_math`; PyTorch's settings restored afterwards),
because the fused kernels (e.g. the CPU flash kernel a torchvision ViT takes by default) have no
double backward and no forward-mode derivative. The products are those of the same model
(attention values equal to rounding); the fused kernel's speed is not used while a product runs.

Host syncs on CUDA: ``"auto"`` synchronises the device around the products it times (while it is
still measuring candidates); once the method is chosen (or when ``hvp`` names one), a product
issues no ``torch.cuda.synchronize``.

Where things live: this module holds the public constructors and wires the pieces together;
:mod:`~resgeom_fast.operators.curvature` the operator classes (:class:`CurvatureOperator` owns the
data loop, :class:`HessianOperator` / :class:`GGNOperator` supply their batch products),
:mod:`~resgeom_fast.operators._products` the product mathematics,
:mod:`~resgeom_fast.operators._autotune` the auto-tuner and verifier,
:mod:`~resgeom_fast.operators._mean_contract` the loss contract and
:mod:`~resgeom_fast.operators._precision` the TF32 and oneDNN switches.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import nn

from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.operators._autotune import HVP_METHODS, ONEDNN_TOLERANCE  # noqa: F401  (re-exported)
from resgeom_fast.operators._data import ParamSpec, select_params
from resgeom_fast.operators._mean_contract import LossFn, check_mean_contract  # noqa: F401  (re-exported)
from resgeom_fast.operators._precision import (  # noqa: F401  (re-exported)
    MATMUL_BACKENDS,
    onednn_applicable,
    onednn_matmul,
)
from resgeom_fast.operators.blocks import resolve_blocks
from resgeom_fast.operators.curvature import CurvatureEngine, CurvatureOperator, GGNOperator, HessianOperator

__all__ = ["CurvatureOperator", "HessianOperator", "GGNOperator", "hessian", "ggn", "block_hessians"]


def hessian(model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec = None, *,
            batchnorm: str = "eval", hvp: str = "auto", cache: Optional[bool] = None,
            matmul: str = "auto", deterministic: bool = False, precision: str = "ieee",
            distributed: Optional[str] = None) -> HessianOperator:
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
        distributed: None (default: this process's data alone) or, inside an initialised
            torch.distributed process group, "split" (every rank passes the same full data; each
            takes its share) or "sharded" (every rank passes its own share, possibly empty); the
            operator then equals the single-process operator on all the data: each product is the
            local sum weighted by the global sample count followed by one all_reduce
            (docs/distributed.md).

    Returns:
        a symmetric :class:`HessianOperator` of shape (P, P), dtype and device of the parameters;
        ``matmat(X [P, k]) -> [P, k]`` applies k Hessian-vector products in one pass over the data.
        Models with attention are differentiated with the math SDPA kernel and MHA's fast path
        off while products run (module docstring, "Attention").
    """
    names, tensors = select_params("hessian", model, params)
    engine = CurvatureEngine("hessian", HessianOperator, model, loss_fn, data, names, tensors, batchnorm, hvp,
                             cache, matmul, deterministic, precision, distributed)
    return HessianOperator(engine, list(range(len(names))))


def ggn(model: nn.Module, loss_fn: LossFn, data: Any, params: ParamSpec = None, *,
        batchnorm: str = "eval", hvp: str = "auto", cache: Optional[bool] = None,
        matmul: str = "auto", deterministic: bool = False, precision: str = "ieee",
        distributed: Optional[str] = None) -> GGNOperator:
    """The generalised Gauss-Newton matrix ``mean over samples of J^T H_loss J``, J = d outputs /
    d params, H_loss the Hessian of ``loss_fn`` in the outputs. Same arguments as :func:`hessian`
    (no structured path: "auto" and ``deterministic`` choose among the autograd methods).

    For the mean squared error ``nn.MSELoss()`` (mean over all N*d elements of outputs [N, d])
    ``H_loss = 2/(N d) I``, so ``G = (2/(N d)) sum_n J_n^T J_n``.

    Returns:
        a symmetric positive semi-definite (for convex losses) :class:`GGNOperator` (P, P).
    """
    names, tensors = select_params("ggn", model, params)
    engine = CurvatureEngine("ggn", GGNOperator, model, loss_fn, data, names, tensors, batchnorm, hvp, cache,
                             matmul, deterministic, precision, distributed)
    return GGNOperator(engine, list(range(len(names))))


def block_hessians(model: nn.Module, loss_fn: LossFn, data: Any, blocks: Optional[Sequence[Any]] = None, *,
                   batchnorm: str = "eval", hvp: str = "auto",
                   cache: Optional[bool] = None, matmul: str = "auto",
                   deterministic: bool = False, precision: str = "ieee",
                   distributed: Optional[str] = None) -> list[HessianOperator]:
    """Per-block Hessians (diagonal blocks H_ll of the Hessian) of every residual block, in one call.

    The operators share one gradient graph per batch (built once when cached); block l's operator
    acts on the flattened trainable parameters of block l (``BlockInfo.block.parameters()``: for
    a sublayer block, e.g. a ViT's attention or MLP sublayer, the sublayer's own parameters --
    ln_1 and self_attention, or ln_2 and mlp).

    Args:
        blocks: None (every block found by :func:`resgeom_fast.operators.residual_blocks`), or a
            sequence of block modules / :class:`BlockInfo` s / indices into that list.
        others: as in :func:`hessian`.

    Returns:
        one :class:`HessianOperator` per block, in order.
    """
    infos = resolve_blocks("block_hessians", model, blocks)
    names, tensors = select_params("block_hessians", model, [b.block for b in infos])
    engine = CurvatureEngine("block_hessians", HessianOperator, model, loss_fn, data, names, tensors, batchnorm,
                             hvp, cache, matmul, deterministic, precision, distributed)
    pos = {id(t): i for i, t in enumerate(tensors)}
    ops = []
    for b in infos:
        idx = sorted(pos[id(p)] for p in b.block.parameters() if id(p) in pos)
        if not idx:
            raise ArgumentValueError(f"block_hessians: block {b.name!r} has no trainable parameters")
        ops.append(HessianOperator(engine, idx))
    return ops
