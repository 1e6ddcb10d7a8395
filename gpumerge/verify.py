"""`gpumerge verify OUT`: is this directory exactly the merge its record claims? And checksums for outputs.

Checks, each problem one line:
- the shards and the index, read with the merge's own checkpoint reader (the safetensors library's rules); the same
  merge record in every shard; the index's weight map and total size as the shards' headers have them;
- checksums.sha256, when present (`sha256sum -c` works on it too); the model card and the recipe file as the record
  writes them;
- with the inputs (where the record says, or given; matched by fingerprint): the merge planned again from the
  recorded settings, its layout (shards, tensors, offsets) compared, every other file (config.json, model 1's
  tokenizer and aux files, the index) compared with what the merge writes, no file beyond them, and a deterministic
  sample of tensors (every tensor with --full) recomputed with the merge's kernel and compared bit for bit: the blend
  gives the same bytes on every machine, so this holds anywhere. The sample is a fixed rule (about one tensor in 8
  by a hash of its name): it catches accidents; against deliberate edits, use checksums or --full.
A sweep's directory (RUNS, with sweep.json) is verified variant by variant, each against its entry in sweep.json.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.digests import CHECKSUMS, DIGESTS_FILE, check_checksums
from gpumerge.errors import GpumergeError, SpecError

_HASH_CHUNK = 16 * 2**20
_SAMPLE_EVERY = 8  # the default sample: about one tensor in 8 (by a hash of its name), and the first and last blended


# ---- one model directory -------------------------------------------------------------------------------------------

@dataclass
class Report:
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_model(out: Path, *, model_path1: str | None = None, model_path2: str | None = None,
                 full: bool = False, expected_settings: dict | None = None) -> Report:
    """``expected_settings``: what a sweep's sweep.json says this variant's settings are."""
    from gpumerge.checkpoint import Checkpoint
    from gpumerge.digests import check_digests

    report = Report(out)
    try:
        merged = Checkpoint(str(out), label="the output")
    except GpumergeError as exc:
        report.problems.append(str(exc).replace(f"the output {out}/", "").replace(f"the output {out}: ", "")
                               .replace(f"the output {out}", "").lstrip("/: "))
        return report
    with merged:
        record = _record(report, out, merged)
        if record is None:
            return report
        problems, nbytes = check_digests(out, record)
        report.problems += problems
        if not problems:
            report.notes.append(f"every byte of its {len(os.listdir(out))} files ({_size(nbytes)}) against the "
                                "record")
        if os.path.lexists(out / CHECKSUMS):
            problems, checked = check_checksums(out)
            report.problems += problems
            report.notes.append(f"{checked} checksums checked")
        report.notes.append(f"{len(merged.files)} shard(s), {len(merged.tensors)} tensors")
        if expected_settings is not None and _normal(record.get("settings")) != _normal(expected_settings):
            report.problems.append("its recorded settings are not those sweep.json gives this variant")
        _check_card_and_recipe(report, out, record)
        _recompute(report, out, merged, record, model_path1, model_path2, full)
    return report


def _size(nbytes: int) -> str:
    from gpumerge.outdir import size_text

    return size_text(nbytes)


def _record_problem(record: dict) -> str | None:
    """What makes a merge record unusable for the checks below (a hand edit), or None."""
    inputs = record.get("inputs")
    if (not isinstance(inputs, list) or len(inputs) != 2
            or not all(isinstance(i, dict) and isinstance(i.get("fingerprint"), str)
                       and isinstance(i.get("path"), str) and isinstance(i.get("resolved"), str) for i in inputs)):
        return "its inputs are not two entries with a path and a fingerprint"
    if not isinstance(record.get("settings"), dict):
        return "it has no settings"
    for key, kind in (("version", str), ("method", str), ("output_dtype", str), ("command", str),
                      ("t_groups", list)):
        if not isinstance(record.get(key), kind):
            return f"its {key} is not a {kind.__name__}"
    if not all(isinstance(row, list) and len(row) == 4 for row in record["t_groups"]):
        return "its t_groups are not rows of layer, group, t_min, t_max"
    return None


def _normal(value):
    import json

    return json.loads(json.dumps(value, sort_keys=True))


def _record(report: Report, out: Path, merged) -> dict | None:
    """The merge record, the same in every shard; the index as the shards' headers have it."""
    from gpumerge.runs import variant_record

    shards = [path.name for path in merged.files]
    records = [variant_record(out, shard=name, follow_links=True) for name in shards]
    if records[0] is None:
        report.problems.append("holds no gpumerge merge record in its shards' metadata: it cannot be checked "
                               "against its recipe")
        return None
    problem = _record_problem(records[0])
    if problem:
        report.problems.append(f"its merge record cannot be used: {problem}")
        return None
    differ = [name for name, rec in zip(shards, records) if rec != records[0]]
    if differ:
        report.problems.append(f"its shards carry different merge records ({', '.join(differ[:3])} differ from "
                               f"{shards[0]})")
    if len(shards) > 1:
        from gpumerge import fsutil

        name = "model.safetensors.index.json"
        try:
            index = fsutil.load_json(fsutil.read_regular(out / name, what=name, error=SpecError), what=name,
                                     error=SpecError)
        except GpumergeError as exc:
            report.problems.append(f"{name} cannot be read ({exc})")
        else:
            data = sum(merged.tensors[name].nbytes for name in merged.tensors)
            metadata = index.get("metadata") if isinstance(index, dict) else None
            if not isinstance(metadata, dict) or metadata.get("total_size") != data:
                report.problems.append(f"{name}: total_size is not the shards' {data} bytes")
    return records[0]


