"""Memory plans of the Lanczos algorithms: the bytes a run will allocate, checked before it does.

A Lanczos basis with full reorthogonalisation holds ``steps`` vectors of length n per problem:
for a resnet18 Hessian (n = 11.7M parameters) SLQ's defaults (10 probes x 100 steps, float32)
need 47 GB and eigsh's 300 steps 14 GB. :func:`plan_eigsh` and :func:`plan_slq` count the bytes
of the algorithm's own buffers (the basis, the working vectors, the start vectors, the float64
chunks of the Ritz vectors, the returned vectors) from the dimension, steps, probes, dtype and
reorthogonalisation mode, compare them with the memory available on the operator's device, and
choose among the options the code has:

- eigsh: the full basis of ``max_steps`` vectors (no other option: its Ritz vectors need it);
- SLQ, ``reorth="full"``: all probes advancing together, or the probes in sequential groups of
  ``g`` (each group keeps only its own basis; the probes are independent, so the quadrature is
  the same: only the rounding of the batched products differs -- no accuracy change);
- SLQ, ``reorth="auto"``: "full" as above when one probe's basis fits, else ``"local"`` (the
  three-term recurrence, two vectors per probe): its ghost nodes make the quadrature brackets
  approximate -- an accuracy change, stated in the plan's ``accuracy_note``.

When nothing fits the plan raises :class:`InsufficientMemoryError` naming the bytes needed, the
bytes available and the settings that would fit. What is available: ``memory_limit`` when given
(bytes, exact), else on CUDA ``torch.cuda.mem_get_info`` (free bytes) and on the CPU
``MemAvailable`` of /proc/meminfo (``os.sysconf`` otherwise), lowered to the cgroup's
``memory.max - memory.current`` where one is set; of a detected amount only ``_USABLE`` (90 %) is
planned for, since the operator (a model's activations and gradients) needs memory of its own
that the plan cannot count.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch

#: the share of a detected (not user-given) amount of free memory a plan may use
_USABLE = 0.9
#: working vectors a Lanczos step may hold beyond the basis and the saved product (five live
#: ones and HEAP_SLACK_VECTORS of heap slack: :func:`lanczos_bytes`)
HEAP_SLACK_VECTORS = 10
WORK_VECTORS = 5 + HEAP_SLACK_VECTORS
#: bytes of one float64 chunk of the Ritz vectors (eigsh builds them chunk by chunk over n)
RITZ_CHUNK_BYTES = 32 * 2**20


class InsufficientMemoryError(MemoryError):
    """A memory plan found no option that fits (the message names the numbers and the options)."""


@dataclass
class MemoryPlan:
    """What a Lanczos run allocates and what was chosen to fit.

    Attributes:
        where: the algorithm ("eigsh", "slq_density").
        choice: the option run, in words (e.g. "full reorthogonalisation, probes in 4 groups of 3").
        reorth: "full" or "local", the reorthogonalisation run.
        group: probes per problem advancing together (SLQ; eigsh: 1).
        groups: sequential groups of probes (1 = all at once).
        basis_bytes: bytes of the Lanczos basis allocated at once (``[b * group, slots, n]``).
        bytes_needed: peak bytes of the algorithm's own buffers under this choice.
        bytes_available: the bytes planned against (``memory_limit``, or the usable share of the
            detected free memory); None when unknown (nothing is then refused).
        source: where ``bytes_available`` came from.
        accuracy_note: None when the choice computes what the requested settings compute; else
            how its accuracy differs (e.g. "local" reorthogonalisation's ghost nodes).
    """

    where: str
    choice: str
    reorth: str
    group: int
    groups: int
    basis_bytes: int
    bytes_needed: int
    bytes_available: Optional[int]
    source: str
    accuracy_note: Optional[str] = None

    def to_dict(self) -> dict:
        return asdict(self)


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit under 1024 (e.g. "43.6 GiB")."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _cgroup_free() -> Optional[int]:
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(raw) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def meminfo_available() -> Optional[int]:
    """``MemAvailable`` of /proc/meminfo in bytes, None where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes(device, memory_limit: Optional[int] = None) -> tuple[Optional[int], str]:
    """``(bytes a plan may use, where the number came from)`` on ``device`` (see module doc)."""
    if memory_limit is not None:
        return int(memory_limit), "memory_limit"
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
        except RuntimeError as e:  # no driver behind the device (e.g. a simulated one): nothing to read
            return None, f"unknown (torch.cuda.mem_get_info failed: {str(e).splitlines()[0][:120]}; not checked)"
        return int(free * _USABLE), f"{_USABLE:.0%} of torch.cuda.mem_get_info free bytes"
    if device.type != "cpu":
        return None, f"unknown for device {device.type!r} (not checked)"
    free, source = meminfo_available(), "/proc/meminfo MemAvailable"
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            source = "os.sysconf available pages"
        except (ValueError, OSError, AttributeError):
            return None, "unknown (no /proc/meminfo nor os.sysconf; not checked)"
    cg = _cgroup_free()
    if cg is not None and cg < free:
        free, source = cg, "cgroup memory.max - memory.current"
    return int(free * _USABLE), f"{_USABLE:.0%} of {source}"


def check_memory_limit(where: str, memory_limit) -> Optional[int]:
    """``memory_limit`` validated: None or a positive int (bytes)."""
    if memory_limit is None:
        return None
    if isinstance(memory_limit, bool) or not isinstance(memory_limit, int) or memory_limit <= 0:
        raise ValueError(f"{where}: expected memory_limit a positive int (bytes) or None, got {memory_limit!r}")
    return memory_limit


def basis_slots(steps: int, n: int, reorth: str) -> int:
    """Rows of one problem's Lanczos basis: every step's vector for "full" (at most n), the last
    two for "local"."""
    steps = min(steps, n)
    return steps if reorth == "full" else min(2, steps)


def lanczos_bytes(n: int, problems: int, steps: int, itemsize: int, reorth: str) -> tuple[int, int]:
    """``(basis bytes, total bytes)`` of one :class:`~resgeom_fast.linalg.lanczos.Lanczos` run on
    ``problems`` vectors: the basis ``[problems, slots, n]`` (slots = steps for "full", 2 for
    "local"), the saved product ``[problems, n]`` ("local": also a copy of the two rows), and
    :data:`WORK_VECTORS` working vectors per problem: five live ones (the operator's input copy
    and output copy, both owned by the run, the operator's own output, the reorthogonalised
    vector and, in the CPU's one-sweep full reorthogonalisation, the local step's output) and
    :data:`HEAP_SLACK_VECTORS` of heap slack (a window of steps runs in one
    :mod:`resgeom_fast.core.heap` scope, where the step's blocks come from malloc's heap and a
    small block kept between two freed ones can make it grow; how far varies from run to run
    with the addresses the process gets (address-space randomisation: the same run with it
    off repeats exactly): measured 2026-12-04, SLQ at n = 2M, 40 steps, 1 and 3 probes, some 60 runs,
    the peak beyond the basis was 5.6-14.2 vectors' worth, i.e. up to ~8.5 of slack over the
    live ones (glibc's default thresholds and ``MALLOC_MMAP_THRESHOLD_=65536`` alike; 3 had
    been seen before); counted on every device); T's float64 scalars (``2 * problems * steps``)
    and, "full", the one-sweep reorthogonalisation's coefficient and overlap matrices
    (``2 * problems * steps * (steps + 1)`` float64, counted on every device)."""
    steps = min(steps, n)
    slots = basis_slots(steps, n, reorth)
    basis = problems * slots * n * itemsize
    saved = problems * n * itemsize * (1 if reorth == "full" else 1 + slots)
    work = WORK_VECTORS * problems * n * itemsize
    scalars = 2 * problems * steps * 8 + (2 * problems * steps * (steps + 1) * 8 if reorth == "full" else 0)
    return basis, basis + saved + work + scalars


def _refuse(where: str, what: str, needed: int, avail: int, source: str, options: list[str]) -> None:
    raise InsufficientMemoryError(
        f"{where}: {what} needs {needed} bytes ({fmt_bytes(needed)}), but {avail} bytes "
        f"({fmt_bytes(avail)}) are available ({source}); options that would fit: " + "; ".join(options))


def plan_eigsh(n: int, batch: int, max_steps: int, k: int, dtype: torch.dtype, device,
               memory_limit: Optional[int] = None, where: str = "eigsh") -> MemoryPlan:
    """The memory plan of :func:`~resgeom_fast.linalg.eigsh` (full basis of ``max_steps``
    vectors per problem, the Ritz vectors built in float64 chunks of :data:`RITZ_CHUNK_BYTES`,
    the returned vectors and their residual products ``[b, n, k]``); raises
    :class:`InsufficientMemoryError` when it does not fit."""
    item = dtype.itemsize
    steps = min(max_steps, n)
    basis, total = lanczos_bytes(n, batch, steps, item, "full")
    start = batch * n * item                                    # the start vector v0
    ritz = batch * n * k * (2 * item + 3 * 8)                   # X, A X and the float64 residual temps
    chunk = min(RITZ_CHUNK_BYTES, batch * steps * n * 8)
    needed = total + start + ritz + chunk
    avail, source = available_bytes(device, memory_limit)
    plan = MemoryPlan(where=where, choice=f"full reorthogonalisation, basis of {steps} vectors", reorth="full",
                      group=1, groups=1, basis_bytes=basis, bytes_needed=needed, bytes_available=avail,
                      source=source)
    if avail is not None and needed > avail:
        per_step = batch * n * item
        fixed = needed - basis
        fit = (avail - fixed) // per_step if avail > fixed else 0
        options = []
        if fit > k:
            options.append(f"max_steps <= {fit} (fewer steps: the wanted pairs may not converge; check `converged`)")
        options.append(f"memory_limit >= {needed} if that much memory is in fact free")
        options.append("fewer parameters (params=) or a smaller batch of problems")
        _refuse(where, f"the Lanczos basis of {steps} steps x {batch} problem(s) x n = {n} ({dtype})",
                needed, avail, source, options)
    return plan


def plan_slq(n: int, batch: int, probes: int, steps: int, dtype: torch.dtype, device, reorth: str,
             memory_limit: Optional[int] = None, where: str = "slq_density", *, drawn: int = 0,
             share: Optional[tuple[int, int]] = None) -> MemoryPlan:
    """The memory plan of :func:`~resgeom_fast.linalg.slq_density`: the largest group of probes
    whose basis fits (all of them when possible), "local" for ``reorth="auto"`` when one probe's
    full basis does not fit; raises :class:`InsufficientMemoryError` when nothing fits.

    Probe-parallel runs (``distributed="probes"``) plan this rank's share: ``probes`` is the
    share (0 for a rank without probes), ``share = (this rank's probes, all probes)`` names it in
    the choice, and ``drawn`` adds the bytes of the int8 draw of all probes (1 byte per entry,
    freed once the share is converted)."""
    item = dtype.itemsize
    m = min(steps, n)
    start = batch * probes * n * item + drawn                   # the probes' start vectors, drawn at once
    avail, source = available_bytes(device, memory_limit)
    of = "" if share is None else f" (this rank's {share[0]} of {share[1]} probes, distributed='probes')"
    if probes == 0:
        if avail is not None and start > avail:
            _refuse(where, f"the draw of all {share[1] if share else 0} probes (int8, n = {n})", start, avail,
                    source, [f"memory_limit >= {start} if that much memory is in fact free", "fewer probes"])
        return MemoryPlan(where=where, choice="no probe on this rank" + of, reorth=reorth if reorth != "auto"
                          else "full", group=0, groups=0, basis_bytes=0, bytes_needed=start, bytes_available=avail,
                          source=source)

    def full_plan(g: int) -> MemoryPlan:
        basis, total = lanczos_bytes(n, batch * g, m, item, "full")
        groups = -(-probes // g)
        choice = ("full reorthogonalisation, all probes together" if groups == 1 else
                  f"full reorthogonalisation, probes in {groups} sequential groups of <= {g} (same quadrature)") + of
        return MemoryPlan(where=where, choice=choice, reorth="full", group=g, groups=groups, basis_bytes=basis,
                          bytes_needed=total + start, bytes_available=avail, source=source)

    def local_plan(note: Optional[str]) -> MemoryPlan:
        basis, total = lanczos_bytes(n, batch * probes, m, item, "local")
        return MemoryPlan(where=where, choice="local (three-term) reorthogonalisation, all probes together" + of,
                          reorth="local", group=probes, groups=1, basis_bytes=basis, bytes_needed=total + start,
                          bytes_available=avail, source=source, accuracy_note=note)

    if reorth == "local":
        plan = local_plan(None)
        if avail is not None and plan.bytes_needed > avail:
            _refuse(where, f"local Lanczos on {batch * probes} probe vector(s) of n = {n} ({dtype})",
                    plan.bytes_needed, avail, source,
                    [f"memory_limit >= {plan.bytes_needed} if that much memory is in fact free",
                     "fewer probes", "fewer parameters (params=)"])
        return plan
    if avail is None:
        return full_plan(probes)
    for g in range(probes, 0, -1):
        if full_plan(g).bytes_needed <= avail:
            # the fewest groups for this size, then the smallest even group for it (same passes)
            groups = -(-probes // g)
            return full_plan(-(-probes // groups))
    one = full_plan(1)
    if reorth == "auto":
        loc = local_plan("reorth='auto' chose 'local' (the three-term recurrence): one probe's full basis "
                         f"needs {fmt_bytes(one.bytes_needed)} of {fmt_bytes(avail)} available; its ghost copies "
                         "of converged nodes make the quadrature brackets approximate")
        if loc.bytes_needed <= avail:
            return loc
    per_step = batch * n * item
    fixed = one.bytes_needed - one.basis_bytes
    fit = (avail - fixed) // per_step if avail > fixed else 0
    options = []
    if fit >= 1:
        options.append(f"steps <= {fit} (one probe at a time)")
    options.append("reorth='local' (two vectors per probe; approximate brackets)")
    options.append(f"memory_limit >= {one.bytes_needed} if that much memory is in fact free")
    options.append("fewer parameters (params=)")
    _refuse(where, f"the Lanczos basis of {m} steps for one probe ({batch} problem(s), n = {n}, {dtype})",
            one.bytes_needed, avail, source, options)
    raise AssertionError("unreachable")


#: float64 working copies of the sketch that the orthonormalisation (CholeskyQR3 in float64) holds
ORTH_F64_COPIES = 2


def plan_trace(n: int, batch: int, sketch: int, sketch_share: int, probes_share: int, dtype: torch.dtype, device,
               memory_limit: Optional[int] = None, where: str = "trace", *, hutchinson: int = 0,
               share: Optional[tuple[int, int]] = None) -> MemoryPlan:
    """The memory plan of :func:`~resgeom_fast.linalg.trace` (Hutchinson / Hutch++), made before
    any probe is drawn.

    Hutch++ holds its sketch basis Q ``[b, n, sketch]`` (every rank: the range is orthonormalised
    whole) and, while it is orthonormalised, the sketch products Y (``dtype``) and
    :data:`ORTH_F64_COPIES` float64 working copies of them; the products (this rank's
    ``sketch_share`` columns of A S and of A Q, its ``probes_share`` Hutchinson probes) run in
    column chunks of ``c`` vectors: the chunk, its deflation temporaries and its products,
    ``4 c`` vectors on top of Q. The signs of all probes are drawn as int8 (1 byte per entry;
    ``hutchinson`` the number of Hutchinson probes of all ranks). The largest chunk that fits is
    chosen (all columns at once when possible; chunks change only the rounding of the batched
    products). Raises :class:`InsufficientMemoryError` naming the numbers and the options when
    even one column at a time does not fit, or when the sketch itself does not.

    Returns:
        a :class:`MemoryPlan` with ``group`` = the chunk width c (0 when this rank has no column)
        and ``groups`` = the chunks of this rank's widest stage.
    """
    item = dtype.itemsize
    vec = batch * n * item
    draws = batch * n * (sketch + hutchinson)
    orth = 2 * sketch * vec + ORTH_F64_COPIES * batch * n * sketch * 8 if sketch else 0
    widest = max(sketch_share, probes_share)
    avail, source = available_bytes(device, memory_limit)
    of = "" if share is None else f" (this rank's {share[0]} of {share[1]} probes, distributed='probes')"

    def needed(c: int) -> int:
        return max(orth, (sketch + 4 * c) * vec) + draws

    def plan(c: int) -> MemoryPlan:
        groups = -(-widest // c) if c else 0
        what = ("no column on this rank" if not c else "all columns at once" if groups <= 1 else
                f"columns in {groups} sequential chunks of <= {c} (same estimate)")
        head = f"Hutch++ sketch of {sketch} vectors, " if sketch else "Hutchinson, "
        return MemoryPlan(where=where, choice=head + what + of, reorth="none", group=c, groups=groups,
                          basis_bytes=sketch * vec, bytes_needed=needed(c), bytes_available=avail, source=source)

    if widest == 0 or avail is None:
        return plan(widest)
    for c in range(widest, 0, -1):
        if needed(c) <= avail:
            groups = -(-widest // c)
            return plan(-(-widest // groups))       # the smallest chunk for the fewest chunks
    options = []
    if sketch and orth + draws > avail:
        what = f"the Hutch++ sketch of {sketch} vectors ({batch} problem(s), n = {n}, {dtype}) and its orthonormalisation"
        fit = int((avail - draws) // (2 * vec + ORTH_F64_COPIES * batch * n * 8)) if avail > draws else 0
        if fit >= 1:
            options.append(f"probes <= {3 * fit + 2} (a sketch of <= {fit} vectors)")
        options.append("method='hutchinson' (no sketch)")
    else:
        what = (f"one column at a time next to the {sketch}-vector sketch" if sketch else
                "one Hutchinson column at a time") + f" ({batch} problem(s), n = {n}, {dtype})"
        if sketch:
            options.append("method='hutchinson' or fewer probes (a smaller sketch)")
    options.append(f"memory_limit >= {needed(1)} if that much memory is in fact free")
    options.append("fewer parameters (params=)")
    _refuse(where, what, needed(1), avail, source, options)
    raise AssertionError("unreachable")
