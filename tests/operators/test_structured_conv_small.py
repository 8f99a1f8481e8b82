"""The conv structured products at small spatial sizes (resnet18's last stages on CIFAR-sized
images): kernels cropped to their live taps, 1x1 convs on 1x1 inputs as GEMMs, and im2col GEMMs
for convs with few output positions -- exact against full convolutions, the double backward and
the dense float64 Hessian."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resgeom_fast.operators import ggn, hessian
from resgeom_fast.operators import _structured_conv as SC
from resgeom_fast.operators._graph import trace_graph
from tests.operators._operator_nets import dense_hessian, randomise_bn, rel

CE = nn.CrossEntropyLoss()


def test_live_taps_constructed_cases():
    # 3x3 pad 1 on a 1x1 input: only the centre tap reads the input
    assert SC._live_taps(1, 3, 1, 1, 1) == (1, 1, 0)
    # 3x3 stride 2 pad 1 from 2 to 1 position: taps 1..2
    assert SC._live_taps(2, 3, 1, 2, 1) == (1, 2, 0)
    # every tap live: no crop
    assert SC._live_taps(2, 3, 1, 1, 1) is None
    assert SC._live_taps(32, 7, 3, 2, 1) is None
    # dilation 2, pad 2 on 2 positions: only the middle tap
    assert SC._live_taps(2, 3, 2, 1, 2) == (1, 1, 0)


@pytest.mark.parametrize("size,k,pad,stride,dil", [
    c for c in itertools.product([1, 2, 3, 5], [1, 2, 3, 5], [0, 1, 2, 3], [1, 2, 3], [1, 2])
    if (c[0] + 2 * c[2] - c[4] * (c[1] - 1) - 1) // c[3] + 1 >= 1])
def test_cropped_conv_equals_the_full_conv(size, k, pad, stride, dil):
    """Whenever a crop is returned, the convolution by the live taps with the new padding gives
    the full convolution's output exactly (float64, every geometry of a grid)."""
    crop = SC._live_taps(size, k, pad, stride, dil)
    if crop is None:
        return
    t0, t1, pad2 = crop
    g = torch.Generator().manual_seed(size * 1000 + k * 100 + pad * 10 + stride)
    x = torch.randn(2, 3, size, size + 1, generator=g, dtype=torch.float64)
    W = torch.randn(4, 3, k, 1, generator=g, dtype=torch.float64)
    full = F.conv2d(x, W, None, (stride, 1), (pad, 0), (dil, 1))
    cut = F.conv2d(x, W[:, :, t0:t1 + 1], None, (stride, 1), (pad2, 0), (dil, 1))
    assert cut.shape == full.shape
    assert torch.equal(cut, full) or (cut - full).abs().max() < 1e-13


class SmallNet(nn.Module):
    """A resnet-like tail at small spatial sizes: conv 3x3 on 4x4, a stride-2 block into 2x2, a
    stride-2 block into 1x1 (3x3 convs at 1x1: one live tap; a 1x1 downsample at 1x1: a GEMM),
    BatchNorm everywhere, global pool, linear head."""

    def __init__(self, c: int = 3) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Sequential(nn.Conv2d(2, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.b1 = nn.ModuleDict({"c1": nn.Conv2d(c, c, 3, 2, 1, bias=False), "n1": nn.BatchNorm2d(c),
                                 "c2": nn.Conv2d(c, c, 3, 1, 1, bias=False), "n2": nn.BatchNorm2d(c),
                                 "d": nn.Conv2d(c, c, 1, 2, bias=False), "nd": nn.BatchNorm2d(c)})
        self.b2 = nn.ModuleDict({"c1": nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), "n1": nn.BatchNorm2d(2 * c),
                                 "c2": nn.Conv2d(2 * c, 2 * c, 3, 1, 1), "n2": nn.BatchNorm2d(2 * c),
                                 "d": nn.Conv2d(c, 2 * c, 1, 2, bias=False), "nd": nn.BatchNorm2d(2 * c)})
        self.tail = nn.Conv2d(2 * c, 2 * c, 3, 1, 1)          # 1x1 input, bias, no BN
        self.fc = nn.Linear(2 * c, 3)
        randomise_bn(self, torch.Generator().manual_seed(6))

    @staticmethod
    def _block(b, x):
        out = F.relu(b["n1"](b["c1"](x)))
        out = b["n2"](b["c2"](out))
        return F.relu(out + b["nd"](b["d"](x)))

    def forward(self, x):
        h = self._block(self.b2, self._block(self.b1, self.stem(x)))
        h = F.relu(self.tail(h))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def _data(n=4, size=4):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 2, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g))


