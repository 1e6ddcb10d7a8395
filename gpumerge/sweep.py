"""`gpumerge sweep`: many variants of one pair from one read of the inputs (write mode).

A variant is one full set of merge settings: a point of a grid (``--grid KEY=VALUES``, their product) or an entry of
a settings file. Each is made into a MergeSpec exactly as the command line of a single merge would be, and planned
with the same checks. All of them share one layout (tensors, output dtype, shards, offsets); what differs is the
rule per tensor, so the sweep reads each tensor once and blends it once per distinct rule (gpumerge.plan's
sweep_batches), with the same kernel as a single merge; tensors a variant keeps unchanged are copied file to file
into it. Each variant appears at RUNS/<name>/ when complete, byte for byte what `gpumerge` writes with its settings.

RUNS also holds sweep.json (the inputs' fingerprints, the variants and their settings: rerunning the same sweep
skips the variants already complete; a different sweep is refused unless --overwrite) and variants.csv.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import secrets
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from gpumerge.errors import GpumergeError, OutputError, SpecError
from gpumerge.runs import RUNS_FILES
from gpumerge.signals import GUARD
from gpumerge.spec import (DEFAULT_MAX_VARIANTS, NAME_RE, GridAxis, MergeSpec, SweepSpec, grid_size, parse_grid,
                           shown)

RESERVED_NAMES = ("model_1", "model_2")  # the parents' rows in an evaluated sweep's results
MAX_VARIANTS = 100_000  # --max-variants' own bound: the variants are planned (and held) before any work
# The settings that say how to blend: a settings file's entries set them, never the command line.
_BLEND_FLAGS = ("gradient_start", "gradient_end", "layer_start", "layer_end", "gradient_values", "layer_only",
                "no_layers", "custom_filter", "method", "tensor_order")
# Settings one sweep has one value of: the command line's, never a settings-file entry's.
_FIXED_KEYS = ("output_model_path", "device", "max_memory")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    values: dict  # column (a swept setting, or a settings-file key) -> value: variants.csv and sweep.json
    spec: MergeSpec
    paths: tuple = (None, None)  # the model paths a settings-file entry names, to be the sweep's pair


@dataclass(frozen=True, slots=True)
class SweepResult:
    runs: Path
    written: tuple[str, ...]
    complete: tuple[str, ...]  # complete before this run: skipped
    aliases: dict  # later name -> the variant it is the same merge as
    elapsed_s: float
    bytes_read: int  # input bytes read for the blends, once for every variant
    bytes_written: int
    bytes_copied: int = 0  # unchanged tensors copied file to file into the variants (part of bytes_written)
    table: str = ""  # an evaluated sweep's ranked table
    best: str | None = None  # an evaluated sweep's best variant (with what it means, when it is model 1 itself)
    rows: tuple[dict, ...] = ()  # an evaluated sweep's rows, best first, as results.json has them
    timings: dict | None = None  # an evaluated sweep's: where its time went (gpumerge.results.timings_text)

    @property
    def paths(self) -> tuple[Path, ...]:
        """The variant directories this run wrote."""
        return tuple(self.runs / name for name in self.written)

    @property
    def summary(self) -> str:
        from gpumerge.outdir import size_text

        parts = [f"wrote {len(self.written)} variant(s) ({size_text(self.bytes_written)}) in {self.elapsed_s:.1f} "
                 f"s; {size_text(self.bytes_read)} of the inputs read once for the blends, "
                 f"{size_text(self.bytes_copied)} of "
                 "unchanged tensors copied file to file"
                 if self.written else "nothing to write"]
        if self.complete:
            parts.append(f"{len(self.complete)} already complete")
        if self.best:
            parts.insert(0, f"best: {self.best}")
        if self.timings:
            from gpumerge.results import timings_text

            parts.append("time: " + timings_text(self.timings))
        if self.aliases:
            parts.append(f"{len(self.aliases)} alias(es): " + ", ".join(f"{k} = {v}" for k, v in
                                                                      list(self.aliases.items())[:4])
                         + (", ..." if len(self.aliases) > 4 else ""))
        return f"gpumerge: sweep at {self.runs}: " + "; ".join(parts)


# ---- variants -----------------------------------------------------------------------------------------------------

def variants_from_args(args) -> tuple[list[Variant], list[str]]:
    """The sweep's variants, in order, and the columns of variants.csv (the swept settings)."""
    if args.grid and args.settings is not None:
        raise SpecError("give --grid or --settings, not both (a settings file lists whole variants)")
    if not args.grid and args.settings is None:
        raise SpecError("a sweep needs --grid KEY=VALUES (one or more) or --settings VARIANTS.yaml")
    limit = args.max_variants if args.max_variants is not None else DEFAULT_MAX_VARIANTS
    if not 1 <= limit <= MAX_VARIANTS:
        raise SpecError(f"--max-variants must be from 1 to {MAX_VARIANTS} (each variant is a full model on disk), got "
                        f"{args.max_variants}")
    if args.settings is not None:
        if args.config is not None:
            raise SpecError("give --config or --settings, not both: each entry of the settings file is a recipe")
        given = [key for key in _BLEND_FLAGS if getattr(args, key, None) is not None]
        if given:
            raise SpecError(f"--{given[0]} cannot be given with --settings: each entry of the settings file is a whole "
                            "variant; set it in the entries")
        return _from_settings(args, limit)
    return _from_grid(args, limit)


def _too_many(count: int, limit: int, explicit: bool) -> SpecError:
    more = (f"--max-variants {limit}" if explicit else f"{limit} without --max-variants N")
    return SpecError(f"the sweep has {count} variants, more than {more}; each is a full model on disk: sweep fewer "
                     "values, or pass --max-variants N to allow more")


