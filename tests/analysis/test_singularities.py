"""singularities: constructed layers with exact answers, dense numpy float64 ground truth on real
models (streaming over a DataLoader equals one full batch), and the claim on digits."""
from __future__ import annotations

import functools
import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from tests.analysis._trained import digits_flat, one_thread, trained_fc
from resgeom_fast.analysis.singularities import (
    SingularityResult,
    find_relu_layers,
    plot_singularities,
    singularities,
)
from resgeom_fast.models import FCResNet
from resgeom_fast.train import train


# ----------------------------------------------------------------------------- dense reference
def dense_metrics(Z: np.ndarray, W: np.ndarray, eps: float) -> dict:
    """SCIENCE.md section 2 on a full activation matrix Z [N, n] and weights W [n, n_in] (numpy)."""
    n = Z.shape[1]

    def overlap(M):  # rows of M are the vectors; zero rows excluded
        norms = np.linalg.norm(M, axis=1)
        M = M[norms > 0] / norms[norms > 0, None]
        if M.shape[0] < 2:
            return M.shape[0], math.nan, math.nan, 0
        c = np.abs(M @ M.T)[np.triu_indices(M.shape[0], 1)]
        return M.shape[0], c.max(), c.mean(), int((c > 1 - eps).sum())

    norms = np.linalg.norm(W, axis=1)
    mu = np.linalg.eigvalsh(np.cov(Z, rowvar=False, bias=True))[::-1]
    mp = np.clip(mu, 0, None)
    p = mp / mp.sum()
    p = p[p > 0]
    wu, wmax, wmean, wpairs = overlap(W)
    au, amax, amean, apairs = overlap(Z.T)
    return dict(
        dead=np.nonzero(Z.max(0) <= 0)[0].tolist(), small_weight_fraction=float((norms < eps * np.median(norms)).mean()),
        weight_units_used=wu, weight_cos_max=wmax, weight_cos_mean=wmean, weight_pairs_above=wpairs,
        act_units_used=au, act_cos_max=amax, act_cos_mean=amean, act_pairs_above=apairs,
        participation_ratio=mp.sum() ** 2 / (mp ** 2).sum(), effective_rank=math.exp(-(p * np.log(p)).sum()),
        small_eig_fraction=float((mu < eps * mu[0]).mean()), mu=mu, n=n,
    )


def assert_layer_matches(layer, ref: dict, rel: float = 1e-9) -> None:
    assert layer.dead_units.tolist() == ref["dead"]
    assert layer.dead_fraction == pytest.approx(len(ref["dead"]) / ref["n"])
    for key in ("small_weight_fraction", "weight_cos_max", "weight_cos_mean", "act_cos_max", "act_cos_mean",
                "participation_ratio", "effective_rank", "small_eig_fraction"):
        assert getattr(layer, key) == pytest.approx(ref[key], rel=rel, abs=1e-12, nan_ok=True), key
    for key in ("weight_units_used", "weight_pairs_above", "act_units_used", "act_pairs_above"):
        assert getattr(layer, key) == ref[key], key
    scale = float(ref["mu"][0])
    np.testing.assert_allclose(layer.cov_eigenvalues.numpy(), ref["mu"], rtol=0, atol=1e-9 * scale)


def hooked_activations(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Post-ReLU activations of every nn.ReLU of ``model`` on x as [obs, units] float64 numpy."""
    acts: dict[str, np.ndarray] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ReLU):
            def hook(mod, inp, out, name=name):
                z = out.detach().double()
                acts[name] = (z.movedim(1, -1).reshape(-1, z.shape[1]) if z.dim() > 2 else z).numpy()
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return acts


# ----------------------------------------------------------------------------- constructed cases
def constructed_net():
    """One hidden layer of 8 units on inputs in [-1, 1]^6 (float64) with known singularities:
    units 0, 1 dead (bias -100 >> |w.x|); unit 3 a copy of unit 2 (same row and bias); unit 4 the
    negated row of unit 2 (|cos| = 1 between weights, disjoint activation supports, bias 0);
    unit 5 a tiny row (1e-7 of the others) with bias 1: a constant, alive, eliminated unit."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 8).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(8, 6, generator=g, dtype=torch.float64))
        lin.bias.copy_(0.1 * torch.randn(8, generator=g, dtype=torch.float64))
        lin.bias[:2] = -100.0
        lin.weight[3] = lin.weight[2]
        lin.bias[3] = lin.bias[2]
        lin.weight[4] = -lin.weight[2]
        lin.bias[2] = lin.bias[3] = lin.bias[4] = 0.0
        lin.weight[5] *= 1e-7
        lin.bias[5] = 1.0
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(8, 3).double())
    x = 2 * torch.rand(200, 6, generator=g, dtype=torch.float64) - 1
    return net, x


