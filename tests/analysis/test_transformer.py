"""Transformer residual streams: the sublayers of a torchvision / timm ViT as residual blocks.

- residual Jacobians of each sublayer (attention, MLP) acting on the whole token sequence
  (D = S x W) against dense jacrev of the sublayer map written out here from the model's own
  modules; RA3 singular values against dense SVD; RA1 trajectories against plain hooks;
- vit_b_16 (random weights, 32x32 images): residual_alignment runs, and J V of sublayers matches
  torch.func.jvp of the written-out sublayer map;
- collapse of the class token / mean token against numpy metrics on hook features;
- the Hessian (and GGN, hessian_spectrum) of models whose attention calls
  F.scaled_dot_product_attention (torchvision's MHA, timm's Attention) against torch.func.hessian
  on a parameter subset, in float64.

Independent ground truth: sublayer maps, hook points and reference metrics are written here from
torch / numpy; reference derivatives are taken under torch's own math SDPA backend (the fused
CPU kernel has neither double backward nor forward-mode AD).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from resgeom_fast import operators
from resgeom_fast.analysis import collapse, residual_alignment, trajectory_metrics
from resgeom_fast.analysis.spectrum import hessian_spectrum
from resgeom_fast.core.blocks import mark_residual_sublayers, residual_blocks
from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.operators import residual_jacobians
from tests.analysis._vit import _Math, _stream

tv = pytest.importorskip("torchvision")

S, W, C = 5, 32, 4  # tokens (4 patches + class token at 32x32, patch 16), width, classes


def _vit(layers: int = 3, hidden: int = W, mlp: int = 64, classes: int = C, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=layers, num_heads=2,
                                        hidden_dim=hidden, mlp_dim=mlp, num_classes=classes)
        with torch.no_grad():  # non-trivial norms and head (torchvision zero-inits the head)
            for mod in m.modules():
                if isinstance(mod, nn.LayerNorm):
                    mod.weight.normal_(1.0, 0.2)
                    mod.bias.normal_(0.0, 0.1)
            m.heads.head.weight.normal_(0.0, 0.3)
    return m.double().eval()


def _timm_vit(**kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **kw)
        with torch.no_grad():
            m.head.weight.normal_(0.0, 0.3)
    return m.double().eval()


def _images(n: int, seed: int = 1, classes: int = C) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=g, dtype=torch.float64)
    y = torch.arange(n) % classes
    return x, y


def _branch_maps(enc: nn.Module) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """The two residual branches of a torchvision EncoderBlock, written from its forward:
    attention h -> dropout(attn(ln_1(h))), MLP x -> mlp(ln_2(x)); h [n, S, W]."""
    def attn(h: Tensor) -> Tensor:
        z = enc.ln_1(h)
        return enc.dropout(enc.self_attention(z, z, z, need_weights=False)[0])

    def mlp(x: Tensor) -> Tensor:
        return enc.mlp(enc.ln_2(x))
    return attn, mlp


@pytest.fixture(scope="module")
def vit_case():
    model = _vit()
    x, y = _images(3)
    encs = list(model.encoder.layers)
    hs = _stream(model, x, encs, [e.ln_2 for e in encs])
    maps = [f for e in encs for f in _branch_maps(e)]
    dense = []
    with _Math():
        for l, f in enumerate(maps):
            dense.append(torch.stack([torch.func.jacrev(lambda z: f(z[None])[0])(hs[l][b]).reshape(S * W, S * W)
                                      for b in range(x.shape[0])]))
    return model, x, y, hs, maps, dense


def test_sublayer_jacobians_act_on_the_token_sequence(vit_case):
    model, x, _, hs, maps, dense = vit_case
    infos = residual_blocks(model)
    assert [i.sublayer for i in infos] == ["attention", "mlp"] * 3
    ops = residual_jacobians(model, x)
    eye = torch.eye(S * W, dtype=torch.float64)
    errs = []
    for l, (op, J) in enumerate(zip(ops, dense)):
        assert op.shape == (S * W, S * W) and op.in_shape == (S, W) and torch.equal(op.h, hs[l])
        assert op.path == "generic"
        got = op.matmat(eye.expand(x.shape[0], -1, -1))
        got_t = op.T.matmat(eye.expand(x.shape[0], -1, -1))
        scale = J.abs().max().item()
        assert scale > 1e-2
        errs.append(max((got - J).abs().max().item(), (got_t - J.transpose(1, 2)).abs().max().item()) / scale)
        # the block module computes the sublayer map: J + I is its jacrev
        with _Math():
            full = torch.func.jacrev(lambda z: infos[l].block(z[None])[0])(hs[l][0]).reshape(S * W, S * W)
        assert torch.allclose(full, J[0] + eye, rtol=0, atol=1e-12 * scale)
        # the model's next state is h + F(h) at the capture points
        assert torch.allclose(hs[l + 1], hs[l] + maps[l](hs[l]), rtol=0, atol=1e-12)
    print(f"max relative |J - jacrev| over 6 sublayers: {max(errs):.2e}")
    assert max(errs) <= 1e-12
    # attention mixes tokens (off-diagonal token blocks), the MLP acts per token (block diagonal)
    blocks = [J[0].reshape(S, W, S, W) for J in dense]
    off = lambda B: max(B[i, :, j].abs().max().item() for i in range(S) for j in range(S) if i != j)  # noqa: E731
    assert off(blocks[0]) > 1e-3 and off(blocks[1]) == 0.0


def test_alignment_on_a_vit_matches_dense_svd_and_hooks(vit_case):
    model, x, y, hs, _, dense = vit_case
    res = residual_alignment(model, x, k=4, y=y, tol=1e-8, max_iters=100)
    assert res.num_classes == C and "heads.head" in res.num_classes_source
    (st,) = res.stages
    assert st.shape == (S, W) and st.dim == S * W and st.num_blocks == 6
    assert st.block_names == [f"encoder.layers.encoder_layer_{i}:{s}" for i in range(3) for s in ("attention", "mlp")]
    sv = torch.stack([torch.linalg.svdvals(J)[:, :4] for J in dense])        # [L, N, 4]
    rel = ((st.singular_values_mean - sv.mean(1)).abs() / sv.mean(1)).max().item()
    print(f"max relative |sigma_r - dense svd| (mean over samples): {rel:.2e}")
    assert rel <= 1e-7
    assert torch.allclose(st.sigma1_mean, sv[:, :, 0].mean(1), rtol=1e-7, atol=0)
    assert torch.allclose(st.singular_values_std, sv.std(1, unbiased=False), rtol=1e-6, atol=1e-9)
    # RA1: trajectories h_0..h_6 of the token stream, read by plain hooks
    want = trajectory_metrics(torch.stack(hs, 1))
    for key in ("linearity", "equispacing", "step_cosine"):
        assert torch.allclose(getattr(st, key), want[key], rtol=1e-12, atol=1e-14), key


def test_alignment_on_a_timm_vit_block():
    model = _timm_vit(depth=2, embed_dim=16, num_heads=2, init_values=0.5, num_classes=3)
    x, _ = _images(2)
    res = residual_alignment(model, x, k=3)
    (st,) = res.stages
    assert st.shape == (S, 16) and st.num_blocks == 4
    blk = model.blocks[1]
    hs = _stream(model, x, list(model.blocks), [b.norm2 for b in model.blocks])
    # the MLP sublayer of block 1: ls2(mlp(norm2(x))), dense Jacobian of the first sample
    J = torch.func.jacrev(lambda z: blk.ls2(blk.mlp(blk.norm2(z[None])))[0])(hs[3][0]).reshape(S * 16, S * 16)
    assert st.singular_values_mean[3, 0].item() != pytest.approx(0.0)
    (op,) = residual_jacobians(model, x, blocks=[3])
    assert torch.allclose(op.matmat(torch.eye(S * 16, dtype=torch.float64)[None].expand(2, -1, -1))[0], J,
                          rtol=0, atol=1e-12)


@pytest.mark.slow  # builds the 86M-parameter vit_b_16 in float64 (~10 s on a loaded 2-core machine)
def test_vit_b_16_alignment_and_jacobian_products():
    """vit_b_16 at 32x32 (random weights): 24 sublayers, D = 5 tokens x 768; J V of an attention
    and an MLP sublayer against torch.func.jvp of the written-out branch."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tv.models.vit_b_16(image_size=32)
    model = model.double().eval()
    x, _ = _images(2)
    infos = residual_blocks(model)
    assert len(infos) == 24
    with pytest.warns(RuntimeWarning, match="did not reach"):  # one fixed power iteration: not converged
        res = residual_alignment(model, x, k=2, oversample=2, power_iters=1, blocks=list(range(6)))
    (st,) = res.stages
    assert st.dim == 5 * 768 and st.num_blocks == 6 and bool(torch.isfinite(st.sigma1_mean).all())
    encs = list(model.encoder.layers)
    hs = _stream(model, x, encs[:2], [e.ln_2 for e in encs[:2]])
    g = torch.Generator().manual_seed(3)
    for l in (2, 3):                                  # encoder layer 1: attention, MLP
        f = _branch_maps(encs[1])[l - 2]
        (op,) = residual_jacobians(model, x, blocks=[l])
        assert torch.equal(op.h, hs[l])
        V = torch.randn(2, 5 * 768, 3, generator=g, dtype=torch.float64)
        got = op.matmat(V)
        with _Math():
            want = torch.stack([torch.stack([torch.func.jvp(f, (hs[l][b:b + 1],), (V[b, :, j].reshape(1, 5, 768),))[1]
                                             .reshape(-1) for j in range(3)], 1) for b in range(2)])
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"vit_b_16 sublayer {infos[l].name}: relative |J V - jvp| = {err:.2e}")
        assert err <= 1e-12


