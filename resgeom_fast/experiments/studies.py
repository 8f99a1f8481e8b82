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
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from resgeom_fast.analysis.spectrum import K_MAX as SPECTRUM_K_MAX
from resgeom_fast.train import atomic_save, file_sha256

from .common import DATASETS_HELP, load_data, resolve_device, train_step, verified_checkpoint
from .config import Option, Options, UsageError
from .figures import bars, heatmaps, lines, new_figure, pca_trajectories, spectra_per_block
from .report import FigureSpec, fmt, fmt_key, get_path, is_undefined
from .runner import Runner

__all__ = ["DEMO_SIZES", "STUDIES", "STUDY_NAMES", "DataInfo", "Study", "StudyOutput", "alignment_stage_reading",
           "data_info", "demo_config"]


@dataclass
class StudyOutput:
    results: dict[str, Any]
    figures: list[FigureSpec]
    summaries: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    intro: str = ""


@dataclass
class Study:
    """One runnable study.

    Attributes:
        name, title, expected: its name, a title and SCIENCE.md's "Expected" line.
        options: its options; stored as an :class:`~resgeom_fast.experiments.config.Options`
            that carries ``validate``, so :func:`~resgeom_fast.experiments.config.resolve_config`
            runs the cross-option check before any work.
        run: ``run(runner, config) -> StudyOutput``.
        validate: ``validate(config)`` raises :class:`UsageError` for a configuration that cannot
            work (None: the options' own checks only).
    """

    name: str
    title: str
    expected: str
    options: list[Option]
    run: Callable[[Runner, dict[str, Any]], StudyOutput]
    validate: Optional[Callable[[dict[str, Any]], None]] = None

    def __post_init__(self) -> None:
        self.options = Options(self.options, validate=self.validate)


# =============================================================================== options
SEED_MAX = 2**32 - 1  # scikit-learn's random_state (the digits split) takes seeds in [0, 2^32 - 1]
DETERMINISTIC_OPTION = Option("deterministic", "bool", False,
                              "fix every method choice of the analyses (no 'auto' choice by timing): the same "
                              "command gives the same numbers; false: float32 round-off may differ between runs")


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
        Option("seed", "int", 0, "seed of data split, weights, training and probes", minimum=0, maximum=SEED_MAX),
        Option("device", "str", "cpu", "cpu | cuda | cuda:N"),
        DETERMINISTIC_OPTION,
    ]


def _opt(name: str, type_: str, default: Any, help_: str, choices: Optional[tuple] = None,
         minimum: Optional[float] = None, maximum: Optional[float] = None) -> Option:
    return Option(name, type_, default, help_, choices, minimum, maximum)


ALIGN_OPTIONS = [
    _opt("align_samples", "int", 64, "test inputs of the alignment analysis", minimum=1),
    _opt("k", "optint", None, "singular triplets per block (null: C + 5)", minimum=1),
    _opt("oversample", "int", 10, "randomized SVD oversampling", minimum=0),
    _opt("power_iters", "optint", None, "randomized SVD power iterations (null: adaptive, iterate until the "
         "a-posteriori error bound meets the tolerance; the achieved accuracy is reported either way)", minimum=0),
    _opt("depths", "ints", [4, 8, 16], "depths of the residual nets of the RA4 comparison", minimum=1),
]
HESSIAN_OPTIONS = [
    _opt("hessian_samples", "int", 512, "training samples of the loss whose Hessian is analysed", minimum=1),
    _opt("eigs", "int", 4, "extreme eigenvalues (both ends), at most the parameters P and hessian_spectrum's K_MAX",
         minimum=2, maximum=SPECTRUM_K_MAX),
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
    if depth is not None and depth == cfg["depth"] and name is None:
        # the study's own `arch` net: the same spec, data and training, hence the same checkpoint
        # hash; it is trained once, under the name `arch`, and loaded from there the second time
        runner.message(f"{arch}_L{depth}: the same configuration as {arch}; using the step train_{arch} and its "
                       "checkpoint")
        depth = None
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
        model, x, cfg.get("k"), y, oversample=cfg["oversample"], power_iters=cfg["power_iters"], seed=cfg["seed"],
        deterministic=bool(cfg.get("deterministic", False))))


def _spectrum(runner: Runner, cfg: dict, model, ds, device, name: str) -> dict[str, Any]:
    from resgeom_fast.analysis.spectrum import hessian_spectrum

    x, y = _xy(ds, "train", cfg["hessian_samples"], device)
    dim = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = min(cfg["lanczos_steps"], dim)
    return _analysis(runner, name, lambda: hessian_spectrum(
        model, F.cross_entropy, (x, y), k=min(cfg["eigs"], dim), probes=cfg["probes"], steps=steps,
        trace_probes=cfg["trace_probes"], seed=cfg["seed"], progress=runner.progress,
        deterministic=bool(cfg.get("deterministic", False))))


def _depth_scaling(runner: Runner, cfg: dict, ds, key, device) -> dict[str, Any]:
    """RA4: residual nets of several depths, alignment of each, depth_scaling over them."""
    from resgeom_fast.analysis.alignment import depth_scaling, residual_alignment

    def run() -> dict[str, Any]:
        results, per = [], []
        x, y = _xy(ds, "test", cfg["align_samples"], device)
        for L in cfg["depths"]:
            model, _ = _train(runner, cfg, ds, key, "residual", device, depth=L)
            r = residual_alignment(model, x, cfg.get("k"), y, oversample=cfg["oversample"],
                                   power_iters=cfg["power_iters"], seed=cfg["seed"],
                                   deterministic=bool(cfg.get("deterministic", False)))
            results.append(r)
            per.append({"depth": L, "sigma1_mean": r.stages[0].sigma1_mean, "summary": r.summary()})
        return {"scaling": depth_scaling(results), "per_depth": per}

    return runner.step("depth_scaling", run)


def _summ(block: dict[str, Any]) -> dict[str, float]:
    return block.get("summary", {})


class _Formatted(dict):
    """``str.format_map`` source: every key of a summary through :func:`fmt_key` (``n/a (reason)``
    for None / NaN and for keys the summary lacks)."""

    def __init__(self, summary: dict[str, Any]) -> None:
        super().__init__()
        self.summary = summary

    def __missing__(self, key: str) -> str:
        return fmt_key(self.summary, key)


def _per_model(r: dict, models: list[str], root: str, what: str, template: str) -> str:
    """``"m1: ...; m2: ..."``: ``template`` formatted (``str.format_map``, values through
    :func:`fmt_key`) with each model's ``summary`` of the result at ``root.m.what``."""
    parts = []
    for m in models:
        s = _summ(get_path(r, f"{root}.{m}.{what}"))
        parts.append(f"{m}: " + template.format_map(_Formatted(s)))
    return "; ".join(parts)


# =============================================================================== readings
# A reading states the condition under which a number holds and, where the study has one, compares
# it with the control (the plain net: the same architecture without skips). A difference is read
# as a finding only when it exceeds CONTRAST_Z standard errors (Welch: the two nets' per-input
# values are independent samples of the same test inputs' size); otherwise the reading says that
# the control shows the same, so the number is no evidence of the claim. Undefined values are
# printed "n/a (reason)".
CONTRAST_Z = 2.0
CONTROL = "plain"


def _sample_stats(values: Any) -> Optional[tuple[float, float, int]]:
    """(mean, standard error of the mean, n) of the finite entries of ``values``; None when there are none."""
    if not isinstance(values, list):
        return None
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    n = len(xs)
    mean = sum(xs) / n
    var = sum((v - mean) ** 2 for v in xs) / (n - 1) if n > 1 else math.nan
    return mean, math.sqrt(var / n) if n > 1 else math.nan, n


