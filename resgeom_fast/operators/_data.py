"""Shared plumbing of the operators: batches of data, parameter selection, module modes, and
:func:`fixed_sample`, which freezes the samples of a DataLoader for the curvature operators."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from resgeom_fast.core.checks import ArgumentTypeError, ArgumentValueError, check_int, type_error
from resgeom_fast.core.modules import data_source, is_batch
from resgeom_fast.core.modules import module_mode as core_module_mode
from resgeom_fast.core.distributed import fixed_probe

Batch = tuple[Tensor, Any]
ParamSpec = Union[None, str, nn.Module, Tensor, Sequence[Union[str, nn.Module, Tensor]]]

__all__ = ["NonRepeatableDataError", "fixed_sample"]


class NonRepeatableDataError(ValueError):
    """The data of a curvature operator yielded different samples on a later pass than on the
    first (a shuffled ``drop_last`` DataLoader, random augmentation, a one-shot iterator): every
    product would be taken on other samples, so the operator would be neither symmetric nor
    deterministic. The message names the cause and the fix (:func:`fixed_sample`)."""


_FIX = ("pass resgeom_fast.operators.fixed_sample(data) (the batches drawn once and kept), or a "
        "DataLoader with shuffle=False and no random transforms")


# True for an ``(x, y)`` pair (x a tensor), False for an iterable of such pairs (core.modules.is_batch)
is_single_batch = is_batch


def check_batch(fn: str, batch: Any, dtype: torch.dtype, device: torch.device,
                first_dtype: Optional[torch.dtype] = None) -> Batch:
    """Validate one ``(x, y)`` batch against the model's parameters; return it as a tuple."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ArgumentTypeError(f"{fn}: expected data batches (x, y), got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    if not isinstance(x, Tensor):
        raise ArgumentTypeError(f"{fn}: expected x a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ArgumentValueError(f"{fn}: expected x with a non-empty batch dimension, got shape {tuple(x.shape)}")
    if isinstance(y, Tensor):
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ArgumentValueError(
                f"{fn}: expected x and y with the same batch size, got x {tuple(x.shape)} and "
                f"y {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ArgumentValueError(f"{fn}: expected y on the device of x ({x.device}), got {y.device}")
    if x.device != device:
        raise ArgumentValueError(
            f"{fn}: expected inputs on the model's device {device}, got x on {x.device}"
        )
    if x.is_floating_point() and x.dtype != dtype:
        raise ArgumentValueError(
            f"{fn}: expected x of dtype {dtype} (the dtype of the model's parameters), got {x.dtype}"
        )
    if first_dtype is not None and x.dtype != first_dtype:
        raise ArgumentValueError(f"{fn}: expected every batch of the dtype of the first ({first_dtype}), got {x.dtype}")
    return x, y


def select_params(fn: str, model: nn.Module, params: ParamSpec) -> tuple[list[str], list[Tensor]]:
    """Resolve ``params`` to (names, tensors) in ``model.named_parameters()`` order.

    ``params``: None (every trainable parameter), a parameter or module name, an ``nn.Module``
    (its trainable parameters), a parameter tensor, or a sequence of these.
    """
    if not isinstance(model, nn.Module):
        raise type_error(fn, "model", "an nn.Module", model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ArgumentValueError(f"{fn}: the model has no trainable parameters (none with requires_grad=True)")
    if params is None:
        chosen = {id(p) for _, p in named}
    else:
        items = [params] if isinstance(params, (str, nn.Module, Tensor)) else list(params)
        if not items:
            raise ArgumentValueError(f"{fn}: expected params None or a non-empty selection, got an empty sequence")
        all_params = dict(model.named_parameters())
        modules = dict(model.named_modules())
        trainable = {id(p) for _, p in named}
        chosen = set()
        for item in items:
            if isinstance(item, str):
                if item in all_params:
                    tensors = [all_params[item]]
                elif item in modules:
                    tensors = list(modules[item].parameters())
                else:
                    raise ArgumentValueError(f"{fn}: params: no parameter or module named {item!r} in the model")
            elif isinstance(item, nn.Module):
                tensors = list(item.parameters())
            elif isinstance(item, Tensor):
                tensors = [item]
            else:
                raise ArgumentTypeError(f"{fn}: params: expected names, modules or parameters, got {type(item).__name__}")
            for t in tensors:
                if id(t) not in {id(p) for p in all_params.values()}:
                    raise ArgumentValueError(f"{fn}: params: a selected tensor is not a parameter of the model")
                if id(t) in trainable:
                    chosen.add(id(t))
        if not chosen:
            raise ArgumentValueError(f"{fn}: params: the selection holds no trainable parameters")
    names = [n for n, p in named if id(p) in chosen]
    tensors = [p for n, p in named if id(p) in chosen]
    dtypes = {p.dtype for p in tensors}
    devices = {p.device for p in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ArgumentValueError(f"{fn}: expected the selected parameters on one dtype and device, got {dtypes} and {devices}")
    return names, tensors


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def module_mode(model: nn.Module, batchnorm: str = "eval") -> contextlib.AbstractContextManager[nn.Module]:
    """Evaluate ``model`` in eval mode; with ``batchnorm="train"`` its BatchNorm layers use batch
    statistics without updating their running statistics. Every module's ``training`` flag and
    ``track_running_stats`` are restored on exit, and the buffers are never written.

    The operators' spelling of :func:`resgeom_fast.core.modules.module_mode`
    (``module_mode(model, False, batchnorm=batchnorm)``), which does the work.
    """
    if batchnorm not in ("eval", "train"):
        raise ArgumentValueError(f"batchnorm: expected 'eval' or 'train', got {batchnorm!r}")
    return core_module_mode(model, False, batchnorm=batchnorm)


@contextlib.contextmanager
def no_inplace(module: nn.Module) -> Iterator[None]:
    """Temporarily turn off ``inplace`` of activations (torch.func transforms dislike it)."""
    saved = [(m, m.inplace) for m in module.modules() if isinstance(getattr(m, "inplace", None), bool)]
    try:
        for m, _ in saved:
            m.inplace = False
        yield
    finally:
        for m, t in saved:
            m.inplace = t


# Relative tolerance of the sample fingerprints: passes over the same samples give the same
# float64 sums up to summation order (~1e-16 relative per term); other samples differ at O(1).
_PRINT_TOL = 1e-9
_probe = fixed_probe   # a fixed float64 vector of length d, the same in every process (core.distributed)


def sample_fingerprints(x: Tensor, y: Any) -> Tensor:
    """Per-sample fingerprints ``p_i = <x_i, w> + <y_i, u>`` (float64 [n]; w, u fixed random
    vectors): equal samples give equal numbers, other samples (another draw, a flip, noise)
    differ. Non-tensor labels do not enter."""
    n = x.shape[0]
    p = _project(x.reshape(n, -1), 0)
    if isinstance(y, Tensor):
        p = p + _project(y.reshape(n, -1).to(x.device), 1)
    return p


_PRINT_CHUNK = 1 << 22      # float64 elements converted at a time (32 MiB)


def _project(t: Tensor, salt: int) -> Tensor:
    """``t [n, D] @ w`` in float64, a few rows at a time (bounded memory)."""
    if t.is_complex():
        t = torch.view_as_real(t).reshape(t.shape[0], -1)
    w = _probe(t.shape[1], t.device, salt)
    rows = max(1, _PRINT_CHUNK // max(1, t.shape[1]))
    return torch.cat([t[i:i + rows].to(torch.float64) @ w for i in range(0, t.shape[0], rows)])


def _summary(p: Tensor) -> Tensor:
    """[n, sum p, sum p^2, sum |p|] of per-sample fingerprints: independent of sample order."""
    return torch.stack([p.new_tensor(float(p.shape[0])), p.sum(), p.square().sum(), p.abs().sum()])


def _same(a: Tensor, b: Tensor) -> bool:
    """Two summaries describe the same multiset of samples (up to summation order): sums of p
    within ``_PRINT_TOL`` of the sums of |p|, sums of p^2 within ``_PRINT_TOL`` relative."""
    if int(a[0]) != int(b[0]):
        return False
    d1, d2 = abs(float(a[1] - b[1])), abs(float(a[2] - b[2]))
    return (d1 <= _PRINT_TOL * float(a[3] + b[3]) + 1e-300
            and d2 <= _PRINT_TOL * float(a[2] + b[2]) + 1e-300)


class Batches:
    """The data of a curvature operator: one ``(x, y)`` batch or an iterable of them.

    Validates every batch once (batch sizes, dtype and device against the parameters) and
    counts the samples; ``materialise=True`` keeps the batches in memory.

    Data read on every pass (an iterable, not materialised) must yield the same samples each
    time. Each batch gets a cheap fingerprint (a float64 random projection of its inputs and
    labels, summed over its samples) on the first pass; the data are read a second time at
    construction and the fingerprints are compared on that and every later pass, raising
    :class:`NonRepeatableDataError` at the first difference. ``strict=False`` accepts the same
    samples grouped into other batches (a shuffled DataLoader without ``drop_last``: the mean
    loss, hence the curvature with BatchNorm in eval mode, does not depend on the grouping; the
    products then differ at round-off only); ``strict=True`` requires the same batches in the
    same order (BatchNorm with batch statistics, bitwise-deterministic products).

    Data-parallel operators (:mod:`resgeom_fast.operators.curvature`, ``distributed=``) hold one
    rank's share: ``allow_empty=True`` accepts a share without samples (it yields nothing), and
    :meth:`set_total` makes the weights ``batch size / total`` use the *global* sample count;
    ``local_total`` stays this rank's count (what the fingerprint checks compare).
    """

    def __init__(self, fn: str, data: Any, dtype: torch.dtype, device: torch.device,
                 materialise: bool, strict: bool = False, strict_why: str = "",
                 allow_empty: bool = False) -> None:
        # a Dataset becomes its batches (read in order); anything else not a batch or an iterable of
        # batches is refused: "expected data an (x, y) batch or an iterable of (x, y) batches ..."
        data = data_source(fn, data)
        self.single = is_batch(data)
        self._data = data
        self._fn = fn
        self.strict, self._strict_why = strict, strict_why
        self._check = not self.single and not materialise
        if self._check and isinstance(data, Iterator):
            raise ArgumentTypeError(f"{fn}: expected data that can be read again on every product (a DataLoader, a list "
                            f"of batches or one (x, y) batch), got a one-shot iterator {type(data).__name__}; "
                            f"pass list(data), resgeom_fast.operators.fixed_sample(data) or cache=True")
        self.sizes: list[int] = []
        kept: list[Batch] = []
        prints: list[Tensor] = []
        first: Optional[torch.dtype] = None
        self.first: Optional[Batch] = None
        for b in ([data] if self.single else data):
            if allow_empty and self.single and b[0].dim() > 0 and b[0].shape[0] == 0:
                break               # an empty share of one (x, y) batch
            x, y = check_batch(fn, b, dtype, device, first)
            first = x.dtype
            if self.first is None:
                self.first = (x, y)
            self.sizes.append(int(x.shape[0]))
            if materialise:
                kept.append((x, y))
            if self._check:
                prints.append(_summary(sample_fingerprints(x, y)))
        if not self.sizes and not allow_empty:
            raise ArgumentValueError(f"{fn}: data yielded no batches")
        self.local_total = sum(self.sizes)
        self.total = self.local_total      # the weights' denominator (global: set_total)
        self.kept: Optional[list[Batch]] = kept if materialise else None
        self.dtype, self.device = dtype, device
        self._prints = torch.stack(prints).cpu() if prints else None
        self._total_print = self._prints.sum(0) if prints else None
        self.passes = 1
        if self._check:      # a second reading now, so that a changing loader is refused before any work
            for _ in self:
                pass

    def set_total(self, total: int) -> None:
        """Weight the batches by ``batch size / total`` (``total``: the samples of every rank)."""
        if total < self.local_total:
            raise ArgumentValueError(f"{self._fn}: expected a global sample count >= this rank's "
                                     f"{self.local_total}, got {total}")
        self.total = total

    def _refuse(self, detail: str) -> None:
        raise NonRepeatableDataError(
            f"{self._fn}: expected data that yield the same samples on every pass, but pass {self.passes} "
            f"yielded {detail} (a DataLoader with shuffle=True and drop_last=True, or with random augmentation, "
            f"draws other samples on each pass: every product would be taken on other data, so the operator "
            f"would be neither symmetric nor deterministic); {_FIX}"
        )

    def __iter__(self) -> Iterator[tuple[float, Tensor, Any]]:
        """Yield ``(weight = batch size / total, x, y)``."""
        if self.kept is not None:
            for x, y in self.kept:
                yield x.shape[0] / self.total, x, y
            return
        if self.single:
            if not self.sizes:
                return
            x, y = check_batch(self._fn, self._data, self.dtype, self.device)
            yield x.shape[0] / self.total, x, y
            return
        if not self.sizes:          # an empty share: nothing to read or check
            return
        self.passes += 1
        prints: list[Tensor] = []
        seen = 0
        for b in self._data:
            x, y = check_batch(self._fn, b, self.dtype, self.device)
            seen += int(x.shape[0])
            pr = _summary(sample_fingerprints(x, y)).cpu()
            i = len(prints)
            prints.append(pr)
            if self.strict and (i >= len(self.sizes) or not _same(pr, self._prints[i])):
                if i >= len(self.sizes):
                    what = f"more batches than pass 1 ({len(self.sizes)})"
                else:
                    what = f"other samples in batch {i}"
                self._refuse(f"{what} ({self._strict_why} needs the same batches in the same order)")
            yield x.shape[0] / self.total, x, y
        total = torch.stack(prints).sum(0) if prints else None
        if seen != self.local_total:
            self._refuse(f"{seen} samples (pass 1: {self.local_total})")
        if total is None or not _same(total, self._total_print):
            self._refuse("other samples than pass 1")
        if self.strict and len(prints) != len(self.sizes):
            self._refuse(f"{len(prints)} batches (pass 1: {len(self.sizes)}; {self._strict_why} needs the "
                         f"same batches)")


def fixed_sample(data: Any, num_batches: Optional[int] = None, max_samples: Optional[int] = None, *,
                 batch_size: Optional[int] = None, device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None) -> list[Batch]:
    """The batches of ``data`` drawn once and kept: a fixed sample for the curvature operators.

    A training DataLoader (``shuffle=True`` with ``drop_last=True``, random augmentation) yields
    other samples on every pass, which :func:`resgeom_fast.operators.hessian` refuses; this draws
    one pass of it (shuffled and augmented as the loader does, once) and returns the batches as a
    list, which yields the same samples every time it is read.

    Args:
        data: a DataLoader or any iterable of ``(x, y)`` batches; a map-style
            ``torch.utils.data.Dataset`` of ``(x, y)`` samples (read in order, in batches of
            ``batch_size``, default 128); or one ``(x, y)`` batch (split into batches of
            ``batch_size`` when given).
        num_batches: keep at most this many batches (None: a whole pass).
        max_samples: keep at most this many samples in all (the last kept batch is cut).
        batch_size: see ``data``; ignored for iterables of batches.
        device, dtype: move the batches there / cast floating-point x and y to ``dtype``
            (integer labels keep theirs).

    Returns:
        a list of ``(x [n_b, ...], y)`` tuples, tensors detached copies (later changes to the
        loader's buffers do not reach them). Memory: the whole sample.
    """
    fn = "fixed_sample"
    for name, v in (("num_batches", num_batches), ("max_samples", max_samples), ("batch_size", batch_size)):
        if v is not None:
            check_int(fn, name, v, minimum=1, expected="a positive int or None")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentValueError(f"{fn}: expected dtype a floating-point torch.dtype or None, got {dtype!r}")
    source = data_source(fn, data, batch_size=batch_size)
    if is_batch(source):
        source = [source]

    def conv(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.detach()
        out = t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)
        return out.clone() if out.data_ptr() == t.data_ptr() else out

    out: list[Batch] = []
    n = 0
    for b in source:
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and isinstance(b[0], Tensor)):
            raise ArgumentTypeError(f"{fn}: expected batches (x, y) with x a tensor, got {type(b).__name__}")
        x, y = b
        if x.dim() == 0:
            raise ArgumentValueError(f"{fn}: expected x with a batch dimension, got a 0-d tensor")
        if max_samples is not None and n + x.shape[0] > max_samples:
            keep = max_samples - n
            x, y = x[:keep], (y[:keep] if isinstance(y, Tensor) else y)
        if x.shape[0] > 0:
            out.append((conv(x), conv(y)))
            n += int(x.shape[0])
        if (num_batches is not None and len(out) >= num_batches) or (max_samples is not None and n >= max_samples):
            break
    if not out:
        raise ArgumentValueError(f"{fn}: data yielded no samples")
    return out
