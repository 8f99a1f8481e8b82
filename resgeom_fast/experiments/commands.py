"""What the ``resgeom`` subcommands do (argument parsing lives in :mod:`resgeom_fast.cli`).

Every function raises :class:`~resgeom_fast.experiments.config.UsageError` for bad input (the
command prints its one-line message and exits with code 2) and returns the written
:class:`~resgeom_fast.experiments.report.Report` (``bench`` returns an exit code).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
from typing import Any, Mapping, Optional, Sequence

from .config import UsageError, load_config_file, parse_sets, resolve_config
from .report import FigureSpec, Report, get_path, write_report
from .runner import Runner

__all__ = ["analyze", "bench", "demo", "describe_options", "run_study"]


def _log(progress: bool):
    return sys.stderr if progress else None


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        v = int(str(value))
    except ValueError:
        raise UsageError(f"{name}: expected an int >= {minimum}, got {value!r}") from None
    if v < minimum:
        raise UsageError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return v


def _study(name: str):
    from .studies import STUDIES

    if name not in STUDIES:
        raise UsageError(f"unknown study {name!r}; allowed: {', '.join(STUDIES)}")
    return STUDIES[name]


def describe_options(study: str) -> str:
    """The options of ``study``, one per line: name, type, default, help, allowed values."""
    st = _study(study)
    rows = [f"{st.name}: {st.title}", f"expected: {st.expected}", "options (--set key=value):"]
    for o in st.options:
        extra = f" (one of {', '.join(o.choices)})" if o.choices else ""
        rows.append(f"  {o.name:16s} {o.type:7s} default {json.dumps(o.default):24s} {o.help}{extra}")
    return "\n".join(rows)


def check_out(out: Any) -> str:
    """``out`` if it can be a report folder: a non-empty path that is a folder or can be created
    as one, writable; else a :class:`UsageError` naming ``--out``. (``--out ""`` is refused: pass
    ``--out .`` for the current folder.)"""
    if not isinstance(out, str) or not out.strip():
        raise UsageError(f"--out: expected a folder path, got {out!r} (use --out . for the current folder)")
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out: expected a folder, got a file: {out!r}")
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UsageError(f"--out: expected a folder, but {probe!r} above {out!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out: cannot write to {probe!r} (permission denied); choose another --out")
    return out


def _runner(out: str, config: Mapping[str, Any], *, study: str, fresh: bool, progress: bool,
            key_parts: Optional[Mapping[str, Any]] = None) -> Runner:
    """A :class:`Runner` on ``--out`` (checked); file-system errors become one-line UsageErrors."""
    check_out(out)
    try:
        return Runner(out, config, study=study, fresh=fresh, progress=progress, log=_log(progress),
                      key_parts=key_parts)
    except OSError as err:
        raise UsageError(f"--out: cannot use {out!r} as the report folder ({type(err).__name__}: "
                         f"{err.strerror or err}{': ' + str(err.filename) if err.filename else ''})") from None


def _write_report(runner: Runner, title: str, results: Any, figures: Sequence[FigureSpec], **kw: Any) -> Report:
    """:func:`write_report` into the runner's folder; every file it writes is recorded in the
    manifest first (so ``--fresh`` may delete them later, and nothing else)."""
    runner.record_written(*[os.path.join(runner.out, f) for f in ("results.json", "report.md")],
                          *[os.path.join(runner.out, "figures", f"{spec.name}.png") for spec in figures])
    rep = write_report(runner.out, title, results, figures, progress=runner.progress, **kw)
    runner.record_written(rep.results_path, rep.report_path, *rep.figures)
    return rep


def _finish(runner: Runner, title: str, out_obj, config: dict[str, Any], expected: str = "") -> Report:
    intro = out_obj.intro + (f"\n\nExpected (SCIENCE.md): {expected}." if expected else "")
    return _write_report(runner, title, out_obj.results, out_obj.figures, intro=intro, summaries=out_obj.summaries,
                         config=config)


def demo(*, out: str = "reports/demo", size: str = "default", device: str = "cpu", seed: Any = 0,
         fresh: bool = False, progress: bool = True, deterministic: bool = False) -> Report:
    """Train an FCResNet and its plain twin on digits, run every analysis, write the report.

    ``deterministic``: fix every method choice of the analyses (``config["deterministic"]``,
    part of the configuration and its hash)."""
    from .studies import demo_config, run_demo

    cfg = demo_config(size, _int("--seed", seed, 0), device)
    cfg["deterministic"] = bool(deterministic)
    from .common import resolve_device

    resolve_device(device)
    check_out(out)
    with _runner(out, cfg, study="demo", fresh=fresh, progress=progress) as runner:
        res = run_demo(runner, cfg)
        return _finish(runner, "resgeom demo: a ResNet and its plain twin on digits", res, cfg,
                       "nets with skips show residual alignment (RA1-RA4), the net without skips does not; collapse "
                       "progresses with depth; the plain net has more degenerate Hessian mass and dead units")


def run_study(study: str, *, config_path: Optional[str] = None, out: Optional[str] = None,
              sets: Sequence[str] = (), fresh: bool = False, progress: bool = True,
              deterministic: bool = False) -> Report:
    """Run one study of :data:`~resgeom_fast.experiments.studies.STUDIES` and write its report.

    ``deterministic=True`` sets ``config["deterministic"]`` (as ``--set deterministic=yes``
    would); False keeps the value of the config file / ``--set`` (default False)."""
    st = _study(study)
    file_values = load_config_file(config_path) if config_path else None
    cfg = resolve_config(st.options, study=study, file_values=file_values, sets=parse_sets(sets))
    cfg["deterministic"] = bool(deterministic or cfg.get("deterministic", False))
    if "device" in cfg:
        from .common import resolve_device

        resolve_device(cfg["device"])
    out = f"reports/{study}" if out is None else out
    check_out(out)
    from .common import data_key_parts

    with _runner(out, cfg, study=study, fresh=fresh, progress=progress,
                 key_parts=data_key_parts(cfg.get("dataset"))) as runner:
        res = st.run(runner, cfg)
        return _finish(runner, f"resgeom run {study}: {st.title}", res, cfg, st.expected)


# ------------------------------------------------------------------------------------- analyze
def _load_model(spec: str, num_classes: int):
    """(model, key parts): what the model's code is keyed on (torchvision's version, or the sha256
    of the factory's source and of its module file)."""
    import torch

    if spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1]
        try:
            import torchvision.models as tvm
        except ImportError:
            raise UsageError("--model torchvision:...: torchvision is not installed (pip install torchvision)") from None
        allowed = sorted(n for n in tvm.list_models(module=tvm) if n.startswith(("resnet", "wide_resnet", "resnext")))
        if name not in allowed:
            raise UsageError(f"--model: unknown torchvision model {name!r}; allowed: {', '.join(allowed)}")
        import torchvision

        return tvm.get_model(name, weights=None, num_classes=num_classes), {"torchvision": torchvision.__version__}
    if spec.startswith("module:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise UsageError(f"--model: expected module:package.module:factory, got {spec!r}")
        try:
            mod = importlib.import_module(parts[1])
        except ImportError as err:
            raise UsageError(f"--model: cannot import module {parts[1]!r} ({err})") from None
        factory = getattr(mod, parts[2], None)
        if not callable(factory):
            raise UsageError(f"--model: module {parts[1]!r} has no callable {parts[2]!r}")
        model = factory()
        if not isinstance(model, torch.nn.Module):
            raise UsageError(f"--model: {parts[1]}.{parts[2]}() returned {type(model).__name__}, not an nn.Module")
        return model, _factory_key(mod, factory)
    raise UsageError(f"--model: expected torchvision:NAME or module:package.module:factory, got {spec!r}")


def _factory_key(mod: Any, factory: Any) -> dict[str, str]:
    """sha256 of ``factory``'s source and of its module's file: a changed factory (or a changed
    helper in the same file) changes the key of every analyze step. Code in other files the
    factory imports is not covered (documented; use --fresh after changing it)."""
    from resgeom_fast.train.checkpoint import file_sha256

    try:
        src = hashlib.sha256(inspect.getsource(factory).encode()).hexdigest()
    except (OSError, TypeError):
        src = "unavailable"
    path = getattr(mod, "__file__", None)
    return {"factory source sha256": src,
            "factory module sha256": file_sha256(path) if path and os.path.isfile(path) else "unavailable"}


def _load_checkpoint(model, path: str) -> None:
    import torch

    if not os.path.isfile(path):
        raise UsageError(f"--checkpoint: file not found: {path!r}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is bad input
        raise UsageError(f"--checkpoint: cannot read {path!r} ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    state = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise UsageError(f"--checkpoint: {path!r} holds no state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"--checkpoint: {path!r} does not match the model ({str(err).splitlines()[0]})") from None


def _analyze_data(spec: str, n: int, num_classes: int, seed: int):
    """(x, y) tensors [n, ...] for analyze."""
    import torch

    if spec == "random-cifar":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)
    from .common import load_data

    if spec == "digits" or spec.startswith("torchvision:"):
        ds = load_data(spec, image=True, n_train=n, n_test=1, seed=seed)
        return ds.x_train[:n], ds.y_train[:n]
    raise UsageError(f"--data: expected digits, random-cifar or torchvision:NAME:ROOT, got {spec!r}")


def analyze(*, model: str, checkpoint: Optional[str], data: str, num_classes: Any = 10, samples: Any = 8,
            batch: Any = 32, k: Any = None, power_iters: Any = "auto", oversample: Any = 10, probes: Any = 4,
            steps: Any = 30, trace_probes: Any = 12, analyses: str = "alignment,hessian", device: str = "cpu",
            seed: Any = 0, out: str = "reports/analyze", fresh: bool = False, progress: bool = True,
            params: Optional[str] = None, deterministic: bool = False) -> Report:
    """Residual alignment per stage and the Hessian spectrum of a user's model.

    ``params``: comma list of parameter or module names spanning the Hessian (None: all
    parameters; e.g. "layer4,fc" restricts it to a diagonal block, much cheaper on a CPU).
    ``power_iters``: "auto" (default: the randomized SVD iterates until its error bound meets
    the analysis' tolerance) or a fixed count.
    ``deterministic``: fix every method choice (``config["deterministic"]``, passed to
    residual_alignment and hessian_spectrum).

    Every step is keyed on the configuration plus the sha256 of the ``--checkpoint`` file's
    contents, the model code (torchvision's version, or the sha256 of the factory's source and of
    its module file) and the versions of resgeom_fast and torch (:class:`Runner`'s ``key_parts``,
    also written to results.json under ``provenance``).
    """
    from .common import resolve_device

    C = _int("--num-classes", num_classes, 2)
    n_align, n_hess = _int("--samples", samples, 1), _int("--batch", batch, 1)
    kk = None if k is None else _int("--k", k, 1)
    try:
        q = "auto" if str(power_iters).strip().lower() == "auto" else _int("--power-iters", power_iters, 0)
    except UsageError:
        raise UsageError(f"--power-iters: expected auto or an int >= 0, got {power_iters!r}") from None
    p = _int("--oversample", oversample, 0)
    nv, m, tp = _int("--probes", probes, 1), _int("--steps", steps, 2), _int("--trace-probes", trace_probes, 3)
    sd = _int("--seed", seed, 0)
    which = [a.strip() for a in analyses.split(",") if a.strip()]
    bad = [a for a in which if a not in ("alignment", "hessian")]
    if bad or not which:
        raise UsageError(f"--analyses: unknown analysis {bad}; allowed: alignment, hessian")
    dev = resolve_device(device)
    check_out(out)
    net, key_parts = _load_model(model, C)
    if checkpoint:
        from resgeom_fast.train.checkpoint import file_sha256

        if os.path.isfile(checkpoint):  # hashed first: the key describes the bytes loaded next
            key_parts = {"checkpoint sha256": file_sha256(checkpoint), **key_parts}
        _load_checkpoint(net, checkpoint)
    net = net.to(dev).eval()
    chosen = None
    if params:
        chosen = [t.strip() for t in params.split(",") if t.strip()]
        names = set(dict(net.named_parameters())) | set(dict(net.named_modules()))
        unknown = [t for t in chosen if t not in names]
        if unknown:
            top = [n for n, _ in net.named_children()]
            raise UsageError(f"--params: no parameter or module named {unknown}; top-level modules: {', '.join(top)}")
    x, y = _analyze_data(data, max(n_align, n_hess), C, sd)
    if x.dim() == 2:
        raise UsageError("--data: analyze expects image data [N, C, H, W] for this model")
    x, y = x.to(dev), y.to(dev)
    _check_model_takes(net, model, x, data, C)
    cfg = {"model": model, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None, "data": data,
           "num_classes": C, "samples": n_align, "batch": n_hess, "k": kk, "power_iters": q, "oversample": p,
           "probes": nv, "steps": m, "trace_probes": tp, "analyses": which, "device": device, "seed": sd, "params": chosen,
           "deterministic": bool(deterministic)}
    from .common import data_key_parts

    key_parts = {**key_parts, **data_key_parts(data)}
    with _runner(out, cfg, study="analyze", fresh=fresh, progress=progress, key_parts=key_parts) as runner:
        return _analyze_steps(runner, net, x, y, cfg, model, data, progress)


def _check_model_takes(net: Any, spec: str, x: Any, data: str, num_classes: int) -> None:
    """One forward pass of one input: the model must take ``--data``'s inputs and return [1, C] logits."""
    import torch

    try:
        with torch.no_grad():
            out = net(x[:1])
    except Exception as err:  # noqa: BLE001 - any failure here is a model / data mismatch
        first = (str(err).strip().splitlines() or [""])[0][:300]
        hint = ""
        if "channels" in first and x.dim() == 4:
            hint = (f"; --data {data} has {x.shape[1]}-channel {x.shape[2]}x{x.shape[3]} images"
                    + (", torchvision ResNets expect 3 channels: use --data random-cifar or torchvision:cifar10:ROOT, "
                       "or a module:... model built for 1 channel" if spec.startswith("torchvision:") else ""))
        raise UsageError(f"--model {spec}: cannot take --data {data} inputs of shape {list(x.shape[1:])} "
                         f"({type(err).__name__}: {first}){hint}") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != num_classes:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--num-classes: expected the model's output [N, {num_classes}] logits (--num-classes "
                         f"{num_classes}), got {got}")


