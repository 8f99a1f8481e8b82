"""Issue 12: regression losses (``F.mse_loss``, ``nn.MSELoss()``) with every product method of the
Hessian and the GGN, against dense float64 ground truth; "auto" falls back when forward mode fails."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.operators._operator_nets import FCNet, dense_hessian, dense_param_jacobian, randomise_bn, rel
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import ggn, hessian

LOSSES = {"F.mse_loss": F.mse_loss, "nn.MSELoss": nn.MSELoss()}
METHODS = ["auto", "double_backward", "forward_over_reverse"]
D_OUT = 2


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, D_OUT)).double()
    return FCNet(d_in=5, width=6, classes=D_OUT, bn=kind == "fcresnet_bn").double()


def _data(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, generator=g, dtype=torch.float64),
            torch.randn(n, D_OUT, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("hvp", METHODS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind", ["mlp", "fcresnet", "fcresnet_bn"])
def test_mse_hessian_equals_dense(kind, loss, hvp):
    model, loss_fn = _model(kind), LOSSES[loss]
    x, y = _data()
    H = hessian(model, loss_fn, (x, y), hvp=hvp)
    dense = dense_hessian(model, loss_fn, x, y)
    assert rel(H.to_dense(), dense) < 1e-10
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for _ in range(5):                         # "auto" measures its candidates on these
        assert rel(H.matmat(V), dense @ V) < 1e-10
    assert H.hvp_choice(3) in (["double_backward", "forward_over_reverse", "structured"] if hvp == "auto" else [hvp])
    assert H.forward_over_reverse_off is None  # no fallback was needed
    assert H.loss_reduction == "mean"          # the mean contract was checked


@pytest.mark.parametrize("hvp", METHODS)
@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("kind", ["mlp", "fcresnet_bn"])
def test_mse_ggn_is_scaled_jtj(kind, loss, hvp):
    """nn.MSELoss() averages over the N*d output elements: H_loss = 2/(N d) I, G = 2/(N d) J^T J."""
    model, loss_fn = _model(kind), LOSSES[loss]
    x, y = _data()
    J = dense_param_jacobian(model, x)
    n, d = y.shape
    dense = (2.0 / (n * d)) * J.T @ J
    out = model.eval()(x).detach()
    Hout = torch.func.hessian(lambda o: loss_fn(o.view(n, d), y))(out.reshape(-1))
    assert rel(Hout, (2.0 / (n * d)) * torch.eye(n * d, dtype=torch.float64)) < 1e-12  # the reading
    G = ggn(model, loss_fn, (x, y), hvp=hvp)
    assert rel(G.to_dense(), dense) < 1e-10
    V = torch.randn(G.shape[0], 3, dtype=torch.float64)
    for _ in range(5):
        assert rel(G.matmat(V), dense @ V) < 1e-10


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("norm", ["batch", "none"])
def test_mse_structured_equals_dense(loss, norm):
    """The structured path's MSE rules (g = 2 (o - t)/(N d), R g = 2 Ro/(N d)) on a recognised net."""
    model = FCResNet(5, 6, D_OUT, 2, seed=0, norm=norm).double()
    if norm == "batch":
        randomise_bn(model, torch.Generator().manual_seed(1))
    model.eval()
    loss_fn = LOSSES[loss]
    x, y = _data()
    dense = dense_hessian(model, loss_fn, x, y)
    for hvp in ("structured", "auto"):
        H = hessian(model, loss_fn, (x, y), hvp=hvp)
        V = torch.randn(H.shape[0], 3, dtype=torch.float64)
        assert rel(H.matmat(V), dense @ V) < 1e-10 and rel(H.matvec(V[:, 0]), dense @ V[:, 0]) < 1e-10
        assert H.hvp_method == "structured" and H.structured_off is None
        assert H.verification[3]["structured"] < 1e-12              # checked against the double backward
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    Hl = hessian(model, loss_fn, loader, hvp="structured")
    assert rel(Hl.matmat(V), dense @ V) < 1e-10
    # targets of another shape than the outputs: refused by the structured path with the reason
    y1 = y[:, :1]
    with pytest.warns(UserWarning):                                 # MSELoss broadcasts [N, 1] -> [N, 2]
        H1 = hessian(model, loss_fn, (x, y1))
        out = H1.matmat(V)
    assert H1.structured_off is not None and "targets" in H1.structured_off
    assert rel(out, dense_hessian(model, loss_fn, x, y1) @ V) < 1e-10


def test_structured_refuses_other_losses_with_reason():
    model = FCResNet(5, 6, D_OUT, 2, seed=0).double()            # a net the structured path recognises
    with pytest.raises(ValueError, match="hvp='structured' does not apply: the loss is not"):
        hessian(model, nn.L1Loss(), _data(), hvp="structured")
    H = hessian(model, nn.L1Loss(), _data())
    assert H.structured_off is not None and "loss" in H.structured_off


@pytest.mark.parametrize("hvp", METHODS)
def test_mse_dataloader_accumulation(hvp):
    model = _model("fcresnet_bn")
    x, y = _data(n=23)
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=False)
    Hl = hessian(model, nn.MSELoss(), loader, hvp=hvp)
    dense = dense_hessian(model, nn.MSELoss(), x, y)
    V = torch.randn(Hl.shape[0], 3, dtype=torch.float64)
    assert rel(Hl.matmat(V), dense @ V) < 1e-10


def _huber(o, y):
    return F.huber_loss(o, y, delta=0.5)       # PyTorch has no forward-mode derivative for it


def test_auto_falls_back_when_forward_mode_fails():
    model = _model("mlp")
    x, y = _data()
    dense = dense_hessian(model, _huber, x, y, use_func=False)
    H = hessian(model, _huber, (x, y))                             # "auto"
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for _ in range(4):
        assert rel(H.matmat(V), dense @ V) < 1e-10
    assert H.forward_over_reverse_off is not None and "forward-over-reverse" in H.forward_over_reverse_off
    assert H.hvp_choice(3) == "double_backward"
    with pytest.raises(RuntimeError, match="(?s)hvp='forward_over_reverse': .*use hvp='double_backward'"):
        hessian(model, _huber, (x, y), hvp="forward_over_reverse").matmat(V)
