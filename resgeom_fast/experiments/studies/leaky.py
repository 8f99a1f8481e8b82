"""``resgeom run leaky``: Leaky ResNets on teacher data, trained by continuation in the
effective depth Lt; -(2/Lt) H against Lt (k* = the teacher's bottleneck) and the Hamiltonian
across layers."""
from __future__ import annotations

import importlib
import math
import os
from typing import Any

import torch

from resgeom_fast.core.io import atomic_save, file_sha256
from resgeom_fast.data import teacher
from resgeom_fast.models import LeakyResNet, step_sizes

from ..common import resolve_device, verified_checkpoint
from ..config import Option, UsageError
from ..figures import lines, new_figure
from ..report import FigureSpec, fmt, tag
from ..runner import Runner
from ._registry import Study, StudyOutput, register
from ._shared import DETERMINISTIC_OPTION, SEED_MAX, opt
from ._figures import leaky_steps_figure
from ._validation import memory_limit

__all__ = ["LEAKY_OPTIONS", "STUDY", "run_leaky", "validate_leaky"]

# analyses through their modules, looked up at each call (a wrapper installed on the module, as the
# tests' spies and interrupts do, sees every call); import_module because resgeom_fast.analysis
# exports functions named like the collapse / singularities / mufm / hamiltonian modules
hamiltonian_analysis = importlib.import_module("resgeom_fast.analysis.hamiltonian")


LEAKY_OPTIONS = [
    opt("teacher_dims", "ints", [30, 3, 30], "teacher widths (k* = the bottleneck)", minimum=1),
    opt("n", "int", 200, "training points of the teacher data (the paper: 1000)", minimum=2),
    opt("width", "int", 40, "student width w (the paper: 100)", minimum=1),
    opt("depth", "int", 20, "layers L (equidistant steps rho_l = 1/L unless steps=irregular)", minimum=1),
    opt("lts", "floats", [2.0, 4.0, 8.0, 12.0],
        "effective depths Lt (the nets' leaks) in continuation order: each stage starts from the previous "
        "stage's weights; every Lt > 0 and max_l rho_l * Lt < 1", minimum=0),
    opt("steps", "str", "equidistant", "step scheme (adaptive: rho updated by LeakyResNet.adapt_steps every "
        "adapt_every Adam steps, frozen during L-BFGS)", ("equidistant", "irregular", "adaptive")),
    opt("lam", "float", 5e-3, "weight decay lam of the loss (lam / (2 Lt)) sum_l rho_l ||W_l||^2", minimum=0),
    opt("adam_steps", "int", 800, "full-batch Adam steps of the first stage (from the default init)", minimum=0),
    opt("adam_lr", "float", 5e-3, "Adam learning rate of the first stage (cosine to 0)", minimum=0),
    opt("continue_steps", "int", 300, "full-batch Adam steps of every later stage (warm start)", minimum=0),
    opt("continue_lr", "float", 2e-3, "Adam learning rate of the later stages (cosine to 0)", minimum=0),
    opt("lbfgs_steps", "int", 200, "L-BFGS iterations closing every stage (strong Wolfe, max_eval 1.25x)",
        minimum=0),
    opt("lbfgs_history", "int", 50, "L-BFGS history size", minimum=1),
    opt("compare_teachers", "str", "",
        "teachers of the adaptive vs equidistant comparison, '-'-joined widths in a comma list (e.g. "
        "'30-3-30,30-6-3-30'; empty: no comparison); each trained with both schemes by the same Lt continuation",
        ),
    opt("adapt_every", "int", 10, "Adam steps between adaptive step updates", minimum=1),
    opt("gamma0", "float", 1e-3, "relative ridge gamma_0 of the Hamiltonian analysis", minimum=0),
    opt("dtype", "str", "float64", "floating dtype of data and nets", ("float32", "float64")),
    Option("seed", "int", 0, "seed of the teacher data and of the first stage's weights", minimum=0, maximum=SEED_MAX),
    opt("device", "str", "cpu", "cpu | cuda | cuda:N"),
    DETERMINISTIC_OPTION,
]


def _lt_name(lt: float) -> str:
    return f"Lt_{lt:g}".replace(".", "p")


def _leaky_adam(model, x, y, steps: int, lr: float, trace: dict[str, list], adapt_every: int = 0) -> None:
    """Full-batch Adam on ``model.loss`` with a cosine schedule to 0; appends to ``trace``. A model
    with adaptive steps gets ``model.adapt_steps(x)`` after every ``adapt_every``-th step of the stage."""
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
        if adapt_every and getattr(model, "steps", None) == "adaptive" and (len(trace["iteration"]) + 1) % adapt_every == 0:
            model.adapt_steps(x)
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


