"""Reuse freed host memory inside a product or a window of Lanczos steps instead of faulting it in again (glibc only).

glibc's malloc serves every block of 32 MiB or more (and smaller ones until its dynamic threshold
has grown) with a fresh ``mmap`` and returns it to the kernel on ``free``. The stacked products of
this package allocate many such blocks per product (one tangent of a conv layer for 10 vectors and
128 CIFAR images is 84 MB), so every product pays the kernel a page fault and a zeroed page for
each 4 KiB it touches, again and again. Measured on the 2-core AMD EPYC of 2026-12-02 (a virtual
machine, where a first touch costs ~2.7 us per page): ten structured Hessian products of a CIFAR
ResNet-20 on 128 images took 11.5 s with glibc's defaults and 7.5 s with every block served from
the heap for the whole process (``MALLOC_MMAP_MAX_=0``); the double backward 18 s and 11 s.

:func:`call_kept` runs one product (``LinearOperator.matmat`` / ``rmatmat`` call it) in a scope
where freed blocks are reused: on entry to the outermost scope ``mallopt`` sends every allocation
to the heap and trims it only past 2 GiB of free top (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` =
2 GiB - 1), so a block freed inside is reused by the next one without a fault. On exit from the
outermost scope the settings return to glibc's steady state for large blocks (``M_MMAP_MAX``
65536, mmap threshold 32 MiB, trim threshold 64 MiB: what its dynamic adjustment reaches once a
32 MiB block has been freed; ``MALLOC_MMAP_MAX_`` / ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` from the environment where set), the result's CPU tensors of the
mmap threshold or more are copied out of the heap (allocated under those settings, as without
the scope; smaller ones would live on the heap anyway), and when the heap holds more free bytes
(``mallinfo2``) than the trim threshold now in force (64 MiB; glibc's default 128 KiB when
``MALLOC_MMAP_THRESHOLD_`` alone is set, since a fixed mmap threshold ends the adjustment that
raises it) a ``malloc_trim(0)`` is scheduled :data:`TRIM_DELAY_S` (10 s; the environment variable
``RESGEOM_HEAP_TRIM_DELAY_S`` sets another, 0 trims at every exit) later: a scope that opens
before then cancels it and reuses those pages without a fault; otherwise a worker thread hands
every free page back to the kernel, so the process keeps no more freed heap than glibc's own trim
threshold allows once the products stop (jemalloc's ``dirty_decay_ms`` follows the same idea, with
the same 10 s). The delay was 1 s until 2026-12-03, when a product after a pause turned out to
cost 2.4-3.2x one right after another on virtual machines whose host reclaims the memory a guest
frees (free page reporting: Firecracker, most clouds): touching it again faults on the host too,
16-39 us per 4 KiB page against ~2 us. torchvision resnet18's ten products (64 CIFAR images, one
thread) took 4.6-5.2 s right after another, 10.9-14.4 s after a 3 s pause (1.9 GB of heap faulted
in again, 6-8 s of system time) and 7.3-8.1 s with the scope off; with the free heap kept, 4.2-4.5 s
after the pause, holding 1.7 GB between products. Pipelines (Lanczos, SLQ, hessian_spectrum's
phases) do not pause and are unaffected by the delay's length; interactive use and benchmarks that
interleave methods are. Trimming at every exit, as a first version did, made every product fault its predecessor's
pages in again, even where the free heap was interior chunks that trimming cannot shrink
(mallinfo2's count stays the same after the trim): measured 2026-12-03 on the AMD VM, the user FC
net's ten products 15-20% slower with the scope than without, and ResNet-20's 10-35% slower than
with no trim at all. Code that maps large long-lived blocks after a run of products calls
:func:`release` first, which runs the scheduled trim at once: the Lanczos basis
(:class:`resgeom_fast.linalg.lanczos.Lanczos`) and eigsh's Ritz vectors, whose memory plans count
them and not freed heap still resident beside them (``tests/linalg/test_memory_plan.py``: eigsh's
peak within the plan; keeping 64 MiB there regardless, as an earlier rule did, put it at 427-483 MB
for a 320 MB basis from run to run, over the plan). A small product (a few MB of temporaries)
keeps its blocks between calls, as it does without the scope. Results are bit-identical: only
where the bytes live changes.

Scopes span single products and, in :class:`resgeom_fast.linalg.lanczos.Lanczos`, windows of
steps (up to ``sync_every``): there the products' outputs stay in the heap (their scopes nest) and
a step reuses the blocks the previous one freed. Measured 2026-12-03 (SLQ 2 x 100 on torchvision
resnet18, one thread, separate runs of the same machine): 160-171 s with a scope per product,
132-141 s with a scope per window, peak RSS unchanged (10.0 GiB). The window holds no
long-lived large block -- the basis, the saved product and the layout copies are allocated
outside it, the scalars are updated in place, the reorthogonalisation kernel maps its pooled
buffers directly -- because a block kept between freed ones splits the heap and makes it grow:
a scope over a whole algorithm (basis and Ritz chunks inside) took eigsh's peak from 1.3x to
1.7x its basis. What slack remains (measured up to 3 working vectors at n = 2M) is counted by
the memory plans (``linalg._memory.HEAP_SLACK_VECTORS``).

Side effect: any ``mallopt`` ends glibc's dynamic adjustment of its mmap threshold for the rest
of the process; it stays at the 32 MiB set on exit (or the environment's value). Off when the C
library is not glibc (musl, macOS, Windows; a preloaded jemalloc / tcmalloc keeps its own policy) and when the
environment variable ``RESGEOM_HEAP=0`` is set (read at each outermost entry). Scopes nest and
are thread-safe (one process-wide counter and lock; the trim worker is a daemon thread, started
at the first scheduled trim and reset in a forked child); :func:`state` reports them.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch

__all__ = ["call_kept", "keep_heap", "release", "state"]

# glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
_KEEP_TRIM = 2**31 - 1            # mallopt takes an int: free() trims only a top chunk over 2 GiB
_DEFAULT_MMAP_MAX = 65536          # glibc's DEFAULT_MMAP_MAX
_EXIT_MMAP_THRESHOLD = 32 << 20    # after a scope: glibc's DEFAULT_MMAP_THRESHOLD_MAX (64-bit) ...
_EXIT_TRIM = 64 << 20              # ... and 2x it: the steady state of its dynamic adjustment
_GLIBC_TRIM = 128 << 10           # glibc's DEFAULT_TRIM_THRESHOLD (in force once the mmap threshold is fixed)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

T = TypeVar("T")

TRIM_DELAY_S = 10.0                # a scope's free heap is trimmed this long after its exit, unless
#                                    another scope opens first (jemalloc's dirty_decay_ms idea and
#                                    default); RESGEOM_HEAP_TRIM_DELAY_S overrides it (module doc)
_delay = TRIM_DELAY_S              # the delay in force, read at the outermost entry (_trim_delay)

_lock = threading.Lock()
_cond = threading.Condition(_lock)
_trim_at: Optional[float] = None   # time.monotonic() of the scheduled trim, None when none is
_worker: Optional[threading.Thread] = None
_depth = 0
_active = False                    # the outermost scope changed the settings
_libc: Optional[ctypes.CDLL] = None
_probed = False


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc with mallopt and malloc_trim, or None."""
    global _libc, _probed
    if not _probed:
        _probed = True
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version.restype = ctypes.c_char_p
            libc.gnu_get_libc_version()
            libc.mallopt.restype = ctypes.c_int
            libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            libc.malloc_trim.restype = ctypes.c_int
            libc.malloc_trim.argtypes = [ctypes.c_size_t]
            if hasattr(libc, "mallinfo2"):          # glibc >= 2.33
                libc.mallinfo2.restype = _MallInfo2
                libc.mallinfo2.argtypes = []
            _libc = libc
        except (OSError, AttributeError):
            _libc = None
    return _libc


