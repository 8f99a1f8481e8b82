"""Staged ResNet-18/34/50: structure, block protocol, options."""

import pytest
import torch
from torch import nn

from resgeom_fast.models import OrthogonalSkip, ResidualBlock, ZeroSkip, resnet18, resnet34, resnet50


def _x(n=2, c=3, s=32):
    return torch.randn(n, c, s, s, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("fn, nblocks, feat", [(resnet18, 8, 512), (resnet34, 16, 512), (resnet50, 16, 2048)])
def test_usual_widths_and_blocks(fn, nblocks, feat):
    m = fn(10)
    assert len(m.blocks) == nblocks and isinstance(m.blocks, nn.ModuleList)
    assert isinstance(m.head, nn.Linear) and m.head.in_features == feat and m.head.out_features == 10
    assert all(isinstance(b, ResidualBlock) and b.resgeom_block for b in m.blocks)
    assert all(isinstance(b.post, nn.ReLU) for b in m.blocks)


def test_resnet50_full_width_forward_and_hiddens():
    m = resnet50(10).eval()
    x = _x(1)
    logits, hs = m(x, return_hidden=True)
    assert logits.shape == (1, 10) and len(hs) == 17
    shapes = [tuple(h.shape[1:]) for h in hs]
    assert shapes[0] == (64, 32, 32) and shapes[1] == (256, 32, 32)
    assert shapes[4] == (512, 16, 16) and shapes[-1] == (2048, 4, 4)
    torch.testing.assert_close(m.readout(hs[-1]), logits)


def test_basic_and_bottleneck_branch_names_match_torchvision():
    m = resnet18(10, base_width=8)
    assert [n for n, _ in m.blocks[0].branch.named_children()] == ["conv1", "bn1", "relu", "conv2", "bn2"]
    b = resnet50(10, base_width=8)
    assert [n for n, _ in b.blocks[0].branch.named_children()] == [
        "conv1", "bn1", "relu1", "conv2", "bn2", "relu2", "conv3", "bn3"]
    assert b.blocks[3].branch.conv2.stride == (2, 2)  # v1.5: stride on the 3x3
    ds = m.blocks[2].skip  # first block of stage 2
    assert isinstance(ds, nn.Sequential) and isinstance(ds[0], nn.Conv2d) and ds[0].kernel_size == (1, 1)
    assert ds[0].stride == (2, 2) and isinstance(ds[1], nn.BatchNorm2d)
    assert isinstance(m.blocks[1].skip, nn.Identity)


def test_block_formula_with_post_relu():
    m = resnet18(10, base_width=8, scale=0.5, norm="none").double().eval()
    x = _x().double()
    _, hs = m(x, return_hidden=True)
    for l in (1, 3):
        b = m.blocks[l - 1]
        expected = torch.relu(b.skip(hs[l - 1]) + 0.5 * b.branch(hs[l - 1]))
        torch.testing.assert_close(hs[l], expected)


def test_stems():
    m = resnet18(10, base_width=8)
    assert m(_x()).shape == (2, 10)
    im = resnet18(10, cifar_stem=False, base_width=8, in_channels=1)
    _, hs = im(torch.randn(2, 1, 64, 64), return_hidden=True)
    assert hs[0].shape == (2, 8, 16, 16)  # conv7x7/2 + maxpool/2


def test_skip_options_in_stages():
    none = resnet18(10, base_width=8, skip="none")
    assert all(isinstance(b.skip, ZeroSkip) for b in none.blocks)
    out, hs = none(_x(), return_hidden=True)
    assert [tuple(h.shape[1:]) for h in hs][2:4] == [(8, 32, 32), (16, 16, 16)]
    orth = resnet18(10, base_width=8, skip="orthogonal")
    assert isinstance(orth.blocks[1].skip, OrthogonalSkip)
    assert isinstance(orth.blocks[2].skip, nn.Sequential)  # downsample kept
    hyp = resnet34(10, base_width=8, hyper=True, scale="1/L")
    assert hyp.blocks[0].scale == pytest.approx(1 / 16)
    assert hyp(_x()).shape == (2, 10)


def test_fixup_staged_blocks_are_relu_of_skip():
    for fn in (resnet18, resnet50):
        m = fn(10, base_width=8, init="fixup", norm="none").eval()
        _, hs = m(_x(), return_hidden=True)
        for l, b in enumerate(m.blocks, start=1):
            torch.testing.assert_close(hs[l], torch.relu(b.skip(hs[l - 1])))


def test_staged_errors():
    with pytest.raises(ValueError, match=r"skip: expected one of \['identity', 'none', 'orthogonal'\]"):
        resnet18(10, skip="dense")
    with pytest.raises(ValueError, match=r"cifar_stem: expected one of \[False, True\]"):
        resnet18(10, cifar_stem="yes")