def _from_grid(args, limit: int) -> tuple[list[Variant], list[str]]:
    from gpumerge.settings import merge_spec, recipe_settings

    axes = [parse_grid(text) for text in args.grid]
    keys = [axis.key for axis in axes]
    for key in keys:
        if keys.count(key) > 1:
            raise SpecError(f"--grid {key} is given twice; list all its values in one --grid")
        if getattr(args, key, None) is not None:
            raise SpecError(f"--{key} is set and also swept by --grid {key}; give one of them")
    count = grid_size(axes)
    if count > limit:
        raise _too_many(count, limit, args.max_variants is not None)
    recipe = (recipe_settings(args.config), str(args.config)) if args.config is not None else None
    points = [dict(zip(keys, combo)) for combo in itertools.product(*(axis.values for axis in axes))]
    names = grid_names(points, [axis for axis in axes if len(axis.values) > 1] or axes)
    variants = []
    for name, point in zip(names, points):
        flags = SimpleNamespace(**{**vars(args), **{key: _as_flag(value) for key, value in point.items()}})
        with _variant_errors(name):
            variants.append(Variant(name, point, merge_spec(vars(flags), output_required=False, recipe=recipe)))
    return variants, keys


def _as_flag(value):
    """A grid value as its command-line flag holds it (a store_true flag not given is None)."""
    if value is False:
        return None
    return list(value) if isinstance(value, tuple) else value


def grid_names(points: list[dict], swept: list[GridAxis]) -> list[str]:
    """``gs0.25-ge0.75``: each swept setting's short name and value; ``v001``, ``v002``, ... for every variant
    when such names would not be unique, safe directory names, or short. A number that is short as it is keeps its
    digits (0.25); a long one (linspace's 0.6000000000000001, 0.41414141414141414) is named by the shortest decimal
    within a tenth of the axis's smallest step (ge0.6, ge0.414), so the names stay distinct; the exact values are in
    the columns."""
    tolerance = {axis.key: _tolerance(axis.values) for axis in swept}
    names = ["-".join(_name_part(axis, point[axis.key], tolerance[axis.key]) for axis in swept) for point in points]
    folded = [name.casefold() for name in names]
    if (len(set(folded)) == len(names) and all(NAME_RE.fullmatch(n) for n in names)
            and not set(folded) & set(RESERVED_NAMES + RUNS_FILES)):
        return names
    return numbered(len(points))


def numbered(count: int) -> list[str]:
    width = max(3, len(str(count)))
    return [f"v{i + 1:0{width}d}" for i in range(count)]


def _numbers(value) -> list[float]:
    if isinstance(value, tuple):
        return [v for part in value for v in _numbers(part)]
    return [value] if isinstance(value, float) else []


def _tolerance(values) -> float:
    """A tenth of the smallest gap between the axis's numbers (0 when it has fewer than two)."""
    numbers = sorted({v for value in values for v in _numbers(value)})
    gaps = [b - a for a, b in zip(numbers, numbers[1:])]
    return min(gaps) / 10 if gaps else 0.0


def _name_part(axis: GridAxis, value, tolerance: float = 0.0) -> str:
    if axis.key == "method":
        return str(value)
    if isinstance(value, bool):
        return axis.short + ("1" if value else "0")
    return axis.short + _name_value(value, tolerance)


def _name_value(value, tolerance: float = 0.0) -> str:
    if isinstance(value, tuple):
        return "_".join(_name_value(v, tolerance) for v in value)
    if isinstance(value, float):
        text = repr(value)
        if float(f"{value:.6g}") != value:  # a long number: the shortest decimal within the tolerance
            text = next(t for t in (f"{value:.{d}g}" for d in range(1, 18))
                        if abs(float(t) - value) <= tolerance or float(t) == value)
        return text[:-2] if text.endswith(".0") else text
    return re.sub(r"[^A-Za-z0-9.+-]", "_", str(value))