def _cap_steps(rho: torch.Tensor, cap: float) -> torch.Tensor:
    """Steps [L] (positive, sum 1) with every rho_l <= cap: the capped layers are set to ``cap`` and
    the rest rescaled to keep the sum 1 (repeated until no layer exceeds it; needs L * cap > 1)."""
    rho = rho.double().clone()
    fixed = torch.zeros_like(rho, dtype=torch.bool)
    for _ in range(len(rho)):
        over = (rho > cap) & ~fixed
        if not bool(over.any()):
            break
        fixed |= over
        rho[fixed] = cap
        free = ~fixed
        rho[free] = rho[free] * (1.0 - cap * int(fixed.sum())) / float(rho[free].sum())
    return rho


def _leaky_stages(runner: Runner, cfg: dict[str, Any], x, y, xt, yt, key: dict[str, Any], device: torch.device,
                  prefix: str = ""):
    """The continuation in Lt: one step ``train_<prefix><Lt name>`` per Lt (result: loss trace and
    final numbers, the steps rho; checkpoint ``model.pt`` with the weights). Yields (name, lt, model,
    step result, deps). Adaptive steps are capped at rho_l * Lt <= the model's max_step before the
    next (larger) Lt starts from them."""
    dims = cfg["teacher_dims"]
    spec = {"in_dim": dims[0], "width": cfg["width"], "depth": cfg["depth"], "out_dim": dims[-1],
            "steps": cfg["steps"], "lam": cfg["lam"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
    adapt_every = cfg.get("adapt_every", 10) if cfg["steps"] == "adaptive" else 0
    if adapt_every:
        spec["adapt_every"] = adapt_every
    schedule = {k: cfg[k] for k in ("adam_steps", "adam_lr", "continue_steps", "continue_lr", "lbfgs_steps",
                                    "lbfgs_history")}
    dtype = getattr(torch, cfg["dtype"])
    prev = None
    prev_name = None
    for i, lt in enumerate(cfg["lts"]):
        name = prefix + _lt_name(lt)
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
                if prev.steps == "adaptive" and float(prev.rho.max()) * float(lt) > prev.max_step:
                    prev.set_rho(_cap_steps(prev.rho.double().cpu(), prev.max_step / float(lt)))
                model = prev.with_leak(float(lt))
        start, start_name = model, prev_name

        def fn() -> dict[str, Any]:
            m = start.train()
            trace: dict[str, Any] = {"iteration": [], "loss": [], "data_loss": [], "adam_end": 0}
            if start_name is None:
                _leaky_adam(m, x, y, cfg["adam_steps"], cfg["adam_lr"], trace, adapt_every)
            else:
                _leaky_adam(m, x, y, cfg["continue_steps"], cfg["continue_lr"], trace, adapt_every)
            _leaky_lbfgs(m, x, y, cfg["lbfgs_steps"], cfg["lbfgs_history"], trace)
            atomic_save(m.state_dict(), ckpt)
            return {"checkpoint_sha256": file_sha256(ckpt), "leak": float(lt), "init": "default" if start_name is None else f"weights of {start_name}",
                    "trace": trace, "final": _leaky_final(m, x, y, xt, yt),
                    "rho": [float(v) for v in m.rho.double().cpu()]}

        out = runner.step(step, fn, deps=deps)
        model.eval()
        yield name, float(lt), model, out, deps
        prev, prev_name = model, name


def _leaky_analysis(runner: Runner, name: str, model, x, y, gamma0: float, deps: dict[str, Any]) -> dict[str, Any]:
    """Hamiltonian of one stage plus the centred singular values of its middle states."""
    def run() -> dict[str, Any]:
        r = hamiltonian_analysis.hamiltonian(model, x, y, gamma0)
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


SCHEMES = ("equidistant", "adaptive")


def parse_teachers(text: str) -> list[tuple[int, ...]]:
    """The teachers of ``compare_teachers``: ``"30-3-30,30-6-3-30"`` -> [(30, 3, 30), (30, 6, 3, 30)]
    (empty text: none); a UsageError for anything else."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            dims = tuple(int(v) for v in item.split("-"))
        except ValueError:
            dims = ()
        if len(dims) < 2 or min(dims) < 1:
            raise UsageError(f"compare_teachers: expected '-'-joined positive widths (at least two) in a comma list, "
                             f"e.g. '30-3-30,30-6-3-30', got {text!r}")
        out.append(dims)
    return out


def end_step_ratio(rho: list[float]) -> float:
    """Mean step of the first and last quarter of the layers over the mean step of the middle half
    (1 for equidistant steps; < 1: more layers, i.e. smaller steps, near the ends). NaN for L < 4."""
    n = len(rho)
    q = n // 4
    if q == 0:
        return math.nan
    ends = rho[:q] + rho[n - q:]
    mid = rho[q:n - q]
    return (sum(ends) / len(ends)) / (sum(mid) / len(mid))


def _step_comparison(runner: Runner, cfg: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Both step schemes (equidistant, adaptive) on every teacher of ``compare_teachers``, each by the
    study's Lt continuation (steps ``train_cmp_<teacher>_<scheme>_<Lt>``); the last stage's steps rho,
    end_step_ratio and losses per teacher and scheme."""
    dtype = getattr(torch, cfg["dtype"])
    out: dict[str, Any] = {"teachers": [], "schemes": list(SCHEMES), "lt": float(cfg["lts"][-1])}
    for dims in parse_teachers(cfg["compare_teachers"]):
        tname = "t" + "_".join(str(d) for d in dims)
        ds = teacher(dims, n=cfg["n"], seed=cfg["seed"], dtype=dtype)
        key = {"teacher": list(dims), "n": cfg["n"], "seed": cfg["seed"], "dtype": cfg["dtype"]}
        x, y = (t.to(device) for t in ds.tensors("train"))
        xt, yt = (t.to(device) for t in ds.tensors("test"))
        block: dict[str, Any] = {"dims": list(dims)}
        for scheme in SCHEMES:
            c = {**cfg, "teacher_dims": list(dims), "steps": scheme}
            last = None
            for _name, _lt, _model, res, _deps in _leaky_stages(runner, c, x, y, xt, yt, key, device,
                                                               prefix=f"cmp_{tname}_{scheme}_"):
                last = res
            rho = last["rho"]
            block[scheme] = {"rho": rho, "layer": list(range(1, len(rho) + 1)),
                             "position": [float(v) for v in torch.tensor(rho, dtype=torch.float64).cumsum(0)],
                             "end_step_ratio": end_step_ratio(rho),
                             # layers held at the cap rho_l * Lt = max_step (0.95) by the adaptive update
                             "capped_layers": sum(v * out["lt"] >= 0.95 - 1e-9 for v in rho), **last["final"]}
        out["teachers"].append(tname)
        out[tname] = block
    return out


def run_leaky(runner: Runner, cfg: dict[str, Any]) -> StudyOutput:
    """Continuation in Lt (see LEAKY_OPTIONS): stage 1 trains the first Lt from the default init
    with ``adam_steps`` Adam steps, every later Lt loads the previous stage's weights
    (:meth:`LeakyResNet.with_leak`) and trains ``continue_steps``; every stage ends with
    ``lbfgs_steps`` L-BFGS iterations. Then -(2/Lt) H, H across layers and middle-layer spectra."""
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
        # pyplot only when a figure is drawn: write_report has chosen the Agg backend by then
        import matplotlib.pyplot as plt

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
    if parse_teachers(cfg["compare_teachers"]):
        results["step_comparison"] = _step_comparison(runner, cfg, device)
        conditions = (f"width {cfg['width']}, L = {cfg['depth']}, lam = {cfg['lam']:g}, n = {cfg['n']}, continuation "
                      f"Lt = {[f'{v:g}' for v in cfg['lts']]}, adaptive update every {cfg['adapt_every']} Adam steps, "
                      f"seed {cfg['seed']}")
        figures.append(leaky_steps_figure(conditions))
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


def validate_leaky(cfg: dict[str, Any]) -> None:
    """leaky: teacher widths, width >= the teacher's input and output widths, the Lt schedule."""
    dims = tuple(cfg["teacher_dims"])
    if len(dims) < 2:
        raise UsageError(f"teacher_dims: expected at least two widths (d_in, d_out), got {list(dims)}")
    if max(dims[0], dims[-1]) > cfg["width"]:
        raise UsageError(f"width: expected >= the teacher's input and output widths {dims[0]}, {dims[-1]}, "
                         f"got {cfg['width']}")
    limit = memory_limit(cfg.get("device", "cpu"))
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
    if cfg["steps"] == "adaptive" or parse_teachers(cfg.get("compare_teachers", "")):
        # adaptive steps start equidistant and must be able to keep rho_l * Lt <= 0.95 (LeakyResNet's max_step)
        bad = [lt for lt in cfg["lts"] if lt > 0.95 * cfg["depth"]]
        if bad:
            raise UsageError(f"lts: expected every Lt <= 0.95 * depth = {0.95 * cfg['depth']:g} for adaptive steps, "
                             f"got {bad}")
    for dims_ in parse_teachers(cfg.get("compare_teachers", "")):
        if max(dims_[0], dims_[-1]) > cfg["width"]:
            raise UsageError(f"width: expected >= the input and output widths of every compared teacher "
                             f"{list(dims_)}, got {cfg['width']}")
    if len(set(cfg["lts"])) != len(cfg["lts"]):
        raise UsageError(f"lts: expected distinct values, got {cfg['lts']}")


STUDY = register(Study("leaky", "Leaky ResNets: -(2/Lt) H against Lt on the teacher",
                       "-(2/Lt) H approaches k* as Lt grows; middle layers have about k* large singular values",
                       LEAKY_OPTIONS, run_leaky, validate_leaky))
