"""``resgeom run alignment``: Residual Alignment (RA1-RA3) of a ResNet with vs without skips,
and RA4 across depths. The pattern of a study module: a ``run`` that executes resumable steps and
returns a :class:`StudyOutput`, a ``validate`` that refuses a configuration before any work, and a
:class:`Study` passed to :func:`register`.

The option ``extras`` (a comma list, default none) adds the counterfactual experiments of Li &
Papyan (docs/science.md section 1), each with its results.json entry, a figure and a reading:

- ``ujm``: the Unconstrained Jacobians Model (:func:`resgeom_fast.analysis.ujm`) solved on h_0 =
  the trained residual net's stem output of ``ujm_samples`` training inputs, at the net's depth,
  lam_W = lam_J = ``ujm_lam`` (0: the nets' weight_decay); its alignment, rank and L * sigma_1
  beside the trained residual and plain nets' (``results["ujm"]``, ``results["ujm_comparison"]``);
- ``stochastic_depth``: residual nets trained with stochastic depth p (each branch dropped with
  probability p per mini-batch, scaled by 1 - p in eval mode, where RA is measured) for p in
  ``stochastic_depths`` (``results["stochastic_depth"]``);
- ``classes``: residual nets trained on the first C classes of the data for C in
  ``class_counts``: numerical rank against C (``results["classes"]``);
- ``weight_decay``: residual nets trained with each SGD weight decay of ``weight_decays``: RA1-RA3
  on held-out (test) inputs and the test accuracy (``results["weight_decay"]``).

A net whose configuration equals the study's residual net (p = 0, C = all classes, the study's
weight decay) is that net: it is trained once.
"""
from __future__ import annotations

import importlib
import math
from typing import Any, Optional

import torch

from resgeom_fast.data import Dataset

from ..common import resolve_device, train_step
from ..config import UsageError
from ..figures import bars, lines, new_figure
from ..report import FigureSpec, fmt, fmt_key, get_path
from ..runner import Runner
from ._figures import alignment_figures, training_figure
from ._readings import CONTRAST_Z, contrast_z, list_text, rank_text, sample_stats, summary_of
from ._registry import Study, StudyOutput, register
from ._shared import (
    ALIGN_OPTIONS,
    alignment_step,
    analysis_step,
    depth_scaling_step,
    net_options,
    net_spec,
    opt,
    study_data,
    train_curves,
    train_kwargs,
    train_net,
)
from ._validation import check_net, check_samples, validate_alignment_options, validate_net_study

# the analysis through its module, looked up at each call (a wrapper installed on the module, as
# the tests' spies do, sees every call); import_module because resgeom_fast.analysis exports a
# function named like the module
ujm_analysis = importlib.import_module("resgeom_fast.analysis.ujm")

__all__ = ["EXTRAS", "STUDY", "class_subset", "parse_extras", "run_alignment", "validate_alignment"]

EXTRAS = ("ujm", "stochastic_depth", "classes", "weight_decay")

EXTRA_OPTIONS = [
    opt("extras", "str", "none", "comma list of counterfactual experiments to add: ujm (the Unconstrained Jacobians "
        "Model against the trained nets), stochastic_depth (RA at each p of stochastic_depths), classes (numerical "
        "rank against C, nets trained on the first C classes), weight_decay (RA1-RA3 against weight_decays on "
        "held-out data); or all / none"),
    opt("ujm_samples", "int", 256, "training inputs whose h_0 (the trained residual net's stem output) are the "
        "UJM's inputs", minimum=2),
    opt("ujm_lam", "float", 0.0, "lam_W = lam_J of the UJM (0: the nets' weight_decay)", minimum=0),
    opt("ujm_steps", "int", 3000, "maximum L-BFGS iterations of the UJM", minimum=1),
    opt("ujm_tol", "float", 1e-8, "the UJM is converged when its largest gradient entry is <= ujm_tol (the "
        "reading says when it is not)", minimum=1e-15),
    opt("stochastic_depths", "floats", [0.0, 0.2, 0.5], "drop probabilities p of the stochastic_depth experiment "
        "(0 = the study's residual net)", minimum=0, maximum=0.95),
    opt("class_counts", "ints", [2, 5, 10], "numbers of classes C of the classes experiment (the first C classes "
        "of the data)", minimum=2),
    opt("classes_equal_steps", "bool", True, "train each C-class net for at least as many SGD steps as the study's "
        "net (more epochs on the fewer samples of C classes: the same optimisation and weight-decay budget); false: "
        "the same epochs (fewer steps)"),
    opt("weight_decays", "floats", [5e-4, 5e-3, 5e-2], "SGD weight decays of the weight_decay experiment",
        minimum=0),
]