def _contrast_z(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """Welch's z of mean(a) - mean(b) (inf when both have zero spread and differ, NaN when unknown)."""
    diff = a[0] - b[0]
    se = math.sqrt(a[1] ** 2 + b[1] ** 2) if not (math.isnan(a[1]) or math.isnan(b[1])) else math.nan
    if math.isnan(se):
        return math.nan
    if se == 0:
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return diff / se


def _versus_control(label: str, stats: dict[str, Any], models: list[str], sign: int, claim: str) -> str:
    """``"label: residual 0.81 +- 0.01, plain 0.42 +- 0.03: residual higher than the plain control
    by 12 standard errors (the direction CLAIM predicts)"``. ``stats[m]``: :func:`_sample_stats` or a reason
    string (undefined); ``sign``: +1 when the claim predicts a higher value than the control."""
    def val(m: str) -> str:
        st = stats[m]
        return f"n/a ({st})" if isinstance(st, str) else f"{fmt(st[0])} +- {fmt(st[1], 2)}"

    text = f"{label}: " + ", ".join(f"{m} {val(m)}" for m in models)
    control = CONTROL if CONTROL in models else None
    verdicts = []
    for m in models:
        if m == control or isinstance(stats[m], str):
            continue
        if control is None:
            verdicts.append(f"{m} not compared (no control net without skips in this study), so not read as {claim}")
            continue
        if isinstance(stats[control], str):
            verdicts.append(f"{m} not compared (the control is n/a)")
            continue
        z = _contrast_z(stats[m], stats[control])
        if math.isnan(z) or abs(z) < CONTRAST_Z:
            verdicts.append(f"{m} within {CONTRAST_Z:g} standard errors of the plain control, so no evidence of "
                            f"{claim} (the net without skips shows the same)")
        else:
            side = "higher" if z > 0 else "lower"
            how = f"the direction {claim} predicts" if z * sign > 0 else f"against {claim}"
            by = "beyond any spread" if math.isinf(z) else f"by {abs(z):.1f} standard errors"
            verdicts.append(f"{m} {side} than the plain control {by} ({how})")
    return text + (": " + "; ".join(verdicts) if verdicts else "")


def _fraction_text(s: dict[str, Any], key: str, digits: int = 3) -> str:
    """A mass fraction of a spectrum summary with its interval: ``"0.81 [0.79, 0.83]"``; when
    unresolved ``"n/a (unresolved at these Lanczos steps: in [0, 0.96])"``; absent keys n/a."""
    lo, hi = s.get(f"{key}_lower"), s.get(f"{key}_upper")
    box = f"[{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else None
    if key not in s:
        return "n/a (not in this result)"
    if is_undefined(s[key]):
        return f"n/a (unresolved at these Lanczos steps: in {box})" if box else fmt_key(s, key)
    return f"{fmt(s[key], digits)} {box}" if box else fmt(s[key], digits)


def _compare_fraction(sa: dict[str, Any], sb: dict[str, Any], key: str) -> Optional[int]:
    """+1 when a's fraction is above b's beyond both intervals, -1 below, 0 when the intervals
    overlap, None when an interval is missing."""
    try:
        alo, ahi, blo, bhi = (float(x[f"{key}_{e}"]) for x, e in ((sa, "lower"), (sa, "upper"), (sb, "lower"),
                                                                   (sb, "upper")))
    except (KeyError, TypeError, ValueError):
        return None
    if any(math.isnan(v) for v in (alo, ahi, blo, bhi)):
        return None
    return 1 if alo > bhi else (-1 if ahi < blo else 0)


_THRESHOLDS = (("degenerate_fraction_rel", "relative threshold |lambda| < eps * lambda_max"),
               ("degenerate_fraction_abs", "absolute threshold |lambda| < abs_eps"))


def _spectrum_reading(r: dict, models: list[str], root: str) -> str:
    """Per model the extreme eigenvalues and the near-zero mass under both thresholds (with their
    intervals); then the plain net against each other net under each threshold, and whether the
    ordering depends on the threshold (the relative one scales with each net's own lambda_max)."""
    summ = {m: _summ(get_path(r, f"{root}.{m}.spectrum")) for m in models}
    parts = []
    for m in models:
        s = summ[m]
        parts.append(f"{m}: lambda_max {fmt_key(s, 'lambda_max')}, lambda_min {fmt_key(s, 'lambda_min')}, near-zero "
                     f"mass {_fraction_text(s, 'degenerate_fraction_rel')} below the relative threshold "
                     f"{fmt_key(s, 'degenerate_threshold_rel')} and {_fraction_text(s, 'degenerate_fraction_abs')} "
                     f"below the absolute threshold {fmt_key(s, 'degenerate_threshold_abs')}, negative mass "
                     f"(lambda < -eps lambda_max) {_fraction_text(s, 'significant_negative_fraction')}")
    text = "; ".join(parts)
    if CONTROL in models and len(models) > 1:
        for m in models:
            if m == CONTROL:
                continue
            words = {1: f"plain more degenerate than {m}", -1: f"plain less degenerate than {m}",
                     0: "not separated (intervals overlap)", None: "not compared (no interval)"}
            verdicts = [_compare_fraction(summ[CONTROL], summ[m], key) for key, _ in _THRESHOLDS]
            said = f"Plain against {m}: " + "; ".join(f"under the {label} {words[v]}"
                                                      for (key, label), v in zip(_THRESHOLDS, verdicts))
            if verdicts[0] in (1, -1) and verdicts[1] in (1, -1) and verdicts[0] != verdicts[1]:
                said += (" -- the ordering reverses with the threshold, so 'more degenerate' is no finding on its own "
                         "(the relative threshold scales with each net's lambda_max)")
            elif verdicts[0] == verdicts[1] and verdicts[0] in (1, -1):
                said += " -- the same ordering under both thresholds"
            else:
                said += " -- no ordering holds under both thresholds"
            text += f". {said}"
    return text + " (intervals: the quadrature bracket widened by 3 probe standard errors)."


EXPECTED_DEGENERACY_ORDER = ("plain", "residual", "hyper")  # SCIENCE.md: plain >= residual >= hyper-residual


def _degeneracy_order_reading(r: dict, archs: list[str], root: str = "models") -> str:
    """The near-zero mass of every net under both thresholds, and per neighbouring pair of
    EXPECTED_DEGENERACY_ORDER present: whether the expected ordering holds (intervals separated
    in that direction), is reversed, or is not resolved (intervals overlap)."""
    summ = {a: _summ(get_path(r, f"{root}.{a}.spectrum")) for a in archs}
    order = [a for a in EXPECTED_DEGENERACY_ORDER if a in archs]
    pairs = list(zip(order, order[1:]))
    parts = []
    for key, label in _THRESHOLDS:
        vals = ", ".join(f"{a} {_fraction_text(summ[a], key)}" for a in archs)
        verdicts = []
        for hi, lo in pairs:
            v = _compare_fraction(summ[hi], summ[lo], key)
            verdicts.append(f"{hi} >= {lo} " + {1: "holds", -1: "is reversed", 0: "not resolved (intervals overlap)",
                                                None: "not compared (no interval)"}[v])
        parts.append(f"{label}: {vals}" + (f" ({'; '.join(verdicts)})" if verdicts else ""))
    return ("; ".join(parts) + ". Expected (SCIENCE.md): plain >= residual >= hyper-residual; an ordering is read "
            "only where the intervals separate, and only as far as it holds under both thresholds.")


def _rank_text(s: dict[str, Any], k: Any) -> str:
    """The max numerical rank of an alignment summary; ``">= r (capped at k = ...)"`` when the rank
    reached the k computed singular values (the true rank may be larger)."""
    if s.get("max_numerical_rank_capped"):
        bound = s.get("max_numerical_rank_lower_bound")
        return (f">= {fmt(bound if bound is not None else k)} (capped: the rank reached the k = {k} computed singular "
                "values; raise k)")
    return fmt_key(s, "max_numerical_rank")


def _list_text(values: Any) -> str:
    return "n/a" if values is None else "[" + ", ".join(fmt(v) for v in values) + "]"


def _depth_scaling_text(s: dict[str, Any]) -> str:
    """RA4 across depths, with and without each net's first block (the first block's sigma_1 is
    often several times the others' and dominates L * mean sigma_1)."""
    why = s.get("excl_first_reason")
    txt = (f"across depths {s['depths']}: products L * mean sigma_1 {_list_text(s.get('products'))}, relative spread "
           f"{fmt_key(s, 'relative_spread')}, log-log slope of mean sigma_1 {fmt_key(s, 'slope')}")
    if "products_excl_first" in s:
        txt += (f"; without the first block: products {_list_text(s.get('products_excl_first'))}"
                + (f" ({why})" if why and s.get("products_excl_first") is None else "")
                + f", relative spread {fmt_key(s, 'relative_spread_excl_first', reason=why)}, slope "
                  f"{fmt_key(s, 'slope_excl_first', reason=why)}")
        if s.get("first_block_ratio") is not None:
            txt += f"; first block's sigma_1 / mean of the others per depth {_list_text(s['first_block_ratio'])}"
    else:
        txt += "; without the first block: n/a (not in this result)"
    return txt + " (RA4: slope -1 and a nearly constant product; read it where it holds without the first block too)"


def alignment_stage_reading(result: dict[str, Any]) -> str:
    """One line per stage of a :func:`residual_alignment` result dict (``result.to_dict()``) for
    a report: what was measured per stage (blocks, D), RA1 / RA2 / RA3 / RA4 values with undefined
    ones as ``n/a (reason)`` (one-block stages), the rank as ``>= k`` when capped, and RA4 with and
    without the first block."""
    k = (result.get("settings") or {}).get("k")
    out = []
    for i, st in enumerate(result.get("stages", [])):
        s = st.get("summary") or {}
        out.append(f"stage {i} ({len(st.get('block_names', []))} blocks, D = {st.get('dim')}): linearity "
                   f"{fmt_key(s, 'linearity')}, equispacing {fmt_key(s, 'equispacing')}, self alignment "
                   f"{fmt_key(s, 'self_alignment')}, off-diagonal diag ratio {fmt_key(s, 'diag_ratio_offdiag')}, "
                   f"max numerical rank {_rank_text(s, k)}, L * mean sigma_1 {fmt_key(s, 'depth_product')} "
                   f"(without the first block {fmt_key(s, 'depth_product_excl_first')})")
    return "; ".join(out) + "."


RA1_METRICS: tuple[tuple[str, int, str], ...] = (
    ("linearity", +1, "RA1 (straight trajectories)"),
    ("equispacing", -1, "RA1 (equal steps)"),
    ("step_cosine", +1, "RA1 (aligned steps)"),
)


def _ra1_reading(r: dict, models: list[str], root: str) -> str:
    """RA1 per metric, each model against the plain control (stage 0, per-input values)."""
    parts = []
    n = None
    for key, sign, claim in RA1_METRICS:
        stats: dict[str, Any] = {}
        for m in models:
            ra1 = get_path(r, f"{root}.{m}.alignment.result.stages.0.ra1")
            st = _sample_stats(ra1.get(key))
            stats[m] = st if st is not None else (ra1.get("undefined_reason") or _summ(get_path(
                r, f"{root}.{m}.alignment")).get(f"{key}_reason") or "undefined")
            if st is not None:
                n = st[2]
        parts.append(_versus_control(key, stats, models, sign, claim))
    return ("; ".join(parts) + f" (mean +- one standard error over the {n if n is not None else 'n/a'} test inputs; "
            "with skips RA1 predicts linearity and step cosine near 1 and equispacing near 0; a difference from the "
            f"plain control is read only beyond {CONTRAST_Z:g} standard errors, and a difference in RA1's direction "
            "is not by itself the near-1 / near-0 level RA1 describes).")


def _collapse_reading(r: dict, models: list[str], root: str) -> str:
    """NC1 across depth and the Spearman rhos per model; the NCC rho is not read when the mismatch
    sits at exactly 0 (ties at the floor), undefined rhos are n/a with the analysis' reason."""
    out = []
    verdict = {}
    for m in models:
        res = get_path(r, f"{root}.{m}.collapse.result")
        s = _summ(get_path(r, f"{root}.{m}.collapse"))
        notes = res.get("spearman_note") or {}
        rho_nc1 = s.get("spearman_nc1")
        nc1 = fmt_key(s, "spearman_nc1", reason=notes.get("nc1") or None)
        zero_from = res.get("ncc_zero_from")
        rho_ncc = s.get("spearman_ncc_mismatch")
        if zero_from is not None:
            ncc = (f"NCC mismatch exactly 0 from layer {zero_from} on (its rho "
                   f"{fmt(rho_ncc)} is not read: ties at 0 pull rho towards 0 although the mismatch never rises)")
        else:
            ncc = "rho(l, NCC) " + fmt_key(s, "spearman_ncc_mismatch", reason=notes.get("ncc_mismatch") or None)
        out.append(f"{m}: NC1 {fmt_key(s, 'nc1_first')} -> {fmt_key(s, 'nc1_last')}, Spearman rho(l, NC1) {nc1}, {ncc}")
        verdict[m] = None if is_undefined(rho_nc1) else bool(rho_nc1 < -0.9)
    held = [m for m, v in verdict.items() if v]
    text = "; ".join(out)
    tail = (" (expected on a trained ResNet: NC1 decreases with depth, rho < -0.9; it holds for "
            + (", ".join(held) if held else "none of the nets"))
    if CONTROL in models and any(verdict.get(m) for m in models if m != CONTROL):
        if verdict.get(CONTROL):
            tail += ", the plain control included, so a decrease with depth is not specific to skips here"
        elif verdict.get(CONTROL) is False:
            tail += "; the plain control does not show it"
    return text + tail + ")."




# =============================================================================== validation
# Every check below runs in resolve_config (through Study.validate) or demo_config, before the
# runner creates the output folder or trains anything: a configuration that cannot work ends in
# one UsageError line, never in a traceback after minutes of training.

_VISION_INFO: dict[str, tuple[int, int, tuple[int, ...], int]] = {  # train, test, [C, H, W], classes
    "mnist": (60000, 10000, (1, 28, 28), 10), "fashionmnist": (60000, 10000, (1, 28, 28), 10),
    "cifar10": (50000, 10000, (3, 32, 32), 10), "cifar100": (50000, 10000, (3, 32, 32), 100),
}


@dataclass(frozen=True)
class DataInfo:
    """What the validators need to know about a study's data set (without training on it).

    Attributes:
        name: the ``dataset`` option.
        n_train, n_test: samples of each split after the ``n_train`` option.
        input_shape: one input as the nets see it ([C, H, W] for conv nets, [d] for FC nets).
        num_classes: C.
    """

    name: str
    n_train: int
    n_test: int
    input_shape: tuple[int, ...]
    num_classes: int


def data_info(cfg: dict[str, Any]) -> DataInfo:
    """:class:`DataInfo` of ``cfg``'s data set; UsageError for an unknown or missing data set and
    for ``n_train`` above the training samples it holds. Local vision sets are not read (sizes
    from a table, file presence checked); digits and the Gaussian mixture are built (milliseconds)."""
    spec = cfg.get("dataset", "digits")
    image = cfg.get("model", "fc") == "conv"
    parts = spec.split(":", 2) if isinstance(spec, str) else []
    known = None
    if len(parts) == 3 and parts[0] == "torchvision" and parts[2] and parts[1].lower() in _VISION_INFO:
        from resgeom_fast.data import expected_files

        if all(os.path.isfile(f) for f in expected_files(parts[1].lower(), parts[2])):
            known = _VISION_INFO[parts[1].lower()]
    if known is None:  # builds the set, or raises load_data's UsageError naming what is wrong
        ds = load_data(spec, image=image, seed=cfg["seed"])
        known = (int(ds.x_train.shape[0]), int(ds.x_test.shape[0]), tuple(int(d) for d in ds.x_train.shape[1:]),
                 int(ds.num_classes))
    n_tr, n_te, shape, classes = known
    if not image:
        shape = (int(math.prod(shape)),)
    n_train = cfg.get("n_train")
    if n_train is not None:
        if n_train > n_tr:
            raise UsageError(f"n_train: expected an int <= {n_tr} (the training samples of {spec}), got {n_train}")
        n_tr = n_train
    return DataInfo(spec, n_tr, n_te, shape, classes)


def _check_samples(cfg: dict[str, Any], name: str, available: int, split: str, info: DataInfo) -> None:
    if cfg[name] > available:
        raise UsageError(f"{name}: expected an int <= {available} (the {split} samples of {info.name}"
                         f"{' after n_train' if split == 'training' and cfg.get('n_train') is not None else ''}), "
                         f"got {cfg[name]}")


def _memory_limit(device: str) -> Optional[tuple[int, str]]:
    """(bytes, description) of the memory of ``device``; None when unknown."""
    try:
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                return None
            dev = torch.device(device)
            props = torch.cuda.get_device_properties(dev.index if dev.index is not None else 0)
            return int(props.total_memory), f"the {props.total_memory:.3g} bytes of {device}"
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total), f"the {total:.3g} bytes of this machine's memory"
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _param_count(spec: dict[str, Any]) -> int:
    """Trainable parameters of ``build_model(spec)``, built on the meta device (no memory used)."""
    from .common import build_model

    with torch.device("meta"):
        model = build_model(spec)
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def _check_net(cfg: dict[str, Any], info: DataInfo, depth: int, width: Optional[int] = None,
               extra_bytes_per_param: int = 0, what: str = "width, depth") -> int:
    """Refuse a net that cannot fit in memory; returns its trainable parameter count P.

    The estimate is a lower bound: P float32 values for the weights, the gradients, SGD's momentum
    and one spare copy (16 bytes per parameter, plus ``extra_bytes_per_param`` for an analysis'
    own vectors), plus one batch of activations (6 [batch, width, spatial] tensors per block). A
    refusal therefore means the run certainly cannot fit. P is first bounded from below without
    building anything (2 width^2 per FC block, 18 width^2 per conv block), then counted exactly on
    the meta device.
    """
    w = cfg["width"] if width is None else width
    conv = cfg.get("model", "fc") == "conv"
    spatial = int(math.prod(info.input_shape[1:])) if conv else 1
    per_param = 16 + extra_bytes_per_param
    act = 6 * 4 * depth * cfg.get("batch_size", 64) * w * spatial
    lower = depth * (18 if conv else 2) * w * w
    limit = _memory_limit(cfg.get("device", "cpu"))

    def refuse(p: int, exact: bool) -> None:
        need = per_param * p + act
        if limit is not None and need > limit[0]:
            raise UsageError(f"{what}: expected a net that fits in memory: a {'conv' if conv else 'fc'} net of width "
                             f"{w} and depth {depth} has {'' if exact else 'at least '}{p:.3g} parameters, about "
                             f"{need:.3g} bytes to train and analyse, more than {limit[1]}; got width {w}, "
                             f"depth {depth}")

    refuse(lower, False)
    spec = _spec(cfg, _FakeDs(info), "residual", depth)
    spec["width"] = w
    p = _param_count(spec)
    refuse(p, True)
    return p