class _variant_errors:
    """Errors while building or planning a variant name it: ``variant gs0.25-ge1: ...`` (same error class)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, GpumergeError) and f"variant {self.name}" not in str(exc):
            raise type(exc)(f"variant {self.name}: {exc}") from None
        return False


def _from_settings(args, limit: int) -> tuple[list[Variant], list[str]]:
    from gpumerge import fsutil
    from gpumerge.settings import merge_spec
    from gpumerge.mergekit import parse_mergekit
    from gpumerge.recipes import is_mergekit_config, load_yaml, parse_recipe
    from gpumerge.spec import MAX_RECIPE_BYTES, check_home, parse_dtype, parse_size

    path = args.settings
    what = f"--settings {path}"
    check_home(path, what=what)
    raw = fsutil.read_regular(Path(path).expanduser(), max_bytes=MAX_RECIPE_BYTES, what=what, error=SpecError)
    data = load_yaml(fsutil.decode_text(raw, what=what, error=SpecError), source=str(path), mapping=False)
    if not isinstance(data, list) or not data or not all(isinstance(entry, dict) for entry in data):
        raise SpecError(f"{what}: a settings file is a YAML list of variants, each a mapping of merge settings "
                        "(e.g. `- {name: soft, gradient_start: 0.2, gradient_end: 0.6}`)")
    if len(data) > limit:
        raise _too_many(len(data), limit, args.max_variants is not None)
    defaults = numbered(len(data))
    dtype = parse_dtype(args.dtype) if args.dtype is not None else "float16"
    shard_bytes = parse_size(args.max_shard_size if args.max_shard_size is not None else "2000MiB",
                             what="--max_shard_size")
    variants, columns, seen = [], [], {}
    for index, entry in enumerate(data):
        entry = dict(entry)
        name = entry.pop("name", None)
        if isinstance(name, int) and not isinstance(name, bool):
            name = str(name)
        if name is not None:
            _check_name(name, where=f"{path}: variant {index + 1}")
        name = name or defaults[index]
        if name.casefold() in seen:
            raise SpecError(f"{path}: the variant name {name} is used twice (variants {seen[name.casefold()] + 1} "
                            f"and {index + 1}); names are directories in --output_dir and must differ")
        seen[name.casefold()] = index
        where = f"{path}: variant {name}"
        if not entry:
            raise SpecError(f"{where} sets nothing; give its settings (gradient_start, operations, ...)")
        fixed = [key for key in _FIXED_KEYS if key in entry]
        if fixed:
            raise SpecError(f"{where}: {fixed[0]} is the same for every variant of a sweep; give it on the command "
                            f"line" + ("" if fixed[0] == "output_model_path" else f" (--{fixed[0]})")
                            + (" (the sweep writes RUNS/NAME/)" if fixed[0] == "output_model_path" else ""))
        settings = parse_mergekit(entry, source=where) if is_mergekit_config(entry) else parse_recipe(entry,
                                                                                                     source=where)
        if "dtype" in settings and parse_dtype(str(settings["dtype"])) != dtype:
            raise SpecError(f"{where} sets dtype {settings['dtype']}, and the sweep writes {dtype}: every variant "
                            "of a sweep has one output dtype (set it with --dtype)")
        if "max_shard_size" in settings and parse_size(settings["max_shard_size"], what=where) != shard_bytes:
            raise SpecError(f"{where} sets max_shard_size {settings['max_shard_size']}, and the sweep's is "
                            f"{shard_bytes} bytes: every variant of a sweep has one layout (set --max_shard_size)")
        paths = (settings.get("model_path1"), settings.get("model_path2"))
        with _variant_errors(name):
            spec = merge_spec(dict(vars(args)), output_required=False, recipe=(settings, where))
        values = {key: value for key, value in entry.items()}
        columns += [key for key in values if key not in columns]
        variants.append(Variant(name, values, spec, paths))
    return variants, columns


def _check_name(name, *, where: str) -> None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise SpecError(f"{where}: name {shown(name)} must be 1 to 100 letters, digits, '.', '_', '+' or '-', "
                        "starting with a letter or digit (it is a directory name)")
    if name.casefold() in RESERVED_NAMES + RUNS_FILES:
        raise SpecError(f"{where}: name {name} is reserved for the sweep's own files and rows; choose another")


# ---- planning -----------------------------------------------------------------------------------------------------

def plan_variants(variants: list[Variant], a, b, *, notice: Callable[[str], None],
                  each: Callable[[int, object], None] | None = None) -> tuple[list, list[str]]:
    """Every variant planned with the checks of a single merge (errors name the variant); notices said once. All
    plans must share one layout: the output dtype, shards and offsets. Returns the plans and each one's rules
    signature. ``each(distinct, plan)`` is called after each plan with the number of distinct rule sets so far (a
    check that can refuse before the rest is planned)."""
    from gpumerge.merge import plan_merge

    orders: dict = {}
    notices: dict[str, list[str]] = {}
    plans, signatures = [], []
    for variant in variants:
        with _variant_errors(variant.name):
            _check_pair(variant, a, b)
            plans.append(plan_merge(variant.spec, a, b, notice=lambda line: notices.setdefault(line, []).append(
                variant.name), orders=orders))
        signatures.append(rules_signature(plans[-1]))
        if each is not None:
            each(len(set(signatures)), plans[-1])
    for line, names in notices.items():
        notice(line if len(names) == len(variants) else f"{_listed(names)}: {line}")
    first = plans[0]
    for variant, plan in zip(variants, plans):
        if plan.out_dtype != first.out_dtype:
            raise SpecError(f"variant {variant.name} writes {plan.out_dtype_name} and variant {variants[0].name} "
                            f"{first.out_dtype_name}: every variant of a sweep has one output dtype (a mergekit "
                            "config's dtype or out_dtype sets it; make them agree, or give --dtype)")
        if _layout(plan) != _layout(first):
            raise SpecError(f"variant {variant.name} lays its shards out unlike variant {variants[0].name}; every "
                            "variant of a sweep has one layout (the same --max_shard_size and dtype)")
    return plans, signatures


def _check_pair(variant: Variant, a, b) -> None:
    """A settings-file entry that names models must name the sweep's pair (its paths are overridden, like a
    --config's, by the command line)."""
    from gpumerge.checkpoint import resolve_model_dir

    for given, ckpt, role in zip(variant.paths, (a, b), ("model_path1", "model_path2")):
        if given is None:
            continue
        try:
            same = resolve_model_dir(str(given), label=role).resolve() == Path(ckpt.root).resolve()
        except GpumergeError:
            same = False
        if not same:
            raise SpecError(f"names {role} {shown(given, limit=80)}, which is not the sweep's {ckpt.root}; every "
                            "variant of a sweep blends the same pair (drop the path, or sweep that pair)")


def _listed(names: list[str]) -> str:
    return "variant" + ("s " if len(names) > 1 else " ") + ", ".join(names[:4]) + (
        f", ... ({len(names)} in all)" if len(names) > 4 else "")


def _layout(plan) -> list:
    return [(s.filename, s.data_bytes, tuple((j.name, j.offset, j.nbytes, j.out_dtype) for j in s.jobs))
            for s in plan.shards]


def rules_signature(plan) -> str:
    """The resolved rule of every tensor (t, method, coefficients, roundings): equal signatures, the same merge."""
    from gpumerge.plan import job_rule

    digest = hashlib.sha256()
    for job in plan.jobs:
        digest.update(repr((job.name, job_rule(job) if job.blended else None)).encode())
    return digest.hexdigest()


def find_aliases(variants: list[Variant], signatures: list[str]) -> dict[str, str]:
    """Later name -> the first variant with the same rules (the same signature)."""
    first: dict[str, str] = {}
    aliases = {}
    for variant, signature in zip(variants, signatures):
        if signature in first:
            aliases[variant.name] = first[signature]
        else:
            first[signature] = variant.name
    return aliases


# ---- the run ------------------------------------------------------------------------------------------------------

def _open_outputs(plan) -> int:
    """Files a variant holds open while it is written: its shards, its directory's lock and one more."""
    return len(plan.shards) + 2


def disk_bytes(plan, aux_bytes: int) -> int:
    """Disk a variant takes: its shards, model 1's aux files, and a MiB of headroom per shard."""
    return plan.bytes_written + aux_bytes + 2**20 * len(plan.shards)


