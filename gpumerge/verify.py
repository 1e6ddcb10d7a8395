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
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.errors import GpumergeError, SpecError

CHECKSUMS = "checksums.sha256"
_HASH_CHUNK = 16 * 2**20
_MAX_CHECKSUMS_BYTES = 16 * 2**20
_SAMPLE_EVERY = 8  # the default sample: about one tensor in 8 (by a hash of its name), and the first and last blended
_LINE = re.compile(r"^(\\?)([0-9a-f]{64}) [ *](.+)$")


# ---- checksums -----------------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _escaped(name: str) -> tuple[str, str]:
    """sha256sum's escaping of a name holding a backslash or a newline: a leading backslash on the line."""
    if "\\" not in name and "\n" not in name:
        return "", name
    return "\\", name.replace("\\", "\\\\").replace("\n", "\\n")


def _unescaped(name: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), name)


def write_checksums(directory: Path) -> None:
    """OUT/checksums.sha256 in `sha256sum` format, every file of the directory (hashed in parallel: hashlib releases
    the GIL for large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False) and e.name != CHECKSUMS)
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda name: file_sha256(directory / name), names))
    lines = []
    for digest, name in zip(digests, names):
        mark, shown = _escaped(name)
        lines.append(f"{mark}{digest}  {shown}\n")
    (directory / CHECKSUMS).write_text("".join(lines))


def check_checksums(directory: Path) -> tuple[list[str], int]:
    """(problems, files checked) against checksums.sha256 (links followed: a hub cache's snapshot is links)."""
    from gpumerge import fsutil

    problems, checked = [], 0
    try:
        raw = fsutil.read_regular(directory / CHECKSUMS, max_bytes=_MAX_CHECKSUMS_BYTES, what=CHECKSUMS,
                                  error=SpecError)
        text = raw.decode("utf-8")
    except (GpumergeError, UnicodeDecodeError) as exc:
        return [f"{CHECKSUMS} cannot be read ({exc})"], 0
    for number, line in enumerate(text.splitlines(), 1):
        found = _LINE.match(line)
        name = _unescaped(found.group(3)) if found and found.group(1) else found.group(3) if found else ""
        if not found or "/" in name or name in (".", ".."):
            problems.append(f"{CHECKSUMS} line {number} is not a sha256 and the name of a file in this directory")
            continue
        path = directory / name
        if not path.exists():
            problems.append(f"{name!r} is listed in {CHECKSUMS} and missing")
            continue
        if not path.is_file():
            problems.append(f"{name!r} is listed in {CHECKSUMS} and is not a regular file")
            continue
        checked += 1
        if file_sha256(path) != found.group(2):
            problems.append(f"{name}: its sha256 differs from {CHECKSUMS}")
    if checked == 0 and not problems:
        problems.append(f"{CHECKSUMS} lists no file")
    return problems, checked


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

    report = Report(out)
    if (out / CHECKSUMS).exists() or (out / CHECKSUMS).is_symlink():
        problems, checked = check_checksums(out)
        report.problems += problems
        report.notes.append(f"{checked} checksums checked")
    else:
        report.notes.append(f"no {CHECKSUMS}")
    try:
        merged = Checkpoint(str(out), label="the output")
    except GpumergeError as exc:
        report.problems.append(str(exc).replace(f"the output {out}/", "").replace(f"the output {out}: ", "")
                               .replace(f"the output {out}", "").lstrip("/: "))
        return report
    with merged:
        report.notes.append(f"{len(merged.files)} shard(s), {len(merged.tensors)} tensors")
        record = _record(report, out, merged)
        if record is None:
            return report
        if expected_settings is not None and _normal(record.get("settings")) != _normal(expected_settings):
            report.problems.append("its recorded settings are not those sweep.json gives this variant")
        _check_card_and_recipe(report, out, record)
        _recompute(report, out, merged, record, model_path1, model_path2, full)
    return report


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
    differ = [name for name, rec in zip(shards, records) if rec != records[0]]
    if differ:
        report.problems.append(f"its shards carry different merge records ({', '.join(differ[:3])} differ from "
                               f"{shards[0]})")
    if len(shards) > 1:
        import json

        try:
            index = json.loads((out / "model.safetensors.index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            report.problems.append(f"model.safetensors.index.json cannot be read ({exc})")
        else:
            data = sum(merged.tensors[name].nbytes for name in merged.tensors)
            if not isinstance(index, dict) or index.get("metadata", {}).get("total_size") != data:
                report.problems.append(f"model.safetensors.index.json: total_size is not the shards' {data} bytes")
    return records[0]


def _check_card_and_recipe(report: Report, out: Path, record: dict) -> None:
    """README.md and gpumerge_recipe.yaml as the merge writes them from its record."""
    from gpumerge import writer

    with tempfile.TemporaryDirectory(prefix="gpumerge-verify-") as scratch:
        writer.write_model_card(Path(scratch), record)
        want = (Path(scratch) / "README.md").read_bytes()
    try:
        got = (out / "README.md").read_bytes()
    except OSError:
        got = None
    if got != want:
        report.problems.append("README.md is not the model card of its merge record" if got is not None else
                               "README.md (the model card) is missing")
    try:
        from gpumerge.recipes import load_yaml

        recipe = load_yaml((out / writer.RECIPE_FILE).read_text(encoding="utf-8"), source=writer.RECIPE_FILE)
    except (OSError, UnicodeDecodeError, GpumergeError):
        recipe = None
    settings = record.get("settings") if isinstance(record.get("settings"), dict) else {}
    if recipe is None or any(_normal(recipe.get(k)) != _normal(v) for k, v in settings.items()):
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

        jobs = plan.jobs if full else sample(plan.jobs)
        updated = with_slerp_coefficients(jobs, a, b)
        jobs = [updated.get(job.name, job) for job in jobs]
        blended = copied = 0
        for job in jobs:
            problem = _compare(job, a, b, merged)
            if problem:
                report.problems.append(problem)
            blended += job.blended
            copied += not job.blended
        report.notes.append(f"{'all' if full else 'a sample of'} {blended} blended and {copied} other tensors "
                            "recomputed bit for bit")


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
    allowed = set(expected) | {s.filename for s in plan.shards} | {"README.md", writer.RECIPE_FILE, CHECKSUMS}
    for name, want in sorted(expected.items()):
        try:
            got = (out / name).read_bytes()
        except OSError:
            got = None
        if got != want:
            report.problems.append(f"{name} is {'missing' if got is None else 'not what the merge writes'}"
                                   + (" (model 1's file, or its config with the output dtype)" if got else ""))
    extra = sorted(e.name for e in os.scandir(out) if e.name not in allowed)
    if extra:
        report.problems.append("holds files the merge does not write: " + ", ".join(extra[:4])
                               + (", ..." if len(extra) > 4 else ""))


def _spec(record: dict, paths: list[str]):
    """The merge the record describes, with these inputs (as `gpumerge --config gpumerge_recipe.yaml` would)."""
    from gpumerge.cli import build_parser, spec_from_args
    from gpumerge.recipes import parse_recipe

    settings = record.get("settings")
    if not isinstance(settings, dict):
        raise SpecError("the merge record has no settings")
    args = build_parser("merge").parse_args(["--model_path1", paths[0], "--model_path2", paths[1], "--quiet"])
    return spec_from_args(args, output_required=False, recipe=(parse_recipe(settings, source="the merge record"),
                                                               "the merge record"))


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
    from gpumerge.pipeline import _read_piece, blend_piece
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
        _read_piece(piece, buffer, a, b)
        blend_piece(piece, buffer)
        want = buffer[piece.out_offset:piece.out_offset + piece.count * size].numpy().tobytes()
        got = merged.read_bytes(job.name, piece.start * size, piece.count * size)
        if want != got:
            first = next(i for i in range(len(want)) if want[i] != got[i]) // size
            return (f"{job.name} differs from its recomputed blend (element {piece.start + first} first; "
                    f"t = {job.t:g}, method {job.method})")
    return None


# ---- a path: a model directory, or a sweep's ---------------------------------------------------------------------

def verify(path: Path, *, model_path1=None, model_path2=None, full: bool = False) -> list[Report]:
    from gpumerge.runs import SWEEP_FILE

    if (model_path1 is None) != (model_path2 is None):
        raise SpecError("give both --model_path1 and --model_path2, or neither (the record's inputs are used)")
    path = Path(path).expanduser()
    if not str(path) or not path.is_dir():
        raise SpecError(f"{str(path) or repr('')} is not a directory; give a merge's output or a sweep's directory")
    if not (path / SWEEP_FILE).is_file():
        return [verify_model(path, model_path1=model_path1, model_path2=model_path2, full=full)]
    return _verify_sweep(path, model_path1=model_path1, model_path2=model_path2, full=full)


def _verify_sweep(runs: Path, *, model_path1, model_path2, full: bool) -> list[Report]:
    """Each variant sweep.json names, against its entry there; a variant missing from a sweep that writes them all
    (not an evaluated sweep, which writes the best only) is a problem."""
    from gpumerge import fsutil
    from gpumerge.runs import SWEEP_FILE
    from gpumerge.sweep import NAME_RE

    record = fsutil.load_json(fsutil.read_regular(runs / SWEEP_FILE, what=str(runs / SWEEP_FILE), error=SpecError),
                              what=str(runs / SWEEP_FILE), error=SpecError)
    entries = record.get("variants") if isinstance(record, dict) else None
    if not isinstance(entries, list) or not all(isinstance(v, dict) for v in entries):
        raise SpecError(f"{runs / SWEEP_FILE} is not a gpumerge sweep record")
    sweep = Report(runs)
    reports = []
    for entry in entries:
        name = entry.get("name")
        if entry.get("same_as") is not None:
            continue
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            sweep.problems.append(f"{SWEEP_FILE} names a variant {name!r} that cannot be a sweep's")
            continue
        where = runs / name
        if where.is_symlink() or (where.exists() and not where.is_dir()):
            sweep.problems.append(f"{name} is not a directory the sweep wrote (a link, or not a directory)")
        elif not where.exists():
            if not record.get("eval"):
                sweep.problems.append(f"variant {name} is missing")
        else:
            reports.append(verify_model(where, model_path1=model_path1, model_path2=model_path2, full=full,
                                        expected_settings=entry.get("settings")))
    if not reports and not sweep.problems:
        raise SpecError(f"the sweep in {runs} has no variant written yet")
    return ([sweep] if sweep.problems else []) + reports


def summary(report: Report) -> str:
    return "; ".join(report.notes)
