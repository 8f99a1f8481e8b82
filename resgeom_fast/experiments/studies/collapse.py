"""``resgeom run collapse``: progressive feedforward collapse of a trained ResNet against depth
and along training, and the MUFM optimum on the same data."""
from __future__ import annotations

import importlib
from typing import Any

from ..common import resolve_device
from ..config import UsageError
from ..figures import lines, new_figure
from ..report import FigureSpec, fmt
from ..runner import Runner
from ._figures import collapse_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import analysis_step, net_options, opt, study_data, train_net
from ._validation import check_samples, validate_net_study

__all__ = ["STUDY", "run_collapse", "validate_collapse"]

# analyses through their modules, looked up at each call (a wrapper installed on the module, as the
# tests' spies and interrupts do, sees every call); import_module because resgeom_fast.analysis
# exports functions named like the collapse / singularities / mufm / hamiltonian modules
collapse_analysis = importlib.import_module("resgeom_fast.analysis.collapse")
mufm_analysis = importlib.import_module("resgeom_fast.analysis.mufm")


def run_collapse(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train the residual net measuring collapse every ``collapse_every`` epochs, then collapse of
    the trained net and the MUFM optimum on ``mufm_samples`` training samples."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    dsd = ds.to(device=device)
    every = cfg["collapse_every"]

    def during(epoch: int, model, state) -> dict[str, Any]:
        r = collapse_analysis.collapse(model, dsd)
        return {"nc1": r.nc1, "ncc_mismatch": r.ncc_mismatch, "layers": r.layers}

    model, curves = train_net(runner, cfg, ds, key, "residual", device, callbacks=((every, during),))
    final = analysis_step(runner, "residual_collapse", lambda: collapse_analysis.collapse(model, dsd))
    x, y = ds.tensors("train")
    n = cfg["mufm_samples"]
    mu = analysis_step(runner, "mufm", lambda: mufm_analysis.mufm(x[:n].flatten(1).to(device), y[:n].to(device),
                                                                  cfg["depth"], steps=cfg["mufm_steps"],
                                                                  seed=cfg["seed"], progress=runner.progress))
    along = {"epochs": [], "nc1_last": [], "nc1_by_layer": []}
    for ep, cb in zip(curves["epoch"], curves["callbacks"]):
        if cb and "during" in cb:
            along["epochs"].append(ep)
            along["nc1_last"].append(cb["during"]["nc1"][-1])
            along["nc1_by_layer"].append(cb["during"]["nc1"])
    results = {"study": "collapse", "config": cfg,
               "models": {"residual": {"train": curves, "collapse": final, "along_training": along}, "mufm": mu}}

    def train_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        a = r["models"]["residual"]["along_training"]
        lines(axes[0], r, [(f"epoch {ep}", "models.residual.collapse.result.layers",
                            f"models.residual.along_training.nc1_by_layer.{i}") for i, ep in enumerate(a["epochs"])],
              title="NC1 per layer along training", xlabel="layer l", ylabel="NC1", logy=True)
        lines(axes[1], r, [("MUFM optimum", "models.mufm.result.layers", "models.mufm.result.nc1"),
                           ("trained ResNet", "models.residual.collapse.result.layers",
                            "models.residual.collapse.result.nc1")],
              title="NC1: MUFM (l = 0 inputs) vs trained net", xlabel="layer l", ylabel="NC1", logy=True)
        fig.tight_layout()
        return fig

    def train_read(r: dict) -> str:
        a = r["models"]["residual"]["along_training"]
        s = r["models"]["mufm"]["summary"]
        return (f"last-layer NC1 along training (epochs {a['epochs']}): {[fmt(v) for v in a['nc1_last']]}; MUFM NC1 "
                f"inputs {fmt(s['nc1_input'])} -> H_L {fmt(s['nc1_last'])} (ratio {fmt(s['nc1_ratio'])}: more "
                "concentrated, not exact collapse).")

    figures = [collapse_figure(["residual"]), FigureSpec("collapse_training", "Collapse along training and MUFM",
                                                         train_build, train_read), training_figure(["residual"])]
    summaries = {"residual": {"collapse": final["summary"]}, "mufm": {"mufm": mu["summary"]}}
    return StudyOutput(results, figures, summaries,
                       "Progressive feedforward collapse of a trained ResNet, layer by layer and along training, "
                       "and the MUFM optimum on the same data.")


def validate_collapse(cfg: dict[str, Any]) -> None:
    """collapse: the data, the net's size, mufm_samples <= training samples, collapse_every <= epochs."""
    info = validate_net_study(cfg)
    check_samples(cfg, "mufm_samples", info.n_train, "training", info)
    if cfg["epochs"] >= 1 and cfg["collapse_every"] > cfg["epochs"]:
        raise UsageError(f"collapse_every: expected an int <= epochs ({cfg['epochs']}) so that collapse is measured "
                         f"along training, got {cfg['collapse_every']}")


STUDY = register(Study("collapse", "Progressive feedforward collapse against depth",
                       "every metric decreases with depth (Spearman rho < -0.9) and along training",
                       net_options(epochs=20) + [
                           opt("collapse_every", "int", 5, "measure collapse every this many epochs", minimum=1),
                           opt("mufm_samples", "int", 500, "training samples of the MUFM", minimum=2),
                           opt("mufm_steps", "int", 300, "L-BFGS iterations of the MUFM", minimum=1)],
                       run_collapse, validate_collapse))
