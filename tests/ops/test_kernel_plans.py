"""The index plans of the CUDA kernels, emulated on the CPU (no GPU needed).

Each function below mirrors, name for name, the host-side plan or the index arithmetic of a kernel
in csrc/ops/cuda/ (change them together). The checks are exact integer ones: every element is
visited exactly once, scratch buffers are large enough for every stage, shared-memory tiles fit,
and 32-bit index arithmetic cannot wrap; and the warp-per-problem control flow of tridiag_eigh
(ballot scan, rescan after a sweep) reproduces the CPU kernel. The CUDA-marked tests in the op
test files check the kernels themselves on a GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

from resgeom_fast.ops import tridiag_eigh

# -- lanczos_reorth_kernel.cu: column_sums / reduce_plan / reduce_scratch ------------------------
K_THREADS = 256
K_ROWS_PER_THREAD = 16


def reduce_plan(j: int) -> tuple[int, int, int, int]:
    tx = 1
    while tx < 32 and tx < j:
        tx *= 2
    ty = K_THREADS // tx
    return tx, ty, ty * K_ROWS_PER_THREAD, -(-j // tx)


def reduce_scratch(rows: int, j: int) -> tuple[int, int]:
    seg = reduce_plan(j)[2]
    s1 = -(-rows // seg)
    s2 = -(-s1 // seg)
    return (s1 if s1 > 1 else 0), (s2 if s2 > 1 else 0)


def column_sums(part: torch.Tensor, bufA_rows: int, bufB_rows: int) -> tuple[torch.Tensor, int]:
    """part [b, rows, j] -> (column sums [b, j] in the kernel's order, number of launches).
    Asserts that every intermediate stage fits the ping-pong buffer it is written to."""
    b, rows, j = part.shape
    tx, ty, seg, tiles = reduce_plan(j)
    cur, nxt, launches = part, 0, 0
    while True:
        nseg = max(-(-rows // seg), 1)
        last = -(-rows // seg) <= 1
        launches += 1
        # thread (x, y) of block (p, s, tile) adds rows s * seg + y + u * ty for u = 0..15
        visits = torch.zeros(rows, dtype=torch.int64)
        padded = torch.zeros(b, nseg * seg, j, dtype=part.dtype)
        padded[:, :rows] = cur
        acc = torch.zeros(b, nseg, ty, tiles * tx, dtype=part.dtype)
        for u in range(K_ROWS_PER_THREAD):
            r = torch.arange(nseg)[:, None] * seg + torch.arange(ty)[None, :] + u * ty  # [nseg, ty]
            ok = r < rows
            acc[..., :j] += padded[:, r.clamp_max(nseg * seg - 1)] * ok[None, :, :, None]
            visits += torch.bincount(r[ok], minlength=rows)
        assert torch.all(visits == 1), "a row is read twice or never"
        off = ty // 2
        while off > 0:  # pairwise tree over y
            acc[:, :, :off] += acc[:, :, off : 2 * off].clone()
            off //= 2
        out = acc[:, :, 0, :j]  # [b, nseg, j]
        if last:
            return out[:, 0], launches
        assert nseg <= (bufA_rows if nxt == 0 else bufB_rows), "stage overruns its buffer"
        cur, rows, nxt = out, nseg, nxt ^ 1


@pytest.mark.parametrize("rows,j", [(0, 3), (1, 1), (5, 40), (128, 33), (129, 33), (4095, 1),
                                    (4097, 1), (16385, 32), (16385, 2), (300, 7)])
def test_lanczos_column_sums_cover_every_chunk_once(rows, j):
    g = torch.Generator().manual_seed(rows + j)
    part = torch.randn(2, rows, j, generator=g, dtype=torch.float64)
    got, launches = column_sums(part, *reduce_scratch(rows, j))
    torch.testing.assert_close(got, part.sum(1), rtol=1e-12, atol=1e-12)
    seg, stages, cap = reduce_plan(j)[2], 1, reduce_plan(j)[2]
    while cap < rows:  # rows <= seg^stages: one launch per stage
        cap, stages = cap * seg, stages + 1
    assert launches == stages


# -- orthonormalize_kernel.cu: solve_plan / solve_tiles_kernel ---------------------------------
K_TILE_BYTES = 48 * 1024
K_MAX_TILE_STRIDE = K_TILE_BYTES // (32 * 8)


def solve_plan(k: int) -> tuple[int, int]:
    ks = k | 1
    if ks > K_MAX_TILE_STRIDE:
        return ks, 0
    return ks, min(256, K_TILE_BYTES // (ks * 8) // 32 * 32)


def test_orthonormalize_tiles_fit_shared_memory():
    for k in range(1, 400):
        ks, tile = solve_plan(k)
        assert ks % 2 == 1 and ks >= k
        if k <= 191:
            assert tile >= 32 and tile % 32 == 0 and tile <= 256, k
            assert tile * ks * 8 <= K_TILE_BYTES, k       # dynamic shared memory without opt-in
            # the 8-byte accesses of a half warp (rows i * ks) fall on 16 distinct bank pairs
            assert {(i * ks * 2) % 32 for i in range(16)} == set(range(0, 32, 2)), k
        else:
            assert tile == 0, k                           # the row-per-thread kernel


@pytest.mark.parametrize("n,k", [(1, 1), (255, 1), (257, 1), (1000, 33), (161, 33), (33, 33)])
def test_orthonormalize_tiles_cover_every_entry_once(n, k):
    ks, tile = solve_plan(k)
    b = 3
    tiles = -(-n // tile)
    visits = torch.zeros(b * n * k, dtype=torch.int64)
    for blk in range(b * tiles):
        p, t0 = blk // tiles, (blk % tiles) * tile
        rows = min(tile, n - t0)
        e = torch.arange(rows * k)
        assert int((e // k * ks + e % k).max()) < tile * ks   # inside the shared tile
        visits[(p * n + t0) * k + e] += 1
    assert torch.all(visits == 1)


# -- masked_scale_kernel.cu: launch / masked_scale_kernel ---------------------------------------
K_MAX_GRID_Y = 65535
K_TARGET_BLOCKS = 1 << 16


def masked_scale_grid(slabs: int, cs: int) -> tuple[int, int]:
    grid_y = min(slabs, K_MAX_GRID_Y)
    want_x = max(1, -(-K_TARGET_BLOCKS // grid_y))
    grid_x = min(-(-cs // K_THREADS), want_x, (1 << 31) // K_THREADS)
    return grid_x, grid_y


@pytest.mark.parametrize("slabs,cs", [(1, 1), (75000, 6), (4, 120000), (131071, 3), (2, 2**31 - 1)])
def test_masked_scale_grid_limits(slabs, cs):
    """Grid within CUDA's limits; the 32-bit element loop (e < cs, e += grid_x * 256) cannot wrap;
    the slab loop (q = blockIdx.y + t * grid_y) starts at every slab below grid_y."""
    grid_x, grid_y = masked_scale_grid(slabs, cs)
    assert 1 <= grid_y <= K_MAX_GRID_Y and 1 <= grid_x <= 2**31 - 1
    assert grid_x * K_THREADS <= 2**31 and (cs - 1) + grid_x * K_THREADS < 2**32
    assert grid_y == slabs or grid_y == K_MAX_GRID_Y


# -- tridiag_eigh_kernel.cu: warp_tql_first_row / ql_sweep (one warp per problem) --------------
def ql_sweep(d: list, e: list, z: list, l: int, mm: int) -> None:
    g = (d[l + 1] - d[l]) / (2.0 * e[l])
    r = math.hypot(g, 1.0)
    g = d[mm] - d[l] + e[l] / (g + math.copysign(r, g))
    sn, c, p = 1.0, 1.0, 0.0
    i = mm - 1
    while i >= l:
        f = sn * e[i]
        bb = c * e[i]
        r = math.hypot(f, g)
        e[i + 1] = r
        if r == 0.0:
            d[i + 1] -= p
            e[mm] = 0.0
            break
        sn, c = f / r, g / r
        g = d[i + 1] - p
        r = (d[i] - g) * sn + 2.0 * c * bb
        p = sn * r
        d[i + 1] = g + p
        g = c * r - bb
        f = z[i + 1]
        z[i + 1] = sn * z[i] + c * f
        z[i] = c * z[i] - sn * f
        i -= 1
    if r == 0.0 and i >= l:
        return
    d[l] -= p
    e[l] = g
    e[mm] = 0.0


def warp_tql_first_row(d: list, e: list, z: list, m: int, max_sweeps: int = 60) -> bool:
    for l in range(m):
        it = 0
        while True:
            mm = m - 1
            for base in range(l, m - 1, 32):  # one __ballot_sync over 32 lanes, first set bit
                hits = [idx < m - 1 and abs(e[idx]) + (abs(d[idx]) + abs(d[idx + 1])) == abs(d[idx]) + abs(d[idx + 1])
                        for idx in range(base, base + 32)]
                if any(hits):
                    mm = base + hits.index(True)
                    break
            if mm == l:
                break
            if it == max_sweeps:
                return False
            it += 1
            ql_sweep(d, e, z, l, mm)
    return True


@pytest.mark.parametrize("m", [1, 2, 5, 33, 70])
def test_tridiag_warp_algorithm_matches_the_cpu_kernel(m):
    """The warp kernel's control flow (ballot scan for each sweep's end, lane 0 sweeping, the CPU
    kernel's `continue` as a rescan) gives the CPU kernel's nodes and weights, also for problems
    split by exact zeros."""
    g = torch.Generator().manual_seed(m)
    d = torch.randn(6, m, generator=g, dtype=torch.float64)
    e = torch.rand(6, max(m - 1, 0), generator=g, dtype=torch.float64) + 0.1
    if m > 8:
        e[0, :5] = 0.0
        e[1, m // 2] = 0.0
        e[2, -1] = 1e-300
    want_n, want_w = tridiag_eigh(d, e)
    for p in range(6):
        dd, ee, zz = d[p].tolist(), e[p].tolist() + [0.0], [1.0] + [0.0] * (m - 1)
        assert warp_tql_first_row(dd, ee, zz, m)
        order = sorted(range(m), key=lambda i: dd[i])  # the insertion sort is stable
        torch.testing.assert_close(torch.tensor([dd[i] for i in order], dtype=torch.float64), want_n[p],
                                   rtol=0, atol=1e-13)
        torch.testing.assert_close(torch.tensor([zz[i] ** 2 for i in order], dtype=torch.float64), want_w[p],
                                   rtol=0, atol=1e-13)
