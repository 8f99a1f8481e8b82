"""The GPU validation command's dry run (benchmarks/gpu/validate.py --dry-run) on the CPU.

Runs every stage's plumbing with tiny sizes into tmp_path and checks the folder: the fixed file
layout (at most 8 files: the device tool's limit), summary.json's keys, every stage present with
a status, the benchmark table with time and accuracy columns and finite, small accuracies. Also
checks that a stage overrunning its budget is killed and recorded as timed out.
"""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "validate.py"
STAGES = ["env", "build", "tests", "sanitizer", "opcheck", "bench"]
STATUSES = {"passed", "failed", "timed out", "skipped", "error"}
# accuracy bounds of the tiny float32 rows (the metrics of benchmarks/gpu/bench.py): products to
# float64 within float32 rounding; lambda_max of a 6-step SLQ within 5% of a float64 Lanczos of
# other probes; randomized-SVD residuals of 2 power iterations on a flat spectrum (~0.2) below 1
BOUNDS = {"hvp": 1e-4, "jac_matmat": 1e-4, "slq": 0.05, "jac_svd": 1.0}


def _validate_module():
    spec = importlib.util.spec_from_file_location("gpu_validate", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    pytest.importorskip("torchvision", reason="the GPU benchmarks use torchvision's ResNets")
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    return out, proc, time.monotonic() - t0


def test_dry_run_exits_cleanly_and_writes_the_layout(dry_run):
    out, proc, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(_validate_module().OUTPUT_FILES)
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())  # what comes back from $OUT


def test_summary_json(dry_run):
    out, _, _ = dry_run
    s = json.loads((out / "summary.json").read_text())
    for key in ("dry_run", "date", "git_commit", "source_sha256", "device", "torch", "cuda", "env", "budget_s",
                "wall_s", "stages", "benchmarks", "run_command"):
        assert key in s, key
    assert s["dry_run"] is True and s["device"] == "cpu (dry run)"
    assert s["torch"] and len(s["source_sha256"]) == 64
    assert "validate.py --out $OUT --budget 540" in s["run_command"]
    assert [st["name"] for st in s["stages"]] == STAGES
    by = {st["name"]: st for st in s["stages"]}
    for st in s["stages"]:
        assert st["status"] in STATUSES and isinstance(st["seconds"], (int, float))
        if st["status"] == "skipped":
            assert st["reason"], st
        if st["output"]:
            assert (out / st["output"]).is_file()
    assert by["env"]["status"] == "passed"
    assert by["build"]["status"] == "skipped" and "dry run" in by["build"]["reason"]
    assert by["sanitizer"]["status"] == "skipped" and "passed" in by["sanitizer"]["reason"]
    assert by["tests"]["status"] == "passed" and by["tests"]["counts"]["passed"] > 0
    assert by["tests"]["counts"]["failures"] == 0 and by["tests"]["counts"]["errors"] == 0
    assert by["opcheck"]["status"] == "passed" and "opcheck" in (out / "opcheck.log").read_text()
    assert by["bench"]["status"] == "passed"


def test_benchmark_table_has_time_and_finite_small_accuracy(dry_run):
    out, _, _ = dry_run
    rows = json.loads((out / "summary.json").read_text())["benchmarks"]
    benches = {r["bench"] for r in rows}
    assert benches == {"hvp_resnet18", "hvp_resnet50", "slq_resnet18", "jac_matmat_resnet50", "jac_svd_resnet50"}
    ok = [r for r in rows if r["status"] == "ok"]
    for b in benches:  # ours and a plain torch.func reference for every benchmark
        impls = {r["impl"] for r in ok if r["bench"] == b}
        assert "ours" in impls and any(i.startswith("torch_func") for i in impls), (b, impls)
    for r in ok:
        assert r["seconds"] > 0 and math.isfinite(r["seconds"]), r
        assert r["accuracy"] is not None and math.isfinite(r["accuracy"]), r
        assert r["accuracy_metric"], r
        bound = next(v for k, v in BOUNDS.items() if r["bench"].startswith(k + "_"))
        assert 0 <= r["accuracy"] <= bound, r
    for r in rows:
        if r["impl"] in ("pyhessian", "curvlinops"):
            assert r["status"] in ("ok", "not installed", "not run", "error") and r["note"], r
    md = (out / "summary.md").read_text()
    assert "| benchmark | impl | size | status | seconds | accuracy | metric | note |" in md
    assert "| stage | status | seconds |" in md
    assert sum(line.startswith("| hvp_resnet18 | ours |") for line in md.splitlines()) == 1


def test_dry_run_is_quick(dry_run):
    _, _, seconds = dry_run
    assert seconds < 240  # ~1 minute alone; the bound allows a loaded machine


def test_an_overrunning_stage_is_killed_and_recorded(tmp_path):
    mod = _validate_module()
    t0 = time.monotonic()
    status, secs, rc = mod.run_stage([sys.executable, "-c", "import time; print('started', flush=True); "
                                      "time.sleep(60)"], tmp_path / "x.log", 1.0)
    assert status == "timed out" and rc is None and time.monotonic() - t0 < 30
    assert "killed after" in (tmp_path / "x.log").read_text()
    assert mod.run_stage([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "y.log", 30)[::2] == ("failed", 3)