def test_small_spatial_net_crops_and_equals_double_backward_and_dense():
    model = SmallNet().double().eval()
    x, y = _data()
    graph, why = trace_graph(model, list(model.parameters()), "eval")
    assert graph is not None, why
    eng = SC.GraphHVP(graph, list(model.parameters()))
    st = eng.primal(model, x, y)
    names = {graph.nodes[i].name: sl for i, sl in st.crop.items()}
    # b2.c1 (2x2 -> 1x1, stride 2): taps 1..2; b2.c2 and tail (3x3 on 1x1): the centre tap
    assert names.get("b2_c1") == (slice(None), slice(None), slice(1, 3), slice(1, 3)), names
    assert names.get("b2_c2") == (slice(None), slice(None), slice(1, 2), slice(1, 2)), names
    assert names.get("tail") == (slice(None), slice(None), slice(1, 2), slice(1, 2)), names
    assert "stem_0" not in names and "b1_c2" not in names             # every tap live at 4x4 / 2x2

    for curv, ctor in (("hessian", hessian), ("ggn", ggn)):
        H = ctor(model, CE, (x, y), hvp="structured")
        ref = ctor(model, CE, (x, y), hvp="double_backward")
        assert H.hvp_method == "structured"
        V = torch.randn(H.shape[0], 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        for k in (1, 6):
            assert rel(H.matmat(V[:, :k]), ref.matmat(V[:, :k])) < 1e-10, curv
    H = hessian(model, CE, (x, y), hvp="structured")
    dense = dense_hessian(model, CE, x, y)
    V = torch.randn(H.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    HV = H.matmat(V)
    assert rel(HV, dense @ V) < 1e-10
    # the products at the taps that read only padding are exactly zero (their Hessian rows are)
    off = 0
    for name, p in model.named_parameters():
        if name == "tail.weight":
            block = HV[off:off + p.numel()].reshape(*p.shape, 4)
            dead = torch.ones(p.shape[2:], dtype=torch.bool)
            dead[1, 1] = False
            assert (block[:, :, dead] == 0).all()
            assert block[:, :, 1, 1].abs().max() > 0
        off += p.numel()


def test_small_spatial_float32_resnet18_tail_matches_double_backward():
    """torchvision resnet18 on 16x16 images (its last stage at 1x1: every 3x3 conv there cropped
    to one tap, the downsample a GEMM), the last stage's and the head's parameters, float32:
    within float32 round-off of the double backward."""
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=3).eval()
    randomise_bn(model, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 16, 16, generator=g)
    y = torch.randint(0, 3, (3,), generator=g)
    params = [n for n, _ in model.named_parameters() if n.startswith(("layer4", "fc"))]
    H = hessian(model, CE, (x, y), params=params, hvp="structured")
    ref = hessian(model, CE, (x, y), params=params, hvp="double_backward")
    V = torch.randn(H.shape[0], 3, generator=g)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-4


def test_flops_count_the_live_taps():
    """A 3x3 conv (pad 1) on 1x1 inputs runs only its centre tap: per sample and vector
    conv(x, M) and corr(Rg, x) at 3 x 4 multiply-adds; the Linear all six products."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 1, 1, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (5,), generator=g)
    H = hessian(model, CE, (x, y), hvp="structured")
    ref = hessian(model, CE, (x, y), hvp="double_backward")
    V = torch.randn(H.shape[0], 7, dtype=torch.float64, generator=g)
    assert rel(H.matmat(V), ref.matmat(V)) < 1e-10
    assert H.structured_flops(7) == 2 * 5 * 7 * (2 * 12 + 6 * 12)


GEOMETRIES = [  # (in_h, in_w), (kh, kw), stride, padding, dilation
    ((2, 2), (3, 3), (1, 1), (1, 1), (1, 1)),      # resnet18's third stage on CIFAR-sized images
    ((4, 4), (3, 3), (2, 2), (1, 1), (1, 1)),      # its downsampling conv
    ((4, 4), (1, 1), (2, 2), (0, 0), (1, 1)),      # the 1x1 shortcut
    ((3, 3), (3, 3), (1, 1), (0, 0), (1, 1)),      # no padding: one output position
    ((2, 3), (3, 2), (1, 2), (2, 1), (1, 1)),      # rectangular, padding beyond the input
    ((4, 4), (3, 3), (1, 1), (2, 2), (2, 2)),      # dilated
    ((2, 2), (3, 3), (3, 3), (3, 3), (1, 1)),      # an output position that reads only padding
    ((1, 1), (3, 3), (1, 1), (1, 1), (1, 1)),      # one live tap
]


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("geo", GEOMETRIES)
def test_pair_gemm_paths_equal_the_convolution(geo, cl):
    """The per-(output, input position) GEMMs of small convolutions give the convolution's
    output, input gradient, weight gradient and bias gradient (float64, NCHW and channels_last
    operands), and every (p, q, tap) triple is a tap that reads input q for output p."""
    in_hw, ksz, stride, pad, dil = geo
    g = torch.Generator().manual_seed(sum(in_hw) + 10 * sum(pad))
    L = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=stride, padding=pad, dilation=dil)
    mf = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(3, 5, *in_hw, generator=g, dtype=torch.float64).contiguous(memory_format=mf)
    W = torch.randn(7, 5, *ksz, generator=g, dtype=torch.float64).contiguous(memory_format=mf)
    b = torch.randn(7, generator=g, dtype=torch.float64)
    ref = F.conv2d(x, W, b, stride, pad, dil)
    P = SC._pairs_of(L, in_hw, ksz)
    out_hw, pairs = P.out_hw, P.pairs
    assert tuple(ref.shape[2:]) == out_hw and out_hw[0] * out_hw[1] <= SC.SMALL_PAIRS
    # the groupings hold every triple once
    assert sorted((p, q, t) for p, qts in enumerate(P.by_out) for q, t in qts) == sorted(pairs)
    assert sorted((p, q, t) for q, pts in enumerate(P.by_in) for p, t in pts) == sorted(pairs)
    assert sorted((p, q, t) for t, pqs in enumerate(P.by_tap) for p, q in pqs) == sorted(pairs)
    for p, q, t in pairs:     # output p reads input q through tap t
        (p0, p1), (q0, q1), (t0, t1) = divmod(p, out_hw[1]), divmod(q, in_hw[1]), divmod(t, ksz[1])
        assert (q0, q1) == (p0 * stride[0] - pad[0] + t0 * dil[0], p1 * stride[1] - pad[1] + t1 * dil[1])
    out = SC._fwd(L, x, W, b)
    assert rel(out, ref) < 1e-14
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64).contiguous(memory_format=mf)
    gx_ref, gw_ref, gb_ref = torch.ops.aten.convolution_backward(
        gout, x, W, [7], list(stride), list(pad), list(dil), False, [0, 0], 1, [True, True, True])
    assert rel(SC._bwd_in(L, gout, W, x.shape), gx_ref) < 1e-14
    gw, gb = SC._bwd_w(L, gout, x, W.shape)
    assert rel(gw, gw_ref) < 1e-14 and rel(gb, gb_ref) < 1e-14


SWAP_GEOMETRIES = [
    # (input hw, kernel, padding, dilation): stride-1 convs above SMALL_PAIRS output positions
    ((6, 6), (3, 3), (1, 1), (1, 1)),      # ResNet-20's 3x3 "same" convs
    ((7, 6), (3, 3), (0, 0), (1, 1)),      # no padding: pad' = 2
    ((7, 7), (5, 5), (2, 2), (1, 1)),
    ((6, 7), (3, 1), (1, 0), (1, 1)),      # rectangular kernel, padding on one axis only
    ((8, 8), (3, 3), (2, 2), (2, 2)),      # dilated
    ((6, 6), (3, 3), (2, 1), (1, 1)),      # padding beyond "same" on one axis: pad' = 0
    ((6, 6), (1, 1), (0, 0), (1, 1)),      # a 1x1 conv
]


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("geo", SWAP_GEOMETRIES)
def test_swapped_weight_gradient_equals_the_convolutions(geo, cl):
    """A stride-1 weight gradient with more output-gradient than input channels runs as the
    tap-flipped transpose of the swapped correlation (``_swapped_padding``): equal to
    ``aten.convolution_backward``'s own (float64, NCHW and channels_last), and the swap is
    refused for strides, for fewer output than input channels and where pad' would be negative."""
    in_hw, ksz, pad, dil = geo
    g = torch.Generator().manual_seed(sum(in_hw) + 7 * sum(ksz) + sum(pad))
    L = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=(1, 1), padding=pad, dilation=dil)
    mf = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(3, 4, *in_hw, generator=g, dtype=torch.float64).contiguous(memory_format=mf)
    w_shape = (11, 4, *ksz)
    out_hw = [SC._out_len(in_hw[d], ksz[d], pad[d], 1, dil[d]) for d in range(2)]
    assert out_hw[0] * out_hw[1] > SC.SMALL_PAIRS
    assert SC._swapped_padding(L, w_shape) == [(ksz[d] - 1) * dil[d] - pad[d] for d in range(2)]
    gout = torch.randn(3, 11, *out_hw, generator=g, dtype=torch.float64).contiguous(memory_format=mf)
    _, gw_ref, gb_ref = torch.ops.aten.convolution_backward(
        gout, x, x.new_empty(w_shape), [11], [1, 1], list(pad), list(dil), False, [0, 0], 1, [False, True, True])
    gw, gb = SC._bwd_w(L, gout, x, w_shape)
    assert gw.shape == gw_ref.shape and rel(gw, gw_ref) < 1e-14 and rel(gb, gb_ref) < 1e-14
    # refusals: fewer output than input channels, a stride, a padding past the kernel's reach
    assert SC._swapped_padding(L, (4, 11, *ksz)) is None
    L2 = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=(2, 1), padding=pad, dilation=dil)
    assert SC._swapped_padding(L2, w_shape) is None
    L3 = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=(1, 1),
                  padding=((ksz[0] - 1) * dil[0] + 1, pad[1]), dilation=dil)
    assert SC._swapped_padding(L3, w_shape) is None


