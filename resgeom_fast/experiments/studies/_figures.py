"""The figures several studies draw, as :class:`~resgeom_fast.experiments.report.FigureSpec`
builders: each takes the model names (and the dotted ``root`` under which their results sit) and
returns specs whose ``build(results)`` draws from the results dictionary only (tagged artists, so
:func:`~resgeom_fast.experiments.report.check_figure` can verify every plotted number) and whose
``reading(results)`` is the figure's line of text in report.md (:mod:`._readings`).

A panel that shows one model's result of one analysis is drawn by that analysis' ``plot_*`` helper
(the one plotting path: it reads the result's dict form inside the results dictionary, ``at=`` its
dotted path), then given the report's title; panels that overlay several models (or compare with
a depth scan) are drawn with the primitives of :mod:`resgeom_fast.experiments.figures`.
"""
from __future__ import annotations

import importlib
import math
from typing import Any

from resgeom_fast.analysis import alignment as alignment_analysis
from resgeom_fast.analysis import spectrum as spectrum_analysis

from resgeom_fast.analysis.plotting import errorbars, pyplot

from ..figures import bars, heatmaps, lines, new_figure
from ..report import FigureSpec, fmt, fmt_key, get_path
from ._readings import (
    COLLAPSE_RHO,
    CONTROL,
    alignment_stage_reading,
    collapse_reading,
    collapse_training_reading,
    depth_scaling_text,
    fraction_text,
    gc_lam_reading,
    leaky_steps_reading,
    net_conditions,
    nf_training_reading,
    per_model,
    ra1_reading,
    rank_text,
    seed_order_reading,
    spectrum_reading,
    summary_of,
)

# the analyses' plot_* are looked up through their modules at each call (a wrapper installed on the
# module, as the tests' spies do, sees every call); import_module because resgeom_fast.analysis
# exports a function named like the collapse module
collapse_analysis = importlib.import_module("resgeom_fast.analysis.collapse")

__all__ = ["alignment_figures", "collapse_figure", "density_figure", "paths_figure", "singularity_figure",
           "stage_figures", "training_figure",
           # issue 18
           "collapse_training_figure", "gc_training_figure", "nf_training_figure",
           "leaky_steps_figure", "seed_bars_figure"]


def training_figure(models: list[str], root: str = "models") -> FigureSpec:
    """Training loss and test accuracy (test loss for regression) per epoch."""

    def metric(r: dict) -> str:
        accs = [a for m in models for a in get_path(r, f"{root}.{m}.train.test_acc")]
        return "test_acc" if any(a is not None for a in accs) else "test_loss"

    def build(r: dict) -> Any:
        fig, (a1, a2) = new_figure(2)
        lines(a1, r, [(m, f"{root}.{m}.train.epoch", f"{root}.{m}.train.train_loss") for m in models],
              title="training loss", xlabel="epoch", ylabel="train loss", logy=True, marker="")
        key = metric(r)
        lines(a2, r, [(m, f"{root}.{m}.train.epoch", f"{root}.{m}.train.{key}") for m in models],
              title=key.replace("_", " "), xlabel="epoch", ylabel=key.replace("_", " "), logy=key == "test_loss",
              marker="")
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        key = metric(r)
        parts = []
        for m in models:
            t = get_path(r, f"{root}.{m}.train")
            loss = t["train_loss"][-1] if t["train_loss"] else None
            parts.append(f"{m}: final train loss {fmt(loss)}, {key.replace('_', ' ')} {fmt(t['final'].get(key))}")
        return "; ".join(parts) + "."

    return FigureSpec("training", "Training curves", build, reading)


