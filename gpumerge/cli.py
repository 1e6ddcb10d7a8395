"""argv -> spec -> run. Every GpumergeError becomes one line ``gpumerge: error: ...`` and exit code 2."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from gpumerge.errors import GpumergeError, SpecError
from gpumerge.spec import DTYPE_CHOICES, MergeSpec, parse_device, parse_dtype, parse_max_memory, parse_size

COMMANDS = ("merge", "plan", "demo")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gpumerge: error: {message} (see {self.prog} --help)\n")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Every flag answers to both spellings: --model_path1 and --model-path1."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _merge_flags(parser: argparse.ArgumentParser, *, output_required: bool) -> None:
    _flag(parser, "model_path1", required=True, metavar="PATH", help="model 1: directory or cached hub id (org/name)")
    _flag(parser, "model_path2", required=True, metavar="PATH", help="model 2: directory or cached hub id")
    _flag(parser, "output_model_path", required=output_required, metavar="OUT", help="directory to write the merge to")
    _flag(parser, "gradient_start", type=float, default=0.0, metavar="T",
          help="share of model 2 at the first block of the window (default 0.0)")
    _flag(parser, "gradient_end", type=float, default=1.0, metavar="T",
          help="share of model 2 at the last block of the window (default 1.0)")
    _flag(parser, "layer_start", type=int, default=0, metavar="N", help="first block blended (default 0)")
    _flag(parser, "layer_end", type=int, default=99, metavar="N",
          help="blocks blended are layer_start <= i < min(layer_end, num_layers) (default 99)")
    _flag(parser, "max_shard_size", default="2000MiB", metavar="SIZE",
          help='largest output shard: "2000MiB", "2GB", "500MB", "300KB" or bytes (default 2000MiB)')
    _flag(parser, "dtype", default=None, metavar="DTYPE",
          help=f"output dtype: {', '.join(DTYPE_CHOICES)} (default float16, like the original; auto = model 1's)")
    _flag(parser, "device", default="auto", metavar="DEVICE",
          help="auto (every CUDA device, else the CPU), cpu, cuda (all), cuda:N or cuda:0,cuda:2 (default auto)")
    _flag(parser, "max_memory", default=None, metavar="BUDGET",
          help='memory for in-flight buffers per device, e.g. "0=20GiB,1=20GiB,cpu=8GiB" (default: a share of '
               "the free memory)")
    _flag(parser, "overwrite", action="store_true", help="replace a non-empty OUT")
    _flag(parser, "quiet", action="store_true", help="no progress bar or notices")
    _flag(parser, "debug", action="store_true", help="show tracebacks")


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "demo":
        parser = _Parser(prog="gpumerge demo", description="Build two small Llama checkpoints locally, merge them, "
                         "check that transformers loads the result, and print where it is.")
        _flag(parser, "workdir", type=Path, default=None, metavar="DIR",
              help="where to build the demo (default: a new temporary directory)")
        _flag(parser, "quiet", action="store_true", help="no progress bar or notices")
        _flag(parser, "debug", action="store_true", help="show tracebacks")
        return parser
    if command == "plan":
        parser = _Parser(prog="gpumerge plan", description="Show what a merge would do; writes nothing.")
        _merge_flags(parser, output_required=False)
        _flag(parser, "plot", type=Path, default=None, metavar="FILE.png", help="draw each model's share per layer")
        return parser
    parser = _Parser(prog="gpumerge", description="Blend the decoder blocks of two checkpoints along a gradient "
                     "(BlockMerge Gradient), streaming, exact, atomic. Subcommands: plan, demo.")
    _merge_flags(parser, output_required=True)
    _flag(parser, "report", type=Path, default=None, metavar="FILE.json",
          help="write engine timings per stage, bytes, peaks and GPU telemetry as JSON")
    return parser


def spec_from_args(args: argparse.Namespace) -> MergeSpec:
    dtype = parse_dtype(args.dtype) if args.dtype is not None else "float16"
    return MergeSpec(
        model_path1=args.model_path1,
        model_path2=args.model_path2,
        output_model_path=Path(args.output_model_path) if args.output_model_path else None,
        gradient_start=args.gradient_start,
        gradient_end=args.gradient_end,
        layer_start=args.layer_start,
        layer_end=args.layer_end,
        max_shard_bytes=parse_size(args.max_shard_size, what="--max_shard_size"),
        max_shard_size=args.max_shard_size,
        dtype=dtype,
        dtype_was_default=args.dtype is None,
        device=parse_device(args.device),
        max_memory=tuple(sorted(parse_max_memory(args.max_memory).items(), key=str)) if args.max_memory else None,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )


def _notice_printer(quiet: bool):
    def notice(line: str) -> None:
        if not quiet:
            print(f"gpumerge: {line}", file=sys.stderr)
    return notice


class _Progress:
    """tqdm on stderr (bytes/s, ETA), with each GPU's memory and utilization from NVML when there is any."""

    def __init__(self, total_bytes: int, telemetry, quiet: bool) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="merging",
                        file=sys.stderr, disable=quiet, dynamic_ncols=True, leave=False)
        self.telemetry = telemetry

    def update(self, nbytes: int) -> None:
        self.bar.update(nbytes)
        line = self.telemetry.line() if self.telemetry is not None else ""
        if line:
            self.bar.set_postfix_str(line, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _progress_factory(quiet: bool):
    return lambda total_bytes, telemetry=None: _Progress(total_bytes, telemetry, quiet)


def cmd_merge(args: argparse.Namespace) -> int:
    from gpumerge.merge import run_merge
    from gpumerge.report import summary_line

    spec = spec_from_args(args)
    if args.report is not None and not args.report.parent.expanduser().is_dir():
        raise SpecError(f"--report {args.report}: the directory {args.report.parent} does not exist")
    result = run_merge(spec, notice=_notice_printer(spec.quiet), progress_factory=_progress_factory(spec.quiet))
    if args.report is not None:
        args.report.expanduser().write_text(json.dumps(result.report, indent=2) + "\n")
    print(summary_line(result))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gpumerge.report import describe_plan

    spec = spec_from_args(args)
    describe_plan(spec, plot=args.plot, out=sys.stdout, notice=_notice_printer(spec.quiet))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gpumerge.demo import run_demo

    return run_demo(workdir=args.workdir, quiet=args.quiet)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "merge"
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a bad command line already reported in one line
        return exc.code if isinstance(exc.code, int) else 2
    debug = getattr(args, "debug", False)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return {"merge": cmd_merge, "plan": cmd_plan, "demo": cmd_demo}[command](args)
    except GpumergeError as exc:
        if debug:
            raise
        return _fail(str(exc))
    except OSError as exc:  # permission denied, disk full, ...: still one line
        if debug:
            raise
        return _fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
    except KeyboardInterrupt:
        print("gpumerge: interrupted; nothing was written to the output path", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str) -> int:
    print(f"gpumerge: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