@dataclass(frozen=True)
class _FakeDs:
    """The two attributes of a Dataset that :func:`_spec` reads, from a :class:`DataInfo`."""

    info: DataInfo

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.info.input_shape


def _block_dim(cfg: dict[str, Any], info: DataInfo) -> int:
    """D of the residual Jacobians J_l (width for FC nets, width * H * W for conv nets)."""
    if cfg.get("model", "fc") == "conv":
        return cfg["width"] * int(math.prod(info.input_shape[1:]))
    return cfg["width"]


def _validate_alignment_opts(cfg: dict[str, Any], info: DataInfo) -> None:
    D = _block_dim(cfg, info)
    k = cfg.get("k")
    if k is not None and k > D:
        raise UsageError(f"k: expected an int in [1, {D}] (the block dimension D of the residual Jacobians: "
                         f"{'width' if cfg.get('model', 'fc') == 'fc' else 'width * H * W'} = {D}), got {k}")
    _check_samples(cfg, "align_samples", info.n_test, "test", info)
    for L in cfg["depths"]:
        _check_net(cfg, info, L, what="width, depths")


def _validate_hessian_opts(cfg: dict[str, Any], info: DataInfo, archs: list[str]) -> None:
    _check_samples(cfg, "hessian_samples", info.n_train, "training", info)
    sizes = []
    for arch in archs:
        spec = _spec(cfg, _FakeDs(info), arch)
        sizes.append((_param_count(spec), arch))
    p, arch = min(sizes)
    for name in ("eigs", "lanczos_steps"):
        if cfg[name] > p:
            raise UsageError(f"{name}: expected an int <= {p} (the parameters P of the {arch} net, the Hessian's "
                             f"dimension), got {cfg[name]}")


