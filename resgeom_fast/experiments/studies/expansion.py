"""``resgeom run expansion``: the remainder after the second-order terms of the residual
expansion against lam (~ lam^3), output norms at init against depth, path-order distributions and
geometric complexity of trained nets."""
from __future__ import annotations

import math
from typing import Any

# the module, looked up at each call (a wrapper installed on it sees every call)
from resgeom_fast.analysis import expansion as expansion_analysis
from resgeom_fast.models import FCResNet

from ..common import resolve_device
from ..config import UsageError
from ..figures import bars, lines, new_figure
from ..report import FigureSpec, fmt, get_path
from ..runner import Runner
from ._figures import paths_figure, training_figure
from ._registry import Study, StudyOutput, register
from ._shared import analysis_step, net_options, opt, split_inputs, study_data, train_net
from ._validation import DataInfo, check_net, check_samples, validate_net_study

__all__ = ["STUDY", "run_expansion", "validate_expansion"]


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
    results = {"study": "expansion", "config": cfg, "models": models, "remainder": rem, "output_norms": norms}

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
               training_figure(archs)]
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
                           opt("gc_samples", "int", 256, "test inputs of the geometric complexity", minimum=1)],
                       run_expansion, validate_expansion))