def _early_limits(output_dir, a, b) -> Callable[[int, object], None] | None:
    """For a write-mode sweep into a new or empty RUNS (every distinct variant will be written): refuse as soon as
    the variants planned so far need more open files or disk space than there are, instead of planning them all
    first (a 316 x 316 grid takes a minute and gigabytes to plan)."""
    import os
    import resource
    import shutil

    from gpumerge import writer
    from gpumerge.outdir import existing_parent

    from gpumerge.merge import open_files_needed

    runs = Path(output_dir).expanduser()
    try:
        if runs.is_dir() and any(os.scandir(runs)):
            return None  # a resume: what is complete is known only once every variant is planned
        free = shutil.disk_usage(existing_parent(runs)).free
    except (OSError, RuntimeError):
        return None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    aux = writer.aux_bytes(a.root)

    def check(distinct: int, plan) -> None:
        files = open_files_needed(a, b, outputs=distinct * _open_outputs(plan))
        if hard != resource.RLIM_INFINITY and files > hard:
            raise OutputError(f"the sweep has at least {distinct} distinct variants, which need about {files} open "
                              f"files, and the limit is {hard} (ulimit -n); sweep fewer values or raise the limit")
        need = distinct * disk_bytes(plan, aux)
        if need > free:
            from gpumerge.outdir import size_text

            raise OutputError(f"not enough disk space for the sweep at {runs}: its first {distinct} distinct "
                              f"variants alone need {size_text(need)}, and {size_text(free)} are free; sweep fewer "
                              "values or choose another directory")
    return check


@dataclass(slots=True)
class _Planned:
    """A sweep planned and checked, before its directory is looked at: the variants, their plans, what is expected
    of each complete variant, the scoring set up (an evaluated sweep), and the record it commits."""

    args: SimpleNamespace
    variants: list
    columns: list
    plans: list
    signatures: list
    aliases: dict
    distinct: list  # (variant, plan) of every variant that is not an alias
    expected: dict
    scoring: dict | None
    record: dict
    inputs: object


def run_sweep(spec: SweepSpec, *, notice: Callable[[str], None] = print, progress_factory=None,
              budget: dict[str, int] | None = None, batch_bytes: int | None = None,
              simulate_staging: bool = False, input_budget: int | None = None) -> SweepResult | None:
    """Every variant planned and checked, then written from one read of the inputs (an evaluated sweep: scored, and
    the best written). ``spec``: a SweepSpec (or an object with the command line's flags as attributes, which is
    read as one). ``budget`` and ``batch_bytes`` replace the probed memory budget and the batch size (tests force
    small batches with them); ``simulate_staging`` runs the GPU path's staging on the CPU (as run_merge's);
    ``input_budget`` replaces what an evaluated sweep may hold of the blended tensors' inputs (0 forces reading them
    again for each variant). Under ``accelerate launch`` with several processes, every process but the main one
    scores its share of the rows and returns None (gpumerge.distributed)."""
    from gpumerge.merge import open_pair

    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_flags(vars(spec))
    if spec.search is not None:
        raise SpecError("a search runs with gpumerge.search.run_search (the command line chooses it for --search)")
    from gpumerge.space import check_search_flags

    check_search_flags(spec)
    if not spec.output_dir:
        raise SpecError("--output_dir is required: the directory the sweep writes its variants to")
    args = SimpleNamespace(**spec.flags())  # the flags each variant is built from, as the command line gives them
    began = time.perf_counter()
    check_eval_flags(args)
    variants, columns = variants_from_args(args)
    group = launched(args)
    a, b = open_pair(variants[0].spec)
    if not group.is_main:
        notice, progress_factory = (lambda line: None), None
    with a, b:
        planned = _plan(args, variants, columns, a, b, notice=notice, input_budget=input_budget)
        if planned.scoring:
            planned.scoring["began"] = began  # the breakdown's setup: planning, tokenizing, checks
            share_scoring(planned.scoring, group)
        elif group.size > 1:
            raise SpecError("several processes (accelerate launch) share the scoring of an evaluated sweep "
                            "(--eval-text) or a search; a sweep that writes every variant runs in one process: "
                            "start it without accelerate launch")
        if not group.is_main:
            score_share(planned, a, b, group)
            return None
        try:
            runs, state = _check_runs(planned, a, b)
            written, state, outcome = _under_lock(planned, runs, state, a, b, notice=notice,
                                                  progress_factory=progress_factory, budget=budget,
                                                  batch_bytes=batch_bytes, simulate_staging=simulate_staging)
        except BaseException as exc:
            group.tell_error(exc)  # the others, still waiting for their share, stop with it
            raise
    table, best, rows, timings, stats = outcome
    return SweepResult(runs, written, tuple(state.complete), planned.aliases, time.perf_counter() - began, *stats,
                       table=table or "", best=best, rows=rows, timings=timings)


def launched(args):
    """This run's processes (gpumerge.distributed): one, or those ``accelerate launch`` started, each scoring on its
    own device (a GPU by its local rank; the CPU with --device cpu or without CUDA)."""
    from gpumerge.distributed import processes, world_size

    if world_size() > 1 and str(args.device or "auto").startswith("cuda:"):
        raise SpecError(f"--device {args.device}: in a launched run each process scores on the GPU of its local "
                        "rank; give --device auto (or cuda, or cpu)")
    return processes(device_flag=str(args.device or "auto"))


