"""randomized_svd(..., stop=) (issue 16): in the adaptive mode the callable receives the
per-problem convergence flags of every check and alone decides when to stop (the max_iters cap
aside), which is what lets a sample-parallel caller make every rank iterate as one process on
all problems. Problems of a batch are independent (shared sketch, per-problem orthonormalisation):
a problem's result after q iterations is the same alone or in a batch."""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from resgeom_fast.linalg import randomized_svd

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _matrix(n: int, s: Tensor, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=F64)).Q
    return (U * s) @ V.T


def _problems(n: int = 80) -> Tensor:
    """[2, n, n] float64: a fast-decaying spectrum (converges in a few iterations at tol 1e-6) and a
    slowly decaying one (needs many more)."""
    fast = torch.cat([torch.tensor([10.0, 5.0, 2.5, 1.25]), torch.full((n - 4,), 1e-3)]).double()
    slow = torch.arange(1, n + 1, dtype=F64) ** -0.2
    return torch.stack([_matrix(n, fast, 1), _matrix(n, slow, 2)])


class _Recorder:
    """A stop that records every call's flags and answers ``rule(flags, call number)``."""

    def __init__(self, rule) -> None:
        self.rule, self.flags = rule, []

    def __call__(self, conv: Tensor) -> bool:
        self.flags.append(conv.clone())
        return bool(self.rule(conv, len(self.flags)))


def _same(a, b, tol: float = 1e-10) -> None:
    for f in ("S", "residuals", "error_bound"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=tol, atol=tol)
    # singular vectors up to sign
    for f in ("U", "V"):
        x, y = getattr(a, f), getattr(b, f)
        sign = torch.sign((x * y).sum(-2, keepdim=True))
        torch.testing.assert_close(x * sign, y, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", ["subspace", "block_krylov"])
def test_stop_gets_per_problem_flags_and_default_rule_is_unchanged(method):
    A = _problems()
    ref = randomized_svd(A, 4, oversample=4, power_iters="auto", method=method, tol=1e-6, seed=0)
    rec = _Recorder(lambda conv, _: conv.all())
    got = randomized_svd(A, 4, oversample=4, power_iters="auto", method=method, tol=1e-6, seed=0, stop=rec)
    assert ref.all_converged and ref.iterations >= 2
    _same(got, ref, 0.0)
    assert got.iterations == ref.iterations and got.matvecs == ref.matvecs
    assert len(rec.flags) == got.iterations + 1             # one call per check, the first sketch included
    assert all(f.dtype == torch.bool and f.shape == (2,) for f in rec.flags)
    assert rec.flags[-1].tolist() == got.converged.tolist() == [True, True]
    # the fast problem converges first: some check has it converged and the slow one not
    assert [True, False] in [f.tolist() for f in rec.flags]
    assert not bool(rec.flags[0].all())


@pytest.mark.parametrize("method", ["subspace", "block_krylov"])
def test_stop_controls_the_iteration_count(method):
    A = _problems()
    for calls in (1, 2, 4):
        rec = _Recorder(lambda conv, c, calls=calls: c >= calls)
        with pytest.warns(RuntimeWarning, match=f"stopped after {calls - 1} iterations"):   # the slow one is not there
            r = randomized_svd(A, 4, oversample=4, power_iters="auto", method=method, tol=1e-6, seed=0, stop=rec)
        assert r.iterations == calls - 1 and len(rec.flags) == calls
    # stop never: the max_iters cap, called at the last check too, and the unconverged warning
    rec = _Recorder(lambda conv, c: False)
    with pytest.warns(RuntimeWarning, match="power_iters='auto' stopped after 3 iterations"):
        r = randomized_svd(A[1], 4, oversample=4, power_iters="auto", method=method, tol=1e-12, seed=0,
                           max_iters=3, stop=rec)
    assert r.iterations == 3 and len(rec.flags) == 4 and rec.flags[0].shape == ()
    # stop on the fast problem alone: the slow one is reported unconverged (the flags are per problem)
    rec = _Recorder(lambda conv, c: conv[0])
    with pytest.warns(RuntimeWarning, match="1 of 2 problems above tol"):
        r = randomized_svd(A, 4, oversample=4, power_iters="auto", method=method, tol=1e-6, seed=0, stop=rec)
    assert r.converged.tolist() == [True, False] and r.iterations == len(rec.flags) - 1
    assert [f[0].item() for f in rec.flags] == [False] * r.iterations + [True]


def test_a_problem_iterated_in_a_batch_equals_it_alone():
    """What the sample-local alignment relies on: with the iteration count fixed by ``stop`` (here:
    that of the whole batch), each problem's triplets equal those of the problem run alone."""
    A = _problems()
    whole = randomized_svd(A, 4, oversample=4, power_iters="auto", tol=1e-6, seed=3)
    assert whole.iterations >= 3
    for i in range(2):
        rec = _Recorder(lambda conv, c: c > whole.iterations)
        part = randomized_svd(A[i:i + 1], 4, oversample=4, power_iters="auto", tol=1e-6, seed=3, stop=rec)
        assert part.iterations == whole.iterations
        for f in ("S", "U", "V", "residuals", "error_bound", "rel_error_bound", "converged"):
            torch.testing.assert_close(getattr(part, f)[0], getattr(whole, f)[i], rtol=1e-10, atol=1e-12)


def test_stop_is_not_called_with_fixed_iterations_and_must_be_callable():
    A = _problems()
    rec = _Recorder(lambda conv, c: True)
    for method in ("subspace", "block_krylov"):
        r = randomized_svd(A, 4, oversample=4, power_iters=2, method=method, stop=rec)
        assert r.iterations == 2
    assert rec.flags == []
    with pytest.raises(TypeError, match=r"randomized_svd: expected stop a callable .* got bool"):
        randomized_svd(A, 4, power_iters="auto", stop=True)
