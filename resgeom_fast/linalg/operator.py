"""The LinearOperator protocol that every matrix-free algorithm of resgeom_fast consumes.

An operator represents ``b`` independent matrices of shape ``(m, n)`` (``batch_shape`` gives
``b``'s layout; ``()`` for a single matrix). It applies to blocks of vectors:

    matmat(X: [*batch_shape, n, k]) -> [*batch_shape, m, k]

and, where it is not symmetric, its transpose through ``op.T.matmat``. Dense tensors and
callables are wrapped by :func:`aslinearoperator`.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

# NonFiniteError and describe_non_finite live on the bottom floor (core.checks); re-exported here.
from resgeom_fast.core.checks import NonFiniteError, describe_non_finite  # noqa: F401
from resgeom_fast.core.heap import call_kept

MatmatFn = Callable[[Tensor], Tensor]


class LinearOperator:
    """Base class: ``b`` matrices of shape ``shape = (m, n)`` applied to blocks of vectors.

    Subclasses implement :meth:`_matmat` (and :meth:`_rmatmat` unless ``symmetric``).

    Attributes:
        shape: ``(m, n)`` of each matrix.
        batch_shape: leading dimensions of the independent problems (``()`` for one matrix).
        dtype, device: of the vectors the operator consumes and returns.
        symmetric: ``A == A^T`` (then ``.T`` is the operator itself).
    """

    def __init__(
        self,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: Union[str, torch.device],
        batch_shape: Sequence[int] = (),
        symmetric: bool = False,
    ) -> None:
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 0:
            raise ValueError(f"LinearOperator: expected shape (m, n) of non-negative ints, got {shape}")
        if symmetric and shape[0] != shape[1]:
            raise ValueError(f"LinearOperator: a symmetric operator must be square, got shape {shape}")
        self.shape = shape
        self.batch_shape = tuple(int(s) for s in batch_shape)
        self.dtype = dtype
        self.device = torch.device(device)
        self.symmetric = bool(symmetric)

    # -- to implement -------------------------------------------------------------------------
    def _matmat(self, X: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self.symmetric:
            return self._matmat(U)
        raise NotImplementedError(
            f"{type(self).__name__} has no transpose: give it an rmatmat (J^T U) to use .T"
        )

    # -- public -------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Number of independent matrices, the product of ``batch_shape``."""
        b = 1
        for s in self.batch_shape:
            b *= s
        return b

    @property
    def has_transpose(self) -> bool:
        return self.symmetric or type(self)._rmatmat is not LinearOperator._rmatmat

    def matmat(self, X: Tensor) -> Tensor:
        """Apply to a block: ``X [*batch_shape, n, k] -> [*batch_shape, m, k]``."""
        self._check_block(X, self.shape[1], "X")
        Y = call_kept(self._matmat, X)   # freed host blocks reused, not faulted in again (core/heap.py)
        expected = (*self.batch_shape, self.shape[0], X.shape[-1])
        if tuple(Y.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__}.matmat returned shape {tuple(Y.shape)}, expected {expected}"
            )
        return Y

    def rmatmat(self, U: Tensor) -> Tensor:
        """Apply the transpose: ``U [*batch_shape, m, k] -> [*batch_shape, n, k]``."""
        self._check_block(U, self.shape[0], "U")
        Y = call_kept(self._rmatmat, U)
        expected = (*self.batch_shape, self.shape[1], U.shape[-1])
        if tuple(Y.shape) != expected:
            raise RuntimeError(
                f"{type(self).__name__}.rmatmat returned shape {tuple(Y.shape)}, expected {expected}"
            )
        return Y

    def matvec(self, x: Tensor) -> Tensor:
        """Apply to one vector per problem: ``x [*batch_shape, n] -> [*batch_shape, m]``."""
        return self.matmat(x.unsqueeze(-1)).squeeze(-1)

    @property
    def T(self) -> "LinearOperator":
        if self.symmetric:
            return self
        if not self.has_transpose:
            raise NotImplementedError(
                f"{type(self).__name__} has no transpose: give it an rmatmat (J^T U) to use .T"
            )
        return _Transposed(self)

    def to_dense(self) -> Tensor:
        """Materialise ``[*batch_shape, m, n]`` by applying to the identity (small problems only)."""
        n = self.shape[1]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        eye = eye.expand(*self.batch_shape, n, n).contiguous()
        return self.matmat(eye)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shape={self.shape}, batch_shape={self.batch_shape}, "
            f"dtype={self.dtype}, device={self.device}, symmetric={self.symmetric})"
        )

    def _check_block(self, X: Tensor, rows: int, name: str) -> None:
        if not isinstance(X, Tensor):
            raise TypeError(f"{type(self).__name__}: expected {name} a torch.Tensor, got {type(X).__name__}")
        expected = (*self.batch_shape, rows)
        if X.dim() != len(expected) + 1 or tuple(X.shape[:-1]) != expected:
            raise ValueError(
                f"{type(self).__name__}: expected {name} of shape [*batch_shape, {rows}, k] = "
                f"{list(expected) + ['k']}, got {list(X.shape)}"
            )
        if X.dtype != self.dtype:
            raise ValueError(f"{type(self).__name__}: expected {name} of dtype {self.dtype}, got {X.dtype}")
        if X.device != self.device and not (
            X.device.type == self.device.type and self.device.index is None
        ):
            raise ValueError(f"{type(self).__name__}: expected {name} on {self.device}, got {X.device}")


