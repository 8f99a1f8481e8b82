"""collapse on models without forward(x, return_hidden=True): h_0..h_L from forward hooks on the
discovered residual blocks (issue 14), checked against an independent computation (plain forward
hooks on torchvision's BasicBlocks, global average pooling, NC metrics in numpy)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pytest
import torch
from torch import nn

from resgeom_fast.analysis import collapse
from resgeom_fast.analysis._hidden import block_representations
from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.models import FCResNet, resnet18 as rg_resnet18

torchvision = pytest.importorskip("torchvision")


def _tv_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3).double().eval()
    return model


def _images(n: int = 24, c: int = 3, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    x[:, 0] += 0.5 * y[:, None, None].double()  # class-dependent colour shift
    return x, y


def _hook_features(model: nn.Module, x: torch.Tensor, block_type: Optional[type] = None) -> list[np.ndarray]:
    """Independent of the package: plain hooks on every BasicBlock (torchvision's by default),
    GAP-pooled."""
    block_type = torchvision.models.resnet.BasicBlock if block_type is None else block_type
    blocks = [m for m in model.modules() if isinstance(m, block_type)]
    assert len(blocks) == 8
    got: list = [None] * (len(blocks) + 1)
    hs = [blocks[0].register_forward_pre_hook(lambda m, a: got.__setitem__(0, a[0].detach().clone()))]
    for i, b in enumerate(blocks):
        hs.append(b.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(i + 1, o.detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hs:
            h.remove()
    return [h.mean(dim=(2, 3)).numpy() for h in got]


def _numpy_metrics(h: np.ndarray, y: np.ndarray, c: int, eps: float) -> dict:
    """NC1 = Tr(Sigma_W Sigma_B^+)/C with collapse's definitions (sample global mean, Sigma_B =
    M M^T / C, rank rule on the singular values of M), ETF error, equinorm, NCC mismatch."""
    n, d = h.shape
    mu = np.stack([h[y == k].mean(0) for k in range(c)])  # [C, D]
    mu_g = h.mean(0)
    m = (mu - mu_g).T  # [D, C]
    dev = h - mu[y]
    sigma_w = dev.T @ dev / n
    sigma_b = m @ m.T / c
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    nn_ = max(d, c)
    h_rms = math.sqrt((h ** 2).sum(1).mean())
    tol = max(s.max() * nn_ * eps, math.sqrt(c * nn_) * eps * h_rms)
    keep = s > tol
    uk, sk = u[:, keep], s[keep]
    pinv_b = uk @ np.diag(c / sk ** 2) @ uk.T  # Sigma_B^+ on the kept directions
    nc1 = float(np.trace(sigma_w @ pinv_b) / c)
    gram = m.T @ m
    etf = (np.eye(c) - 1.0 / c) / math.sqrt(c - 1)
    etf_error = float(np.linalg.norm(gram / np.linalg.norm(gram) - etf))
    norms = np.linalg.norm(m, axis=0)
    equinorm = float(norms.std(ddof=1) / norms.mean())
    dist = ((h[:, None, :] - mu[None]) ** 2).sum(-1)
    ncc = float((dist.argmin(1) != y).mean())
    return {"nc1": nc1, "etf_error": etf_error, "equinorm": equinorm, "ncc_mismatch": ncc,
            "rank": int(keep.sum()), "sigma_b": sigma_b, "sigma_w": sigma_w, "m": m}


def test_collapse_torchvision_resnet18_matches_numpy_on_hook_features() -> None:
    model = _tv_resnet18()
    x, y = _images()
    res = collapse(model, (x, y))
    assert res.layers == list(range(9))
    assert res.widths == [64, 64, 64, 128, 128, 256, 256, 512, 512]  # per stage: GAP over H, W
    assert res.num_classes == 3 and res.num_samples == 24
    feats = _hook_features(model, x)
    yn = y.numpy()
    eps = float(torch.finfo(torch.float64).eps)
    checked = 0
    for l, h in enumerate(feats):
        want = _numpy_metrics(h, yn, 3, eps)
        assert res.rank_sigma_b[l] == want["rank"]
        if want["rank"] == 2:  # defined and full rank: also a plain numpy pinv agrees
            pinv = np.linalg.pinv(want["sigma_b"], rcond=1e-10, hermitian=True)
            assert np.trace(want["sigma_w"] @ pinv) / 3 == pytest.approx(want["nc1"], rel=1e-7)
            checked += 1
        assert res.nc1[l] == pytest.approx(want["nc1"], rel=1e-9), l
        assert res.etf_error[l] == pytest.approx(want["etf_error"], rel=1e-9, abs=1e-12), l
        assert res.equinorm[l] == pytest.approx(want["equinorm"], rel=1e-9, abs=1e-12), l
        assert res.ncc_mismatch[l] == want["ncc_mismatch"], l
    assert checked >= 5
    # NC3 against fc (logits = fc(GAP(h_L)))
    w = model.fc.weight.detach().numpy()
    m = _numpy_metrics(feats[-1], yn, 3, eps)["m"]
    want_nc3 = float(np.linalg.norm(w / np.linalg.norm(w) - m.T / np.linalg.norm(m)))
    assert res.nc3 == pytest.approx(want_nc3, rel=1e-9)
    # hooks removed, modes restored
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())
    assert not model.training


def test_collapse_torchvision_resnet18_layers_and_batches() -> None:
    """A list of batches gives the same numbers as one batch (streaming), layers selects."""
    model = _tv_resnet18()
    x, y = _images()
    full = collapse(model, (x, y))
    part = collapse(model, [(x[:10], y[:10]), (x[10:], y[10:])], layers=[2, 8])
    assert part.layers == [2, 8]
    for k, l in enumerate([2, 8]):
        assert part.nc1[k] == pytest.approx(full.nc1[l], rel=1e-10)
        assert part.etf_error[k] == pytest.approx(full.etf_error[l], rel=1e-10)


def test_block_representations_fcresnet_equals_return_hidden() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 20)
    for hyper in (False, True):
        model = FCResNet(20, 32, 5, 4, hyper=hyper, seed=0).eval()
        with torch.no_grad():
            want = model(x, return_hidden=True)[1]
            got = block_representations(model, x)
        assert len(got) == len(want) == 6
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_block_representations_staged_resnet_equals_return_hidden() -> None:
    model = rg_resnet18(num_classes=3, seed=0).double().eval()
    x, _ = _images(n=4, size=16)
    with torch.no_grad():
        want = model(x, return_hidden=True)[1]
        got = block_representations(model, x)
    assert [tuple(h.shape) for h in got] == [tuple(h.shape) for h in want]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


class _Wrapped(nn.Module):
    """This package's FCResNet behind a forward without return_hidden."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def test_collapse_by_hooks_equals_collapse_by_return_hidden() -> None:
    torch.manual_seed(0)
    model = FCResNet(20, 32, 4, 3, seed=0).double().eval()
    x = torch.randn(30, 20, dtype=torch.float64)
    y = torch.arange(30) % 3
    a = collapse(model, (x, y))
    b = collapse(_Wrapped(model), (x, y))
    for k in ("nc1", "etf_error", "equinorm", "ncc_mismatch", "tr_sigma_w", "rank_sigma_b"):
        assert getattr(a, k) == getattr(b, k), k


