"""path_expansion on any discovered residual stack (issue 14): post-activations linearised into
the block map, shape-changing blocks, plain runs.

Ground truth, independent of the recursion's code: for one sample, the dense Jacobians of each
block's branch, skip and post (torch.func.jacrev, float64) are combined by the recursion
``C_l^(m) = P_l (Q_l C_{l-1}^(m) + lam_l J_l C_{l-1}^(m-1))`` with dense matrices (C_0^(0) = I),
so that every order c_L^(m) = C_L^(m) v is compared, not only the total; the total and
sum_m C_L^(m) are compared with jacrev of the composed blocks h_0 -> h_L. The big torchvision
nets (resnet50 family) compare the total with a JVP of the composed blocks.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import jacfwd, jacrev, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from resgeom_fast.analysis import expansion
from resgeom_fast.analysis.expansion import _path_coefficients, path_expansion, plain_runs
from resgeom_fast.models import FCResNet, ResidualBlock
from resgeom_fast.operators import mark_residual_block, residual_blocks
from tests.helpers import randomise_batchnorm

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

D64 = torch.float64


# -- helpers -------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (restored after): float64 depthwise convolutions (MobileNetV2, ConvNeXt)
    on a loaded 2-core machine ran 20x slower with 2 threads (measured: 2 s vs 60 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prepare(model: nn.Module, seed: int = 0) -> nn.Module:
    """float64, eval mode, in-place activations off (jacrev of the reference), random BN statistics
    and affine parameters (random-weight BN at init is the identity in eval mode)."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return randomise_batchnorm(model, gen, mean=0.3, dtype=D64)


def images(n: int, size: int, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=D64)


def input_of(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The first positional input of ``module`` in ``model(x)`` (a plain forward pre-hook)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen[0]


def _jac(f, z: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian of f at one sample z [1, *shape] -> [numel(f(z)), numel(z)] (jacrev, or
    jacfwd when f has more outputs than inputs)."""
    with torch.no_grad():
        d_out = f(z).numel()
    out = (jacfwd if d_out > z.numel() else jacrev)(f)(z)
    return out.reshape(math.prod(out.shape[:out.dim() - z.dim()]), z.numel()).detach()


def dense_reference(infos, h0: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """For one sample h0 [1, *in_shape]: the dense path-order matrices C_L^(m) [D_L, D_0]
    (m = 0..L) and jacrev of the composed blocks [D_L, D_0]."""
    h = h0
    Cs = [torch.eye(h0.numel(), dtype=D64)]
    for info in infos:
        lam = float(info.scale)
        Jb = _jac(info.branch, h)
        Jq = torch.eye(h.numel(), dtype=D64) if isinstance(info.skip, nn.Identity) else _jac(info.skip, h)
        with torch.no_grad():
            z = info.skip(h) + lam * info.branch(h)
        Jp = torch.eye(z.numel(), dtype=D64) if isinstance(info.post, nn.Identity) else _jac(info.post, z)
        new = [Jp @ (Jq @ C) for C in Cs] + [torch.zeros(Jp.shape[0], h0.numel(), dtype=D64)]
        for m, C in enumerate(Cs):
            new[m + 1] = new[m + 1] + lam * (Jp @ (Jb @ C))
        Cs = new
        with torch.no_grad():
            h = info.block(h)

    def stack(u: torch.Tensor) -> torch.Tensor:
        for info in infos:
            u = info.block(u)
        return u

    return Cs, _jac(stack, h0)


def check_against_dense(model: nn.Module, x: torch.Tensor, h0: torch.Tensor, blocks=None,
                        samples: int = 2) -> None:
    """Every order c_L^(m), the total and sum_m c_L^(m) of path_expansion's recursion against
    :func:`dense_reference`, for the first ``samples`` samples (float64)."""
    n = x.shape[0]
    v = torch.randn(n, *h0.shape[1:], generator=torch.Generator().manual_seed(7), dtype=D64)
    orders, total, c0, infos = _path_coefficients("t", model, x, None, v=v, blocks=blocks, num_probes=1, seed=0)
    torch.testing.assert_close(c0[:, :, 0], v.reshape(n, -1))
    L = len(infos)
    assert len(orders) == L + 1
    for b in range(min(samples, n)):
        with sdpa_kernel(SDPBackend.MATH):     # the reference's own choice: jacrev through attention
            Cs, J = dense_reference(infos, h0[b:b + 1])
        vb = v[b].reshape(-1)
        scale = float((J @ vb).norm())
        assert scale > 0
        for m in range(L + 1):
            want = Cs[m] @ vb
            got = torch.zeros_like(want) if orders[m] is None else orders[m][b, :, 0]
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10 * scale, msg=f"order {m}, sample {b}")
        torch.testing.assert_close(sum(Cs), J, rtol=1e-9, atol=1e-10 * float(J.abs().max()))
        torch.testing.assert_close(total[b, :, 0], J @ vb, rtol=1e-9, atol=1e-10 * scale)
        # not a vacuous comparison: the paths through a branch carry weight
        assert sum(float((Cs[m] @ vb).norm()) for m in range(1, L + 1)) > 1e-3 * scale


# -- a hand-written staged ResNet ------------------------------------------------------------------
class ConvPost(nn.Module):
    """A post that is not elementwise: z -> tanh(conv1x1(z)) (mixes channels)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(z))


def branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                         nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))