# the headline metrics of the sweeps: (key in the alignment summary, label)
SWEEP_METRICS = (("linearity", "linearity (RA1)"), ("equispacing", "equispacing (RA1)"),
                 ("step_cosine", "step cosine (RA1)"), ("self_alignment", "self alignment (RA2)"),
                 ("diag_ratio_offdiag", "diag ratio off-diag (RA2)"),
                 ("max_numerical_rank", "max numerical rank (RA3)"),
                 ("depth_product", "L * mean sigma_1 (RA4)"))
RA1_KEYS = ("linearity", "equispacing", "step_cosine")
COMPARED = (("self_alignment", "self alignment"), ("diag_ratio_offdiag", "diag ratio off-diag"),
            ("linearity", "linearity"), ("max_numerical_rank", "max numerical rank"),
            ("depth_product", "L * mean sigma_1"))


def parse_extras(cfg: dict[str, Any]) -> list[str]:
    """The experiments of ``cfg["extras"]`` in :data:`EXTRAS` order; a UsageError for an unknown one."""
    text = cfg.get("extras", "none").strip()
    if text == "all":
        return list(EXTRAS)
    if text in ("none", ""):
        return []
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in names if t not in EXTRAS]
    if bad:
        raise UsageError(f"extras: expected a comma list of {', '.join(EXTRAS)} (or all / none), got unknown {bad}")
    return [e for e in EXTRAS if e in names]


def class_subset(ds: Dataset, C: int) -> Dataset:
    """The samples of classes 0..C-1 of ``ds`` (both splits, in their order), a C-class data set."""
    xs, ys = {}, {}
    for split in ("train", "test"):
        x, y = ds.tensors(split)
        keep = y < C
        xs[split], ys[split] = x[keep], y[keep]
    return Dataset(xs["train"], ys["train"], xs["test"], ys["test"], C, name=f"{ds.name}-first{C}classes",
                   info={**ds.info, "classes": C})


def _tag(v: float) -> str:
    """A step-name fragment for a number (0.2 -> "0.2", 5e-4 -> "0.0005")."""
    return format(v, "g")


def _run_net(runner: Runner, cfg: dict[str, Any], ds, key, device, name: str, spec: dict[str, Any],
             tkw: dict[str, Any]) -> dict[str, Any]:
    """Train ``spec`` (step ``train_<name>``) and align it on the test inputs (step ``<name>_alignment``)."""
    model, out = train_step(runner, name, spec, ds, key, tkw, device)
    n_test = int(ds.tensors("test")[0].shape[0])
    acfg = {**cfg, "align_samples": min(cfg["align_samples"], n_test)}
    return {"train": train_curves(out), "alignment": alignment_step(runner, acfg, model, ds, device,
                                                                    f"{name}_alignment"),
            "align_samples": acfg["align_samples"]}


def _sweep(runs: list[dict[str, Any]], values: list[Any], key: str) -> dict[str, Any]:
    """``{key: values, <metric>: [...], test_acc: [...], train_acc: [...], runs: [...]}``."""
    out: dict[str, Any] = {key: list(values)}
    for m, _ in SWEEP_METRICS:
        out[m] = [summary_of(r["alignment"]).get(m) for r in runs]
    for m in RA1_KEYS:   # the per-input RA1 values: the standard error of each mean, and n
        stats = [sample_stats(get_path(r, f"alignment.result.stages.0.ra1.{m}")) for r in runs]
        out[f"{m}_se"] = [None if st is None else st[1] for st in stats]
        out[f"{m}_n"] = [None if st is None else st[2] for st in stats]
    out["max_numerical_rank_capped"] = [bool(summary_of(r["alignment"]).get("max_numerical_rank_capped"))
                                        for r in runs]
    # where capped, the rank is only known to be >= this (drawn as its own series, never as the rank)
    out["max_numerical_rank_lower_bound"] = [summary_of(r["alignment"]).get("max_numerical_rank_lower_bound")
                                             if c else None for r, c in zip(runs, out["max_numerical_rank_capped"])]
    out["test_acc"] = [r["train"]["final"].get("test_acc") for r in runs]
    out["train_acc"] = [r["train"]["final"].get("train_acc") for r in runs]
    out["runs"] = runs
    return out


