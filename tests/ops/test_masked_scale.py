"""resgeom_fast::masked_scale against its reference, autograd, errors."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import CUDA_REASON, DEVICES, DTYPES, HAS_CUDA, tol
from resgeom_fast.ops import _reference as ref
from resgeom_fast.ops import masked_scale

OP = torch.ops.resgeom_fast.masked_scale.default


def _case(n, k, c, s, dtype, device, seed=0, mask_dtype=torch.bool):
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(n, k, c, s, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, c, s, generator=gen) > 0.4
    scale = torch.randn(c, generator=gen, dtype=torch.float64)
    return v.to(device, dtype), mask.to(device, mask_dtype), scale.to(device, dtype)


# 1. correctness
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8])
@pytest.mark.parametrize("n,k,c,s", [(0, 3, 4, 5), (2, 0, 4, 5), (2, 3, 0, 5), (2, 3, 4, 0),
                                     (3, 10, 128, 1), (2, 4, 16, 64), (1, 1, 1, 1)])
def test_matches_reference(device, dtype, mask_dtype, n, k, c, s):
    v, mask, scale = _case(n, k, c, s, dtype, device, mask_dtype=mask_dtype)
    out = masked_scale(v, mask, scale)
    assert out.shape == v.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, ref.masked_scale(v, mask, scale), **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(device):
    v, mask, scale = _case(3, 5, 8, 7, torch.float64, device)
    vt = v.transpose(1, 3).contiguous().transpose(1, 3)
    mt = mask.transpose(0, 2).contiguous().transpose(0, 2)
    st = torch.stack([scale, scale], 1)[:, 0]
    assert not vt.is_contiguous() and not mt.is_contiguous() and not st.is_contiguous()
    torch.testing.assert_close(masked_scale(vt, mt, st), ref.masked_scale(v, mask, scale))


@pytest.mark.parametrize("device", DEVICES)
def test_equals_batchnorm_relu_jacobian(device):
    # J of eval-mode BN -> ReLU at h, applied to K tangents, equals the op with the BN factor.
    bn = torch.nn.BatchNorm2d(4).double().to(device).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.normal_()
    h = torch.randn(2, 4, 3, 3, dtype=torch.float64, device=device)
    t = torch.randn(5, 2, 4, 3, 3, dtype=torch.float64, device=device)
    f = lambda z: torch.relu(bn(z))  # noqa: E731
    jt = torch.func.vmap(lambda ti: torch.func.jvp(f, (h,), (ti,))[1])(t)  # [K, N, C, H, W]
    mask = (bn(h) > 0).reshape(2, 4, 9)
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    got = masked_scale(t.transpose(0, 1).reshape(2, 5, 4, 9), mask, s)
    torch.testing.assert_close(got, jt.transpose(0, 1).reshape(2, 5, 4, 9))


# 2. opcheck
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(device, dtype):
    v, mask, scale = _case(2, 3, 4, 5, dtype, device)
    torch.library.opcheck(OP, (v, mask, scale))
    torch.library.opcheck(OP, (v.requires_grad_(), mask, scale.requires_grad_()))


# 3. gradcheck
def test_gradcheck():
    v, mask, scale = _case(2, 3, 4, 5, torch.float64, "cpu")
    v.requires_grad_(), scale.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: masked_scale(a, mask, b), (v, scale))
    assert torch.autograd.gradgradcheck(lambda a, b: masked_scale(a, mask, b), (v, scale))


# 4. CPU-CUDA parity
@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_cuda_parity(dtype):
    v, mask, scale = _case(8, 10, 64, 256, dtype, "cpu")
    got = masked_scale(v.cuda(), mask.cuda(), scale.cuda())
    torch.testing.assert_close(got.cpu(), masked_scale(v, mask, scale), **tol(dtype))


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,c,s", [(300, 250, 2, 3),    # 75000 slabs: more than gridDim.y
                                     (3, 7, 5, 7),        # odd sizes, c = e / S by IntDivider
                                     (2, 2, 3, 40000),    # slabs longer than the x grid
                                     (1, 2, 1, 257)])     # one channel, a partial block
def test_cuda_grid_covers_every_element(dtype, n, k, c, s):
    """The 2-D grid (slabs on y, elements of a slab on x, one 32-bit division per element) writes
    every element, bit for bit the CPU kernel's product."""
    v, mask, scale = _case(n, k, c, s, dtype, "cpu", seed=1)
    got = masked_scale(v.cuda(), mask.cuda(), scale.cuda()).cpu()
    torch.testing.assert_close(got, masked_scale(v, mask, scale), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason=CUDA_REASON)
def test_cuda_int64_slab_path():
    """C * S > 2^31 - 1 takes the int64 instance of the kernel; checked on slices at the start,
    around 2^31 and at the end (needs ~20 GB of GPU memory, else skipped)."""
    c, s = 2, 2**30 + 3  # c * s = 2^31 + 6 elements per slab
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(0)
    v = torch.randn(1, 1, c, s, device="cuda", generator=gen)
    mask = torch.rand(1, c, s, device="cuda", generator=gen) > 0.5
    scale = torch.tensor([1.5, -3.0], device="cuda")
    out = masked_scale(v, mask, scale)
    for ci, lo in [(0, 0), (0, s - 1000), (1, 0), (1, 2**31 - s - 500), (1, s - 1000)]:
        want = v[0, 0, ci, lo : lo + 1000] * scale[ci] * mask[0, ci, lo : lo + 1000]
        torch.testing.assert_close(out[0, 0, ci, lo : lo + 1000], want, rtol=0, atol=0)
    del v, mask, out
    torch.cuda.empty_cache()


# 5. one raises per check
def test_errors():
    v, mask, scale = _case(2, 3, 4, 5, torch.float64, "cpu")
    with pytest.raises(RuntimeError, match="expected v of shape \\[N, K, C, S\\]"):
        masked_scale(v[0], mask, scale)
    with pytest.raises(RuntimeError, match="expected v of dtype float32 or float64"):
        masked_scale(v.int(), mask, scale.int())
    with pytest.raises(RuntimeError, match="expected mask of shape \\[N, C, S\\]"):
        masked_scale(v, mask[:, :2], scale)
    with pytest.raises(RuntimeError, match="expected mask of dtype bool or uint8"):
        masked_scale(v, mask.double(), scale)
    with pytest.raises(RuntimeError, match="expected scale of shape \\[C\\]"):
        masked_scale(v, mask, scale[:3])
    with pytest.raises(RuntimeError, match="expected scale of the dtype of v"):
        masked_scale(v, mask, scale.float())
    with pytest.raises(RuntimeError, match="expected mask and scale on the device of v"):
        masked_scale(v, mask, scale.to("meta"))


# 6. torch.compile smoke test
def test_compile():
    v, mask, scale = _case(2, 3, 4, 5, torch.float64, "cpu")
    fn = torch.compile(lambda a, m, b: masked_scale(a * 2, m, b), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(v, mask, scale), ref.masked_scale(2 * v, mask, scale))