def test_constructed_dead_duplicated_and_eliminated_units():
    net, x = constructed_net()
    r = singularities(net, (x, torch.zeros(200)), eps=1e-3)
    assert len(r.layers) == 1
    lay = r.layers[0]
    assert (lay.name, lay.weight_name, lay.kind, lay.n_units, lay.n_in, lay.observations) == ("1", "0", "linear", 8, 6, 200)
    assert lay.dead_units.tolist() == [0, 1] and lay.dead_fraction == 0.25
    assert lay.small_weight_fraction == 1 / 8                       # unit 5
    assert lay.weight_pairs_above == 3                              # (2,3), (2,4), (3,4)
    assert lay.weight_cos_max == pytest.approx(1.0)
    assert lay.act_units_used == 6                                  # dead columns excluded
    assert lay.act_pairs_above == 1                                 # (2,3) only: ReLU(-a) is disjoint from ReLU(a)
    assert lay.act_cos_max == pytest.approx(1.0)
    # dead units and the duplicate give zero covariance eigenvalues; the constant unit 5 one near 0
    assert lay.small_eig_fraction == pytest.approx(4 / 8)
    assert r.total_dead == 2 and r.total_units == 8
    assert_layer_matches(lay, dense_metrics(hooked_activations(net, x)["1"], net[0].weight.detach().numpy(), 1e-3))


