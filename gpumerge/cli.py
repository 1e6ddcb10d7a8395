"""argv -> spec -> run. Every GpumergeError becomes one line ``gpumerge: error: ...`` and exit code 2."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from gpumerge.errors import GpumergeError, SpecError
from gpumerge.spec import DTYPE_CHOICES, MergeSpec

COMMANDS = ("merge", "plan", "demo", "sweep", "verify")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from gpumerge.distributed import is_worker

        # in a launched run, the main process alone says it (every process stops with the same exit code)
        self.exit(2, None if is_worker() else f"gpumerge: error: {message} (see {self.prog} --help)\n")


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Every flag answers to both spellings: --model_path1 and --model-path1."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _merge_flags(parser: argparse.ArgumentParser, *, sweep: bool = False) -> None:
    # Defaults are None here and filled in spec_from_args: a flag given on the command line overrides a recipe's
    # value, and the combinations that make no sense are refused.
    _flag(parser, "config", type=Path, default=None, metavar="RECIPE.yaml",
          help="a YAML recipe (gpumerge's / BlockMerge YAML edition's operations, layer_gradients) or a two-model "
               "mergekit config (linear, slerp); command-line flags override its paths, dtype and device")
    _flag(parser, "model_path1", metavar="PATH", help="model 1: directory or cached hub id (org/name)")
    _flag(parser, "model_path2", metavar="PATH", help="model 2: directory or cached hub id")
    if not sweep:
        _flag(parser, "output_model_path", metavar="OUT", help="directory to write the merge to")
    _flag(parser, "gradient_start", type=float, metavar="T",
          help="share of model 2 at the first block of the window (default 0.0)")
    _flag(parser, "gradient_end", type=float, metavar="T",
          help="share of model 2 at the last block of the window (default 1.0)")
    _flag(parser, "layer_start", type=int, metavar="N", help="first block blended (default 0)")
    _flag(parser, "layer_end", type=int, metavar="N",
          help="blocks blended are layer_start <= i < min(layer_end, num_layers) (default 99)")
    _flag(parser, "gradient_values", metavar="LIST",
          help='BlockMerge Tensors edition: "[1.0, 0.5, 0.0]" run piecewise-linearly over the selected tensors in '
               "the architecture's order (replaces the gradient and layer flags)")
    _flag(parser, "layer_only", action="store_true", default=None, help='with --gradient_values: names with "layer"')
    _flag(parser, "no_layers", action="store_true", default=None, help='with --gradient_values: names without "layer"')
    parser.add_argument("--custom_filter", "--custom-filter", "--filter", dest="custom_filter", metavar="SUBSTRING",
                        help="with --gradient_values: only names containing SUBSTRING")
    _flag(parser, "tensor_order", metavar="ORDER",
          help="with --gradient_values or an operations recipe: count tensor positions in model 1's architecture "
               "order (default, built with transformers; an error when it cannot be had) or over a natural sort of "
               "the tensor names (names), for architectures transformers does not know")
    _flag(parser, "method", metavar="METHOD", help="lerp (default) or slerp (per-tensor spherical interpolation)")
    _flag(parser, "max_shard_size", metavar="SIZE",
          help='largest output shard: "2000MiB", "2GB", "500MB", "300KB" or bytes (default 2000MiB)')
    _flag(parser, "dtype", metavar="DTYPE",
          help=f"output dtype: {', '.join(DTYPE_CHOICES)} (default float16, like the original; auto = model 1's)")
    _flag(parser, "device", metavar="DEVICE",
          help="auto (every CUDA device, else the CPU), cpu, cuda (all), cuda:N or cuda:0,cuda:2 (default auto)")
    _flag(parser, "max_memory", metavar="BUDGET",
          help='memory for in-flight buffers per device, e.g. "0=20GiB,1=20GiB,cpu=8GiB" (default: a share of '
               "the free memory)")
    _flag(parser, "overwrite", action="store_true",
          help="replace a non-empty OUT that looks like a model directory (config.json, weights, model files only)")
    _flag(parser, "readers", type=int, metavar="N", default=None,
          help="reader threads per device (default 1; a many-core host with fast disks may want more)")
    _flag(parser, "checksums", action="store_true",
          help="write OUT/checksums.sha256 (sha256sum format) of every file of the output")
    _flag(parser, "allow_nonfinite", action="store_true",
          help="blend tensors holding NaN or inf (IEEE arithmetic) instead of stopping with an error")
    _flag(parser, "quiet", action="store_true", help="no progress bar or notices")
    _flag(parser, "debug", action="store_true", help="show tracebacks")


def _quiet_and_debug(parser: argparse.ArgumentParser, quiet_help: str) -> argparse.ArgumentParser:
    _flag(parser, "quiet", action="store_true", help=quiet_help)
    _flag(parser, "debug", action="store_true", help="show tracebacks")
    return parser


def build_parser(command: str) -> argparse.ArgumentParser:
    if command == "demo":
        parser = _Parser(prog="gpumerge demo", description="Build two small Llama checkpoints locally, merge them, "
                         "check that transformers loads the result, and print where it is.")
        _flag(parser, "workdir", type=Path, default=None, metavar="DIR",
              help="where to build the demo (default: a new temporary directory)")
        return _quiet_and_debug(parser, "no progress bar or notices")
    if command == "verify":
        parser = _Parser(prog="gpumerge verify", description="Check that a directory is exactly the merge its record "
                         "claims: shards and index, checksums.sha256, and (with the inputs: the recorded ones, or "
                         "given) a deterministic sample of tensors recomputed bit for bit. Exit 0 when all holds, 1 "
                         "with one line per problem, 2 for bad usage. A sweep's directory is checked variant by "
                         "variant.")
        parser.add_argument("path", metavar="OUT", help="a merge's output, or a sweep's directory")
        _flag(parser, "model_path1", metavar="PATH", help="model 1, when not where the record says")
        _flag(parser, "model_path2", metavar="PATH", help="model 2, when not where the record says")
        _flag(parser, "full", action="store_true", help="recompute every tensor, not a sample")
        return _quiet_and_debug(parser, "print only the problems")
    if command == "sweep":
        parser = _Parser(prog="gpumerge sweep", description="Many merges of one pair from one read of the inputs: "
                         "every variant of a grid (or of a settings file) written to OUTPUT_DIR/NAME/ exactly as "
                         "`gpumerge` would write it with the same settings. The merge flags set what every variant "
                         "shares.")
        _merge_flags(parser, sweep=True)
        _flag(parser, "output_dir", metavar="RUNS", help="the sweep's directory: RUNS/<variant>/, sweep.json, "
              "variants.csv; rerunning the same sweep skips the variants already complete")
        _flag(parser, "grid", action="append", metavar="KEY=VALUES",
              help="sweep one setting: V1,V2,..., START:STOP:N (N values, both ends included) or a JSON list "
                   "('[[1, 0.5, 0], [0.2, 0.8]]' for gradient_values); several --grid give their product. KEY: "
                   "gradient_start, gradient_end, layer_start, layer_end, gradient_values, layer_only, no_layers, "
                   "custom_filter, method")
        _flag(parser, "settings", type=Path, metavar="VARIANTS.yaml",
              help="a YAML list of variants instead of a grid: each a mapping of merge settings, an operations or "
                   "layer_gradients recipe, or a two-model mergekit config of the same pair, with an optional name")
        parser.add_argument("--max-variants", "--max_variants", dest="max_variants", type=int, metavar="N",
                            help="allow more than 1000 variants (up to N)")
        _flag(parser, "search", metavar="optuna", help="choose the variants with optuna instead of a grid: --trials N "
              "trials over the --space settings, each scored like an evaluated sweep's variant (needs --eval-text, or "
              "--scorers without perplexity; pip install 'gpumerge[search]'); under accelerate launch, one trial per "
              "process at a time")
        _flag(parser, "trials", type=int, metavar="N", help="with --search: the trials to complete (a rerun of the "
              "same command continues the study to N)")
        _flag(parser, "space", action="append", metavar="SPEC", help="with --search, one searched setting: "
              "KEY=LOW:HIGH, KEY=LOW:HIGH:int, KEY=LOW:HIGH:log or KEY=A|B|C; KEY a sweepable setting or "
              "layer_gradients.MODULE.K (anchor K of MODULE's gradient)")
        _flag(parser, "sampler", metavar="NAME", help="with --search: tpe (default) or cmaes")
        _flag(parser, "seed", type=int, metavar="S", help="with --search: the sampler's seed (default 0)")
        _flag(parser, "scorers", type=Path, metavar="SCORERS.yaml", help="with --search: what a trial is scored by "
              "(perplexity, your own function(model, tokenizer), lm-eval tasks), each with a weight; default: the "
              "perplexity of --eval-text")
        _flag(parser, "eval_text", action="append", type=Path, metavar="FILE",
              help="score every variant's perplexity on this UTF-8 text (repeat for several) and write only the "
                   "best (--keep); model 1 and model 2 are scored too; under accelerate launch the rows are shared "
                   "across the processes")
        _flag(parser, "eval_tokens", type=int, metavar="N", help="at most N tokens from each text")
        _flag(parser, "seq_len", type=int, metavar="N", help="tokens per window (default 512, or model 1's "
              "max_position_embeddings when that is less)")
        _flag(parser, "eval_batch", type=int, metavar="B", help="windows per forward pass (default 4)")
        _flag(parser, "keep", metavar="K", help="how many of the best variants to write: a number, all, or 0 to "
              "score only (default 1)")
        _flag(parser, "no_baselines", action="store_true", help="do not score model 1 and model 2 themselves")
        _flag(parser, "eval_dtype", metavar="DTYPE", help="the forward pass's dtype (default: float32 on a CPU, the "
              "output dtype on a GPU)")
        return parser
    if command == "plan":
        parser = _Parser(prog="gpumerge plan", description="Show what a merge would do; writes nothing.")
        _merge_flags(parser)
        _flag(parser, "plot", type=Path, default=None, metavar="FILE.png", help="draw each model's share per layer")
        return parser
    parser = _Parser(prog="gpumerge", description="Blend the decoder blocks of two checkpoints along a gradient "
                     "(BlockMerge Gradient), streaming, exact, atomic. Subcommands: plan, sweep, verify, demo.")
    _merge_flags(parser)
    parser.add_argument("--version", action="version", version=f"gpumerge {_version()}")
    _flag(parser, "report", type=Path, default=None, metavar="FILE.json",
          help="write engine timings per stage, bytes, peaks and GPU telemetry as JSON")
    return parser


def _version() -> str:
    from gpumerge.about import version

    return version()


def spec_from_args(args: argparse.Namespace, *, output_required: bool = True,
                   recipe: tuple[dict, str] | None = None) -> MergeSpec:
    """The merge the command line asks for (gpumerge.settings.merge_spec of its flags)."""
    from gpumerge.settings import merge_spec

    return merge_spec(vars(args), output_required=output_required, recipe=recipe)


def _notice_printer(quiet: bool):
    def notice(line: str) -> None:
        if not quiet:
            _say(f"gpumerge: {line}")
    return notice


class _Progress:
    """tqdm on stderr (bytes/s, ETA), with each GPU's memory and utilization from NVML when there is any."""

    def __init__(self, total_bytes: int, telemetry, quiet: bool, desc: str = "merging", unit: str = "B") -> None:
        from tqdm import tqdm

        scaled = unit == "B"
        self.bar = tqdm(total=total_bytes, unit=unit, unit_scale=scaled, unit_divisor=1024, desc=desc,
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
    return lambda total_bytes, telemetry=None, desc="merging", unit="B": _Progress(total_bytes, telemetry, quiet,
                                                                                   desc, unit)


def cmd_merge(args: argparse.Namespace) -> int:
    from gpumerge.merge import run_merge
    from gpumerge.report import summary_line

    spec = spec_from_args(args)
    result = run_merge(spec, notice=_notice_printer(spec.quiet), progress_factory=_progress_factory(spec.quiet),
                       report_path=args.report, checksums=bool(args.checksums))
    try:  # the merge is the product: a summary that cannot be printed (stdout full or closed) does not undo it
        print(summary_line(result), flush=True)
    except (OSError, ValueError):
        pass
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from gpumerge.spec import SweepSpec
    from gpumerge.sweep import run_sweep

    if not args.output_dir:
        raise SpecError("--output_dir is required: the directory the sweep writes its variants to")
    spec = SweepSpec.from_flags(vars(args))
    run = run_sweep
    if spec.search is not None:
        from gpumerge.search import run_search as run  # the same result: trials for variants
    result = run(spec, notice=_notice_printer(bool(args.quiet)), progress_factory=_progress_factory(args.quiet))
    if result is None:  # a launched run's other process: the main one reports the run
        return 0
    try:
        if result.table:
            print(result.table, flush=True)
        print(result.summary, flush=True)
    except (OSError, ValueError):
        pass
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from gpumerge.verify import summary, verify

    reports = verify(args.path, model_path1=args.model_path1, model_path2=args.model_path2, full=args.full)
    failed = False
    for report in reports:
        for problem in report.problems:
            _say(f"gpumerge: verify: {report.path}: {' '.join(problem.split())}")
            failed = True
        if not report.problems and not args.quiet:
            print(f"gpumerge: verify: {report.path}: ok ({summary(report)})", flush=True)
    return 1 if failed else 0


def cmd_plan(args: argparse.Namespace) -> int:
    from gpumerge.report import describe_plan

    spec = spec_from_args(args, output_required=False)
    describe_plan(spec, plot=args.plot, out=sys.stdout, notice=_notice_printer(spec.quiet))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gpumerge.demo import run_demo

    return run_demo(workdir=args.workdir, quiet=args.quiet)


def main(argv: list[str] | None = None, *, restore_signals: bool = True) -> int:
    """Run one command; returns the exit code. SIGINT, SIGTERM and SIGHUP stop it with 128 + the signal number and
    one line; the cleanup they start is not cut short by more signals (gpumerge.signals)."""
    from gpumerge.signals import GUARD, Interrupted

    GUARD.install()  # first: building the parser imports the package (--version)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "merge"
    debug = "--debug" in argv
    try:
        try:
            os.getcwd()
        except FileNotFoundError:  # torch's import dies with a foreign fatal error there
            return _fail("the current directory no longer exists (it was removed); cd to an existing directory")
        parser = build_parser(command)
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help, or a bad command line already reported in one line
            return exc.code if isinstance(exc.code, int) else 2
        return {"merge": cmd_merge, "plan": cmd_plan, "demo": cmd_demo, "sweep": cmd_sweep,
                "verify": cmd_verify}[command](args)
    except GpumergeError as exc:
        if debug:
            raise
        if getattr(exc, "told", False):  # a launched run's other process: the main one has the error and says it
            return 0
        return _fail(str(exc))
    except BrokenPipeError:  # `gpumerge plan ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except OSError as exc:  # permission denied, disk full, ...: still one line
        if debug:
            raise
        return _fail(f"{exc.strerror or exc}{': ' + str(exc.filename) if exc.filename else ''}")
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        done = GUARD.completed_output
        if command == "sweep":
            _say(f"gpumerge: interrupted ({signal.Signals(signum).name}); "
                 + (f"every variant was already complete in {done}" if done is not None else
                    "no partial variant was left, the variants already complete stay in the output directory: run "
                    "the same command again to finish"))
            return 128 + signum
        _say(f"gpumerge: interrupted ({signal.Signals(signum).name}); "
             + (f"the merge was already complete and is at {done}" if done is not None else
                "nothing was written to the output path" if command == "merge" else "stopped"))
        return 128 + signum
    except Exception as exc:  # a bug or an input nobody foresaw: still one line, and nothing left at OUT
        if debug:
            raise
        return _fail(f"internal error: {type(exc).__name__}: {exc} (run again with --debug for the traceback, "
                     "and please report it)")
    finally:
        GUARD.swallow()
        if restore_signals:
            GUARD.restore()


def _say(line: str) -> None:
    """One line on stderr, even when the terminal is gone (SIGHUP) or stderr is closed; in a launched run, from the
    main process alone (the others stop with the same error or signal, and say nothing)."""
    from gpumerge.distributed import is_worker

    if is_worker():
        return
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _fail(message: str) -> int:
    _say(f"gpumerge: error: {' '.join(message.split())}")
    return 2


def run() -> None:
    """The console script: main(), then exit at once with its code. Signals stay swallowed to the end and
    interpreter shutdown (atexit handlers, daemon threads) is skipped: a late signal can neither turn a finished
    run's exit code into a kill nor print tracebacks from exit handlers."""
    for name in ("stdout", "stderr"):  # started with fd 1 or 2 closed (`>&-`): write nowhere, not crash
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w"))
    code = main(restore_signals=False)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
