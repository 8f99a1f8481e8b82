"""One prepared GPU validation run: build, CUDA tests, compute-sanitizer, opcheck, GPU benchmarks.

On a lent GPU machine (the device tool's ``run``, repository root, 9 minutes in all), one line:

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu/validate.py --out $OUT --budget 540

(``make gpu-check`` runs the same with ``--out`` defaulting to $OUT if set, else
benchmarks/results/gpu_<date>.) On the CPU, ``--dry-run`` does every stage's plumbing with tiny
sizes on device cpu in about a minute (``tests/misc/test_gpu_check_dryrun.py`` runs it in
``make test``). No GPU run has happened yet.

Stages, each a subprocess with its own time budget (seconds, ``STAGES``; a stage also gets the
time earlier stages left unused, minus what the later stages are owed). A stage that overruns is
killed and recorded as "timed out"; the next stage runs. Statuses: passed, failed, timed out,
skipped (with the reason), error.

1. ``env``: device name, torch / CUDA / cuDNN / torchvision versions, Python, nvcc (a subprocess:
   a broken CUDA install cannot stop the run).
2. ``build``: ``python3 setup.py build_ext --inplace`` with TORCH_CUDA_ARCH_LIST (default 9.0),
   CUDA_HOME from tools/cuda_home.py and MAX_JOBS = --jobs (default the CPU count), unless
   resgeom_fast/_C<EXT_SUFFIX> is newer than every source and (when a toolkit is found) holds
   CUDA kernels. Skipped in the dry run (the installed extension is used).
3. ``tests``: ``pytest tests/ops tests/linalg tests/operators -m "not slow"`` (the cuda-parametrised
   cases run when a GPU is visible) in two runs, ``-k cuda`` first (kept if the rest overruns),
   then ``-k "not cuda"`` (pytest-xdist workers where installed), one tests.log and one merged
   junit tests.xml; the dry run runs one small test file the same way.
4. ``sanitizer``: ``compute-sanitizer --tool memcheck`` then ``--tool racecheck`` on
   ``benchmarks/gpu/sanitize_ops.py`` (each op called once on CUDA and checked against its
   reference; PYTORCH_NO_CUDA_MEMORY_CACHING=1 so that every tensor is its own allocation), when
   compute-sanitizer is found on PATH or in the toolkit; else skipped with the reason. The dry
   run runs the script plainly on the CPU and records the stage as skipped.
5. ``opcheck``: ``pytest tests/ops -k opcheck`` (torch.library.opcheck of every op, CUDA included
   when a GPU is visible).
6. ``bench``: ``benchmarks/gpu/bench.py`` (its docstring: resnet18 / resnet50 Hessian products,
   SLQ on resnet18, resnet50 block residual Jacobians at 224x224 with randomized_svd; ours vs
   plain torch.func; PyHessian / curvlinops where importable), each row's accuracy beside its time.

Output folder (at most 8 files, the device tool's limit on what comes back from $OUT):
summary.json, summary.md, build.log, tests.log, tests.xml, sanitizer.log, opcheck.log, bench.log.
summary.json: {"schema", "dry_run", "date", "git_commit", "source_sha256", "device", "env",
"budget_s", "wall_s", "stages": [{"name", "status", "seconds", "timeout_s", "reason", "output",
"command", ...}], "benchmarks": [rows of bench.py]}.

Standard library only (the stages' subprocesses import torch and resgeom_fast).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]
RUN_COMMAND = "PYTHONUNBUFFERED=1 python3 benchmarks/gpu/validate.py --out $OUT --budget 540"
STAGES: dict[str, int] = {"env": 30, "build": 180, "tests": 115, "sanitizer": 75, "opcheck": 25, "bench": 115}
DRY_STAGES: dict[str, int] = {"env": 30, "build": 5, "tests": 60, "sanitizer": 40, "opcheck": 60, "bench": 90}
OUTPUT_FILES = ("summary.json", "summary.md", "build.log", "tests.log", "tests.xml", "sanitizer.log", "opcheck.log",
                "bench.log")
SOURCES = ("csrc", "setup.py", "pyproject.toml", "tools/cuda_home.py", "resgeom_fast/_version.py")
ENV_SCRIPT = r"""
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "cudnn": torch.backends.cudnn.version()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(device_name=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
try:
    import torchvision
    info["torchvision"] = torchvision.__version__
except ImportError as exc:
    info["torchvision"] = f"not installed ({exc})"
print(json.dumps(info))
"""


# -- helpers ------------------------------------------------------------------------------------
def run_stage(cmd: list[str], log: Path, timeout: float, env: Optional[dict] = None, append: bool = False
              ) -> tuple[str, float, int | None]:
    """Run ``cmd`` in the repository root, stdout+stderr to ``log``; kill its process group at
    ``timeout``. Returns (status "passed" / "failed" / "timed out", seconds, exit code)."""
    t0 = time.monotonic()
    with log.open("a" if append else "w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[validate] killed after {timeout:.0f} s (stage budget)\n")
            return "timed out", time.monotonic() - t0, None
    return ("passed" if rc == 0 else "failed"), time.monotonic() - t0, rc


def base_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if dry_run:  # the dry run shares a small CPU with other work
        env.setdefault("OMP_NUM_THREADS", "2")
    return env


def cuda_home() -> Optional[str]:
    """tools/cuda_home.py's answer (the one toolkit discovery of setup.py / the Makefile)."""
    try:
        out = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_home.py")], capture_output=True, text=True,
                             timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out or None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    if out.returncode != 0:
        return "unknown (no .git in this copy; see source_sha256)"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def source_sha256() -> str:
    """sha256 over the package, kernel, build and benchmark sources (path + content, sorted):
    identifies the code of a run where the copy carries no .git."""
    h = hashlib.sha256()
    files: list[Path] = []
    for top in ("resgeom_fast", "csrc", "benchmarks/gpu", "tests"):
        files += [p for p in (ROOT / top).rglob("*") if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h")]
    files += [ROOT / f for f in ("setup.py", "pyproject.toml", "tools/cuda_home.py") if (ROOT / f).is_file()]
    for p in sorted(set(files)):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def extension_path() -> Path:
    return ROOT / "resgeom_fast" / ("_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def newest_source_mtime() -> float:
    times = [0.0]
    for s in SOURCES:
        p = ROOT / s
        if p.is_dir():
            times += [q.stat().st_mtime for q in p.rglob("*") if q.is_file()]
        elif p.is_file():
            times.append(p.stat().st_mtime)
    return max(times)


def find_sanitizer(home: Optional[str]) -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    nvcc = shutil.which("nvcc")
    dirs = ([os.path.dirname(nvcc)] if nvcc else []) + ([os.path.join(home, "bin"), os.path.join(home, "compute-sanitizer")]
                                                           if home else [])
    for d in dirs:
        cand = os.path.join(d, "compute-sanitizer")
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def junit_counts(path: Path) -> dict:
    """Totals and the first failing test ids of a pytest junit xml ({} when absent or unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites:
        return {}
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    tot["passed"] = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    bad = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(f"{case.get('classname')}::{case.get('name')}")
    tot["failing"] = bad[:40]
    return tot


def merge_junit(parts: list[Path], dest: Path) -> None:
    """One <testsuites> holding the <testsuite> elements of every readable junit xml in parts."""
    root = ET.Element("testsuites")
    for p in parts:
        try:
            r = ET.parse(p).getroot()
        except (OSError, ET.ParseError):
            continue
        root.extend([r] if r.tag == "testsuite" else list(r.iter("testsuite")))
    ET.ElementTree(root).write(dest, encoding="utf-8", xml_declaration=True)


def sanitizer_errors(log_text: str) -> list[int]:
    """The N of every 'ERROR SUMMARY: N error(s)' line compute-sanitizer printed."""
    out = []
    for line in log_text.splitlines():
        if "ERROR SUMMARY:" in line:
            try:
                out.append(int(line.split("ERROR SUMMARY:")[1].split()[0]))
            except (IndexError, ValueError):
                pass
    return out


# -- the run ------------------------------------------------------------------------------------
class Validation:
    def __init__(self, out: Path, budget: float, dry_run: bool, arch: str, pytest_args: list[str],
                 jobs: Optional[int] = None) -> None:
        self.out, self.budget, self.dry_run, self.arch = out, budget, dry_run, arch
        self.jobs = jobs or os.cpu_count() or 4
        self.extra_pytest = pytest_args
        self.budgets = DRY_STAGES if dry_run else STAGES
        self.t0 = time.monotonic()
        self.stages: list[dict] = []
        self.env: dict = {}
        self.rows: list[dict] = []
        self.penv = base_env(dry_run)
        self.home = None if dry_run else cuda_home()
        if self.home:
            self.penv["CUDA_HOME"] = self.home
        self.py = sys.executable

    def timeout(self, name: str) -> float:
        """This stage's budget plus what earlier stages left, minus what later stages are owed."""
        names = list(self.budgets)
        later = sum(self.budgets[n] for n in names[names.index(name) + 1:])
        left = self.budget - (time.monotonic() - self.t0)
        scale = min(1.0, self.budget / sum(self.budgets.values()))  # a smaller --budget shrinks every stage
        return max(0.0, min(left, max(left - later * scale, self.budgets[name] * scale)))

    def record(self, name: str, status: str, seconds: float = 0.0, **kw: Any) -> dict:
        st = {"name": name, "status": status, "seconds": round(seconds, 2), "timeout_s": None, "reason": "",
              "output": None, "command": None}
        st.update(kw)
        self.stages.append(st)
        print(f"[validate] {name:<10} {status:<10} {st['seconds']:>7.1f} s  {st['reason']}", flush=True)
        return st

    def stage(self, name: str, cmd: list[str], output: str, append: bool = False, **kw: Any) -> dict:
        t = self.timeout(name)
        if t < 1:
            return self.record(name, "skipped", reason="no time left in the total budget", output=output)
        status, secs, rc = run_stage(cmd, self.out / output, t, self.penv, append=append)
        return self.record(name, status, secs, timeout_s=round(t, 1), output=output, command=" ".join(cmd),
                           returncode=rc, **kw)

    # 1
    def do_env(self) -> None:
        t = self.timeout("env")
        t0 = time.monotonic()
        try:
            p = subprocess.run([self.py, "-c", ENV_SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=t,
                               env=self.penv)
            self.env = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else {}
            status, reason = ("passed", "") if self.env else ("failed", p.stderr.strip()[-500:])
        except subprocess.TimeoutExpired:
            status, reason = "timed out", "torch import / CUDA init did not finish"
        except (OSError, ValueError, IndexError) as exc:
            status, reason = "error", f"{exc.__class__.__name__}: {exc}"
        nvcc = shutil.which("nvcc") or (os.path.join(self.home, "bin", "nvcc") if self.home else None)
        if nvcc and os.path.isfile(nvcc):
            try:
                v = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
                self.env["nvcc"] = v.strip().splitlines()[-1] if v.strip() else "?"
            except (OSError, subprocess.SubprocessError):
                self.env["nvcc"] = "found, did not answer"
        else:
            self.env["nvcc"] = "not found"
        self.env["cuda_home"] = self.home
        self.record("env", status, time.monotonic() - t0, timeout_s=round(t, 1), reason=reason)

    # 2
    def do_build(self) -> None:
        log = self.out / "build.log"
        if self.dry_run:
            log.write_text("dry run: no build; the installed extension is used\n")
            self.record("build", "skipped", reason="dry run: no build (the installed extension is used)",
                        output="build.log")
            return
        so = extension_path()
        fresh = so.is_file() and so.stat().st_mtime > newest_source_mtime()
        if fresh and self.home:
            probe = subprocess.run([self.py, "-c", "import resgeom_fast as rg; print(rg.built_with_cuda())"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60, env=self.penv)
            fresh = probe.stdout.strip().endswith("True")
        if fresh:
            log.write_text(f"{so.name} is newer than every source and holds CUDA kernels: no build\n")
            self.record("build", "skipped", reason=f"already built and fresh ({so.name})", output="build.log")
            return
        self.penv["TORCH_CUDA_ARCH_LIST"] = self.arch
        self.penv["MAX_JOBS"] = str(self.jobs)  # not the Makefile's exported MAX_JOBS=2
        if not self.home:
            log.write_text("no CUDA toolkit found (tools/cuda_home.py): CPU-only build\n")
        st = self.stage("build", [self.py, "setup.py", "build_ext", "--inplace"], "build.log", append=not self.home,
                        arch=self.arch, cuda_home=self.home)
        if st["status"] == "passed":
            p = subprocess.run([self.py, "-c", "import resgeom_fast as rg, torch; "
                                "print(rg.built_with_cuda(), torch.cuda.is_available())"],
                               cwd=ROOT, capture_output=True, text=True, timeout=60, env=self.penv)
            st["built_with_cuda"] = p.stdout.strip()
            if "False True" in p.stdout or p.returncode != 0:
                st["status"] = "failed"
                st["reason"] = f"built, but import / CUDA kernels check: {p.stdout.strip()} {p.stderr.strip()[-300:]}"

    def pytest(self, name: str, targets: list[str], output: str, junit: Optional[str], extra: list[str]) -> dict:
        cmd = [self.py, "-m", "pytest", *targets, "-q", "-rfE", "-p", "no:cacheprovider", *extra, *self.extra_pytest]
        if junit:
            cmd.append(f"--junitxml={self.out / junit}")
        st = self.stage(name, cmd, output)
        if junit:
            st["junit"] = junit
            st["counts"] = junit_counts(self.out / junit)
        if st["status"] == "failed" and st.get("returncode") == 5:
            st["reason"] = "no tests collected"
        return st

    # 3
    def do_tests(self) -> None:
        """Two pytest runs into one tests.log / tests.xml: the CUDA cases first (``-k cuda``: the
        reason for a GPU run, kept even if the rest overruns), then the others (``-k "not cuda"``),
        with pytest-xdist workers on the GPU machine when it is installed."""
        targets = ["tests/ops/test_density_smooth.py"] if self.dry_run else ["tests/ops", "tests/linalg", "tests/operators"]
        workers = [] if self.dry_run or importlib.util.find_spec("xdist") is None else \
            ["-n", str(max(2, min(8, (os.cpu_count() or 4) // 2))), "--dist", "loadscope"]
        total = self.timeout("tests")
        t0 = time.monotonic()
        log, xmls, parts = self.out / "tests.log", [], {}
        log.write_text("")
        with tempfile.TemporaryDirectory() as tmp:
            for i, (part, sel) in enumerate((("cuda cases", "cuda"), ("other cases", "not cuda"))):
                left = total - (time.monotonic() - t0)
                if left < 1:
                    parts[part] = "skipped: no time left"
                    continue
                xml = Path(tmp) / f"part{i}.xml"
                cmd = [self.py, "-m", "pytest", *targets, "-m", "not slow", "-k", sel, "-q", "-rfE",
                       "-p", "no:cacheprovider", f"--junitxml={xml}", *(workers if i else []), *self.extra_pytest]
                env = dict(self.penv)
                if i and workers:  # the CPU cases across xdist workers: share the cores, no oversubscription
                    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 4) // int(workers[1])))
                status, _, rc = run_stage(cmd, log, left, env, append=True)
                parts[part] = "no tests collected" if rc == 5 else status
                xmls.append(xml)
            merge_junit(xmls, self.out / "tests.xml")
        ok = all(v in ("passed", "no tests collected") for v in parts.values())
        status = "passed" if ok else ("timed out" if any(v == "timed out" for v in parts.values()) else "failed")
        reason = ", ".join(f"{k}: {v}" for k, v in parts.items())
        if any(v == "timed out" for v in parts.values()):
            reason += " (a killed part leaves no xml: tests.log has its progress)"
        if self.dry_run:
            reason += "; dry run: one small test file on the CPU"
        self.record("tests", status, time.monotonic() - t0, timeout_s=round(total, 1), output="tests.log",
                    junit="tests.xml", counts=junit_counts(self.out / "tests.xml"), parts=parts, reason=reason,
                    command=f"pytest {' '.join(targets)} -m 'not slow' -k cuda, then -k 'not cuda' {' '.join(workers)}")

    # 4
    def do_sanitizer(self) -> None:
        script = [self.py, "benchmarks/gpu/sanitize_ops.py"]
        log = self.out / "sanitizer.log"
        if self.dry_run:
            status, secs, rc = run_stage(script + ["--device", "cpu"], log, self.timeout("sanitizer"), self.penv)
            self.record("sanitizer", "skipped", secs, output="sanitizer.log",
                        reason=f"dry run: compute-sanitizer not used; the op script ran plainly on the CPU: {status}",
                        script_status=status)
            return
        tool = find_sanitizer(self.home)
        if tool is None:
            log.write_text("compute-sanitizer not found on PATH nor next to nvcc / in CUDA_HOME\n")
            self.record("sanitizer", "skipped", reason="compute-sanitizer not found (PATH, nvcc's folder, CUDA_HOME)",
                        output="sanitizer.log")
            return
        if not self.env.get("cuda_available"):
            log.write_text("no visible CUDA device\n")
            self.record("sanitizer", "skipped", reason="no visible CUDA device", output="sanitizer.log")
            return
        total = self.timeout("sanitizer")
        t0 = time.monotonic()
        results = {}
        log.write_text("")
        for i, toolname in enumerate(("memcheck", "racecheck")):
            left = total - (time.monotonic() - t0)
            t = left * 0.6 if i == 0 else left  # memcheck 60% (torch's start under the tool is slow)
            cmd = [tool, "--tool", toolname, "--error-exitcode", "3", "--print-limit", "50", *script, "--device", "cuda"]
            if t < 1:
                results[toolname] = "skipped: no time left"
                continue
            # no caching allocator: every tensor its own cudaMalloc, so memcheck sees accesses past
            # a tensor's end that would otherwise land inside a pooled block
            env = {**self.penv, "PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
            status, _, rc = run_stage(cmd, log, t, env, append=True)
            results[toolname] = status if rc != 3 else "errors reported"
        text = log.read_text(errors="replace")
        errors = sanitizer_errors(text)
        ok = all(v == "passed" for v in results.values())
        status = "passed" if ok else ("timed out" if any(v == "timed out" for v in results.values()) else "failed")
        reason = ", ".join(f"{k}: {v}" for k, v in results.items())
        if "Device not supported" in text:
            reason += " (compute-sanitizer: 'Device not supported': a gVisor machine? see KINDS.md)"
        self.record("sanitizer", status, time.monotonic() - t0, timeout_s=round(total, 1), output="sanitizer.log",
                    reason=reason, tools=results, error_summaries=errors, command=" ".join([tool, "--tool", "TOOL",
                                                                                              *script, "--device", "cuda"]))

    # 5
    def do_opcheck(self) -> None:
        targets = ["tests/ops/test_tridiag_eigh.py"] if self.dry_run else ["tests/ops"]
        st = self.pytest("opcheck", targets, "opcheck.log", None, ["-k", "opcheck"])
        if self.dry_run:
            st["reason"] = (st["reason"] + "; " if st["reason"] else "") + "dry run: one op's opcheck on the CPU"

    # 6
    def do_bench(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "rows.jsonl"
            t = self.timeout("bench")
            deadline = time.time() + 0.6 * t  # no new benchmark starts after 60% of the stage
            cmd = [self.py, "benchmarks/gpu/bench.py", "--device", "cpu" if self.dry_run else "cuda",
                   "--sizes", "tiny" if self.dry_run else "mission", "--rows", str(rows), "--deadline", f"{deadline:.0f}"]
            st = self.stage("bench", cmd, "bench.log")
            if rows.is_file():
                self.rows = [json.loads(line) for line in rows.read_text().splitlines() if line.strip()]
        if self.rows and all(r["status"] == "skipped" for r in self.rows) and st["status"] == "passed":
            st["status"], st["reason"] = "skipped", "; ".join(sorted({r["note"] for r in self.rows}))
        bad = [r for r in self.rows if r["status"] == "error"]
        if bad:
            st["reason"] = f"{len(bad)} benchmark(s) raised: " + "; ".join(f"{r['bench']}/{r['impl']}" for r in bad)
        if st["status"] == "timed out":
            st["reason"] = f"killed at the stage budget after {len(self.rows)} row(s)"

    def run(self) -> dict:
        for name in self.budgets:
            try:
                getattr(self, f"do_{name}")()
            except Exception as exc:  # the orchestration itself failed in this stage: record, go on
                self.record(name, "error", reason=f"{exc.__class__.__name__}: {exc}"[:500])
        return self.write()

    def write(self) -> dict:
        summary = {
            "schema": 1, "dry_run": self.dry_run, "run_command": RUN_COMMAND,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(), "source_sha256": source_sha256(),
            "device": self.env.get("device_name") or ("cpu (dry run)" if self.dry_run else "no visible CUDA device"),
            "torch": self.env.get("torch"), "cuda": self.env.get("torch_cuda"), "env": self.env,
            "budget_s": self.budget, "wall_s": round(time.monotonic() - self.t0, 1),
            "stages": self.stages, "benchmarks": self.rows, "files": list(OUTPUT_FILES),
        }
        for name in OUTPUT_FILES[2:]:  # every file of the layout exists, also for a stage that never ran
            p = self.out / name
            if not p.exists():
                p.write_text("" if name.endswith(".log") else '<?xml version="1.0"?><testsuites/>\n')
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (self.out / "summary.md").write_text(markdown(summary))
        return summary


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def markdown(s: dict) -> str:
    lines = [f"# GPU validation{' (dry run, CPU)' if s['dry_run'] else ''}", "",
             f"- device: {s['device']}", f"- torch {s['torch']}, CUDA {s['cuda']}, cuDNN {s['env'].get('cudnn')}, "
             f"torchvision {s['env'].get('torchvision')}, Python {s['env'].get('python')}, nvcc: {s['env'].get('nvcc')}",
             f"- date: {s['date']}", f"- git commit: {s['git_commit']}", f"- source sha256: {s['source_sha256']}",
             f"- budget {s['budget_s']} s, wall {s['wall_s']} s", f"- command: `{s['run_command']}`", "",
             "## Stages", "", "| stage | status | seconds | budget s | output | note |", "| --- | --- | --- | --- | --- | --- |"]
    for st in s["stages"]:
        note = st.get("reason", "")
        c = st.get("counts")
        if c:
            note = (f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
                    + (f"; failing: {', '.join(c['failing'][:10])}" if c["failing"] else "") + (f"; {note}" if note else ""))
        lines.append(f"| {st['name']} | {st['status']} | {st['seconds']} | {_fmt(st.get('timeout_s'), '')} | "
                     f"{st.get('output') or ''} | {note.replace('|', '/')} |")
    lines += ["", "## Benchmarks", "", "Median seconds of the timed calls after a warm-up (CUDA synchronised); "
              "accuracy beside each time (its metric in the last column).", "",
              "| benchmark | impl | size | status | seconds | accuracy | metric | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in s["benchmarks"]:
        lines.append(f"| {r['bench']} | {r['impl']} | {r['size']} | {r['status']} | {_fmt(r['seconds'], '.4g')} | "
                     f"{_fmt(r['accuracy'], '.2e')} | {r['accuracy_metric']} | {str(r['note']).replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output folder (default: $OUT if set, else benchmarks/results/gpu_<date>)")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (default 540; dry run 240)")
    ap.add_argument("--dry-run", action="store_true", help="every stage's plumbing on the CPU with tiny sizes")
    ap.add_argument("--arch", default="9.0", help="TORCH_CUDA_ARCH_LIST for the build (default 9.0: H100/H200)")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile jobs of the build (default: CPU count)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments for the tests and opcheck stages")
    args = ap.parse_args(argv)
    out = Path(args.out or os.environ.get("OUT") or
               ROOT / "benchmarks" / "results" / f"gpu_{datetime.date.today().strftime('%Y%m%d')}")
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else (240.0 if args.dry_run else 540.0)
    v = Validation(out.resolve(), budget, args.dry_run, args.arch, args.pytest_args.split(), args.jobs)
    s = v.run()
    print(f"[validate] wrote {out}/summary.md and summary.json ({s['wall_s']} s)")
    print(markdown(s))
    return 0 if all(st["status"] in ("passed", "skipped") for st in s["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