def _validate_net_study(cfg: dict[str, Any], extra_bytes_per_param: int = 0) -> DataInfo:
    info = data_info(cfg)
    _check_net(cfg, info, cfg["depth"], extra_bytes_per_param=extra_bytes_per_param)
    return info


def validate_alignment(cfg: dict[str, Any]) -> None:
    """alignment: the data, the nets' size, k <= D, align_samples <= test samples."""
    info = _validate_net_study(cfg)
    _validate_alignment_opts(cfg, info)


def validate_hessian(cfg: dict[str, Any]) -> None:
    """hessian: the data, archs, the nets' size (with the Lanczos basis), eigs and lanczos_steps <= P,
    hessian_samples <= training samples."""
    archs = _archs(cfg)
    info = _validate_net_study(cfg, extra_bytes_per_param=8 * cfg["lanczos_steps"])
    _validate_hessian_opts(cfg, info, archs)


def validate_singularities(cfg: dict[str, Any]) -> None:
    """singularities: the data, archs, the nets' size."""
    _archs(cfg)
    _validate_net_study(cfg)


def validate_collapse(cfg: dict[str, Any]) -> None:
    """collapse: the data, the net's size, mufm_samples <= training samples, collapse_every <= epochs."""
    info = _validate_net_study(cfg)
    _check_samples(cfg, "mufm_samples", info.n_train, "training", info)
    if cfg["epochs"] >= 1 and cfg["collapse_every"] > cfg["epochs"]:
        raise UsageError(f"collapse_every: expected an int <= epochs ({cfg['epochs']}) so that collapse is measured "
                         f"along training, got {cfg['collapse_every']}")