def _plan(args, variants, columns, a, b, *, notice, input_budget) -> _Planned:
    """Every variant planned (all problems at once), aliases found, the scoring set up, the record made."""
    from gpumerge import runs as runs_dir
    from gpumerge.outdir import Inputs, canonical

    base = variants[0].spec
    GUARD.poll()
    plans, signatures = plan_variants(variants, a, b, notice=notice,
                                      each=None if args.eval_text else _early_limits(args.output_dir, a, b))
    GUARD.poll()
    aliases = find_aliases(variants, signatures)
    if aliases:
        notice(f"{len(aliases)} variant(s) blend every tensor as an earlier one does and are not written twice: "
               + ", ".join(f"{k} = {v}" for k, v in list(aliases.items())[:8])
               + (", ..." if len(aliases) > 8 else ""))
    for flag, value in (("--model_path1", base.model_path1), ("--model_path2", base.model_path2)):
        canonical(value, flag=flag)
    distinct = [(v, p) for v, p in zip(variants, plans) if v.name not in aliases]
    expected = {v.name: (p, runs_dir.expected_record(v, p, a, b)) for v, p in distinct}
    scoring = eval_setup(args, base, a, plans, notice) if args.eval_text else None
    if scoring and input_budget is not None:
        scoring["input_budget"] = input_budget
    record = runs_dir.sweep_record(variants, plans, signatures, aliases, columns, a, b,
                                   eval=scoring["record"] if scoring else None)
    return _Planned(args, variants, columns, plans, signatures, aliases, distinct, expected, scoring, record,
                    Inputs.of(a, b))


def _check_runs(planned: _Planned, a, b):
    """RUNS checked against the inputs and judged (without the lock, bytes unread: the one under it decides), and
    what the variants still to write need (open files, disk space) checked before any work. Returns (RUNS, its
    state)."""
    from gpumerge import runs as runs_dir
    from gpumerge import writer
    from gpumerge.merge import check_open_files, preflight
    from gpumerge.outdir import check_output_path, check_space

    state = [runs_dir.RunsState()]

    def existing(path: Path) -> None:
        if not runs_dir.commit_begun(path):  # else judged under the lock, once that commit is finished
            state[0] = runs_dir.judge_runs(path, planned.record, planned.expected,
                                           overwrite=bool(planned.args.overwrite), read_bytes=False)

    runs = check_output_path(planned.args.output_dir, inputs=planned.inputs, overwrite=True, flag="--output_dir",
                             existing=existing)
    pending = [(v, p) for v, p in planned.distinct if v.name not in state[0].complete]
    if planned.scoring:  # at most --keep variants are written: the space for the largest of them
        pending = sorted(pending, key=lambda vp: -vp[1].bytes_written)[:planned.scoring["keep"]]
    check_open_files(a, b, outputs=sum(_open_outputs(p) for _, p in pending))
    aux = writer.aux_bytes(a.root)
    check_space(runs, sum(disk_bytes(p, aux) for _, p in pending), what=f"the sweep's {len(pending)} variant(s)")
    preflight(planned.plans[0], a, b, more=tuple(planned.plans[1:]))
    GUARD.poll()
    return runs, state[0]


def _under_lock(planned: _Planned, runs: Path, state, a, b, *, notice, progress_factory, budget, batch_bytes,
                simulate_staging):
    """Under RUNS's lock: a commit a killed run had begun finished, RUNS judged again (every byte), the variants
    scored (an evaluated sweep) and written, and the records committed with them. RUNS and the parents this run made
    are removed again when it fails. Returns (names written, RUNS's state, (table, best, rows, byte counts))."""
    from gpumerge import runs as runs_dir

    def judge():  # again, under the lock (every byte this time)
        return runs_dir.judge_runs(runs, planned.record, planned.expected, overwrite=bool(planned.args.overwrite))

    with runs_dir.locked(runs, notice=notice, check=judge) as state:
        pending, files, table, best, rows, timed = _score_and_record(planned, runs, state, a, b, notice=notice,
                                                                     progress_factory=progress_factory)
        remove = tuple(name for name in RUNS_FILES if name not in files)
        writing = time.perf_counter()

        def commit() -> None:
            if timed is not None:  # results.json says where the time went, the writing of the kept variants too
                timed[0]["writing_s"] = time.perf_counter() - writing
                files["results.json"] = timed[1](timed[0])
            runs_dir.commit_records(runs, files, remove=remove)

        stats = write_variants(pending, a, b, runs=runs, inputs=planned.inputs, notice=notice,
                               replace=state.replace, said_devices=planned.scoring is not None,
                               slerp_ready=planned.scoring is not None,
                               checksums=bool(getattr(planned.args, "checksums", False)),
                               progress_factory=progress_factory, budget=budget, batch_bytes=batch_bytes,
                               simulate_staging=simulate_staging, on_finalized=commit)
        runs_dir.tidy_locks(runs, state.complete)
        runs_dir.retire(runs, state.retire, notice=notice)
    return tuple(v.name for v, _ in pending), state, (table, best, rows, timed[0] if timed else None, stats)


def _score_and_record(planned: _Planned, runs: Path, state, a, b, *, notice, progress_factory):
    """The variants to write and the record files to commit with them (made now, put in place only with the
    variants they describe: until then RUNS keeps the earlier sweep's records as they were). An evaluated sweep
    scores every row first and writes only the kept variants. Returns (pending, files, table, best, rows, timed):
    ``timed``, an evaluated sweep's (timings, a function of them giving results.json), else None."""
    from gpumerge import runs as runs_dir

    record, scoring = planned.record, planned.scoring
    pending = [(v, p) for v, p in planned.distinct if v.name not in state.complete]
    record["retiring"] = state.retire
    files: dict[str, bytes] = {}
    table = best = timed = None
    result_rows: tuple[dict, ...] = ()
    if scoring:
        work, record["history"] = runs_dir.start_pending(runs, record["sweep"], state.history)
        rows, kept, scored, timings = _score(scoring, planned.variants, planned.plans, planned.signatures,
                                             planned.aliases, a, b, runs=runs, work=work,
                                             resume=state.action == "resume", history=record["history"],
                                             progress_factory=progress_factory, notice=notice)
        # the plans as scored: slerp coefficients already there, their tensors not read a second time
        pending = [(v, scored[v.name]) for v, _ in planned.distinct if v.name in kept and v.name not in state.complete]
        table, best, files, remake = _results(scoring, rows, planned.columns, record)
        from gpumerge.results import ranked_rows

        result_rows = tuple(ranked_rows(rows))
        timed = (timings, remake)
    else:
        record["history"] = state.history or secrets.token_hex(16)
    files[runs_dir.SWEEP_FILE] = (json.dumps(record, indent=2) + "\n").encode()
    files[runs_dir.VARIANTS_FILE] = runs_dir.variants_csv(planned.variants, planned.columns, planned.aliases)
    return pending, files, table, best, result_rows, timed