TCONV_GEOMETRIES = [
    # (input hw, kernel, stride, padding, dilation)
    ((6, 6), (3, 3), (1, 1), (1, 1), (1, 1)),      # ResNet-20's 3x3 convs: the dilated 2-D form
    ((7, 5), (3, 1), (1, 1), (1, 0), (1, 1)),      # rectangular
    ((8, 8), (3, 3), (1, 1), (2, 2), (2, 2)),      # dilated
    ((7, 6), (3, 3), (1, 1), (0, 0), (1, 1)),      # no padding
    ((10, 10), (3, 3), (2, 2), (1, 1), (1, 1)),    # strided: the 3-D form
    ((10, 11), (1, 1), (2, 2), (0, 0), (1, 1)),    # the 1x1 stride-2 shortcut
    ((12, 9), (3, 2), (2, 1), (1, 0), (1, 2)),     # strided on one axis, dilated on the other
    ((4, 4), (3, 3), (1, 1), (1, 1), (1, 1)),      # 16 positions: the batch of N k images
    ((1, 1), (1, 1), (1, 1), (0, 0), (1, 1)),      # a GEMM
]


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("geo", TCONV_GEOMETRIES)
def test_tangent_convolutions_of_every_vector_in_either_layout(geo, cl):
    """``_tconv`` / ``_tconv_t`` give ``conv(Rx_j, W)`` / ``conv^T(Rg_j, W)`` of every vector j
    exactly (float64), from tangents in either layout, and in the stacked layout (no copy before
    the stacked weight gradients) on the stacked path."""
    in_hw, ksz, stride, pad, dil = geo
    g = torch.Generator().manual_seed(sum(in_hw) + 10 * sum(stride) + sum(dil))
    L = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=stride, padding=pad, dilation=dil)
    N, k, C, O = 3, 4, 5, 6
    W = torch.randn(O, C, *ksz, generator=g, dtype=torch.float64)
    Ws = W.contiguous(memory_format=torch.channels_last) if cl else W
    Rx = torch.randn(N, k, C, *in_hw, generator=g, dtype=torch.float64)
    ref = torch.stack([F.conv2d(Rx[:, j], W, None, stride, pad, dil) for j in range(k)], 1)
    out_hw = ref.shape[3:]
    Rg = torch.randn(N, k, O, *out_hw, generator=g, dtype=torch.float64)
    like = torch.empty(N, C, *in_hw, dtype=torch.float64)
    ref_t = torch.stack([torch.ops.aten.convolution_backward(
        Rg[:, j], like, W, None, list(stride), list(pad), list(dil), False, [0, 0], 1,
        [True, False, False])[0] for j in range(k)], 1)
    stacked = cl and SC._stacked_path(L, in_hw, ksz)
    assert stacked == (cl and out_hw[0] * out_hw[1] > SC.SMALL_PAIRS)
    for lay in (lambda t: t, lambda t: SC._bl(t, True), lambda t: SC._bs(t, True)):
        r = SC._tconv(L, lay(Rx), Ws, cl)
        rt = SC._tconv_t(L, lay(Rg), Ws, (C, *in_hw), cl)
        assert r.shape == ref.shape and rel(r, ref) < 1e-14
        assert rt.shape == ref_t.shape and rel(rt, ref_t) < 1e-14
        if stacked:     # oneDNN's float32 kernels write the stacked layout (float64 takes others)
            for t in (SC._tconv(L, lay(Rx).float(), Ws.float(), cl),
                      SC._tconv_t(L, lay(Rg).float(), Ws.float(), (C, *in_hw), cl)):
                Nn, kk, Cc, H, Wd = t.shape
                assert t.stride() == (H * Wd * kk * Cc, Cc, 1, Wd * kk * Cc, kk * Cc)
                assert SC._stack(t, kk, True).data_ptr() == t.data_ptr()      # a view


