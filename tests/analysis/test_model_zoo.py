"""residual_alignment, hessian_spectrum and collapse on the third-party model zoo (issue 14):
torchvision resnet18 / resnet50 / wide_resnet50_2 / resnext50_32x4d / mobilenet_v2 / convnext_tiny
and timm resnet18, random weights (BatchNorm statistics and ConvNeXt layer scales randomised, as in
tests/core/test_block_kinds.py, so that no branch is hidden), float64, eval mode, tiny inputs.

Every analysis is checked against a computation independent of the package:

- alignment: the singular values of one block per model against a dense float64 SVD of the
  jacrev Jacobian of that block's branch, written out here from the library's own modules (not
  the package's block decomposition), within the result's own error bound; the RA1 trajectory
  metrics against numpy on block inputs / outputs captured with plain forward hooks;
- Hessian: the extreme eigenvalues (both ends) and the trace of the Hessian restricted to a small
  parameter subset (the last normalisation layer's weight and the head) against the dense
  ``torch.func.hessian`` of the loss in those parameters; one run over all 11.2M parameters of
  resnet18 with a few Lanczos steps (finite numbers, honest convergence flags); the per-block
  operators (``per_block=True``) on a ConvNeXt and a MobileNetV2 block against torch.func products;
  a float32 resnet18 within its results' own bounds of the float64 truth;
- collapse: NC1 / ETF / equinorm / NCC / rank per layer and NC3 against numpy on GAP-pooled hook
  features (resnet18 and timm resnet18 are covered by test_collapse_any_model.py).

Inputs: 16x16 images for the ResNets (layer3 of the bottleneck nets at 1x1: D = 1024 for the dense
check), 32x32 for MobileNetV2 and ConvNeXt (ConvNeXt's last downsampling needs it).
"""
from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from resgeom_fast.analysis import collapse, hessian_spectrum, residual_alignment
from resgeom_fast.operators import block_hessians, residual_blocks
from tests.analysis._trained import one_thread
from tests.helpers import randomise_batchnorm

tv = pytest.importorskip("torchvision")

