"""Tiny residual networks (block protocol, duck-typed) and dense float64 ground truth helpers."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

import resgeom_fast.operators._data as _data


class Block(nn.Module):
    """forward(h) = post(skip(h) + scale * branch(h)) with resgeom_block = True."""

    resgeom_block = True

    def __init__(self, branch: nn.Module, skip: nn.Module | None = None, scale: float = 1.0,
                 post: nn.Module | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.skip = skip if skip is not None else nn.Identity()
        self.scale = scale
        self.post = post if post is not None else nn.Identity()

    def forward(self, h):
        return self.post(self.skip(h) + self.scale * self.branch(h))


def randomise_bn(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))


class FCNet(nn.Module):
    def __init__(self, d_in=5, width=6, depth=2, classes=3, bn=False, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        def branch():
            layers = [nn.Linear(width, width)] + ([nn.BatchNorm1d(width)] if bn else [])
            layers += [nn.ReLU(), nn.Linear(width, width)] + ([nn.BatchNorm1d(width)] if bn else [])
            return nn.Sequential(*layers)
        self.blocks = nn.ModuleList([Block(branch(), scale=0.7) for _ in range(depth)])
        self.head = nn.Linear(width, classes)
        randomise_bn(self, torch.Generator().manual_seed(seed + 1))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def conv_branch(cin, cout, stride=1, bn=True):
    layers = [("conv1", nn.Conv2d(cin, cout, 3, stride, 1, bias=not bn))]
    if bn:
        layers.append(("bn1", nn.BatchNorm2d(cout)))
    layers += [("relu", nn.ReLU()), ("conv2", nn.Conv2d(cout, cout, 3, 1, 1, bias=not bn))]
    if bn:
        layers.append(("bn2", nn.BatchNorm2d(cout)))
    return nn.Sequential(OrderedDict(layers))


class ConvNet(nn.Module):
    """A small staged conv ResNet: stem, one stride-1 block, one stride-2 block with downsample."""

    def __init__(self, c=3, classes=3, bn=True, seed=0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1), nn.ReLU())
        down = nn.Sequential(nn.Conv2d(c, 2 * c, 1, 2, bias=False))
        self.blocks = nn.ModuleList([
            Block(conv_branch(c, c, 1, bn), post=nn.ReLU()),
            Block(conv_branch(c, 2 * c, 2, bn), skip=down, post=nn.ReLU()),
        ])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * c, classes)
        randomise_bn(self, torch.Generator().manual_seed(seed + 1))

    def forward(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(self.pool(h))


def dense_hessian(model: nn.Module, loss_fn, x, y, names=None, batchnorm="eval", use_func=True):
    """Dense float64 Hessian of loss_fn(model(x), y) w.r.t. the named parameters (order kept).

    use_func=True: torch.func.hessian. torch.func.hessian is wrong for BatchNorm with batch
    statistics (checked against finite differences), so batchnorm="train" uses
    torch.autograd.functional.hessian.
    """
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    flat0 = torch.cat([params[n].detach().reshape(-1) for n in names])

    def f(theta):
        d, o = {}, 0
        for n, s in zip(names, shapes):
            k = int(torch.Size(s).numel())
            d[n] = theta[o:o + k].view(s)
            o += k
        with _data.module_mode(model, batchnorm):
            return loss_fn(torch.func.functional_call(model, d, (x,)), y)

    if use_func and batchnorm == "eval":
        return torch.func.hessian(f)(flat0)
    return torch.autograd.functional.hessian(f, flat0)


def dense_param_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """d model(x) / d params by torch.func.jacrev, [outputs.numel(), P] in named_parameters order
    (the model in eval mode)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def out_fn(theta):
        d, o = {}, 0
        for n in names:
            k = params[n].numel()
            d[n] = theta[o:o + k].view(params[n].shape)
            o += k
        return torch.func.functional_call(model, d, (x,))

    flat = torch.cat([params[n].reshape(-1) for n in names])
    model.eval()
    return torch.func.jacrev(out_fn)(flat).reshape(-1, flat.numel())


def rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_tuned(t: dict) -> None:
    """``t`` (one width's ``hvp_timings``) is a finished "auto" measurement: every candidate timed,
    AUTO_SAMPLES times each except candidates over CLEAR_LOSS times the best of a fully timed one
    (not timed again)."""
    from resgeom_fast.operators._autotune import AUTO_SAMPLES, CLEAR_LOSS
    done = [c for c, v in t.items() if len(v) == AUTO_SAMPLES]
    assert done and all(1 <= len(v) <= AUTO_SAMPLES for v in t.values()), t
    best = min(min(t[c]) for c in done)
    assert all(min(v) > CLEAR_LOSS * best for c, v in t.items() if c not in done), t
