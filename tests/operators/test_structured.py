"""The structured (autograd-free) Hessian path against dense float64 Hessians, and its refusals."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.operators._operator_nets import Block, FCNet, dense_hessian, randomise_bn, rel
from resgeom_fast.models import FCResNet
from resgeom_fast.operators import block_hessians, ggn, hessian

CE = nn.CrossEntropyLoss()


def _data(n=24, d=5, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _fc(seed=0, **kw):
    m = FCResNet(5, 6, 3, 3, seed=seed, **kw).double()
    if kw.get("norm", "batch") == "batch":
        randomise_bn(m, torch.Generator().manual_seed(seed + 1))
    return m.eval()


class PostReLUNet(nn.Module):
    """stem / blocks / pool / head with ReLU after every sum, a scaled skip and affine-free BN."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.ReLU())
        branch = lambda: nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(),  # noqa: E731
                                       nn.Linear(6, 6))
        self.blocks = nn.ModuleList([Block(branch(), scale=0.6, post=nn.ReLU()) for _ in range(2)])
        self.pool = nn.Identity()
        self.head = nn.Linear(6, 3)
        randomise_bn(self, torch.Generator().manual_seed(4))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.pool(h))


class PreActNet(nn.Module):
    """Pre-activation branches (BatchNorm not after a Linear) and a block with an empty branch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Sequential(nn.Linear(5, 6))
        branch = lambda: nn.Sequential(nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6), nn.BatchNorm1d(6),  # noqa: E731
                                       nn.ReLU(), nn.Linear(6, 6, bias=False))
        self.blocks = nn.ModuleList([Block(branch(), scale=0.8), Block(nn.Sequential(nn.Identity()), scale=0.5),
                                     Block(branch())])
        self.pool = nn.Identity()
        self.head = nn.Linear(6, 3)
        randomise_bn(self, torch.Generator().manual_seed(6))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.pool(h))


class GeluNet(nn.Module):
    """A user's FC ResNet with a GELU: the structured path names the node it does not cover."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.inp, self.w1, self.w2, self.out = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.GELU()

    def forward(self, x):
        h = self.inp(x)
        h = h + self.w2(self.act(self.w1(h)))
        return self.out(h)


