"""IEEE float32 for the operators' products on CUDA (no TF32), restored afterwards.

On Ampere and later GPUs PyTorch runs float32 cuDNN convolutions in TF32 by default (10-bit
mantissa inputs, ~1e-3 relative error per product), and float32 cuBLAS matmuls in TF32 when the
caller allows it. Curvature and Jacobian products in TF32 lose about 3 digits, below the float32
tolerance of eigsh / the SVDs built on them, so the operators force IEEE float32 while their
products (and the forward passes they are built from) run: ``precision="ieee"``, the default.

Cost of ``"ieee"``: float32 convolutions and matmuls on a GPU's tensor cores run at the plain
FP32 rate instead of the TF32 rate (peak 19.5 vs 156 TFLOP/s on an A100, about 67 vs 495 on an
H100/H200 SXM): up to several times slower for convolution-heavy float32 products. float64, and
everything on the CPU, is unaffected (TF32 does not exist there). ``precision="tf32"`` leaves
PyTorch's process-wide settings as the caller set them (TF32 wherever they allow it).

The settings are process-wide: while one of our products runs, float32 convolutions / matmuls
that other threads run at the same moment also use IEEE float32.

The CPU's float32 matmul library (``matmul=``; :mod:`resgeom_fast.operators.hessian`) is the other
process-wide switch the products flip and restore: :func:`onednn_matmul` routes float32 CPU
matmuls through oneDNN (its bf16 math mode allowed) while a product runs; :func:`onednn_applicable`
says where it can apply, :func:`resolve_matmul` turns the ``matmul`` argument into the libraries to
use (exact only where oneDNN keeps float32: every use is verified first, see
:mod:`resgeom_fast.operators._autotune`).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

from resgeom_fast.core.checks import ArgumentValueError, check_choice

PRECISIONS = ("ieee", "tf32")
MATMUL_BACKENDS = ("auto", "default", "onednn")

__all__ = ["MATMUL_BACKENDS", "PRECISIONS", "check_precision", "ieee_float32", "onednn_applicable",
           "onednn_matmul", "product_precision", "resolve_matmul"]


def check_precision(fn: str, precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ValueError naming ``fn``
    (``"<fn>: precision: expected one of ['ieee', 'tf32'], got <repr>"``)."""
    return check_choice(None, f"{fn}: precision", precision, PRECISIONS)


def _new_api() -> bool:
    """Whether this PyTorch has the per-operator ``fp32_precision`` settings (torch >= 2.9)."""
    cudnn = torch.backends.cudnn
    return (hasattr(getattr(cudnn, "conv", None), "fp32_precision")
            and hasattr(getattr(cudnn, "rnn", None), "fp32_precision")
            and _has_attr(torch.backends.cuda.matmul, "fp32_precision"))


def _has_attr(obj: object, name: str) -> bool:
    try:
        getattr(obj, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _effective(op_value: str) -> str:
    """The precision a per-operator value means: "none" inherits cuda's, then the generic one."""
    if op_value != "none":
        return op_value
    for parent in (torch.backends.cudnn, torch.backends):     # ("cuda", "all"), ("generic", "all")
        v = getattr(parent, "fp32_precision", "none")
        if v != "none":
            return v
    return "ieee"


def _legacy(obj: object) -> Optional[bool]:
    """``obj.allow_tf32``, or None where PyTorch refuses to read it (a mix of the legacy and the
    per-operator settings that disagree)."""
    try:
        return bool(obj.allow_tf32)
    except RuntimeError:
        return None


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """IEEE float32 for cuDNN convolutions and cuBLAS matmuls inside the block; restored on exit
    (also on an exception). Nests.

    PyTorch >= 2.9 keeps two settings per library that must agree (its kernels refuse to run on
    a mix): the legacy flag (``torch.backends.cudnn.allow_tf32``,
    ``torch.backends.cuda.matmul.allow_tf32``) and the per-operator ``fp32_precision`` values
    (``cudnn.conv``, ``cudnn.rnn``, ``cuda.matmul``). Per library: where the legacy flag reads,
    it is set to False (which sets the per-operator values consistently), and an operator that a
    parent setting (``torch.backends.cudnn.fp32_precision`` / ``torch.backends.fp32_precision``)
    would still make TF32 is set to "ieee"; where it does not read (the caller mixed the two
    APIs), only the per-operator values are set to "ieee". On exit the legacy flag (where it was
    set) and then the per-operator values are put back as they were. Older PyTorch: the legacy
    flags only.
    """
    cudnn, mm = torch.backends.cudnn, torch.backends.cuda.matmul
    if not _new_api():  # pragma: no cover - PyTorch < 2.9
        saved_legacy = (cudnn.allow_tf32, mm.allow_tf32)
        try:
            cudnn.allow_tf32 = False
            mm.allow_tf32 = False
            yield
        finally:
            cudnn.allow_tf32, mm.allow_tf32 = saved_legacy
        return
    # (legacy object, its per-operator knobs) per library
    libs = [(cudnn, [cudnn.conv, cudnn.rnn]), (mm, [mm])]
    saved = [(_legacy(lib), [k.fp32_precision for k in knobs]) for lib, knobs in libs]
    try:
        for (lib, knobs), (legacy, _) in zip(libs, saved):
            if legacy is not None:
                lib.allow_tf32 = False
            for k in knobs:
                if _effective(k.fp32_precision) != "ieee":
                    k.fp32_precision = "ieee"
        yield
    finally:
        for (lib, knobs), (legacy, values) in zip(libs, saved):
            if legacy is not None:
                lib.allow_tf32 = legacy
            for k, v in zip(knobs, values):
                k.fp32_precision = v


def product_precision(precision: str) -> contextlib.AbstractContextManager:
    """The context of one product: :func:`ieee_float32` for "ieee", nothing for "tf32"."""
    return ieee_float32() if precision == "ieee" else contextlib.nullcontext()


def onednn_applicable(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``matmul="onednn"`` can apply: float32 on the CPU with oneDNN built in."""
    return (dtype == torch.float32 and device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(getattr(torch.backends.mkldnn, "matmul", None), "fp32_precision"))


@contextlib.contextmanager
def onednn_matmul() -> Iterator[None]:
    """Route float32 CPU matmuls through oneDNN (its bf16 math mode allowed) inside the block;
    the previous setting is restored on exit (also on an exception). Exact only on CPUs whose
    oneDNN keeps float32 (no AMX): see :mod:`resgeom_fast.operators.hessian`."""
    mm = torch.backends.mkldnn.matmul
    saved = mm.fp32_precision
    mm.fp32_precision = "bf16"
    try:
        yield
    finally:
        mm.fp32_precision = saved


def resolve_matmul(fn: str, matmul: str, dtype: torch.dtype, device: torch.device) -> list[str]:
    """The matmul libraries ``matmul`` asks for: ``["default"]``, ``["onednn"]``, or both for
    ``"auto"`` where oneDNN applies (measured by the auto-tuner)."""
    check_choice(None, f"{fn}: matmul", matmul, MATMUL_BACKENDS)
    ok = onednn_applicable(dtype, device)
    if matmul == "onednn" and not ok:
        raise ArgumentValueError(
            f"{fn}: matmul='onednn' needs float32 parameters on the CPU and a PyTorch built with "
            f"oneDNN, got {dtype} on {device} (use matmul='auto' or 'default')")
    if matmul == "auto":
        return ["default", "onednn"] if ok else ["default"]
    return [matmul]
