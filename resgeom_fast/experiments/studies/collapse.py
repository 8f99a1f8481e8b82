"""``resgeom run collapse``: progressive feedforward collapse of a trained ResNet against depth
and along training, and the MUFM optimum on the same data."""
from __future__ import annotations

import importlib
from typing import Any

from ..common import build_model, resolve_device
from ..config import UsageError
from ..figures import lines, new_figure
from ..report import FigureSpec, fmt
from ..runner import Runner
from ._figures import collapse_figure, collapse_training_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._readings import nc1_decay_decades
from ._shared import analysis_step, net_options, net_spec, opt, study_data, train_net
from ._validation import check_samples, validate_net_study

__all__ = ["STUDY", "along_training", "collapse_record", "run_collapse", "tracked_epochs", "validate_collapse"]

# analyses through their modules, looked up at each call (a wrapper installed on the module, as the
# tests' spies and interrupts do, sees every call); import_module because resgeom_fast.analysis
# exports functions named like the collapse / singularities / mufm / hamiltonian modules
collapse_analysis = importlib.import_module("resgeom_fast.analysis.collapse")
mufm_analysis = importlib.import_module("resgeom_fast.analysis.mufm")


def tracked_epochs(cfg: dict[str, Any]) -> list[int]:
    """The epochs at which collapse is measured along training: ``track_epochs`` plus every
    multiple of ``collapse_every`` up to ``epochs`` (0 = the net at initialisation), ascending."""
    every = cfg["collapse_every"]
    chosen = set(cfg["track_epochs"]) | set(range(every, cfg["epochs"] + 1, every))
    return sorted(e for e in chosen if 0 <= e <= cfg["epochs"])


def collapse_record(r: Any) -> dict[str, Any]:
    """The per-layer metrics of a collapse result kept per tracked epoch (JSON-friendly)."""
    d = r.to_dict()
    keep = ("layers", "nc1", "etf_error", "equinorm", "ncc_mismatch", "nc1_note", "spearman", "spearman_note",
            "ncc_zero_from")
    return {**{k: d[k] for k in keep}, "summary": r.summary()}


def along_training(epochs: list[int], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The along-training entry of results.json from the collapse records of the tracked epochs:
    per epoch NC1 per layer, NC1 of h_L, Spearman rho(l, NC1) (None with its reason when undefined)
    and log10 NC1(h_L) / NC1(h_0)."""
    return {"epochs": list(epochs), "layers": records[0]["layers"] if records else [],
            "nc1_last": [c["nc1"][-1] for c in records], "nc1_by_layer": [c["nc1"] for c in records],
            "spearman_nc1": [c["spearman"].get("nc1") for c in records],
            "spearman_nc1_reason": [c["spearman_note"].get("nc1", "") for c in records],
            "nc1_decay_decades": [nc1_decay_decades(c["nc1"]) for c in records], "per_epoch": records}


def run_collapse(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train the residual net measuring collapse at the tracked epochs (:func:`tracked_epochs`:
    epoch 0 on the initial net, the others through the trainer's callbacks), then collapse of the
    trained net and the MUFM optimum on ``mufm_samples`` training samples."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    dsd = ds.to(device=device)
    epochs = tracked_epochs(cfg)
    during_epochs = [e for e in epochs if e >= 1]

    def during(epoch: int, model, state) -> dict[str, Any]:
        # collapse() runs the net in eval mode and restores its mode: the same numbers as a direct
        # call on a copy of the net after this epoch
        return collapse_record(collapse_analysis.collapse(model, dsd))

    init = None
    if 0 in epochs:  # the trainer keeps no record of epoch 0: the same seeded net, built again
        def at_init() -> dict[str, Any]:
            net = build_model(net_spec(cfg, ds, "residual")).to(device)
            return collapse_record(collapse_analysis.collapse(net, dsd))

        init = runner.step("residual_collapse_init", at_init)
    callbacks = ((during_epochs, during),) if during_epochs else ()
    model, curves = train_net(runner, cfg, ds, key, "residual", device, callbacks=callbacks)
    final = analysis_step(runner, "residual_collapse", lambda: collapse_analysis.collapse(model, dsd))
    x, y = ds.tensors("train")
    n = cfg["mufm_samples"]
    mu = analysis_step(runner, "mufm", lambda: mufm_analysis.mufm(x[:n].flatten(1).to(device), y[:n].to(device),
                                                                  cfg["depth"], steps=cfg["mufm_steps"],
                                                                  seed=cfg["seed"], progress=runner.progress))
    recs = {ep: cb["during"] for ep, cb in zip(curves["epoch"], curves["callbacks"]) if cb and "during" in cb}
    if init is not None:
        recs[0] = init
    along = along_training([e for e in epochs if e in recs], [recs[e] for e in epochs if e in recs])
    missing = [e for e in epochs if e not in recs]
    if missing:  # a training step loaded from an earlier run that tracked other epochs
        runner.message(f"collapse along training: not measured at epochs {missing} (the stored training step ran "
                       "with other tracked epochs; run with --fresh to measure them)")
    along["not_measured"] = missing
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
                                                         train_build, train_read),
               collapse_training_figure("residual"), training_figure(["residual"])]
    summaries = {"residual": {"collapse": final["summary"]}, "mufm": {"mufm": mu["summary"]}}
    return StudyOutput(results, figures, summaries,
                       "Progressive feedforward collapse of a trained ResNet, layer by layer and along training, "
                       "and the MUFM optimum on the same data.")


def validate_collapse(cfg: dict[str, Any]) -> None:
    """collapse: the data, the net's size, mufm_samples <= training samples, collapse_every <= epochs,
    track_epochs in [0, epochs]."""
    info = validate_net_study(cfg)
    check_samples(cfg, "mufm_samples", info.n_train, "training", info)
    if cfg["epochs"] >= 1 and cfg["collapse_every"] > cfg["epochs"]:
        raise UsageError(f"collapse_every: expected an int <= epochs ({cfg['epochs']}) so that collapse is measured "
                         f"along training, got {cfg['collapse_every']}")
    bad = [e for e in cfg["track_epochs"] if e > cfg["epochs"]]
    if bad:
        raise UsageError(f"track_epochs: expected epochs in [0, epochs ({cfg['epochs']})], got {cfg['track_epochs']}")


STUDY = register(Study("collapse", "Progressive feedforward collapse against depth",
                       "every metric decreases with depth (Spearman rho < -0.9) and along training",
                       net_options(epochs=20) + [
                           opt("collapse_every", "int", 5, "measure collapse every this many epochs", minimum=1),
                           opt("track_epochs", "ints", [0], "further epochs at which collapse is measured along "
                               "training (0: the net at initialisation)", minimum=0),
                           opt("mufm_samples", "int", 500, "training samples of the MUFM", minimum=2),
                           opt("mufm_steps", "int", 300, "L-BFGS iterations of the MUFM", minimum=1)],
                       run_collapse, validate_collapse))