def _analyze_steps(runner: Runner, net: Any, x: Any, y: Any, cfg: dict[str, Any], model: str, data: str,
                   progress: bool) -> Report:
    import torch.nn.functional as F

    n_align, n_hess, kk, p, q = cfg["samples"], cfg["batch"], cfg["k"], cfg["oversample"], cfg["power_iters"]
    nv, m, tp, sd, C, chosen, which = (cfg["probes"], cfg["steps"], cfg["trace_probes"], cfg["seed"],
                                       cfg["num_classes"], cfg["params"], cfg["analyses"])
    results: dict[str, Any] = {"study": "analyze", "config": cfg, "provenance": dict(runner.key_parts),
                               "models": {"model": {}}}
    summaries: dict[str, dict[str, dict[str, float]]] = {"model": {}}
    figures: list[FigureSpec] = []
    if "alignment" in which:
        from resgeom_fast.analysis.alignment import residual_alignment

        def run_align() -> dict[str, Any]:
            r = residual_alignment(net, x[:n_align], kk, y[:n_align], per_stage=True, num_classes=C,
                                   oversample=p, power_iters=q, seed=sd, deterministic=cfg["deterministic"])
            return {"result": r.to_dict(), "summary": r.summary()}

        al = runner.step("alignment", run_align)
        results["models"]["model"]["alignment"] = al
        summaries["model"]["alignment"] = al["summary"]
        figures += _stage_figures(al)
    if "hessian" in which:
        from resgeom_fast.analysis.spectrum import hessian_spectrum

        def run_hess() -> dict[str, Any]:
            sel = dict(net.named_parameters())
            dim = sum(t.numel() for n, t in sel.items() if t.requires_grad and (
                chosen is None or any(n == c or n.startswith(c + ".") for c in chosen)))
            r = hessian_spectrum(net, F.cross_entropy, (x[:n_hess], y[:n_hess]), params=chosen, k=2, probes=nv, steps=min(m, dim),
                                 trace_probes=tp, seed=sd, progress=progress, deterministic=cfg["deterministic"])
            return {"result": r.to_dict(), "summary": r.summary()}

        hs = runner.step("hessian", run_hess)
        results["models"]["model"]["spectrum"] = hs
        summaries["model"]["spectrum"] = hs["summary"]
        from .studies import _density_figure

        figures.append(_density_figure(["model"]))
    return _write_report(runner, f"resgeom analyze: {model}", results, figures,
                         intro=f"Residual alignment per stage and Hessian spectrum of {model} on {data}.",
                         summaries=summaries, config=cfg)


