"""``resgeom run singularities``: dead units, overlaps and linear dependence of plain,
residual and hyper-residual nets, and of the plain net trained with BiasReg; with ``seeds``, the
dead units of every architecture with BiasReg off and on over several seeds under both
normalisation settings (:func:`~.hessian.seed_grid`)."""
from __future__ import annotations

import importlib
from typing import Any

from ..common import resolve_device
from ..config import UsageError
from ..runner import Runner
from ._figures import seed_bars_figure, singularity_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import analysis_step, arch_option, net_options, opt, parse_archs, study_data, train_net
from ._validation import validate_net_study
from .hessian import SEED_OPTIONS, SEED_PAIRS, grid_conditions, parse_seed_list, seed_grid

__all__ = ["SINGULARITY_METRICS", "STUDY", "run_singularities", "seed_groups", "validate_singularities"]

SINGULARITY_METRICS = [("dead units (fraction of all units)", "dead_fraction_total")]

# analyses through their modules, looked up at each call (a wrapper installed on the module, as the
# tests' spies and interrupts do, sees every call); import_module because resgeom_fast.analysis
# exports functions named like the collapse / singularities / mufm / hamiltonian modules
singularities_analysis = importlib.import_module("resgeom_fast.analysis.singularities")


def run_singularities(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train each net of ``archs`` and measure its singularities (step ``<arch>_singularities``)."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    archs = parse_archs(cfg)
    models: dict[str, Any] = {}
    dsd = ds.to(device=device)
    for arch in archs:
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves,
                        "singularities": analysis_step(
                            runner, f"{arch}_singularities",
                            lambda: singularities_analysis.singularities(model, dsd, eps=cfg["eps"]))}
    summaries = {a: {"singularities": models[a]["singularities"]["summary"]} for a in archs}
    results: dict[str, Any] = {"study": "singularities", "config": cfg, "models": models}
    figures = [singularity_figure(archs), training_figure(archs)]
    seeds, seed_archs, norms = parse_seed_list(cfg)
    if seeds:
        results["over_seeds"] = seed_grid(
            runner, cfg, ds, key, device, seed_groups(seed_archs, cfg["seed_biasreg"]), seeds, norms,
            lambda net, c, model: analysis_step(runner, f"{net}_singularities", lambda: singularities_analysis.singularities(
                model, dsd, eps=cfg["eps"])),
            [k for _, k in SINGULARITY_METRICS])
        pairs = SEED_PAIRS + ([(a, f"{a}_biasreg") for a in seed_archs] if cfg["seed_biasreg"] else [])
        figures.append(seed_bars_figure("dead_units_seeds", "Dead units over seeds", "over_seeds",
                                        SINGULARITY_METRICS, pairs, grid_conditions(cfg)))
    return StudyOutput(results, figures, summaries,
                       "Singularities (elimination, overlap, linear dependence) of " + ", ".join(archs) + " nets; "
                       "plain_biasreg is the plain net trained with BiasReg.")


def seed_groups(archs: list[str], biasreg: bool) -> list[tuple[str, str, bool]]:
    """(name, arch, BiasReg) of the comparison over seeds: every arch, and with ``biasreg`` the same
    arch trained with BiasReg (``<arch>_biasreg``)."""
    return [(a, a, False) for a in archs] + ([(f"{a}_biasreg", a, True) for a in archs] if biasreg else [])


def validate_singularities(cfg: dict[str, Any]) -> None:
    """singularities: the data, archs, the nets' size, the comparison over seeds."""
    parse_archs(cfg)
    validate_net_study(cfg)
    _, seed_archs, _ = parse_seed_list(cfg)
    if "plain_biasreg" in seed_archs:
        raise UsageError("seed_archs: expected architectures without BiasReg (seed_biasreg=true adds the BiasReg "
                         f"variant of each), got {cfg['seed_archs']!r}")


STUDY = register(Study("singularities", "Singularities: plain vs residual vs hyper-residual (and BiasReg)",
                       "dead units plain >= residual >= hyper-residual; BiasReg lowers the plain net's dead units",
                       net_options(depth=8) + [
                           arch_option("plain,residual,hyper,plain_biasreg"),
                           opt("eps", "float", 1e-3, "tolerance of the singularity tests", minimum=0),
                           opt("biasreg_beta", "float", 1e-3, "BiasReg strength beta_reg", minimum=0),
                           opt("biasreg_b0", "float", 0.1, "BiasReg target bias b0", minimum=0)] + SEED_OPTIONS + [
                           opt("seed_biasreg", "bool", True, "the comparison over seeds trains every architecture "
                               "with BiasReg off and on")],
                       run_singularities, validate_singularities))
