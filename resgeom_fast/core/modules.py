"""Hooks, module modes and the batch contract, shared by the operators, analyses and trainer.

- :func:`capture_outputs` / :func:`capture_inputs` -- context managers recording what given
  modules return / receive during forward passes; the hooks are removed on exit, also on an
  exception. ``stop=True`` ends the forward pass as soon as every module has been seen.
  :func:`capture_points` mixes both: each watched point is ``(module, "input" | "output")``
  (the capture points of a residual sublayer, :class:`resgeom_fast.core.blocks.BlockInfo`).
- :func:`attention_math` -- a context manager selecting the math kernel of scaled-dot-product
  attention and turning MHA's native fast path off (both restored on exit), so that double
  backward and forward-mode AD work through attention.
- :func:`module_mode` -- a context manager putting a model in train / eval mode (optionally
  BatchNorm with batch statistics and no running-statistics update) and restoring every
  submodule's ``training`` flag (and BatchNorm's ``track_running_stats``) on exit.
- :func:`as_batches` -- the one ``data`` contract: an ``(x, y)`` batch, a list (or any iterable)
  of batches such as a DataLoader, a map-style ``torch.utils.data.Dataset`` of ``(x, y)``
  samples (read in order, in batches of ``batch_size``, default :data:`DEFAULT_BATCH_SIZE`), or a
  resgeom_fast ``Dataset`` (its ``split``); yields validated ``(x, y)`` batches.
  :func:`data_source` is its first half: the data in a form that can be read again.

This module imports only torch and the standard library (the bottom floor of the package).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.data import Dataset as TorchDataset

from resgeom_fast.core.checks import (
    ArgumentTypeError,
    ArgumentValueError,
    check_bool,
    check_choice,
    check_int,
    check_module,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "POINTS", "Capture", "StopForward", "as_batches", "attention_math", "capture_inputs",
    "capture_outputs", "capture_points", "data_source", "is_batch", "is_map_dataset", "module_mode",
]

POINTS = ("input", "output")
"""Where a capture point reads its module: the first positional input (forward pre-hook) or the output."""

DEFAULT_BATCH_SIZE = 128
"""Samples per batch when a map-style torch Dataset is read without a ``batch_size``."""

Batch = tuple[Tensor, Any]


# ------------------------------------------------------------------------------ hooks
class StopForward(Exception):
    """Raised by a capture hook with ``stop=True`` once every module has been seen; the capture
    context manager swallows it (the rest of the ``with`` body is skipped)."""


class Capture:
    """What a :func:`capture_outputs` / :func:`capture_inputs` / :func:`capture_points` block recorded.

    Attributes:
        modules: the watched modules, in the order given.
        points: per watched entry, ``(module, "input" | "output")``.
        values: per entry, the value of its module's first call (None until it is called): the
            output, or for inputs the first positional argument; tensors are detached (and cloned
            with ``clone=True``).
        calls: per entry, how many times its module was called.
    """

    def __init__(self, points: Sequence[tuple[nn.Module, str]], clone: bool, stop: bool,
                 on_call: Optional[Callable[[int, Any], None]]) -> None:
        self.points = list(points)
        self.modules = [m for m, _ in self.points]
        self.values: list[Any] = [None] * len(self.points)
        self.calls: list[int] = [0] * len(self.points)
        self._slots: dict[tuple[int, str], list[int]] = {}   # (id(module), where) -> positions in ``points``
        for i, (m, where) in enumerate(self.points):
            self._slots.setdefault((id(m), where), []).append(i)
        self._clone, self._stop, self._on_call = clone, stop, on_call

    @property
    def complete(self) -> bool:
        """Whether every watched module has been called at least once."""
        return all(c > 0 for c in self.calls)

    def missing(self) -> list[int]:
        """Indices (into ``modules``) of the modules not called yet."""
        return [i for i, c in enumerate(self.calls) if c == 0]

    def reset(self) -> None:
        """Forget the recorded values and call counts (e.g. between batches)."""
        self.values = [None] * len(self.points)
        self.calls = [0] * len(self.points)

    def _record(self, module: nn.Module, value: Any, where: str = "output") -> None:
        slots = self._slots.get((id(module), where))
        if slots is None:
            return
        first = self.calls[slots[0]] == 0
        if self._on_call is not None:
            self._on_call(slots[0], value)
        if first and isinstance(value, Tensor):
            value = value.detach()
            if self._clone:
                value = value.clone()
        for i in slots:
            self.calls[i] += 1
            if first:
                self.values[i] = value
        if self._stop and self.complete:
            raise StopForward


def _modules_arg(fn: str, modules: Union[nn.Module, Sequence[nn.Module]]) -> list[nn.Module]:
    items = [modules] if isinstance(modules, nn.Module) else list(modules)
    for i, m in enumerate(items):
        check_module(fn, f"modules[{i}]", m)
    return items


def _points_arg(fn: str, points: Sequence[Any]) -> list[tuple[nn.Module, str]]:
    if isinstance(points, tuple) and len(points) == 2 and isinstance(points[0], nn.Module):
        points = [points]
    out = []
    for i, p in enumerate(points):
        if not (isinstance(p, tuple) and len(p) == 2):
            raise ArgumentTypeError(f"{fn}: expected points[{i}] a (module, 'input' | 'output') tuple, got "
                                    f"{type(p).__name__}")
        check_module(fn, f"points[{i}][0]", p[0])
        check_choice(fn, f"points[{i}][1]", p[1], POINTS)
        out.append((p[0], p[1]))
    return out


@contextlib.contextmanager
def _capture(points: list[tuple[nn.Module, str]], clone: bool, stop: bool,
             on_call: Optional[Callable[[int, Any], None]]) -> Iterator[Capture]:
    cap = Capture(points, clone, stop, on_call)
    seen: set[tuple[int, str]] = set()
    handles = []
    try:
        for m, where in points:
            if (id(m), where) in seen:
                continue
            seen.add((id(m), where))
            if where == "input":
                handles.append(m.register_forward_pre_hook(
                    lambda mod, args: cap._record(mod, args[0] if args else None, "input")))
            else:
                handles.append(m.register_forward_hook(lambda mod, args, out: cap._record(mod, out, "output")))
        try:
            yield cap
        except StopForward:
            pass
    finally:
        for h in handles:
            h.remove()


def capture_outputs(modules: Union[nn.Module, Sequence[nn.Module]], *, clone: bool = True, stop: bool = False,
                    on_call: Optional[Callable[[int, Any], None]] = None) -> contextlib.AbstractContextManager[Capture]:
    """Record the outputs of ``modules`` during the forward passes run inside the block.

    Usage::

        with capture_outputs(blocks, stop=True) as cap:
            model(x)                    # stops once every block has returned
        hs = cap.values                 # [output of blocks[0], ...] (first call of each)

    Args:
        modules: one module or a sequence (a module listed twice is hooked once).
        clone: clone recorded tensors (else only detach them).
        stop: end the forward pass (by an exception the block swallows) as soon as every module
            has been called; statements after it in the ``with`` body are then skipped.
        on_call: ``on_call(i, output)`` for every call of ``modules[i]`` (the output undetached),
            e.g. to accumulate statistics over many batches.

    Returns:
        a context manager yielding a :class:`Capture`. The hooks are removed on exit, also when
        the body raises.
    """
    return _capture([(m, "output") for m in _modules_arg("capture_outputs", modules)], clone, stop, on_call)


def capture_inputs(modules: Union[nn.Module, Sequence[nn.Module]], *, clone: bool = True, stop: bool = False,
                   on_call: Optional[Callable[[int, Any], None]] = None) -> contextlib.AbstractContextManager[Capture]:
    """Record the first positional input of ``modules`` (a residual block's input h_{l-1})
    during the forward passes run inside the block; as :func:`capture_outputs` otherwise
    (``Capture.values[i]`` is None when the module was called without positional arguments)."""
    return _capture([(m, "input") for m in _modules_arg("capture_inputs", modules)], clone, stop, on_call)


def capture_points(points: Union[tuple[nn.Module, str], Sequence[tuple[nn.Module, str]]], *, clone: bool = True,
                   stop: bool = False, on_call: Optional[Callable[[int, Any], None]] = None
                   ) -> contextlib.AbstractContextManager[Capture]:
    """Record, per point ``(module, "input" | "output")``, the module's first positional input
    or its output during the forward passes run inside the block; as :func:`capture_outputs`
    otherwise (``Capture.values[i]`` belongs to ``points[i]``; a point listed twice is hooked
    once). A residual sublayer's ``BlockInfo.input_point`` / ``output_point`` are such points.

    Raises:
        ArgumentTypeError: a point that is not a ``(module, str)`` tuple.
        ArgumentValueError: a point whose second item is not "input" or "output".
    """
    return _capture(_points_arg("capture_points", points), clone, stop, on_call)


@contextlib.contextmanager
def attention_math() -> Iterator[None]:
    """Run the block with scaled-dot-product attention on its math kernel
    (``sdpa_kernel(SDPBackend.MATH)``) and ``nn.MultiheadAttention``'s native fast path off
    (``torch.backends.mha.set_fastpath_enabled(False)``); both restored on exit, also on an
    exception.

    The fused SDPA kernels (flash / memory-efficient / the CPU flash kernel) have no double
    backward and no forward-mode derivative, and MHA's fast path (eval mode without grad) has no
    forward-mode AD; the math kernel and MHA's slow path compute the same attention with plain
    differentiable operations (equal to the fused kernels to rounding). Both switches are
    process-wide while the block runs (other threads see them too).
    """
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


# ------------------------------------------------------------------------------ module modes
@contextlib.contextmanager
def module_mode(model: nn.Module, training: bool = False, *, batchnorm: Optional[str] = None) -> Iterator[nn.Module]:
    """Run the block with ``model`` in train (``training=True``) or eval mode, and restore every
    submodule's ``training`` flag on exit (also on an exception).

    Args:
        model: any module.
        training: the mode of every submodule inside the block.
        batchnorm: None (BatchNorm layers follow ``training``), ``"eval"`` (BatchNorm in eval
            mode: running statistics) or ``"train"`` (BatchNorm uses batch statistics *without*
            updating its running statistics: ``track_running_stats`` is turned off inside the
            block and restored after; the buffers are never written).

    Yields:
        ``model``.

    Raises:
        ArgumentTypeError: ``model`` not a module, ``training`` not a bool.
        ArgumentValueError: ``batchnorm`` not None, "eval" or "train"
            (``"batchnorm: expected 'eval' or 'train', got ..."``).
    """
    check_module("module_mode", "model", model)
    check_bool("module_mode", "training", training)
    if batchnorm is not None and batchnorm not in ("eval", "train"):
        raise ArgumentValueError(f"batchnorm: expected 'eval' or 'train', got {batchnorm!r}")
    saved = [(m, m.training) for m in model.modules()]
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    tracked = [(m, m.track_running_stats) for m in norms]
    try:
        model.train(training)
        if batchnorm == "eval":
            for m in norms:
                m.training = False
        elif batchnorm == "train":
            for m in norms:
                m.training = True
                m.track_running_stats = False  # batch statistics, no running-stat update
        yield model
    finally:
        for m, t in tracked:
            m.track_running_stats = t
        for m, t in saved:
            m.training = t


# ------------------------------------------------------------------------------ the data contract
def is_batch(data: Any) -> bool:
    """True for one ``(x, y)`` batch: a tuple / list of length 2 whose first item is a tensor."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def _is_package_dataset(data: Any) -> bool:
    # resgeom_fast.data.Dataset (a higher layer: recognised by its interface, never imported)
    return hasattr(data, "tensors") and hasattr(data, "x_train")


def is_map_dataset(data: Any) -> bool:
    """Whether ``data`` is a map-style torch Dataset with a length (read by index, not iterated)."""
    return (isinstance(data, TorchDataset) and not isinstance(data, IterableDataset)
            and hasattr(data, "__len__"))


def _chunks(x: Tensor, y: Any, batch_size: int) -> list[Batch]:
    return [(x[i:i + batch_size], y[i:i + batch_size] if isinstance(y, Tensor) else y)
            for i in range(0, x.shape[0], batch_size)]


def data_source(fn: str, data: Any, *, batch_size: Optional[int] = None,
                split: str = "train") -> Union[Batch, Iterable[Any]]:
    """``data`` in a form that yields the same batches on every reading (the first half of
    :func:`as_batches`, for callers that read the data several times).

    Args:
        fn: the calling function's name (for messages).
        data: one ``(x, y)`` batch; an iterable of batches (a DataLoader, a list of batches);
            a map-style ``torch.utils.data.Dataset`` of ``(x, y)`` samples; or a resgeom_fast
            ``Dataset`` (anything with ``tensors(split)`` and ``x_train``).
        batch_size: samples per batch for a Dataset (default: the whole split for a resgeom_fast
            Dataset, :data:`DEFAULT_BATCH_SIZE` for a torch Dataset) and for one ``(x, y)``
            batch (default: kept whole); ignored for iterables of batches.
        split: the split of a resgeom_fast Dataset ("train" or "test").

    Returns:
        one ``(x, y)`` tuple (a single batch), a list of ``(x, y)`` batches, a DataLoader reading
        a torch Dataset in order (``shuffle=False``), or ``data`` itself (an iterable of batches,
        unchanged: a one-shot iterator stays one).

    Raises:
        ArgumentTypeError: ``data`` is none of these, or ``batch_size`` is not an int.
        ArgumentValueError: ``batch_size`` < 1.
    """
    if batch_size is not None:
        batch_size = check_int(fn, "batch_size", batch_size, minimum=1)
    if _is_package_dataset(data):
        check_choice(fn, "split", split, ("train", "test"))
        x, y = data.tensors(split)
        return (x, y) if batch_size is None else _chunks(x, y, batch_size)
    if is_batch(data):
        x, y = data
        return tuple(data) if batch_size is None else _chunks(x, y, batch_size)
    if is_map_dataset(data):
        return DataLoader(data, batch_size=batch_size or DEFAULT_BATCH_SIZE, shuffle=False)
    if isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        return data
    raise ArgumentTypeError(f"{fn}: expected data an (x, y) batch or an iterable of (x, y) batches (a DataLoader, "
                            f"a list of batches), or a Dataset, got {type(data).__name__}")


def as_batches(fn: str, data: Any, *, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
               batch_size: Optional[int] = None, split: str = "train") -> Iterator[Batch]:
    """Iterate the ``(x, y)`` batches of ``data`` (every form of :func:`data_source`), validated.

    A batch is a tuple / list ``(x, y, ...)`` with ``x`` a tensor [n, ...]; items after ``y`` are
    dropped. When given, ``device`` must be ``x``'s device and ``dtype`` the dtype of a
    floating-point ``x`` (no silent casts or moves); a tensor ``y`` must have ``n`` rows.

    Args:
        fn: the calling function's name (for messages). data, batch_size, split: see
            :func:`data_source`. device, dtype: what the batches must be on / of (None: any).

    Yields:
        ``(x, y)`` per batch, in order. The checks run as the batches are read (this is a
        generator): an error names the batch.

    Raises:
        ArgumentTypeError: ``data`` of no accepted form, or a batch that is not ``(x, y, ...)``.
        ArgumentValueError: a batch on another device / of another dtype, ``y`` with another
            number of rows, or data without any batch.
    """
    source = data_source(fn, data, batch_size=batch_size, split=split)
    it: Iterable[Any] = [source] if is_batch(source) else source
    n = 0
    for i, batch in enumerate(it):
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], Tensor)):
            raise ArgumentTypeError(f"{fn}: expected batch {i} of data to be (x, y, ...), got {type(batch).__name__}")
        x, y = batch[0], batch[1]
        if device is not None and x.device != torch.device(device):
            raise ArgumentValueError(f"{fn}: expected data on the model's device {device}, got x on {x.device}")
        if dtype is not None and x.is_floating_point() and x.dtype != dtype:
            raise ArgumentValueError(f"{fn}: expected x of dtype {dtype} (the model's), got {x.dtype}")
        if isinstance(y, Tensor) and y.shape[:1] != x.shape[:1]:
            raise ArgumentValueError(f"{fn}: expected y with {x.shape[0]} rows in batch {i}, got {tuple(y.shape)}")
        n += 1
        yield x, y
    if n == 0:
        raise ArgumentValueError(f"{fn}: expected data with at least one batch, got an empty iterable")
