"""``resgeom run expansion``: the remainder after the second-order terms of the residual
expansion against lam (~ lam^3), output norms at init against depth, path-order distributions and
geometric complexity of trained nets; geometric complexity along training for branch scales
``gc_lams`` over ``gc_seeds`` seeds (read: is GC at the end of training unimodal in lam?) and a
deep normalisation-free net (``nf_depth`` blocks, lam = ``nf_scale``)."""
from __future__ import annotations

import math
from typing import Any

import torch

# the module, looked up at each call (a wrapper installed on it sees every call)
from resgeom_fast.analysis import expansion as expansion_analysis
from resgeom_fast.core.checks import NonFiniteError
from resgeom_fast.models import FCResNet

from ..common import build_model, resolve_device, train_step
from ..config import UsageError
from ..figures import bars, lines, new_figure
from ..report import FigureSpec, fmt, get_path
from ..runner import Runner
from ._figures import gc_training_figure, nf_training_figure, paths_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import (
    analysis_step,
    net_options,
    net_spec,
    opt,
    split_inputs,
    study_data,
    train_curves,
    train_kwargs,
    train_net,
)
from ._validation import DataInfo, check_net, check_samples, validate_net_study

__all__ = ["NAMED_LAMS", "STUDY", "aggregate_gc", "gc_epochs", "gc_record", "gc_training_step", "distinct_lams", "lam_scale", "lam_value",
           "nf_training_step", "parse_gc_lams", "run_expansion", "validate_expansion"]


# ---------------------------------------------------------------- GC along training per branch scale
NAMED_LAMS = ("1", "1/sqrt(L)", "1/L")


def parse_gc_lams(text: str) -> list[str]:
    """The branch scales of ``gc_lams`` (a comma list of "1", "1/sqrt(L)", "1/L" and numbers > 0),
    as labels; a UsageError naming the bad entry."""
    labels = [t.strip() for t in text.split(",") if t.strip()]
    for t in labels:
        if t in NAMED_LAMS:
            continue
        try:
            v = float(t)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v > 0):
            raise UsageError(f"gc_lams: expected a comma list of {', '.join(NAMED_LAMS)} or numbers > 0, got {t!r}")
    return labels


def distinct_lams(labels: list[str], depth: int) -> tuple[list[str], list[str]]:
    """(the labels with distinct values at depth ``depth``, in order, the first of equal ones kept;
    the labels dropped as equal to an earlier one, e.g. 1/L = 0.5 at L = 2)."""
    kept: list[str] = []
    dropped: list[str] = []
    seen: list[float] = []
    for t in labels:
        v = lam_value(t, depth)
        if any(math.isclose(v, u, rel_tol=1e-12) for u in seen):
            dropped.append(t)
        else:
            kept.append(t)
            seen.append(v)
    return kept, dropped


def lam_value(label: str, depth: int) -> float:
    """The number a ``gc_lams`` label stands for at depth L = ``depth``."""
    return {"1": 1.0, "1/L": 1.0 / depth, "1/sqrt(L)": 1.0 / math.sqrt(depth)}.get(label) or float(label)


def lam_scale(label: str) -> Any:
    """The FCResNet ``scale`` argument of a label: the string for 1/L and 1/sqrt(L), else the float."""
    return label if label in ("1/L", "1/sqrt(L)") else float(label)


def gc_epochs(cfg: dict[str, Any]) -> list[int]:
    """The epochs at which GC is measured: 0 (initialisation), every ``gc_every``, and the last."""
    return sorted({0, cfg["epochs"]} | set(range(cfg["gc_every"], cfg["epochs"] + 1, cfg["gc_every"])))


def _finite_model(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in list(model.parameters()) + list(model.buffers())
               if t.is_floating_point())


def gc_record(model, data) -> dict[str, Any]:
    """``{"gc", "sem", "std"}`` of :func:`geometric_complexity` on ``data``; None values with a
    ``reason`` when the net is not finite (training diverged) or its Jacobians overflow."""
    if not _finite_model(model):
        return {"gc": None, "sem": None, "std": None, "reason": "non-finite parameters (training diverged)"}
    try:
        r = expansion_analysis.geometric_complexity(model, data)
    except NonFiniteError as err:
        return {"gc": None, "sem": None, "std": None, "reason": f"non-finite Jacobians ({str(err).splitlines()[0]})"}
    return {"gc": r.gc, "sem": r.sem, "std": r.std, "reason": ""}


