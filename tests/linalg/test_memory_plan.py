"""Memory plans of the Lanczos algorithms (resgeom_fast.linalg._memory): refusals with the numbers,
byte counts equal to the allocations, grouped SLQ equal to the ungrouped one, and eigsh's peak
memory within 1.5x of its float32 basis (no float64 copy of the basis for the Ritz vectors)."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from resgeom_fast import linalg
from resgeom_fast.analysis.spectrum import hessian_spectrum
from resgeom_fast.linalg import _memory
from resgeom_fast.linalg._memory import InsufficientMemoryError, plan_eigsh, plan_slq

# the modules themselves (resgeom_fast.linalg.eigsh is also the name of the function)
eigsh_mod = importlib.import_module("resgeom_fast.linalg.eigsh")
slq_mod = importlib.import_module("resgeom_fast.linalg.slq")


def _sym(n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1.0, 3.0, n, dtype=torch.float64)
    return ((Q * lam) @ Q.T).to(dtype)


class _Recorder:
    """Wraps the Lanczos class of a module: records the byte size of every basis it allocates."""

    def __init__(self, monkeypatch, module) -> None:
        self.bases: list[int] = []
        real = linalg.Lanczos
        rec = self

        self.storage: list[tuple[int, bool]] = []     # (the basis's storage address, handed in by the caller)

        class Recording(real):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                rec.bases.append(self.V.numel() * self.V.element_size())
                rec.storage.append((self.V.untyped_storage().data_ptr(), kw.get("basis") is not None))

        monkeypatch.setattr(module, "Lanczos", Recording)


# ------------------------------------------------------------------------------------- refusals
def test_eigsh_refuses_with_the_numbers():
    A = _sym(60)
    plan = plan_eigsh(60, 1, 60, 4, torch.float64, "cpu", memory_limit=10**9)
    with pytest.raises(InsufficientMemoryError) as exc:
        linalg.eigsh(A, k=4, memory_limit=4000)
    msg = str(exc.value)
    assert msg.startswith("eigsh: ")
    assert f"needs {plan.bytes_needed} bytes" in msg and "but 4000 bytes" in msg and "memory_limit" in msg
    assert "memory_limit >=" in msg
    # a limit that leaves room for a shorter basis names the steps that would fit, and they do fit
    limit = plan.bytes_needed - plan.basis_bytes + 20 * 60 * 8
    with pytest.raises(InsufficientMemoryError, match=r"max_steps <= (\d+)") as exc:
        linalg.eigsh(A, k=4, memory_limit=limit)
    fit = int(re.search(r"max_steps <= (\d+)", str(exc.value)).group(1))
    assert fit == 20
    r = linalg.eigsh(A, k=4, max_steps=fit, memory_limit=limit)
    assert r.memory.bytes_needed <= limit and r.memory.bytes_available == limit


def test_slq_refuses_with_the_numbers_and_options():
    A = _sym(50)
    # one probe at a time: its basis and working vectors, and the start vectors of all 4 probes
    one = _memory.lanczos_bytes(50, 1, 30, 8, "full")[1] + 4 * 50 * 8
    with pytest.raises(InsufficientMemoryError) as exc:
        linalg.slq_density(A, probes=4, steps=30, memory_limit=one - 1)
    msg = str(exc.value)
    assert msg.startswith("slq_density: ")
    assert f"needs {one} bytes" in msg and f"but {one - 1} bytes" in msg
    assert "steps <= 29" in msg and "reorth='local'" in msg and "params=" in msg


def test_bad_memory_limit_is_named():
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match=r"eigsh: expected memory_limit a positive int"):
            linalg.eigsh(_sym(10), k=2, memory_limit=bad)
        with pytest.raises(ValueError, match=r"slq_density: expected memory_limit a positive int"):
            linalg.slq_density(_sym(10), probes=2, steps=5, memory_limit=bad)


def test_hessian_spectrum_refuses_before_any_product(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    calls = []
    monkeypatch.setattr(linalg, "eigsh", lambda *a, **kw: calls.append(1))   # no Lanczos run starts
    with pytest.raises(InsufficientMemoryError, match=r"^hessian_spectrum: .* needs \d+ bytes .* but 1000 bytes"):
        hessian_spectrum(model, nn.functional.cross_entropy, (x, y), k=2, probes=2, steps=10,
                         trace_probes=4, memory_limit=1000)
    assert calls == []
    with pytest.raises(ValueError, match="hessian_spectrum: expected memory_limit a positive int"):
        hessian_spectrum(model, nn.functional.cross_entropy, (x, y), memory_limit=-1)


# --------------------------------------------------------------------------- bytes = allocations
def test_eigsh_plan_counts_the_basis_it_allocates(monkeypatch):
    rec = _Recorder(monkeypatch, eigsh_mod)
    for dtype, n, steps in ((torch.float64, 40, 25), (torch.float32, 70, 70)):
        r = linalg.eigsh(_sym(n, dtype=dtype), k=3, max_steps=steps)
        assert rec.bases[-1] == r.memory.basis_bytes == steps * n * (8 if dtype == torch.float64 else 4)
        assert r.memory.bytes_needed > r.memory.basis_bytes and r.memory.accuracy_note is None


def test_slq_groups_probes_to_fit_and_counts_each_basis(monkeypatch):
    n, probes, steps = 40, 5, 20
    A = _sym(n)
    # groups of 2 probes fit, of 3 do not (every plan counts all probes' start vectors)
    limit = _memory.lanczos_bytes(n, 2, steps, 8, "full")[1] + probes * n * 8
    assert _memory.lanczos_bytes(n, 3, steps, 8, "full")[1] + probes * n * 8 > limit
    rec = _Recorder(monkeypatch, slq_mod)
    grouped = linalg.slq_density(A, probes=probes, steps=steps, memory_limit=limit)
    plan = grouped.memory
    assert plan.group == 2 and plan.groups == 3 and plan.reorth == "full" and plan.accuracy_note is None
    assert plan.bytes_needed <= limit
    assert rec.bases == [plan.basis_bytes] * 2 + [steps * n * 8]   # two groups of 2, then 1
    # the groups run one after another in ONE allocation (not mapped and faulted in again per group)
    # (handed in by the caller: malloc may also hand a freed block back at the same address)
    assert len(rec.storage) == 3 and len(set(rec.storage)) == 1 and rec.storage[0][1]
    assert plan.basis_bytes == 2 * steps * n * 8
    # the probes are independent: the same quadrature as all probes at once (float64 rounding)
    full = linalg.slq_density(A, probes=probes, steps=steps)
    assert full.memory.groups == 1 and full.memory.group == probes
    torch.testing.assert_close(grouped.nodes, full.nodes, rtol=0, atol=1e-10)
    torch.testing.assert_close(grouped.weights, full.weights, rtol=0, atol=1e-10)
    torch.testing.assert_close(grouped.density, full.density, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grouped.moments, full.moments, rtol=1e-10, atol=1e-10)
    assert abs(float(grouped.moments[0]) - n) < 1e-9
    # steps >= 2: each probe's first moment is exactly v^T A v, so the mean is Hutchinson's tr(A)
    lam = torch.linalg.eigvalsh(A)
    assert abs(float(grouped.moments[1]) - float(lam.sum())) < 6 * float(lam.std()) * n / probes**0.5


def test_slq_auto_states_local_when_full_does_not_fit():
    n, probes, steps = 120, 3, 100
    A = _sym(n)
    one = plan_slq(n, 1, probes, steps, torch.float64, "cpu", "full", memory_limit=10**9)
    loc = plan_slq(n, 1, probes, steps, torch.float64, "cpu", "local", memory_limit=10**9)
    small = plan_slq(n, 1, 1, steps, torch.float64, "cpu", "full", memory_limit=10**9)
    limit = loc.bytes_needed + 8
    assert limit < small.bytes_needed + 2 * n * 8        # not even one probe's full basis fits
    r = linalg.slq_density(A, probes=probes, steps=steps, reorth="auto", memory_limit=limit)
    assert r.memory.reorth == "local" and "local" in r.memory.accuracy_note
    assert r.memory.basis_bytes == probes * 2 * n * 8
    ref = linalg.slq_density(A, probes=probes, steps=steps, reorth="local")
    torch.testing.assert_close(r.nodes, ref.nodes, rtol=0, atol=0)
    big = linalg.slq_density(A, probes=probes, steps=steps, reorth="auto", memory_limit=one.bytes_needed)
    assert big.memory.reorth == "full" and big.memory.groups == 1 and big.memory.accuracy_note is None


def test_hessian_spectrum_notes_the_probe_groups():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    P = sum(p.numel() for p in model.parameters())
    eig = plan_eigsh(P, 1, P, 2, torch.float64, "cpu", memory_limit=10**9)
    limit = max(eig.bytes_needed, _memory.lanczos_bytes(P, 2, 50, 8, "full")[1] + 4 * P * 8)
    assert plan_slq(P, 1, 4, 50, torch.float64, "cpu", "full", memory_limit=10**9).bytes_needed > limit
    with warnings.catch_warnings():   # unresolved fractions at 50 steps: not what this test is about
        warnings.simplefilter("ignore", UserWarning)
        r = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), k=2, probes=4, steps=50,
                             trace_probes=6, memory_limit=limit)
        ref = hessian_spectrum(model, nn.functional.cross_entropy, (x, y), k=2, probes=4, steps=50,
                               trace_probes=6)
    assert [n for n in r.notes if n.startswith("memory: SLQ ran with full reorthogonalisation, probes in 2 ")]
    assert ref.notes == []
    torch.testing.assert_close(r.nodes, ref.nodes, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------ Ritz chunks
def test_ritz_vectors_in_chunks_equal_the_whole_product(monkeypatch):
    g = torch.Generator().manual_seed(1)
    V = torch.randn(3, 12, 1000, generator=g, dtype=torch.float32)
    S = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    ref = torch.einsum("psn,psk->pnk", V[:, :9].double(), S).float()
    monkeypatch.setattr(eigsh_mod, "RITZ_CHUNK_BYTES", 3 * 9 * 8 * 37)      # chunks of 37 columns
    X = eigsh_mod._ritz_vectors(V, 9, S, torch.float32)
    torch.testing.assert_close(X, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ peak memory
_PEAK_SCRIPT = """
import gc, json, torch
torch.set_num_threads(1)
from resgeom_fast import linalg

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

