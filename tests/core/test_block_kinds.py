"""Block kinds of third-party networks (torchvision / timm ResNets, MobileNetV2, ConvNeXt, ViT):
discovery (counts, kinds, indices), the decomposition block(h) == post(skip(h) + scale * branch(h))
on every block, and the residual Jacobian operator against dense jacrev / torch.func.jvp.

The ViT kinds list each EncoderBlock / timm Block as two sublayer blocks (attention, MLP): their
inputs and outputs are captured here at the points of the transformer's own forward (the block's
input, the input of the norm before the MLP, the block's output), with plain hooks.

Random weights with randomised BatchNorm statistics and ConvNeXt layer scales (timm zero-inits
the last BN of each block, ConvNeXt's layer scale starts at 1e-6: either would hide the branch),
float64, eval mode, tiny inputs. Block inputs and outputs are captured here with plain hooks,
independently of the package.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from resgeom_fast.core.blocks import (
    LayerScaleBranch,
    MathAttention,
    SelfAttentionBranch,
    SublayerBlock,
    block_kinds,
    residual_blocks,
    resolve_blocks,
)
from resgeom_fast.core.checks import ArgumentValueError
from resgeom_fast.operators import residual_jacobians
from tests.helpers import randomise_batchnorm

tv = pytest.importorskip("torchvision")

NEW_KINDS = ["timm_basic", "timm_bottleneck", "torchvision_inverted_residual", "torchvision_convnext",
             "torchvision_vit", "timm_vit"]
TOL = 1e-12  # float64; a wrong decomposition or Jacobian is off by O(1e-3) or more


def _tiny_vit() -> nn.Module:
    return tv.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16,
                                       mlp_dim=32)


def _timm(name: str, **kw) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **kw)
    return make


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(tv.models, name)()


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": _tv("resnet18"),
    "resnet50": _tv("resnet50"),
    "wide_resnet50_2": _tv("wide_resnet50_2"),
    "resnext50_32x4d": _tv("resnext50_32x4d"),
    "mobilenet_v2": _tv("mobilenet_v2"),
    "convnext_tiny": _tv("convnext_tiny"),
    "vit_tiny": _tiny_vit,
    "timm_resnet18": _timm("resnet18"),
    "timm_resnet50": _timm("resnet50"),
    "timm_seresnet18_drop_path": _timm("seresnet18", drop_path_rate=0.1),
    # a tiny timm ViT with layer scale (init_values) so that ls1 / ls2 are part of the branches
    "timm_vit_tiny": _timm("vit_tiny_patch16_224", img_size=32, depth=2, embed_dim=16, num_heads=2,
                           init_values=0.5, num_classes=3),
}


def _stage_names(depths: list[int], prefix: str = "layer{s}.{i}", first: int = 1) -> list[str]:
    return [prefix.format(s=s + first, i=i) for s, d in enumerate(depths) for i in range(d)]


# name -> (number of blocks, kind of every block, block names)
EXPECTED = {
    "resnet18": ("torchvision_basic", _stage_names([2, 2, 2, 2])),
    "resnet50": ("torchvision_bottleneck", _stage_names([3, 4, 6, 3])),
    "wide_resnet50_2": ("torchvision_bottleneck", _stage_names([3, 4, 6, 3])),
    "resnext50_32x4d": ("torchvision_bottleneck", _stage_names([3, 4, 6, 3])),
    "mobilenet_v2": ("torchvision_inverted_residual", [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]),
    "convnext_tiny": ("torchvision_convnext",
                      [f"features.{2 * s + 1}.{i}" for s, d in enumerate([3, 3, 9, 3]) for i in range(d)]),
    "vit_tiny": ("torchvision_vit", [f"encoder.layers.encoder_layer_{i}:{s}" for i in range(2)
                                     for s in ("attention", "mlp")]),
    "timm_resnet18": ("timm_basic", _stage_names([2, 2, 2, 2])),
    "timm_resnet50": ("timm_bottleneck", _stage_names([3, 4, 6, 3])),
    "timm_seresnet18_drop_path": ("timm_basic", _stage_names([2, 2, 2, 2])),
    "timm_vit_tiny": ("timm_vit", [f"blocks.{i}:{s}" for i in range(2) for s in ("attention", "mlp")]),
}


@pytest.fixture(scope="module")
def built():
    """name -> (model in float64 eval mode, a tiny input batch [2, 3, 32, 32]); built once."""
    cache: dict[str, tuple[nn.Module, torch.Tensor]] = {}

    def get(name: str) -> tuple[nn.Module, torch.Tensor]:
        if name not in cache:
            gen = torch.Generator().manual_seed(0)
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = BUILDERS[name]()
            randomise_batchnorm(model, gen, layer_scale=True)
            model = model.double().eval()
            x = torch.randn(2, 3, 32, 32, generator=gen, dtype=torch.float64)
            cache[name] = (model, x)
        return cache[name]
    return get


def _points(model: nn.Module, info) -> tuple[tuple[nn.Module, str], tuple[nn.Module, str]]:
    """Where the model's forward shows a block's input and output, written out here per kind (not
    read from the package): a ViT sublayer reads its owner's input / output and the input of the
    norm before the MLP; every other block its own module's input and output."""
    owner = model.get_submodule(info.name.split(":")[0])
    if info.kind in ("torchvision_vit", "timm_vit"):
        mid = owner.ln_2 if info.kind == "torchvision_vit" else owner.norm2
        return ((owner, "input"), (mid, "input")) if info.name.endswith(":attention") else \
            ((mid, "input"), (owner, "output"))
    return (owner, "input"), (owner, "output")


