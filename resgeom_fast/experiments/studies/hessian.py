"""``resgeom run hessian``: plain vs residual vs hyper-residual Hessian spectra (SLQ density,
extreme eigenvalues, trace; degenerate and negative mass), and with ``seeds`` the near-zero mass
of every architecture over several seeds under both normalisation settings.

:func:`seed_grid` (also used by study ``singularities``) trains one net per (norm, group, seed)
on the study's data (fixed by ``seed``; only the weights' and the training's seed vary) and
collects one analysis' summary numbers per seed with their mean and standard error."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from resgeom_fast.models import BiasReg

from ..common import resolve_device, train_step
from ..config import UsageError
from ..figures import bars, new_figure
from ..report import FigureSpec, fmt
from ..runner import Runner
from ._figures import density_figure, seed_bars_figure, training_figure
from ._readings import degeneracy_order_reading, net_conditions, sample_stats
from ._registry import Study, StudyOutput, register
from ._shared import (
    ARCH_CHOICES,
    HESSIAN_OPTIONS,
    SEED_MAX,
    arch_option,
    net_options,
    net_spec,
    opt,
    parse_archs,
    spectrum_step,
    study_data,
    train_kwargs,
    train_net,
)
from ._validation import validate_hessian_options, validate_net_study

__all__ = ["HESSIAN_MASS_METRICS", "SEED_OPTIONS", "STUDY", "parse_seed_list", "run_hessian", "seed_grid",
           "grid_conditions", "validate_hessian"]

SEED_OPTIONS = [
    opt("seeds", "str", "", "comma list of seeds of the comparison over seeds (e.g. '0,1,2'; empty: none); each "
        "seed sets the weights and the training order, the data stay those of `seed`"),
    opt("seed_archs", "str", "plain,residual,hyper,orthogonal",
        f"comma list of architectures of the comparison over seeds among {', '.join(ARCH_CHOICES)}"),
    opt("seed_norms", "str", "batch,none", "comma list of normalisations of the comparison over seeds (batch, none)"),
    opt("seed_none_lr", "float", 0.002, "learning rate of the comparison's norm=none nets (the norm=batch nets use "
        "lr; at lr 0.05 every depth-8 fc net without normalisation diverged on digits)", minimum=0),
]
HESSIAN_MASS_METRICS = [("near-zero mass |lambda| < eps lambda_max", "degenerate_fraction_rel"),
                        ("near-zero mass |lambda| < abs_eps", "degenerate_fraction_abs")]
# the expected orders "a >= b" of near-zero mass and dead units (docs/science.md section 2)
SEED_PAIRS = [("plain", "residual"), ("residual", "hyper"), ("plain", "orthogonal")]


def parse_seed_list(cfg: dict[str, Any]) -> tuple[list[int], list[str], list[str]]:
    """(seeds, archs, norms) of the comparison over seeds; a UsageError naming the option otherwise."""
    seeds = []
    for t in (v.strip() for v in cfg.get("seeds", "").split(",")):
        if not t:
            continue
        if not t.isdigit() or int(t) > SEED_MAX:
            raise UsageError(f"seeds: expected a comma list of ints in [0, {SEED_MAX}], got {cfg['seeds']!r}")
        seeds.append(int(t))
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds: expected distinct seeds, got {cfg['seeds']!r}")
    archs = parse_archs({"archs": cfg.get("seed_archs", "plain")})
    norms = [n.strip() for n in cfg.get("seed_norms", "batch").split(",") if n.strip()]
    if not norms or any(n not in ("batch", "none") for n in norms) or len(set(norms)) != len(norms):
        raise UsageError(f"seed_norms: expected a comma list of distinct values among batch, none, got "
                         f"{cfg.get('seed_norms')!r}")
    return seeds, archs, norms


def grid_conditions(cfg: dict[str, Any]) -> str:
    """The conditions of the comparison over seeds: :func:`net_conditions` without the norm, the
    learning rate and the seed (the readings name them per norm), and the data's seed."""
    text = net_conditions(cfg).rsplit(", seed", 1)[0]
    text = text.replace(f", norm {cfg.get('norm', 'batch')}", "").replace(f"SGD lr {fmt(cfg.get('lr'))}", "SGD")
    return f"{text}, data of seed {cfg['seed']}"