def alignment_figures(models: list[str], root: str = "models", with_depth: bool = True) -> list[FigureSpec]:
    """RA1 trajectories, RA3 spectra, RA2 cross alignment and RA4 sigma_1 (against depth from
    ``depth_scaling.scaling`` when ``with_depth``) of stage 0 of each model's ``alignment``."""
    def p(m: str) -> str:
        return f"{root}.{m}.alignment.result"

    def traj(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            alignment_analysis.plot_trajectories(r, ax, at=p(m))
            ax.set_title(f"{m}: trajectories (PCA of h_0..h_L)", fontsize=9)
        fig.tight_layout()
        return fig

    def traj_read(r: dict) -> str:
        return ra1_reading(r, models, root)

    def sv(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            alignment_analysis.plot_singular_values(r, ax, at=p(m))
            ax.set_title(f"{m}: singular values of J_l", fontsize=9)
        fig.tight_layout()
        return fig

    def sv_read(r: dict) -> str:
        parts = []
        for m in models:
            s = summary_of(get_path(r, f"{root}.{m}.alignment"))
            k = get_path(r, f"{p(m)}.settings.k")
            parts.append(f"{m}: max numerical rank {rank_text(s, k)}, fraction rank <= C "
                         f"{fmt_key(s, 'rank_le_c_fraction')}")
        return "; ".join(parts) + (" (RA3: rank at most C for FC nets; dashed line at r = C; a rank that reaches k is "
                                   "capped by the k computed singular values and reads '>= k').")

    def cross(r: dict) -> Any:
        # top row: the diag-ratio matrices (no analysis plot shows them); bottom row: |A_ij| of each
        # model's first stored pair (plot_cross_alignment)
        n = len(models)
        fig, axes = new_figure(n, 2, width=4.4, height=3.8)
        heatmaps(axes[:n], r, [(f"{m}: diag ratio of A_ij (blocks i, j)", f"{p(m)}.stages.0.ra2.diag_ratio_mean")
                               for m in models], fig)
        for ax, m in zip(axes[n:], models):
            pairs = get_path(r, f"{p(m)}.stages.0.ra2.cross_pairs")
            if pairs:
                i, j = pairs[0]
                alignment_analysis.plot_cross_alignment(r, ax, pairs=[(i, j)], at=p(m))
                ax.set_title(f"{m}: |A_ij|, i={i}, j={j}", fontsize=9)
            else:  # no stored pair: the same panel as before (the path does not exist either)
                heatmaps([ax], r, [(f"{m}: |A_ij|, i=0, j=0", f"{p(m)}.stages.0.ra2.cross_abs_mean.0")], fig)
        fig.tight_layout()
        return fig

    def cross_read(r: dict) -> str:
        k = get_path(r, f"{p(models[0])}.settings.k")
        control = ("; read against the plain control's values" if CONTROL in models else
                   "; no control net without skips in this study")
        return per_model(r, models, root, "alignment", "off-diagonal diag ratio {diag_ratio_offdiag}, "
                         "positive diagonals {diag_positive_offdiag}, self alignment {self_alignment}") + (
            f" (RA2: near 1 = singular vectors aligned across depth; random baseline 1/k = {fmt(1 / k)}{control}; "
            "no uncertainty is attached to these means, so small differences are not read).")

    def sig(r: dict) -> Any:
        fig, axes = new_figure(2 if with_depth else 1)
        lines(axes[0], r, [(m, "index", f"{p(m)}.stages.0.ra4.sigma1_mean") for m in models],
              title="sigma_1(J_l) per block", xlabel="block l", ylabel="sigma_1, mean over samples", logy=True)
        if with_depth:
            lines(axes[1], r, [("L * mean_l sigma_1", "depth_scaling.scaling.depths",
                                "depth_scaling.scaling.products"),
                               ("mean_l sigma_1", "depth_scaling.scaling.depths",
                                "depth_scaling.scaling.mean_sigma1")],
                  title="RA4: residual nets of several depths", xlabel="depth L", ylabel="value", logx=True, logy=True)
        fig.tight_layout()
        return fig

    def sig_read(r: dict) -> str:
        txt = per_model(r, models, root, "alignment", "L * mean sigma_1 = {depth_product}, without the first "
                        "block {depth_product_excl_first} (first block's sigma_1 / mean of the others "
                        "{first_block_ratio})")
        if with_depth:
            txt += "; " + depth_scaling_text(get_path(r, "depth_scaling.scaling"))
        return txt + "."

    return [FigureSpec("ra_trajectories", "RA1: trajectories", traj, traj_read),
            FigureSpec("ra_singular_values", "RA3: singular value spectra of the residual Jacobians", sv, sv_read),
            FigureSpec("ra_cross_alignment", "RA2: cross alignment", cross, cross_read),
            FigureSpec("ra_sigma1_depth", "RA4: sigma_1 against depth", sig, sig_read)]


def density_figure(models: list[str], root: str = "models") -> FigureSpec:
    """The SLQ Hessian spectral density of each model's ``spectrum`` (one panel each, log scale, +- std band)."""
    def build(r: dict) -> Any:
        # one panel per model: the nets' spectra differ by orders of magnitude in scale
        fig, axes = new_figure(len(models), width=4.6, height=3.8)
        for ax, m in zip(axes, models):
            at = f"{root}.{m}.spectrum.result"
            spectrum_analysis.plot_density(r, ax, at=at)  # density line (tagged), +- std band, extreme eigenvalues
            summ = summary_of(get_path(r, f"{root}.{m}.spectrum"))
            (density,) = [ln for ln in ax.lines if (ln.get_gid() or "").endswith(f"y={at}.density")]
            density.set_label(f"{m} (near-zero mass: rel. {fraction_text(summ, 'degenerate_fraction_rel', 2)}, "
                                  f"abs. {fraction_text(summ, 'degenerate_fraction_abs', 2)})")
            dens = [v for v in get_path(r, f"{at}.density") if v is not None and math.isfinite(v)]
            top = max(dens) if dens else 0.0
            if top > 0:  # log axis over 8 decades below the highest peak (SLQ tails fall to 1e-100)
                ax.set_yscale("log", nonpositive="mask")
                ax.set_ylim(top * 1e-8, top * 3)
            else:  # nothing to show on a log axis
                ax.set_yscale("linear")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density (band: +- std over probes)")
            ax.set_title(f"{m}: Hessian spectral density (SLQ)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return spectrum_reading(r, models, root)

    return FigureSpec("hessian_density", "Hessian spectral density with spread", build, reading)


def collapse_figure(models: list[str], root: str = "models") -> FigureSpec:
    """NC1, ETF error, equinorm and NCC mismatch against depth of each model's ``collapse``."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            collapse_analysis.plot_collapse(r, ax, at=f"{root}.{m}.collapse.result")
            ax.set_title(f"{m}: collapse metrics against depth", fontsize=9)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return collapse_reading(r, models, root)

    return FigureSpec("collapse_depth", "Collapse metrics against depth", build, reading)


def singularity_figure(models: list[str], root: str = "models") -> FigureSpec:
    """Dead units, small eigenvalues, activation overlap and effective rank of each model's ``singularities``."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        bars(axes[0], r, models, [
            ("dead units (all layers)", f"{root}.{{g}}.singularities.summary.dead_fraction_total"),
            ("small eigenvalues", f"{root}.{{g}}.singularities.summary.mean_small_eig_fraction"),
            ("max |cos| of activations", f"{root}.{{g}}.singularities.summary.mean_act_cos_max"),
            ("effective rank / n", f"{root}.{{g}}.singularities.summary.mean_effective_rank_fraction"),
        ], title="singularities (means over layers)", ylabel="fraction")
        lines(axes[1], r, [(m, "index", f"{root}.{m}.singularities.result.layers.*.dead_fraction") for m in models],
              title="dead-unit fraction per layer (0 = stem)", xlabel="ReLU layer", ylabel="dead fraction")
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return per_model(r, models, root, "singularities",
                         "dead units {dead_fraction_total}, small-eigenvalue fraction {mean_small_eig_fraction}, "
                         "effective rank fraction {mean_effective_rank_fraction}") + (
            " (expected: plain >= residual >= hyper-residual in dead units).")

    return FigureSpec("singularities", "Singularity statistics", build, reading)


def paths_figure(models: list[str], root: str = "models") -> FigureSpec:
    """The path-order distribution and the path norms of each model's ``paths``."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        lines(axes[0], r, [(m, f"{root}.{m}.paths.result.orders", f"{root}.{m}.paths.result.distribution")
                           for m in models],
              title="path-order distribution p_m", xlabel="path order m", ylabel="p_m")
        lines(axes[1], r, [(m, f"{root}.{m}.paths.result.orders", f"{root}.{m}.paths.result.norms_mean")
                           for m in models],
              title="||c_L^(m)||, mean over samples", xlabel="path order m", ylabel="norm", logy=True)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return per_model(r, models, root, "paths",
                         "mean path order {mean_order} of L = {num_blocks}, most weighted order {mode_order}") + "."

    return FigureSpec("path_orders", "Path-order distribution", build, reading)


def stage_figures(al: dict[str, Any]) -> list[FigureSpec]:
    """``resgeom analyze``: singular values and sigma_1 per stage of the alignment step result ``al``
    (stored at ``models.model.alignment``), read by :func:`alignment_stage_reading`."""
    base = "models.model.alignment.result"
    n_st = len(al["result"]["stages"])

    def sv(r: dict) -> Any:
        fig, axes = new_figure(n_st)
        for s, ax in enumerate(axes):
            alignment_analysis.plot_singular_values(r, ax, stage=s, at=base)
            ax.set_title(f"stage {s}: singular values of J_l", fontsize=9)
        fig.tight_layout()
        return fig

    def sig(r: dict) -> Any:
        fig, axes = new_figure(1)
        alignment_analysis.plot_sigma1(r, axes[0], at=base)  # one line (+- std bars) per stage
        sig1 = [v for s in range(n_st) for v in get_path(r, f"{base}.stages.{s}.ra4.sigma1_mean")]
        if any(v is not None and math.isfinite(v) and v > 0 for v in sig1):
            axes[0].set_yscale("log", nonpositive="mask")
        axes[0].set_title("sigma_1(J_l) per block", fontsize=9)
        fig.tight_layout()
        return fig

    def read(r: dict) -> str:
        return alignment_stage_reading(get_path(r, base) or {})

    return [FigureSpec("ra_singular_values", "Singular values of the residual Jacobians, per stage", sv, read),
            FigureSpec("ra_sigma1", "sigma_1 per block", sig, read)]


# ------------------------------------------------------------------------------------------------
# issue 18: collapse along training, GC along training per branch scale, deep normalisation-free
# training (readings in ._readings: collapse_training_reading, gc_lam_reading, nf_training_reading)
def collapse_training_figure(model: str = "residual", root: str = "models") -> FigureSpec:
    """NC1 per layer at every tracked epoch (one line per epoch) and, against the epoch, Spearman
    rho(layer, NC1) and log10 NC1(h_L) / NC1(h_0), from ``root.model.along_training``."""
    at = f"{root}.{model}.along_training"

    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        a = get_path(r, at)
        n = len(a["epochs"])
        cmap = pyplot().get_cmap("viridis")
        lines(axes[0], r, [(f"epoch {ep}", f"{at}.layers", f"{at}.nc1_by_layer.{i}") for i, ep in enumerate(a["epochs"])],
              title=f"{model}: NC1 per layer along training", xlabel="layer l", ylabel="NC1", logy=True,
              styles=[{"color": cmap(i / max(1, n - 1))} for i in range(n)])
        lines(axes[1], r, [("Spearman rho(l, NC1)", f"{at}.epochs", f"{at}.spearman_nc1"),
                           ("log10 NC1(h_L) / NC1(h_0)", f"{at}.epochs", f"{at}.nc1_decay_decades")],
              title="trend over depth, per epoch", xlabel="epoch", ylabel="value")
        axes[1].axhline(COLLAPSE_RHO, color="gray", ls=":", lw=0.8)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return collapse_training_reading(get_path(r, at), net_conditions(r.get("config", {})))

    return FigureSpec("collapse_along_training", "NC1 per layer along training", build, reading)


def gc_training_figure(at: str = "gc_training") -> FigureSpec:
    """Geometric complexity against the epoch, one line per branch scale lam (mean over seeds), and
    at the end of training against lam (+- one standard error), from the study's ``at`` entry."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        g = get_path(r, at)
        lines(axes[0], r, [(f"lam = {b['label']}", f"{at}.epochs", f"{at}.by_lam.{i}.gc_mean")
                           for i, b in enumerate(g["by_lam"])],
              title="GC along training (mean over seeds)", xlabel="epoch", ylabel="GC", logy=True)
        lines(axes[1], r, [("end of training", f"{at}.final.lams", f"{at}.final.gc_mean")],
              title="GC at the end of training against lam (+- 1 s.e.)", xlabel="lam", ylabel="GC", logx=True,
              logy=True)
        errorbars(axes[1], r, f"{at}.final.lams", f"{at}.final.gc_mean", f"{at}.final.gc_se", color="C0")
        axes[1].tick_params(axis="both", which="minor", labelbottom=False, labelleft=False)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        g = get_path(r, at)
        return gc_lam_reading(g, net_conditions(r.get("config", {}), norm=g.get("norm", "none"),
                                                seeds=len(g.get("seeds", []))))

    return FigureSpec("gc_along_training", "Geometric complexity along training, per branch scale", build, reading)


def nf_training_figure(at: str = "nf_training", reference: str = "models.residual.train.final.test_acc") -> FigureSpec:
    """Training loss and test accuracy per epoch of the deep normalisation-free net at ``at``; the
    reading compares its test accuracy with the one at ``reference``."""
    def build(r: dict) -> Any:
        fig, axes = new_figure(2)
        d = get_path(r, f"{at}.depth")
        lines(axes[0], r, [(f"depth {d}", f"{at}.train.epoch", f"{at}.train.train_loss")],
              title="normalisation-free: training loss", xlabel="epoch", ylabel="train loss", logy=True)
        lines(axes[1], r, [(f"depth {d}: test", f"{at}.train.epoch", f"{at}.train.test_acc"),
                           (f"depth {d}: train", f"{at}.train.epoch", f"{at}.train.train_acc")],
              title="normalisation-free: accuracy", xlabel="epoch", ylabel="accuracy")
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        nf = get_path(r, at)
        return nf_training_reading(nf, get_path(r, reference),
                                   net_conditions(r.get("config", {}), depth=nf.get("depth"), norm="none"))

    return FigureSpec("nf_deep_training", "Deep normalisation-free training", build, reading)


# =============================================================================== issue 18, part C
def leaky_steps_figure(conditions: str, at: str = "step_comparison") -> FigureSpec:
    """Adaptive against equidistant steps: the steps rho_l per layer (layer placement) of every
    teacher and scheme, and the test losses as bars (teachers x schemes)."""

    def build(r: dict) -> Any:
        cmp = get_path(r, at)
        fig, axes = new_figure(2)
        series, styles = [], []
        for i, t in enumerate(cmp["teachers"]):
            for scheme in cmp["schemes"]:
                series.append((f"{'-'.join(str(d) for d in cmp[t]['dims'])} {scheme}", f"{at}.{t}.{scheme}.layer",
                               f"{at}.{t}.{scheme}.rho"))
                styles.append({"color": f"C{i}", "ls": "--" if scheme == "equidistant" else "-"})
        lines(axes[0], r, series, title=f"layer placement: steps rho_l at Lt = {cmp['lt']:g}", xlabel="layer l",
              ylabel="rho_l (small: layers dense)", marker=".", styles=styles)
        bars(axes[1], r, cmp["teachers"], [(s, f"{at}.{{g}}.{s}.test_data_loss") for s in cmp["schemes"]],
             title="test loss (1/N)||Y - f(X)||^2", ylabel="test loss",
             ticklabels=["-".join(str(d) for d in cmp[t]["dims"]) for t in cmp["teachers"]])
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return leaky_steps_reading(get_path(r, at), conditions)

    return FigureSpec("leaky_adaptive_steps", "Adaptive against equidistant steps", build, reading)


def seed_bars_figure(name: str, title: str, at: str, metrics: list[tuple[str, str]],
                     pairs: list[tuple[str, str]], conditions: str) -> FigureSpec:
    """One panel per norm setting of ``get_path(r, at)`` (``{"norms", "groups", <norm>: {<group>:
    {"per_seed", "mean", "se"}}}``): the mean over seeds of every metric (label, key) as tagged bars
    per group, with +- one standard error bars; the reading orders the groups along ``pairs`` per
    norm and metric (:func:`seed_order_reading`)."""

    def build(r: dict) -> Any:
        blk = get_path(r, at)
        norms, groups = blk["norms"], blk["groups"]
        fig, axes = new_figure(len(norms))
        n = len(metrics)
        width = 0.8 / max(n, 1)
        for ax, norm in zip(axes, norms):
            bars(ax, r, groups, [(lab, f"{at}.{norm}.{{g}}.mean.{key}") for lab, key in metrics],
                 title=f"{title}, norm={norm}, lr {fmt((blk.get('lr') or {}).get(norm))}\n(mean +- s.e. over the "
                 f"seeds with a value, of {len(blk['seeds'])}; diverged seeds excluded)", ylabel="fraction")
            for j, (_, key) in enumerate(metrics):
                xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
                ys = [blk[norm][g]["mean"][key] for g in groups]
                es = [blk[norm][g]["se"][key] for g in groups]
                ys = [math.nan if v is None else v for v in ys]
                es = [0.0 if e is None or not math.isfinite(e) else e for e in es]
                ax.errorbar(xs, ys, yerr=es, fmt="none", capsize=2, color="k", lw=0.8)
            ax.tick_params(axis="x", labelrotation=30)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        blk = get_path(r, at)
        parts = []
        for norm in blk["norms"]:
            for lab, key in metrics:
                parts.append(seed_order_reading(blk[norm], blk["groups"], key, f"{lab}, norm={norm}", pairs,
                                                f"{conditions}, norm {norm}, lr {fmt((blk.get('lr') or {}).get(norm))}, "
                                                f"seeds {blk['seeds']}"))
        return ". ".join(parts) + "."

    return FigureSpec(name, title, build, reading)