class StagedResNet(nn.Module):
    """stem -> stage 1 (2 blocks, 4 ch) -> stage 2 (downsampling block 4 -> 8 ch, stride 2, conv + BN
    skip; one more block) -> pool -> head. Every block: post(skip(h) + lam branch(h))."""

    def __init__(self, post: str = "relu", lam: float = 0.7) -> None:
        super().__init__()

        def p(c: int) -> nn.Module:
            return {"relu": nn.ReLU(), "silu": nn.SiLU(), "conv": ConvPost(c)}[post]

        self.stem = nn.Conv2d(3, 4, 3, 1, 1)
        down = nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8))
        self.blocks = nn.Sequential(
            ResidualBlock(branch(4, 4, 1), nn.Identity(), lam, post=p(4)),
            ResidualBlock(branch(4, 4, 1), nn.Identity(), lam, post=p(4)),
            ResidualBlock(branch(4, 8, 2), down, lam, post=p(8)),
            ResidualBlock(branch(8, 8, 1), nn.Identity(), lam, post=p(8)),
        )
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("post", ["relu", "silu", "conv"])
def test_staged_resnet_every_order_against_dense(post: str) -> None:
    torch.manual_seed(0)
    model = prepare(StagedResNet(post))
    x = images(3, 6)
    h0 = input_of(model, model.blocks[0], x)
    check_against_dense(model, x, h0, samples=3)
    res = path_expansion(model, x, num_probes=2)
    assert (res.in_shape, res.out_shape) == ([4, 6, 6], [8, 3, 3])
    assert res.posts == [{"relu": "ReLU", "silu": "SiLU", "conv": "ConvPost"}[post]] * 4
    assert res.skips == ["Identity", "Identity", "Sequential", "Identity"]
    assert res.tail_norm_mean < 1e-12 * res.total_norm_mean
    assert plain_runs(model, x) == [[0, 1, 2, 3]]
    # a run inside the stack, starting at the downsampling block
    check_against_dense(model, x, input_of(model, model.blocks[2], x), blocks=[2, 3])


def test_skip_and_post_jvps_chunked_over_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """One sample per chunk of the skip / post JVPs gives the same coefficients as one chunk."""
    model = prepare(StagedResNet("conv"))
    x = images(3, 6)
    ref, tot, _, _ = _path_coefficients("t", model, x, None, v=None, blocks=None, num_probes=2, seed=0)
    monkeypatch.setattr(expansion, "_JVP_CHUNK_BYTES", 1)
    got, tot1, _, _ = _path_coefficients("t", model, x, None, v=None, blocks=None, num_probes=2, seed=0)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(tot, tot1, rtol=1e-13, atol=1e-14)