# =============================================================================== the experiments
def ujm_experiment(runner: Runner, cfg: dict[str, Any], model, ds, device, models: dict[str, Any]) -> dict[str, Any]:
    """The UJM on h_0 of the trained residual net; returns the results entries ``ujm`` and ``ujm_comparison``."""
    x, y = ds.tensors("train")
    n = cfg["ujm_samples"]
    lam = cfg["ujm_lam"] if cfg["ujm_lam"] > 0 else cfg["weight_decay"]
    with torch.no_grad():
        h0 = model.stem(x[:n].to(device)).flatten(1)

    def solve(L: int):
        return ujm_analysis.ujm(h0, y[:n].to(device), L, lam_W=lam, lam_J=lam, steps=cfg["ujm_steps"],
                                tol=cfg["ujm_tol"], num_classes=ds.num_classes, seed=cfg["seed"],
                                progress=runner.progress)

    u = analysis_step(runner, "ujm", lambda: solve(cfg["depth"]))
    u["inputs"] = (f"h_0 = stem(x) of the trained residual net (eval mode) on the first {n} training inputs; "
                   f"L = {cfg['depth']}, lam_W = lam_J = {lam:g}, gradient tolerance {cfg['ujm_tol']:g}")
    # RA4 of the model: the same inputs at each depth of `depths`
    per = []
    for L in cfg["depths"]:
        per.append(u if L == cfg["depth"] else analysis_step(runner, f"ujm_L{L}", lambda L=L: solve(L)))
    scan = {"depths": list(cfg["depths"]),
            "sigma1_mean": [_mean(p["result"]["sigma1"]) for p in per],
            "depth_product": [p["summary"]["depth_product"] for p in per],
            "sigma1_spread": [p["summary"]["sigma1_spread"] for p in per],
            "converged": [p["summary"]["converged"] for p in per],
            "grad_norm": [p["summary"]["grad_norm"] for p in per]}
    prods = [v for v in scan["depth_product"] if v is not None]
    mean_p = sum(prods) / len(prods) if prods else 0.0
    scan["relative_spread"] = (max(prods) - min(prods)) / mean_p if len(prods) >= 2 and mean_p > 0 else None
    cmp: dict[str, Any] = {"groups": ["ujm", *models]}
    cmp["ujm"] = {k: u["summary"].get(k) for k, _ in COMPARED}
    for m, block in models.items():
        s = summary_of(block["alignment"])
        cmp[m] = {k: s.get(k) for k, _ in COMPARED}
    return {"ujm": u, "ujm_comparison": cmp, "ujm_depth_scaling": scan}


def stochastic_depth_experiment(runner: Runner, cfg: dict[str, Any], ds, key, device,
                                residual: dict[str, Any]) -> dict[str, Any]:
    """RA of residual nets trained with stochastic depth p (measured in eval mode), p in ``stochastic_depths``."""
    runs = []
    for p in cfg["stochastic_depths"]:
        if p == 0:
            runs.append({**residual, "name": "residual"})
            continue
        spec = {**net_spec(cfg, ds, "residual"), "stochastic_depth": p}
        name = f"residual_sd{_tag(p)}"
        runs.append({**_run_net(runner, cfg, ds, key, device, name, spec, train_kwargs(cfg)), "name": name})
    return _sweep(runs, cfg["stochastic_depths"], "p")


def _batches(n: int, batch_size: int) -> int:
    """SGD steps per epoch of the trainer (drop_last: full batches only, one batch when n <= batch_size)."""
    return n // batch_size if n > batch_size else 1


