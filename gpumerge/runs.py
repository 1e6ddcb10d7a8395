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
- The record files (sweep.json, variants.csv and an evaluated sweep's results) change only together, and only once
  the run has produced what they describe: a run works in RUNS/.gpumerge-sweep.pending/ (its scored rows, then the
  new record files), writes a COMMIT marker there when the set is complete, and then renames each file into place.
  A run killed before the marker leaves the earlier records as they were (the next run of the same sweep reuses the
  scored rows); one killed after it has its commit finished by the next run, whatever that run is.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.errors import GpumergeError, OutputError
from gpumerge.signals import GUARD, test_pause
from gpumerge.writer import shard_header

SWEEP_FILE = "sweep.json"
VARIANTS_FILE = "variants.csv"
PENDING_DIR = ".gpumerge-sweep.pending"  # a run's working directory inside RUNS (no variant name starts with '.')
_COMMIT = "COMMIT"
_IDENTITY = "identity.json"
_MAX_MARKER_BYTES = 2**16
# Files a sweep keeps in RUNS beside its variants (the evaluated sweep's results too): no variant may be named so.
# a search's study.db too: a grid sweep's --overwrite over a search replaces it with the rest of its records
RUNS_FILES = (SWEEP_FILE, VARIANTS_FILE, "results.csv", "results.json", "results.jsonl", "sweep.png", "study.db")


# ---- records ------------------------------------------------------------------------------------------------------

def expected_record(variant, plan, a, b) -> dict:
    """What a complete variant's merge record must say (its command aside, which names the output)."""
    return json.loads(json.dumps({"inputs": [a.fingerprint(), b.fingerprint()], "settings": variant.spec.settings(),
                                  "output_dtype": plan.out_dtype_name}))


def sweep_record(variants, plans, signatures, aliases, columns, a, b, *, retiring=(), eval=None) -> dict:
    from gpumerge.about import version

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


def is_complete(directory: Path, plan, expected: dict, *, read_bytes: bool = True) -> bool:
    """RUNS/<name>/ is this variant, done: its record says so, every shard of the plan is there, whole, and (with
    ``read_bytes``) every file has the bytes its digests recorded."""
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
    if not read_bytes:
        return True
    from gpumerge.digests import check_digests

    return not check_digests(directory, record)[0]  # every byte as written (a flipped byte is not complete)


# ---- what to do with RUNS ------------------------------------------------------------------------------------------

@dataclass
class RunsState:
    action: str = "new"  # new | resume | replace
    complete: list[str] = field(default_factory=list)  # variants already done: skipped
    replace: list[str] = field(default_factory=list)  # the earlier sweep's variants a new one is swapped in over
    retire: list[str] = field(default_factory=list)  # the earlier sweep's variants to remove once all are done
    history: str | None = None  # the earlier sweep's history mark (resume: this sweep's own)


def judge_runs(runs: Path, record: dict, expected: dict[str, tuple], *, overwrite: bool,
               read_bytes: bool = True) -> RunsState:
    """What this sweep does with RUNS as it is now; ``expected``: variant name -> (plan, expected record) of every
    variant to be written. Refuses anything that would damage what is not the sweep's own. ``read_bytes=False``
    takes complete variants by their records and sizes alone (the check before the lock; the one under it reads
    every byte, once)."""
    from gpumerge.outdir import is_working_name

    try:
        entries = [e for e in os.scandir(runs) if e.name != PENDING_DIR]
    except FileNotFoundError:
        return RunsState()
    if not entries or (all(is_working_name(e.name) for e in entries) and not os.path.lexists(runs / SWEEP_FILE)):
        return RunsState()  # empty, or only what a killed first run left (its working files, no records yet)
    for name in RUNS_FILES:
        path = runs / name
        if os.path.lexists(path) and not (path.is_file() and not path.is_symlink()) and not (
                path.is_symlink() and name != "results.jsonl"):
            raise OutputError(f"--output_dir {runs}: {path} is in the way of the sweep's own {name} (it is not a "
                              "regular file); remove it")
    old = _old_record(runs)
    old_names = _old_names(old, runs)
    # working names (a killed run's partial variants) are never variants: not kept, replaced or retired
    dirs = {e.name for e in entries if e.is_dir(follow_symlinks=False) and not is_working_name(e.name)}
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
            if not is_complete(path, plan, want, read_bytes=read_bytes):
                raise OutputError(f"--output_dir {runs}: {path} is in the way of variant {name}: it is not that "
                                  "variant, complete (its merge record, shards or bytes differ from what it "
                                  "recorded); remove it, or pass --overwrite to write the sweep again")
            complete.append(name)
        retire = [n for n in old.get("retiring", []) if n in dirs and n not in expected and _ours(runs / n)]
        return RunsState("resume", complete=complete, retire=retire, history=_history(old))
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
    return RunsState("replace", replace=sorted(d for d in dirs if d in expected),
                     retire=sorted(d for d in dirs if d not in expected))


def _history(record: dict) -> str | None:
    mark = record.get("history")
    return mark if isinstance(mark, str) and re.fullmatch(r"[0-9a-f]{32}", mark) else None


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
    from gpumerge.spec import NAME_RE

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

def recover(runs: Path, *, notice) -> None:
    """Under RUNS's lock, before RUNS is judged: a commit that a killed run had begun (its COMMIT marker written) is
    finished, so the records are the complete new set; a pending directory without the marker stays for the run
    that can use it (the same sweep again reuses its scored rows)."""
    path = runs / PENDING_DIR
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        raise OutputError(f"--output_dir {runs}: {path} is in the way of the sweep's working directory (it is not "
                          "one gpumerge made); remove it")
    if os.path.lexists(path / _COMMIT):
        with GUARD.critical():
            _apply_commit(runs)
        notice(f"an earlier run into {runs} was stopped while putting its records in place; that is finished now")


def commit_begun(runs: Path) -> bool:
    """A killed run's commit waits in RUNS (its marker is written): recover() finishes it, under the lock."""
    return os.path.lexists(runs / PENDING_DIR / _COMMIT)


def start_pending(runs: Path, sweep_id: str, history: str | None) -> tuple[Path, str]:
    """This run's working directory and history mark: the earlier run's directory is kept when it is this sweep's
    with the same history (its scored rows are reused), else made anew; a new history mark when there is none."""
    path = runs / PENDING_DIR
    identity = _pending_identity(path)
    log = path / "results.jsonl"
    if (identity is not None and identity.get("sweep") == sweep_id
            and (history is None or identity.get("history") == history)
            and (not os.path.lexists(log) or (log.is_file() and not log.is_symlink()))):
        return path, identity["history"]
    history = history or secrets.token_hex(16)
    with GUARD.critical():
        if os.path.lexists(path):
            shutil.rmtree(path)
        path.mkdir()
        _write_synced(path / _IDENTITY, (json.dumps({"sweep": sweep_id, "history": history}) + "\n").encode())
    return path, history


@contextlib.contextmanager
def locked(runs: Path, *, notice, check=None, cleanup=None):
    """RUNS under its lock for a sweep or a search: RUNS's parents made as needed, a commit a killed run had begun
    finished, ``check()`` (its value is what the block gets), then RUNS made if it is not there. When the block
    fails: the working directory if it holds nothing to resume, ``cleanup(created)``, and the directories this run
    made (when empty again) are removed."""
    from gpumerge.outdir import OutputLock, make_parents, remove_made

    created: list[Path] = []  # RUNS's parents (and RUNS) as this run makes them
    lock = OutputLock(runs, flag="--output_dir")
    done = False
    try:
        make_parents(runs, created)
        lock.acquire()
        GUARD.poll()
        if runs.exists():
            recover(runs, notice=notice)  # a commit a killed run had begun is finished first
        found = check() if check is not None else None
        if not runs.exists():
            runs.mkdir()
            created.append(runs)
        yield found
        done = True
    finally:
        lock.release()
        if not done:
            with GUARD.critical():
                drop_unused_pending(runs)
                if cleanup is not None:
                    cleanup(created)
                remove_made(created)


def drop_unused_pending(runs: Path) -> None:
    """After a run that failed: its working directory goes when it holds nothing worth resuming (no scored row, no
    commit begun), so that a refused run leaves RUNS as it found it. Rows an interrupted run scored stay."""
    path = runs / PENDING_DIR
    if not path.is_dir() or path.is_symlink() or commit_begun(runs):
        return
    log = path / "results.jsonl"
    if os.path.lexists(log) and (log.is_symlink() or not log.is_file() or log.stat().st_size > 0):
        return
    if {entry.name for entry in path.iterdir()} <= {_IDENTITY, "results.jsonl"}:
        shutil.rmtree(path)


def _pending_identity(path: Path) -> dict | None:
    from gpumerge import fsutil

    try:
        raw = fsutil.read_regular(path / _IDENTITY, max_bytes=_MAX_MARKER_BYTES, what=_IDENTITY, error=OutputError)
        found = fsutil.load_json(raw, what=_IDENTITY, error=OutputError)
    except (GpumergeError, OSError):
        return None
    if isinstance(found, dict) and isinstance(found.get("sweep"), str) and _history(found):
        return found
    return None


def commit_records(runs: Path, files: dict[str, bytes], *, remove: tuple[str, ...] = ()) -> None:
    """The new record files, all or none: written into the pending directory, the COMMIT marker, then each renamed
    into RUNS (and ``remove``, record files the new set lacks, unlinked). Signals wait; a SIGKILL after the
    marker leaves the rest to the next run's recover()."""
    assert set(files) | set(remove) <= set(RUNS_FILES)
    path = runs / PENDING_DIR
    with GUARD.critical():
        path.mkdir(exist_ok=True)
        staged = path / "commit"
        if staged.is_symlink() or (os.path.lexists(staged) and not staged.is_dir()):
            staged.unlink()  # not ours: a link is removed, never followed
        elif os.path.lexists(staged):
            shutil.rmtree(staged)
        staged.mkdir()
        for name, data in files.items():
            _write_synced(staged / name, data)
        _fsync_dir(staged)
        marker = (json.dumps({"files": sorted(files), "remove": sorted(set(remove) - set(files))}) + "\n").encode()
        _write_synced(path / (_COMMIT + ".tmp"), marker)
        os.replace(path / (_COMMIT + ".tmp"), path / _COMMIT)
        _fsync_dir(path)
        test_pause("records")
        _apply_commit(runs)


def _apply_commit(runs: Path) -> None:
    """Finish a commit whose marker is written: every staged file renamed into RUNS, the dropped ones removed, the
    pending directory gone. Each step can be done again, so a run killed midway is finished by the next."""
    from gpumerge import fsutil

    path = runs / PENDING_DIR
    marker = fsutil.load_json(fsutil.read_regular(path / _COMMIT, max_bytes=_MAX_MARKER_BYTES, what=_COMMIT,
                                                  error=OutputError), what=str(path / _COMMIT), error=OutputError)
    names = marker.get("files") if isinstance(marker, dict) else None
    remove = marker.get("remove") if isinstance(marker, dict) else None
    if not (isinstance(names, list) and isinstance(remove, list) and set(names) | set(remove) <= set(RUNS_FILES)):
        raise OutputError(f"--output_dir {runs}: {path / _COMMIT} is not a gpumerge commit marker; remove {path}")
    try:
        for name in names:
            staged = path / "commit" / name
            if os.path.lexists(staged):
                os.replace(staged, runs / name)  # replaces a link at the name, never what it points to
        for name in remove:
            target = runs / name
            if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
                target.unlink()
        _fsync_dir(runs)
        shutil.rmtree(path)
    except OSError as exc:
        raise OutputError(f"--output_dir {runs}: the sweep's new records could not be put in place ({exc.strerror}: "
                          f"{exc.filename}); fix that and run it again (the commit is finished then)") from None


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        view, done = memoryview(data), 0
        while done < len(view):
            done += os.write(fd, view[done:])
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tidy_locks(runs: Path, names) -> None:
    """The lock files a killed run left beside variants that are complete: each taken and let go (which removes
    it); one another run holds is left alone."""
    from gpumerge.outdir import OutputLock

    for name in names:
        lock = OutputLock(runs / name, flag="--output_dir")
        if not os.path.lexists(lock.path):
            continue
        try:
            lock.acquire()
        except (GpumergeError, OSError):
            continue
        lock.release()


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