def _read_bounded(path: Path, max_bytes: int) -> bytes | None:
    """A file of the output, if it is a regular file of at most ``max_bytes`` (a FIFO, a device, a link to a huge
    file: None, never a hang or a memory blow-up)."""
    from gpumerge import fsutil

    try:
        return fsutil.read_regular(path, max_bytes=max_bytes, what=path.name, error=SpecError)
    except GpumergeError:
        return None


def _check_card_and_recipe(report: Report, out: Path, record: dict) -> None:
    """README.md and gpumerge_recipe.yaml as the merge writes them from its record."""
    from gpumerge import writer
    from gpumerge.spec import MAX_RECIPE_BYTES

    with tempfile.TemporaryDirectory(prefix="gpumerge-verify-") as scratch:
        writer.write_model_card(Path(scratch), record)
        want = (Path(scratch) / "README.md").read_bytes()
    got = _read_bounded(out / "README.md", len(want))
    if got != want:
        report.problems.append("README.md is not the model card of its merge record" if os.path.lexists(
            out / "README.md") else "README.md (the model card) is missing")
    raw = _read_bounded(out / writer.RECIPE_FILE, MAX_RECIPE_BYTES)
    try:
        from gpumerge.recipes import load_yaml

        recipe = load_yaml(raw.decode("utf-8"), source=writer.RECIPE_FILE) if raw is not None else None
    except (UnicodeDecodeError, GpumergeError):
        recipe = None
    settings = record["settings"]
    if not isinstance(recipe, dict) or any(_normal(recipe.get(k)) != _normal(v) for k, v in settings.items()):
        report.problems.append(f"{writer.RECIPE_FILE} is missing or does not hold the recorded settings")


def _inputs(record: dict, given: tuple[str | None, str | None]) -> list[str | None]:
    entries = record.get("inputs") if isinstance(record.get("inputs"), list) else []
    entries = (entries + [None, None])[:2]
    found = []
    for entry, path in zip(entries, given):
        if path is not None:
            found.append(path)
            continue
        candidates = [entry.get("resolved"), entry.get("path")] if isinstance(entry, dict) else []
        found.append(next((c for c in candidates if isinstance(c, str) and c and Path(c).expanduser().is_dir()),
                          None))
    return found