def equal_step_epochs(cfg: dict[str, Any], n_full: int, n_c: int) -> int:
    """The fewest epochs on ``n_c`` samples that take at least as many SGD steps as ``cfg["epochs"]``
    epochs on ``n_full`` samples."""
    steps = cfg["epochs"] * _batches(n_full, cfg["batch_size"])
    return math.ceil(steps / _batches(n_c, cfg["batch_size"]))


def classes_experiment(runner: Runner, cfg: dict[str, Any], ds, key, device,
                       residual: dict[str, Any]) -> dict[str, Any]:
    """Numerical rank of residual nets trained on the first C classes, C in ``class_counts``
    (``classes_equal_steps``: as many SGD steps as the study's net, :func:`equal_step_epochs`)."""
    runs = []
    n_full = int(ds.tensors("train")[0].shape[0])
    for C in cfg["class_counts"]:
        if C == ds.num_classes:
            runs.append({**residual, "name": "residual", "epochs": cfg["epochs"]})
            continue
        dsc = class_subset(ds, C)
        tkw = train_kwargs(cfg)
        if cfg["classes_equal_steps"]:
            tkw["epochs"] = equal_step_epochs(cfg, n_full, int(dsc.tensors("train")[0].shape[0]))
        name = f"residual_C{C}"
        runs.append({**_run_net(runner, cfg, dsc, {**key, "classes": C}, device, name, net_spec(cfg, dsc, "residual"),
                                tkw), "name": name, "epochs": tkw["epochs"]})
    out = _sweep(runs, cfg["class_counts"], "num_classes")
    out["epochs"] = [r["epochs"] for r in runs]
    out["sgd_steps"] = [r["train"]["final"].get("step") for r in runs]
    out["train_samples"] = [n_full if r["name"] == "residual" else int((ds.tensors("train")[1] < C).sum())
                            for r, C in zip(runs, cfg["class_counts"])]
    out["rank_le_c_fraction"] = [summary_of(r["alignment"]).get("rank_le_c_fraction") for r in runs]
    out["k"] = [get_path(r, "alignment.result.settings.k") for r in runs]
    # the mean over blocks of the sample-mean rank; None where a rank is capped at k (a lower bound)
    out["mean_numerical_rank"] = [
        None if c else _mean(get_path(r, "alignment.result.stages.0.ra3.rank_mean"))
        for r, c in zip(runs, out["max_numerical_rank_capped"])]
    return out


def weight_decay_experiment(runner: Runner, cfg: dict[str, Any], ds, key, device,
                            residual: dict[str, Any]) -> dict[str, Any]:
    """RA1-RA3 on held-out inputs of residual nets trained with each weight decay of ``weight_decays``."""
    runs = []
    for wd in cfg["weight_decays"]:
        if wd == cfg["weight_decay"]:
            runs.append({**residual, "name": "residual"})
            continue
        name = f"residual_wd{_tag(wd)}"
        runs.append({**_run_net(runner, cfg, ds, key, device, name, net_spec(cfg, ds, "residual"),
                                {**train_kwargs(cfg), "weight_decay": wd}), "name": name})
    return _sweep(runs, cfg["weight_decays"], "weight_decay")


