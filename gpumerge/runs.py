"""A sweep's directory (RUNS): its records, and what a new run may do with what is already there.

- RUNS/sweep.json identifies a sweep: a digest of the inputs' fingerprints, the output dtype and shard size, and every
  variant's name and resolved rules. RUNS/variants.csv maps names to the swept settings.
- The same sweep again resumes: a variant is complete when RUNS/<name>/ holds its merge record (inputs, settings,
  output dtype, in its shards' safetensors metadata) and every shard of its plan, whole; a directory at a variant's
  name that is anything else is refused, never taken as done.
- Another sweep is refused; with --overwrite it replaces the earlier one the way a merge's --overwrite does: each new
  variant is swapped in over the old one of its name only when complete, and the earlier sweep's variants that the
  new one drops are removed only after every new variant is in place (sweep.json lists them under ``retiring``, so a
  run cut short finishes the job). Only the earlier sweep's own variant directories (named in its sweep.json, holding
  a gpumerge merge record and nothing but model files) are ever replaced or removed; anything else in RUNS makes
  --overwrite refuse.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.errors import GpumergeError, OutputError
from gpumerge.signals import GUARD

SWEEP_FILE = "sweep.json"
VARIANTS_FILE = "variants.csv"
# Files a sweep keeps in RUNS beside its variants (the evaluated sweep's results too): no variant may be named so.
RUNS_FILES = (SWEEP_FILE, VARIANTS_FILE, "results.csv", "results.json", "results.jsonl", "sweep.png")
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own bound


# ---- records ------------------------------------------------------------------------------------------------------

def expected_record(variant, plan, a, b) -> dict:
    """What a complete variant's merge record must say (its command aside, which names the output)."""
    return json.loads(json.dumps({"inputs": [a.fingerprint(), b.fingerprint()], "settings": variant.spec.settings(),
                                  "output_dtype": plan.out_dtype_name}))


def sweep_record(variants, plans, signatures, aliases, columns, a, b, *, retiring=(), eval=None) -> dict:
    from gpumerge.merge import version

    spec = variants[0].spec
    identity = {
        "inputs": [a.fingerprint(), b.fingerprint()],
        "output_dtype": plans[0].out_dtype_name,
        "max_shard_bytes": spec.max_shard_bytes,
        "variants": [[variant.name, signature] for variant, signature in zip(variants, signatures)],
        **({"eval": eval} if eval is not None else {}),
    }
    return {
        "tool": "gpumerge",
        "version": version(),
        "sweep": hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest(),
        "inputs": [{"role": role, "path": path, "resolved": str(ckpt.root), "fingerprint": ckpt.fingerprint()}
                   for role, path, ckpt in (("model_path1", spec.model_path1, a),
                                            ("model_path2", spec.model_path2, b))],
        "output_dtype": plans[0].out_dtype_name,
        "max_shard_size": spec.max_shard_size,
        "swept": columns,
        "variants": [{"name": v.name, "values": v.values, "settings": v.spec.settings(), "rules": signature[:16],
                      "same_as": aliases.get(v.name)} for v, signature in zip(variants, signatures)],
        "retiring": sorted(retiring),
        **({"eval": eval} if eval is not None else {}),
    }


def variants_csv(variants, columns: list[str], aliases: dict) -> bytes:
    """A header row (name, then one column per swept setting), one row per variant written (not the aliases);
    numbers exactly (repr), booleans true/false, lists as JSON."""
    out = io.StringIO()
    table = csv.writer(out, lineterminator="\n")
    table.writerow(["name", *columns])
    for variant in variants:
        if variant.name not in aliases:
            table.writerow([variant.name, *(csv_cell(variant.values.get(column)) for column in columns)])
    return out.getvalue().encode()


def csv_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def shard_header(path: Path) -> tuple[int, dict] | None:
    """(header bytes with the length prefix, header) of a safetensors file, or None when it is not a whole one."""
    from gpumerge import fsutil

    try:
        fd = fsutil.open_regular(path, what=str(path), error=OutputError)
    except GpumergeError:
        return None
    try:
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            return None
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER_BYTES:
            return None
        raw = os.pread(fd, length, 8)
        header = fsutil.load_json(raw, what=str(path), error=OutputError) if len(raw) == length else None
    except (GpumergeError, OSError):
        return None
    finally:
        os.close(fd)
    return (8 + length, header) if isinstance(header, dict) else None