n, steps = 2_000_000, 40
d = torch.linspace(-1.0, 2.0, n, dtype=torch.float32)
op = linalg.CallableOperator(lambda X: X * d[:, None], (n, n), dtype=torch.float32, symmetric=True)
small = linalg.CallableOperator(lambda X: X * d[:1000, None], (1000, 1000), dtype=torch.float32, symmetric=True)
linalg.eigsh(small, k=1, max_steps=steps, tol=1e-30)      # warm-up: one-time allocations of the path
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                                           # VmHWM := VmRSS
before = status("VmRSS")
r = linalg.eigsh(op, k=1, max_steps=steps, tol=1e-30)
print(json.dumps({"peak": status("VmHWM") - before, "basis": r.memory.basis_bytes,
                  "needed": r.memory.bytes_needed, "steps": r.steps, "top": float(r.eigenvalues[0])}))
"""


def test_eigsh_peak_memory_is_within_1_5x_of_the_float32_basis():
    """Peak resident memory of eigsh, measured by the kernel in a fresh process: writing "5" to
    /proc/self/clear_refs resets VmHWM (the resident high-water mark) to the current RSS, so VmHWM
    after the call minus VmRSS before it is the call's peak growth, whatever allocated it (torch's
    CPU allocator included; tracemalloc does not see it). ``MALLOC_MMAP_THRESHOLD_=65536`` makes
    glibc serve every block over 64 KiB by mmap and return it on free (without it the dynamic
    threshold keeps freed 8-16 MB blocks resident and the measure drifts by +-0.2 basis), and a
    small warm-up run excludes one-time allocations. D = 2e6, 40 steps, float32: the basis is
    320 MB; measured 1.28x with the chunked Ritz vectors, 3.1x with the former float64 copy."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs (VmHWM reset)")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip(f"/proc/self/clear_refs not writable here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    basis = 40 * 2_000_000 * 4
    assert m["steps"] == 40 and m["basis"] == basis
    assert m["peak"] <= 1.5 * basis, f"peak growth {m['peak'] / 1e6:.0f} MB for a {basis / 1e6:.0f} MB float32 basis"
    assert m["peak"] <= m["needed"] * 1.05, m          # the plan's count bounds the measured peak
    assert abs(m["top"] - 2.0) < 1e-2


_SLQ_PEAK_SCRIPT = _PEAK_SCRIPT.replace(
    "linalg.eigsh(small, k=1, max_steps=steps, tol=1e-30)", "linalg.slq_density(small, probes=PROBES, steps=steps)"
).replace("r = linalg.eigsh(op, k=1, max_steps=steps, tol=1e-30)", "r = linalg.slq_density(op, probes=PROBES, steps=steps)"
          ).replace("float(r.eigenvalues[0])", "float(r.nodes.max())")


@pytest.mark.parametrize("probes", [1, 3])
def test_slq_peak_memory_stays_within_the_plan(probes):
    """SLQ's measured peak (as for eigsh above) stays within its plan's count: a window of Lanczos
    steps runs in one heap scope (resgeom_fast/core/heap.py), where a small block kept between
    freed ones can make malloc's heap grow; the plan counts HEAP_SLACK_VECTORS for it. Measured
    (n = 2M, 40 steps, float32) before the scalars were updated in place and the reorthogonalisation's
    pool mapped its buffers directly: up to 5 working vectors over the per-product scope; on
    2026-12-04, some 60 runs: 5.6-14.2 vectors beyond the basis, varying with the process's addresses
    (a fresh clone's run of this test went 0.4% over the plan when it counted 4 vectors of slack)."""
    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs (VmHWM reset)")
    assert "PROBES" in _SLQ_PEAK_SCRIPT and "eigsh" not in _SLQ_PEAK_SCRIPT
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _SLQ_PEAK_SCRIPT.replace("PROBES", str(probes))], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip(f"/proc/self/clear_refs not writable here: {out.stderr[-300:]}")
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["steps"] == 40 and m["basis"] == probes * 40 * 2_000_000 * 4
    assert m["peak"] <= m["needed"] * 1.05, m
    assert abs(m["top"] - 2.0) < 1e-2