def test_constructed_known_rank_activations():
    """ReLU acting linearly (bias 50 >> |w.x|) on whitened inputs and W of rank 3 with equal
    singular values: the centred covariance has 3 equal eigenvalues and 5 zeros."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(120, 6, generator=g, dtype=torch.float64)
    X = X - X.mean(0)
    L = torch.linalg.cholesky(X.T @ X / 120)
    X = X @ torch.linalg.inv(L).T                                   # cov(X) = I exactly (to rounding)
    U, _ = torch.linalg.qr(torch.randn(8, 3, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 3, generator=g, dtype=torch.float64))
    lin = nn.Linear(6, 8).double()
    with torch.no_grad():
        lin.weight.copy_(2.0 * U @ V.T)
        lin.bias.fill_(50.0)
    net = nn.Sequential(lin, nn.ReLU())
    lay = singularities(net, (X, torch.zeros(120))).layers[0]
    mu = lay.cov_eigenvalues
    torch.testing.assert_close(mu[:3], torch.full((3,), 4.0, dtype=torch.float64), atol=1e-9, rtol=0)
    assert float(mu[3:].abs().max()) < 1e-9
    assert lay.participation_ratio == pytest.approx(3.0, rel=1e-9)
    assert lay.effective_rank == pytest.approx(3.0, rel=1e-9)
    assert lay.effective_rank_fraction == pytest.approx(3 / 8, rel=1e-9)
    assert lay.small_eig_fraction == 5 / 8
    assert lay.dead_fraction == 0.0


def test_zero_unit_layer_is_nan_and_skipped_in_means():
    g = torch.Generator().manual_seed(2)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 0), nn.ReLU(), nn.Linear(0, 2)).double()
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    r = singularities(net, (x, torch.zeros(10)))
    empty = r.layer("3")
    assert empty.n_units == 0 and math.isnan(empty.dead_fraction) and math.isnan(empty.effective_rank)
    assert r.means["effective_rank"] == pytest.approx(r.layer("1").effective_rank)
    json.dumps(r.to_dict(), allow_nan=False)


def test_conv_units_are_channels_and_positions_are_observations():
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        net[1].running_mean.copy_(torch.randn(5, generator=g, dtype=torch.float64))
        net[1].bias[0] = -50.0                                      # channel 0 dead
    net.eval()
    x = torch.randn(12, 2, 6, 6, generator=g, dtype=torch.float64)
    loader = [(x[i:i + 5], torch.zeros(len(x[i:i + 5]))) for i in range(0, 12, 5)]
    r = singularities(net, loader)
    lay = r.layers[0]
    assert (lay.kind, lay.n_units, lay.n_in, lay.observations, lay.weight_name) == ("conv", 5, 18, 12 * 36, "0")
    assert lay.dead_units.tolist() == [0]
    W = net[0].weight.detach().reshape(5, -1).numpy()               # BN in between: still the conv weight
    assert_layer_matches(lay, dense_metrics(hooked_activations(net, x)["2"], W, 1e-3))


# ----------------------------------------------------------------------------- real model
def test_streaming_equals_full_batch_and_dense_on_trained_fcresnet():
    model = trained_fc()
    ds = digits_flat()
    x, y = ds.tensors("train")
    full = singularities(model, (x, y))
    streamed = singularities(model, ds.loader("train", batch_size=200, shuffle=False))
    layers = find_relu_layers(model)
    assert [l.name for l in layers] == ["stem.3"] + [f"blocks.{i}.branch.2" for i in range(8)]
    assert [(l.role, l.block) for l in full.layers] == [("stem", None)] + [("branch", i) for i in range(8)]
    assert full.num_samples == streamed.num_samples == x.shape[0]
    acts = hooked_activations(model, x)
    mods = dict(model.named_modules())
    for a, b in zip(full.layers, streamed.layers):
        ref = dense_metrics(acts[a.name], mods[a.weight_name].weight.detach().double().numpy(), 1e-3)
        assert_layer_matches(a, ref, rel=1e-6)                      # float32 activations, float64 sums
        assert_layer_matches(b, ref, rel=1e-6)
        np.testing.assert_allclose(a.cov_eigenvalues.numpy(), b.cov_eigenvalues.numpy(), rtol=0,
                                   atol=1e-10 * float(a.cov_eigenvalues[0]))
    assert model.training is False
    sub = singularities(model, (x, y), layers=["blocks.2.branch.2", 0])
    assert [l.name for l in sub.layers] == ["blocks.2.branch.2", "stem.3"]


def test_result_contract_and_plot_uses_exported_numbers():
    net, x = constructed_net()
    r = singularities(net, (x, torch.zeros(200)))
    assert isinstance(r, SingularityResult)
    d = r.to_dict()
    json.dumps(d, allow_nan=False)
    assert set(r.summary()) >= {"dead_fraction_total", "mean_dead_fraction", "mean_effective_rank_fraction"}
    fig = plot_singularities(r)
    assert [p.get_height() for p in fig.axes[0].patches] == pytest.approx([l["dead_fraction"] for l in d["layers"]])
    assert list(fig.axes[1].lines[0].get_ydata()) == pytest.approx([l["act_cos_max"] for l in d["layers"]])
    assert list(fig.axes[2].lines[0].get_ydata()) == pytest.approx([l["effective_rank"] for l in d["layers"]])
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    assert plot_singularities(r, ax=ax) is fig
    assert list(ax.lines[2].get_ydata()) == pytest.approx([l["effective_rank_fraction"] for l in d["layers"]])
    plt.close("all")


# ----------------------------------------------------------------------------- the claim on digits
@functools.lru_cache(maxsize=None)
def trained_nonorm(skip: str) -> FCResNet:
    """FCResNet(64, 32, 8, 10) without BatchNorm trained on digits (15 epochs, SGD lr 0.005,
    momentum 0.9, batch 64, seed 0; ~1-2 s): the plain net (skip="none", scale 1) and the
    residual net (identity skips, scale 1/L: without normalisation a scale-1 residual stack
    diverges at this learning rate, and so does the plain net at lr >= 0.01). Both reach ~97%
    train accuracy. Eval mode, float32, CPU; shared with test_spectrum.py -- do not modify."""
    ds = digits_flat()
    model = FCResNet(64, 32, 8, 10, skip=skip, norm="none", scale=1.0 if skip == "none" else "1/L", seed=0)
    with one_thread():
        train(model, ds, 15, lr=0.005, momentum=0.9, batch_size=64, seed=0, progress=False)
    return model.eval()


def test_claim_plain_nets_have_more_singularities_without_batchnorm():
    """SCIENCE.md section 2: dead units plain >= residual. Measured (seed 0, 1 and 2 threads; seed
    1 alike): plain 2.4% of units dead (5.9% for seed 1), residual 0; linear dependence (fraction
    of covariance eigenvalues < eps mu_1) 0.37 vs 0.02; max activation overlap 0.94 vs 0.83;
    effective rank / units 0.22 vs 0.37."""
    x, y = digits_flat().tensors("train")
    plain = singularities(trained_nonorm("none"), (x, y))
    res = singularities(trained_nonorm("identity"), (x, y))
    assert plain.total_dead >= 5 and plain.summary()["dead_fraction_total"] > 0.01
    assert res.summary()["dead_fraction_total"] <= 0.5 * plain.summary()["dead_fraction_total"]
    assert plain.means["small_eig_fraction"] > res.means["small_eig_fraction"] + 0.2
    assert plain.means["act_cos_max"] > res.means["act_cos_max"] + 0.04
    assert plain.means["effective_rank_fraction"] < res.means["effective_rank_fraction"] - 0.07


def test_claim_with_batchnorm_linear_dependence_but_no_dead_units():
    """The shared _trained nets (FCResNet(64, 64, 8, 10) with BatchNorm): BatchNorm keeps every unit
    alive in both (measured: 0 dead units in plain and residual; the narrower, deeper
    width 16 / depth 16 plain net has 3.7% dead, residual 0), but the plain net's units are far
    more linearly dependent (small-eigenvalue fraction 0.33 vs 0.06) and overlap more (max
    activation |cos| 0.962 vs 0.939)."""
    x, y = digits_flat().tensors("train")
    plain = singularities(trained_fc(skip="none"), (x, y))
    res = singularities(trained_fc(), (x, y))
    assert plain.total_dead >= res.total_dead
    assert plain.means["small_eig_fraction"] > res.means["small_eig_fraction"] + 0.15
    assert plain.means["act_cos_max"] > res.means["act_cos_max"]
    assert plain.means["effective_rank_fraction"] < res.means["effective_rank_fraction"]


# ----------------------------------------------------------------------------- input checks
def test_rejects_bad_eps():
    net, x = constructed_net()
    with pytest.raises(ValueError, match="singularities: expected eps"):
        singularities(net, (x, torch.zeros(200)), eps=0.0)


def test_rejects_model_without_relu_layers():
    net = nn.Sequential(nn.Linear(3, 2)).double()
    with pytest.raises(ValueError, match="singularities: found no nn.ReLU"):
        singularities(net, (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4)))


def test_rejects_unknown_layer():
    net, x = constructed_net()
    with pytest.raises(ValueError, match="singularities: no layer named 'nope'"):
        singularities(net, (x, torch.zeros(200)), layers=["nope"])


def test_rejects_data_on_another_device():
    net, _ = constructed_net()
    x = torch.empty(4, 6, dtype=torch.float64, device="meta")
    with pytest.raises(ValueError, match="singularities: expected data on the model's device"):
        singularities(net, (x, torch.zeros(4, device="meta")))


def test_rejects_data_of_another_dtype():
    net, x = constructed_net()
    with pytest.raises(ValueError, match="singularities: expected x of dtype"):
        singularities(net, (x.float(), torch.zeros(200)))


def test_relu_shared_between_calls_is_one_layer_per_call():
    """Before (issue 14) a ReLU module called twice per forward pass was refused; now each call is
    a layer of its own ("<module>#k"), with the weight layer before that call."""
    relu = nn.ReLU()
    net = nn.Sequential(nn.Linear(3, 4), relu, nn.Linear(4, 5), relu).double()
    x = torch.randn(40, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = singularities(net, [(x[:25], torch.zeros(25)), (x[25:], torch.zeros(15))])
    assert [(l.name, l.module_name, l.call, l.weight_name, l.n_units) for l in r.layers] == [
        ("1#0", "1", 0, "0", 4), ("1#1", "1", 1, "2", 5)]
    with torch.no_grad():
        z0 = torch.relu(net[0](x))
        z1 = torch.relu(net[2](z0))
    for lay, z, w in zip(r.layers, (z0, z1), (net[0], net[2])):
        assert_layer_matches(lay, dense_metrics(z.numpy(), w.weight.detach().numpy(), 1e-3))


def test_rejects_module_called_a_different_number_of_times():
    class Varying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.relu = nn.Linear(3, 3).double(), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(1 + int(x.shape[0] > 4)):
                x = self.relu(self.lin(x))
            return x

    x = torch.randn(9, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"singularities: expected ReLU 'relu' to run 1 time\(s\) per forward "
                                         r"pass as on the first batch, it ran 2 times on batch 1"):
        singularities(Varying(), [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(6))])


# ----------------------------------------------------------------------------- non-finite values named
def test_nonfinite_parameter_named_before_any_work() -> None:
    """Before: a NaN head weight gave a result (the head is not a ReLU layer) and a NaN branch
    weight a ValueError naming only the ReLU after it; now NonFiniteError names the parameter."""
    from resgeom_fast.linalg import NonFiniteError

    for where in ("head.weight", "blocks.1.branch.0.weight"):
        model = FCResNet(64, 16, 3, 10, seed=0).eval()
        with torch.no_grad():
            dict(model.named_parameters())[where].view(-1)[3] = float("nan")
        x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
        with pytest.raises(NonFiniteError, match=rf"singularities: expected finite model parameter '{where}'"):
            singularities(model, (x, torch.zeros(12, dtype=torch.long)))


def test_nonfinite_input_and_overflow_named() -> None:
    from resgeom_fast.linalg import NonFiniteError

    model = FCResNet(64, 16, 3, 10, norm="none", seed=0).eval()
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(12, dtype=torch.long)
    xb = x.clone()
    xb[4, 4] = float("inf")
    with pytest.raises(NonFiniteError, match=r"singularities: expected finite the inputs x of batch 1"):
        singularities(model, [(x, y), (xb, y)])
    with torch.no_grad():
        for p in model.blocks[0].branch.parameters():
            p.mul_(1e25)
    with pytest.raises(NonFiniteError, match=r"the output of ReLU 'blocks\.1\.branch\.\d+' on batch 0"):
        singularities(model, (x, y))