def _mean(values: Optional[list]) -> Optional[float]:
    vals = [float(v) for v in (values or []) if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


# =============================================================================== figures and readings
def _conditions(cfg: dict[str, Any]) -> str:
    return (f"{cfg['model']} nets of width {cfg['width']}, depth {cfg['depth']}, norm {cfg['norm']}, on "
            f"{cfg['dataset']}, {cfg['epochs']} epochs of SGD ({cfg['schedule']} schedule, lr {cfg['lr']:g}, "
            f"weight decay {cfg['weight_decay']:g}), RA on {cfg['align_samples']} test inputs")


def ujm_figure() -> FigureSpec:
    def build(r: dict) -> Any:
        groups = r["ujm_comparison"]["groups"]
        fig, axes = new_figure(4, width=4.4)
        bars(axes[0], r, groups, [(label, f"ujm_comparison.{{g}}.{k}") for k, label in COMPARED[:3]],
             title="RA1-RA2: UJM optimum vs trained nets", ylabel="value")
        bars(axes[1], r, groups, [(label, f"ujm_comparison.{{g}}.{k}") for k, label in COMPARED[3:]],
             title="RA3-RA4: UJM optimum vs trained nets", ylabel="value")
        ujm_analysis.plot_ujm(r, axes[2], at="ujm.result")
        series = [("UJM optimum", "ujm_depth_scaling.depths", "ujm_depth_scaling.depth_product"),
                  ("trained residual nets", "depth_scaling.scaling.depths", "depth_scaling.scaling.products")]
        if get_path(r, "depth_scaling.scaling").get("products_excl_first") is not None:
            series.append(("trained, without the first block", "depth_scaling.scaling.depths",
                           "depth_scaling.scaling.products_excl_first"))
        lines(axes[3], r, series, title="RA4: L * mean sigma_1 against depth", xlabel="depth L",
              ylabel="L * mean_l sigma_1", logx=True)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        cfg = r["config"]
        res, s = r["ujm"]["result"], r["ujm"]["summary"]
        cmp = r["ujm_comparison"]
        C = res["num_classes"]
        conv = ("" if res["converged"] else
                " -- NOT converged (ujm_steps exhausted or float64 stall): the numbers below are those of the last "
                "iterate, not of the optimum")
        txt = (f"UJM optimum ({r['ujm']['inputs']}; D = {res['width']}, C = {C}; L-BFGS converged "
               f"{fmt(res['converged'])} after {res['steps_run']} iterations, gradient norm {fmt(res['grad_norm'])}"
               f"{conv}): self alignment {fmt_key(s, 'self_alignment')}, off-diagonal diag ratio "
               f"{fmt_key(s, 'diag_ratio_offdiag')}, asymmetry ||J - J^T|| / ||J|| at most "
               f"{fmt_key(s, 'symmetry_max')}, "
               f"numerical ranks (tau = {fmt(res['tau'])}) {res['numerical_rank']}, s_C / s_(C-1) at most "
               f"{fmt_key(s, 'gap_ratio_max')} (every stationary point has rank <= C - 1 = {C - 1}), "
               f"L * sigma_1 {fmt_key(s, 'depth_product')} with sigma_1 spread across layers "
               f"{fmt_key(s, 'sigma1_spread')}")
        for m in cmp["groups"][1:]:
            v = cmp[m]
            sm = summary_of(r["models"][m]["alignment"])
            k = get_path(r, f"models.{m}.alignment.result.settings.k")
            txt += (f"; trained {m}: self alignment {fmt(v['self_alignment'])}, diag ratio "
                    f"{fmt(v['diag_ratio_offdiag'])}, linearity {fmt(v['linearity'])}, max rank {rank_text(sm, k)}, "
                    f"L * mean sigma_1 {fmt(v['depth_product'])}")
        near = []
        if "plain" in cmp and "residual" in cmp:
            for key, label in COMPARED[:3]:
                u, a, b = cmp["ujm"][key], cmp["residual"][key], cmp["plain"][key]
                if None in (u, a, b):
                    continue
                gap = abs(b - u) - abs(a - u)
                near.append(f"{label}: " + ("not separated (distances within 0.05; no error bars)" if abs(gap) < 0.05
                                            else ("residual" if gap > 0 else "plain")))
        tail = (f". Closer to the UJM optimum: {'; '.join(near)}" if near else "")
        sc = r["ujm_depth_scaling"]
        unconv = [L for L, c in zip(sc["depths"], sc["converged"]) if not c]
        tail += (f". RA4 of the UJM (same inputs, depths {sc['depths']}): L * sigma_1 "
                 f"{list_text(sc['depth_product'])}, "
                 f"relative spread (max - min) / mean {fmt(sc['relative_spread'])}"
                 + (f" (NOT converged at L = {unconv})" if unconv else "")
                 + f"; trained residual nets: {list_text(get_path(r, 'depth_scaling.scaling.products'))}, relative "
                   f"spread {fmt(get_path(r, 'depth_scaling.scaling.relative_spread'))}")
        return (txt + tail + f" (trained nets: {_conditions(cfg)}; the UJM's Jacobians are input-independent and "
                "its self alignment is over r <= rank, the nets' over r <= C; our reading of the model, an "
                "experiment, not a claim).")

    return FigureSpec("ujm_comparison", "Unconstrained Jacobians Model vs trained nets", build, reading)


def _sweep_panels(r: dict, root: str, xkey: str, xlabel: str, logx: bool) -> Any:
    fig, axes = new_figure(3, width=4.6)
    lines(axes[0], r, [(label, f"{root}.{xkey}", f"{root}.{k}") for k, label in SWEEP_METRICS[:3]],
          title="RA1 (test inputs)", xlabel=xlabel, ylabel="value", logx=logx)
    lines(axes[1], r, [(label, f"{root}.{xkey}", f"{root}.{k}") for k, label in SWEEP_METRICS[3:5]]
          + [("test accuracy", f"{root}.{xkey}", f"{root}.test_acc")],
          title="RA2 and test accuracy", xlabel=xlabel, ylabel="value", logx=logx)
    lines(axes[2], r, [(label, f"{root}.{xkey}", f"{root}.{k}") for k, label in SWEEP_METRICS[5:]]
          + [("rank lower bound (capped at k)", f"{root}.{xkey}", f"{root}.max_numerical_rank_lower_bound")],
          title="RA3, RA4", xlabel=xlabel, ylabel="value", logx=logx,
          styles=[{}, {}, {"marker": "^", "ls": "", "color": "C0"}])
    fig.tight_layout()
    return fig


def _sweep_values(e: dict, xkey: str, xname: str) -> str:
    parts = []
    for i, x in enumerate(e[xkey]):
        rank = fmt(e["max_numerical_rank"][i]) if not e["max_numerical_rank_capped"][i] else "capped (>= k)"
        parts.append(f"{xname} {fmt(x)}: linearity {fmt(e['linearity'][i])}, equispacing {fmt(e['equispacing'][i])}, "
                     f"step cosine {fmt(e['step_cosine'][i])}, self alignment {fmt(e['self_alignment'][i])}, diag "
                     f"ratio {fmt(e['diag_ratio_offdiag'][i])}, max rank {rank}, L * mean sigma_1 "
                     f"{fmt(e['depth_product'][i])}, test accuracy {fmt(e['test_acc'][i])}")
    return "; ".join(parts)


def _trend(e: dict, key: str, xkey: str) -> str:
    """How ``key`` moves from the smallest to the largest x (by value, not by position); for an
    RA1 metric with per-input standard errors, whether the change exceeds CONTRAST_Z of them
    (Welch z over the test inputs; the runs' own seed-to-seed spread is not included)."""
    pts = sorted((x, v, i) for i, (x, v) in enumerate(zip(e[xkey], e[key])) if v is not None)
    if len(pts) < 2:
        return f"{key}: n/a (fewer than two defined values)"
    (x0, v0, i0), (x1, v1, i1) = pts[0], pts[-1]
    txt = f"{key} {fmt(v0)} at {fmt(x0)} -> {fmt(v1)} at {fmt(x1)}"
    se = e.get(f"{key}_se")
    if se is None or se[i0] is None or se[i1] is None:
        return txt
    z = contrast_z((v1, se[i1], e[f"{key}_n"][i1]), (v0, se[i0], e[f"{key}_n"][i0]))
    if math.isnan(z):
        return txt + " (no standard error)"
    if abs(z) < CONTRAST_Z:
        return txt + f" (within {CONTRAST_Z:g} standard errors over the test inputs: no change read)"
    return txt + (" (beyond any spread over the test inputs)" if math.isinf(z)
                  else f" ({abs(z):.1f} standard errors over the test inputs)")


def _trends(e: dict, xkey: str, keys: tuple[str, ...]) -> str:
    """:func:`_trend` of each of ``keys`` against ``xkey``, comma-separated."""
    return ", ".join(_trend(e, k, xkey) for k in keys)


def stochastic_depth_figure() -> FigureSpec:
    def reading(r: dict) -> str:
        e = r["stochastic_depth"]
        trends = _trends(e, "p", ("linearity", "equispacing", "step_cosine", "self_alignment", "diag_ratio_offdiag"))
        return (_sweep_values(e, "p", "p") + f". From the smallest to the largest p: {trends} (residual "
                f"{_conditions(r['config'])}; "
                "each branch dropped with probability p per mini-batch in training, measured in eval mode where "
                "the branch is scaled by 1 - p, so J_l and L * sigma_1 include that factor; one net per p (one "
                "seed): RA1 changes are read against the spread over the test inputs only, RA2 / RA3 changes carry no "
                "error bar).")

    return FigureSpec("ra_stochastic_depth", "RA against stochastic depth",
                      lambda r: _sweep_panels(r, "stochastic_depth", "p", "drop probability p", False), reading)


def classes_figure() -> FigureSpec:
    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        e = "classes"
        lines(axes[0], r, [("max numerical rank (max over blocks)", f"{e}.num_classes", f"{e}.max_numerical_rank"),
                           ("mean numerical rank (mean over blocks)", f"{e}.num_classes", f"{e}.mean_numerical_rank"),
                           ("max rank lower bound (capped at k)", f"{e}.num_classes",
                            f"{e}.max_numerical_rank_lower_bound"),
                           ("k computed triplets", f"{e}.num_classes", f"{e}.k"),
                           ("rank = C", f"{e}.num_classes", f"{e}.num_classes")],
              title="RA3: numerical rank of J_l against C", xlabel="number of classes C", ylabel="rank",
              styles=[{}, {}, {"marker": "^", "ls": "", "color": "C0"}, {"ls": ":", "color": "gray", "marker": ""},
                      {"ls": "--", "color": "gray", "marker": ""}])
        lines(axes[1], r, [("fraction of samples with rank <= C", f"{e}.num_classes", f"{e}.rank_le_c_fraction"),
                           ("test accuracy", f"{e}.num_classes", f"{e}.test_acc")],
              title="rank <= C and test accuracy", xlabel="number of classes C", ylabel="fraction")
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        e = r["classes"]
        parts, held = [], []
        for i, C in enumerate(e["num_classes"]):
            s = summary_of(e["runs"][i]["alignment"])
            mean = ("n/a (capped)" if e["max_numerical_rank_capped"][i] else fmt(e["mean_numerical_rank"][i]))
            parts.append(f"C = {C} ({e['train_samples'][i]} training samples, {e['epochs'][i]} epochs, "
                         f"{e['sgd_steps'][i]} SGD steps): max rank {rank_text(s, e['k'][i])}, mean rank {mean}, "
                         f"fraction rank <= C {fmt(e['rank_le_c_fraction'][i])}, test accuracy {fmt(e['test_acc'][i])}")
            mr, lb = e["max_numerical_rank"][i], e["max_numerical_rank_lower_bound"][i]
            if not e["max_numerical_rank_capped"][i] and mr is not None:
                held.append(f"C = {C}: {'holds' if mr <= C else 'fails'}")
            elif lb is not None and lb > C:   # a lower bound above C already decides it
                held.append(f"C = {C}: fails (rank >= {fmt(lb)})")
            else:
                held.append(f"C = {C}: n/a (capped at k; raise k)")
        verdict = ", ".join(held)
        budget = ("each C-class net trained for at least the SGD steps of the study's net (more epochs)"
                  if r["config"]["classes_equal_steps"] else "the same epochs for every C (fewer SGD steps for fewer "
                  "classes, so less optimisation and weight decay)")
        return ("; ".join(parts) + f". Max rank <= C: {verdict} (residual {_conditions(r['config'])}, the first C "
                f"classes of the same data, {budget}; tau = 1e-2; k = C + 5 triplets unless set, a rank reaching k "
                "is capped).")

    return FigureSpec("ra_classes", "RA3: numerical rank against the number of classes", build, reading)


def weight_decay_figure() -> FigureSpec:
    def reading(r: dict) -> str:
        e = r["weight_decay"]
        return (_sweep_values(e, "weight_decay", "weight decay") + f". From the smallest to the largest weight decay: "
                f"{_trends(e, 'weight_decay', ('linearity', 'equispacing', 'step_cosine', 'self_alignment', 'test_acc'))}"
                f" (residual {_conditions(r['config'])}, with the weight "
                "decay of each point instead; RA on held-out inputs; the reference observation on digits: linearity "
                "0.998 at 5e-2 and 0.59 at 5e-4 at equal test accuracy; one net per weight decay (one seed): RA1 "
                "changes are read against the spread over the test inputs only).")

    return FigureSpec("ra_weight_decay", "RA1-RA3 against weight decay (held-out inputs)",
                      lambda r: _sweep_panels(r, "weight_decay", "weight_decay", "SGD weight decay", True), reading)


# =============================================================================== the study
def run_alignment(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train the residual net and its plain twin, align both (RA1-RA3), then RA4 across ``depths``,
    then the experiments of ``extras``."""
    device = resolve_device(cfg["device"])
    extras = parse_extras(cfg)
    ds, key = study_data(cfg)
    models: dict[str, Any] = {}
    nets: dict[str, Any] = {}
    for arch in ("residual", "plain"):
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        nets[arch] = model
        models[arch] = {"train": curves,
                        "alignment": alignment_step(runner, cfg, model, ds, device, f"{arch}_alignment")}
    results = {"study": "alignment", "config": cfg, "models": models,
               "depth_scaling": depth_scaling_step(runner, cfg, ds, key, device)}
    names = ["residual", "plain"]
    summaries = {m: {"alignment": models[m]["alignment"]["summary"]} for m in names}
    figures = alignment_figures(names) + [training_figure(names)]
    residual = {**models["residual"], "align_samples": cfg["align_samples"]}
    if "ujm" in extras:
        results.update(ujm_experiment(runner, cfg, nets["residual"], ds, device, models))
        summaries["ujm"] = {"ujm": results["ujm"]["summary"]}
        figures.append(ujm_figure())
    if "stochastic_depth" in extras:
        results["stochastic_depth"] = stochastic_depth_experiment(runner, cfg, ds, key, device, residual)
        figures.append(stochastic_depth_figure())
    if "classes" in extras:
        results["classes"] = classes_experiment(runner, cfg, ds, key, device, residual)
        figures.append(classes_figure())
    if "weight_decay" in extras:
        results["weight_decay"] = weight_decay_experiment(runner, cfg, ds, key, device, residual)
        figures.append(weight_decay_figure())
    intro = "Residual Alignment (RA1-RA4) of a ResNet and of the same net without skips."
    if extras:
        intro += f" Counterfactual experiments: {', '.join(extras)}."
    return StudyOutput(results, figures, summaries, intro)


def validate_alignment(cfg: dict[str, Any]) -> None:
    """alignment: the data, the nets' size, k <= D, align_samples <= test samples; for the extras:
    FC nets for the UJM, ujm_samples <= training samples, a positive UJM weight decay, p < 1,
    every C <= the data's classes."""
    info = validate_net_study(cfg)
    validate_alignment_options(cfg, info)
    extras = parse_extras(cfg)
    if "ujm" in extras:
        if cfg.get("model", "fc") != "fc":
            raise UsageError("extras: expected model=fc for ujm (the UJM's Jacobians are dense D x D matrices; a conv "
                             f"net's D = width * H * W is too large), got model={cfg.get('model')}")
        check_samples(cfg, "ujm_samples", info.n_train, "training", info)
        if cfg["ujm_lam"] == 0 and cfg["weight_decay"] == 0:
            raise UsageError("ujm_lam: expected a value > 0 when weight_decay is 0 (ujm_lam = 0 means the nets' "
                             "weight decay, and the UJM needs a positive one), got 0")
    if "classes" in extras:
        bad = [C for C in cfg["class_counts"] if C > info.num_classes]
        if bad:
            raise UsageError(f"class_counts: expected ints in [2, {info.num_classes}] (the classes of {info.name}), "
                             f"got {cfg['class_counts']}")
    if "stochastic_depth" in extras:
        check_net(cfg, info, cfg["depth"])


STUDY = register(Study("alignment", "Residual Alignment: with vs without skips",
                       "nets with skips show RA1-RA4; the same nets without skips show none",
                       net_options(epochs=30, weight_decay=5e-2, schedule="cosine") + ALIGN_OPTIONS + EXTRA_OPTIONS,
                       run_alignment, validate_alignment))