def _recompute(report: Report, out: Path, merged, record: dict, path1, path2, full: bool) -> None:
    from gpumerge.merge import open_pair, plan_merge

    paths = _inputs(record, (path1, path2))
    if None in paths:
        line = ("the inputs are not here: nothing was recomputed (give --model_path1 and --model_path2)")
        (report.problems if full else report.notes).append(line)
        return
    try:
        spec = _spec(record, paths)
        a, b = open_pair(spec)
    except GpumergeError as exc:
        report.problems.append(f"cannot recompute it: {exc}")
        return
    with a, b:
        entries = record.get("inputs") if isinstance(record.get("inputs"), list) else []
        recorded = [e.get("fingerprint") if isinstance(e, dict) else None for e in (entries + [None, None])[:2]]
        others = [f"{role} at {ckpt.root} is not the recorded input (fingerprint {ckpt.fingerprint()[:16]}, "
                  f"recorded {str(want)[:16]})"
                  for ckpt, want, role in zip((a, b), recorded, ("model 1", "model 2")) if ckpt.fingerprint() != want]
        if others:
            report.problems += others
            return
        try:
            plan = plan_merge(spec, a, b, notice=lambda line: None, recorded_order=_recorded_order(record))
        except GpumergeError as exc:
            report.problems.append(f"its recorded settings cannot be planned again: {exc}")
            return
        if not _same_layout(report, plan, merged):
            return
        _check_files(report, out, plan, record, a)
        from gpumerge.pipeline import with_slerp_coefficients

        # copied tensors are compared with model 1 in full (a read, no math); blends are recomputed, a fixed
        # sample of them (every one with --full)
        chosen = {job.name for job in (plan.jobs if full else sample(plan.jobs))}
        jobs = [job for job in plan.jobs if not job.blended or job.name in chosen]
        updated = with_slerp_coefficients([job for job in jobs if job.blended], a, b)
        jobs = [updated.get(job.name, job) for job in jobs]
        for job in jobs:
            problem = _compare(job, a, b, merged)
            if problem:
                report.problems.append(problem)
        blends = sum(job.blended for job in plan.jobs)
        done = sum(job.blended for job in jobs)
        copied = len(jobs) - done
        report.notes.append(("all " if done == blends else f"{done} of ") + f"{blends} blends recomputed bit for bit"
                            + (f"; all {copied} copied tensors compared with model 1's" if copied else ""))


def _same_layout(report: Report, plan, merged) -> bool:
    want = {job.name: (plan.shards[job.shard].filename, job.out_dtype, list(job.shape), job.offset, job.nbytes)
            for job in plan.jobs}
    got = {name: (info.path.name, info.dtype, list(info.shape), info.offset - 8 - len(merged._headers[info.path]),
                  info.nbytes) for name, info in merged.tensors.items()}
    if want == got:
        return True
    differ = sorted(set(want) ^ set(got)) or sorted(n for n in want if want[n] != got[n])
    report.problems.append("the tensors or their layout differ from what the recorded settings make ("
                           + ", ".join(differ[:3]) + (", ..." if len(differ) > 3 else "") + ")")
    return False


def _check_files(report: Report, out: Path, plan, record: dict, a) -> None:
    """config.json, model 1's aux files and the index as the merge writes them; no file beyond the merge's."""
    from gpumerge import writer

    with tempfile.TemporaryDirectory(prefix="gpumerge-verify-") as scratch:
        scratch = Path(scratch)
        writer.write_index(scratch, plan)
        writer.copy_aux_files(a.root, scratch, plan.out_dtype_name, a.config)
        expected = {p.name: p.read_bytes() for p in scratch.iterdir()}
    allowed = set(expected) | {s.filename for s in plan.shards} | {"README.md", writer.RECIPE_FILE, CHECKSUMS,
                                                                    DIGESTS_FILE}
    for name, want in sorted(expected.items()):
        got = _read_bounded(out / name, len(want))
        if got != want:
            missing = not os.path.lexists(out / name)
            report.problems.append(f"{name} is {'missing' if missing else 'not what the merge writes'}"
                                   + ("" if missing else " (model 1's file, or its config with the output dtype)"))
    extra = sorted(e.name for e in os.scandir(out) if e.name not in allowed)
    if extra:
        report.problems.append("holds files the merge does not write: " + ", ".join(extra[:4])
                               + (", ..." if len(extra) > 4 else ""))


