"""The checks that run before a study does any work (the studies' ``validate`` functions use them).

Every check runs in resolve_config (through Study.validate) or demo_config, before the runner
creates the output folder or trains anything: a configuration that cannot work ends in one
UsageError line, never in a traceback after minutes of training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from resgeom_fast.data import expected_files

from ..common import build_model, load_data
from ..config import UsageError
from ._shared import net_spec

__all__ = ["DataInfo", "block_dim", "check_net", "check_samples", "data_info", "memory_limit", "param_count",
           "validate_alignment_options", "validate_hessian_options", "validate_net_study"]

_VISION_INFO: dict[str, tuple[int, int, tuple[int, ...], int]] = {  # train, test, [C, H, W], classes
    "mnist": (60000, 10000, (1, 28, 28), 10), "fashionmnist": (60000, 10000, (1, 28, 28), 10),
    "cifar10": (50000, 10000, (3, 32, 32), 10), "cifar100": (50000, 10000, (3, 32, 32), 100),
}


@dataclass(frozen=True)
class DataInfo:
    """What the validators need to know about a study's data set (without training on it).

    Attributes:
        name: the ``dataset`` option.
        n_train, n_test: samples of each split after the ``n_train`` option.
        input_shape: one input as the nets see it ([C, H, W] for conv nets, [d] for FC nets).
        num_classes: C.
    """

    name: str
    n_train: int
    n_test: int
    input_shape: tuple[int, ...]
    num_classes: int


def data_info(cfg: dict[str, Any]) -> DataInfo:
    """:class:`DataInfo` of ``cfg``'s data set; UsageError for an unknown or missing data set and
    for ``n_train`` above the training samples it holds. Local vision sets are not read (sizes
    from a table, file presence checked); digits and the Gaussian mixture are built (milliseconds)."""
    spec = cfg.get("dataset", "digits")
    image = cfg.get("model", "fc") == "conv"
    parts = spec.split(":", 2) if isinstance(spec, str) else []
    known = None
    if len(parts) == 3 and parts[0] == "torchvision" and parts[2] and parts[1].lower() in _VISION_INFO:
        if all(os.path.isfile(f) for f in expected_files(parts[1].lower(), parts[2])):
            known = _VISION_INFO[parts[1].lower()]
    if known is None:  # builds the set, or raises load_data's UsageError naming what is wrong
        ds = load_data(spec, image=image, seed=cfg["seed"])
        known = (int(ds.x_train.shape[0]), int(ds.x_test.shape[0]), tuple(int(d) for d in ds.x_train.shape[1:]),
                 int(ds.num_classes))
    n_tr, n_te, shape, classes = known
    if not image:
        shape = (int(math.prod(shape)),)
    n_train = cfg.get("n_train")
    if n_train is not None:
        if n_train > n_tr:
            raise UsageError(f"n_train: expected an int <= {n_tr} (the training samples of {spec}), got {n_train}")
        n_tr = n_train
    return DataInfo(spec, n_tr, n_te, shape, classes)


def check_samples(cfg: dict[str, Any], name: str, available: int, split: str, info: DataInfo) -> None:
    """A UsageError when option ``name`` asks for more than the ``available`` samples of ``split``."""
    if cfg[name] > available:
        raise UsageError(f"{name}: expected an int <= {available} (the {split} samples of {info.name}"
                         f"{' after n_train' if split == 'training' and cfg.get('n_train') is not None else ''}), "
                         f"got {cfg[name]}")


def memory_limit(device: str) -> Optional[tuple[int, str]]:
    """(bytes, description) of the memory of ``device``; None when unknown."""
    try:
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                return None
            dev = torch.device(device)
            props = torch.cuda.get_device_properties(dev.index if dev.index is not None else 0)
            return int(props.total_memory), f"the {props.total_memory:.3g} bytes of {device}"
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total), f"the {total:.3g} bytes of this machine's memory"
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def param_count(spec: dict[str, Any]) -> int:
    """Trainable parameters of ``build_model(spec)``, built on the meta device (no memory used)."""
    with torch.device("meta"):
        model = build_model(spec)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def check_net(cfg: dict[str, Any], info: DataInfo, depth: int, width: Optional[int] = None,
               extra_bytes_per_param: int = 0, what: str = "width, depth") -> int:
    """Refuse a net that cannot fit in memory; returns its trainable parameter count P.

    The estimate is a lower bound: P float32 values for the weights, the gradients, SGD's momentum
    and one spare copy (16 bytes per parameter, plus ``extra_bytes_per_param`` for an analysis'
    own vectors), plus one batch of activations (6 [batch, width, spatial] tensors per block). A
    refusal therefore means the run certainly cannot fit. P is first bounded from below without
    building anything (2 width^2 per FC block, 18 width^2 per conv block), then counted exactly on
    the meta device.
    """
    w = cfg["width"] if width is None else width
    conv = cfg.get("model", "fc") == "conv"
    spatial = int(math.prod(info.input_shape[1:])) if conv else 1
    per_param = 16 + extra_bytes_per_param
    act = 6 * 4 * depth * cfg.get("batch_size", 64) * w * spatial
    lower = depth * (18 if conv else 2) * w * w
    limit = memory_limit(cfg.get("device", "cpu"))

    def refuse(p: int, exact: bool) -> None:
        need = per_param * p + act
        if limit is not None and need > limit[0]:
            raise UsageError(f"{what}: expected a net that fits in memory: a {'conv' if conv else 'fc'} net of width "
                             f"{w} and depth {depth} has {'' if exact else 'at least '}{p:.3g} parameters, about "
                             f"{need:.3g} bytes to train and analyse, more than {limit[1]}; got width {w}, "
                             f"depth {depth}")

    refuse(lower, False)
    spec = net_spec(cfg, _FakeDs(info), "residual", depth)
    spec["width"] = w
    p = param_count(spec)
    refuse(p, True)
    return p


@dataclass(frozen=True)
class _FakeDs:
    """The two attributes of a Dataset that :func:`net_spec` reads, from a :class:`DataInfo`."""

    info: DataInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape


def block_dim(cfg: dict[str, Any], info: DataInfo) -> int:
    """D of the residual Jacobians J_l (width for FC nets, width * H * W for conv nets)."""
    if cfg.get("model", "fc") == "conv":
        return cfg["width"] * int(math.prod(info.input_shape[1:]))
    return cfg["width"]


def validate_alignment_options(cfg: dict[str, Any], info: DataInfo) -> None:
    """The alignment options: k <= D, align_samples <= test samples, every depth's net fits."""
    D = block_dim(cfg, info)
    k = cfg.get("k")
    if k is not None and k > D:
        raise UsageError(f"k: expected an int in [1, {D}] (the block dimension D of the residual Jacobians: "
                         f"{'width' if cfg.get('model', 'fc') == 'fc' else 'width * H * W'} = {D}), got {k}")
    check_samples(cfg, "align_samples", info.n_test, "test", info)
    for L in cfg["depths"]:
        check_net(cfg, info, L, what="width, depths")


def validate_hessian_options(cfg: dict[str, Any], info: DataInfo, archs: list[str]) -> None:
    """The Hessian options: hessian_samples <= training samples, eigs and lanczos_steps <= P of the smallest net."""
    check_samples(cfg, "hessian_samples", info.n_train, "training", info)
    sizes = []
    for arch in archs:
        spec = net_spec(cfg, _FakeDs(info), arch)
        sizes.append((param_count(spec), arch))
    p, arch = min(sizes)
    for name in ("eigs", "lanczos_steps"):
        if cfg[name] > p:
            raise UsageError(f"{name}: expected an int <= {p} (the parameters P of the {arch} net, the Hessian's "
                             f"dimension), got {cfg[name]}")


def validate_net_study(cfg: dict[str, Any], extra_bytes_per_param: int = 0) -> DataInfo:
    """The data set and the study's net (it must fit in memory); returns the data's :class:`DataInfo`."""
    info = data_info(cfg)
    check_net(cfg, info, cfg["depth"], extra_bytes_per_param=extra_bytes_per_param)
    return info