# ------------------------------------------------------------------------- no readable free memory
def test_cuda_free_memory_unreadable_plans_unchecked_and_says_so(monkeypatch):
    """A cuda device whose free memory cannot be read (no driver behind it, as under the simulated
    device of tests/device) plans with bytes_available None and names why, instead of failing."""
    def no_driver(device=None):
        raise RuntimeError("Found no NVIDIA driver on your system.")

    monkeypatch.setattr(torch.cuda, "mem_get_info", no_driver)
    avail, source = _memory.available_bytes("cuda")
    assert avail is None and "mem_get_info failed" in source and "no NVIDIA driver" in source
    p = plan_eigsh(10**6, 1, 50, 4, torch.float32, "cuda")
    assert p.bytes_available is None and p.bytes_needed > 0
    assert _memory.available_bytes("cuda", memory_limit=123) == (123, "memory_limit")


# ------------------------------------------------------------------------------ the trace (Hutch++)
def _recording(A: torch.Tensor) -> tuple[linalg.CallableOperator, list[int]]:
    """A symmetric operator applying ``A`` that records the width of every product."""
    widths: list[int] = []

    def mm(X: torch.Tensor) -> torch.Tensor:
        widths.append(int(X.shape[-1]))
        return A @ X

    return linalg.CallableOperator(mm, A.shape, A.dtype, symmetric=True), widths