def _spec(record: dict, paths: list[str]):
    """The merge the record describes, with these inputs (as `gpumerge --config gpumerge_recipe.yaml` would)."""
    from gpumerge.recipes import parse_recipe
    from gpumerge.settings import merge_spec

    settings = record.get("settings")
    if not isinstance(settings, dict):
        raise SpecError("the merge record has no settings")
    return merge_spec({"model_path1": paths[0], "model_path2": paths[1], "quiet": True}, output_required=False,
                      recipe=(parse_recipe(settings, source="the merge record"), "the merge record"))


def _recorded_order(record: dict) -> dict | None:
    """The tensor order a position-based recipe counted in, as the record keeps it (None: not recorded, as in
    records made before it was; then the recipe's own order is built again)."""
    kept = record.get("tensor_order")
    if kept is None:
        return None
    names, tied = (kept.get("names"), kept.get("tied")) if isinstance(kept, dict) else (None, None)
    if (not isinstance(names, list) or not all(isinstance(n, str) for n in names) or not isinstance(tied, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items())):
        raise SpecError("the merge record's tensor_order is not a list of names with a map of tied names")
    return {"source": kept.get("source"), "names": names, "tied": tied}


def sample(jobs) -> list:
    """A deterministic sample: about one tensor in _SAMPLE_EVERY by a hash of its name, plus the first and the last
    blended ones (the same tensors on every machine and every run)."""
    blended = [job for job in jobs if job.blended]
    keep = {job.name for job in jobs if hashlib.sha256(job.name.encode()).digest()[0] % _SAMPLE_EVERY == 0}
    keep |= {job.name for job in blended[:1] + blended[-1:]}
    return [job for job in jobs if job.name in keep]


def _compare(job, a, b, merged) -> str | None:
    """The job recomputed piece by piece (the merge's own path) against the output's bytes."""
    import torch

    from gpumerge.checkpoint import ITEMSIZE
    from gpumerge.pipeline import read_piece, blend_piece
    from gpumerge.plan import footprint_per_element, lay_out, needs_device, pieces_of

    size = ITEMSIZE[job.out_dtype]
    if not needs_device(job):
        for start in range(0, job.nbytes, _HASH_CHUNK):
            n = min(_HASH_CHUNK, job.nbytes - start)
            if a.read_bytes(job.name, start, n) != merged.read_bytes(job.name, start, n):
                return f"{job.name} differs from model 1's tensor (bytes {start}..{start + n - 1})"
        return None
    budget = 4 * 2**20 * footprint_per_element(job) + 4 * 64
    buffer = torch.empty(0, dtype=torch.uint8)
    for piece in pieces_of(job, budget):
        piece = lay_out(0, "cpu", [piece]).pieces[0]
        if buffer.numel() < piece.footprint():
            buffer = torch.empty(piece.footprint(), dtype=torch.uint8)
        read_piece(piece, buffer, a, b)
        blend_piece(piece, buffer)
        want = buffer[piece.out_offset:piece.out_offset + piece.count * size].numpy().tobytes()
        got = merged.read_bytes(job.name, piece.start * size, piece.count * size)
        if want != got:
            first = next(i for i in range(len(want)) if want[i] != got[i]) // size
            return (f"{job.name} differs from its recomputed blend (element {piece.start + first} first; "
                    f"t = {job.t:g}, method {job.method})")
    return None


# ---- a path: a model directory, or a sweep's ---------------------------------------------------------------------

