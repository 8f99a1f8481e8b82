"""What the ``resgeom`` subcommands do (argument parsing lives in :mod:`resgeom_fast.cli`).

Every function raises :class:`~resgeom_fast.experiments.config.UsageError` for bad input (the
command prints its one-line message and exits with code 2) and returns the written
:class:`~resgeom_fast.experiments.report.Report` (``bench`` returns an exit code). The studies
themselves live in :mod:`resgeom_fast.experiments.studies` (one module each, found through its
registry); these functions resolve the configuration, open the report folder and run them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

from .common import data_key_parts, resolve_device
from .config import UsageError, int_flag, load_config_file, parse_sets, resolve_config
from .output import check_out, finish_study, open_runner, progress_log, write_study_report
from .report import Report
from .studies import analyze as analyze_study
from .studies import demo as demo_study
from .studies import get_study
from .studies._figures import stage_figures

__all__ = ["analyze", "bench", "check_out", "demo", "describe_options", "ratio_table", "run_study"]

# the names these helpers had before the report folder (output.py) and the analyze command
# (studies/analyze.py) got modules of their own; ``_analyze_steps`` is what :func:`analyze` calls
_log = progress_log
_int = int_flag
_study = get_study
_runner = open_runner
_write_report = write_study_report
_finish = finish_study
_analyze_steps = analyze_study.run_steps
_stage_figures = stage_figures
_load_model = analyze_study.load_model
_factory_key = analyze_study.factory_key
_load_checkpoint = analyze_study.load_checkpoint
_analyze_data = analyze_study.analyze_data
_check_model_takes = analyze_study.check_model_takes


def describe_options(study: str) -> str:
    """The options of ``study``, one per line: name, type, default, help, allowed values."""
    st = get_study(study)
    rows = [f"{st.name}: {st.title}", f"expected: {st.expected}", "options (--set key=value):"]
    for o in st.options:
        extra = f" (one of {', '.join(o.choices)})" if o.choices else ""
        rows.append(f"  {o.name:16s} {o.type:7s} default {json.dumps(o.default):24s} {o.help}{extra}")
    return "\n".join(rows)


def demo(*, out: str = "reports/demo", size: str = "default", device: str = "cpu", seed: Any = 0,
         fresh: bool = False, progress: bool = True, deterministic: bool = False) -> Report:
    """Train an FCResNet and its plain twin on digits, run every analysis, write the report.

    ``deterministic``: fix every method choice of the analyses (``config["deterministic"]``,
    part of the configuration and its hash)."""
    cfg = demo_study.demo_config(size, int_flag("--seed", seed, 0), device)
    cfg["deterministic"] = bool(deterministic)
    resolve_device(device)
    check_out(out)
    with open_runner(out, cfg, study="demo", fresh=fresh, progress=progress) as runner:
        res = demo_study.run_demo(runner, cfg)
        return finish_study(runner, "resgeom demo: a ResNet and its plain twin on digits", res, cfg,
                            "nets with skips show residual alignment (RA1-RA4), the net without skips does not; "
                            "collapse progresses with depth; the plain net has more degenerate Hessian mass and dead "
                            "units")


def run_study(study: str, *, config_path: Optional[str] = None, out: Optional[str] = None,
              sets: Sequence[str] = (), fresh: bool = False, progress: bool = True,
              deterministic: bool = False) -> Report:
    """Run one study of :data:`~resgeom_fast.experiments.studies.STUDIES` and write its report.

    ``deterministic=True`` sets ``config["deterministic"]`` (as ``--set deterministic=yes``
    would); False keeps the value of the config file / ``--set`` (default False)."""
    st = get_study(study)
    file_values = load_config_file(config_path) if config_path else None
    cfg = resolve_config(st.options, study=study, file_values=file_values, sets=parse_sets(sets))
    cfg["deterministic"] = bool(deterministic or cfg.get("deterministic", False))
    if "device" in cfg:
        resolve_device(cfg["device"])
    out = f"reports/{study}" if out is None else out
    check_out(out)
    with open_runner(out, cfg, study=study, fresh=fresh, progress=progress,
                     key_parts=data_key_parts(cfg.get("dataset"))) as runner:
        res = st.run(runner, cfg)
        return finish_study(runner, f"resgeom run {study}: {st.title}", res, cfg, st.expected)


def analyze(*, model: str, checkpoint: Optional[str], data: str, num_classes: Any = 10, samples: Any = 8,
            batch: Any = 32, k: Any = None, power_iters: Any = "auto", oversample: Any = 10, probes: Any = 4,
            steps: Any = 30, trace_probes: Any = 12, analyses: str = analyze_study.DEFAULT_ANALYSES,
            device: str = "cpu", seed: Any = 0, out: str = "reports/analyze", fresh: bool = False,
            progress: bool = True, params: Optional[str] = None, deterministic: bool = False, image_size: Any = None,
            normalize: Optional[str] = None, blocks: Optional[str] = None, loss: str = "ce",
            eigs: Any = 2) -> Report:
    """The analyses of ``analyses`` (any of alignment, hessian, collapse, singularities,
    expansion, or "all"; default "alignment,hessian") of a user's model
    (:mod:`~resgeom_fast.experiments.studies.analyze`: ``prepare``, then ``run_steps``).

    ``samples``: inputs of alignment, collapse, singularities and expansion; ``batch``
    (``--batch-size`` / ``--batch``): samples of the Hessian's loss.
    ``params``: comma list of parameter or module names spanning the Hessian (None: all
    parameters; e.g. "layer4,fc" restricts it to a diagonal block, much cheaper on a CPU).
    ``loss``: the Hessian's loss, "ce", "mse" (against one-hot targets) or "nll" (the model
    outputs log-probabilities); ``eigs``: extreme Hessian eigenvalues (>= 2).
    ``blocks``: residual blocks for alignment, collapse and expansion (indices, ranges A-B, module
    names; :func:`~resgeom_fast.experiments.studies.analyze.parse_blocks`).
    ``power_iters``: "auto" (default: the randomized SVD iterates until its error bound meets
    the analysis' tolerance) or a fixed count.
    ``deterministic``: fix every method choice (``config["deterministic"]``, passed to
    residual_alignment and hessian_spectrum).
    ``image_size``, ``normalize``: the transform of ``--data imagefolder:PATH`` (see
    :func:`~resgeom_fast.experiments.studies.analyze.prepare`).

    Every step is keyed on the configuration it depends on
    (:func:`~resgeom_fast.experiments.studies.analyze.step_deps`) plus the sha256 of the
    ``--checkpoint`` file's contents, the model code (torchvision's version, or the sha256 of the
    factory's source and of its module file) and the versions of resgeom_fast and torch
    (:class:`Runner`'s ``key_parts``, also written to results.json under ``provenance``).
    """
    setup = analyze_study.prepare(model=model, checkpoint=checkpoint, data=data, num_classes=num_classes,
                                  samples=samples, batch=batch, k=k, power_iters=power_iters, oversample=oversample,
                                  probes=probes, steps=steps, trace_probes=trace_probes, analyses=analyses,
                                  device=device, seed=seed, out=out, params=params, deterministic=deterministic,
                                  image_size=image_size, normalize=normalize, blocks=blocks, loss=loss, eigs=eigs)
    with open_runner(out, setup.config, study="analyze", fresh=fresh, progress=progress,
                     key_parts=setup.key_parts) as runner:
        return _analyze_steps(runner, setup.net, setup.x, setup.y, setup.config, model, data, progress)


# ------------------------------------------------------------------------------------- bench
BENCH_NEEDS = ("resgeom bench runs the benchmark suite of a source checkout (its benchmarks/ folder, not part of "
               "the installed package) with pytest-benchmark: git clone the repository, pip install "
               "'resgeom_fast[test]' (pytest, pytest-benchmark, scipy), then run it inside the checkout or pass "
               "--benchmarks CHECKOUT/benchmarks")
# the modules the benchmark files and the pytest run import (the ``test`` extra installs them)
_BENCH_MODULES = (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark"), ("scipy", "scipy"))


def _repo_benchmarks(path: Optional[str]) -> str:
    """The benchmarks folder: ``path``, else the source checkout's next to the package (an
    editable install), else ``./benchmarks`` (a checkout as the current folder); a UsageError
    saying what ``resgeom bench`` needs (:data:`BENCH_NEEDS`) when there is none."""
    if path is None:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        tried = [os.path.join(here, "benchmarks"), os.path.abspath("benchmarks")]
        found = [p for p in tried if os.path.isfile(os.path.join(p, "bench_ops.py"))]
        if not found:
            raise UsageError(f"bench: benchmarks folder not found at {tried[0]!r} nor {tried[1]!r}; {BENCH_NEEDS}")
        return found[0]
    if not os.path.isdir(path):
        raise UsageError(f"bench: benchmarks folder not found at {path!r}; {BENCH_NEEDS}")
    return path


def _check_bench_modules() -> None:
    """A UsageError naming the missing modules of the ``test`` extra (before pytest runs)."""
    missing = [pip for mod, pip in _BENCH_MODULES if importlib.util.find_spec(mod) is None]
    if missing:
        raise UsageError(f"bench: {', '.join(missing)} not installed (pip install 'resgeom_fast[test]'); {BENCH_NEEDS}")


def ratio_table(json_path: str, benchmarks_dir: Optional[str] = None) -> str:
    """The Markdown ratio table of a pytest-benchmark JSON (benchmarks/scripts/ratios.py, imported by path)."""
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

    ``quick`` runs only bench_ops.py (the compiled ops against their references). It needs a
    source checkout's benchmarks/ folder and the ``test`` extra (:data:`BENCH_NEEDS`): a
    UsageError saying so otherwise.
    """
    bdir = _repo_benchmarks(benchmarks_dir)
    _check_bench_modules()
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