F64 = torch.float64
C = 3  # classes of every model's head
LOSS = nn.functional.cross_entropy


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small problems: one thread is faster than contended many (restored after the module)."""
    with one_thread():
        yield


# -- the zoo -----------------------------------------------------------------------------------------
def _basic_branch(b: nn.Module) -> Callable[[Tensor], Tensor]:
    """torchvision BasicBlock: out = relu(branch(z) + skip(z))."""
    return lambda z: b.bn2(b.conv2(b.relu(b.bn1(b.conv1(z)))))


def _timm_basic_branch(b: nn.Module) -> Callable[[Tensor], Tensor]:
    """timm BasicBlock (no SE, no drop path): conv1, bn1, drop_block, act1, aa, conv2, bn2."""
    return lambda z: b.bn2(b.conv2(b.aa(b.act1(b.drop_block(b.bn1(b.conv1(z)))))))


def _bottleneck_branch(b: nn.Module) -> Callable[[Tensor], Tensor]:
    return lambda z: b.bn3(b.conv3(b.relu(b.bn2(b.conv2(b.relu(b.bn1(b.conv1(z))))))))


def _inverted_residual_branch(b: nn.Module) -> Callable[[Tensor], Tensor]:
    """MobileNetV2 InvertedResidual with use_res_connect: out = z + conv(z)."""
    return lambda z: b.conv(z)


def _cnblock_branch(b: nn.Module) -> Callable[[Tensor], Tensor]:
    """ConvNeXt CNBlock (eval: stochastic depth is the identity): out = z + layer_scale * block(z)."""
    return lambda z: b.layer_scale * b.block(z)


def _is_tv_basic(m: nn.Module) -> bool:
    return isinstance(m, tv.models.resnet.BasicBlock)


def _is_tv_bottleneck(m: nn.Module) -> bool:
    return isinstance(m, tv.models.resnet.Bottleneck)


def _is_inverted_residual(m: nn.Module) -> bool:
    return isinstance(m, tv.models.mobilenetv2.InvertedResidual) and m.use_res_connect


def _is_cnblock(m: nn.Module) -> bool:
    return isinstance(m, tv.models.convnext.CNBlock)


@dataclass
class Zoo:
    """How each model is built and what is checked on it.

    build: a constructor (C classes). size: input image size. is_block: recognises the model's
    residual blocks (used for the hook features, independently of the package's discovery).
    branch: the branch function of one block. align_blocks: the blocks given to
    residual_alignment (None: all); stages: the stage names it must form; dense_block: the block
    whose Jacobian is checked dense; ra1_stage: a stage of >= 2 blocks whose RA1 metrics are
    recomputed. hessian_params: the parameter subset of the dense Hessian check. fc: the model
    has a torchvision / timm ``fc`` head on GAP(h_L) (NC3 defined). post: the map after the sum.
    n_align: images given to residual_alignment (1 where the dense Jacobian is the costly part).
    """

    build: Callable[[], nn.Module]
    size: int
    is_block: Callable[[nn.Module], bool]
    branch: Callable[[nn.Module], Callable[[Tensor], Tensor]]
    align_blocks: Optional[list[str]]
    stages: list[list[str]]
    dense_block: str
    ra1_stage: int
    hessian_params: list[str]
    fc: bool
    post: Callable[[Tensor], Tensor] = torch.relu
    n_align: int = 2


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(tv.models, name)(num_classes=C)


def _timm_resnet18() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet18", pretrained=False, num_classes=C)


def _is_timm_basic(m: nn.Module) -> bool:
    return type(m).__name__ == "BasicBlock" and type(m).__module__ == "timm.models.resnet"


_BOTTLENECK = dict(size=16, is_block=_is_tv_bottleneck, branch=_bottleneck_branch,
                   align_blocks=["layer3.0", "layer3.4", "layer3.5"], stages=[["layer3.4", "layer3.5"]],
                   dense_block="layer3.5", ra1_stage=0, hessian_params=["layer4.2.bn3.weight", "fc.bias"], fc=True)

ZOO: dict[str, Zoo] = {
    # resnet18: every block; the Hessian subset includes fc.weight (an indefinite Hessian: the
    # cross terms d^2 L / d gamma d W are not Gauss-Newton terms)
    "resnet18": Zoo(_tv("resnet18"), 16, _is_tv_basic, _basic_branch, None,
                    [["layer1.0", "layer1.1"], ["layer2.1"], ["layer3.1"], ["layer4.1"]], "layer4.1", 0,
                    ["layer4.1.bn2.weight", "fc.weight", "fc.bias"], True),
    "resnet50": Zoo(_tv("resnet50"), **_BOTTLENECK),
    "wide_resnet50_2": Zoo(_tv("wide_resnet50_2"), **_BOTTLENECK, n_align=1),
    "resnext50_32x4d": Zoo(_tv("resnext50_32x4d"), **_BOTTLENECK),
    "mobilenet_v2": Zoo(_tv("mobilenet_v2"), 32, _is_inverted_residual, _inverted_residual_branch,
                        ["features.8", "features.9", "features.10", "features.15", "features.16"],
                        [["features.8", "features.9", "features.10"], ["features.15", "features.16"]], "features.16", 0,
                        ["features.18.1.weight", "classifier.1.bias"], False, nn.Identity()),
    "convnext_tiny": Zoo(_tv("convnext_tiny"), 32, _is_cnblock, _cnblock_branch, ["features.7.1", "features.7.2"],
                         [["features.7.1", "features.7.2"]], "features.7.2", 0,
                         ["classifier.0.weight", "classifier.2.bias"], False, nn.Identity(), n_align=1),
    "timm_resnet18": Zoo(_timm_resnet18, 16, _is_timm_basic, _timm_basic_branch, ["layer1.0", "layer1.1", "layer4.1"],
                         [["layer1.0", "layer1.1"], ["layer4.1"]], "layer4.1", 0,
                         ["layer4.1.bn2.weight", "fc.bias"], True),
}


@pytest.fixture(scope="module")
def zoo():
    """name -> the model (float64, eval, randomised BN statistics / layer scales), built once."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = ZOO[name].build()
            randomise_batchnorm(model, torch.Generator().manual_seed(0), layer_scale=True)
            cache[name] = model.double().eval()
        return cache[name]
    return get


def _images(n: int, size: int, seed: int = 1) -> tuple[Tensor, Tensor]:
    """n images [n, 3, size, size] float64 with a class-dependent colour shift, labels n % C."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % C
    x = torch.randn(n, 3, size, size, generator=g, dtype=F64)
    x[:, 0] += 0.5 * y[:, None, None].double()
    return x, y


def _hook_io(model: nn.Module, x: Tensor, modules: list[nn.Module]) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs and outputs of ``modules`` in one no-grad forward pass (plain hooks, removed after)."""
    ins: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    handles = []
    for i, m in enumerate(modules):
        handles.append(m.register_forward_pre_hook(lambda mod, a, i=i: ins.setdefault(i, a[0].detach().clone())))
        handles.append(m.register_forward_hook(lambda mod, a, o, i=i: outs.setdefault(i, o.detach().clone())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [ins[i] for i in range(len(modules))], [outs[i] for i in range(len(modules))]


# -- residual_alignment ------------------------------------------------------------------------------
def _ra1_numpy(traj: np.ndarray) -> dict[str, np.ndarray]:
    """RA1 per trajectory [N, L+1, D] in numpy: linearity s_1^2 / sum s^2 of the centred points,
    equispacing std / mean of the step norms (population std), mean cosine of consecutive steps."""
    lin, eq, cos = [], [], []
    for t in traj:
        s = np.linalg.svd(t - t.mean(0), compute_uv=False)
        lin.append(s[0] ** 2 / (s ** 2).sum())
        steps = np.diff(t, axis=0)
        norms = np.linalg.norm(steps, axis=1)
        eq.append(norms.std() / norms.mean())
        cos.append(np.mean([steps[i] @ steps[i + 1] / (norms[i] * norms[i + 1]) for i in range(len(steps) - 1)]))
    return {"linearity": np.array(lin), "equispacing": np.array(eq), "step_cosine": np.array(cos)}


@pytest.mark.parametrize("name", list(ZOO))
def test_alignment_matches_dense_jacobian_and_hook_trajectories(zoo, name):
    z = ZOO[name]
    model = zoo(name)
    x, _ = _images(z.n_align, z.size, seed=2)
    blocks = None if z.align_blocks is None else [model.get_submodule(b) for b in z.align_blocks]
    k = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an unconverged randomized SVD would warn
        res = residual_alignment(model, x, k=k, per_stage=True, blocks=blocks)
    assert [st.block_names for st in res.stages] == z.stages
    in_stage = {n for st in z.stages for n in st}
    want_skipped = [n for n, m in model.named_modules() if z.is_block(m) and n not in in_stage
                    and (z.align_blocks is None or n in z.align_blocks)]
    assert [s["name"] for s in res.skipped_blocks] == want_skipped  # the shape-changing blocks
    assert res.num_classes == C and res.accuracy()["all_converged"]

    # RA3 / RA4: singular values of one block against the dense SVD of its branch's jacrev Jacobian
    s_idx = next(i for i, st in enumerate(res.stages) if z.dense_block in st.block_names)
    st = res.stages[s_idx]
    pos = st.block_names.index(z.dense_block)
    block = model.get_submodule(z.dense_block)
    (h,), (out,) = _hook_io(model, x, [block])
    branch = z.branch(block)
    with torch.no_grad():  # the branch written here is the block's: out = post(h + branch(h)) (identity skip)
        assert float((z.post(h + branch(h)) - out).abs().max()) <= 1e-12 * float(out.abs().max())
    dense = []
    for b in range(x.shape[0]):
        J = torch.func.jacrev(lambda v: branch(v[None])[0])(h[b]).reshape(h[b].numel(), h[b].numel())
        dense.append(torch.linalg.svdvals(J.detach())[:k])
    S = torch.stack(dense)                                               # [N, k] float64
    got = st.singular_values_mean[pos]
    rel_bound = float(st.svd_max_rel_error_bound[pos])
    abs_bound = float(st.svd_max_error_bound_sigma1[pos])
    assert 0 < rel_bound <= 1e-3 and 0 < abs_bound <= 1e-3  # converged to tol (the default 1e-3)
    err = (got - S.mean(0)).abs()
    # every triplet is resolved (s_r > tau s_1, tau = 1e-2), so per sample |s_r - sigma_r| <= b_r <= rel_bound * s_r
    # and <= abs_bound * s_1; averaged over the samples the same bounds hold for the means
    assert bool((S[:, -1] > 2e-2 * S[:, 0]).all())
    allowed = torch.minimum(rel_bound * got, abs_bound * got[0].expand_as(got)) + 1e-12 * float(S.max())
    print(f"{name} {z.dense_block}: max |sigma_r - dense| / sigma_r = {float((err / S.mean(0)).max()):.2e} "
          f"(bound {rel_bound:.1e}); D = {h[0].numel()}")
    assert bool((err <= allowed).all()), (got, S.mean(0), allowed)
    assert float(st.sigma1_mean[pos]) == pytest.approx(float(got[0]))
    assert float(S[:, 0].max()) > 1e-2  # a branch that matters

    # RA1: trajectory metrics of a stage of >= 2 blocks from plain hooks on its blocks
    st = res.stages[z.ra1_stage]
    mods = [model.get_submodule(n) for n in st.block_names]
    ins, outs = _hook_io(model, x, mods)
    traj = torch.stack(ins + [outs[-1]], 1).flatten(2).numpy()          # [N, L+1, D]
    want = _ra1_numpy(traj)
    for key, ref in want.items():
        np.testing.assert_allclose(getattr(st, key).numpy(), ref, rtol=1e-9, atol=1e-12, err_msg=key)
    summary = st.summary()
    assert summary["linearity"] == pytest.approx(float(want["linearity"].mean()), rel=1e-9)


# -- hessian_spectrum ---------------------------------------------------------------------------------
def _dense_hessian(model: nn.Module, names: list[str], x: Tensor, y: Tensor) -> Tensor:
    """torch.func.hessian of the mean cross-entropy in the parameters ``names`` (the others fixed),
    [P, P] float64, P in the order of ``names``."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    sub = tuple(params[n] for n in names)

    def f(*ps: Tensor) -> Tensor:
        return LOSS(functional_call(model, {**params, **dict(zip(names, ps))}, (x,)), y)

    blocks = torch.func.hessian(f, argnums=tuple(range(len(sub))))(*sub)
    return torch.cat([torch.cat([blocks[i][j].reshape(sub[i].numel(), sub[j].numel()) for j in range(len(sub))], 1)
                      for i in range(len(sub))], 0)


@pytest.mark.parametrize("name", list(ZOO))
def test_hessian_spectrum_on_a_parameter_subset_matches_dense(zoo, name):
    z = ZOO[name]
    model = zoo(name)
    x, y = _images(6, z.size, seed=3)
    names = z.hessian_params
    # params in model.named_parameters() order (the operator's vector space)
    order = [n for n, _ in model.named_parameters() if n in names]
    assert order == names
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hessian_spectrum: .* mass fraction", category=UserWarning)
        r = hessian_spectrum(model, LOSS, (x, y), params=names, k=4, probes=2, steps=20, trace_probes=60, seed=0)
    H = _dense_hessian(model, names, x, y)
    assert float((H - H.T).abs().max()) <= 1e-12 * float(H.abs().max())
    ev = torch.linalg.eigvalsh(0.5 * (H + H.T))
    scale = float(ev.abs().max())
    assert r.param_names == names and r.dim == H.shape[0]
    # k = 4: two from each end, ascending
    torch.testing.assert_close(r.eigenvalues[:2], ev[:2], atol=1e-8 * scale, rtol=0)
    torch.testing.assert_close(r.eigenvalues[2:], ev[-2:], atol=1e-8 * scale, rtol=0)
    assert r.converged and bool((r.residuals <= 1e-6 * scale).all())
    tr = float(ev.sum())
    z_score = abs(r.trace - tr) / r.trace_stderr if r.trace_stderr > 0 else 0.0
    print(f"{name}: P = {r.dim}, lambda = [{float(ev[0]):.3e}, {float(ev[-1]):.3e}], trace {r.trace:.6f} vs "
          f"dense {tr:.6f} ({z_score:.2f} stderr), {r.lanczos_steps} Lanczos steps")
    assert abs(r.trace - tr) <= 5 * r.trace_stderr   # probe stderr and the rounding floor
    if name == "resnet18":  # fc.weight in the subset: a genuinely indefinite Hessian, both ends non-trivial
        assert ev[0] < -1e-5 * scale  # (-0.11 against lambda_max 113: far above rounding)


def test_hessian_spectrum_all_parameters_resnet18_few_steps(zoo):
    """Every parameter of resnet18 (11.2M): a few Lanczos steps run, the numbers are finite and
    the flags say what is not converged / resolved."""
    model = zoo("resnet18")
    x, y = _images(2, 16, seed=4)
    P = sum(p.numel() for p in model.parameters())
    with pytest.warns(UserWarning, match="not resolved by steps=3"):
        r = hessian_spectrum(model, LOSS, (x, y), k=2, probes=1, steps=3, trace_probes=3, eig_steps=4,
                             grid_points=50, seed=0)
    assert r.dim == P > 11_000_000 and r.param_names == [n for n, _ in model.named_parameters()]
    assert r.lanczos_steps <= 4 and r.slq_steps == 3
    for t in (r.eigenvalues, r.residuals, r.nodes, r.weights, r.density):
        assert bool(torch.isfinite(t).all())
    assert math.isfinite(r.trace) and r.lambda_min <= r.lambda_max
    lam = float(r.eigenvalues.abs().max())
    # four Lanczos steps on an 11M-dimensional operator do not converge to eigsh's 1e-10: flagged
    assert not r.converged and float(r.residuals.max()) > 1e-10 * lam
    s = r.summary()
    for key in r.unresolved:
        sname = {"degenerate_rel": "degenerate_fraction_rel", "degenerate_abs": "degenerate_fraction_abs",
                 "negative": "negative_fraction", "significant_negative": "significant_negative_fraction"}[key]
        assert s[sname] is None and "unresolved" in s[f"{sname}_reason"]
        assert s[f"{sname}_lower"] <= s[f"{sname}_upper"]
    assert r.unresolved  # 3 steps cannot resolve a mass fraction of 11M eigenvalues


# -- collapse ------------------------------------------------------------------------------------------
COLLAPSE = ["resnet50", "wide_resnet50_2", "resnext50_32x4d", "mobilenet_v2", "convnext_tiny"]


def _numpy_metrics(h: np.ndarray, y: np.ndarray, c: int, eps: float) -> dict:
    """Collapse metrics in numpy with the explicit D x D matrices: Sigma_W, Sigma_B = M M^T / C
    (sample global mean), Sigma_B^+ from the SVD of M on the directions the documented rank rule
    keeps, NC1 = Tr(Sigma_W Sigma_B^+) / C (the trace of a product as the sum of an elementwise
    one: no D^3 product); ETF error, equinorm (Bessel std), NCC mismatch."""
    n, d = h.shape
    mu = np.stack([h[y == k].mean(0) for k in range(c)])  # [C, D]
    m = (mu - h.mean(0)).T                                # [D, C]
    dev = h - mu[y]
    sigma_w = dev.T @ dev / n
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    nn_ = max(d, c)
    tol = max(s.max() * nn_ * eps, math.sqrt(c * nn_) * eps * math.sqrt((h ** 2).sum(1).mean()))
    keep = s > tol
    pinv_b = (u[:, keep] * (c / s[keep] ** 2)) @ u[:, keep].T
    gram = m.T @ m
    etf = (np.eye(c) - 1.0 / c) / math.sqrt(c - 1)
    norms = np.linalg.norm(m, axis=0)
    dist = ((h[:, None, :] - mu[None]) ** 2).sum(-1)
    return {"nc1": float((sigma_w * pinv_b).sum() / c), "rank": int(keep.sum()), "tr_sigma_w": float(np.trace(sigma_w)),
            "etf_error": float(np.linalg.norm(gram / np.linalg.norm(gram) - etf)),
            "equinorm": float(norms.std(ddof=1) / norms.mean()), "ncc_mismatch": float((dist.argmin(1) != y).mean()),
            "m": m}


def _hook_features(model: nn.Module, x: Tensor, is_block: Callable[[nn.Module], bool]) -> list[np.ndarray]:
    """h_0 (the first block's input) and every block's output, GAP-pooled, from plain hooks."""
    blocks = [m for m in model.modules() if is_block(m)]
    ins, outs = _hook_io(model, x, blocks)
    return [h.mean(dim=(2, 3)).numpy() for h in [ins[0]] + outs]


@pytest.mark.parametrize("name", COLLAPSE)
def test_collapse_matches_numpy_on_hook_features(zoo, name):
    z = ZOO[name]
    model = zoo(name)
    x, y = _images(18, z.size, seed=5)
    res = collapse(model, (x, y))
    feats = _hook_features(model, x, z.is_block)
    assert res.layers == list(range(len(feats))) and res.widths == [f.shape[1] for f in feats]
    assert res.num_classes == C and res.num_samples == 18
    eps = float(torch.finfo(F64).eps)
    yn = y.numpy()
    for l, h in enumerate(feats):
        want = _numpy_metrics(h, yn, C, eps)
        assert res.rank_sigma_b[l] == want["rank"] == C - 1, l
        assert res.nc1[l] == pytest.approx(want["nc1"], rel=1e-9), l
        # the class-mean deviations m_c = mu_c - mu_G cancel: their rounding is ~eps sqrt(D) h_rms,
        # relative to min_c ||m_c|| (1.6e7 x h_rms at mobilenet_v2's block 10, where two float64
        # orders of summation give equinorms 2.6e-9 apart on an AMD EPYC)
        cond = eps * math.sqrt(h.shape[1]) * math.sqrt((h ** 2).sum(1).mean()) / np.linalg.norm(want["m"], axis=0).min()
        rel_m = max(1e-9, cond)
        assert res.etf_error[l] == pytest.approx(want["etf_error"], rel=rel_m, abs=1e-12), l
        assert res.equinorm[l] == pytest.approx(want["equinorm"], rel=rel_m, abs=1e-12), l
        assert res.ncc_mismatch[l] == want["ncc_mismatch"], l
        assert res.tr_sigma_w[l] == pytest.approx(want["tr_sigma_w"], rel=1e-9), l
    if z.fc:  # logits = fc(GAP(h_L)): NC3 against fc.weight
        w = model.fc.weight.detach().numpy()
        m = _numpy_metrics(feats[-1], yn, C, eps)["m"]
        assert res.nc3 == pytest.approx(float(np.linalg.norm(w / np.linalg.norm(w) - m.T / np.linalg.norm(m))),
                                        rel=1e-9)
    else:  # the head does not read GAP(h_L) directly (MobileNetV2: more layers; ConvNeXt: a LayerNorm)
        assert res.nc3 is None and res.nc3_note
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not model.training


def test_float32_resnet18_numbers_within_their_own_bounds(zoo):
    """A float32 copy of resnet18 (what users run): the alignment's singular values and the
    Hessian's extreme eigenvalues are within the bounds the results state (the randomized SVD's
    error bound, the Ritz residuals) of the float64 dense truth."""
    z = ZOO["resnet18"]
    m64 = zoo("resnet18")
    m32 = copy.deepcopy(m64).float()
    x, _ = _images(2, z.size, seed=2)
    res = residual_alignment(m32, x.float(), k=4, per_stage=True, blocks=[m32.get_submodule(z.dense_block)])
    st = res.stages[0]
    block = m64.get_submodule(z.dense_block)
    (h,), _ = _hook_io(m64, x, [block])
    branch = z.branch(block)
    S = torch.stack([torch.linalg.svdvals(torch.func.jacrev(lambda v: branch(v[None])[0])(h[b]).reshape(
        h[b].numel(), h[b].numel()).detach())[:4] for b in range(2)])
    got, rel_bound = st.singular_values_mean[0], float(st.svd_max_rel_error_bound[0])
    assert bool((S[:, -1] > 2e-2 * S[:, 0]).all()) and 0 < rel_bound <= 1e-3
    assert bool(((got - S.mean(0)).abs() <= rel_bound * got).all()), (got, S.mean(0), rel_bound)

    x6, y6 = _images(6, z.size, seed=3)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="hessian_spectrum: .* mass fraction", category=UserWarning)
        r = hessian_spectrum(m32, LOSS, (x6.float(), y6), params=z.hessian_params, k=4, probes=2, steps=20,
                             trace_probes=60, seed=0)
    ev = torch.linalg.eigvalsh(_dense_hessian(m64, z.hessian_params, x6, y6))
    want = torch.cat([ev[:2], ev[-2:]])
    # a Ritz pair with residual r has an eigenvalue within r; these extreme ones are separated, so it is theirs
    assert r.converged and bool(((r.eigenvalues - want).abs() <= r.residuals + 1e-6 * float(ev.abs().max())).all())
    assert abs(r.trace - float(ev.sum())) <= 5 * r.trace_stderr + 1e-5 * abs(float(ev.sum()))


@pytest.mark.parametrize("name,block", [("convnext_tiny", "features.7.2"), ("mobilenet_v2", "features.16")])
def test_block_hessian_products_match_torch_func(zoo, name, block):
    """The per-block operators of ``hessian_spectrum(per_block=True)`` on a discovered block (its
    own parameters, ConvNeXt's layer scale included): products against torch.func's
    forward-over-reverse Hessian-vector products in the block's parameters."""
    model = zoo(name)
    x, y = _images(2, ZOO[name].size, seed=4)
    infos = residual_blocks(model)
    (op,) = block_hessians(model, LOSS, (x, y), [next(i for i in infos if i.name == block)])
    names = [n for n, _ in model.named_parameters() if n.startswith(block + ".")]
    assert list(op.param_names) == names
    params = {n: p.detach() for n, p in model.named_parameters()}
    sub = tuple(params[n] for n in names)

    def f(*ps: Tensor) -> Tensor:
        return LOSS(functional_call(model, {**params, **dict(zip(names, ps))}, (x,)), y)

    V = torch.randn(op.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    HV = op.matmat(V)
    sizes = [p.numel() for p in sub]
    for j in range(2):
        tangents = tuple(t.reshape(p.shape) for t, p in zip(V[:, j].split(sizes), sub))
        _, hv = torch.func.jvp(lambda *ps: torch.func.grad(f, argnums=tuple(range(len(ps))))(*ps), sub, tangents)
        ref = torch.cat([t.reshape(-1) for t in hv])
        assert float((HV[:, j] - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
