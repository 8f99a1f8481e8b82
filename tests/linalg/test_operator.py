"""The LinearOperator protocol: wrapping, shapes, transposes, validation."""
from __future__ import annotations

import pytest
import torch

from resgeom_fast.linalg import CallableOperator, DenseOperator, LinearOperator, aslinearoperator


def test_dense_batched_matmat_and_transpose():
    A = torch.randn(3, 5, 4, dtype=torch.float64)
    op = aslinearoperator(A)
    assert isinstance(op, DenseOperator) and op.shape == (5, 4) and op.batch_shape == (3,)
    assert not op.symmetric
    X = torch.randn(3, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(X), A @ X)
    U = torch.randn(3, 5, 2, dtype=torch.float64)
    torch.testing.assert_close(op.T.matmat(U), A.transpose(1, 2) @ U)
    assert op.T.T is op
    torch.testing.assert_close(op.to_dense(), A)


def test_symmetry_detection_and_callable():
    S = torch.randn(6, 6, dtype=torch.float64)
    S = S + S.T
    assert aslinearoperator(S).symmetric
    op = aslinearoperator(lambda X: S @ X, shape=(6, 6), dtype=torch.float64, symmetric=True)
    assert isinstance(op, CallableOperator) and op.T is op
    torch.testing.assert_close(op.to_dense(), S)
    x = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(x), S @ x)


def test_errors():
    op = aslinearoperator(torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected X of shape \\[\\*batch_shape, 3, k\\]"):
        op.matmat(torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected X of dtype torch.float64"):
        op.matmat(torch.randn(3, 2))
    with pytest.raises(TypeError, match="expected X a torch.Tensor"):
        op.matmat([[1.0]])
    with pytest.raises(ValueError, match="expected shape=\\(m, n\\) with a callable"):
        aslinearoperator(lambda X: X)
    with pytest.raises(TypeError, match="expected a LinearOperator, a tensor or a callable"):
        aslinearoperator(3)
    with pytest.raises(ValueError, match="a symmetric operator must be square"):
        LinearOperator((3, 4), torch.float32, "cpu", symmetric=True)
    nt = CallableOperator(lambda X: X[:2], shape=(2, 3), dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="has no transpose"):
        nt.T
    bad = CallableOperator(lambda X: X[:1], shape=(2, 3), dtype=torch.float64)
    with pytest.raises(RuntimeError, match="returned shape \\(1, 4\\), expected \\(2, 4\\)"):
        bad.matmat(torch.randn(3, 4, dtype=torch.float64))


def test_dense_operator_names_non_finite_entries():
    """Issue 12: a NaN made the symmetry test fail and the algorithms blame symmetry."""
    from resgeom_fast.linalg import NonFiniteError

    S = torch.randn(6, 6, dtype=torch.float64)
    S = S + S.T
    S[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"DenseOperator: the matrix A has 1 NaN and 0 inf values \(of 36\), "
                                             r"the first at index \(2, 1\)"):
        DenseOperator(S)
    with pytest.raises(NonFiniteError, match=r"myfunc: the operator produced non-finite values before the first step"):
        aslinearoperator(S, where="myfunc")
    with pytest.raises(NonFiniteError, match="DenseOperator: the matrix A has 0 NaN and 1 inf"):
        DenseOperator(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), symmetric=False)
