"""Every analysis on torchvision's vit_b_16 (random weights, 32x32 images: 4 patches + the class
token, D = 5 x 768 per sublayer), each against an independent computation written here from plain
hooks, numpy / float64 and torch.func (issue 14's "Must show"; residual_alignment and the sublayer
Jacobians are in test_transformer.py):

- collapse of the class token: Tr Sigma_W, equinorm, ETF error and the NCC mismatch of every
  layer h_0..h_24 against numpy on the class tokens read by hooks;
- singularities of the last MLP's GELU (3072 units, observations = images x tokens): dead units
  by the GELU rule, activation cosines, covariance eigenvalues (participation ratio, effective
  rank) against numpy on the hooked outputs;
- path_expansion over the first four sublayers (attention, MLP, attention, MLP): orders 0 and 1
  and the all-order total against jvp of the written-out sublayer maps (math attention kernel);
- hessian_spectrum over the final LayerNorm's weight and the head's bias (772 parameters): the
  extreme eigenvalues and the trace against the dense torch.func.hessian of the tail of the net
  (final LayerNorm, class token, head) on the hooked h_24.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resgeom_fast.analysis import collapse, hessian_spectrum, path_expansion, singularities
from tests.analysis._vit import _Math, _stream

tv = pytest.importorskip("torchvision")

C, N = 4, 8
pytestmark = pytest.mark.slow   # the 86M-parameter model in float64 (~15 s in all on this 2-core machine)


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tv.models.vit_b_16(image_size=32, num_classes=C)
        # the head is zero-initialised by torchvision: draw it, so the loss depends on the features
        nn.init.normal_(model.heads.head.weight, std=0.05)
        nn.init.normal_(model.heads.head.bias, std=0.05)
    yield model.double().eval()
    torch.set_num_threads(threads)


def _data(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(N) % C
    x = torch.randn(N, 3, 32, 32, generator=g, dtype=torch.float64)
    x[:, 0] += 0.7 * y[:, None, None].double()
    return x, y


def test_collapse_of_the_class_token_matches_numpy(vit):
    x, y = _data()
    r = collapse(vit, (x, y), num_classes=C)          # tokens="auto": the class token (vit has class_token)
    assert r.tokens == "cls" and r.layers == list(range(25)) and r.widths == [768] * 25
    yy = y.numpy()
    for l, h in enumerate(_stream(vit, x, list(vit.encoder.layers), [e.ln_2 for e in vit.encoder.layers])):
        H = h[:, 0].numpy()                           # the class token [N, 768]
        mu = np.stack([H[yy == c].mean(0) for c in range(C)])
        muG = H.mean(0)
        within = ((H - mu[yy]) ** 2).sum(1).mean()
        M = mu - muG
        norms = np.linalg.norm(M, axis=1)
        d = ((H[:, None, :] - mu[None]) ** 2).sum(-1)
        mismatch = float((d.argmin(1) != yy).mean())
        assert r.tr_sigma_w[l] == pytest.approx(within, rel=1e-9, abs=1e-12)
        assert r.ncc_mismatch[l] == pytest.approx(mismatch, abs=0)
        if l == 0:   # h_0's class token is one vector for every input: M = 0, NC1 / ETF / equinorm undefined
            assert r.nc1[0] is None and r.equinorm[0] is None and r.etf_error[0] is None
            continue
        G = M @ M.T
        etf = np.linalg.norm(G / np.linalg.norm(G) - (np.eye(C) - 1.0 / C) / math.sqrt(C - 1))
        assert r.equinorm[l] == pytest.approx(norms.std(ddof=1) / norms.mean(), rel=1e-9)
        assert r.etf_error[l] == pytest.approx(etf, rel=1e-9, abs=1e-12)


def test_singularities_of_the_last_mlp_gelu_match_numpy(vit):
    x, y = _data()
    name = "encoder.layers.encoder_layer_11.mlp.1"
    r = singularities(vit, (x, y), layers=[name])
    (lay,) = r.layers
    assert lay.activation == "GELU" and lay.n_units == 3072 and lay.observations == N * 5
    assert lay.weight_name == "encoder.layers.encoder_layer_11.mlp.0" and lay.unit_dim in (-1, 2)
    got: list[Tensor] = []
    mod = dict(vit.named_modules())[name]
    hk = mod.register_forward_hook(lambda m, a, o: got.append(torch.stack([a[0].detach(), o.detach()])))
    try:
        with torch.no_grad():
            vit(x)
    finally:
        hk.remove()
    z, out = (t.reshape(-1, 3072).numpy() for t in got[0])         # pre-activation, output [40, 3072]
    # GELU derivative Phi(z) + z phi(z): dead = |GELU| and |GELU'| <= 1e-6 at every observation
    phi = np.exp(-0.5 * z ** 2) / math.sqrt(2 * math.pi)
    Phi = 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    dead = ((np.abs(out) <= 1e-6) & (np.abs(Phi + z * phi) <= 1e-6)).all(0)
    assert lay.dead_fraction == pytest.approx(dead.mean(), abs=0)
    Zc = out - out.mean(0)
    mu = np.clip(np.linalg.eigvalsh(Zc @ Zc.T / out.shape[0])[::-1], 0, None)  # the non-zero spectrum of C
    pr = mu.sum() ** 2 / (mu ** 2).sum()
    p = mu[mu > 0] / mu.sum()
    assert lay.participation_ratio == pytest.approx(pr, rel=1e-8)
    assert lay.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-8)
    torch.testing.assert_close(lay.cov_eigenvalues[:30], torch.from_numpy(mu[:30].copy()), rtol=1e-8,
                               atol=1e-10 * float(mu[0]))
    G = out.T @ out
    live = np.diag(G) > 0
    cos = G[np.ix_(live, live)] / np.sqrt(np.outer(np.diag(G)[live], np.diag(G)[live]))
    off = np.abs(cos[~np.eye(cos.shape[0], dtype=bool)])
    assert lay.act_cos_max == pytest.approx(off.max(), rel=1e-9)
    assert lay.act_cos_mean == pytest.approx(off.mean(), rel=1e-9)


def test_path_expansion_over_four_sublayers_matches_jvp(vit):
    x, _ = _data()
    x = x[:2]
    hs = _stream(vit, x, list(vit.encoder.layers), [e.ln_2 for e in vit.encoder.layers])
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, 5, 768, generator=g, dtype=torch.float64)
    r = path_expansion(vit, x, v=v, blocks=[0, 1, 2, 3])
    assert r.num_blocks == 4 and r.max_order == 4 and r.posts == ["Identity"] * 4
    encs = list(vit.encoder.layers)

    def attn(enc: nn.Module):
        def f(h: Tensor) -> Tensor:
            z = enc.ln_1(h)
            return enc.self_attention(z, z, z, need_weights=False)[0]
        return f

    def mlp(enc: nn.Module):
        return lambda h: enc.mlp(enc.ln_2(h))
    branches = [attn(encs[0]), mlp(encs[0]), attn(encs[1]), mlp(encs[1])]

    def stack(h: Tensor) -> Tensor:
        for f in branches:
            h = h + f(h)
        return h
    with _Math(), torch.no_grad():
        total = torch.stack([torch.func.jvp(stack, (hs[0][b:b + 1],), (v[b:b + 1],))[1] for b in range(2)])
        order1 = sum(torch.stack([torch.func.jvp(f, (hs[l][b:b + 1],), (v[b:b + 1],))[1] for b in range(2)])
                     for l, f in enumerate(branches))
    norms = r.norms                                          # [N, P, M + 1]
    torch.testing.assert_close(norms[:, 0, 0], v.reshape(2, -1).norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(norms[:, 0, 1], order1.reshape(2, -1).norm(dim=1), rtol=1e-9, atol=0)
    assert r.total_norm_mean == pytest.approx(float(total.reshape(2, -1).norm(dim=1).mean()), rel=1e-9)


def test_hessian_spectrum_of_the_tail_parameters_matches_dense(vit):
    x, y = _data()
    names = ["encoder.ln.weight", "heads.head.bias"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hessian_spectrum: .* mass fraction", category=UserWarning)
        r = hessian_spectrum(vit, F.cross_entropy, (x, y), params=names, k=4, probes=2, steps=30, trace_probes=30,
                             seed=0)
    h24 = _stream(vit, x, list(vit.encoder.layers), [e.ln_2 for e in vit.encoder.layers])[-1]
    params = dict(vit.named_parameters())
    p0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss(p: Tensor) -> Tensor:
        w, b = p.split(sizes)
        z = F.layer_norm(h24, (768,), w, vit.encoder.ln.bias.detach(), vit.encoder.ln.eps)[:, 0]
        return F.cross_entropy(F.linear(z, vit.heads.head.weight.detach(), b), y)
    H = torch.func.hessian(loss)(p0)
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    scale = float(ev.abs().max())
    assert r.dim == H.shape[0] == 772
    torch.testing.assert_close(r.eigenvalues[:2], ev[:2], atol=1e-8 * scale, rtol=0)
    torch.testing.assert_close(r.eigenvalues[2:], ev[-2:], atol=1e-8 * scale, rtol=0)
    assert abs(r.trace - float(ev.sum())) <= 5 * r.trace_stderr