# ---- an evaluated sweep ----------------------------------------------------------------------------------------

_EVAL_FLAGS = ("eval_tokens", "seq_len", "eval_batch", "keep", "no_baselines", "eval_dtype")


def check_eval_flags(args, *, scored: bool = False) -> None:
    """The scoring flags mean nothing without --eval-text: refused, never silently ignored. ``scored``: the run
    scores without texts (a search whose scorers have no perplexity): then only the texts' own flags need them."""
    flags = ("eval_tokens", "seq_len") if scored else _EVAL_FLAGS
    given = [k for k in flags if getattr(args, k, None) is not None and getattr(args, k) is not False]
    if given and not getattr(args, "eval_text", None):
        raise SpecError(f"--{given[0].replace('_', '-')} sets how variants are scored; give --eval-text FILE too "
                        "(without it every variant is written and none is scored)")

def eval_setup(args, base: MergeSpec, a, plans, notice) -> dict:
    """The evaluation's settings checked, the texts tokenized, the device and dtype chosen: before any work. Without
    --eval-text (a search scored by other scorers than perplexity) there are no texts: ``texts`` is empty."""
    from gpumerge.devices import resolve_devices
    from gpumerge.evaluate import EvalSettings, load_texts
    from gpumerge.spec import parse_dtype
    from gpumerge.sweep_eval import eval_record

    keep = str(args.keep if args.keep is not None else 1).strip().lower()
    if keep != "all" and not (keep.isascii() and keep.isdigit() and 0 <= int(keep) <= MAX_VARIANTS):
        raise SpecError(f"--keep must be a number of variants from 0 (score only, write no model) to {MAX_VARIANTS}, "
                        f"or all; got {shown(args.keep)}")
    limit = a.config.get("max_position_embeddings")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise SpecError(f"model 1's config.json gives max_position_embeddings {shown(limit)}: a window of at least "
                        "2 tokens is needed to score perplexity")
    seq_len = args.seq_len
    if seq_len is None:  # 512, or the model's own window when it is shorter
        seq_len = min(512, limit) if limit is not None else 512
    settings = EvalSettings(tuple(args.eval_text or ()), eval_tokens=args.eval_tokens, seq_len=seq_len,
                            batch=args.eval_batch if args.eval_batch is not None else 4, required=bool(args.eval_text))
    if isinstance(limit, int) and settings.seq_len > limit:
        raise SpecError(f"--seq-len {settings.seq_len} is beyond model 1's max_position_embeddings ({limit}); give "
                        f"--seq-len {limit} or less")
    devices, device_notice = resolve_devices(base.device, scoring=True)
    if device_notice:
        notice(device_notice)
    device = devices[0]
    if len(devices) > 1:
        notice(f"scoring on {device} (an evaluated sweep uses one device)")
    if args.eval_dtype is not None:
        eval_dtype = args.eval_dtype.lower()
        eval_dtype = parse_dtype(eval_dtype) if eval_dtype in ("float32", "bfloat16", "float16", "fp32", "bf16",
                                                               "fp16", "half", "float") else "auto"
        if eval_dtype == "auto":
            raise SpecError(f"--eval-dtype {shown(args.eval_dtype)} is not one of float32, bfloat16, float16")
    else:
        eval_dtype = "float32" if device == "cpu" else plans[0].out_dtype_name
    import importlib.util

    plot = importlib.util.find_spec("matplotlib") is not None
    if not plot:
        notice("sweep.png will not be drawn: matplotlib is not installed (pip install 'gpumerge[plot]')")
    texts = load_texts(settings, a.root, vocab_size=a.config.get("vocab_size")) if settings.texts else []
    record = eval_record(settings, texts, out_dtype=plans[0].out_dtype_name, eval_dtype=eval_dtype,
                         device_kind="cpu" if device == "cpu" else "cuda")
    return {"settings": settings, "texts": texts, "device": device, "eval_dtype": eval_dtype, "record": record,
            "keep": MAX_VARIANTS if keep == "all" else int(keep), "baselines": not args.no_baselines,
            "max_memory": base.max_memory, "plot": plot, "batch_given": args.eval_batch is not None}


def _score(scoring: dict, variants, plans, signatures, aliases, a, b, *, runs: Path, work: Path, resume: bool,
           history: str, progress_factory, notice):
    """Every row scored, or taken from this sweep's committed results.jsonl (``resume``) or from the rows an
    interrupted run of it scored (``work``, the pending directory: new rows are appended there); rows without this
    directory's history mark are scored again. Returns (rows, names of the variants to keep, the variants' plans by
    name with their slerp coefficients). In a launched run of several processes (``scoring["processes"]``) the
    rows still to score are named to the others, who score their share (``score_share``)."""
    from gpumerge.distributed import SINGLE
    from gpumerge.results import RESULTS_JSONL, load_done, ranked
    from gpumerge.sweep_eval import score_rows

    rows, by_name = scoring_rows(scoring, variants, plans, signatures, aliases, a, b)
    done = load_done(runs / RESULTS_JSONL, history) if resume else {}
    done.update(load_done(work / RESULTS_JSONL, history))
    group = scoring.get("processes") or SINGLE
    todo = [row.key for row in rows if row.key not in done]
    group.broadcast(("score", todo))
    setup_s = time.perf_counter() - scoring.get("began", time.perf_counter())
    _preload_matplotlib()  # sweep.png comes at the end: import its library while the variants are scored
    bar = progress_factory(len(rows), desc="scoring", unit="variant") if progress_factory else None
    best = [math.inf, ""]

    def advance(row) -> None:
        if row.perplexity < best[0] and not row.baseline:
            best[:] = [row.perplexity, row.name]
        if bar is not None:
            bar.update(1)
            bar.bar.set_postfix_str(f"best {best[1]} {best[0]:.4f}" if best[1] else "", refresh=False)

    try:
        # the model is built at the first row left to score (a rerun of a finished sweep reads none)
        spent = score_rows(lambda: resident_model(scoring, plans, list(by_name.values()), a, b, notice), rows, by_name,
                           scoring["texts"], settings=scoring["settings"], results=work / RESULTS_JSONL, done=done,
                           history=history, progress=advance, processes=group)
    finally:
        if bar is not None:
            bar.close()
    broken = [r.name for r in rows if not math.isfinite(r.perplexity)]
    if broken:
        notice(f"{len(broken)} row(s) scored NaN or infinite perplexity (a blend out of the eval dtype's range?): "
               + ", ".join(broken[:6]) + (", ..." if len(broken) > 6 else "") + "; ranked last, never kept")
    kept = [r.name for r in ranked([r for r in rows if not r.baseline and math.isfinite(r.perplexity)])]
    kept = kept[:scoring["keep"]]
    for row in rows:  # kept: written now, or already complete in RUNS from an earlier run of this sweep
        row.kept = row.name in kept or (not row.baseline and (runs / row.name).is_dir())
    timings = {"setup_s": setup_s, **spent}
    return rows, kept, by_name, timings