# -- collapse on tokens -----------------------------------------------------------------------------
def _numpy_collapse(h: np.ndarray, y: np.ndarray, c: int, eps: float) -> dict:
    """NC1 (sample global mean, Sigma_B = M M^T / C, pseudo-inverse on the singular directions of M
    above the rank rule), ETF error, equinorm, NCC mismatch; None where no direction is resolved."""
    n, d = h.shape
    mu = np.stack([h[y == k].mean(0) for k in range(c)])
    m = (mu - h.mean(0)).T
    dev = h - mu[y]
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    nn_ = max(d, c)
    tol = max(s.max() * nn_ * eps, math.sqrt(c * nn_) * eps * math.sqrt((h ** 2).sum(1).mean()))
    keep = s > tol
    dist = ((h[:, None, :] - mu[None]) ** 2).sum(-1)
    out = {"rank": int(keep.sum()), "ncc_mismatch": float((dist.argmin(1) != y).mean())}
    if not keep.any():
        return {**out, "nc1": None, "etf_error": None, "equinorm": None}
    uk = u[:, keep]
    pinv_b = uk @ np.diag(c / s[keep] ** 2) @ uk.T
    out["nc1"] = float(np.trace(dev.T @ dev / n @ pinv_b) / c)
    gram = m.T @ m
    etf = (np.eye(c) - 1.0 / c) / math.sqrt(c - 1)
    out["etf_error"] = float(np.linalg.norm(gram / np.linalg.norm(gram) - etf))
    norms = np.linalg.norm(m, axis=0)
    out["equinorm"] = float(norms.std(ddof=1) / norms.mean())
    return out