def aggregate_gc(label: str, lam: float, seeds: list[int], epochs: list[int],
                 per_seed: list[list[dict[str, Any]]], finals: list[dict[str, Any]]) -> dict[str, Any]:
    """One lam's entry of ``gc_training.by_lam``: GC per epoch per seed, their mean over the seeds
    whose GC is defined, the standard error of that mean (over seeds when >= 2 are defined, else
    the single seed's standard error over test samples) and which it is."""
    gc = [[rec[e]["gc"] for rec in per_seed] for e in range(len(epochs))]
    mean, se, kind = [], [], []
    for e in range(len(epochs)):
        vals = [v for v in gc[e] if v is not None]
        if not vals:
            mean.append(None)
            se.append(None)
            kind.append("none defined")
            continue
        m = sum(vals) / len(vals)
        mean.append(m)
        if len(vals) >= 2:
            se.append(math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals)))
            kind.append(f"{len(vals)} seeds")
        else:
            one = next(rec[e] for rec in per_seed if rec[e]["gc"] is not None)
            se.append(one["sem"])
            kind.append("test samples (one seed)")
    diverged = [f.get("train_loss") is None or not math.isfinite(f["train_loss"]) or per_seed[i][-1]["gc"] is None
                for i, f in enumerate(finals)]
    return {"label": label, "lam": lam, "seeds": seeds, "gc": gc, "gc_mean": mean, "gc_se": se, "se_over": kind,
            "reasons": [[rec[e].get("reason", "") for rec in per_seed] for e in range(len(epochs))],
            "train_acc": [f.get("train_acc") for f in finals], "test_acc": [f.get("test_acc") for f in finals],
            "diverged": diverged}


def gc_training_step(runner: Runner, cfg: dict[str, Any], ds, key, device) -> dict[str, Any]:
    """Nets of the study's width and depth with normalisation ``gc_norm`` (default none), one per
    (lam of ``gc_lams``, seed ``seed .. seed + gc_seeds - 1``: weights and shuffling; the data split
    stays that of ``seed``), trained as the study's nets; GC on ``gc_samples`` test inputs at :func:`gc_epochs` (epoch 0 on the
    initial net, built again from its seed; the others through the trainer's callbacks)."""
    labels, dropped = distinct_lams(parse_gc_lams(cfg["gc_lams"]), cfg["depth"])
    if dropped:
        runner.message(f"gc_lams: {dropped} equal an earlier branch scale at depth {cfg['depth']}; measured once")
    epochs = gc_epochs(cfg)
    during_epochs = [e for e in epochs if e >= 1]
    xg, yg = split_inputs(ds, "test", cfg["gc_samples"], device)
    seeds = [cfg["seed"] + s for s in range(cfg["gc_seeds"])]

    def gc(epoch: int, model, state) -> dict[str, Any]:
        return gc_record(model, (xg, yg))

    by_lam = []
    for i, label in enumerate(labels):
        per_seed, finals = [], []
        for seed in seeds:
            spec = {**net_spec(cfg, ds, "residual"), "norm": cfg["gc_norm"], "scale": lam_scale(label), "seed": seed}
            name = f"gc_lam{i}_s{seed}"
            init = runner.step(f"{name}_init", lambda spec=spec: gc_record(build_model(spec).to(device), (xg, yg)),
                               deps={"model": spec, "data": key, "gc_samples": cfg["gc_samples"]})
            model, out = train_step(runner, name, spec, ds, key, {**train_kwargs(cfg), "seed": seed}, device,
                                    callbacks=((during_epochs, gc),) if during_epochs else ())
            recs = {h["epoch"]: (h.get("callbacks") or {}).get("gc") for h in out["history"]}
            recs[0] = init
            missing = [e for e in epochs if recs.get(e) is None]
            if missing:  # a training step stored by a run that measured other epochs
                runner.message(f"{name}: GC not measured at epochs {missing} (the stored training step ran with "
                               "other epochs; run with --fresh)")
            per_seed.append([recs.get(e) or {"gc": None, "sem": None, "std": None, "reason": "not measured"}
                             for e in epochs])
            finals.append(out["final"])
        by_lam.append(aggregate_gc(label, lam_value(label, cfg["depth"]), seeds, epochs, per_seed, finals))
    order = sorted(range(len(by_lam)), key=lambda j: by_lam[j]["lam"])
    final = {"labels": [by_lam[j]["label"] for j in order], "lams": [by_lam[j]["lam"] for j in order],
             "gc_mean": [by_lam[j]["gc_mean"][-1] for j in order], "gc_se": [by_lam[j]["gc_se"][-1] for j in order],
             "se_over": [by_lam[j]["se_over"][-1] for j in order],
             "diverged": [sum(by_lam[j]["diverged"]) for j in order],
             "spread": (f"the {len(seeds)} seeds" if len(seeds) >= 2 else
                        f"the {cfg['gc_samples']} test samples (one seed)"), "epoch": epochs[-1]}
    return {"epochs": epochs, "seeds": seeds, "norm": cfg["gc_norm"], "by_lam": by_lam, "final": final,
            "dropped_lams": dropped}


