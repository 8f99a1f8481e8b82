"""The one `data` contract (core.modules.as_batches): every analysis accepts an (x, y) batch, a
list of batches, a DataLoader and a Dataset, and gives the same numbers for the same samples.

Before issue 13, `collapse` accepted a Dataset while `hessian_spectrum` refused it."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import resgeom_fast as rg


def _problem():
    torch.manual_seed(0)
    model = rg.models.FCResNet(8, 6, 2, 3, seed=0).double().eval()
    x = torch.randn(24, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (24,))
    return model, x, y


def _dense_hessian_eigenvalues(model, loss_fn, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    sizes = [p.numel() for p in params]
    flat = torch.cat([p.reshape(-1) for p in params])

    def f(v):
        ps, i = {}, 0
        for n, p, s in zip(names, params, sizes):
            ps[n] = v[i:i + s].view_as(p)
            i += s
        return loss_fn(functional_call(model, ps, (x,)), y)

    return torch.linalg.eigvalsh(torch.autograd.functional.hessian(f, flat))


@pytest.mark.parametrize("form", ["batch", "list", "loader", "dataset"])
def test_hessian_spectrum_takes_every_data_form(form):
    model, x, y = _problem()
    loss = torch.nn.CrossEntropyLoss()
    data = {"batch": (x, y), "list": [(x[:12], y[:12]), (x[12:], y[12:])],
            "loader": DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False),
            "dataset": TensorDataset(x, y)}[form]
    res = rg.analysis.hessian_spectrum(model, loss, data, k=2, probes=2, steps=12, trace_probes=9, seed=0)
    s = res.summary()
    exact = _dense_hessian_eigenvalues(model, loss, x, y)
    assert s["lambda_max"] == pytest.approx(float(exact[-1]), rel=1e-8)
    assert s["lambda_min"] == pytest.approx(float(exact[0]), rel=1e-8, abs=1e-10)


def test_collapse_same_numbers_for_a_dataset_and_its_batch():
    model, x, y = _problem()
    a = rg.analysis.collapse(model, (x, y)).to_dict()
    b = rg.analysis.collapse(model, TensorDataset(x, y)).to_dict()
    assert a == b