def test_trace_refuses_with_the_numbers_before_any_product():
    n = 40
    op, widths = _recording(_sym(n))
    # Hutch++ 30: a sketch of 10 vectors (basis, products and 2 float64 copies: 12800 bytes), the
    # int8 signs of 10 sketch + 10 probe columns (800 bytes): nothing fits under 13000
    need = _memory.plan_trace(n, 1, 10, 10, 10, torch.float64, "cpu", 10**9, hutchinson=10)
    with pytest.raises(InsufficientMemoryError) as exc:
        linalg.trace(op, probes=30, memory_limit=13000)
    msg = str(exc.value)
    assert msg.startswith("trace: the Hutch++ sketch of 10 vectors")
    assert "needs 13600 bytes" in msg and "but 13000 bytes" in msg and "method='hutchinson'" in msg
    assert "probes <= " in msg and "memory_limit >= 13600" in msg
    assert widths == []                                   # planned before any product
    assert need.bytes_needed == (10 + 4 * 10) * n * 8 + 20 * n and need.groups == 1 and need.group == 10
    # Hutchinson: one column (and 3 temporaries) and the int8 signs of 10 probes: 1680 bytes
    with pytest.raises(InsufficientMemoryError, match=r"^trace: one Hutchinson column at a time .* needs 1680 bytes"):
        linalg.trace(op, probes=10, method="hutchinson", memory_limit=1000)
    assert widths == []
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(ValueError, match=r"trace: expected memory_limit a positive int"):
            linalg.trace(op, probes=6, memory_limit=bad)