def test_order_zero_is_the_gated_skip_path() -> None:
    """With ReLU posts order 0 is P_L Q_L ... P_1 Q_1 v: with identity skips, v masked by the
    units on after every block (the product of the masks), not v."""
    model = prepare(StagedResNet("relu"))
    x = images(2, 6)
    v = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3), dtype=D64)
    orders, _, _, _ = _path_coefficients("t", model, x, None, v=v, blocks=[0, 1], num_probes=1, seed=0)
    hs = [input_of(model, model.blocks[i], x) for i in (1, 2)]       # h_1, h_2 = post outputs
    mask = (hs[0] > 0) & (hs[1] > 0)
    torch.testing.assert_close(orders[0][:, :, 0], (v * mask).reshape(2, -1), rtol=0, atol=0)
    assert not torch.equal(mask, torch.ones_like(mask))


def test_dead_probe_is_undefined_not_nan() -> None:
    """A post that switches every unit off maps every probe to 0: p_m is undefined (None + note)."""
    model = prepare(StagedResNet("relu"))
    with torch.no_grad():
        model.blocks[3].branch[4].bias.fill_(-1e3)       # z_4 < 0 everywhere: P_4 = 0
    res = path_expansion(model, images(2, 6), num_probes=2)
    assert res.num_undefined == 4 and "undefined" in res.note
    assert res.total_norm_mean == 0.0 and res.to_dict()["mean_order"] is None
    assert all(v is None for v in res.to_dict()["distribution"])
    assert math.isnan(res.summary()["mode_order"]) and math.isnan(res.summary()["mean_order"])
    json.dumps(res.to_dict(), allow_nan=False)


def test_block_that_is_not_its_decomposition_is_refused() -> None:
    class Odd(ResidualBlock):
        def forward(self, h):
            return 2.0 * super().forward(h)
    d = 5
    blocks = nn.Sequential(*[Odd(nn.Sequential(nn.Linear(d, d)), nn.Identity()) for _ in range(2)]).double()
    with pytest.raises(ValueError, match=r"path_expansion: block '0' \(resgeom\) does not compute "
                                         r"post\(skip\(h\) \+ scale \* branch\(h\)\)"):
        path_expansion(blocks, torch.randn(3, d, dtype=D64))


# -- torchvision / timm ResNets -----------------------------------------------------------------
def check_total_jvp(model: nn.Module, x: torch.Tensor, h0: torch.Tensor, blocks=None) -> None:
    """The recursion's total and its sum over orders against a JVP of the composed blocks (all samples)."""
    n = x.shape[0]
    v = torch.randn(h0.shape, generator=torch.Generator().manual_seed(8), dtype=D64)
    orders, total, _, infos = _path_coefficients("t", model, x, None, v=v, blocks=blocks, num_probes=1, seed=0)

    def composed(u):
        for info in infos:
            u = info.block(u)
        return u
    with torch.no_grad():
        jv = jvp(composed, (h0,), (v,))[1].reshape(n, -1)
    scale = float(jv.norm(dim=1).min())
    assert scale > 0
    torch.testing.assert_close(total[:, :, 0], jv, rtol=1e-10, atol=1e-11 * scale)
    torch.testing.assert_close(sum(o for o in orders if o is not None)[:, :, 0], jv, rtol=1e-10, atol=1e-11 * scale)