def _wanted() -> bool:
    return os.environ.get("RESGEOM_HEAP", "1").strip().lower() not in ("0", "false", "off", "no")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


def _trim_delay() -> float:
    """The trim delay: ``RESGEOM_HEAP_TRIM_DELAY_S`` (seconds, >= 0; 0 trims at every outermost
    exit) where set, else :data:`TRIM_DELAY_S`. A bad value raises before any product runs."""
    raw = os.environ.get("RESGEOM_HEAP_TRIM_DELAY_S")
    if raw is None or not raw.strip():
        return TRIM_DELAY_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"RESGEOM_HEAP_TRIM_DELAY_S must be a finite number of seconds >= 0 (0: trim the "
                         f"free heap at every product's exit), got {raw!r}")
    return value


def _enter() -> None:
    global _depth, _active, _trim_at, _delay
    with _lock:
        outermost = _depth == 0 and _wanted()
        if outermost:
            _delay = _trim_delay()          # before the depth changes: a bad value leaves no scope open
        _depth += 1
        if outermost:
            libc = _glibc()
            if libc is not None:
                _trim_at = None             # the scheduled trim is cancelled: its pages get reused
                libc.mallopt(M_TRIM_THRESHOLD, _KEEP_TRIM)
                libc.mallopt(M_MMAP_MAX, 0)
                _active = True


def _exit(box: Optional[list] = None) -> None:
    """Leave a scope; at the outermost active one restore the settings, replace ``box[0]``'s CPU
    tensors by copies allocated outside the heap (the box must hold the only reference to them,
    so that the originals are freed before the trim) and, when more free heap than the trim
    threshold remains, schedule the trim :data:`TRIM_DELAY_S` later (module doc)."""
    global _depth, _active
    with _lock:
        _depth -= 1
        if _depth != 0 or not _active:
            return
        libc = _glibc()
        libc.mallopt(M_MMAP_MAX, _env_int("MALLOC_MMAP_MAX_", _DEFAULT_MMAP_MAX))
        threshold = _env_int("MALLOC_MMAP_THRESHOLD_", _EXIT_MMAP_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, threshold)
        keep = _exit_trim()
        _active = False
        try:
            if box:
                # the originals' last reference goes here, while the trim threshold still keeps
                # the heap: freed after it was lowered, a result at the heap's top went back to
                # the kernel at once, and the next product faulted it in again (resnet18's ten
                # products: 218k faults a call with the heap kept, 109k after this order)
                box[0] = _copy_out(box[0], threshold)
        finally:
            libc.mallopt(M_TRIM_THRESHOLD, keep)
            if _free_heap_bytes(libc, keep) > keep:
                _schedule_trim()