def variant_record(directory: Path, *, shard: str | None = None, follow_links: bool = False) -> dict | None:
    """The gpumerge merge record in a directory's first shard (or ``shard``; safetensors metadata, key
    ``gpumerge``), or None."""
    try:
        shards = [shard] if shard else sorted(e.name for e in os.scandir(directory) if e.name.endswith(".safetensors")
                                              and e.is_file(follow_symlinks=follow_links))
    except OSError:
        return None
    found = shard_header(directory / shards[0]) if shards else None
    metadata = found[1].get("__metadata__") if found else None
    try:
        record = json.loads(metadata["gpumerge"]) if isinstance(metadata, dict) else None
    except (KeyError, TypeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and record.get("tool") == "gpumerge" else None


def is_complete(directory: Path, plan, expected: dict) -> bool:
    """RUNS/<name>/ is this variant, done: its record says so and every shard of the plan is there, whole."""
    if directory.is_symlink() or not directory.is_dir():
        return False
    record = variant_record(directory)
    if record is None:
        return False
    said = {"inputs": [i.get("fingerprint") for i in record.get("inputs", []) if isinstance(i, dict)],
            "settings": record.get("settings"), "output_dtype": record.get("output_dtype")}
    if said != expected or not (directory / "config.json").is_file():
        return False
    for shard in plan.shards:
        found = shard_header(directory / shard.filename)
        if found is None or (directory / shard.filename).stat().st_size != found[0] + shard.data_bytes:
            return False
    return True


# ---- what to do with RUNS ------------------------------------------------------------------------------------------

@dataclass
class RunsState:
    action: str = "new"  # new | resume | replace
    complete: list[str] = field(default_factory=list)  # variants already done: skipped
    replace: list[str] = field(default_factory=list)  # the earlier sweep's variants a new one is swapped in over
    retire: list[str] = field(default_factory=list)  # the earlier sweep's variants to remove once all are done
    previous: dict[str, bytes] = field(default_factory=dict)  # its records, put back if nothing new completes


def judge_runs(runs: Path, record: dict, expected: dict[str, tuple], *, overwrite: bool) -> RunsState:
    """What this sweep does with RUNS as it is now; ``expected``: variant name -> (plan, expected record) of every
    variant to be written. Refuses anything that would damage what is not the sweep's own."""
    from gpumerge.outdir import is_working_name

    try:
        entries = list(os.scandir(runs))
    except FileNotFoundError:
        return RunsState()
    if not entries:
        return RunsState()
    for name in RUNS_FILES:
        path = runs / name
        if os.path.lexists(path) and not (path.is_file() and not path.is_symlink()) and not (
                path.is_symlink() and name != "results.jsonl"):
            raise OutputError(f"--output_dir {runs}: {path} is in the way of the sweep's own {name} (it is not a "
                              "regular file); remove it")
    old = _old_record(runs)
    old_names = _old_names(old, runs)
    dirs = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
    unrelated = sorted(e.name for e in entries if not (
        (e.name in RUNS_FILES and e.is_file(follow_symlinks=False)) or is_working_name(e.name)
        or (e.name in dirs and (e.name in old_names or e.name in expected))))
    if not overwrite:
        if old["sweep"] != record["sweep"]:
            raise OutputError(f"--output_dir {runs} holds another sweep ({_difference(old, record)}); pass "
                              "--overwrite to replace it, or choose another directory")
        complete = []
        for name, (plan, want) in expected.items():
            path = runs / name
            if not (path.exists() or path.is_symlink()):
                continue
            if not is_complete(path, plan, want):
                raise OutputError(f"--output_dir {runs}: {path} is in the way of variant {name}: it is not that "
                                  "variant, complete (its merge record or shards differ); remove it, or pass "
                                  "--overwrite to write the sweep again")
            complete.append(name)
        retire = [n for n in old.get("retiring", []) if n in dirs and n not in expected and _ours(runs / n)]
        return RunsState("resume", complete=complete, retire=retire)
    if unrelated:
        raise OutputError(f"--overwrite would replace {runs}, which holds entries that are not its sweep's ("
                          + ", ".join(unrelated[:4]) + (", ..." if len(unrelated) > 4 else "")
                          + "); remove them yourself or choose another directory")
    for name in sorted(dirs):
        if name in old_names or name in expected:
            problem = _not_ours(runs / name, name in old_names)
            if problem:
                raise OutputError(f"--overwrite would replace {runs / name}, which {problem}; remove it yourself or "
                                  "choose another directory")
    previous = {}
    for name in RUNS_FILES:
        if (runs / name).is_file() and not (runs / name).is_symlink():
            previous[name] = (runs / name).read_bytes()
    return RunsState("replace", replace=sorted(d for d in dirs if d in expected),
                     retire=sorted(d for d in dirs if d not in expected), previous=previous)


def _old_record(runs: Path) -> dict:
    from gpumerge import fsutil

    found = runs / SWEEP_FILE
    if not (found.exists() or found.is_symlink()):
        raise OutputError(f"--output_dir {runs} exists and is not empty, and has no {SWEEP_FILE}: it is not a gpumerge "
                          "sweep; give a new or empty directory (this is refused even with --overwrite)")
    old = fsutil.load_json(fsutil.read_regular(found, what=f"--output_dir: {found}", error=OutputError),
                           what=f"--output_dir: {found}", error=OutputError)
    if (not isinstance(old, dict) or old.get("tool") != "gpumerge" or not isinstance(old.get("sweep"), str)
            or not isinstance(old.get("variants"), list) or not isinstance(old.get("retiring", []), list)):
        raise OutputError(f"--output_dir: {found} is not a gpumerge sweep record; give a new or empty directory")
    return old


def _old_names(old: dict, runs: Path) -> set[str]:
    """The directories the earlier sweep wrote (or was retiring): the only ones --overwrite may replace."""
    from gpumerge.sweep import NAME_RE

    names = {v.get("name") for v in old["variants"] if isinstance(v, dict) and v.get("same_as") is None}
    names |= set(old.get("retiring", []))
    if not all(isinstance(n, str) and NAME_RE.fullmatch(n) for n in names):
        raise OutputError(f"--output_dir: {runs / SWEEP_FILE} names variants that cannot be a sweep's (names are "
                          "letters, digits, '.', '_', '+', '-'); it is not a gpumerge sweep record")
    return names


def _not_ours(path: Path, named: bool) -> str | None:
    """Why a directory in RUNS is not the earlier sweep's own variant, or None."""
    from gpumerge.outdir import replace_problem

    if not named:
        return "the earlier sweep did not write (its sweep.json does not name it)"
    problem = replace_problem(path)
    if problem:
        return problem
    if variant_record(path) is None:
        return "holds no gpumerge merge record (it is not a variant gpumerge wrote)"
    return None


def _ours(path: Path) -> bool:
    return _not_ours(path, True) is None


def _difference(old: dict, new: dict) -> str:
    """What makes an earlier sweep.json another sweep, in words."""
    inputs = old.get("inputs")
    if not isinstance(inputs, list):
        return "its record names no inputs"
    if [i.get("fingerprint") for i in inputs if isinstance(i, dict)] != [i["fingerprint"] for i in new["inputs"]]:
        return "other inputs (their fingerprints differ)"
    if old.get("output_dtype") != new["output_dtype"] or old.get("max_shard_size") != new["max_shard_size"]:
        return "another output dtype or shard size"
    if old.get("eval") != new.get("eval"):
        return ("other evaluation settings (texts, their tokens, --eval-tokens, --seq-len, --eval-dtype or the "
                "device kind)" if old.get("eval") and new.get("eval") else "one is scored and the other is not")
    return "other variants"


# ---- changes to RUNS -----------------------------------------------------------------------------------------------

def write_records(runs: Path, files: dict[str, bytes], *, inputs) -> None:
    from gpumerge.outdir import AtomicFile

    for name, data in files.items():
        out = AtomicFile(runs / name, flag="--output_dir", inputs=inputs)
        try:
            out.write_bytes(data)
            out.commit()
        except BaseException:
            out.discard()
            raise


def retire(runs: Path, names: list[str], *, notice) -> None:
    """Remove the earlier sweep's variants the new one dropped (each under its own lock, re-checked as it is now),
    and their working files left by killed runs."""
    from gpumerge.outdir import OutputDir

    for name in names:
        path = runs / name
        with GUARD.critical():
            try:
                with OutputDir(path, overwrite=True, flag="--output_dir"):  # its lock; stale partials removed
                    if _ours(path):
                        shutil.rmtree(path)
            except (GpumergeError, OSError) as exc:
                notice(f"warning: the earlier sweep's variant {path} was not removed ({exc})")