def test_torchvision_resnet18_against_dense() -> None:
    """The whole net (8 blocks, one plain run): total against the JVP of the composed blocks;
    every order against dense Jacobians over layer2 + layer3 (two downsampling blocks; layer4's
    512-channel Jacobians would triple the test's time)."""
    model = prepare(torchvision.models.resnet18(num_classes=4))
    x = images(2, 16)
    assert plain_runs(model, x) == [list(range(8))]
    check_total_jvp(model, x, input_of(model, model.layer1[0], x))
    res = path_expansion(model, x)
    assert (res.in_shape, res.out_shape) == ([64, 4, 4], [512, 1, 1]) and res.num_blocks == 8
    assert res.posts == ["ReLU"] * 8 and res.skips.count("Sequential") == 3
    assert residual_blocks(model)[2].name == "layer2.0"
    check_against_dense(model, x, input_of(model, model.layer2[0], x), blocks=[2, 3, 4, 5], samples=2)


def test_timm_resnet18_against_dense() -> None:
    model = prepare(timm.create_model("resnet18", num_classes=4))
    x = images(2, 16)
    assert plain_runs(model, x) == [list(range(8))]
    check_total_jvp(model, x, input_of(model, model.layer1[0], x))
    assert residual_blocks(model)[2].kind == "timm_basic"
    check_against_dense(model, x, input_of(model, model.layer2[0], x), blocks=[2, 3], samples=1)