def test_trace_runs_in_column_chunks_to_fit_with_the_same_estimate():
    n = 40
    A = _sym(n)
    op, widths = _recording(A)
    # 14000 bytes: the sketch fits, all 10 columns at once (16800) do not, 7 do -> 2 chunks of 5
    r = linalg.trace(op, probes=30, seed=3, memory_limit=14000)
    plan = r.memory
    assert (plan.group, plan.groups) == (5, 2) and "2 sequential chunks of <= 5" in plan.choice
    assert plan.bytes_needed <= 14000 and plan.bytes_available == 14000 and plan.basis_bytes == 10 * n * 8
    assert max(widths) == 5 and sum(widths) == 30          # every product within the plan's chunk
    whole_op, whole_widths = _recording(A)
    whole = linalg.trace(whole_op, probes=30, seed=3)
    assert whole.memory.groups == 1 and whole_widths == [10, 10, 10]
    # the columns are independent: the same estimate up to float64 rounding
    torch.testing.assert_close(r.estimate, whole.estimate, rtol=1e-12, atol=0)
    torch.testing.assert_close(r.stderr, whole.stderr, rtol=1e-10, atol=0)
    # and the estimator is right: within 4 standard errors of tr(A)
    assert abs(float(r.estimate) - float(torch.trace(A))) < 4 * float(r.total_error) + 1e-12
    assert json.loads(json.dumps(r.to_dict()))["memory"]["group"] == 5


def test_lanczos_basis_storage_is_checked_and_used():
    """A basis storage handed to Lanczos (SLQ's shared group storage) must be a contiguous tensor of
    the operator's dtype and device with room for the basis; the run then lives in its first
    elements and equals a run with its own basis."""
    n, steps = 30, 12
    A = linalg.aslinearoperator(_sym(n))
    v0 = torch.randn(2, n, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    need = 2 * steps * n
    for bad, got in ((torch.empty(need - 1, dtype=torch.float64), f"torch.float64 tensor on cpu of {need - 1} elements"),
                     (torch.empty(need, dtype=torch.float32), f"torch.float32 tensor on cpu of {need} elements"),
                     (torch.empty(2 * need, dtype=torch.float64)[::2], f"of {need} elements, not contiguous")):
        with pytest.raises(ValueError) as exc:
            linalg.Lanczos(A, v0, 2, steps, "t", gen, basis=bad)
        msg = str(exc.value)
        assert msg.startswith(f"t: expected basis a contiguous torch.float64 tensor on cpu of at least {need} elements")
        assert got in msg
    store = torch.full((2 * steps * n + 5,), float("nan"), dtype=torch.float64)
    lz = linalg.Lanczos(A, v0, 2, steps, "t", gen, basis=store)
    assert lz.V.data_ptr() == store.data_ptr()
    lz.advance(steps)
    own = linalg.Lanczos(A, v0, 2, steps, "t", torch.Generator().manual_seed(0))
    own.advance(steps)
    for a, b in zip(lz.tridiagonal(), own.tridiagonal()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert bool(torch.isnan(store[-5:]).all())            # nothing written past the basis