class _Transposed(LinearOperator):
    def __init__(self, op: LinearOperator) -> None:
        super().__init__((op.shape[1], op.shape[0]), op.dtype, op.device, op.batch_shape, False)
        self._op = op

    def _matmat(self, X: Tensor) -> Tensor:
        return self._op._rmatmat(X)

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self._op._matmat(U)

    @property
    def T(self) -> LinearOperator:
        return self._op


class DenseOperator(LinearOperator):
    """A tensor ``A [*batch_shape, m, n]`` as an operator.

    ``symmetric=None`` detects symmetry (square and ``A == A^T`` up to 1e-12 relative).
    """

    def __init__(self, A: Tensor, symmetric: Optional[bool] = None) -> None:
        if not isinstance(A, Tensor) or A.dim() < 2:
            raise ValueError(
                f"DenseOperator: expected A a tensor of shape [*batch, m, n], got "
                f"{tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__}"
            )
        if not A.is_floating_point():
            raise ValueError(f"DenseOperator: expected a floating-point A, got {A.dtype}")
        if A.numel() and not bool(torch.isfinite(A.sum())) and not bool(torch.isfinite(A).all()):
            # name the NaN / inf (else the symmetry test below fails on it and blames symmetry)
            raise NonFiniteError(f"DenseOperator: the matrix A has {describe_non_finite(A)}; "
                                 "an operator built from it would produce non-finite values")
        if symmetric is None:
            symmetric = A.shape[-1] == A.shape[-2] and bool(
                (A - A.transpose(-1, -2)).abs().max() <= 1e-12 * A.abs().max().clamp_min(1e-300)
            ) if A.numel() else A.shape[-1] == A.shape[-2]
        super().__init__(A.shape[-2:], A.dtype, A.device, A.shape[:-2], symmetric)
        self.A = A

    def _matmat(self, X: Tensor) -> Tensor:
        return self.A @ X

    def _rmatmat(self, U: Tensor) -> Tensor:
        return self.A.transpose(-1, -2) @ U

    def to_dense(self) -> Tensor:
        return self.A


class CallableOperator(LinearOperator):
    """An operator given by functions ``matmat(X)`` and, optionally, ``rmatmat(U)``."""

    def __init__(
        self,
        matmat: MatmatFn,
        shape: Sequence[int],
        dtype: torch.dtype = torch.float32,
        device: Union[str, torch.device] = "cpu",
        batch_shape: Sequence[int] = (),
        symmetric: bool = False,
        rmatmat: Optional[MatmatFn] = None,
    ) -> None:
        if not callable(matmat):
            raise TypeError(f"CallableOperator: expected matmat callable, got {type(matmat).__name__}")
        if rmatmat is not None and not callable(rmatmat):
            raise TypeError(f"CallableOperator: expected rmatmat callable or None, got {type(rmatmat).__name__}")
        super().__init__(shape, dtype, device, batch_shape, symmetric)
        self._fn = matmat
        self._rfn = rmatmat

    def _matmat(self, X: Tensor) -> Tensor:
        return self._fn(X)

    def _rmatmat(self, U: Tensor) -> Tensor:
        if self._rfn is not None:
            return self._rfn(U)
        return super()._rmatmat(U)

    @property
    def has_transpose(self) -> bool:
        return self.symmetric or self._rfn is not None


def aslinearoperator(
    obj: Union[LinearOperator, Tensor, MatmatFn],
    shape: Optional[Sequence[int]] = None,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device, None] = None,
    batch_shape: Sequence[int] = (),
    symmetric: Optional[bool] = None,
    rmatmat: Optional[MatmatFn] = None,
    where: Optional[str] = None,
) -> LinearOperator:
    """Wrap a LinearOperator (returned as is), a dense tensor, or a callable ``matmat``.

    A callable needs ``shape`` (and takes ``dtype`` float32 and device cpu by default). A dense
    tensor with NaN or inf entries raises :class:`NonFiniteError` naming them (prefixed with
    ``where``, the calling function's name, when given).
    """
    if isinstance(obj, LinearOperator):
        return obj
    if isinstance(obj, Tensor):
        try:
            return DenseOperator(obj, symmetric=symmetric)
        except NonFiniteError as exc:
            if where is None:
                raise
            msg = str(exc).replace("DenseOperator: ", "", 1)
            raise NonFiniteError(f"{where}: the operator produced non-finite values before the first step: {msg}") from None
    if callable(obj):
        if shape is None:
            raise ValueError("aslinearoperator: expected shape=(m, n) with a callable operator")
        return CallableOperator(
            obj, shape, dtype or torch.float32, device or "cpu", batch_shape,
            bool(symmetric), rmatmat,
        )
    raise TypeError(
        f"aslinearoperator: expected a LinearOperator, a tensor or a callable, got {type(obj).__name__}"
    )