@pytest.mark.parametrize("tokens", ["auto", "cls", "mean"])
def test_collapse_of_class_and_mean_token_matches_numpy(tokens):
    model = _vit(layers=2)
    x, y = _images(24, seed=5)
    res = collapse(model, [(x[:12], y[:12]), (x[12:], y[12:])], tokens=tokens)
    want_tokens = "mean" if tokens == "mean" else "cls"
    assert res.tokens == want_tokens and res.to_dict()["tokens"] == want_tokens
    assert res.layers == list(range(5)) and res.widths == [W] * 5 and res.num_classes == C
    encs = list(model.encoder.layers)
    hs = _stream(model, x, encs, [e.ln_2 for e in encs])
    eps = float(torch.finfo(torch.float64).eps)
    defined = 0
    for l, h in enumerate(hs):
        feat = (h[:, 0] if want_tokens == "cls" else h.mean(1)).numpy()
        want = _numpy_collapse(feat, y.numpy(), C, eps)
        assert res.rank_sigma_b[l] == want["rank"], l
        assert res.ncc_mismatch[l] == want["ncc_mismatch"], l
        for key in ("nc1", "etf_error", "equinorm"):
            if want[key] is None:
                assert getattr(res, key)[l] is None and res.nc1_note[l], (l, key)
            else:
                assert getattr(res, key)[l] == pytest.approx(want[key], rel=1e-9, abs=1e-13), (l, key)
                defined += 1
    if want_tokens == "cls":
        # h_0's class token is class_token + pos_embedding[0] for every image: no class structure
        assert res.nc1[0] is None and "coincide" in res.nc1_note[0]
        assert defined == 3 * 4
    else:
        assert defined == 3 * 5


def test_collapse_tokens_argument_is_checked_and_required_without_a_class_token():
    model = _timm_vit(depth=1, embed_dim=16, num_heads=2, num_classes=3, class_token=False, global_pool="avg")
    x, y = _images(9, classes=3)
    with pytest.raises(ValueError, match=r"tokens='cls' .* or tokens='mean'"):
        collapse(model, (x, y))
    res = collapse(model, (x, y), tokens="mean")
    assert res.tokens == "mean" and res.widths == [16] * 3
    with pytest.raises(ArgumentValueError, match=r"collapse: expected tokens one of \['auto', 'cls', 'mean'\]"):
        collapse(_vit(layers=1), (x, y), tokens="first")
    # a conv net keeps tokens None (no token sequences)
    rn = tv.models.resnet18(num_classes=3).double().eval()
    assert collapse(rn, (x[:6], y[:6]), layers=[8]).tokens is None


