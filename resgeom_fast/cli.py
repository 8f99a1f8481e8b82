"""The ``resgeom`` command (also ``python -m resgeom_fast``).

    resgeom demo    [--out DIR] [--size tiny|default] [--device cpu|cuda] [--seed N] [--fresh]
    resgeom run     STUDY [--config FILE.json|yaml] [--out DIR] [--set key=value ...] [--list-options]
    resgeom analyze --model torchvision:resnet18|module:pkg.mod:factory [--checkpoint FILE]
                    --data imagefolder:PATH|tensors:FILE.pt|digits|torchvision:NAME:ROOT|random-cifar
                    [--image-size N] [--no-normalize] [...]
    resgeom bench   [--quick] [--json FILE]

Every long step shows a progress bar, writes its result atomically into the output folder and
is skipped when the same command runs again (Ctrl-C leaves a resumable folder). Bad input (an
unknown study, option, data set or a missing file) prints one line ``resgeom: error: ...`` and
exits with code 2; an interrupted run exits with 130. Any other exception (a bug, or a failure
inside an analysis) also prints one line, ``resgeom: error: unexpected <Exception>: <message>
(traceback written to <file>)``, and exits with code 1; the traceback goes to ``OUT/error.log``
when OUT is a resgeom report folder, else to a new file in the temporary folder.

Several processes. ``torchrun --nproc-per-node=N -m resgeom_fast demo|run|analyze ...`` (or the
``resgeom`` command under ``srun`` with several tasks) runs one command on N processes: each
joins the torch.distributed process group (gloo on CPUs; ``cpu:gloo,cuda:nccl`` where CUDA is
visible, each process on the GPU of its LOCAL_RANK) with a collective timeout of
``--dist-timeout`` seconds, rank 0 alone writes the report folder, its lock and the checkpoints
(:mod:`~resgeom_fast.experiments.runner`), every rank resumes from the steps rank 0 finds, and
only rank 0 shows progress and warnings and prints the report's path. A rank that dies or hangs makes the
others exit with ``resgeom: error: ...`` naming it (code 1), within the timeout; SIGTERM (the
launcher stopping the job) is handled like Ctrl-C. The group is destroyed at exit. docs/distributed.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import re
import signal
import sys
import tempfile
import traceback
import warnings
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from resgeom_fast.core.distributed import RankFailureError
from resgeom_fast.experiments import commands
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.studies import COMMANDS, STUDIES

__all__ = ["DIST_TIMEOUT_S", "Launch", "build_parser", "launch_from_env", "main"]

EXIT_UNEXPECTED = 1
EXIT_RANK_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
DIST_TIMEOUT_S = 1800.0
"""Default ``--dist-timeout``: seconds a collective waits for the other ranks (torch's gloo default)."""


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping the job): handled like Ctrl-C."""


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process was launched as one of several: rank, world size, local rank (the GPU
    index on its node), the rendezvous address and port, and the launcher ("torchrun" when RANK /
    WORLD_SIZE are set, as by torchrun or any launcher that sets them, or "srun")."""

    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"environment: expected {name} an integer, got {env[name]!r}") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` -> ``"gpu03"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UsageError(f"environment: cannot read the first host of SLURM's node list {nodelist!r}; set MASTER_ADDR")
    prefix, ranges = m.group(1), m.group(2)
    return prefix if ranges is None else prefix + re.split(r"[-,]", ranges)[0]


def launch_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[Launch]:
    """The :class:`Launch` of this process when a launcher started several (None: one process).

    torchrun (and launchers like it) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
    Under ``srun`` without torchrun the ranks come from SLURM_PROCID, SLURM_STEP_NUM_TASKS (set by
    srun for its tasks, not in a batch script itself) and SLURM_LOCALID; MASTER_ADDR defaults to
    the first host of SLURM_STEP_NODELIST (or SLURM_JOB_NODELIST) and MASTER_PORT to
    ``10000 + SLURM_JOB_ID % 20000``. A world of 1 is one process (None).
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE")
        if world <= 1:
            return None
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in env:
                raise UsageError(f"environment: RANK and WORLD_SIZE are set but not {name} (launch with torchrun, or "
                                 "set MASTER_ADDR and MASTER_PORT)")
        return Launch(_env_int(env, "RANK"), world, int(env.get("LOCAL_RANK", "0") or 0), env["MASTER_ADDR"],
                      _env_int(env, "MASTER_PORT"), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = _env_int(env, "SLURM_STEP_NUM_TASKS")
        if world <= 1:
            return None
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        addr = env.get("MASTER_ADDR") or (first_host(nodes) if nodes else "")
        if not addr:
            raise UsageError("environment: under srun with several tasks but no MASTER_ADDR nor SLURM node list")
        if env.get("MASTER_PORT"):
            port = _env_int(env, "MASTER_PORT")
        else:
            port = 10000 + (int(env["SLURM_JOB_ID"]) % 20000 if env.get("SLURM_JOB_ID", "").isdigit() else 0)
        return Launch(_env_int(env, "SLURM_PROCID"), world, int(env.get("SLURM_LOCALID", "0") or 0), addr, port,
                      "srun")
    return None


def _join_group(launch: Launch, timeout_s: float) -> None:
    """Join the default process group (env:// rendezvous at MASTER_ADDR:MASTER_PORT); a
    UsageError-like one line when that fails within the timeout."""
    os.environ.update({"RANK": str(launch.rank), "WORLD_SIZE": str(launch.world),
                       "LOCAL_RANK": str(launch.local_rank), "MASTER_ADDR": launch.master_addr,
                       "MASTER_PORT": str(launch.master_port)})
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    try:
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as err:  # noqa: BLE001 - the rendezvous failed: one line naming the address
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise RankFailureError(f"rank {launch.rank} of {launch.world} could not join the process group at "
                               f"{launch.master_addr}:{launch.master_port} ({launch.launcher}) within "
                               f"{timeout_s:g} s: {type(err).__name__}: {first}") from err


def _dist_timeout(value: str) -> float:
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not math.isfinite(t) or t <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {value!r}")
    return t


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``resgeom: error: ...``, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        where = self.prog[len("resgeom"):].strip()
        raise UsageError(f"{where}: {message}" if where else message)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``resgeom``: the studies of ``run`` and the flags of ``demo`` / ``analyze``
    come from the registries of :mod:`resgeom_fast.experiments.studies`."""
    names = ", ".join(STUDIES)
    p = _Parser(prog="resgeom", description="Geometry of residual networks: runnable studies and reports.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="{demo,run,analyze,bench}")
    common = _Parser(add_help=False)
    common.add_argument("--fresh", action="store_true", help="discard earlier steps and checkpoints in --out")
    common.add_argument("--quiet", action="store_true", help="no progress bars or step messages")
    common.add_argument("--deterministic", action="store_true",
                        help="fix every method choice of the analyses (no 'auto' choice by timing): the same command "
                             "gives the same numbers; recorded in the configuration and the report")
    common.add_argument("--dist-timeout", type=_dist_timeout, default=DIST_TIMEOUT_S, metavar="SECONDS",
                        help="under torchrun / srun: seconds a collective waits for the other ranks before the job "
                             f"fails naming them (default {DIST_TIMEOUT_S:g}); set it above the longest step's "
                             "imbalance between ranks")

    demo = COMMANDS["demo"]
    demo.add_arguments(sub.add_parser(demo.name, parents=[common], help=demo.help))

    r = sub.add_parser("run", parents=[common], help=f"run one study: {names}")
    r.add_argument("study", help=f"one of: {names}")
    r.add_argument("--config", default=None, help="options as a JSON (or YAML with PyYAML) mapping")
    r.add_argument("--out", default=None, help="report folder (default reports/<study>)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one option (repeatable); see --list-options")
    r.add_argument("--list-options", action="store_true", help="print the study's options and exit")

    analyze = COMMANDS["analyze"]
    analyze.add_arguments(sub.add_parser(analyze.name, parents=[common], help=analyze.help))

    b = sub.add_parser("bench", help="run the benchmark suite and print the ratio table (needs a source checkout)",
                       description=commands.BENCH_NEEDS + ".")
    b.add_argument("--quick", action="store_true", help="only the op benchmarks (a few minutes)")
    b.add_argument("--json", default=None, help="benchmark JSON path (default benchmarks/results/latest.json)")
    b.add_argument("--benchmarks", default=None,
                   help="the benchmarks folder of a source checkout (default: the one next to the package of an "
                        "editable install, else ./benchmarks)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 failure, 2 bad input, 130 interrupted, 143
    stopped by SIGTERM under a launcher)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out_hint: Optional[str] = None
    launch: Optional[Launch] = None
    joined = False
    old_term: Any = None
    try:
        launch = launch_from_env()
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "bench":
            if launch is not None:
                raise UsageError("bench: run it in one process, not under torchrun or srun")
            return commands.bench(quick=args.quick, json_path=args.json, benchmarks_dir=args.benchmarks)
        if args.command == "run" and args.list_options:
            if launch is None or launch.rank == 0:
                print(commands.describe_options(args.study))
            return 0
        out_hint = getattr(args, "out", None)
        if args.command == "run" and out_hint is None:
            out_hint = f"reports/{args.study}"
        if launch is not None:
            old_term = signal.signal(signal.SIGTERM, _on_sigterm)
            _join_group(launch, args.dist_timeout)
            joined = True
            if launch.rank != 0:
                # rank 0 computes the same steps (or its share of them) and warns; its results are the report's
                warnings.simplefilter("ignore")
        progress = not args.quiet and (launch is None or launch.rank == 0)
        if args.command == "demo":
            rep = commands.demo(out=args.out, size=args.size, device=args.device, seed=args.seed,
                                fresh=args.fresh, progress=progress, deterministic=args.deterministic)
        elif args.command == "run":
            rep = commands.run_study(args.study, config_path=args.config, out=out_hint, sets=args.sets,
                                     fresh=args.fresh, progress=progress, deterministic=args.deterministic)
        else:
            rep = commands.analyze(model=args.model, checkpoint=args.checkpoint, data=args.data,
                                   num_classes=args.num_classes, samples=args.samples, batch=args.batch, k=args.k,
                                   power_iters=args.power_iters, oversample=args.oversample, probes=args.probes,
                                   steps=args.steps, trace_probes=args.trace_probes, analyses=args.analyses,
                                   device=args.device, seed=args.seed, out=args.out, fresh=args.fresh,
                                   progress=progress, params=args.params, deterministic=args.deterministic,
                                   image_size=args.image_size, normalize=args.normalize,
                                   blocks=args.blocks, loss=args.loss, eigs=args.eigs)
        if launch is None or launch.rank == 0:
            print(f"report: {rep.report_path}")
        return 0
    except UsageError as err:
        # before joining, every rank has the same error; after, a rank other than 0 prints its own
        if launch is None or launch.rank == 0 or (joined and not _copied(err, launch)):
            msg = str(err).replace("\n", " ")
            print(f"resgeom: error{_who(launch)}: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        if launch is not None:   # Ctrl-C reaches the launcher too, which then sends SIGTERM: finish the way out
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if launch is None or launch.rank == 0:
            where = f" in {out_hint}" if out_hint else ""
            what = ("stopped (SIGTERM: the launcher ended the job, e.g. another rank failed)"
                    if isinstance(err, _Terminated) else "interrupted")
            print(f"\nresgeom: {what}; finished steps are kept{where}: run the same command again to resume",
                  file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, _Terminated) else EXIT_INTERRUPTED
    except RankFailureError as err:
        if not _copied(err, launch):
            first = (str(err).strip().splitlines() or [""])[0]
            if launch is not None and launch.rank != 0 and launch.launcher == "srun" and "could not be identified" in first:
                first = first.replace("could not be identified", "could not be identified (without torchrun the store "
                                      "lives on rank 0: rank 0 died or was stopped)", 1)
            where = f"; finished steps are kept in {out_hint}: run the same command again to resume" if out_hint else ""
            print(f"resgeom: error{_who(launch)}: {first}{where}", file=sys.stderr)
        return EXIT_RANK_FAILURE
    except Exception as err:  # noqa: BLE001 - the backstop: one line, the traceback in a file
        if _copied(err, launch):
            return EXIT_UNEXPECTED
        where = _write_traceback(err, out_hint if launch is None or launch.rank == 0 else None, argv)
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"resgeom: error{_who(launch)}: unexpected {type(err).__name__}: {first} (traceback written to "
              f"{where})", file=sys.stderr)
        return EXIT_UNEXPECTED
    finally:
        if joined and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group: the process ends anyway
                pass
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # once: a second one must not interrupt the way out
    raise _Terminated()


def _who(launch: Optional[Launch]) -> str:
    """``" (rank r of w)"`` on a rank other than 0 of several processes, else ``""``."""
    return "" if launch is None or launch.rank == 0 else f" (rank {launch.rank} of {launch.world})"


def _copied(err: BaseException, launch: Optional[Launch]) -> bool:
    """Whether ``err`` is, on a rank other than 0, a copy of another rank's error (noted
    ``"...: raised on rank r of w"`` by :func:`~resgeom_fast.core.distributed.raise_together`):
    that rank (or rank 0) prints it; this one stays quiet."""
    if launch is None or launch.rank == 0:
        return False
    return any(re.search(r"raised on rank \d+ of \d+", str(n)) and f"rank {launch.rank} of" not in str(n)
               for n in getattr(err, "__notes__", ()))


def _write_traceback(err: BaseException, out: Optional[str], argv: Sequence[str]) -> str:
    """Write ``err``'s traceback to ``OUT/error.log`` (only in a resgeom report folder, appended)
    or else to a new ``resgeom-error-*.log`` in the temporary folder; return its path."""
    text = (f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')} resgeom "
            f"{' '.join(argv)}\n" + "".join(traceback.format_exception(type(err), err, err.__traceback__)) + "\n")
    if out and os.path.isfile(os.path.join(out, "manifest.json")):
        path = os.path.join(out, "error.log")
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text)
            return path
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix="resgeom-error-", suffix=".log")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        return path
    except OSError:  # pragma: no cover - no writable temporary folder
        return "nowhere (no writable folder); rerun with python -X dev -m resgeom_fast to see it"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