def verify(path: Path | str, *, model_path1=None, model_path2=None, full: bool = False) -> list[Report]:
    from gpumerge.runs import SWEEP_FILE
    from gpumerge.spec import check_home

    if (model_path1 is None) != (model_path2 is None):
        raise SpecError("give both --model_path1 and --model_path2, or neither (the record's inputs are used)")
    if not str(path):
        raise SpecError("'' is not a directory; give a merge's output or a sweep's directory")
    check_home(path, what=f"verify {path}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SpecError(f"{path} is not a directory; give a merge's output or a sweep's directory")
    if not (path / SWEEP_FILE).is_file():
        return [verify_model(path, model_path1=model_path1, model_path2=model_path2, full=full)]
    return _verify_sweep(path, model_path1=model_path1, model_path2=model_path2, full=full)


def _verify_sweep(runs: Path, *, model_path1, model_path2, full: bool) -> list[Report]:
    """Each variant sweep.json names, against its entry there. A sweep that writes every variant must hold each
    one; an evaluated sweep, the kept ones its results.json names. An alias must name a variant of the same rules;
    nothing may be in RUNS beyond the sweep's own files and variants (a run's working files are noted)."""
    from gpumerge import fsutil
    from gpumerge.outdir import is_working_name
    from gpumerge.runs import PENDING_DIR, RUNS_FILES, SWEEP_FILE
    from gpumerge.spec import NAME_RE

    record = fsutil.load_json(fsutil.read_regular(runs / SWEEP_FILE, what=str(runs / SWEEP_FILE), error=SpecError),
                              what=str(runs / SWEEP_FILE), error=SpecError)
    entries = record.get("variants") if isinstance(record, dict) else None
    if not isinstance(entries, list) or not all(isinstance(v, dict) for v in entries):
        raise SpecError(f"{runs / SWEEP_FILE} is not a gpumerge sweep record")
    sweep = Report(runs)
    by_name = {e.get("name"): e for e in entries}
    required = _required_variants(sweep, runs, record, entries)
    reports = []
    for entry in entries:
        name = entry.get("name")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            sweep.problems.append(f"{SWEEP_FILE} names a variant {name!r} that cannot be a sweep's")
            continue
        alias = entry.get("same_as")
        if alias is not None:
            target = by_name.get(alias)
            if (not isinstance(target, dict) or target.get("same_as") is not None
                    or target.get("rules") != entry.get("rules") or alias == name):
                sweep.problems.append(f"{SWEEP_FILE}: variant {name} is said to be the same as {alias!r}, which is "
                                      "not a variant of the same rules")
            continue
        where = runs / name
        if where.is_symlink() or (where.exists() and not where.is_dir()):
            sweep.problems.append(f"{name} is not a directory the sweep wrote (a link, or not a directory)")
        elif not where.exists():
            if name in required:
                sweep.problems.append(f"variant {name} is missing")
        else:
            reports.append(verify_model(where, model_path1=model_path1, model_path2=model_path2, full=full,
                                        expected_settings=entry.get("settings")))
    listed = {e.get("name") for e in entries if e.get("same_as") is None}
    working = []
    for item in sorted(os.listdir(runs)):
        if item in RUNS_FILES or item in listed:
            continue
        if item == PENDING_DIR or is_working_name(item):
            working.append(item)
        else:
            sweep.problems.append(f"holds {item}, which its {SWEEP_FILE} does not name")
    if working:
        sweep.notes.append(f"{len(working)} working file(s) of an unfinished or running sweep")
    if not reports and not sweep.problems:
        raise SpecError(f"the sweep in {runs} has no variant written yet")
    return ([sweep] if sweep.problems else []) + reports


def _required_variants(sweep: Report, runs: Path, record: dict, entries: list) -> set:
    """The variants RUNS must hold: all of a sweep that writes every variant; the kept ones (results.json) of an
    evaluated sweep, whose sweep.json carries its evaluation record."""
    from gpumerge import fsutil

    names = {e.get("name") for e in entries if e.get("same_as") is None}
    if "eval" not in record:
        return names
    evaluation = record["eval"]
    if not isinstance(evaluation, dict) or not {"texts", "seq_len", "definition"} <= set(evaluation):
        sweep.problems.append("sweep.json's eval is not an evaluation record")
        return names
    try:
        results = fsutil.load_json(fsutil.read_regular(runs / "results.json", what="results.json", error=SpecError),
                                   what="results.json", error=SpecError)
        rows = results["rows"]
        return {row["name"] for row in rows if row.get("kept") and not row.get("baseline")}
    except (GpumergeError, KeyError, TypeError, AttributeError):
        sweep.problems.append("results.json, which names the kept variants of an evaluated sweep, cannot be read")
        return names


def summary(report: Report) -> str:
    return "; ".join(report.notes)


class _CallableModule(types.ModuleType):
    """``from gpumerge import verify`` must be the function whatever was imported before: importing this module
    (the command line, a test, a user's ``import gpumerge.verify``) sets the package's attribute ``verify`` to the
    module, which shadows the lazily exported function. Calling the module calls the function."""

    def __call__(self, path: Path | str, **kwargs) -> list[Report]:
        return verify(path, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