# -- Hessian through scaled-dot-product attention -------------------------------------------------------
def _sdpa_calls(model: nn.Module, x: Tensor) -> int:
    """How many times a forward pass (with grad, as the Hessian's) calls F.scaled_dot_product_attention."""
    calls = []
    orig = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "scaled_dot_product_attention", counting)
        model(x)
    return len(calls)


def _dense_hessian(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> Tensor:
    params = dict(model.named_parameters())
    primals = tuple(params[n].detach() for n in names)

    def loss(*ps: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y)

    with _Math():
        H = torch.func.hessian(loss, argnums=tuple(range(len(names))))(*primals)
    sizes = [p.numel() for p in primals]
    return torch.cat([torch.cat([H[i][j].reshape(sizes[i], sizes[j]) for j in range(len(names))], 1)
                      for i in range(len(names))], 0)


def _sdpa_flags() -> tuple:
    b = torch.backends.cuda
    return (torch.backends.mha.get_fastpath_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(),
            b.math_sdp_enabled(), b.cudnn_sdp_enabled())


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_hessian_through_scaled_dot_product_attention(family):
    if family == "torchvision":
        model = _vit(layers=1, hidden=4, mlp=8, classes=3)
        sub = "encoder.layers.encoder_layer_0"
        names = [f"{sub}.ln_1.weight", f"{sub}.self_attention.in_proj_weight", f"{sub}.self_attention.out_proj.bias"]
    else:
        model = _timm_vit(depth=1, embed_dim=4, num_heads=2, num_classes=3)
        names = ["blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias"]
    x, y = _images(4, classes=3)
    assert _sdpa_calls(model, x) == 1  # the model's attention is F.scaled_dot_product_attention
    H = _dense_hessian(model, names, x, y)
    P = H.shape[0]
    assert P == 4 + 3 * 16 + 4 and torch.allclose(H, H.T, atol=1e-12)
    flags = _sdpa_flags()
    eye = torch.eye(P, dtype=torch.float64)
    for hvp in ("double_backward", "forward_over_reverse"):
        op = operators.hessian(model, nn.CrossEntropyLoss(), (x, y), params=names, hvp=hvp)
        got = op.matmat(eye)
        err = ((got - H).abs().max() / H.abs().max()).item()
        print(f"{family} {hvp}: relative |H - torch.func.hessian| = {err:.2e}")
        assert err <= 1e-10
        assert _sdpa_flags() == flags  # torch's settings are restored after every product


def test_block_hessians_ggn_and_spectrum_of_a_vit_sublayer():
    model = _vit(layers=1, hidden=4, mlp=8, classes=3)
    x, y = _images(4, classes=3)
    infos = residual_blocks(model)
    ce = nn.CrossEntropyLoss()
    attn, mlp = operators.block_hessians(model, ce, (x, y), hvp="double_backward")
    sub = "encoder.layers.encoder_layer_0"
    assert all(n.startswith((f"{sub}.ln_1.", f"{sub}.self_attention.")) for n in attn.param_names)
    assert all(n.startswith((f"{sub}.ln_2.", f"{sub}.mlp.")) for n in mlp.param_names)
    want = {n for n, p in model.named_parameters() if any(p is q for q in infos[1].block.parameters())}
    assert set(mlp.param_names) == want
    H = _dense_hessian(model, list(attn.param_names), x, y)
    got = attn.matmat(torch.eye(attn.shape[0], dtype=torch.float64))
    assert ((got - H).abs().max() / H.abs().max()).item() <= 1e-10
    # GGN of the attention sublayer's parameters: J^T H_out J with dense jacrev under the math kernel
    names = list(attn.param_names)
    params = dict(model.named_parameters())
    primals = tuple(params[n].detach() for n in names)
    with _Math():
        jac = torch.func.jacrev(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)),
                                argnums=tuple(range(len(names))))(*primals)
    J = torch.cat([j.reshape(4 * 3, -1) for j in jac], 1)                        # [N*C, P]
    with torch.no_grad():
        p = model(x).softmax(-1)
    h_out = torch.block_diag(*[(torch.diag(p[i]) - torch.outer(p[i], p[i])) / 4 for i in range(4)])
    G = J.T @ h_out @ J
    for hvp in ("double_backward", "forward_over_reverse"):
        g = operators.ggn(model, ce, (x, y), params=names, hvp=hvp).matmat(torch.eye(len(G), dtype=torch.float64))
        assert ((g - G).abs().max() / G.abs().max()).item() <= 1e-10, hvp
    # hessian_spectrum runs through the attention (fused by default) and finds the dense extremes
    with pytest.warns(UserWarning, match="not resolved by steps"):   # a short SLQ: the density is not the point
        sp = hessian_spectrum(model, ce, (x, y), params=names, k=2, probes=2, steps=20, trace_probes=3,
                              deterministic=True)
    ev = torch.linalg.eigvalsh(H)
    assert sp.eigenvalues[-1].item() == pytest.approx(ev[-1].item(), rel=1e-6)
    assert sp.eigenvalues[0].item() == pytest.approx(ev[0].item(), rel=1e-6, abs=1e-8 * ev.abs().max().item())