def scoring_rows(scoring: dict, variants, plans, signatures, aliases, a, b):
    """An evaluated sweep's rows (the parents first, unless --no-baselines; then each distinct variant) and the
    variants' plans by name, slerp coefficients computed."""
    from gpumerge.results import Row, row_key

    fingerprints = [a.fingerprint(), b.fingerprint()]
    rows = []
    if scoring["baselines"]:
        rows += [Row(name, {}, row_key(fingerprints, name, scoring["record"]), baseline=True)
                 for name in ("model_1", "model_2")]
    by_name = {}
    for variant, plan, signature in zip(variants, plans, signatures):
        if variant.name not in aliases:
            rows.append(Row(variant.name, variant.values, row_key(fingerprints, signature, scoring["record"]),
                            model_1_itself=all(job.t == 0 for job in plan.jobs if job.blended)))
            by_name[variant.name] = plan
    if any(job.method == "slerp" for plan in by_name.values() for job in plan.jobs):
        from gpumerge.pipeline import slerp_prepass_many

        by_name = dict(zip(by_name, slerp_prepass_many(list(by_name.values()), a, b)))
    return rows, by_name


def resident_model(scoring: dict, plans, scored_plans, a, b, notice):
    """The model an evaluated sweep (or a search) scores, fitted to its device first (fit_scoring): the tensors some
    of ``scored_plans`` blend held with their inputs."""
    from gpumerge.sweep_eval import ResidentModel

    budget_bytes = fit_scoring(scoring, plans, scored_plans, a, b, notice)
    return ResidentModel(a, b, list(scored_plans), device=scoring["device"], eval_dtype=scoring["eval_dtype"],
                         notice=notice, max_memory=scoring["max_memory"], budget_bytes=budget_bytes)


def share_scoring(scoring: dict, group) -> None:
    """The scoring set up for this run's processes (gpumerge.distributed): each on its own device, planning with
    its part of a device it shares."""
    scoring["processes"] = group
    scoring["device"] = group.device or scoring["device"]
    scoring["free_part"] = group.part()


def score_share(planned, a, b, group) -> None:
    """A process other than the main one: waits for the main process to name the rows still to score (or to say
    why it stopped), then scores its share of them into its own resident model and hands each row back."""
    from gpumerge.distributed import told
    from gpumerge.sweep_eval import score_rows

    said = group.broadcast(None)
    if said[0] == "error":
        raise told(said[1], group)
    scoring = planned.scoring
    todo = set(said[1])
    rows, by_name = scoring_rows(scoring, planned.variants, planned.plans, planned.signatures, planned.aliases, a, b)
    rows = [row for row in rows if row.key in todo]
    quiet = lambda line: None  # noqa: E731 - the main process says what the run does
    score_rows(lambda: resident_model(scoring, planned.plans, list(by_name.values()), a, b, quiet), rows, by_name, scoring["texts"],
               settings=scoring["settings"], results=None, done={}, history="", processes=group)


def fit_scoring(scoring: dict, plans, scored_plans, a, b, notice) -> int | None:
    """The model and one forward pass checked to fit the scoring device, the batch chosen (a GPU's from its free
    memory unless --eval-batch; a batch that does not fit halved, with a notice) into ``scoring["settings"]``.
    Returns the bytes the blended tensors' inputs may take beside them (None: no bound)."""
    from gpumerge.kernels.dtypes import torch_dtype
    from gpumerge.spec import DTYPE_CODES
    from gpumerge.sweep_eval import budget_for_inputs, check_fits, fit_batch, forward_bytes, resident_bytes

    eval_size = torch_dtype(DTYPE_CODES[scoring["eval_dtype"]]).itemsize
    model_bytes = sum(job.numel * eval_size for job in plans[0].jobs if job.out_dtype in ("F16", "BF16", "F32", "F64"))
    settings = scoring["settings"]
    given = scoring.get("batch_given", True)
    part = scoring.get("free_part")  # a launched run's processes on a shared device: each plans with its part
    batch, forward = fit_batch(scoring["device"], model_bytes, a.config, settings, eval_size, given=given,
                               windows=max((len(t.windows) for t in scoring["texts"]), default=1),
                               beside=resident_bytes(scored_plans, b), free=part)
    if batch != settings.batch and (given or scoring["device"] == "cpu"):
        need = forward_bytes(a.config, settings.batch, settings.seq_len, eval_size)
        notice(f"--eval-batch {settings.batch} would need about {need / 2**30:.1f} GiB for one forward pass beside "
               f"the model; scoring with --eval-batch {batch} (the scores do not depend on it beyond float noise)")
    if batch != settings.batch:  # on a GPU without --eval-batch: chosen from its free memory
        scoring["settings"] = dataclasses.replace(settings, batch=batch)
    from gpumerge.placement import units_of

    blended = {job.name for plan in scored_plans for job in plan.jobs if job.blended}
    units = units_of({job.name: job.numel * eval_size for job in plans[0].jobs}, blended)
    check_fits(scoring["device"], model_bytes, reserve=forward, units=units, free=part)
    budget = scoring.get("input_budget")
    if budget is None:
        budget = budget_for_inputs(scoring["device"], model_bytes, scoring["max_memory"], reserve=forward,
                                   free=part)
    return budget


