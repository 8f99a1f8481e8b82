"""``resgeom demo``: an FCResNet and its plain twin trained on digits, then every analysis of
resgeom_fast on both (size presets :data:`DEMO_SIZES`; ``tiny`` is for tests)."""
from __future__ import annotations

import argparse
import importlib
from typing import Any

from resgeom_fast.analysis import expansion as expansion_analysis

from ..common import resolve_device
from ..config import UsageError
from ..runner import Runner
from ._figures import (
    alignment_figures,
    collapse_figure,
    density_figure,
    paths_figure,
    singularity_figure,
    training_figure,
)
from ._registry import Command, StudyOutput, register_command
from ._shared import (
    SEED_MAX,
    alignment_step,
    analysis_step,
    depth_scaling_step,
    spectrum_step,
    split_inputs,
    study_data,
    train_net,
)
from ._validation import check_samples, validate_alignment_options, validate_hessian_options, validate_net_study

__all__ = ["COMMAND", "DEMO_SIZES", "add_arguments", "demo_config", "run_demo", "validate_demo"]

# analyses through their modules, looked up at each call (a wrapper installed on the module, as the
# tests' spies and interrupts do, sees every call); import_module because resgeom_fast.analysis
# exports functions named like the collapse / singularities / mufm / hamiltonian modules
collapse_analysis = importlib.import_module("resgeom_fast.analysis.collapse")
singularities_analysis = importlib.import_module("resgeom_fast.analysis.singularities")


DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 400, "width": 16, "depth": 3, "epochs": 2, "align_samples": 8, "k": 12, "oversample": 4,
             "power_iters": 1, "depths": [2, 3], "hessian_samples": 128, "eigs": 2, "probes": 2,
             "lanczos_steps": 12, "trace_probes": 6, "path_samples": 16, "max_order": None, "gc_samples": 32},
    "default": {"n_train": None, "width": 64, "depth": 8, "epochs": 30, "align_samples": 64, "k": None,
                "oversample": 10, "power_iters": None, "depths": [4, 8, 16], "hessian_samples": 512, "eigs": 4,
                "probes": 4, "lanczos_steps": 160, "trace_probes": 30, "path_samples": 128, "max_order": None,
                "gc_samples": 256},
}


def demo_config(size: str, seed: int, device: str, deterministic: bool = False) -> dict[str, Any]:
    """The demo's configuration at preset ``size``, checked by :func:`validate_demo` (UsageError
    before any work for a seed out of range or settings the data cannot serve)."""
    if size not in DEMO_SIZES:
        raise UsageError(f"--size: expected one of {list(DEMO_SIZES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed: expected an int in [0, {SEED_MAX}], got {seed!r}")
    if not isinstance(deterministic, bool):
        raise UsageError(f"--deterministic: expected true or false, got {deterministic!r}")
    cfg = {"dataset": "digits", "model": "fc", "norm": "batch", "lr": 0.05, "batch_size": 64, "seed": seed,
           "device": device, "size": size, "weight_decay": 5e-2, "schedule": "cosine", "deterministic": deterministic}
    cfg.update(DEMO_SIZES[size])
    validate_demo(cfg)
    return cfg


def run_demo(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train the residual net and its plain twin, run alignment, spectrum, singularities,
    collapse, path expansion and geometric complexity on each, and RA4 across ``depths``."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    models: dict[str, Any] = {}
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for arch in ("residual", "plain"):
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        dsd = ds.to(device=device)
        entry: dict[str, Any] = {"train": curves}
        entry["alignment"] = alignment_step(runner, cfg, model, ds, device, f"{arch}_alignment")
        entry["spectrum"] = spectrum_step(runner, cfg, model, ds, device, f"{arch}_spectrum")
        entry["singularities"] = analysis_step(runner, f"{arch}_singularities",
                                               lambda: singularities_analysis.singularities(model, dsd))
        entry["collapse"] = analysis_step(runner, f"{arch}_collapse", lambda: collapse_analysis.collapse(model, dsd))
        xp, _ = split_inputs(ds, "test", cfg["path_samples"], device)
        entry["paths"] = analysis_step(runner, f"{arch}_paths", lambda: expansion_analysis.path_expansion(
            model, xp, cfg["max_order"], num_probes=1, seed=cfg["seed"]))
        xg, yg = split_inputs(ds, "test", cfg["gc_samples"], device)
        entry["gc"] = analysis_step(runner, f"{arch}_gc",
                                    lambda: expansion_analysis.geometric_complexity(model, (xg, yg)))
        models[arch] = entry
        summaries[arch] = {k: v["summary"] for k, v in entry.items() if isinstance(v, dict) and "summary" in v}
    results = {"study": "demo", "config": cfg, "models": models,
               "depth_scaling": depth_scaling_step(runner, cfg, ds, key, device)}
    names = ["residual", "plain"]
    figures = alignment_figures(names) + [density_figure(names), collapse_figure(names), singularity_figure(names),
                                          paths_figure(names), training_figure(names)]
    intro = (f"FCResNet (width {cfg['width']}, depth {cfg['depth']}) and the same net without skips, trained "
             f"{cfg['epochs']} epochs (SGD, weight decay {cfg['weight_decay']:g}, {cfg['schedule']} schedule) on "
             f"digits ({ds.x_train.shape[0]} training samples), then every analysis of resgeom_fast on both. "
             f"Size preset: {cfg['size']}.")
    return StudyOutput(results, figures, summaries, intro)


def validate_demo(cfg: dict[str, Any]) -> None:
    """demo: the data, both nets and the depth-scaling nets fit, k and the sample counts fit the data."""
    info = validate_net_study(cfg, extra_bytes_per_param=8 * cfg["lanczos_steps"])
    validate_alignment_options(cfg, info)
    validate_hessian_options(cfg, info, ["residual", "plain"])
    check_samples(cfg, "path_samples", info.n_test, "test", info)
    check_samples(cfg, "gc_samples", info.n_test, "test", info)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``resgeom demo`` (values stay strings: :func:`demo_config` checks them)."""
    parser.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    parser.add_argument("--size", default="default", help="tiny | default (tiny is for tests: well under a minute)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--seed", default="0", help="seed of data split, weights and probes")


COMMAND = register_command(Command("demo", "train a ResNet and its plain twin on digits, run every analysis",
                                   add_arguments))
