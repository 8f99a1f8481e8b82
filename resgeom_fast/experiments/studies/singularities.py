"""``resgeom run singularities``: dead units, overlaps and linear dependence of plain,
residual and hyper-residual nets, and of the plain net trained with BiasReg."""
from __future__ import annotations

import importlib
from typing import Any

from ..common import resolve_device
from ..runner import Runner
from ._figures import singularity_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import analysis_step, arch_option, net_options, opt, parse_archs, study_data, train_net
from ._validation import validate_net_study

__all__ = ["STUDY", "run_singularities", "validate_singularities"]

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
    return StudyOutput({"study": "singularities", "config": cfg, "models": models},
                       [singularity_figure(archs), training_figure(archs)], summaries,
                       "Singularities (elimination, overlap, linear dependence) of " + ", ".join(archs) + " nets; "
                       "plain_biasreg is the plain net trained with BiasReg.")


def validate_singularities(cfg: dict[str, Any]) -> None:
    """singularities: the data, archs, the nets' size."""
    parse_archs(cfg)
    validate_net_study(cfg)


STUDY = register(Study("singularities", "Singularities: plain vs residual vs hyper-residual (and BiasReg)",
                       "dead units plain >= residual >= hyper-residual; BiasReg lowers the plain net's dead units",
                       net_options(depth=8) + [
                           arch_option("plain,residual,hyper,plain_biasreg"),
                           opt("eps", "float", 1e-3, "tolerance of the singularity tests", minimum=0),
                           opt("biasreg_beta", "float", 1e-3, "BiasReg strength beta_reg", minimum=0),
                           opt("biasreg_b0", "float", 0.1, "BiasReg target bias b0", minimum=0)],
                       run_singularities, validate_singularities))