def _schedule_trim() -> None:
    """Trim the delay in force from now unless a scope opens first (call with ``_lock`` held)."""
    global _trim_at, _worker
    if _delay <= 0:
        _trim_now()
        return
    _trim_at = time.monotonic() + _delay
    if _worker is None or not _worker.is_alive():
        _worker = threading.Thread(target=_trimmer, name="resgeom-heap-trim", daemon=True)
        _worker.start()
    _cond.notify()


def _trimmer() -> None:
    """The worker: waits for a scheduled trim's time and trims unless a scope is open or the trim
    was cancelled (a scope opened, or :func:`release` ran it) meanwhile."""
    global _trim_at
    with _lock:
        while True:
            if _trim_at is None:
                _cond.wait()
                continue
            wait = _trim_at - time.monotonic()
            if wait > 0:
                _cond.wait(wait)
                continue
            if _depth == 0:
                _trim_now()
            else:
                _trim_at = None


def release() -> bool:
    """Run a scheduled trim now (the free heap the last scope left goes back to the kernel);
    returns whether one was pending. Code that allocates large long-lived blocks outside the
    scopes after a run of products calls it first (the Lanczos basis, eigsh's Ritz vectors), so
    that they do not come on top of freed heap pages still resident."""
    global _trim_at
    with _lock:
        if _trim_at is None or _depth != 0:
            return False
        _trim_now()
        return True


def _trim_now() -> None:
    """Cancel any scheduled trim and hand every free heap page back to the kernel now (call with
    ``_lock`` held, no scope open)."""
    global _trim_at
    _trim_at = None
    _glibc().malloc_trim(0)


def _exit_trim() -> int:
    """The trim threshold glibc itself would have in force after the scope: the environment's
    ``MALLOC_TRIM_THRESHOLD_``; else its default 128 KiB when ``MALLOC_MMAP_THRESHOLD_`` is set
    (a fixed mmap threshold ends the dynamic adjustment, which is what raises the trim
    threshold); else 64 MiB, the steady state of that adjustment. A scope leaves at most this
    many free heap bytes behind."""
    if "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return _env_int("MALLOC_TRIM_THRESHOLD_", _EXIT_TRIM)
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return _GLIBC_TRIM
    return _EXIT_TRIM


def _free_heap_bytes(libc: Any, keep: int) -> int:
    """Free bytes held in malloc's arenas (mallinfo2; "unknown" counts as over ``keep``)."""
    try:
        return int(libc.mallinfo2().fordblks)
    except (AttributeError, TypeError, ValueError):
        return keep + 1


def _copy_out(x: Any, threshold: int) -> Any:
    """``x`` with its CPU tensors of ``threshold`` bytes or more cloned (glibc mmaps those
    outside the scope; smaller ones live on the heap with or without it)."""
    if isinstance(x, torch.Tensor):
        big = x.device.type == "cpu" and x.untyped_storage().nbytes() >= threshold
        return x.clone() if big else x
    if isinstance(x, tuple):
        items = [_copy_out(t, threshold) for t in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, list):
        return [_copy_out(t, threshold) for t in x]
    return x


def call_kept(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` inside the heap scope (module doc); its tensors (a tensor, or a
    tuple / list of them) are returned copied out of the heap when this is the outermost scope.
    The caller must hold no other reference to tensors ``fn`` allocated."""
    _enter()
    try:
        box = [fn(*args, **kwargs)]
    except BaseException:
        _exit()
        raise
    _exit(box)
    return box.pop()


@contextmanager
def keep_heap() -> Iterator[None]:
    """The heap scope as a context manager, for code whose allocations do not outlive it (a
    tensor allocated inside and kept after the outermost exit stays on the heap: use
    :func:`call_kept` to return results)."""
    _enter()
    try:
        yield
    finally:
        _exit()


def state() -> dict:
    """``{"available": glibc found, "enabled": RESGEOM_HEAP allows it, "depth": open scopes,
    "active": the settings are changed now, "trim_pending": a trim is scheduled}``."""
    with _lock:
        return {"available": _glibc() is not None, "enabled": _wanted(), "depth": _depth, "active": _active,
                "trim_pending": _trim_at is not None}


def _after_fork_in_child() -> None:
    """A forked child has no worker thread and may have copied the lock held: start afresh."""
    global _lock, _cond, _worker, _trim_at
    _lock = threading.Lock()
    _cond = threading.Condition(_lock)
    _worker = None
    _trim_at = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