def test_block_representations_errors() -> None:
    with pytest.raises(ValueError, match="no residual blocks"):
        block_representations(nn.Sequential(nn.Linear(3, 3)), torch.randn(2, 3))
    model = FCResNet(20, 32, 2, 3, seed=0).eval()

    class SkipsSecond(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m.blocks[0](self.m.stem(x))

    with pytest.raises(ArgumentValueError, match="not called"):
        block_representations(SkipsSecond(), torch.randn(2, 20))
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


def test_collapse_model_without_blocks_or_hidden_states() -> None:
    with pytest.raises(TypeError, match="return_hidden.*residual blocks"):
        collapse(nn.Sequential(nn.Linear(4, 3)), (torch.randn(6, 4), torch.arange(6) % 3))


def test_collapse_timm_resnet18_matches_numpy_on_hook_features() -> None:
    timm = pytest.importorskip("timm")
    from timm.models.resnet import BasicBlock

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3).double().eval()
    x, y = _images()
    res = collapse(model, (x, y))
    assert res.widths == [64, 64, 64, 128, 128, 256, 256, 512, 512]
    feats = _hook_features(model, x, BasicBlock)
    eps = float(torch.finfo(torch.float64).eps)
    for l in (0, 3, 8):
        want = _numpy_metrics(feats[l], y.numpy(), 3, eps)
        assert res.rank_sigma_b[l] == want["rank"] == 2
        assert res.nc1[l] == pytest.approx(want["nc1"], rel=1e-9), l
        assert res.etf_error[l] == pytest.approx(want["etf_error"], rel=1e-9), l
    w = model.fc.weight.detach().numpy()
    m = _numpy_metrics(feats[-1], y.numpy(), 3, eps)["m"]
    assert res.nc3 == pytest.approx(float(np.linalg.norm(w / np.linalg.norm(w) - m.T / np.linalg.norm(m))), rel=1e-9)