def validate_expansion(cfg: dict[str, Any]) -> None:
    """expansion: the data, the nets' size (trained nets and the output-norm nets), samples <= test
    samples, at least two distinct positive lams."""
    info = _validate_net_study(cfg)
    _check_samples(cfg, "path_samples", info.n_test, "test", info)
    _check_samples(cfg, "gc_samples", info.n_test, "test", info)
    lams = cfg["lams"]
    if any(not lam > 0 for lam in lams) or len(set(lams)) < 2:
        raise UsageError(f"lams: expected at least two distinct numbers > 0, got {lams}")
    fc = {**cfg, "model": "fc"}
    norm_info = DataInfo(info.name, info.n_train, info.n_test, (cfg["norm_width"],), info.num_classes)
    _check_net(fc, norm_info, max(cfg["norm_depths"]), width=cfg["norm_width"], what="norm_width, norm_depths")


def validate_leaky(cfg: dict[str, Any]) -> None:
    """leaky: teacher widths, width >= the teacher's input and output widths, the Lt schedule."""
    from resgeom_fast.models import step_sizes

    dims = tuple(cfg["teacher_dims"])
    if len(dims) < 2:
        raise UsageError(f"teacher_dims: expected at least two widths (d_in, d_out), got {list(dims)}")
    if max(dims[0], dims[-1]) > cfg["width"]:
        raise UsageError(f"width: expected >= the teacher's input and output widths {dims[0]}, {dims[-1]}, "
                         f"got {cfg['width']}")
    limit = _memory_limit(cfg.get("device", "cpu"))
    itemsize = 8 if cfg["dtype"] == "float64" else 4
    need = 4 * itemsize * cfg["depth"] * cfg["width"] ** 2 + 4 * itemsize * cfg["depth"] * cfg["n"] * cfg["width"]
    if limit is not None and need > limit[0]:
        raise UsageError(f"width, depth: expected a net that fits in memory: width {cfg['width']} and depth "
                         f"{cfg['depth']} need about {need:.3g} bytes, more than {limit[1]}; got width "
                         f"{cfg['width']}, depth {cfg['depth']}")
    rho_max = float(step_sizes(cfg["depth"], cfg["steps"]).max())
    bad = [lt for lt in cfg["lts"] if not (0 < lt and lt * rho_max < 1)]
    if bad:
        raise UsageError(f"lts: expected every Lt > 0 with Lt * max_l rho_l < 1 (rho_max = {rho_max:.4g} for "
                         f"depth {cfg['depth']}), got {bad}")
    if len(set(cfg["lts"])) != len(cfg["lts"]):
        raise UsageError(f"lts: expected distinct values, got {cfg['lts']}")


def validate_demo(cfg: dict[str, Any]) -> None:
    """demo: the data, both nets and the depth-scaling nets fit, k and the sample counts fit the data."""
    info = _validate_net_study(cfg, extra_bytes_per_param=8 * cfg["lanczos_steps"])
    _validate_alignment_opts(cfg, info)
    _validate_hessian_opts(cfg, info, ["residual", "plain"])
    _check_samples(cfg, "path_samples", info.n_test, "test", info)
    _check_samples(cfg, "gc_samples", info.n_test, "test", info)


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
        return _ra1_reading(r, models, root)

    def sv(r: dict) -> Any:
        fig, axes = new_figure(len(models))
        for ax, m in zip(axes, models):
            spectra_per_block(ax, r, f"{p(m)}.stages.0.ra3.singular_values_mean",
                              f"{m}: singular values of J_l", get_path(r, f"{p(m)}.settings.num_classes"))
        fig.tight_layout()
        return fig

    def sv_read(r: dict) -> str:
        parts = []
        for m in models:
            s = _summ(get_path(r, f"{root}.{m}.alignment"))
            k = get_path(r, f"{p(m)}.settings.k")
            parts.append(f"{m}: max numerical rank {_rank_text(s, k)}, fraction rank <= C "
                         f"{fmt_key(s, 'rank_le_c_fraction')}")
        return "; ".join(parts) + (" (RA3: rank at most C for FC nets; dashed line at r = C; a rank that reaches k is "
                                   "capped by the k computed singular values and reads '>= k').")

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
        k = get_path(r, f"{p(models[0])}.settings.k")
        control = ("; read against the plain control's values" if CONTROL in models else
                   "; no control net without skips in this study")
        return _per_model(r, models, root, "alignment", "off-diagonal diag ratio {diag_ratio_offdiag}, "
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
        txt = _per_model(r, models, root, "alignment", "L * mean sigma_1 = {depth_product}, without the first "
                         "block {depth_product_excl_first} (first block's sigma_1 / mean of the others "
                         "{first_block_ratio})")
        if with_depth:
            txt += "; " + _depth_scaling_text(get_path(r, "depth_scaling.scaling"))
        return txt + "."

    return [FigureSpec("ra_trajectories", "RA1: trajectories", traj, traj_read),
            FigureSpec("ra_singular_values", "RA3: singular value spectra of the residual Jacobians", sv, sv_read),
            FigureSpec("ra_cross_alignment", "RA2: cross alignment", cross, cross_read),
            FigureSpec("ra_sigma1_depth", "RA4: sigma_1 against depth", sig, sig_read)]


def _density_figure(models: list[str], root: str = "models") -> FigureSpec:
    def build(r: dict) -> Any:
        # one panel per model: the nets' spectra differ by orders of magnitude in scale
        fig, axes = new_figure(len(models), width=4.6, height=3.8)
        import numpy as np

        for i, m in enumerate(models):
            ax = axes[i]
            top = 0.0
            s = get_path(r, f"{root}.{m}.spectrum.result")
            grid, dens = np.array(s["grid"], float), np.array([np.nan if v is None else v for v in s["density"]], float)
            std = np.array([np.nan if v is None else v for v in s["density_std"]], float)
            summ = _summ(get_path(r, f"{root}.{m}.spectrum"))
            (ln,) = ax.plot(grid, dens, color=f"C{i}", lw=1.2,
                            label=f"{m} (near-zero mass: rel. {_fraction_text(summ, 'degenerate_fraction_rel', 2)}, "
                                  f"abs. {_fraction_text(summ, 'degenerate_fraction_abs', 2)})")
            from .report import tag

            tag(ln, x=f"{root}.{m}.spectrum.result.grid", y=f"{root}.{m}.spectrum.result.density")
            if np.isfinite(std).all():
                ax.fill_between(grid, dens - std, dens + std, color=f"C{i}", alpha=0.2, lw=0)
            top = max(top, float(np.nanmax(dens)) if np.isfinite(dens).any() else 0.0)
            if top > 0:  # log axis over 8 decades below the highest peak (SLQ tails fall to 1e-100)
                ax.set_yscale("log", nonpositive="mask")
                ax.set_ylim(top * 1e-8, top * 3)
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
            ax.set_xlabel("eigenvalue")
            ax.set_ylabel("density (band: +- std over probes)")
            ax.set_title(f"{m}: Hessian spectral density (SLQ)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def reading(r: dict) -> str:
        return _spectrum_reading(r, models, root)

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
        return _collapse_reading(r, models, root)

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
        return _per_model(r, models, root, "singularities",
                          "dead units {dead_fraction_total}, small-eigenvalue fraction {mean_small_eig_fraction}, "
                          "effective rank fraction {mean_effective_rank_fraction}") + " (expected: plain >= residual >= hyper-residual in dead units)."

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
        return _per_model(r, models, root, "paths",
                          "mean path order {mean_order} of L = {num_blocks}, most weighted order {mode_order}") + "."

    return FigureSpec("path_orders", "Path-order distribution", build, reading)


# =============================================================================== demo
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 400, "width": 16, "depth": 3, "epochs": 2, "align_samples": 8, "k": 12, "oversample": 4,
             "power_iters": 1, "depths": [2, 3], "hessian_samples": 128, "eigs": 2, "probes": 2,
             "lanczos_steps": 12, "trace_probes": 6, "path_samples": 16, "max_order": None, "gc_samples": 32},
    "default": {"n_train": None, "width": 64, "depth": 8, "epochs": 30, "align_samples": 64, "k": None,
                "oversample": 10, "power_iters": None, "depths": [4, 8, 16], "hessian_samples": 512, "eigs": 4,
                "probes": 4, "lanczos_steps": 160, "trace_probes": 30, "path_samples": 128, "max_order": None,
                "gc_samples": 256},
}