CASES = {
    "fc_bn": lambda: _fc(),
    "fc_plain": lambda: _fc(norm="none"),
    "fc_noskip": lambda: _fc(skip="none"),
    "fc_orthogonal": lambda: _fc(skip="orthogonal", scale="1/L"),
    "post_relu_images": lambda: PostReLUNet().double(),
    "preact_empty_branch": lambda: PreActNet().double(),
    "fcnet_traced": lambda: FCNet(bn=True).double(),      # no pool module: the traced graph's engine
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hvp", ["auto", "structured"])
def test_equals_dense_hessian(case, hvp):
    model = CASES[case]()
    x, y = _data()
    if case == "post_relu_images":
        x = x[:, :4].reshape(-1, 1, 2, 2)       # the stem flattens
    loss = nn.functional.cross_entropy if case == "fc_plain" else CE   # the function is recognised too
    H = hessian(model, loss, (x, y), hvp=hvp)
    dense = dense_hessian(model, CE, x, y)
    assert H.structured_off is None
    V = torch.randn(H.shape[0], 4, dtype=torch.float64)
    assert rel(H.matmat(V), dense @ V) < 1e-10
    assert H.hvp_choice(4) == "structured"
    assert H.verification[4]["structured"] < 1e-10       # its first product, against the double backward
    assert rel(H.matmat(V[:, :1]), dense @ V[:, :1]) < 1e-10
    assert rel(H.to_dense(), dense) < 1e-10


def test_param_subsets_and_block_hessians():
    model = _fc()
    x, y = _data()
    dense = dense_hessian(model, CE, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    offs, o = {}, 0
    for n, p in model.named_parameters():
        offs[n] = (o, o + p.numel())
        o += p.numel()
    chosen = ["blocks.1.branch.0.weight", "blocks.1.branch.1.weight", "head.bias"]
    idx = torch.cat([torch.arange(*offs[n]) for n in chosen])
    H = hessian(model, CE, (x, y), params=chosen, hvp="structured")
    assert rel(H.to_dense(), dense[idx][:, idx]) < 1e-10
    for op, blk in zip(block_hessians(model, CE, (x, y), hvp="structured"), model.blocks):
        bn = [n for n in names if n.startswith(f"blocks.{list(model.blocks).index(blk)}.")]
        bidx = torch.cat([torch.arange(*offs[n]) for n in bn])
        assert rel(op.to_dense(), dense[bidx][:, bidx]) < 1e-10


def test_frozen_parameters_are_constants():
    model = _fc()
    model.stem[1].weight.requires_grad_(False)
    x, y = _data()
    H = hessian(model, CE, (x, y), hvp="structured")
    assert rel(H.to_dense(), dense_hessian(model, CE, x, y)) < 1e-10


@pytest.mark.parametrize("cache", [False, True])
def test_dataloader_accumulation(cache):
    model = _fc()
    x, y = _data(n=30)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)             # 8, 8, 8, 6
    H = hessian(model, CE, loader, hvp="structured", cache=cache)
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel(H.matmat(V), dense_hessian(model, CE, x, y) @ V) < 1e-10
    assert rel(H.matmat(V), hessian(model, CE, (x, y), hvp="double_backward").matmat(V)) < 1e-10


def test_float32_close_to_dense():
    model = _fc()
    x, y = _data()
    dense = dense_hessian(model, CE, x, y)
    H = hessian(model.float(), CE, (x.float(), y))                      # auto: structured, MKL and oneDNN
    V = torch.randn(H.shape[0], 5)
    for _ in range(5):
        assert rel(H.matmat(V).double(), dense @ V.double()) < 1e-4
    assert H.hvp_choice(5).startswith("structured")
    assert all(d < 1e-4 for d in H.verification[5].values())
    # only the matmul library differs between the candidates: the choice carries over to other
    # pass widths (each still verified at its first product), with no new measurements
    assert H.hvp_choice(3) == H.hvp_choice(5) and 3 not in H.hvp_timings
    assert rel(H.matmat(V[:, :3]).double(), dense @ V[:, :3].double()) < 1e-4
    assert H.hvp_choice(5) in H.verification[3]


class WrongForward(nn.Module):
    """Has stem / blocks / pool / head, but its forward is not their composition."""

    def __init__(self) -> None:
        super().__init__()
        inner = _fc()
        self.stem, self.blocks, self.pool, self.head = inner.stem, inner.blocks, inner.pool, inner.head

    def forward(self, x):
        h = self.stem(x)
        for b in reversed(self.blocks):         # the blocks in the wrong order
            h = b(h)
        return self.head(h)


class SoftCE(nn.Module):
    def forward(self, out, y):
        return nn.functional.cross_entropy(out, y)


@pytest.mark.parametrize("case,why", [
    ("train", "batchnorm='train'"),
    ("mse", "not nn.CrossEntropyLoss"),
    ("ce_lambda", "not nn.CrossEntropyLoss"),
    ("skipinit", "node 'blocks_0_scale' (get_attr blocks.0.scale) reads a chosen parameter functionally"),
    ("hyper", "torch.fx could not trace the model"),
    ("gelu", "node 'act' (GELU) is not covered"),
    ("weighted_ce", "not nn.CrossEntropyLoss"),
])
def test_refused_models_fall_back_with_the_reason(case, why):
    x, y = _data()
    loss, batchnorm = CE, "eval"
    if case == "train":
        model, batchnorm = _fc(), "train"
    elif case == "mse":
        model, loss = _fc(), lambda o, t: ((o - nn.functional.one_hot(t, 3).double()) ** 2).mean()
    elif case == "ce_lambda":       # same numbers, but an arbitrary callable: not recognised
        model, loss = _fc(), lambda o, t: nn.functional.cross_entropy(o, t)
    elif case == "skipinit":
        model = _fc(scale="skipinit")
    elif case == "hyper":
        model = _fc(hyper=True)
    elif case == "gelu":
        model = GeluNet().double()
    else:
        model, loss = _fc(), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    H = hessian(model, loss, (x, y), batchnorm=batchnorm)
    assert H.structured_off is not None and why in H.structured_off
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    assert rel(H.matmat(V), dense_hessian(model, loss, x, y, batchnorm=batchnorm, use_func=case != "train") @ V) < 1e-8
    assert H.hvp_choice(1) == "double_backward"                 # not the structured path
    with pytest.raises(ValueError, match=f"hvp='structured' does not apply: .*{re.escape(why)}"):
        hessian(model, loss, (x, y), batchnorm=batchnorm, hvp="structured")


def test_ggn_structured_path_on_fc_nets():
    """The GGN's structured path (the traced graph's engine) equals its double backward."""
    x, y = _data()
    for model in (_fc(), FCNet(bn=True).double()):
        G = ggn(model, CE, (x, y), hvp="structured")
        ref = ggn(model, CE, (x, y), hvp="double_backward")
        V = torch.randn(G.shape[0], 3, dtype=torch.float64)
        assert G.structured_off is None and G.hvp_choice(3) == "structured"
        assert rel(G.matmat(V), ref.matmat(V)) < 1e-10


@pytest.mark.parametrize("case", ["wrong_forward", "soft_labels"])
def test_caught_at_the_first_product(case):
    """A model whose forward is not the recognised composition, or labels that are not class
    indices: found at the first product, which is then the double backward's (auto) or an error."""
    x, y = _data()
    if case == "wrong_forward":
        model, loss, why = WrongForward().double(), CE, "do not reproduce model"
    else:
        model, loss, why = _fc(), CE, "not a 1-D tensor of class indices"
        y = nn.functional.one_hot(y, 3).double() * 0.8 + 0.2 / 3
    dense = dense_hessian(model, loss, x, y)
    H = hessian(model, loss, (x, y))
    assert H.structured_off is None                     # recognised by its modules...
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    for _ in range(3):
        assert rel(H.matmat(V), dense @ V) < 1e-8       # ...but never its numbers
    assert why in H.structured_off and H.verification[3]["structured"] == float("inf")
    with pytest.raises(RuntimeError, match=f"hvp='structured': .*{why}"):
        hessian(model, loss, (x, y), hvp="structured").matmat(V)


def test_clear_cache_after_a_parameter_change():
    model = _fc()
    x, y = _data()
    H = hessian(model, CE, (x, y), hvp="structured")
    V = torch.randn(H.shape[0], 2, dtype=torch.float64)
    H.matmat(V)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    H.clear_cache()
    assert rel(H.matmat(V), dense_hessian(model, CE, x, y) @ V) < 1e-10


@pytest.mark.parametrize("chunk", [1, 5, 24])
def test_tangent_passes_in_sample_blocks(chunk):
    """The tangent passes run over blocks of samples (the batch's mean kept): any block size gives
    the same products."""
    model = _fc()
    x, y = _data()
    H = hessian(model, CE, (x, y), hvp="structured")
    H._engine.structured.chunk = chunk
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    assert rel(H.matmat(V), dense_hessian(model, CE, x, y) @ V) < 1e-10
