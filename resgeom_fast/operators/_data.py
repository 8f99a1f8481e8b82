"""Shared plumbing of the operators: batches of data, parameter selection, module modes."""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Batch = tuple[Tensor, Any]
ParamSpec = Union[None, str, nn.Module, Tensor, Sequence[Union[str, nn.Module, Tensor]]]


def is_single_batch(data: Any) -> bool:
    """True for an ``(x, y)`` pair of tensors, False for an iterable of such pairs."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor)


def check_batch(fn: str, batch: Any, dtype: torch.dtype, device: torch.device,
                first_dtype: Optional[torch.dtype] = None) -> Batch:
    """Validate one ``(x, y)`` batch against the model's parameters; return it as a tuple."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise TypeError(f"{fn}: expected data batches (x, y), got {type(batch).__name__}"
                        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""))
    x, y = batch
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: expected x a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{fn}: expected x with a non-empty batch dimension, got shape {tuple(x.shape)}")
    if isinstance(y, Tensor):
        if y.dim() == 0 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"{fn}: expected x and y with the same batch size, got x {tuple(x.shape)} and "
                f"y {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ValueError(f"{fn}: expected y on the device of x ({x.device}), got {y.device}")
    if x.device != device:
        raise ValueError(
            f"{fn}: expected inputs on the model's device {device}, got x on {x.device}"
        )
    if x.is_floating_point() and x.dtype != dtype:
        raise ValueError(
            f"{fn}: expected x of dtype {dtype} (the dtype of the model's parameters), got {x.dtype}"
        )
    if first_dtype is not None and x.dtype != first_dtype:
        raise ValueError(f"{fn}: expected every batch of the dtype of the first ({first_dtype}), got {x.dtype}")
    return x, y


def select_params(fn: str, model: nn.Module, params: ParamSpec) -> tuple[list[str], list[Tensor]]:
    """Resolve ``params`` to (names, tensors) in ``model.named_parameters()`` order.

    ``params``: None (every trainable parameter), a parameter or module name, an ``nn.Module``
    (its trainable parameters), a parameter tensor, or a sequence of these.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model an nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{fn}: the model has no trainable parameters (none with requires_grad=True)")
    if params is None:
        chosen = {id(p) for _, p in named}
    else:
        items = [params] if isinstance(params, (str, nn.Module, Tensor)) else list(params)
        if not items:
            raise ValueError(f"{fn}: expected params None or a non-empty selection, got an empty sequence")
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
                    raise ValueError(f"{fn}: params: no parameter or module named {item!r} in the model")
            elif isinstance(item, nn.Module):
                tensors = list(item.parameters())
            elif isinstance(item, Tensor):
                tensors = [item]
            else:
                raise TypeError(f"{fn}: params: expected names, modules or parameters, got {type(item).__name__}")
            for t in tensors:
                if id(t) not in {id(p) for p in all_params.values()}:
                    raise ValueError(f"{fn}: params: a selected tensor is not a parameter of the model")
                if id(t) in trainable:
                    chosen.add(id(t))
        if not chosen:
            raise ValueError(f"{fn}: params: the selection holds no trainable parameters")
    names = [n for n, p in named if id(p) in chosen]
    tensors = [p for n, p in named if id(p) in chosen]
    dtypes = {p.dtype for p in tensors}
    devices = {p.device for p in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"{fn}: expected the selected parameters on one dtype and device, got {dtypes} and {devices}")
    return names, tensors


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


@contextlib.contextmanager
def module_mode(model: nn.Module, batchnorm: str = "eval") -> Iterator[None]:
    """Evaluate ``model`` in eval mode; with ``batchnorm="train"`` its BatchNorm layers use batch
    statistics without updating their running statistics. Every module's ``training`` flag and
    ``track_running_stats`` are restored on exit, and the buffers are never written.
    """
    if batchnorm not in ("eval", "train"):
        raise ValueError(f"batchnorm: expected 'eval' or 'train', got {batchnorm!r}")
    saved = [(m, m.training) for m in model.modules()]
    tracked = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        model.eval()
        if batchnorm == "train":
            for m, _ in tracked:
                m.training = True
                m.track_running_stats = False  # batch statistics, no running-stat update
        yield
    finally:
        for m, t in tracked:
            m.track_running_stats = t
        for m, t in saved:
            m.training = t


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


class Batches:
    """The data of a curvature operator: one ``(x, y)`` batch or an iterable of them.

    Validates every batch once (batch sizes, dtype and device against the parameters) and
    counts the samples; ``materialise=True`` keeps the batches in memory.
    """

    def __init__(self, fn: str, data: Any, dtype: torch.dtype, device: torch.device,
                 materialise: bool) -> None:
        self.single = is_single_batch(data)
        if not self.single and not isinstance(data, Iterable):
            raise TypeError(f"{fn}: expected data an (x, y) batch or an iterable of batches (a DataLoader), "
                            f"got {type(data).__name__}")
        self._data = data
        self._fn = fn
        self.sizes: list[int] = []
        kept: list[Batch] = []
        first: Optional[torch.dtype] = None
        for b in ([data] if self.single else data):
            x, y = check_batch(fn, b, dtype, device, first)
            first = x.dtype
            self.sizes.append(int(x.shape[0]))
            if materialise:
                kept.append((x, y))
        if not self.sizes:
            raise ValueError(f"{fn}: data yielded no batches")
        self.total = sum(self.sizes)
        self.kept: Optional[list[Batch]] = kept if materialise else None
        self.dtype, self.device = dtype, device

    def __iter__(self) -> Iterator[tuple[float, Tensor, Any]]:
        """Yield ``(weight = batch size / total, x, y)``."""
        if self.kept is not None:
            for x, y in self.kept:
                yield x.shape[0] / self.total, x, y
            return
        seen = 0
        for b in ([self._data] if self.single else self._data):
            x, y = check_batch(self._fn, b, self.dtype, self.device)
            seen += int(x.shape[0])
            yield x.shape[0] / self.total, x, y
        if seen != self.total:
            raise RuntimeError(f"{self._fn}: the data yielded {seen} samples on this pass, {self.total} on the first")