def _capture(model: nn.Module, x: torch.Tensor, infos: list):
    """Inputs and outputs of the blocks ``infos`` in one no-grad forward pass (plain hooks)."""
    ins: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    handles = []

    def hook(store: dict, i: int, where: str, m: nn.Module) -> None:
        if where == "input":
            handles.append(m.register_forward_pre_hook(lambda mod, a: store.setdefault(i, a[0].detach().clone())))
        else:
            handles.append(m.register_forward_hook(lambda mod, a, o: store.setdefault(i, o.detach().clone())))

    for i, info in enumerate(infos):
        (mi, wi), (mo, wo) = _points(model, info)
        hook(ins, i, wi, mi)
        hook(outs, i, wo, mo)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [ins[i] for i in range(len(infos))], [outs[i] for i in range(len(infos))]


def test_new_kinds_are_registered_after_the_builtin_ones():
    kinds = block_kinds()
    assert kinds[:4] == ["marked", "resgeom", "torchvision_basic", "torchvision_bottleneck"]
    assert kinds[4:10] == NEW_KINDS


def test_no_blocks_error_lists_the_registered_kinds():
    with pytest.raises(ArgumentValueError, match=r"found no residual blocks in Sequential; .*mark_residual_block") as ei:
        residual_blocks(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    msg = str(ei.value)
    assert f"the registered block kinds are {block_kinds()}" in msg
    assert all(repr(k) in msg for k in NEW_KINDS)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_discovery(built, name):
    model, _ = built(name)
    kind, names = EXPECTED[name]
    infos = residual_blocks(model)
    assert [(i.name, i.kind, i.index) for i in infos] == [(n, kind, k) for k, n in enumerate(names)]
    for i in infos:
        owner = model.get_submodule(i.name.split(":")[0])
        assert i.module is owner
        if i.sublayer is None:
            assert i.block is owner and i.input_at is None and i.output_at is None and i.owner is None
        else:  # a sublayer: its own block module, the same object on every discovery
            assert isinstance(i.block, SublayerBlock) and i.block is not owner and i.owner is owner
            assert i.name == f"{i.name.split(':')[0]}:{i.sublayer}"
    assert all(a.block is b.block for a, b in zip(infos, residual_blocks(model)))


def test_branch_structure(built):
    r = residual_blocks(built("timm_resnet18")[0])
    assert list(r[0].branch._modules) == ["conv1", "bn1", "act1", "conv2", "bn2"]
    assert r[0].post is r[0].block.act2 and isinstance(r[0].skip, nn.Identity)
    assert r[2].skip is r[2].block.downsample
    b = residual_blocks(built("timm_resnet50")[0])[0]
    assert list(b.branch._modules) == ["conv1", "bn1", "act1", "conv2", "bn2", "act2", "conv3", "bn3"]
    assert b.post is b.block.act3 and all(b.branch._modules[k] is b.block._modules[k] for k in b.branch._modules)
    se = residual_blocks(built("timm_seresnet18_drop_path")[0])[-1]  # the first has drop rate 0: None
    assert list(se.branch._modules) == ["conv1", "bn1", "act1", "conv2", "bn2", "se", "drop_path"]

    m = residual_blocks(built("mobilenet_v2")[0])
    assert all(i.branch is i.block.conv and isinstance(i.skip, nn.Identity) and isinstance(i.post, nn.Identity)
               for i in m)
    model = built("mobilenet_v2")[0]
    no_skip = [n for n, mod in model.named_modules() if type(mod).__name__ == "InvertedResidual"
               and not mod.use_res_connect]
    assert len(no_skip) == 7 and not set(no_skip) & {i.name for i in m}

    c = residual_blocks(built("convnext_tiny")[0])[0]
    assert isinstance(c.branch, LayerScaleBranch) and c.scale == 1.0
    assert c.branch.layer_scale is c.block.layer_scale and c.branch.body is c.block.block
    assert c.branch.drop is c.block.stochastic_depth

    vit = built("vit_tiny")[0]
    a, m = residual_blocks(vit)[2:4]
    enc = vit.encoder.layers[1]
    assert isinstance(a.branch, SelfAttentionBranch) and a.branch.attention is enc.self_attention
    assert a.branch.norm is enc.ln_1 and a.branch.dropout is enc.dropout and a.block.branch is a.branch
    assert list(m.branch._modules) == ["ln_2", "mlp"] and m.branch.ln_2 is enc.ln_2 and m.branch.mlp is enc.mlp
    for i in (a, m):
        assert isinstance(i.skip, nn.Identity) and isinstance(i.post, nn.Identity) and i.scale == 1.0
        assert i.owner is enc
    assert a.input_point == (enc, "input") and a.output_point == (enc.ln_2, "input")
    assert m.input_point == (enc.ln_2, "input") and m.output_point == (enc, "output")
    # the parameters of each sublayer block are exactly the sublayer's; together the EncoderBlock's
    ids = lambda ms: {id(p) for x in ms for p in x.parameters()}  # noqa: E731
    assert ids([a.block]) == ids([enc.ln_1, enc.self_attention]) and ids([m.block]) == ids([enc.ln_2, enc.mlp])
    assert ids([a.block, m.block]) == ids([enc]) and not ids([a.block]) & ids([m.block])
    # nothing registered on the model: state_dict and modules unchanged
    assert all(not isinstance(x, SublayerBlock) for x in vit.modules())
    # a block module holding sublayers selects them all, in order
    assert [b.index for b in resolve_blocks("t", vit, [enc])] == [2, 3]

    t = residual_blocks(built("timm_vit_tiny")[0])
    blk = built("timm_vit_tiny")[0].blocks[0]
    assert list(t[0].branch._modules) == ["norm", "body", "ls"] and isinstance(t[0].branch.body, MathAttention)
    assert t[0].branch.body.attention is blk.attn and t[0].branch.ls is blk.ls1
    assert list(t[1].branch._modules) == ["norm", "body", "ls"] and t[1].branch.body is blk.mlp
    assert t[0].output_point == (blk.norm2, "input") and t[1].output_point == (blk, "output")


def test_vit_b_16_has_24_sublayers():
    """12 EncoderBlocks, each an attention and an MLP sublayer (was: 12 attention blocks whose post
    was the MLP sublayer, before sublayers were blocks of their own)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = tv.models.vit_b_16()
    infos = residual_blocks(model)
    assert [(i.kind, i.index, i.sublayer) for i in infos] == [
        ("torchvision_vit", k, ("attention", "mlp")[k % 2]) for k in range(24)]
    assert [i.name for i in infos[:2]] == ["encoder.layers.encoder_layer_0:attention",
                                           "encoder.layers.encoder_layer_0:mlp"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_decomposition_on_every_block(built, name):
    """block(h), as the model computed it, equals post(skip(h) + scale * branch(h))."""
    model, x = built(name)
    infos = residual_blocks(model)
    hs, outs = _capture(model, x, infos)
    err = 0.0
    with torch.no_grad():
        for info, h, out in zip(infos, hs, outs):
            ref = info.post(info.skip(h.clone()) + info.scale * info.branch(h.clone()))
            assert ref.shape == out.shape
            err = max(err, (ref - out).abs().max().item())
            assert (ref - info.post(info.skip(h.clone()))).abs().max() > 1e-3  # the branch matters
            if info.sublayer is not None:  # the sublayer's block module computes the sublayer map
                err = max(err, (info.block(h.clone()) - out).abs().max().item())
    print(f"{name}: max |block(h) - post(skip(h) + scale branch(h))| = {err:.2e} over {len(infos)} blocks")
    assert err <= TOL


# name -> (block indices checked against a dense jacrev (small D at a 32x32 input), block indices
# checked column by column against torch.func.jvp / vjp)
JAC_CASES = {
    "resnet18": ([-1], [0]),
    "resnet50": ([], [-1]),  # D = 2048: J V and J^T U by torch.func.jvp / vjp columns (a dense
    "wide_resnet50_2": ([], [-1]),  # jacrev takes 5-15 s here)
    "resnext50_32x4d": ([], [-1]),
    "mobilenet_v2": ([-1], [0]),
    "convnext_tiny": ([-1], [0]),
    "vit_tiny": ([0, 1, 3], []),  # attention and MLP sublayers, D = 5 tokens x 16
    "timm_resnet18": ([-1], [0]),
    "timm_vit_tiny": ([0, 1], []),
}


def _dense(branch: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return torch.func.jacrev(lambda z: branch(z[None])[0])(h).reshape(-1, h.numel())


@pytest.mark.parametrize("name", list(JAC_CASES))
def test_residual_jacobian_matches_jacrev(built, name):
    model, x = built(name)
    dense_idx, jvp_idx = JAC_CASES[name]
    infos = residual_blocks(model)
    gen = torch.Generator().manual_seed(1)
    errs = []
    for idx, dense in [(i, True) for i in dense_idx] + [(i, False) for i in jvp_idx]:
        info = infos[idx]
        (h,), _ = _capture(model, x, [info])
        for path in ("generic", "auto"):  # auto: the fast path where the branch is recognised
            (op,) = residual_jacobians(model, x, blocks=[idx], path=path)
            assert op.info.block is info.block and torch.equal(op.h, h)
            d_out, d_in = op.shape
            V = torch.randn(2, d_in, 3, generator=gen, dtype=torch.float64)
            U = torch.randn(2, d_out, 3, generator=gen, dtype=torch.float64)
            JV, JtU = op.matmat(V), op.T.matmat(U)
            for b in range(2):
                if dense:
                    J = _dense(info.branch, h[b])
                    assert J.shape == (d_out, d_in) and J.abs().max() > 1e-3
                    ref_v, ref_u = J @ V[b], J.T @ U[b]
                else:
                    f = lambda z: info.branch(z)  # noqa: E731
                    hb = h[b:b + 1]
                    ref_v = torch.stack([torch.func.jvp(f, (hb,), (V[b, :, j].reshape(hb.shape),))[1].reshape(-1)
                                         for j in range(3)], 1)
                    _, pull = torch.func.vjp(f, hb)
                    out_shape = (1, *op.out_shape)
                    ref_u = torch.stack([pull(U[b, :, j].reshape(out_shape))[0].reshape(-1) for j in range(3)], 1)
                scale = max(ref_v.abs().max().item(), ref_u.abs().max().item())
                errs.append(max((JV[b] - ref_v).abs().max().item(), (JtU[b] - ref_u).abs().max().item()) / scale)
    print(f"{name}: max relative |J V - jacrev|, |J^T U - jacrev| = {max(errs):.2e}")
    assert max(errs) <= 1e-10
