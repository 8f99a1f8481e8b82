"""FCResNet / ConvResNet: exact forward formulas, options, initialisation and errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resgeom_fast.models import (
    ConvResNet,
    FCResNet,
    OrthogonalSkip,
    ResidualBlock,
    ScalarMultiplier,
    ZeroSkip,
    residual_blocks,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _fc_branch_by_hand(branch: nn.Sequential, h):
    lin1, relu, lin2 = branch[0], branch[1], branch[2]
    assert isinstance(lin1, nn.Linear) and isinstance(relu, nn.ReLU) and isinstance(lin2, nn.Linear)
    return (torch.relu(h @ lin1.weight.T + lin1.bias)) @ lin2.weight.T + lin2.bias


def test_fc_forward_matches_hand_computation_orthogonal_skip():
    m = FCResNet(3, 4, 2, 2, skip="orthogonal", scale=0.5, norm="none", seed=3).double()
    x = torch.randn(5, 3, generator=_gen(), dtype=torch.float64)
    lin = m.stem[1]
    h = torch.relu(x @ lin.weight.T + lin.bias)
    expected = [h]
    for block in m.blocks:
        Q = block.skip.weight
        h = h @ Q.T + 0.5 * _fc_branch_by_hand(block.branch, h)
        expected.append(h)
    logits = h @ m.head.weight.T + m.head.bias
    out, hiddens = m(x, return_hidden=True)
    assert len(hiddens) == 3
    for a, b in zip(hiddens, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, logits, rtol=1e-12, atol=1e-12)


def test_fc_hyper_forward_adds_mean_of_earlier_outputs():
    m = FCResNet(3, 4, 3, 2, hyper=True, scale=0.7, norm="none", seed=1).double()
    x = torch.randn(6, 3, generator=_gen(1), dtype=torch.float64)
    h0 = m.stem(x)
    b = list(m.blocks)
    h1 = h0 + 0.7 * _fc_branch_by_hand(b[0].branch, h0)
    h2 = h1 + 0.7 * _fc_branch_by_hand(b[1].branch, h1) + h0
    h3 = h2 + 0.7 * _fc_branch_by_hand(b[2].branch, h2) + (h0 + h1) / 2
    _, hiddens = m(x, return_hidden=True)
    for a, e in zip(hiddens, [h0, h1, h2, h3]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_hiddens_length_and_last_consistent_with_logits():
    for m, x in [(FCResNet(64, 16, 5, 10), torch.randn(7, 64)),
                 (FCResNet(64, 16, 4, 10), torch.randn(7, 1, 8, 8)),
                 (ConvResNet(1, 8, 3, 10, hyper=True), torch.randn(4, 1, 8, 8))]:
        m.eval()
        logits, hiddens = m(x, return_hidden=True)
        assert len(hiddens) == m.num_blocks + 1
        assert all(h.shape == hiddens[0].shape for h in hiddens)
        torch.testing.assert_close(m.readout(hiddens[-1]), logits)
        torch.testing.assert_close(m(x), logits)
        assert logits.shape == (x.shape[0], 10)


def test_conv_forward_matches_hand_computation():
    m = ConvResNet(2, 3, 2, 4, skip="orthogonal", scale=0.25, norm="none", seed=5).double()
    x = torch.randn(2, 2, 5, 5, generator=_gen(2), dtype=torch.float64)
    conv = m.stem[0]
    h = torch.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    for block in m.blocks:
        c1, c2 = block.branch[0], block.branch[2]
        f = F.conv2d(torch.relu(F.conv2d(h, c1.weight, c1.bias, padding=1)), c2.weight, c2.bias, padding=1)
        q = torch.einsum("oc,nchw->nohw", block.skip.weight, h)
        h = q + 0.25 * f
    logits = h.mean(dim=(2, 3)) @ m.head.weight.T + m.head.bias
    out, hiddens = m(x, return_hidden=True)
    torch.testing.assert_close(hiddens[-1], h, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", [False, True])
def test_orthogonal_skip_is_orthogonal_and_fixed(conv):
    m = (ConvResNet(1, 6, 3, 2, skip="orthogonal") if conv else FCResNet(4, 6, 3, 2, skip="orthogonal"))
    qs = []
    for block in m.blocks:
        assert isinstance(block.skip, OrthogonalSkip)
        Q = block.skip.weight.double()
        torch.testing.assert_close(Q @ Q.T, torch.eye(6, dtype=torch.float64), atol=1e-6, rtol=0)
        assert not any(p is block.skip.weight for p in m.parameters())  # a buffer, never trained
        qs.append(Q)
    assert not torch.allclose(qs[0], qs[1])  # independent per block


def test_branch_structure_for_fast_paths():
    m = FCResNet(4, 8, 2, 3)
    assert [type(l) for l in m.blocks[0].branch] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    m = FCResNet(4, 8, 2, 3, norm="none")
    assert [type(l) for l in m.blocks[0].branch] == [nn.Linear, nn.ReLU, nn.Linear]
    c = ConvResNet(1, 8, 2, 3)
    assert [type(l) for l in c.blocks[0].branch] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.Conv2d, nn.BatchNorm2d]
    conv = c.blocks[0].branch[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.in_channels == conv.out_channels == 8
    for block in residual_blocks(c):
        assert block.resgeom_block is True and isinstance(block, ResidualBlock)
        assert isinstance(block.skip, nn.Identity) and isinstance(block.post, nn.Identity)
        assert block.scale == 1.0


def test_skip_none_is_plain():
    m = FCResNet(3, 4, 2, 2, skip="none", norm="none").double()
    x = torch.randn(3, 3, dtype=torch.float64, generator=_gen())
    _, hs = m(x, return_hidden=True)
    for l, block in enumerate(m.blocks, start=1):
        assert isinstance(block.skip, ZeroSkip)
        torch.testing.assert_close(hs[l], _fc_branch_by_hand(block.branch, hs[l - 1]))


def test_scale_options():
    for L in (1, 4, 9):
        assert FCResNet(2, 4, L, 2, scale="1/L").blocks[0].scale == pytest.approx(1 / L)
        assert FCResNet(2, 4, L, 2, scale="1/sqrt(L)").blocks[-1].scale == pytest.approx(1 / math.sqrt(L))
    m = FCResNet(5, 8, 3, 2, scale="skipinit")
    names = [n for n, _ in m.named_parameters()]
    assert "blocks.0.scale" in names and "blocks.2.scale" in names
    x = torch.randn(4, 5, generator=_gen())
    m.eval()
    _, hs = m(x, return_hidden=True)
    for h in hs[1:]:
        torch.testing.assert_close(h, hs[0])  # lam = 0: every block is the identity at init
    m.train()
    F.cross_entropy(m(x), torch.tensor([0, 1, 0, 1])).backward()
    assert m.blocks[0].scale.grad is not None and m.blocks[0].scale.grad.abs() > 0


@pytest.mark.parametrize("norm", ["none", "batch"])
@pytest.mark.parametrize("family", ["fc", "conv"])
def test_fixup_blocks_are_identity_at_init(norm, family):
    if family == "fc":
        m, x = FCResNet(6, 8, 4, 3, init="fixup", norm=norm), torch.randn(5, 6, generator=_gen())
    else:
        m, x = ConvResNet(2, 4, 4, 3, init="fixup", norm=norm), torch.randn(3, 2, 5, 5, generator=_gen())
    logits, hs = m(x, return_hidden=True)
    for h in hs[1:]:
        torch.testing.assert_close(h, hs[0])
    assert torch.count_nonzero(logits) == 0  # Fixup zero-initialises the head


def test_fixup_rescales_non_final_layers():
    L = 9
    kaiming = FCResNet(6, 8, L, 3, init="kaiming", norm="none", seed=4)
    fixup = FCResNet(6, 8, L, 3, init="fixup", norm="none", seed=4)
    for bk, bf in zip(kaiming.blocks, fixup.blocks):
        torch.testing.assert_close(bf.branch[0].weight, bk.branch[0].weight * L ** -0.5)
        assert torch.count_nonzero(bf.branch[2].weight) == 0
        assert isinstance(bf.branch[-1], ScalarMultiplier) and bf.branch[-1].weight.item() == 1.0


def test_kaiming_statistics():
    m = FCResNet(256, 512, 2, 3, norm="none")
    w = m.blocks[0].branch[0].weight
    assert w.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.02)
    assert torch.count_nonzero(m.blocks[0].branch[0].bias) == 0


def test_seeded_and_global_rng_untouched():
    state = torch.get_rng_state()
    a, b, c = FCResNet(4, 8, 3, 2, skip="orthogonal", seed=7), FCResNet(4, 8, 3, 2, skip="orthogonal", seed=7), \
        FCResNet(4, 8, 3, 2, skip="orthogonal", seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for (n, t), (_, u), (_, v) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(t, u), n
    assert not torch.equal(a.blocks[0].skip.weight, c.blocks[0].skip.weight)
    for init in ("torch", "kaiming"):
        x = FCResNet(4, 8, 2, 2, init=init, seed=1).blocks[0].branch[0].weight
        y = FCResNet(4, 8, 2, 2, init=init, seed=1).blocks[0].branch[0].weight
        assert torch.equal(x, y)


def test_output_norm_versus_depth_at_init():
    """Scale 1 explodes without normalisation; 1/sqrt(L) and 1/L stay bounded (generous bounds)."""
    x = torch.randn(16, 32, generator=_gen(), dtype=torch.float64)

    def ratio(L, scale):
        m = FCResNet(32, 32, L, 4, norm="none", scale=scale, seed=0).double()
        with torch.no_grad():
            _, hs = m(x, return_hidden=True)
        return float(hs[-1].norm(dim=1).mean() / hs[0].norm(dim=1).mean())

    assert ratio(64, 1.0) > 1e6
    assert ratio(64, 1.0) > 100 * ratio(16, 1.0)
    for L in (1, 16, 64, 256):
        assert ratio(L, "1/L") < 3.0
        assert ratio(L, "1/sqrt(L)") < 10.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(skip="foo"), r"skip: expected one of \['identity', 'none', 'orthogonal'\], got 'foo'"),
        (dict(norm="layer"), r"norm: expected one of \['batch', 'none'\], got 'layer'"),
        (dict(init="xavier"), r"init: expected one of \['kaiming', 'fixup', 'torch'\], got 'xavier'"),
        (dict(scale="1/x"), r"scale: expected a float or one of \['1/L', '1/sqrt\(L\)', 'skipinit'\]"),
        (dict(scale=float("nan")), r"scale: expected a finite float"),
        (dict(hyper="yes"), r"hyper: expected one of \[False, True\]"),
        (dict(depth=0), r"depth: expected an int >= 1, got 0"),
        (dict(seed=1.5), r"seed: expected an int"),
    ],
)
def test_errors_list_allowed_values(kwargs, match):
    base = dict(in_dim=4, width=8, depth=2, num_classes=3)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        FCResNet(**base)


def test_conv_errors():
    with pytest.raises(ValueError, match=r"skip: expected one of"):
        ConvResNet(1, 4, 2, 2, skip="identityy")
    with pytest.raises(ValueError, match=r"in_channels: expected an int >= 1"):
        ConvResNet(0, 4, 2, 2)
