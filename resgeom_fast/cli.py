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
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import traceback
from typing import Optional, Sequence

from resgeom_fast.experiments import commands
from resgeom_fast.experiments.config import UsageError
from resgeom_fast.experiments.studies import COMMANDS, STUDIES

__all__ = ["main", "build_parser"]

EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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
    """Entry point; returns the exit code (0 ok, 2 bad input, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    out_hint: Optional[str] = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        if args.command == "bench":
            return commands.bench(quick=args.quick, json_path=args.json, benchmarks_dir=args.benchmarks)
        out_hint = getattr(args, "out", None)
        if args.command == "demo":
            rep = commands.demo(out=args.out, size=args.size, device=args.device, seed=args.seed,
                                fresh=args.fresh, progress=not args.quiet, deterministic=args.deterministic)
        elif args.command == "run":
            if args.list_options:
                print(commands.describe_options(args.study))
                return 0
            out_hint = f"reports/{args.study}" if args.out is None else args.out
            rep = commands.run_study(args.study, config_path=args.config, out=out_hint, sets=args.sets,
                                     fresh=args.fresh, progress=not args.quiet, deterministic=args.deterministic)
        else:
            rep = commands.analyze(model=args.model, checkpoint=args.checkpoint, data=args.data,
                                   num_classes=args.num_classes, samples=args.samples, batch=args.batch, k=args.k,
                                   power_iters=args.power_iters, oversample=args.oversample, probes=args.probes,
                                   steps=args.steps, trace_probes=args.trace_probes, analyses=args.analyses,
                                   device=args.device, seed=args.seed, out=args.out, fresh=args.fresh,
                                   progress=not args.quiet, params=args.params, deterministic=args.deterministic,
                                   image_size=args.image_size, normalize=args.normalize,
                                   blocks=args.blocks, loss=args.loss, eigs=args.eigs)
        print(f"report: {rep.report_path}")
        return 0
    except UsageError as err:
        msg = str(err).replace("\n", " ")
        print(f"resgeom: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        where = f" in {out_hint}" if out_hint else ""
        print(f"\nresgeom: interrupted; finished steps are kept{where}: run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - the backstop: one line, the traceback in a file
        where = _write_traceback(err, out_hint, argv)
        first = (str(err).strip().splitlines() or [""])[0]
        print(f"resgeom: error: unexpected {type(err).__name__}: {first} (traceback written to {where})",
              file=sys.stderr)
        return EXIT_UNEXPECTED


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