@pytest.mark.parametrize("name", ["resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_big_resnets_stage_total_is_the_jvp_of_the_composed_blocks(name: str) -> None:
    """layer4 (its downsampling block and two more) at 32x32 inputs: the sum over orders and the
    recursion's total against a JVP of the composed blocks; the model is float32 up to layer3,
    the stage float64."""
    torch.manual_seed(0)
    full = getattr(torchvision.models, name)(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    h = input_of(full, full.layer4, x).double()                         # [2, 1024, 2, 2]
    stage = prepare(full.layer4)
    del full
    assert [i.name for i in residual_blocks(stage)] == ["0", "1", "2"]
    check_total_jvp(stage, h, h)
    res = path_expansion(stage, h, num_probes=2)
    assert (res.in_shape, res.out_shape) == ([1024, 2, 2], [2048, 1, 1])
    assert res.skips[0] == "Sequential" and res.posts == ["ReLU"] * 3


# -- MobileNetV2, ConvNeXt, ViT ----------------------------------------------------------------------
def test_mobilenet_v2_plain_runs_and_a_run_against_dense() -> None:
    model = prepare(torchvision.models.mobilenet_v2(num_classes=4))
    x = images(2, 16)
    infos = residual_blocks(model)
    runs = plain_runs(model, x)
    assert [[infos[i].name for i in r] for r in runs] == [
        ["features.3"], ["features.5", "features.6"], ["features.8", "features.9", "features.10"],
        ["features.12", "features.13"], ["features.15", "features.16"]]
    with pytest.raises(ValueError, match=r"path_expansion: the output of block 'features.3' is not the input of "
                                         r"block 'features.5'.*breaks between 'features.3' -> 'features.5', "
                                         r"'features.6' -> 'features.8', 'features.10' -> 'features.12', "
                                         r"'features.13' -> 'features.15'.*"
                                         r"blocks=\[\[0\], \[1, 2\], \[3, 4, 5\], \[6, 7\], \[8, 9\]\]"):
        path_expansion(model, x)
    run = runs[2]
    check_against_dense(model, x, input_of(model, infos[run[0]].block, x), blocks=run)
    res = path_expansion(model, x, blocks=runs[1])
    assert res.block_names == ["features.5", "features.6"] and res.posts == ["Identity"] * 2


def test_convnext_tiny_stage_run_against_dense() -> None:
    """The last stage (3 CNBlocks, 768 channels at 1x1 for 32x32 inputs); layer scales drawn at
    O(1) (1e-6 at init would leave only order 0)."""
    full = torchvision.models.convnext_tiny(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    runs = plain_runs(full, x)
    assert [len(r) for r in runs] == [3, 3, 9, 3]
    h = input_of(full, full.features[7], x).double()
    stage = prepare(full.features[7])
    del full
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for blk in stage:
            blk.layer_scale.copy_(0.3 + 0.4 * torch.rand(blk.layer_scale.shape, generator=gen, dtype=D64))
    check_against_dense(stage, h, h, samples=1)


def test_small_vit_blocks_against_dense() -> None:
    """A small torchvision ViT over all its residual blocks (the attention and MLP sublayers of
    its 2 encoder blocks; the token sequence: D = 5 x 16)."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3)
    model = prepare(model)
    x = images(2, 32)
    h0 = input_of(model, model.encoder.layers[0], x)                    # [2, 5, 16]
    infos = residual_blocks(model)
    assert len(infos) == 4
    assert plain_runs(model, x) == [[0, 1, 2, 3]]
    check_against_dense(model, x, h0)
    res = path_expansion(model, x)
    assert res.in_shape == res.out_shape == [5, 16]


class MLPSublayer(nn.Module):
    """x -> x + mlp(ln(x)): a post that is a whole residual sublayer."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(w)
        self.mlp = nn.Sequential(nn.Linear(w, 2 * w), nn.GELU(), nn.Linear(2 * w, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


class Attention(nn.Module):
    """softmax(q k^T / sqrt(w)) v of ln(h), written out (no fused kernel)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(w)
        self.qkv = nn.Linear(w, 3 * w)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.ln(h)).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


class PreLNBlock(nn.Module):
    """A user's transformer block declared as one residual block with post = the MLP sublayer."""

    def __init__(self, w: int, lam: float) -> None:
        super().__init__()
        self.attn, self.post, self.lam = Attention(w), MLPSublayer(w), lam
        mark_residual_block(self, branch=self.attn, scale=lam, post=self.post)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.post(h + self.lam * self.attn(h))


def test_transformer_blocks_with_a_sublayer_post_against_dense() -> None:
    """post = x + mlp(ln(x)) (not elementwise, not a mask): every order against dense jacrev."""
    torch.manual_seed(0)
    model = prepare(nn.Sequential(*[PreLNBlock(6, 0.8) for _ in range(3)]))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1), dtype=D64)   # [N, S, W]
    check_against_dense(model, x, x)
    assert path_expansion(model, x).posts == ["MLPSublayer"] * 3


def test_plain_runs_errors() -> None:
    hyper = FCResNet(10, 8, 3, 4, hyper=True, seed=0).double().eval()
    x = torch.randn(3, 10, dtype=D64)
    with pytest.raises(ValueError, match="plain_runs: the model is a hyper-residual net"):
        plain_runs(hyper, x)
    plain = FCResNet(10, 8, 3, 4, seed=0).double().eval()
    assert plain_runs(plain, x) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="plain_runs: expected x of dtype torch.float64"):
        plain_runs(plain, x.float())
    with pytest.raises(TypeError, match="plain_runs: expected x a torch.Tensor"):
        plain_runs(plain, x.numpy())
    with pytest.raises(ValueError, match="residual_blocks: found no residual blocks"):
        plain_runs(nn.Linear(10, 3).double(), x)


class MHABranch(nn.Module):
    """nn.MultiheadAttention as self-attention (the fused kernel / native fast path by default)."""

    def __init__(self, w: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(w, 2, batch_first=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn(h, h, h, need_weights=False)[0]


class MHAPost(MHABranch):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class MHABlock(nn.Module):
    def __init__(self, w: int) -> None:
        super().__init__()
        self.f, self.post = MHABranch(w), MHAPost(w)
        mark_residual_block(self, branch=self.f, scale=0.5, post=self.post)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.post(h + 0.5 * self.f(h))


def test_multihead_attention_branch_and_post_against_dense() -> None:
    """nn.MultiheadAttention in the branch and in the post: forward-mode AD (no derivative in the
    fused kernels / MHA's fast path) runs on the math kernel, and matches dense jacrev."""
    torch.manual_seed(0)
    model = prepare(nn.Sequential(MHABlock(6), MHABlock(6)))
    x = torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(1), dtype=D64)
    check_against_dense(model, x, x)