def demo_config(size: str, seed: int, device: str, deterministic: bool = False) -> dict[str, Any]:
    """The demo's configuration at preset ``size``, checked by :func:`validate_demo` (UsageError
    before any work for a seed out of range or settings the data cannot serve)."""
    if size not in DEMO_SIZES:
        raise UsageError(f"--size: expected one of {list(DEMO_SIZES)}, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX:
        raise UsageError(f"--seed: expected an int in [0, {SEED_MAX}], got {seed!r}")
    if not isinstance(deterministic, bool):
        raise UsageError(f"--deterministic: expected true or false, got {deterministic!r}")
    cfg = {"dataset": "digits", "model": "fc", "norm": "batch", "lr": 0.05, "batch_size": 64, "seed": seed,
           "device": device, "size": size, "weight_decay": 5e-2, "schedule": "cosine", "deterministic": deterministic}
    cfg.update(DEMO_SIZES[size])
    validate_demo(cfg)
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
        return _degeneracy_order_reading(r, archs)

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
LEAKY_OPTIONS = [
    _opt("teacher_dims", "ints", [30, 3, 30], "teacher widths (k* = the bottleneck)", minimum=1),
    _opt("n", "int", 200, "training points of the teacher data (SCIENCE.md: 1000)", minimum=2),
    _opt("width", "int", 40, "student width w (SCIENCE.md: 100)", minimum=1),
    _opt("depth", "int", 20, "layers L (equidistant steps rho_l = 1/L unless steps=irregular)", minimum=1),
    _opt("lts", "floats", [2.0, 4.0, 8.0, 12.0],
         "effective depths Lt (the nets' leaks) in continuation order: each stage starts from the previous "
         "stage's weights; every Lt > 0 and max_l rho_l * Lt < 1", minimum=0),
    _opt("steps", "str", "equidistant", "step scheme", ("equidistant", "irregular")),
    _opt("lam", "float", 5e-3, "weight decay lam of the loss (lam / (2 Lt)) sum_l rho_l ||W_l||^2", minimum=0),
    _opt("adam_steps", "int", 800, "full-batch Adam steps of the first stage (from the default init)", minimum=0),
    _opt("adam_lr", "float", 5e-3, "Adam learning rate of the first stage (cosine to 0)", minimum=0),
    _opt("continue_steps", "int", 300, "full-batch Adam steps of every later stage (warm start)", minimum=0),
    _opt("continue_lr", "float", 2e-3, "Adam learning rate of the later stages (cosine to 0)", minimum=0),
    _opt("lbfgs_steps", "int", 200, "L-BFGS iterations closing every stage (strong Wolfe, max_eval 1.25x)",
         minimum=0),
    _opt("lbfgs_history", "int", 50, "L-BFGS history size", minimum=1),
    _opt("gamma0", "float", 1e-3, "relative ridge gamma_0 of the Hamiltonian analysis", minimum=0),
    _opt("dtype", "str", "float64", "floating dtype of data and nets", ("float32", "float64")),
    Option("seed", "int", 0, "seed of the teacher data and of the first stage's weights", minimum=0, maximum=SEED_MAX),
    _opt("device", "str", "cpu", "cpu | cuda | cuda:N"),
    DETERMINISTIC_OPTION,
]


def _lt_name(lt: float) -> str:
    return f"Lt_{lt:g}".replace(".", "p")


def _leaky_adam(model, x, y, steps: int, lr: float, trace: dict[str, list]) -> None:
    """Full-batch Adam on ``model.loss`` with a cosine schedule to 0; appends to ``trace``."""
    if steps == 0:
        return
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        data = model.data_loss(model(x), y)
        loss = data + model.regularization()
        loss.backward()
        opt.step()
        sched.step()
        trace["iteration"].append(len(trace["iteration"]) + 1)
        trace["loss"].append(loss.item())
        trace["data_loss"].append(data.item())
    trace["adam_end"] = len(trace["iteration"])


def _leaky_lbfgs(model, x, y, iters: int, history: int, trace: dict[str, list]) -> None:
    """Full-batch L-BFGS (strong Wolfe, max_eval = iters + iters // 4) on ``model.loss``; every
    loss evaluation (line-search ones included) is appended to ``trace``."""
    if iters == 0:
        return
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, max_eval=iters + iters // 4,
                            tolerance_grad=1e-12, tolerance_change=0, history_size=history,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        data = model.data_loss(model(x), y)
        loss = data + model.regularization()
        loss.backward()
        trace["iteration"].append(len(trace["iteration"]) + 1)
        trace["loss"].append(loss.item())
        trace["data_loss"].append(data.item())
        return loss

    opt.step(closure)


def _leaky_final(model, x, y, xt, yt) -> dict[str, float]:
    model.zero_grad()
    data = model.data_loss(model(x), y)
    reg = model.regularization()
    (data + reg).backward()
    grad = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    model.zero_grad()
    with torch.no_grad():
        test = float(model.data_loss(model(xt), yt))
    return {"loss": (data + reg).item(), "data_loss": data.item(), "regularization": reg.item(), "grad_norm": grad,
            "test_data_loss": test}


def _leaky_stages(runner: Runner, cfg: dict[str, Any], x, y, xt, yt, key: dict[str, Any], device: torch.device):
    """The continuation in Lt: one step ``train_<Lt name>`` per Lt (result: loss trace and final
    numbers; checkpoint ``model.pt`` with the weights). Yields (name, lt, model, step result)."""
    from resgeom_fast.models import LeakyResNet

    dims = cfg["teacher_dims"]
    spec = {"in_dim": dims[0], "width": cfg["width"], "depth": cfg["depth"], "out_dim": dims[-1],
            "steps": cfg["steps"], "lam": cfg["lam"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
    schedule = {k: cfg[k] for k in ("adam_steps", "adam_lr", "continue_steps", "continue_lr", "lbfgs_steps",
                                    "lbfgs_history")}
    dtype = getattr(torch, cfg["dtype"])
    prev = None
    prev_name = None
    for i, lt in enumerate(cfg["lts"]):
        name = _lt_name(lt)
        # a stage depends on every earlier stage (it starts from their result)
        # (the first stage does not use the continue_* options)
        sched = schedule if i else {k: v for k, v in schedule.items() if not k.startswith("continue_")}
        deps = {"data": key, "model": spec, "schedule": sched, "lts": [float(v) for v in cfg["lts"][:i + 1]]}
        ckdir = runner.checkpoint_dir(name, deps)
        ckpt = os.path.join(ckdir, "model.pt")
        step = f"train_{name}"
        model = None
        if verified_checkpoint(runner, step, deps, ckpt, lambda path: torch.load(path, weights_only=True)):
            model = LeakyResNet(dims[0], cfg["width"], cfg["depth"], dims[-1], float(lt), cfg["steps"],
                                lam=cfg["lam"], seed=cfg["seed"]).to(device=device, dtype=dtype)
            model.load_state_dict(torch.load(ckpt, map_location=device, weights_only=True))
        if model is None:
            if prev is None:
                model = LeakyResNet(dims[0], cfg["width"], cfg["depth"], dims[-1], float(lt), cfg["steps"],
                                    lam=cfg["lam"], seed=cfg["seed"]).to(device=device, dtype=dtype)
            else:
                model = prev.with_leak(float(lt))
        start, start_name = model, prev_name

        def fn() -> dict[str, Any]:
            m = start.train()
            trace: dict[str, Any] = {"iteration": [], "loss": [], "data_loss": [], "adam_end": 0}
            if start_name is None:
                _leaky_adam(m, x, y, cfg["adam_steps"], cfg["adam_lr"], trace)
            else:
                _leaky_adam(m, x, y, cfg["continue_steps"], cfg["continue_lr"], trace)
            _leaky_lbfgs(m, x, y, cfg["lbfgs_steps"], cfg["lbfgs_history"], trace)
            atomic_save(m.state_dict(), ckpt)
            return {"checkpoint_sha256": file_sha256(ckpt), "leak": float(lt), "init": "default" if start_name is None else f"weights of {start_name}",
                    "trace": trace, "final": _leaky_final(m, x, y, xt, yt)}

        out = runner.step(step, fn, deps=deps)
        model.eval()
        yield name, float(lt), model, out, deps
        prev, prev_name = model, name


def _leaky_analysis(runner: Runner, name: str, model, x, y, gamma0: float, deps: dict[str, Any]) -> dict[str, Any]:
    """Hamiltonian of one stage plus the centred singular values of its middle states."""
    from resgeom_fast.analysis.hamiltonian import hamiltonian

    def run() -> dict[str, Any]:
        r = hamiltonian(model, x, y, gamma0)
        mid_h = [l for l in r.middle if l < r.depth] or list(range(r.depth))
        h = r.hamiltonian[mid_h]
        summary = dict(r.summary())
        summary["hamiltonian_mid_spread"] = float(h.std(unbiased=False)) / abs(float(h.mean())) \
            if float(h.mean()) != 0 else math.nan
        with torch.no_grad():
            _, hs = model(x, return_hidden=True)
        sv = torch.stack([torch.linalg.svdvals((hs[l] - hs[l].mean(0)).double().cpu()) for l in r.middle])
        ranks = (sv > r.tol * sv[:, :1]).sum(1).double()
        summary["centred_rank_middle"] = float(ranks.median())
        centred = {"layers": list(r.middle), "singular_values": sv, "median_middle": sv.median(0).values,
                   "rank": ranks, "tol": r.tol}
        return {"result": r.to_dict(), "summary": summary, "centred": centred}

    return runner.step(f"{name}_hamiltonian", run, deps={**deps, "gamma0": gamma0})


def run_leaky(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Continuation in Lt (see LEAKY_OPTIONS): stage 1 trains the first Lt from the default init
    with ``adam_steps`` Adam steps, every later Lt loads the previous stage's weights
    (:meth:`LeakyResNet.with_leak`) and trains ``continue_steps``; every stage ends with
    ``lbfgs_steps`` L-BFGS iterations. Then -(2/Lt) H, H across layers and middle-layer spectra."""
    from resgeom_fast.data import teacher

    device = resolve_device(cfg["device"])
    validate_leaky(cfg)  # already run by resolve_config; repeated for direct callers
    dims = tuple(cfg["teacher_dims"])
    dtype = getattr(torch, cfg["dtype"])
    ds = teacher(dims, n=cfg["n"], seed=cfg["seed"], dtype=dtype)
    key = {"teacher": list(dims), "n": cfg["n"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
    x, y = (t.to(device) for t in ds.tensors("train"))
    xt, yt = (t.to(device) for t in ds.tensors("test"))
    runs: dict[str, Any] = {}
    for name, lt, model, out, deps in _leaky_stages(runner, cfg, x, y, xt, yt, key, device):
        runs[name] = {"leak": lt, "train": out, "hamiltonian": _leaky_analysis(runner, name, model, x, y,
                                                                                cfg["gamma0"], deps)}
    names = list(runs)

    def col(k: str) -> list[float]:
        return [runs[n]["hamiltonian"]["summary"][k] for n in names]

    k_true = min(dims[1:-1]) if len(dims) > 2 else min(dims)
    results = {"study": "leaky", "config": cfg, "models": runs,
               "k_star_vs_leak": {"leaks": [runs[n]["leak"] for n in names], "k_star_middle": col("k_star_middle"),
                                  "rank_middle": col("rank_middle"), "stable_rank_middle": col("stable_rank_middle"),
                                  "centred_rank_middle": col("centred_rank_middle"),
                                  "hamiltonian_mid_spread": col("hamiltonian_mid_spread"),
                                  "k_true_line": [float(k_true)] * len(names)},
               "k_true": k_true}

    def k_build(r: dict) -> Any:
        fig, axes = new_figure(3)
        lines(axes[0], r, [("-(2/Lt) H (median, middle layers)", "k_star_vs_leak.leaks", "k_star_vs_leak.k_star_middle"),
                           ("stable rank of A_l (middle)", "k_star_vs_leak.leaks", "k_star_vs_leak.stable_rank_middle"),
                           ("centred rank of A_l (middle)", "k_star_vs_leak.leaks",
                            "k_star_vs_leak.centred_rank_middle"),
                           (f"k* = {r['k_true']} (teacher bottleneck)", "k_star_vs_leak.leaks",
                            "k_star_vs_leak.k_true_line")],
              title="k* = -(2/Lt) H against effective depth Lt", xlabel="Lt", ylabel="rank estimate", logx=True,
              styles=[{}, {}, {}, {"ls": "--", "color": "gray", "marker": ""}])
        ks = r["k_star_vs_leak"]["k_star_middle"]
        if all(v is not None and math.isfinite(v) for v in ks):
            lo = min(min(ks), r["k_true"] - 1.0)
            axes[0].set_ylim(max(lo, -10.0), None)  # very negative k* at small Lt would squash the rest
        lines(axes[1], r, [(f"Lt = {r['models'][n]['leak']:g}", "index", f"models.{n}.hamiltonian.result.hamiltonian")
                           for n in r["models"]],
              title="Hamiltonian H_l across layers", xlabel="layer l", ylabel="H", marker=".")
        lines(axes[2], r, [(f"Lt = {r['models'][n]['leak']:g}", "index", f"models.{n}.hamiltonian.result.k_star")
                           for n in r["models"]],
              title="-(2/Lt) H_l across layers", xlabel="layer l", ylabel="-(2/Lt) H_l", marker=".")
        axes[2].axhline(r["k_true"], ls="--", color="gray", lw=0.8)
        fig.tight_layout()
        return fig

    def k_read(r: dict) -> str:
        k = r["k_star_vs_leak"]
        kt = r["k_true"]
        last = k["k_star_middle"][-1]
        near = last is not None and math.isfinite(last) and abs(last - kt) < 0.25
        return (f"-(2/Lt) H (median over the middle layers) at Lt = {[f'{v:g}' for v in k['leaks']]}: "
                f"{[fmt(v) for v in k['k_star_middle']]} against the teacher bottleneck k* = {kt}; "
                + (f"it reaches k* within {fmt(abs(last - kt), 2)} at the largest Lt. " if near else
                   f"it is still {fmt(abs(last - kt), 2)} from k* at the largest Lt (more Lt stages or training "
                   "needed). ")
                + "Relative spread std/|mean| of H over the middle layers: "
                + ", ".join(fmt(v, 2) for v in k["hamiltonian_mid_spread"]) + " (H nearly constant in the middle "
                "when small; the first and last steps move fastest).")

    def sv_build(r: dict) -> Any:
        import matplotlib.pyplot as plt

        from .report import tag

        last = list(r["models"])[-1]
        fig, axes = new_figure(2)
        c = r["models"][last]["hamiltonian"]["centred"]
        sv = c["singular_values"]
        cmap = plt.get_cmap("viridis")
        for i, l in enumerate(c["layers"]):
            (ln,) = axes[0].plot(range(1, len(sv[i]) + 1), [math.nan if v is None else v for v in sv[i]], "-", lw=1,
                                 color=cmap(i / max(1, len(sv) - 1)),
                                 label=f"layer {l}" if i in (0, len(sv) - 1) else None)
            tag(ln, x="index1", y=f"models.{last}.hamiltonian.centred.singular_values.{i}")
        axes[0].set_title(f"centred singular values of the middle A_l (Lt = {r['models'][last]['leak']:g})",
                          fontsize=9)
        lines(axes[1], r, [(f"Lt = {r['models'][n]['leak']:g}", "index1",
                            f"models.{n}.hamiltonian.centred.median_middle") for n in r["models"]],
              title="median over the middle layers of the centred spectrum", marker=".")
        for ax in axes:
            ax.axvline(r["k_true"], ls="--", color="gray", lw=0.8)
            if any(v is not None and v > 0 for row in sv for v in row):
                ax.set_yscale("log", nonpositive="mask")
            ax.set_xlabel("index i")
            ax.set_ylabel("s_i(A_l - mean)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def sv_read(r: dict) -> str:
        last = list(r["models"])[-1]
        h = r["models"][last]["hamiltonian"]
        s, c = h["summary"], h["centred"]
        kt = r["k_true"]
        gaps = [row[kt - 1] / row[kt] for row in c["singular_values"]
                if len(row) > kt and row[kt] not in (None, 0) and row[kt - 1] is not None]
        gap = f"; s_{kt} / s_{kt + 1} over the middle layers {fmt(min(gaps))} .. {fmt(max(gaps))}" if gaps else ""
        return (f"at Lt = {r['models'][last]['leak']:g} the centred middle states have "
                f"{fmt(s['centred_rank_middle'])} singular values above {fmt(c['tol'])} x the largest (teacher "
                f"bottleneck k* = {kt}){gap}; uncentred rank {fmt(s['rank_middle'])} (the mean direction adds one), "
                f"stable rank {fmt(s['stable_rank_middle'])}.")

    def tr_build(r: dict) -> Any:
        fig, axes = new_figure(2)
        for ax, key_ in zip(axes, ("loss", "data_loss")):
            lines(ax, r, [(f"Lt = {r['models'][n]['leak']:g}", f"models.{n}.train.trace.iteration",
                           f"models.{n}.train.trace.{key_}") for n in r["models"]],
                  title=f"{key_.replace('_', ' ')} per stage (Adam steps, then L-BFGS evaluations)",
                  xlabel="iteration in the stage", ylabel=key_.replace("_", " "), logy=True, marker="")
        fig.tight_layout()
        return fig

    def tr_read(r: dict) -> str:
        parts = []
        for n, m in r["models"].items():
            f = m["train"]["final"]
            parts.append(f"Lt = {m['leak']:g}: loss {fmt(f['loss'])}, data loss {fmt(f['data_loss'])} (test "
                         f"{fmt(f['test_data_loss'])}), |grad| {fmt(f['grad_norm'], 2)}")
        return "; ".join(parts) + "."

    figures = [FigureSpec("leaky_kstar", "-(2/Lt) H against Lt and across layers", k_build, k_read),
               FigureSpec("leaky_spectra", "Middle-layer singular values", sv_build, sv_read),
               FigureSpec("training", "Training per Lt stage", tr_build, tr_read)]
    summaries = {n: {"hamiltonian": runs[n]["hamiltonian"]["summary"], "train": runs[n]["train"]["final"]}
                 for n in names}
    return StudyOutput(results, figures, summaries,
                       f"Leaky ResNets (width {cfg['width']}, L = {cfg['depth']}, {cfg['steps']} steps, lam = "
                       f"{cfg['lam']:g}, {cfg['dtype']}) on teacher data {list(dims)} ({cfg['n']} points), trained by "
                       f"continuation in the effective depth Lt = {[f'{v:g}' for v in cfg['lts']]}: the first Lt from "
                       f"the default init ({cfg['adam_steps']} full-batch Adam steps, lr {cfg['adam_lr']:g}, cosine), "
                       f"each next Lt from the previous weights ({cfg['continue_steps']} Adam steps, lr "
                       f"{cfg['continue_lr']:g}), every stage closed by {cfg['lbfgs_steps']} L-BFGS iterations. "
                       "Hamiltonian, cost of identity and bottleneck rank of every stage.")


# =============================================================================== registry
_ARCH_OPT = lambda default: _opt("archs", "str", default,  # noqa: E731
                                 f"comma list of architectures among {', '.join(ARCH_CHOICES)}")

STUDIES: dict[str, Study] = {
    "alignment": Study("alignment", "Residual Alignment: with vs without skips",
                       "nets with skips show RA1-RA4; the same nets without skips show none",
                       _net_options(epochs=30, weight_decay=5e-2, schedule="cosine") + ALIGN_OPTIONS,
                       run_alignment, validate_alignment),
    "hessian": Study("hessian", "Hessian spectra: plain vs residual vs hyper-residual",
                     "near-zero Hessian mass plain >= residual >= hyper-residual",
                     _net_options(depth=8) + HESSIAN_OPTIONS + [_ARCH_OPT("plain,residual,hyper")], run_hessian,
                     validate_hessian),
    "singularities": Study("singularities", "Singularities: plain vs residual vs hyper-residual (and BiasReg)",
                           "dead units plain >= residual >= hyper-residual; BiasReg lowers the plain net's dead units",
                           _net_options(depth=8) + [
                               _ARCH_OPT("plain,residual,hyper,plain_biasreg"),
                               _opt("eps", "float", 1e-3, "tolerance of the singularity tests", minimum=0),
                               _opt("biasreg_beta", "float", 1e-3, "BiasReg strength beta_reg", minimum=0),
                               _opt("biasreg_b0", "float", 0.1, "BiasReg target bias b0", minimum=0)],
                           run_singularities, validate_singularities),
    "collapse": Study("collapse", "Progressive feedforward collapse against depth",
                      "every metric decreases with depth (Spearman rho < -0.9) and along training",
                      _net_options(epochs=20) + [
                          _opt("collapse_every", "int", 5, "measure collapse every this many epochs", minimum=1),
                          _opt("mufm_samples", "int", 500, "training samples of the MUFM", minimum=2),
                          _opt("mufm_steps", "int", 300, "L-BFGS iterations of the MUFM", minimum=1)],
                      run_collapse, validate_collapse),
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
                       run_expansion, validate_expansion),
    "leaky": Study("leaky", "Leaky ResNets: -(2/Lt) H against Lt on the teacher",
                   "-(2/Lt) H approaches k* as Lt grows; middle layers have about k* large singular values",
                   LEAKY_OPTIONS, run_leaky, validate_leaky),
}
STUDY_NAMES: tuple[str, ...] = tuple(STUDIES)
