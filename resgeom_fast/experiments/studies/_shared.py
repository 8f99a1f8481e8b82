"""What several studies share: their options, data, nets, training and analysis steps.

- options: :data:`SEED_MAX`, :data:`DETERMINISTIC_OPTION`, :func:`net_options` (data, net and
  training options), :func:`opt`, :data:`ALIGN_OPTIONS`, :data:`HESSIAN_OPTIONS`,
  :func:`arch_option` and :func:`parse_archs` (the ``archs`` comma list);
- steps: :func:`study_data`, :func:`net_spec`, :func:`train_net` (a resumable training step),
  :func:`analysis_step`, :func:`alignment_step`, :func:`spectrum_step`, :func:`depth_scaling_step`.

Each step runs through the :class:`~resgeom_fast.experiments.runner.Runner` and returns the
step's JSON-friendly result (``{"result": ..., "summary": ...}`` for an analysis).

Under torch.distributed (a distributed Runner, :mod:`~resgeom_fast.experiments.runner`):
:func:`train_net` trains on rank 0 alone (with its checkpoints) and broadcasts the weights, and
the alignment and spectrum steps split their samples over the ranks (:func:`dist_kwargs`:
``"split"``) on rank 0's weights (:func:`share_weights`); the other analyses run replicated on
every rank with the same data and seeds.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

# modules, not functions: a study calls residual_alignment / hessian_spectrum through them, so
# that a wrapper installed on the analysis module (the tests' spies) sees every call
from resgeom_fast.analysis import alignment as alignment_analysis
from resgeom_fast.analysis import spectrum as spectrum_analysis
from resgeom_fast.analysis.spectrum import K_MAX as SPECTRUM_K_MAX
from resgeom_fast.core import distributed as rdist
from resgeom_fast.models import BiasReg

from ..common import DATASETS_HELP, build_model, load_data, train_step
from ..config import Option, UsageError
from ..runner import Runner

__all__ = ["ALIGN_OPTIONS", "ARCHS", "ARCH_CHOICES", "DETERMINISTIC_OPTION", "HESSIAN_OPTIONS", "SEED_MAX",
           "alignment_step", "analysis_step", "arch_option", "depth_scaling_step", "dist_kwargs", "net_options",
           "net_spec", "opt", "parse_archs", "share_weights", "spectrum_step", "split_inputs", "study_data", "train_curves", "train_kwargs",
           "train_net"]

# =============================================================================== options
SEED_MAX = 2**32 - 1  # scikit-learn's random_state (the digits split) takes seeds in [0, 2^32 - 1]
DETERMINISTIC_OPTION = Option("deterministic", "bool", False,
                              "fix every method choice of the analyses (no 'auto' choice by timing): the same "
                              "command gives the same numbers; false: float32 round-off may differ between runs")


def net_options(width: int = 64, depth: int = 8, epochs: int = 15, lr: float = 0.05, weight_decay: float = 0.0,
                schedule: str = "constant") -> list[Option]:
    """The data, net and training options of a study that trains nets (defaults as given)."""
    return [
        Option("dataset", "str", "digits", f"data set: {DATASETS_HELP}"),
        Option("n_train", "optint", None, "keep only the first n training samples (null: all)", minimum=2),
        Option("model", "str", "fc", "network family: fc (FCResNet) or conv (ConvResNet on images)", ("fc", "conv")),
        Option("width", "int", width, "width D of every h_l (channels for conv)", minimum=1),
        Option("depth", "int", depth, "number of residual blocks L", minimum=1),
        Option("norm", "str", "batch", "normalisation inside the branches", ("batch", "none")),
        Option("epochs", "int", epochs, "training epochs (SGD, momentum 0.9)", minimum=0),
        Option("lr", "float", lr, "learning rate", minimum=0),
        Option("weight_decay", "float", weight_decay, "SGD weight decay", minimum=0),
        Option("schedule", "str", schedule, "learning-rate schedule", ("constant", "cosine", "multistep")),
        Option("batch_size", "int", 64, "training batch size", minimum=1),
        Option("seed", "int", 0, "seed of data split, weights, training and probes", minimum=0, maximum=SEED_MAX),
        Option("device", "str", "cpu", "cpu | cuda | cuda:N"),
        DETERMINISTIC_OPTION,
    ]


def opt(name: str, type_: str, default: Any, help_: str, choices: Optional[tuple] = None,
        minimum: Optional[float] = None, maximum: Optional[float] = None) -> Option:
    """An :class:`Option` from positional arguments (the studies' option tables)."""
    return Option(name, type_, default, help_, choices, minimum, maximum)


ALIGN_OPTIONS = [
    opt("align_samples", "int", 64, "test inputs of the alignment analysis", minimum=1),
    opt("k", "optint", None, "singular triplets per block (null: C + 5)", minimum=1),
    opt("oversample", "int", 10, "randomized SVD oversampling", minimum=0),
    opt("power_iters", "optint", None, "randomized SVD power iterations (null: adaptive, iterate until the "
        "a-posteriori error bound meets the tolerance; the achieved accuracy is reported either way)", minimum=0),
    opt("depths", "ints", [4, 8, 16], "depths of the residual nets of the RA4 comparison", minimum=1),
]
HESSIAN_OPTIONS = [
    opt("hessian_samples", "int", 512, "training samples of the loss whose Hessian is analysed", minimum=1),
    opt("eigs", "int", 4, "extreme eigenvalues (both ends), at most the parameters P and hessian_spectrum's K_MAX",
        minimum=2, maximum=SPECTRUM_K_MAX),
    opt("probes", "int", 4, "SLQ probes", minimum=1),
    opt("lanczos_steps", "int", 40, "Lanczos steps per SLQ probe", minimum=2),
    opt("trace_probes", "int", 30, "Hutch++ products of the trace", minimum=3),
]
ARCH_CHOICES = ("plain", "residual", "hyper", "orthogonal", "plain_biasreg")


# =============================================================================== steps
def study_data(cfg: dict[str, Any]):
    """(the study's Dataset, the key that describes it to the runner's steps)."""
    image = cfg.get("model", "fc") == "conv"
    ds = load_data(cfg.get("dataset", "digits"), image=image, n_train=cfg.get("n_train"), seed=cfg["seed"])
    key = {"dataset": cfg.get("dataset", "digits"), "n_train": cfg.get("n_train"), "seed": cfg["seed"], "image": image}
    return ds, key


ARCHS = {  # name -> (skip, hyper)
    "plain": ("none", False), "residual": ("identity", False), "hyper": ("identity", True),
    "orthogonal": ("orthogonal", False), "plain_biasreg": ("none", False),
}


def net_spec(cfg: dict[str, Any], ds, arch: str = "residual", depth: Optional[int] = None) -> dict[str, Any]:
    """The :func:`~resgeom_fast.experiments.common.build_model` spec of the ``arch`` net of ``cfg``
    (``depth`` instead of ``cfg["depth"]`` when given) for data ``ds`` (reads num_classes, input_shape)."""
    skip, hyper = ARCHS[arch]
    spec: dict[str, Any] = {"kind": cfg.get("model", "fc"), "width": cfg["width"],
                            "depth": depth if depth is not None else cfg["depth"], "num_classes": ds.num_classes,
                            "skip": skip, "hyper": hyper, "norm": cfg.get("norm", "batch"), "seed": cfg["seed"]}
    if spec["kind"] == "fc":
        spec["in_dim"] = int(math.prod(ds.input_shape))
    else:
        spec["in_channels"] = int(ds.input_shape[0])
    return spec


def train_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`resgeom_fast.train.train` for ``cfg`` (SGD, momentum 0.9)."""
    return {"epochs": cfg["epochs"], "lr": cfg["lr"], "momentum": 0.9, "batch_size": cfg["batch_size"],
            "seed": cfg["seed"], "optimizer": "sgd", "weight_decay": cfg.get("weight_decay", 0.0),
            "schedule": cfg.get("schedule", "constant")}


def train_net(runner: Runner, cfg: dict[str, Any], ds, key, arch: str, device: torch.device,
              depth: Optional[int] = None, name: Optional[str] = None, callbacks: tuple = ()):
    """(the trained ``arch`` net in eval mode, its :func:`train_curves`): the resumable step
    ``train_<name>`` (name: ``arch``, or ``<arch>_L<depth>`` for another depth)."""
    if depth is not None and depth == cfg["depth"] and name is None:
        # the study's own `arch` net: the same spec, data and training, hence the same checkpoint
        # hash; it is trained once, under the name `arch`, and loaded from there the second time
        runner.message(f"{arch}_L{depth}: the same configuration as {arch}; using the step train_{arch} and its "
                       "checkpoint")
        depth = None
    regs: tuple = ()
    if arch == "plain_biasreg":
        regs = (BiasReg(beta=cfg.get("biasreg_beta", 1e-3), b0=cfg.get("biasreg_b0", 0.1)),)
    name = name or (arch if depth is None else f"{arch}_L{depth}")
    spec = net_spec(cfg, ds, arch, depth)
    if not runner.distributed:
        model, out = train_step(runner, name, spec, ds, key, train_kwargs(cfg), device, regularizers=regs,
                                callbacks=callbacks)
        return model, train_curves(out)
    # rank 0 trains (or loads its checkpoint); the others build the same net and take its weights
    trained = runner.on_rank0(f"train_{name}", lambda: train_step(
        runner, name, spec, ds, key, train_kwargs(cfg), device, regularizers=regs, callbacks=callbacks))
    model = trained[0] if trained is not None else build_model(spec).to(device).eval()
    out = share_weights(runner, model, f"train_{name}", trained[1] if trained is not None else None)
    return model, train_curves(out)


def share_weights(runner: Runner, model: torch.nn.Module, what: str, extra: Any = None) -> Any:
    """Collective (ONE broadcast) when ``runner`` is distributed: every rank's ``model`` takes
    rank 0's parameters and buffers (in place), and rank 0's ``extra`` is returned on every rank.
    Alone: ``extra``. A data-parallel analysis combines the ranks' partial results, so they must
    come from the same weights, however each rank got its model (a study that trains on every
    rank, a rank that skipped a step rank 0 loaded)."""
    if not runner.distributed:
        return extra
    payload = ({k: v.detach().cpu() for k, v in model.state_dict().items()}, extra) if runner.is_writer else None
    state, extra = rdist.broadcast_object(payload, fn=what)
    if not runner.is_writer:
        model.load_state_dict(state)
    return extra


def dist_kwargs(runner: Runner) -> dict[str, Any]:
    """The keyword arguments of an analysis that splits its data over the ranks:
    ``{"distributed": "split"}`` (every rank passes the same full data, the analysis takes its
    share) when ``runner`` is distributed, else ``{}`` (the single-process call)."""
    return {"distributed": "split"} if runner.distributed else {}


def train_curves(train_out: dict[str, Any]) -> dict[str, Any]:
    """Per-epoch lists (epoch, losses, accuracies, callbacks) and the final numbers of a training step."""
    hist = train_out["history"]
    return {"epoch": [h["epoch"] for h in hist], "train_loss": [h["train_loss"] for h in hist],
            "train_acc": [h["train_acc"] for h in hist], "test_loss": [h["test_loss"] for h in hist],
            "test_acc": [h["test_acc"] for h in hist], "final": train_out["final"],
            "callbacks": [h.get("callbacks") for h in hist]}


def analysis_step(runner: Runner, name: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """Step ``name``: ``{"result": fn().to_dict(), "summary": fn().summary()}`` (fn called once)."""
    def run() -> dict[str, Any]:
        r = fn()
        return {"result": r.to_dict(), "summary": r.summary()}

    return runner.step(name, run)


def split_inputs(ds, split: str, n: int, device: torch.device):
    """The first ``n`` (inputs, labels) of ``split`` ("train" / "test") on ``device``."""
    x, y = ds.tensors(split)
    return x[:n].to(device), y[:n].to(device)


def alignment_step(runner: Runner, cfg: dict, model, ds, device, name: str) -> dict[str, Any]:
    """Step ``name``: residual_alignment of ``model`` on the first ``align_samples`` test inputs
    (distributed: sample-parallel, on rank 0's weights, :func:`share_weights`)."""
    x, y = split_inputs(ds, "test", cfg["align_samples"], device)

    def run():
        share_weights(runner, model, name)
        return alignment_analysis.residual_alignment(
            model, x, cfg.get("k"), y, oversample=cfg["oversample"], power_iters=cfg["power_iters"], seed=cfg["seed"],
            deterministic=bool(cfg.get("deterministic", False)), **dist_kwargs(runner))

    return analysis_step(runner, name, run)


def spectrum_step(runner: Runner, cfg: dict, model, ds, device, name: str) -> dict[str, Any]:
    """Step ``name``: hessian_spectrum of the cross-entropy of ``model`` on ``hessian_samples``
    training samples (distributed: data-parallel Hessian products, on rank 0's weights)."""
    x, y = split_inputs(ds, "train", cfg["hessian_samples"], device)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = min(cfg["lanczos_steps"], dim)

    def run():
        share_weights(runner, model, name)
        return spectrum_analysis.hessian_spectrum(
            model, F.cross_entropy, (x, y), k=min(cfg["eigs"], dim), probes=cfg["probes"], steps=steps,
            trace_probes=cfg["trace_probes"], seed=cfg["seed"], progress=runner.progress,
            deterministic=bool(cfg.get("deterministic", False)), **dist_kwargs(runner))

    return analysis_step(runner, name, run)


def depth_scaling_step(runner: Runner, cfg: dict, ds, key, device) -> dict[str, Any]:
    """RA4: residual nets of several depths, alignment of each, depth_scaling over them."""

    def run() -> dict[str, Any]:
        results, per = [], []
        x, y = split_inputs(ds, "test", cfg["align_samples"], device)
        for L in cfg["depths"]:
            model, _ = train_net(runner, cfg, ds, key, "residual", device, depth=L)
            r = alignment_analysis.residual_alignment(model, x, cfg.get("k"), y, oversample=cfg["oversample"],
                                                      power_iters=cfg["power_iters"], seed=cfg["seed"],
                                                      deterministic=bool(cfg.get("deterministic", False)),
                                                      **dist_kwargs(runner))
            results.append(r)
            per.append({"depth": L, "sigma1_mean": r.stages[0].sigma1_mean, "summary": r.summary()})
        return {"scaling": alignment_analysis.depth_scaling(results), "per_depth": per}

    return runner.step("depth_scaling", run)


def parse_archs(cfg: dict[str, Any]) -> list[str]:
    """The architectures of ``cfg["archs"]`` (a comma list); a UsageError for an unknown one."""
    archs = [a.strip() for a in cfg["archs"].split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCH_CHOICES]
    if bad or not archs:
        raise UsageError(f"archs: unknown architecture(s) {bad}; allowed: {', '.join(ARCH_CHOICES)}")
    return archs


def arch_option(default: str) -> Option:
    """The ``archs`` option: a comma list of :data:`ARCH_CHOICES` (read by :func:`parse_archs`)."""
    return opt("archs", "str", default, f"comma list of architectures among {', '.join(ARCH_CHOICES)}")