def _preload_matplotlib() -> None:
    import threading

    def load() -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot  # noqa: F401
        except Exception:  # noqa: BLE001 - the plot itself says what is wrong, later
            pass

    threading.Thread(target=load, name="gpumerge-import-matplotlib", daemon=True).start()


def _results(scoring: dict, rows, columns, record):
    """The ranked table, the best name (with what it means), the results files' bytes: results.jsonl (every row
    with its history mark), results.csv, results.json and sweep.png, put in place with the sweep's other records;
    and a function of the run's timings giving results.json with them (made again once the kept are written)."""
    from gpumerge.results import plot, result_files, table_text, verdict

    files = result_files(rows, columns, record, scoring, draw=lambda file: plot(rows, columns, file))
    outcome = verdict(rows)
    best = outcome["best"] or "none"
    return (table_text(rows, columns), best + (f" ({outcome['note']})" if outcome["note"] else ""), files,
            lambda timings: result_files(rows, columns, record, scoring, timings=timings)["results.json"])


def write_variants(pending: list, a, b, *, runs: Path, inputs, notice, progress_factory, budget,
                    batch_bytes, replace: list[str] = (), simulate_staging: bool = False,
                    said_devices: bool = False, checksums: bool = False, slerp_ready: bool = False,
                    on_finalized: Callable[[], None] | None = None) -> tuple[int, int, int]:
    """The pending variants, each in its hidden directory, from one pass over the inputs; then each put in place,
    and ``on_finalized`` called (the records' commit) before any signal is let through.
    ``slerp_ready``: the plans already carry their slerp coefficients (an evaluated sweep computed them).
    Returns (input bytes read for the blends, bytes written, bytes of those copied file to file)."""
    from gpumerge import writer
    from gpumerge.copier import Copier
    from gpumerge.devices import gpu_budgets, probe_budget, resolve_devices
    from gpumerge.merge import await_import, import_torch_in_background, LockedProgress, merge_record, needs_cuda
    from gpumerge.outdir import OutputDir
    from gpumerge.plan import batch_capacity, needs_device, shared_jobs, sweep_batches

    if not pending:
        if on_finalized is not None:
            with GUARD.critical():
                on_finalized()
        return 0, 0, 0
    spec = pending[0][0].spec
    with ExitStack() as stack:
        outputs = [stack.enter_context(OutputDir(runs / v.name, overwrite=v.name in replace, inputs=inputs,
                                                 notice=notice, flag="--output_dir")) for v, _ in pending]
        GUARD.poll()
        plans = [p for _, p in pending]
        if not slerp_ready and any(job.method == "slerp" for plan in plans for job in plan.jobs):
            from gpumerge.pipeline import slerp_prepass_many

            plans = slerp_prepass_many(plans, a, b)
        records = [merge_record(dataclasses.replace(v.spec, output_model_path=runs / v.name), plan, a, b)
                   for (v, _), plan in zip(pending, plans)]
        importing = import_torch_in_background() if "torch" not in sys.modules else None
        if importing is not None and needs_cuda(spec):
            await_import(importing)
        devices, device_notice = resolve_devices(spec.device, gpu_budgets=gpu_budgets(spec.max_memory))
        if device_notice and not said_devices:
            notice(device_notice)
        if budget is None:
            budget = probe_budget(devices, dict(spec.max_memory) if spec.max_memory else None)
        capacity = batch_capacity(devices, budget, batch_bytes=batch_bytes)
        batches = sweep_batches(shared_jobs(plans), budget, devices=devices, batch_bytes=batch_bytes)
        total = sum(plan.bytes_written for plan in plans)
        progress = progress_factory(total, desc=f"sweep: {len(plans)} variants") if progress_factory else None
        advance = LockedProgress(progress.update if progress else None)
        writers: list = []
        try:
            for output, plan, rec in zip(outputs, plans, records):
                metadata = {"format": "pt", "gpumerge": json.dumps(rec, separators=(",", ":"))}
                writers.append(writer.open_writers(plan, output.tmp, metadata))
            tasks = [(job, writers[v][job.shard]) for jobs in zip(*(plan.jobs for plan in plans))
                     for v, job in enumerate(jobs) if not needs_device(job)]
            copier = Copier(None, a, None, tasks=tasks, progress=advance).start()
            try:
                if importing is not None:
                    await_import(importing)
                from gpumerge.pipeline import PipelinedEngine

                engine = PipelinedEngine(a, b, devices=devices, capacity=capacity, readers=spec.readers,
                                         progress=advance, simulate_staging=simulate_staging)
                stats = engine.run(None, batches, writers, copier, allow_nonfinite=spec.allow_nonfinite,
                                   variant_names=[v.name for v, _ in pending])
            finally:
                copier.cancel()
        finally:
            for shard_writers in writers:
                writer.close_writers(shard_writers)
            if progress is not None:
                progress.close()
        for output, plan, rec in zip(outputs, plans, records):
            GUARD.poll()
            writer.finish_model_dir(output.tmp, plan, rec, a.root, a.config, checksums=checksums)
        with GUARD.critical():  # every finished variant is put in place, even if a signal arrives meanwhile
            for output in outputs:
                output.finalize()
                GUARD.completed_output = None  # a variant, not the sweep: the sweep is complete when all are
            if on_finalized is not None:
                on_finalized()
            GUARD.completed_output = runs
    copied = stats.stages["copy"].bytes
    return stats.bytes_read - copied, stats.bytes_written, copied