def test_stacked_layout_is_chosen_on_cpus_only():
    """The stacked layout's dilated / 3-D convolutions were measured with oneDNN: other devices
    keep the batch of N k images."""
    L = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    assert SC._stacked_path(L, (8, 8), (3, 3), torch.device("cpu"))
    assert not SC._stacked_path(L, (8, 8), (3, 3), torch.device("cuda", 0))
    assert not SC._stacked_path(L, (4, 4), (3, 3), "cpu")                  # 16 positions: the pair GEMMs


FUSED_GEOMETRIES = [
    # (input hw, kernel, stride, padding, dilation)
    ((6, 6), (3, 3), (1, 1), (1, 1), (1, 1)),      # ResNet-20's 3x3 convs
    ((7, 5), (3, 1), (1, 1), (1, 0), (1, 1)),      # rectangular
    ((8, 8), (3, 3), (1, 1), (2, 2), (2, 2)),      # dilated
    ((7, 6), (3, 3), (1, 1), (0, 0), (1, 1)),      # no padding (conv^T: padding 2)
    ((10, 10), (3, 3), (2, 2), (1, 1), (1, 1)),    # strided: forward only
    ((6, 6), (1, 1), (1, 1), (0, 0), (1, 1)),      # 1x1
]


@pytest.mark.skipif(SC._CONV_ADD is None, reason="this PyTorch has no oneDNN convolution with a sum post-op")
@pytest.mark.parametrize("geo", FUSED_GEOMETRIES)
def test_fused_conv_adds_equal_the_convolution_and_the_add(geo):
    """``_conv_add`` (oneDNN's sum post-op) adds ``conv(x, W) + b`` into ``out`` in place and
    ``_conv_t_add`` adds ``conv^T(g, W)`` of a stride-1 conv (float32, channels_last), equal to
    the convolution and a separate add; both decline, leaving ``out`` as it was, where they do not
    apply (float64, NCHW operands, a stride for conv^T, a padding past the kernel's reach)."""
    in_hw, ksz, stride, pad, dil = geo
    g = torch.Generator().manual_seed(sum(in_hw) + 10 * sum(stride) + sum(dil) + sum(pad))
    cl = torch.channels_last
    L = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=stride, padding=pad, dilation=dil)
    x = torch.randn(3, 5, *in_hw, generator=g).contiguous(memory_format=cl)
    W = torch.randn(12, 5, *ksz, generator=g).contiguous(memory_format=cl)
    b = torch.randn(12, generator=g)
    y = F.conv2d(x, W, b, stride, pad, dil)
    r0 = torch.randn(y.shape, generator=g).contiguous(memory_format=cl)
    out = r0.clone()
    assert SC._conv_add(x, W, b, out, stride, pad, dil)
    assert rel(out, r0 + y) < 1e-6
    # conv^T(g, W): [3, 12, H', W'] -> [3, 5, H, W]
    gout = torch.randn(y.shape, generator=g).contiguous(memory_format=cl)
    gx = torch.ops.aten.convolution_backward(gout, x, W, None, list(stride), list(pad), list(dil), False,
                                             [0, 0], 1, [True, False, False])[0]
    s0 = torch.randn(x.shape, generator=g).contiguous(memory_format=cl)
    out = s0.clone()
    fused = SC._conv_t_add(L, gout, W, out)
    assert fused == (tuple(stride) == (1, 1))
    assert rel(out, s0 + gx) < 1e-6 if fused else torch.equal(out, s0)
    # declined: nothing written
    for args in [(x.double(), W.double(), b.double(), r0.double()),
                 (x.contiguous(), W, b, r0.clone()), (x, W, b, r0.contiguous())]:
        before = args[3].clone()
        assert not SC._conv_add(*args, stride, pad, dil) and torch.equal(args[3], before)
    far = SC.GNode(kind="affine", name="c", args=[0], layer="conv", stride=(1, 1),
                   padding=((ksz[0] - 1) * dil[0] + 1, pad[1]), dilation=dil)
    assert not SC._conv_t_add(far, gout, W, s0.clone())


@pytest.mark.skipif(SC._CONV_ADD is None, reason="this PyTorch has no oneDNN convolution with a sum post-op")
def test_stacked_view_is_the_same_memory_or_none():
    """``_stacked_view`` gives tangents held in the stacked layout as their channels_last
    ``[N, k C, H, W]`` view of the same memory, and None for any other layout."""
    t = torch.randn(2, 3, 4, 5, 6)
    s = SC._bs(t, True)
    v = SC._stacked_view(s)
    assert v is not None and v.data_ptr() == s.data_ptr() and v.shape == (2, 12, 5, 6)
    assert v.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(v, t.reshape(2, 12, 5, 6))
    assert SC._stacked_view(t) is None and SC._stacked_view(SC._bl(t, True)) is None
    assert SC._stacked_view(torch.randn(2, 3, 4)) is None
