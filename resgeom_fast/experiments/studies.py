"""The runnable studies of ``resgeom run STUDY`` and the demo of ``resgeom demo``.

Each :class:`Study` declares its options (defaults sized for a 2-core CPU in minutes; raise
width, depth, epochs, samples or pick a torchvision data set and ``device=cuda`` to scale up)
and a ``run(runner, config)`` that executes resumable steps and returns a :class:`StudyOutput`:
the results dictionary, the figures built from it and the summaries for report.md.

Studies and their headline comparisons (SCIENCE.md "Expected" lines):

- alignment: ResNet with vs without skips (RA1-RA3), and RA4 across depths;
- hessian: plain vs residual vs hyper-residual Hessian spectra (degenerate / negative mass);
- singularities: the same architectures plus the plain net with BiasReg (dead units, overlaps,
  linear dependence) and their training curves;
- collapse: collapse metrics against depth, along training, and the MUFM optimum;
- expansion: remainder after the second-order terms ~ lam^3, output norm at init against depth
  for lam in {1, 1/sqrt(L), 1/L}, path-order distributions of trained nets;
- leaky: -(2/Lt) H against Lt on the teacher data (k* = 3), Hamiltonian across layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .common import DATASETS_HELP, load_data, resolve_device, train_step
from .config import Option, UsageError
from .figures import bars, heatmaps, lines, new_figure, pca_trajectories, spectra_per_block
from .report import FigureSpec, fmt, get_path
from .runner import Runner

__all__ = ["DEMO_SIZES", "STUDIES", "STUDY_NAMES", "Study", "StudyOutput", "demo_config"]


@dataclass
class StudyOutput:
    results: dict[str, Any]
    figures: list[FigureSpec]
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    intro: str = ""


@dataclass
class Study:
    name: str
    title: str
    expected: str
    options: list[Option]
    run: Callable[[Runner, dict[str, Any]], StudyOutput]


# =============================================================================== options
def _net_options(width: int = 64, depth: int = 8, epochs: int = 15, lr: float = 0.05, weight_decay: float = 0.0,
                 schedule: str = "constant") -> list[Option]:
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
        Option("seed", "int", 0, "seed of data split, weights, training and probes", minimum=0),
        Option("device", "str", "cpu", "cpu | cuda | cuda:N"),
    ]


def _opt(name: str, type_: str, default: Any, help_: str, choices: Optional[tuple] = None,
         minimum: Optional[float] = None) -> Option:
    return Option(name, type_, default, help_, choices, minimum)


ALIGN_OPTIONS = [
    _opt("align_samples", "int", 64, "test inputs of the alignment analysis", minimum=1),
    _opt("k", "optint", None, "singular triplets per block (null: C + 5)", minimum=1),
    _opt("oversample", "int", 10, "randomized SVD oversampling", minimum=0),
    _opt("power_iters", "int", 2, "randomized SVD power iterations", minimum=0),
    _opt("depths", "ints", [4, 8, 16], "depths of the residual nets of the RA4 comparison", minimum=1),
]
HESSIAN_OPTIONS = [
    _opt("hessian_samples", "int", 512, "training samples of the loss whose Hessian is analysed", minimum=1),
    _opt("eigs", "int", 4, "extreme eigenvalues (both ends)", minimum=2),
    _opt("probes", "int", 4, "SLQ probes", minimum=1),
    _opt("lanczos_steps", "int", 40, "Lanczos steps per SLQ probe", minimum=2),
    _opt("trace_probes", "int", 30, "Hutch++ products of the trace", minimum=3),
]
ARCH_CHOICES = ("plain", "residual", "hyper", "orthogonal", "plain_biasreg")


# =============================================================================== helpers
def _data(cfg: dict[str, Any]):
    image = cfg.get("model", "fc") == "conv"
    ds = load_data(cfg.get("dataset", "digits"), image=image, n_train=cfg.get("n_train"), seed=cfg["seed"])
    key = {"dataset": cfg.get("dataset", "digits"), "n_train": cfg.get("n_train"), "seed": cfg["seed"], "image": image}
    return ds, key


ARCHS = {  # name -> (skip, hyper)
    "plain": ("none", False), "residual": ("identity", False), "hyper": ("identity", True),
    "orthogonal": ("orthogonal", False), "plain_biasreg": ("none", False),
}


def _spec(cfg: dict[str, Any], ds, arch: str = "residual", depth: Optional[int] = None) -> dict[str, Any]:
    skip, hyper = ARCHS[arch]
    spec: dict[str, Any] = {"kind": cfg.get("model", "fc"), "width": cfg["width"],
                            "depth": depth if depth is not None else cfg["depth"], "num_classes": ds.num_classes,
                            "skip": skip, "hyper": hyper, "norm": cfg.get("norm", "batch"), "seed": cfg["seed"]}
    if spec["kind"] == "fc":
        spec["in_dim"] = int(math.prod(ds.input_shape))
    else:
        spec["in_channels"] = int(ds.input_shape[0])
    return spec


def _train_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"epochs": cfg["epochs"], "lr": cfg["lr"], "momentum": 0.9, "batch_size": cfg["batch_size"],
            "seed": cfg["seed"], "optimizer": "sgd", "weight_decay": cfg.get("weight_decay", 0.0),
            "schedule": cfg.get("schedule", "constant")}


def _train(runner: Runner, cfg: dict[str, Any], ds, key, arch: str, device: torch.device, depth: Optional[int] = None,
           name: Optional[str] = None, callbacks: tuple = ()):
    regs: tuple = ()
    if arch == "plain_biasreg":
        from resgeom_fast.models import BiasReg

        regs = (BiasReg(beta=cfg.get("biasreg_beta", 1e-3), b0=cfg.get("biasreg_b0", 0.1)),)
    name = name or (arch if depth is None else f"{arch}_L{depth}")
    model, out = train_step(runner, name, _spec(cfg, ds, arch, depth), ds, key, _train_kwargs(cfg), device,
                            regularizers=regs, callbacks=callbacks)
    return model, _curves(out)


def _curves(train_out: dict[str, Any]) -> dict[str, Any]:
    hist = train_out["history"]
    return {"epoch": [h["epoch"] for h in hist], "train_loss": [h["train_loss"] for h in hist],
            "train_acc": [h["train_acc"] for h in hist], "test_loss": [h["test_loss"] for h in hist],
            "test_acc": [h["test_acc"] for h in hist], "final": train_out["final"],
            "callbacks": [h.get("callbacks") for h in hist]}


def _analysis(runner: Runner, name: str, fn: Callable[[], Any]) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        r = fn()
        return {"result": r.to_dict(), "summary": r.summary()}

    return runner.step(name, run)


def _xy(ds, split: str, n: int, device: torch.device):
    x, y = ds.tensors(split)
    return x[:n].to(device), y[:n].to(device)


def _alignment(runner: Runner, cfg: dict, model, ds, device, name: str) -> dict[str, Any]:
    from resgeom_fast.analysis.alignment import residual_alignment

    x, y = _xy(ds, "test", cfg["align_samples"], device)
    return _analysis(runner, name, lambda: residual_alignment(
        model, x, cfg.get("k"), y, oversample=cfg["oversample"], power_iters=cfg["power_iters"], seed=cfg["seed"]))


def _spectrum(runner: Runner, cfg: dict, model, ds, device, name: str) -> dict[str, Any]:
    from resgeom_fast.analysis.spectrum import hessian_spectrum

    x, y = _xy(ds, "train", cfg["hessian_samples"], device)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = min(cfg["lanczos_steps"], dim)
    return _analysis(runner, name, lambda: hessian_spectrum(
        model, F.cross_entropy, (x, y), k=min(cfg["eigs"], dim), probes=cfg["probes"], steps=steps,
        trace_probes=cfg["trace_probes"], seed=cfg["seed"], progress=runner.progress))


def _depth_scaling(runner: Runner, cfg: dict, ds, key, device) -> dict[str, Any]:
    """RA4: residual nets of several depths, alignment of each, depth_scaling over them."""
    from resgeom_fast.analysis.alignment import depth_scaling, residual_alignment

    def run() -> dict[str, Any]:
        results, per = [], []
        x, y = _xy(ds, "test", cfg["align_samples"], device)
        for L in cfg["depths"]:
            model, _ = _train(runner, cfg, ds, key, "residual", device, depth=L)
            r = residual_alignment(model, x, cfg.get("k"), y, oversample=cfg["oversample"],
                                   power_iters=cfg["power_iters"], seed=cfg["seed"])
            results.append(r)
            per.append({"depth": L, "sigma1_mean": r.stages[0].sigma1_mean, "summary": r.summary()})
        return {"scaling": depth_scaling(results), "per_depth": per}

    return runner.step("depth_scaling", run)


def _summ(block: dict[str, Any]) -> dict[str, float]:
    return block.get("summary", {})


# =============================================================================== figures
def _fig_training(models: list[str], root: str = "models") -> FigureSpec:
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


def _align_figures(models: list[str], root: str = "models", with_depth: bool = True) -> list[FigureSpec]:
    def p(m: str) -> str:
        return f"{root}.{m}.alignment.result"

    def traj(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            pca_trajectories(ax, r, f"{p(m)}.stages.0.ra1.pca", f"{p(m)}.labels",
                             f"{m}: trajectories (PCA of h_0..h_L)")
        fig.tight_layout()
        return fig

    def traj_read(r: dict) -> str:
        return "; ".join(f"{m}: linearity {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['linearity'])}, "
                         f"equispacing {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['equispacing'])}, "
                         f"step cosine {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['step_cosine'])}"
                         for m in models) + " (RA1: straight = linearity near 1, equal steps = equispacing near 0)."

    def sv(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            spectra_per_block(ax, r, f"{p(m)}.stages.0.ra3.singular_values_mean",
                              f"{m}: singular values of J_l", get_path(r, f"{p(m)}.settings.num_classes"))
        fig.tight_layout()
        return fig

    def sv_read(r: dict) -> str:
        return "; ".join(f"{m}: max numerical rank {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['max_numerical_rank'])}, "
                         f"fraction rank <= C {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['rank_le_c_fraction'])}"
                         for m in models) + " (RA3: rank at most C for FC nets; dashed line at r = C)."

    def cross(r: dict) -> Any:
        fig, axes = new_figure(len(models), 2, width=4.4, height=3.8)
        panels = []
        for m in models:
            panels.append((f"{m}: diag ratio of A_ij (blocks i, j)", f"{p(m)}.stages.0.ra2.diag_ratio_mean"))
        for m in models:
            pairs = get_path(r, f"{p(m)}.stages.0.ra2.cross_pairs")
            i, j = pairs[0] if pairs else (0, 0)
            panels.append((f"{m}: |A_ij|, i={i}, j={j}", f"{p(m)}.stages.0.ra2.cross_abs_mean.0"))
        heatmaps(axes, r, panels, fig)
        fig.tight_layout()
        return fig

    def cross_read(r: dict) -> str:
        return "; ".join(f"{m}: off-diagonal diag ratio {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['diag_ratio_offdiag'])}, "
                         f"positive diagonals {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['diag_positive_offdiag'])}, "
                         f"self alignment {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['self_alignment'])}"
                         for m in models) + " (RA2: near 1 = singular vectors aligned across depth; random is 1/k)."

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
        txt = "; ".join(f"{m}: L * mean sigma_1 = {fmt(_summ(get_path(r, f'{root}.{m}.alignment'))['depth_product'])}"
                        for m in models)
        if with_depth:
            s = get_path(r, "depth_scaling.scaling")
            txt += (f"; across depths {s['depths']}: products {[fmt(v) for v in s['products']]}, relative spread "
                    f"{fmt(s['relative_spread'])}, log-log slope of mean sigma_1 {fmt(s['slope'])} (RA4: -1 and a "
                    "nearly constant product)")
        return txt + "."

    return [FigureSpec("ra_trajectories", "RA1: trajectories", traj, traj_read),
            FigureSpec("ra_singular_values", "RA3: singular value spectra of the residual Jacobians", sv, sv_read),
            FigureSpec("ra_cross_alignment", "RA2: cross alignment", cross, cross_read),
            FigureSpec("ra_sigma1_depth", "RA4: sigma_1 against depth", sig, sig_read)]


def _density_figure(models: list[str], root: str = "models") -> FigureSpec:
    def build(r: dict) -> Any:
        fig, axes = new_figure(1, width=6.5, height=4.2)
        ax = axes[0]
        import numpy as np

        top = 0.0
        for i, m in enumerate(models):
            s = get_path(r, f"{root}.{m}.spectrum.result")
            grid, dens = np.array(s["grid"], float), np.array([np.nan if v is None else v for v in s["density"]], float)
            std = np.array([np.nan if v is None else v for v in s["density_std"]], float)
            (ln,) = ax.plot(grid, dens, color=f"C{i}", lw=1.2,
                            label=f"{m} (degenerate {fmt(s['degeneracy_fraction'])}, negative {fmt(s['significant_negative_fraction'])})")
            from .report import tag

            tag(ln, x=f"{root}.{m}.spectrum.result.grid", y=f"{root}.{m}.spectrum.result.density")
            if np.isfinite(std).all():
                ax.fill_between(grid, dens - std, dens + std, color=f"C{i}", alpha=0.2, lw=0)
            top = max(top, float(np.nanmax(dens)) if np.isfinite(dens).any() else 0.0)
        if top > 0:  # log axis over 8 decades below the highest peak (SLQ tails fall to 1e-100)
            ax.set_yscale("log", nonpositive="mask")
            ax.set_ylim(top * 1e-8, top * 3)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (band: +- std over probes)")
        ax.set_title("Hessian spectral density (SLQ)", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return "; ".join(
            f"{m}: lambda_max {fmt(_summ(get_path(r, f'{root}.{m}.spectrum'))['lambda_max'])}, lambda_min "
            f"{fmt(_summ(get_path(r, f'{root}.{m}.spectrum'))['lambda_min'])}, near-zero mass "
            f"{fmt(_summ(get_path(r, f'{root}.{m}.spectrum'))['degeneracy_fraction'])}, negative mass (lambda < -eps lambda_max) "
            f"{fmt(_summ(get_path(r, f'{root}.{m}.spectrum'))['significant_negative_fraction'])}" for m in models) + "."

    return FigureSpec("hessian_density", "Hessian spectral density with spread", build, reading)


def _collapse_figure(models: list[str], root: str = "models") -> FigureSpec:
    metrics = ("nc1", "etf_error", "equinorm", "ncc_mismatch")

    def build(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            base = f"{root}.{m}.collapse.result"
            lines(ax, r, [(k, f"{base}.layers", f"{base}.{k}") for k in metrics],
                  title=f"{m}: collapse metrics against depth", xlabel="layer l", ylabel="metric", logy=True)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        out = []
        for m in models:
            s = _summ(get_path(r, f"{root}.{m}.collapse"))
            out.append(f"{m}: NC1 {fmt(s['nc1_first'])} -> {fmt(s['nc1_last'])}, Spearman rho(l, NC1) "
                       f"{fmt(s.get('spearman_nc1'))}, rho(l, NCC) {fmt(s.get('spearman_ncc_mismatch'))}")
        return "; ".join(out) + " (expected on a trained ResNet: every metric decreases with depth, rho < -0.9)."

    return FigureSpec("collapse_depth", "Collapse metrics against depth", build, reading)


def _singularity_figure(models: list[str], root: str = "models") -> FigureSpec:
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
        return "; ".join(
            f"{m}: dead units {fmt(_summ(get_path(r, f'{root}.{m}.singularities'))['dead_fraction_total'])}, "
            f"small-eigenvalue fraction {fmt(_summ(get_path(r, f'{root}.{m}.singularities'))['mean_small_eig_fraction'])}, "
            f"effective rank fraction {fmt(_summ(get_path(r, f'{root}.{m}.singularities'))['mean_effective_rank_fraction'])}"
            for m in models) + " (expected: plain >= residual >= hyper-residual in dead units)."

    return FigureSpec("singularities", "Singularity statistics", build, reading)


def _paths_figure(models: list[str], root: str = "models") -> FigureSpec:
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
        return "; ".join(f"{m}: mean path order {fmt(_summ(get_path(r, f'{root}.{m}.paths'))['mean_order'])} of "
                         f"L = {fmt(_summ(get_path(r, f'{root}.{m}.paths'))['num_blocks'])}, most weighted order "
                         f"{fmt(_summ(get_path(r, f'{root}.{m}.paths'))['mode_order'])}" for m in models) + "."

    return FigureSpec("path_orders", "Path-order distribution", build, reading)


# =============================================================================== demo
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 400, "width": 16, "depth": 3, "epochs": 2, "align_samples": 8, "k": 12, "oversample": 4,
             "power_iters": 1, "depths": [2, 4], "hessian_samples": 128, "eigs": 2, "probes": 2,
             "lanczos_steps": 12, "trace_probes": 6, "path_samples": 16, "max_order": None, "gc_samples": 32},
    "default": {"n_train": None, "width": 64, "depth": 8, "epochs": 30, "align_samples": 64, "k": None,
                "oversample": 10, "power_iters": 2, "depths": [4, 8, 16], "hessian_samples": 512, "eigs": 4,
                "probes": 4, "lanczos_steps": 40, "trace_probes": 30, "path_samples": 128, "max_order": None,
                "gc_samples": 256},
}


def demo_config(size: str, seed: int, device: str) -> dict[str, Any]:
    if size not in DEMO_SIZES:
        raise UsageError(f"--size: expected one of {list(DEMO_SIZES)}, got {size!r}")
    cfg = {"dataset": "digits", "model": "fc", "norm": "batch", "lr": 0.05, "batch_size": 64, "seed": seed,
           "device": device, "size": size, "weight_decay": 5e-2, "schedule": "cosine"}
    cfg.update(DEMO_SIZES[size])
    return cfg


def run_demo(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    from resgeom_fast.analysis.collapse import collapse
    from resgeom_fast.analysis.expansion import geometric_complexity, path_expansion
    from resgeom_fast.analysis.singularities import singularities

    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    models: dict[str, Any] = {}
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for arch in ("residual", "plain"):
        model, curves = _train(runner, cfg, ds, key, arch, device)
        dsd = ds.to(device=device)
        entry: dict[str, Any] = {"train": curves}
        entry["alignment"] = _alignment(runner, cfg, model, ds, device, f"{arch}_alignment")
        entry["spectrum"] = _spectrum(runner, cfg, model, ds, device, f"{arch}_spectrum")
        entry["singularities"] = _analysis(runner, f"{arch}_singularities", lambda: singularities(model, dsd))
        entry["collapse"] = _analysis(runner, f"{arch}_collapse", lambda: collapse(model, dsd))
        xp, _ = _xy(ds, "test", cfg["path_samples"], device)
        entry["paths"] = _analysis(runner, f"{arch}_paths", lambda: path_expansion(
            model, xp, cfg["max_order"], num_probes=1, seed=cfg["seed"]))
        xg, yg = _xy(ds, "test", cfg["gc_samples"], device)
        entry["gc"] = _analysis(runner, f"{arch}_gc", lambda: geometric_complexity(model, (xg, yg)))
        models[arch] = entry
        summaries[arch] = {k: v["summary"] for k, v in entry.items() if isinstance(v, dict) and "summary" in v}
    results = {"study": "demo", "config": cfg, "models": models,
               "depth_scaling": _depth_scaling(runner, cfg, ds, key, device)}
    names = ["residual", "plain"]
    figures = _align_figures(names) + [_density_figure(names), _collapse_figure(names), _singularity_figure(names),
                                       _paths_figure(names), _fig_training(names)]
    intro = (f"FCResNet (width {cfg['width']}, depth {cfg['depth']}) and the same net without skips, trained "
             f"{cfg['epochs']} epochs (SGD, weight decay {cfg['weight_decay']:g}, {cfg['schedule']} schedule) on "
             f"digits ({ds.x_train.shape[0]} training samples), then every analysis of resgeom_fast on both. "
             f"Size preset: {cfg['size']}.")
    return StudyOutput(results, figures, summaries, intro)


# =============================================================================== alignment study
def run_alignment(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    models: dict[str, Any] = {}
    for arch in ("residual", "plain"):
        model, curves = _train(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves, "alignment": _alignment(runner, cfg, model, ds, device, f"{arch}_alignment")}
    results = {"study": "alignment", "config": cfg, "models": models,
               "depth_scaling": _depth_scaling(runner, cfg, ds, key, device)}
    names = ["residual", "plain"]
    summaries = {m: {"alignment": models[m]["alignment"]["summary"]} for m in names}
    return StudyOutput(results, _align_figures(names) + [_fig_training(names)], summaries,
                       "Residual Alignment (RA1-RA4) of a ResNet and of the same net without skips.")


# =============================================================================== hessian / singularities
def run_hessian(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    archs = _archs(cfg)
    models: dict[str, Any] = {}
    for arch in archs:
        model, curves = _train(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves, "spectrum": _spectrum(runner, cfg, model, ds, device, f"{arch}_spectrum")}

    def bars_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        bars(axes[0], r, archs, [("near-zero mass", "models.{g}.spectrum.summary.degeneracy_fraction"),
                                 ("negative mass (lambda < -eps lambda_max)", "models.{g}.spectrum.summary.significant_negative_fraction")],
             title="Hessian spectral mass", ylabel="fraction of the spectrum")
        bars(axes[1], r, archs, [("lambda_max", "models.{g}.spectrum.summary.lambda_max")],
             title="largest Hessian eigenvalue", ylabel="lambda_max", logy=True)
        fig.tight_layout()
        return fig

    def bars_read(r: dict) -> str:
        return ", ".join(f"{a}: near-zero {fmt(get_path(r, f'models.{a}.spectrum.summary.degeneracy_fraction'))}"
                         for a in archs) + " (expected: plain >= residual >= hyper-residual)."

    figures = [_density_figure(archs), FigureSpec("hessian_mass", "Degenerate and negative mass", bars_build, bars_read),
               _fig_training(archs)]
    summaries = {a: {"spectrum": models[a]["spectrum"]["summary"]} for a in archs}
    return StudyOutput({"study": "hessian", "config": cfg, "models": models}, figures, summaries,
                       "Hessian spectra (SLQ density, extreme eigenvalues, trace) of " + ", ".join(archs) + " nets.")


def _archs(cfg: dict[str, Any]) -> list[str]:
    archs = [a.strip() for a in cfg["archs"].split(",") if a.strip()]
    bad = [a for a in archs if a not in ARCH_CHOICES]
    if bad or not archs:
        raise UsageError(f"archs: unknown architecture(s) {bad}; allowed: {', '.join(ARCH_CHOICES)}")
    return archs


def run_singularities(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    from resgeom_fast.analysis.singularities import singularities

    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    archs = _archs(cfg)
    models: dict[str, Any] = {}
    dsd = ds.to(device=device)
    for arch in archs:
        model, curves = _train(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves,
                        "singularities": _analysis(runner, f"{arch}_singularities",
                                                   lambda: singularities(model, dsd, eps=cfg["eps"]))}
    summaries = {a: {"singularities": models[a]["singularities"]["summary"]} for a in archs}
    return StudyOutput({"study": "singularities", "config": cfg, "models": models},
                       [_singularity_figure(archs), _fig_training(archs)], summaries,
                       "Singularities (elimination, overlap, linear dependence) of " + ", ".join(archs) + " nets; "
                       "plain_biasreg is the plain net trained with BiasReg.")


# =============================================================================== collapse
def run_collapse(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    from resgeom_fast.analysis.collapse import collapse
    from resgeom_fast.analysis.mufm import mufm

    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    dsd = ds.to(device=device)
    every = cfg["collapse_every"]

    def during(epoch: int, model, state) -> dict[str, Any]:
        r = collapse(model, dsd)
        return {"nc1": r.nc1, "ncc_mismatch": r.ncc_mismatch, "layers": r.layers}

    model, curves = _train(runner, cfg, ds, key, "residual", device, callbacks=((every, during),))
    final = _analysis(runner, "residual_collapse", lambda: collapse(model, dsd))
    x, y = ds.tensors("train")
    n = cfg["mufm_samples"]
    mu = _analysis(runner, "mufm", lambda: mufm(x[:n].flatten(1).to(device), y[:n].to(device), cfg["depth"], steps=cfg["mufm_steps"],
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

    figures = [_collapse_figure(["residual"]), FigureSpec("collapse_training", "Collapse along training and MUFM",
                                                         train_build, train_read), _fig_training(["residual"])]
    summaries = {"residual": {"collapse": final["summary"]}, "mufm": {"mufm": mu["summary"]}}
    return StudyOutput(results, figures, summaries,
                       "Progressive feedforward collapse of a trained ResNet, layer by layer and along training, "
                       "and the MUFM optimum on the same data.")


# =============================================================================== expansion
def run_expansion(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    from resgeom_fast.analysis.expansion import (
        geometric_complexity,
        output_norm_vs_depth,
        path_expansion,
        remainder_scaling,
    )
    from resgeom_fast.models import FCResNet

    device = resolve_device(cfg["device"])
    ds, key = _data(cfg)
    in_dim = int(math.prod(ds.input_shape))

    def remainder() -> dict[str, Any]:
        # FCResNets without normalisation on the flattened inputs, float64, one scale lam per net
        x = ds.x_test[: cfg["path_samples"]].flatten(1).double()
        make = lambda lam: FCResNet(in_dim, cfg["width"], cfg["depth"], ds.num_classes, scale=lam, norm="none",  # noqa: E731
                                    seed=cfg["seed"]).double().eval()
        return remainder_scaling(make, cfg["lams"], x)

    rem = runner.step("remainder_scaling", remainder)
    norms = runner.step("output_norms", lambda: output_norm_vs_depth(cfg["norm_depths"], width=cfg["norm_width"],
                                                                     in_dim=cfg["norm_width"], seed=cfg["seed"]))
    models: dict[str, Any] = {}
    archs = ["residual", "plain"]
    for arch in archs:
        model, curves = _train(runner, cfg, ds, key, arch, device)
        xp, _ = _xy(ds, "test", cfg["path_samples"], device)
        xg, yg = _xy(ds, "test", cfg["gc_samples"], device)
        models[arch] = {"train": curves,
                        "paths": _analysis(runner, f"{arch}_paths", lambda: path_expansion(model, xp, num_probes=1,
                                                                                           seed=cfg["seed"])),
                        "gc": _analysis(runner, f"{arch}_gc", lambda: geometric_complexity(model, (xg, yg)))}
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
        o = r["output_norms"]
        lines(axes[1], r, [(f"lam = {s}", "output_norms.depths", f"output_norms.mean.{s}") for s in o["scales"]],
              title="||h_L|| / ||h_0|| at init", xlabel="depth L", ylabel="mean ratio", logx=True, logy=True)
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
               _paths_figure(archs), FigureSpec("geometric_complexity", "Geometric complexity", gc_build, gc_read),
               _fig_training(archs)]
    summaries = {a: {"paths": models[a]["paths"]["summary"], "gc": models[a]["gc"]["summary"]} for a in archs}
    return StudyOutput(results, figures, summaries, "Residual expansion: Taylor remainders, output norms at "
                       "initialisation, path-order distributions and geometric complexity.")


# =============================================================================== leaky
def run_leaky(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    from resgeom_fast.analysis.hamiltonian import hamiltonian
    from resgeom_fast.data import teacher

    device = resolve_device(cfg["device"])
    dims = tuple(cfg["teacher_dims"])
    dtype = getattr(torch, cfg["dtype"])
    ds = teacher(dims, n=cfg["n_train"], seed=cfg["seed"], dtype=dtype)
    key = {"teacher": list(dims), "n": cfg["n_train"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
    runs: dict[str, Any] = {}
    x, y = ds.x_train.to(device), ds.y_train.to(device)
    for lt in cfg["leaks"]:
        name = f"Lt_{lt:g}".replace(".", "p")
        spec = {"kind": "leaky", "in_dim": dims[0], "width": cfg["width"], "depth": cfg["depth"], "out_dim": dims[-1],
                "leak": float(lt), "steps": cfg["steps"], "lam": cfg["lam"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
        tk = {"epochs": cfg["epochs"], "lr": cfg["lr"], "batch_size": cfg["batch_size"] or cfg["n_train"],
              "seed": cfg["seed"],
              "optimizer": "adam", "schedule": "cosine", "momentum": 0.0}
        model, out = train_step(runner, name, spec, ds, key, tk, device)
        res = _analysis(runner, f"{name}_hamiltonian", lambda: hamiltonian(model, x, y, cfg["gamma0"]))
        runs[name] = {"leak": float(lt), "train": _curves(out), "hamiltonian": res}
    names = list(runs)
    results = {"study": "leaky", "config": cfg, "models": runs,
               "k_star_vs_leak": {"leaks": [runs[n]["leak"] for n in names],
                                  "k_star_middle": [runs[n]["hamiltonian"]["summary"]["k_star_middle"] for n in names],
                                  "rank_middle": [runs[n]["hamiltonian"]["summary"]["rank_middle"] for n in names],
                                  "stable_rank_middle": [runs[n]["hamiltonian"]["summary"]["stable_rank_middle"]
                                                         for n in names]},
               "k_true": min(dims[1:-1]) if len(dims) > 2 else dims[-1]}

    def k_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        lines(axes[0], r, [("-(2/Lt) H (middle layers)", "k_star_vs_leak.leaks", "k_star_vs_leak.k_star_middle"),
                           ("rank of A_l (middle)", "k_star_vs_leak.leaks", "k_star_vs_leak.rank_middle"),
                           ("stable rank (middle)", "k_star_vs_leak.leaks", "k_star_vs_leak.stable_rank_middle")],
              title="bottleneck rank against effective depth Lt", xlabel="Lt", ylabel="rank estimate", logx=True)
        axes[0].axhline(r["k_true"], ls="--", color="gray", lw=0.8)
        lines(axes[1], r, [(f"Lt = {r['models'][n]['leak']:g}", "index", f"models.{n}.hamiltonian.result.hamiltonian")
                           for n in r["models"]],
              title="Hamiltonian H across layers", xlabel="layer l", ylabel="H")
        fig.tight_layout()
        return fig

    def k_read(r: dict) -> str:
        k = r["k_star_vs_leak"]
        return (f"-(2/Lt) H over the middle layers for Lt = {k['leaks']}: {[fmt(v) for v in k['k_star_middle']]} "
                f"(teacher bottleneck k* = {r['k_true']}; expected to approach it as Lt grows); relative spread of H "
                "across layers " + ", ".join(fmt(r['models'][n]['hamiltonian']['summary']['hamiltonian_rel_spread'])
                                               for n in r["models"]) + ".")

    def sv_build(r: dict) -> Any:
        last = list(r["models"])[-1]
        fig, axes = new_figure(1)
        sv = get_path(r, f"models.{last}.hamiltonian.result.singular_values")
        import matplotlib.pyplot as plt

        cmap = plt.get_cmap("viridis")
        from .report import tag

        for l in range(len(sv)):
            (ln,) = axes[0].plot(range(1, len(sv[l]) + 1), [math.nan if v is None else v for v in sv[l]], "-", lw=1,
                                 color=cmap(l / max(1, len(sv) - 1)))
            tag(ln, x="index1", y=f"models.{last}.hamiltonian.result.singular_values.{l}")
        if any(v is not None and v > 0 for row in sv for v in row):
            axes[0].set_yscale("log", nonpositive="mask")
        axes[0].set_xlabel("index i")
        axes[0].set_ylabel("s_i(A_l)")
        axes[0].set_title(f"singular values of A_l (Lt = {r['models'][last]['leak']:g}; colour = layer)", fontsize=9)
        fig.tight_layout()
        return fig

    def sv_read(r: dict) -> str:
        last = list(r["models"])[-1]
        s = r["models"][last]["hamiltonian"]["summary"]
        return (f"at Lt = {r['models'][last]['leak']:g} the middle layers have rank {fmt(s['rank_middle'])} and stable "
                f"rank {fmt(s['stable_rank_middle'])} (a bottleneck shows as about k* large singular values).")

    figures = [FigureSpec("leaky_kstar", "-(2/Lt) H against Lt and across layers", k_build, k_read),
               FigureSpec("leaky_spectra", "Layer spectra", sv_build, sv_read), _fig_training(names)]
    summaries = {n: {"hamiltonian": runs[n]["hamiltonian"]["summary"]} for n in names}
    return StudyOutput(results, figures, summaries,
                       f"Leaky ResNets (width {cfg['width']}, L = {cfg['depth']}) on teacher data {dims} for several "
                       "effective depths Lt; Hamiltonian, cost of identity and bottleneck rank.")


# =============================================================================== registry
_ARCH_OPT = lambda default: _opt("archs", "str", default,  # noqa: E731
                                 f"comma list of architectures among {', '.join(ARCH_CHOICES)}")

STUDIES: dict[str, Study] = {
    "alignment": Study("alignment", "Residual Alignment: with vs without skips",
                       "nets with skips show RA1-RA4; the same nets without skips show none",
                       _net_options(epochs=30, weight_decay=5e-2, schedule="cosine") + ALIGN_OPTIONS,
                       run_alignment),
    "hessian": Study("hessian", "Hessian spectra: plain vs residual vs hyper-residual",
                     "near-zero Hessian mass plain >= residual >= hyper-residual",
                     _net_options(depth=8) + HESSIAN_OPTIONS + [_ARCH_OPT("plain,residual,hyper")], run_hessian),
    "singularities": Study("singularities", "Singularities: plain vs residual vs hyper-residual (and BiasReg)",
                           "dead units plain >= residual >= hyper-residual; BiasReg lowers the plain net's dead units",
                           _net_options(depth=8) + [
                               _ARCH_OPT("plain,residual,hyper,plain_biasreg"),
                               _opt("eps", "float", 1e-3, "tolerance of the singularity tests", minimum=0),
                               _opt("biasreg_beta", "float", 1e-3, "BiasReg strength beta_reg", minimum=0),
                               _opt("biasreg_b0", "float", 0.1, "BiasReg target bias b0", minimum=0)],
                           run_singularities),
    "collapse": Study("collapse", "Progressive feedforward collapse against depth",
                      "every metric decreases with depth (Spearman rho < -0.9) and along training",
                      _net_options(epochs=20) + [
                          _opt("collapse_every", "int", 5, "measure collapse every this many epochs", minimum=1),
                          _opt("mufm_samples", "int", 500, "training samples of the MUFM", minimum=2),
                          _opt("mufm_steps", "int", 300, "L-BFGS iterations of the MUFM", minimum=1)],
                      run_collapse),
    "expansion": Study("expansion", "Residual expansion: remainder ~ lam^3, output norms against depth",
                       "remainder after the second-order terms ~ lam^3; lam = 1 explodes with depth, 1/L stays bounded",
                       _net_options() + [
                           _opt("lams", "floats", [0.4, 0.2, 0.1, 0.05, 0.025], "branch scales of the remainder check",
                                minimum=0),
                           _opt("norm_depths", "ints", [2, 4, 8, 16, 32, 64], "depths of the output-norm check",
                                minimum=1),
                           _opt("norm_width", "int", 64, "width of the nets of the output-norm check", minimum=1),
                           _opt("path_samples", "int", 128, "test inputs of the path expansion", minimum=1),
                           _opt("gc_samples", "int", 256, "test inputs of the geometric complexity", minimum=1)],
                       run_expansion),
    "leaky": Study("leaky", "Leaky ResNets: -(2/Lt) H against Lt on the teacher",
                   "-(2/Lt) H approaches k* as Lt grows; middle layers have about k* large singular values",
                   [_opt("teacher_dims", "ints", [30, 3, 30], "teacher widths (k* = the bottleneck)", minimum=1),
                    _opt("n_train", "int", 200, "training points of the teacher data (SCIENCE.md: 1000)", minimum=2),
                    _opt("width", "int", 40, "student width w (SCIENCE.md: 100)", minimum=1),
                    _opt("depth", "int", 10, "layers L (SCIENCE.md: 20)", minimum=1),
                    _opt("leaks", "floats", [1.0, 2.0, 4.0], "effective depths Lt", minimum=0),
                    _opt("steps", "str", "equidistant", "step scheme", ("equidistant", "irregular", "adaptive")),
                    _opt("lam", "float", 1e-2, "weight decay lam of the loss", minimum=0),
                    _opt("gamma0", "float", 1e-3, "relative ridge gamma_0", minimum=0),
                    _opt("epochs", "int", 2000, "training epochs (Adam, cosine schedule)", minimum=0),
                    _opt("lr", "float", 5e-3, "Adam learning rate", minimum=0),
                    _opt("batch_size", "optint", None, "batch size (null: full batch)", minimum=1),
                    _opt("dtype", "str", "float64", "floating dtype of data and nets", ("float32", "float64")),
                    _opt("seed", "int", 0, "seed", minimum=0),
                    _opt("device", "str", "cpu", "cpu | cuda | cuda:N")],
                   run_leaky),
}
STUDY_NAMES: tuple[str, ...] = tuple(STUDIES)