def _stage_figures(al: dict[str, Any]) -> list[FigureSpec]:
    from .figures import lines, new_figure, spectra_per_block

    base = "models.model.alignment.result"
    n_st = len(al["result"]["stages"])

    def sv(r: dict) -> Any:
        fig, axes = new_figure(n_st)
        for s, ax in enumerate(axes):
            spectra_per_block(ax, r, f"{base}.stages.{s}.ra3.singular_values_mean",
                              f"stage {s}: singular values of J_l", get_path(r, f"{base}.settings.num_classes"))
        fig.tight_layout()
        return fig

    def sig(r: dict) -> Any:
        fig, axes = new_figure(1)
        lines(axes[0], r, [(f"stage {s}", f"{base}.stages.{s}.block_indices", f"{base}.stages.{s}.ra4.sigma1_mean")
                           for s in range(n_st)], title="sigma_1(J_l) per block", xlabel="block index",
              ylabel="sigma_1", logy=True)
        fig.tight_layout()
        return fig

    def read(r: dict) -> str:
        from .studies import alignment_stage_reading

        return alignment_stage_reading(get_path(r, base) or {})

    return [FigureSpec("ra_singular_values", "Singular values of the residual Jacobians, per stage", sv, read),
            FigureSpec("ra_sigma1", "sigma_1 per block", sig, read)]