def seed_grid(runner: Runner, cfg: dict[str, Any], ds, key: dict[str, Any], device: torch.device,
              groups: list[tuple[str, str, bool]], seeds: list[int], norms: list[str],
              analyse: Callable[[str, dict[str, Any], Any], dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    """One net per (norm, group, seed): group (name, arch, biasreg), trained as step
    ``train_<name>_<norm>_s<seed>`` with ``cfg``'s training options (lr ``seed_none_lr`` for norm=none), ``norm`` and ``seed`` (the data
    ``ds`` stay fixed), then ``analyse(step_name, cfg_of_the_net, model)`` -> an analysis step's result
    whose ``summary`` holds ``metrics`` (not called for a net with non-finite weights: its metrics are
    None and its seed is listed under ``diverged``). Returns ``{"seeds", "norms", "groups", <norm>: {<name>:
    {"per_seed": {metric: [...], "test_acc": [...]}, "mean": {...}, "se": {...}, "reasons": {metric: the first
    undefined seed's reason or None}, "diverged": [seeds whose training diverged]}}}`` (mean and standard error over the seeds' finite values; None when
    undefined, with one seed the standard error is None)."""
    out: dict[str, Any] = {"seeds": list(seeds), "norms": list(norms), "groups": [g[0] for g in groups], "lr": {}}
    for norm in norms:
        lr = cfg.get("seed_none_lr", cfg["lr"]) if norm == "none" else cfg["lr"]
        out["lr"][norm] = lr
        out[norm] = {}
        for name, arch, biasreg in groups:
            per: dict[str, list] = {m: [] for m in metrics + ["test_acc"]}
            reasons: dict[str, Any] = {m: None for m in metrics}
            diverged: list[int] = []
            for seed in seeds:
                c = {**cfg, "seed": seed, "norm": norm, "lr": lr}
                regs = (BiasReg(beta=cfg.get("biasreg_beta", 1e-3), b0=cfg.get("biasreg_b0", 0.1)),) if biasreg \
                    else ()
                net = f"{name}_{norm}_s{seed}"
                model, tr = train_step(runner, net, net_spec(c, ds, arch), ds, key, train_kwargs(c), device,
                                       regularizers=regs)
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    # a diverged net has no metric: None with the reason, counted, never analysed
                    diverged.append(seed)
                    summ = {m: None for m in metrics}
                    summ.update({f"{m}_reason": "training diverged (non-finite weights)" for m in metrics})
                else:
                    summ = analyse(net, c, model)["summary"]
                for m in metrics:
                    per[m].append(summ.get(m))
                    if summ.get(m) is None and reasons[m] is None:
                        reasons[m] = f"seed {seed}: {summ.get(f'{m}_reason', 'undefined')}"
                per["test_acc"].append(tr["final"].get("test_acc"))
            mean, se = {}, {}
            for m, vals in per.items():
                st = sample_stats(vals)
                mean[m] = None if st is None else st[0]
                se[m] = None if st is None or math.isnan(st[1]) else st[1]
            out[norm][name] = {"per_seed": per, "mean": mean, "se": se, "reasons": reasons, "diverged": diverged}
    return out


def run_hessian(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Train each net of ``archs`` and compute its Hessian spectrum (step ``<arch>_spectrum``)."""
    device = resolve_device(cfg["device"])
    ds, key = study_data(cfg)
    archs = parse_archs(cfg)
    models: dict[str, Any] = {}
    for arch in archs:
        model, curves = train_net(runner, cfg, ds, key, arch, device)
        models[arch] = {"train": curves, "spectrum": spectrum_step(runner, cfg, model, ds, device, f"{arch}_spectrum")}
    results: dict[str, Any] = {"study": "hessian", "config": cfg, "models": models}
    seeds, seed_archs, norms = parse_seed_list(cfg)
    if seeds:
        results["over_seeds"] = seed_grid(
            runner, cfg, ds, key, device, [(a, a, a == "plain_biasreg") for a in seed_archs], seeds, norms,
            lambda net, c, model: spectrum_step(runner, c, model, ds, device, f"{net}_spectrum"),
            [k for _, k in HESSIAN_MASS_METRICS])

    def bars_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        bars(axes[0], r, archs, [
            ("near-zero mass, |lambda| < eps lambda_max", "models.{g}.spectrum.summary.degenerate_fraction_rel"),
            ("near-zero mass, |lambda| < abs_eps", "models.{g}.spectrum.summary.degenerate_fraction_abs"),
            ("negative mass (lambda < -eps lambda_max)", "models.{g}.spectrum.summary.significant_negative_fraction")],
             title="Hessian spectral mass (n/a: unresolved)", ylabel="fraction of the spectrum")
        bars(axes[1], r, archs, [("lambda_max", "models.{g}.spectrum.summary.lambda_max")],
             title="largest Hessian eigenvalue", ylabel="lambda_max", logy=True)
        fig.tight_layout()
        return fig

    def bars_read(r: dict) -> str:
        return degeneracy_order_reading(r, archs)

    figures = [density_figure(archs), FigureSpec("hessian_mass", "Degenerate and negative mass", bars_build, bars_read),
               training_figure(archs)]
    if seeds:
        figures.append(seed_bars_figure("hessian_mass_seeds", "Near-zero Hessian mass over seeds", "over_seeds",
                                        HESSIAN_MASS_METRICS, SEED_PAIRS,
                                        grid_conditions(cfg)))
    summaries = {a: {"spectrum": models[a]["spectrum"]["summary"]} for a in archs}
    return StudyOutput(results, figures, summaries,
                       "Hessian spectra (SLQ density, extreme eigenvalues, trace) of " + ", ".join(archs) + " nets.")


def validate_hessian(cfg: dict[str, Any]) -> None:
    """hessian: the data, archs, the nets' size (with the Lanczos basis), eigs and lanczos_steps <= P,
    hessian_samples <= training samples."""
    archs = parse_archs(cfg)
    info = validate_net_study(cfg, extra_bytes_per_param=8 * cfg["lanczos_steps"])
    validate_hessian_options(cfg, info, archs)
    parse_seed_list(cfg)


STUDY = register(Study("hessian", "Hessian spectra: plain vs residual vs hyper-residual",
                       "near-zero Hessian mass plain >= residual >= hyper-residual",
                       net_options(depth=8) + HESSIAN_OPTIONS + [arch_option("plain,residual,hyper")] + SEED_OPTIONS,
                       run_hessian,
                       validate_hessian))