def nf_training_step(runner: Runner, cfg: dict[str, Any], ds, key, device) -> dict[str, Any]:
    """The normalisation-free net of depth ``nf_depth`` and branch scale ``nf_scale`` trained as the
    study's nets: depth, accuracies, final loss, wall time (sum of the epochs' training and
    evaluation times) and whether the loss stayed finite."""
    spec = {**net_spec(cfg, ds, "residual", depth=cfg["nf_depth"]), "norm": "none", "scale": cfg["nf_scale"]}
    _, out = train_step(runner, "nf_deep", spec, ds, key, train_kwargs(cfg), device)
    curves = train_curves(out)
    hist = out["history"]
    final = out["final"]
    losses = [h["train_loss"] for h in hist]
    return {"depth": cfg["nf_depth"], "scale": cfg["nf_scale"], "lam": lam_value(cfg["nf_scale"], cfg["nf_depth"]),
            "width": cfg["width"], "epochs": cfg["epochs"], "device": str(device), "num_classes": ds.num_classes,
            "train_acc": final.get("train_acc"), "test_acc": final.get("test_acc"),
            "train_loss": final.get("train_loss"),
            "finite": all(v is not None and math.isfinite(v) for v in losses),
            "wall_s": sum(h.get("time", 0.0) for h in hist), "reference_depth": cfg["depth"], "train": curves}