# ------------------------------------------------------------------------------------- bench
def _repo_benchmarks(path: Optional[str]) -> str:
    if path is None:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        path = os.path.join(here, "benchmarks")
    if not os.path.isdir(path):
        raise UsageError(f"bench: benchmarks folder not found at {path!r} (run from a source checkout or pass --benchmarks)")
    return path


def ratio_table(json_path: str, benchmarks_dir: Optional[str] = None) -> str:
    """The Markdown ratio table of a pytest-benchmark JSON (benchmarks/scripts/ratios.py, imported by path)."""
    import contextlib
    import io

    script = os.path.join(_repo_benchmarks(benchmarks_dir), "scripts", "ratios.py")
    if not os.path.isfile(script):
        raise UsageError(f"bench: {script!r} not found")
    spec = importlib.util.spec_from_file_location("_resgeom_bench_ratios", script)
    if spec is None or spec.loader is None:
        raise UsageError(f"bench: cannot load {script!r}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        mod.main(json_path)
    return buf.getvalue()


def bench(*, quick: bool = False, json_path: Optional[str] = None, benchmarks_dir: Optional[str] = None) -> int:
    """Run ``pytest BENCH --benchmark-only --benchmark-json=FILE`` and print the ratio table.

    ``quick`` runs only bench_ops.py (the compiled ops against their references).
    """
    bdir = _repo_benchmarks(benchmarks_dir)
    json_path = json_path or os.path.join(bdir, "results", "latest.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    target = os.path.join(bdir, "bench_ops.py") if quick else bdir
    cmd = [sys.executable, "-m", "pytest", target, "-q", "-p", "no:cacheprovider", "--benchmark-only",
           f"--benchmark-json={json_path}"]
    print("running: " + " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd, cwd=os.path.dirname(bdir))
    if not os.path.isfile(json_path):
        raise UsageError(f"bench: pytest exited with {rc} and wrote no {json_path!r}")
    print(ratio_table(json_path, bdir))
    return 0 if rc == 0 else rc
