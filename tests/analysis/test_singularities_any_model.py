"""singularities on networks beyond this package (issue 14): torchvision / timm ResNets,
MobileNetV2, ConvNeXt and a small ViT with random weights and randomised BatchNorm statistics.
Every run finds the expected layers (counts by role) and, on chosen layers, matches an
independent dense float64 computation from this file's own hooks (dead units by the
activation's rule with derivatives from autograd, weight and activation cosines, covariance
eigenvalues, participation ratio, effective rank); constructed cases pin the dead rules."""
from __future__ import annotations

import collections
import math
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn

from resgeom_fast.analysis.singularities import find_activation_layers, find_relu_layers, singularities
from resgeom_fast.core.blocks import ResidualSublayer, residual_blocks
from resgeom_fast.models import ConvResNet, FCResNet, StagedResNet
from tests.analysis._trained import one_thread
from tests.helpers import randomise_batchnorm

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

EPS = 1e-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One thread: big convolutions on a shared, loaded CPU are far slower on several."""
    with one_thread():
        yield


# ----------------------------------------------------------------------------- dense reference
def collect_calls(model: nn.Module, module: nn.Module, batches: list[torch.Tensor]) -> list[list[tuple]]:
    """(pre-activation, output) of every call of ``module``, per batch, from plain hooks (the
    input cloned in a pre-hook: torchvision's activations run in place)."""
    per_batch: list[list[tuple]] = []
    pre: list[torch.Tensor] = []

    def pre_hook(m, args):
        pre.append(args[0].detach().clone())

    def hook(m, args, out):
        per_batch[-1].append((pre.pop(), out.detach().clone()))

    h1, h2 = module.register_forward_pre_hook(pre_hook), module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                per_batch.append([])
                model(x)
    finally:
        h1.remove()
        h2.remove()
    return per_batch


def units_last(t: torch.Tensor, unit_dim: int) -> np.ndarray:
    t = t.double().movedim(unit_dim, -1)
    return t.reshape(-1, t.shape[-1]).numpy()


def dead_mask(act: nn.Module, pre: np.ndarray, dead_tol: float) -> np.ndarray:
    """[obs, n] -> [n] bool: the documented dead rule, derivatives by autograd (float64)."""
    if isinstance(act, nn.ReLU):
        return (pre <= 0).all(0)
    if isinstance(act, nn.ReLU6):
        return ((pre <= 0) | (pre >= 6)).all(0)
    z = torch.tensor(pre, dtype=torch.float64, requires_grad=True)
    out = act(z.clone())   # in-place activations act on the clone
    (d,) = torch.autograd.grad(out.sum(), z)
    return ((out.detach().abs() <= dead_tol) & (d.abs() <= dead_tol)).all(0).numpy()


def dense_metrics(Z: np.ndarray, W: Optional[np.ndarray], dead: np.ndarray) -> dict:
    """docs/science.md section 2 on a full activation matrix Z [N, n], weights W [n, n_in] or None."""

    def overlap(M):
        norms = np.linalg.norm(M, axis=1)
        M = M[norms > 0] / norms[norms > 0, None]
        if M.shape[0] < 2:
            return M.shape[0], math.nan, math.nan, 0
        c = np.abs(M @ M.T)[np.triu_indices(M.shape[0], 1)]
        return M.shape[0], c.max(), c.mean(), int((c > 1 - EPS).sum())

    mu = np.linalg.eigvalsh(np.cov(Z, rowvar=False, bias=True))[::-1]
    mp = np.clip(mu, 0, None)
    p = mp[mp > 0] / mp.sum()
    ref = dict(dead=np.nonzero(dead)[0].tolist(), n=Z.shape[1], mu=mu,
               participation_ratio=mp.sum() ** 2 / (mp ** 2).sum(), effective_rank=math.exp(-(p * np.log(p)).sum()),
               small_eig_fraction=float((mu < EPS * mu[0]).mean()))
    ref["act_units_used"], ref["act_cos_max"], ref["act_cos_mean"], ref["act_pairs_above"] = overlap(Z.T)
    if W is not None:
        norms = np.linalg.norm(W, axis=1)
        ref["small_weight_fraction"] = float((norms < EPS * np.median(norms)).mean())
        ref["weight_units_used"], ref["weight_cos_max"], ref["weight_cos_mean"], ref["weight_pairs_above"] = overlap(W)
    return ref


def assert_matches(layer: Any, ref: dict, rel: float) -> None:
    assert layer.dead_units.tolist() == ref["dead"]
    assert layer.n_units == ref["n"]
    keys = ["act_cos_max", "act_cos_mean", "participation_ratio", "effective_rank", "small_eig_fraction"]
    ints = ["act_units_used", "act_pairs_above"]
    if "weight_cos_max" in ref:
        keys += ["small_weight_fraction", "weight_cos_max", "weight_cos_mean"]
        ints += ["weight_units_used", "weight_pairs_above"]
    else:  # no incoming weight: undefined, with the reason
        assert layer.weight_name is None and layer.weight_norms is None and layer.weight_reason
        assert math.isnan(layer.weight_cos_max) and layer.weight_pairs_above is None and layer.n_in is None
    for key in keys:
        assert getattr(layer, key) == pytest.approx(ref[key], rel=rel, abs=1e-12, nan_ok=True), key
    for key in ints:
        assert getattr(layer, key) == ref[key], key
    np.testing.assert_allclose(layer.cov_eigenvalues.numpy(), ref["mu"], rtol=0, atol=rel * float(ref["mu"][0]))


def check_layer_dense(model: nn.Module, result: Any, name: str, batches: list[torch.Tensor], *,
                      weight: Optional[str], unit_dim: int, rel: float, dead_tol: float = 1e-6) -> Any:
    """Compare ``result``'s layer ``name`` ("<module>" or "<module>#k") with the dense reference
    of that call collected by this file's hooks over all batches; ``weight`` the expected
    incoming weight layer (None: no incoming weight). Returns the layer."""
    mods = dict(model.named_modules())
    mname, _, k = name.partition("#")
    calls = collect_calls(model, mods[mname], batches)
    k = int(k or 0)
    pre = np.concatenate([units_last(c[k][0], unit_dim) for c in calls])
    Z = np.concatenate([units_last(c[k][1], unit_dim) for c in calls])
    W = None
    if weight is not None:
        w = mods[weight].weight.detach().double()
        W = w.reshape(w.shape[0], -1).numpy()
    lay = result.layer(name)
    assert (lay.name, lay.weight_name, lay.unit_dim, lay.observations) == (name, weight, unit_dim, Z.shape[0])
    assert_matches(lay, dense_metrics(Z, W, dead_mask(mods[mname], pre, dead_tol)), rel)
    return lay


# ----------------------------------------------------------------------------- models
def randomise_bn(model: nn.Module, seed: int) -> nn.Module:
    """Random running statistics and affine parameters in every BatchNorm; eval mode."""
    return randomise_batchnorm(model, torch.Generator().manual_seed(seed), var=1.5).eval()


def images(n: int, size: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Two batches of n // 2 images [*, 3, size, size]."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return [x[: n // 2], x[n // 2:]]


def run(model: nn.Module, xs: list[torch.Tensor], **kw: Any) -> Any:
    return singularities(model, [(x, torch.zeros(x.shape[0])) for x in xs], **kw)


def roles(layers: list) -> dict[str, int]:
    return dict(collections.Counter(l.role for l in layers))


def set_(t: torch.Tensor, idx: Any, value: float) -> None:
    with torch.no_grad():
        t[idx] = value


# ----------------------------------------------------------------------------- torchvision / timm ResNets
@pytest.mark.parametrize("factory", ["tv_resnet18", "timm_resnet18"])
def test_basic_block_resnets_branch_and_post_units(factory: str) -> None:
    """Every block's ReLU after the sum is a "post" layer (torchvision: the second call of the
    shared ``relu``; timm: ``act2``): no incoming weight, activation metrics against dense."""
    torch.manual_seed(0)
    model = (torchvision.models.resnet18(num_classes=5) if factory == "tv_resnet18"
             else timm.create_model("resnet18", num_classes=5))
    model = randomise_bn(model.double(), 1)
    b0 = model.layer1[0]
    set_(b0.bn1.bias, slice(0, 3), -1e3)            # branch units 0-2 dead
    set_(b0.bn2.bias, slice(0, 2), -1e4)            # post units 0, 1 dead (skip input is a bounded ReLU output)
    xs = images(4, 32, torch.float64)
    r = run(model, xs)
    assert roles(r.layers) == {"stem": 1, "branch": 8, "post": 8}
    tv = factory == "tv_resnet18"
    stem, branch, post = ("relu", "layer1.0.relu#0", "layer1.0.relu#1") if tv else ("act1", "layer1.0.act1", "layer1.0.act2")
    assert [(l.name, l.role, l.block) for l in r.layers[:3]] == [(stem, "stem", None), (branch, "branch", 0),
                                                               (post, "post", 0)]
    assert [l.block for l in r.layers if l.role == "post"] == list(range(8))
    assert all(l.weight_name is None and "post-activation" in l.weight_reason for l in r.layers if l.role == "post")
    assert all(l.weight_name is not None for l in r.layers if l.role != "post")
    lay = check_layer_dense(model, r, branch, xs, weight="layer1.0.conv1", unit_dim=1, rel=1e-9)
    assert lay.dead_units.tolist()[:3] == [0, 1, 2] and lay.kind == "conv" and lay.n_in == 64 * 9
    lay = check_layer_dense(model, r, post, xs, weight=None, unit_dim=1, rel=1e-9)
    assert lay.dead_units.tolist()[:2] == [0, 1]
    post2 = "layer2.0.relu#1" if tv else "layer2.0.act2"   # after the downsample skip
    check_layer_dense(model, r, post2, xs, weight=None, unit_dim=1, rel=1e-9)
    check_layer_dense(model, r, stem, xs, weight="conv1", unit_dim=1, rel=1e-9)
    # model-level numbers: means / totals over the non-post layers, the post layers apart
    main = [l for l in r.layers if l.role != "post"]
    assert r.total_units == 64 + 2 * (64 + 128 + 256 + 512) and r.post_total_units == 2 * (64 + 128 + 256 + 512)
    assert r.total_dead == sum(l.dead_units.numel() for l in main)
    assert r.means["act_cos_max"] == pytest.approx(np.mean([l.act_cos_max for l in main]))
    assert r.summary()["post_dead_fraction_total"] == r.post_total_dead / r.post_total_units


@pytest.mark.parametrize("arch", ["resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_bottleneck_resnets(arch: str) -> None:
    """Bottlenecks: the shared ``relu`` runs three times (two branch layers, then the post).
    float32 activations, float64 statistics: relative agreement 1e-6."""
    torch.manual_seed(0)
    model = randomise_bn(getattr(torchvision.models, arch)(num_classes=5), 2)
    width = {"resnet50": 64, "wide_resnet50_2": 128, "resnext50_32x4d": 128}[arch]
    set_(model.layer1[0].bn2.bias, slice(0, 2), -1e3)
    xs = images(4, 32, torch.float32)
    found = find_activation_layers(model, xs[0])
    assert roles(found) == {"stem": 1, "branch": 32, "post": 16}
    assert [(l.name, l.role, l.block, l.weight_name, l.n_units) for l in found[1:4]] == [
        ("layer1.0.relu#0", "branch", 0, "layer1.0.conv1", width),
        ("layer1.0.relu#1", "branch", 0, "layer1.0.conv2", width),
        ("layer1.0.relu#2", "post", 0, None, 256)]
    r = run(model, xs, layers=["layer1.0.relu", "layer2.0.relu#2"])
    assert [l.name for l in r.layers] == ["layer1.0.relu#0", "layer1.0.relu#1", "layer1.0.relu#2", "layer2.0.relu#2"]
    lay = check_layer_dense(model, r, "layer1.0.relu#1", xs, weight="layer1.0.conv2", unit_dim=1, rel=1e-6)
    assert lay.dead_units.tolist()[:2] == [0, 1]
    assert lay.n_in == model.layer1[0].conv2.weight[0].numel()    # grouped conv: C_in / groups * 9
    check_layer_dense(model, r, "layer1.0.relu#2", xs, weight=None, unit_dim=1, rel=1e-6)
    check_layer_dense(model, r, "layer2.0.relu#2", xs, weight=None, unit_dim=1, rel=1e-6)
    assert r.post_total_units == 256 + 512 and r.total_units == 2 * width


# ----------------------------------------------------------------------------- MobileNetV2, ConvNeXt, ViT
def test_mobilenet_v2_relu6_saturated_and_zero_units_dead() -> None:
    """ReLU6 inside Conv2dNormActivation: the conv before it is the incoming weight (depthwise:
    9 weights per unit). Inverted residuals without their skip are no blocks: before the first
    residual block their layers are "stem", after it "other"."""
    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.mobilenet_v2(num_classes=5).double(), 3)
    bn = model.features[3].conv[0][1]
    set_(bn.bias, 0, 1e3)                            # saturated at 6 everywhere: dead (derivative 0)
    set_(bn.bias, 1, -1e3)                           # zero everywhere: dead
    xs = images(4, 32, torch.float64)
    found = find_activation_layers(model, xs[0])
    assert roles(found) == {"stem": 4, "branch": 20, "other": 11}
    assert all(l.activation == "ReLU6" and l.weight_name is not None for l in found)
    chosen = ["features.3.conv.0.2", "features.3.conv.1.2", "features.0.2", "features.4.conv.0.2"]
    r = run(model, xs, layers=chosen)
    assert [(l.role, l.block) for l in r.layers] == [("branch", 0), ("branch", 0), ("stem", None), ("other", None)]
    lay = check_layer_dense(model, r, chosen[0], xs, weight="features.3.conv.0.0", unit_dim=1, rel=1e-9)
    assert lay.dead_units.tolist()[:2] == [0, 1] and "saturated" in lay.dead_rule
    lay = check_layer_dense(model, r, chosen[1], xs, weight="features.3.conv.1.0", unit_dim=1, rel=1e-9)
    assert lay.n_in == 9
    check_layer_dense(model, r, chosen[2], xs, weight="features.0.0", unit_dim=1, rel=1e-9)


def test_convnext_gelu_after_channels_last_linear() -> None:
    """CNBlock: dwconv, Permute, LayerNorm, Linear, GELU: the Linear is the incoming weight and
    the units are the last dim of the channels-last tensor (observations = samples x positions)."""
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny(num_classes=5).eval()
    lin = model.features[1][0].block[3]
    set_(lin.bias, slice(0, 2), -60.0)              # pre-activation <= -10 everywhere: GELU dead
    xs = images(4, 32, torch.float32)
    found = find_activation_layers(model, xs[0])
    assert roles(found) == {"branch": 18}
    assert [l.block for l in found] == list(range(18))
    name = "features.1.0.block.4"
    r = run(model, xs, layers=[name])
    lay = check_layer_dense(model, r, name, xs, weight="features.1.0.block.3", unit_dim=3, rel=1e-6)
    assert (lay.kind, lay.n_units, lay.observations, lay.activation) == ("linear", 384, 4 * 8 * 8, "GELU")
    assert lay.dead_units.tolist()[:2] == [0, 1] and "dead_tol" in lay.dead_rule


def test_small_vit_mlp_gelu_units_are_the_width_tokens_are_observations() -> None:
    from torchvision.models.vision_transformer import VisionTransformer  # optional dependency

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=24,
                              num_classes=5).double().eval()
    set_(model.encoder.layers[0].mlp[0].bias, 0, -40.0)   # GELU unit 0 of the first MLP dead
    xs = images(4, 32, torch.float64)
    r = run(model, xs)
    assert roles(r.layers) == {"branch": 2}
    infos = residual_blocks(model)
    for i, lay in enumerate(r.layers):
        mlp = model.encoder.layers[i].mlp
        owners = [b for b, info in enumerate(infos)   # the block whose branch (or residual sublayer) holds the MLP
                  if any(m is mlp for m in info.branch.modules())
                  or (isinstance(info.post, ResidualSublayer) and info.post.body is mlp)]
        assert lay.block == owners[0]
        name = f"encoder.layers.encoder_layer_{i}.mlp.1"
        ref = check_layer_dense(model, r, name, xs, weight=f"encoder.layers.encoder_layer_{i}.mlp.0", unit_dim=2,
                                rel=1e-9)
        assert (ref.kind, ref.n_units, ref.observations) == ("linear", 24, 4 * 5)   # CLS + 4 patches
    assert r.layers[0].dead_units.tolist()[:1] == [0]


# ----------------------------------------------------------------------------- constructed dead rules
def one_layer(act: nn.Module, bias: list[float], n_in: int = 3, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """Linear(n_in, len(bias)) with weight rows of norm 0.5 (so |w.x| <= 0.5 sqrt(n_in) < 0.9 on
    [-1, 1]^n_in) and the given biases, then ``act``; 60 inputs in [-1, 1]^n_in."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n_in, len(bias)).double()
    with torch.no_grad():
        w = torch.randn(len(bias), n_in, generator=g, dtype=torch.float64)
        lin.weight.copy_(0.5 * w / w.norm(dim=1, keepdim=True))
        lin.bias.copy_(torch.tensor(bias, dtype=torch.float64))
    x = 2 * torch.rand(60, n_in, generator=g, dtype=torch.float64) - 1
    return nn.Sequential(lin, act), x


@pytest.mark.parametrize("act, bias, dead_tol, dead", [
    (nn.ReLU6(inplace=True), [100.0, -100.0, 0.0, 3.0, 6.0], 1e-6, [0, 1]),   # saturated at 6; zero
    (nn.GELU(), [-10.0, -3.0, 0.0], 1e-6, [0]),                  # pre <= -9.1: |out|, |d| < 1e-15
    (nn.GELU(), [-10.0, -4.0, 0.0], 1e-2, [0, 1]),               # pre <= -3.1 with a looser tolerance
    (nn.GELU(approximate="tanh"), [-10.0, -3.0, 0.0], 1e-6, [0]),
    (nn.SiLU(), [-40.0, -10.0, 0.0], 1e-6, [0]),                 # SiLU(-10) = -4.5e-4: alive at 1e-6
    (nn.Hardswish(), [-5.0, -2.0, 0.0], 0.0, [0]),               # exactly 0 below -3, even at dead_tol 0
    (nn.LeakyReLU(0.01), [-100.0, 0.0], 1e-6, []),               # slope 0.01 > dead_tol: never dead
    (nn.LeakyReLU(0.0), [-100.0, 0.0], 1e-6, [0]),
    (nn.ReLU(), [-100.0, 0.0, 100.0], 1e-6, [0]),
])
def test_constructed_dead_rules(act: nn.Module, bias: list[float], dead_tol: float, dead: list[int]) -> None:
    net, x = one_layer(act, bias)
    r = singularities(net, [(x[:25], torch.zeros(25)), (x[25:], torch.zeros(35))], dead_tol=dead_tol)
    (lay,) = r.layers
    assert lay.dead_units.tolist() == dead and lay.activation == type(act).__name__
    assert lay.dead_rule.startswith(type(act).__name__)
    check_layer_dense(net, r, "1", [x[:25], x[25:]], weight="0", unit_dim=1, rel=1e-9, dead_tol=dead_tol)


def test_relu6_unit_saturated_everywhere_is_a_constant_column() -> None:
    """A unit at 6 on every observation is dead (derivative 0) but not a zero column: it enters
    the activation overlap and adds a zero covariance eigenvalue."""
    net, x = one_layer(nn.ReLU6(), [100.0, 0.5, 1.0])
    lay = singularities(net, (x, torch.zeros(60))).layers[0]
    assert lay.dead_units.tolist() == [0] and lay.act_units_used == 3
    assert float(lay.cov_eigenvalues[-1]) == pytest.approx(0.0, abs=1e-15)


# ----------------------------------------------------------------------------- links and layouts
def test_functional_op_or_in_place_change_breaks_the_weight_link() -> None:
    """The incoming weight is followed by tensor identity: an add in between (a new tensor) or an
    in-place change of the weight layer's output (its version counter) leaves the layer without
    weight, with the reason; the activation metrics are still defined."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.a, self.b, self.c = nn.Linear(3, 4), nn.ReLU(), nn.ReLU(), nn.GELU()
            self.bn, self.drop = nn.BatchNorm1d(4), nn.Dropout(0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(self.fc(x) + 1.0)            # functional add: no incoming weight
            z = self.fc(x)
            z += 1.0                                 # in place: no incoming weight
            w = self.c(self.drop(self.bn(self.fc(x))))   # BN and dropout between: fc is the weight
            return self.b(z) + y + w

    net = Net().double().eval()
    x = torch.randn(30, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = singularities(net, (x, torch.zeros(30)))
    assert [(l.name, l.role, l.weight_name) for l in r.layers] == [("a", "other", None), ("c", "other", "fc"),
                                                                 ("b", "other", None)]
    assert "functional" in r.layers[0].weight_reason and "functional" in r.layers[2].weight_reason
    check_layer_dense(net, r, "a", [x], weight=None, unit_dim=1, rel=1e-9)
    check_layer_dense(net, r, "c", [x], weight="fc", unit_dim=1, rel=1e-9)
    assert r.means["weight_cos_max"] == pytest.approx(r.layers[1].weight_cos_max)   # NaN layers skipped


def test_activation_applied_inside_a_normalisation_module_links_through_it() -> None:
    """timm's BatchNormAct2d runs a functional batch norm, then its drop and act children: the
    conv before it is the act's incoming weight."""
    from timm.layers import BatchNormAct2d  # optional dependency

    net = nn.Sequential(nn.Conv2d(2, 4, 3), BatchNormAct2d(4, act_layer=nn.ReLU), nn.AdaptiveAvgPool2d(1),
                        nn.ReLU()).double()
    randomise_bn(net, 5)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    r = singularities(net, (x, torch.zeros(6)))
    assert [(l.name, l.weight_name) for l in r.layers] == [("1.act", "0"), ("3", None)]
    assert "AdaptiveAvgPool2d" in r.layers[1].weight_reason
    check_layer_dense(net, r, "1.act", [x], weight="0", unit_dim=1, rel=1e-9)


@pytest.mark.parametrize("make, x_shape, posts", [
    (lambda kw: FCResNet(8, 6, 3, 4, **kw), (5, 8), 0),
    (lambda kw: ConvResNet(2, 4, 3, 4, **kw), (5, 2, 6, 6), 0),
    (lambda kw: StagedResNet("basic", (1, 2), 4, base_width=4, **kw), (5, 3, 8, 8), 3),
    (lambda kw: StagedResNet("bottleneck", (1, 2), 4, base_width=4, **kw), (5, 3, 8, 8), 3),
])
@pytest.mark.parametrize("kw", [{}, {"skip": "none"}, {"hyper": True}, {"init": "fixup", "norm": "none"}])
def test_this_packages_models_keep_their_layers(make: Callable, x_shape: tuple, posts: int, kw: dict) -> None:
    """The layers that are not "post" are exactly those of the earlier Sequential-only rule
    (find_relu_layers: names, weights, roles, blocks), so means and totals are unchanged; the
    staged ResNets gain one "post" layer per block."""
    model = make(kw)
    found = find_activation_layers(model, torch.randn(*x_shape))
    old = [(l.name, l.weight_name, l.role, l.block) for l in find_relu_layers(model)]
    assert [(l.name, l.weight_name, l.role, l.block) for l in found if l.role != "post"] == old
    assert [l.block for l in found if l.role == "post"] == list(range(posts))


def test_rejects_bad_dead_tol() -> None:
    net, x = one_layer(nn.GELU(), [0.0])
    for bad in (-1e-3, 1.0):
        with pytest.raises(ValueError, match="singularities: expected dead_tol"):
            singularities(net, (x, torch.zeros(60)), dead_tol=bad)