# -- a user's pre-LN transformer block, its sublayers marked ------------------------------------------
class _SelfAttention(nn.Module):
    """Multi-head self-attention by F.scaled_dot_product_attention (as timm / most user code)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        n, s, w = h.shape
        q, k, v = self.qkv(h).reshape(n, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, s, w))


class _PreLN(nn.Module):
    def __init__(self, width: int = 6, heads: int = 2) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(width), _SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        mark_residual_sublayers(self, [("attention", nn.Sequential(self.norm1, self.attn)),
                                       ("mlp", nn.Sequential(self.norm2, self.mlp))], between=[self.norm2])

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp(self.norm2(h))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.blocks = nn.Sequential(_PreLN(), _PreLN())
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:            # x [N, S = 3, 4]
        return self.head(self.blocks(self.embed(x)).mean(1))


def test_marked_pre_ln_sublayers_jacobians_and_hessian():
    torch.manual_seed(0)
    model = _Tiny().double().eval()
    x = torch.randn(3, 3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    infos = residual_blocks(model)
    assert [(i.name, i.kind) for i in infos] == [(f"blocks.{b}:{s}", "marked") for b in range(2)
                                                 for s in ("attention", "mlp")]
    blk = model.blocks[1]
    # plain hooks: block 1's input and the norm2 input (the state between its sublayers)
    got = {}
    hs = [blk.register_forward_pre_hook(lambda m, a: got.setdefault("in", a[0].detach().clone())),
          blk.norm2.register_forward_pre_hook(lambda m, a: got.setdefault("mid", a[0].detach().clone()))]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    ops = residual_jacobians(model, x, blocks=[2, 3])
    assert torch.equal(ops[0].h, got["in"]) and torch.equal(ops[1].h, got["mid"])
    maps = [lambda z: blk.attn(blk.norm1(z)), lambda z: blk.mlp(blk.norm2(z))]
    eye = torch.eye(18, dtype=torch.float64)
    for op, f in zip(ops, maps):
        with _Math():
            J = torch.stack([torch.func.jacrev(lambda z: f(z[None])[0])(op.h[b]).reshape(18, 18) for b in range(3)])
        assert torch.allclose(op.matmat(eye.expand(3, -1, -1)), J, rtol=0, atol=1e-12 * J.abs().max().item())
    assert _sdpa_calls(model, x) == 2
    (H_op,) = operators.block_hessians(model, nn.CrossEntropyLoss(), (x, y), blocks=[2], hvp="forward_over_reverse")
    assert set(H_op.param_names) == {f"blocks.1.{n}" for n in ("norm1.weight", "norm1.bias", "attn.qkv.weight",
                                                                "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias")}
    H = _dense_hessian(model, list(H_op.param_names), x, y)
    got_h = H_op.matmat(torch.eye(H.shape[0], dtype=torch.float64))
    assert ((got_h - H).abs().max() / H.abs().max()).item() <= 1e-10


def test_mark_residual_sublayers_checks_its_arguments():
    m = _PreLN()
    with pytest.raises(ArgumentValueError, match=r"mark_residual_sublayers: expected between of length 1"):
        mark_residual_sublayers(m, [("a", m.attn), ("b", m.mlp)], between=[])
    with pytest.raises(ArgumentValueError, match="distinct names"):
        mark_residual_sublayers(m, [("a", m.attn), ("a", m.mlp)], between=[m.norm2])
    with pytest.raises(TypeError, match=r"mark_residual_sublayers: expected sublayers\[0\]"):
        mark_residual_sublayers(m, [m.attn], between=[])