def run_expansion(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """The remainder scaling over ``lams``, output norms at init over ``norm_depths``, then path
    expansion and geometric complexity of the trained residual and plain nets."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    in_dim = int(math.prod(ds.input_shape))

    def remainder() -> dict[str, Any]:
        # FCResNets without normalisation on the flattened inputs, float64, one scale lam per net
        x = ds.x_test[: cfg["path_samples"]].flatten(1).double()
        make = lambda lam: FCResNet(in_dim, cfg["width"], cfg["depth"], ds.num_classes, scale=lam, norm="none",  # noqa: E731
                                    seed=cfg["seed"]).double().eval()
        return expansion_analysis.remainder_scaling(make, cfg["lams"], x)

    rem = runner.step("remainder_scaling", remainder)
    norms = runner.step("output_norms", lambda: expansion_analysis.output_norm_vs_depth(
        cfg["norm_depths"], width=cfg["norm_width"], in_dim=cfg["norm_width"], seed=cfg["seed"]))
    models: dict[str, Any] = {}
    archs = ["residual", "plain"]
    for arch in archs:
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        xp, _ = split_inputs(ds, "test", cfg["path_samples"], device)
        xg, yg = split_inputs(ds, "test", cfg["gc_samples"], device)
        models[arch] = {"train": curves,
                        "paths": analysis_step(runner, f"{arch}_paths", lambda: expansion_analysis.path_expansion(
                            model, xp, num_probes=1, seed=cfg["seed"])),
                        "gc": analysis_step(runner, f"{arch}_gc",
                                            lambda: expansion_analysis.geometric_complexity(model, (xg, yg)))}
    gct = gc_training_step(runner, cfg, ds, key, device)
    nf = nf_training_step(runner, cfg, ds, key, device) if cfg["nf_depth"] > 0 else None
    results = {"study": "expansion", "config": cfg, "models": models, "remainder": rem, "output_norms": norms,
               "gc_training": gct, "nf_training": nf}

    def rem_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        lines(axes[0], r, [("||h_L - E1|| (first order)", "remainder.lams", "remainder.remainder1_mean"),
                           ("||h_L - E2|| (second order)", "remainder.lams", "remainder.remainder2_mean")],
              title="remainders of the expansion in lam", xlabel="lam", ylabel="mean norm", logx=True, logy=True)
        lam = r["remainder"]["lams"]
        r2 = r["remainder"]["remainder2_mean"]
        if lam and r2 and r2[-1]:
            axes[0].plot(lam, [r2[-1] * (v / lam[-1]) ** 3 for v in lam], "k:", lw=0.8, label="lam^3")
            axes[0].legend(fontsize=7)
        expansion_analysis.plot_output_norms(r, axes[1], at="output_norms")  # one line per branch scale
        axes[1].set_title("||h_L|| / ||h_0|| at init", fontsize=9)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        return fig

    def rem_read(r: dict) -> str:
        m = r["remainder"]
        o = r["output_norms"]
        last = {s: o["mean"][s][-1] for s in o["scales"]}
        return (f"log-log slope of the second-order remainder {fmt(m['slope'])} (expected 3), first-order "
                f"{fmt(m['slope_first_order'])} (expected 2); at depth {o['depths'][-1]} the output norm ratio is "
                + ", ".join(f"{fmt(v)} for lam = {s}" for s, v in last.items()) + ".")

    def gc_build(r: dict) -> Any:
        fig, axes = new_figure(1)
        bars(axes[0], r, archs, [("GC", "models.{g}.gc.summary.gc")], title="geometric complexity", ylabel="GC", logy=True)
        fig.tight_layout()
        return fig

    def gc_read(r: dict) -> str:
        return ", ".join(f"{a}: GC {fmt(get_path(r, f'models.{a}.gc.summary.gc'))}" for a in archs) + "."

    figures = [FigureSpec("expansion_scaling", "Remainder against lam, output norm against depth", rem_build, rem_read),
               paths_figure(archs), FigureSpec("geometric_complexity", "Geometric complexity", gc_build, gc_read),
               gc_training_figure()] + ([nf_training_figure()] if nf is not None else []) + [training_figure(archs)]
    summaries = {a: {"paths": models[a]["paths"]["summary"], "gc": models[a]["gc"]["summary"]} for a in archs}
    return StudyOutput(results, figures, summaries, "Residual expansion: Taylor remainders, output norms at "
                       "initialisation, path-order distributions and geometric complexity.")


def validate_expansion(cfg: dict[str, Any]) -> None:
    """expansion: the data, the nets' size (trained nets and the output-norm nets), samples <= test
    samples, at least two distinct positive lams."""
    info = validate_net_study(cfg)
    check_samples(cfg, "path_samples", info.n_test, "test", info)
    check_samples(cfg, "gc_samples", info.n_test, "test", info)
    lams = cfg["lams"]
    if any(not lam > 0 for lam in lams) or len(set(lams)) < 2:
        raise UsageError(f"lams: expected at least two distinct numbers > 0, got {lams}")
    labels, _ = distinct_lams(parse_gc_lams(cfg["gc_lams"]), cfg["depth"])
    values = [lam_value(t, cfg["depth"]) for t in labels]
    if len(values) < 3:
        raise UsageError(f"gc_lams: expected at least three distinct branch scales at depth {cfg['depth']}, got "
                         f"{cfg['gc_lams']!r} = {[round(v, 6) for v in values]}")
    if cfg["nf_depth"] > 0:
        check_net(cfg, info, cfg["nf_depth"], what="nf_depth")
    fc = {**cfg, "model": "fc"}
    norm_info = DataInfo(info.name, info.n_train, info.n_test, (cfg["norm_width"],), info.num_classes)
    check_net(fc, norm_info, max(cfg["norm_depths"]), width=cfg["norm_width"], what="norm_width, norm_depths")


STUDY = register(Study("expansion", "Residual expansion: remainder ~ lam^3, output norms against depth",
                       "remainder after the second-order terms ~ lam^3; lam = 1 explodes with depth, 1/L stays bounded",
                       net_options() + [
                           opt("lams", "floats", [0.4, 0.2, 0.1, 0.05, 0.025], "branch scales of the remainder check",
                               minimum=0),
                           opt("norm_depths", "ints", [2, 4, 8, 16, 32, 64], "depths of the output-norm check",
                               minimum=1),
                           opt("norm_width", "int", 64, "width of the nets of the output-norm check", minimum=1),
                           opt("path_samples", "int", 128, "test inputs of the path expansion", minimum=1),
                           opt("gc_samples", "int", 256, "test inputs of the geometric complexity", minimum=1),
                           opt("gc_lams", "str", "1,1/sqrt(L),1/L,0.5,0.2,0.05,0.02",
                               "branch scales of the nets (normalisation gc_norm) whose GC is tracked along training "
                               "(comma list of 1, 1/sqrt(L), 1/L and numbers > 0; at least three distinct)"),
                           opt("gc_seeds", "int", 3, "seeds per branch scale (weights and shuffling; the spread "
                               "of GC over them decides what the GC-vs-lam reading resolves)", minimum=1),
                           opt("gc_norm", "str", "none", "normalisation inside the branches of the GC-vs-lam nets",
                               ("none", "batch")),
                           opt("gc_every", "int", 5, "measure GC every this many epochs (and at 0 and the last)",
                               minimum=1),
                           opt("nf_depth", "int", 256, "depth of the deep normalisation-free net (0: not trained)",
                               minimum=0),
                           opt("nf_scale", "str", "1/L", "branch scale of the deep normalisation-free net",
                               ("1/L", "1/sqrt(L)"))],
                       run_expansion, validate_expansion))
