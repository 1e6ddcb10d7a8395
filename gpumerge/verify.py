"""`gpumerge verify OUT`: is this directory exactly the merge its record claims? And checksums for outputs.

Checks, each problem one line:
- the shards and the index, read with the merge's own checkpoint reader (the safetensors library's rules);
- checksums.sha256, when present (`sha256sum -c` works on it too);
- the merge record (every shard's metadata, key ``gpumerge``): the inputs it names (or --model_path1/2) must be
  those recorded (fingerprints); then the merge is planned again from the recorded settings, the layout compared,
  and a deterministic sample of tensors (every tensor with --full) recomputed with the merge's kernel and compared
  bit for bit: the blend gives the same bytes on every machine, so this holds anywhere.
A sweep's directory (RUNS, with sweep.json) is verified variant by variant.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.errors import GpumergeError, SpecError

CHECKSUMS = "checksums.sha256"
_HASH_CHUNK = 16 * 2**20
_SAMPLE_EVERY = 8  # the default sample: about one tensor in 8 (by a hash of its name), and the first and last blended
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


# ---- checksums -----------------------------------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """OUT/checksums.sha256 in `sha256sum` format, every file of the directory (hashed in parallel: hashlib releases
    the GIL for large blocks)."""
    from concurrent.futures import ThreadPoolExecutor

    names = sorted(e.name for e in os.scandir(directory) if e.is_file(follow_symlinks=False) and e.name != CHECKSUMS)
    with ThreadPoolExecutor(max_workers=max(1, min(len(names), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(lambda name: file_sha256(directory / name), names))
    (directory / CHECKSUMS).write_text("".join(f"{d}  {n}\n" for d, n in zip(digests, names)))


def check_checksums(directory: Path) -> tuple[list[str], int]:
    """(problems, files checked) against checksums.sha256."""
    problems, checked = [], 0
    try:
        text = (directory / CHECKSUMS).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [f"{CHECKSUMS} cannot be read ({exc})"], 0
    for number, line in enumerate(text.splitlines(), 1):
        found = _LINE.match(line)
        if not found or "/" in found.group(2) or found.group(2) in (".", ".."):
            problems.append(f"{CHECKSUMS} line {number} is not `SHA256  NAME` of a file in this directory")
            continue
        digest, name = found.groups()
        path = directory / name
        if not path.is_file() or path.is_symlink():
            problems.append(f"{name} is listed in {CHECKSUMS} and missing")
            continue
        checked += 1
        if file_sha256(path) != digest:
            problems.append(f"{name}: its sha256 differs from {CHECKSUMS}")
    return problems, checked


# ---- one model directory -------------------------------------------------------------------------------------------

@dataclass
class Report:
    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_model(out: Path, *, model_path1: str | None = None, model_path2: str | None = None,
                 full: bool = False) -> Report:
    from gpumerge.checkpoint import Checkpoint

    report = Report(out)
    try:
        merged = Checkpoint(str(out), label="the output")
    except GpumergeError as exc:
        report.problems.append(str(exc).replace(f"the output {out}: ", "").replace(f"the output {out}", ""))
        return report
    with merged:
        report.notes.append(f"{len(merged.files)} shard(s), {len(merged.tensors)} tensors")
        if (out / CHECKSUMS).exists():
            problems, checked = check_checksums(out)
            report.problems += problems
            report.notes.append(f"{checked} checksums checked")
        else:
            report.notes.append(f"no {CHECKSUMS}")
        from gpumerge.runs import variant_record

        record = variant_record(out)
        if record is None:
            report.problems.append("holds no gpumerge merge record in its shards' metadata: it cannot be checked "
                                   "against its recipe")
            return report
        _recompute(report, merged, record, model_path1, model_path2, full)
    return report


def _inputs(record: dict, given: tuple[str | None, str | None]) -> list[str | None]:
    found = []
    for entry, path in zip(record.get("inputs", [])[:2], given):
        if path is not None:
            found.append(path)
            continue
        candidates = [entry.get("resolved"), entry.get("path")] if isinstance(entry, dict) else []
        found.append(next((c for c in candidates if isinstance(c, str) and Path(c).expanduser().is_dir()), None))
    return found + [None] * (2 - len(found))


def _recompute(report: Report, merged, record: dict, path1, path2, full: bool) -> None:
    from gpumerge.merge import open_pair, plan_merge

    paths = _inputs(record, (path1, path2))
    if None in paths:
        report.notes.append("the inputs are not here: the blend was not recomputed (give --model_path1 and "
                            "--model_path2)")
        return
    spec = _spec(record, paths)
    a, b = open_pair(spec)
    with a, b:
        recorded = [entry.get("fingerprint") for entry in record["inputs"][:2]]
        for ckpt, want, role in zip((a, b), recorded, ("model 1", "model 2")):
            if ckpt.fingerprint() != want:
                report.problems.append(f"{role} at {ckpt.root} is not the recorded input (fingerprint "
                                       f"{ckpt.fingerprint()[:16]}, recorded {str(want)[:16]})")
        if report.problems:
            return
        plan = plan_merge(spec, a, b, notice=lambda line: None)
        layout = {job.name: (job.out_dtype, list(job.shape)) for job in plan.jobs}
        found = {name: (info.dtype, list(info.shape)) for name, info in merged.tensors.items()}
        if layout != found:
            differ = sorted(set(layout) ^ set(found)) or sorted(n for n in layout if layout[n] != found[n])
            report.problems.append(f"the tensors differ from what the recorded settings make ({', '.join(differ[:3])}"
                                   + (", ..." if len(differ) > 3 else "") + ")")
            return
        jobs = plan.jobs if full else sample(plan.jobs)
        jobs = _with_slerp_coefficients(jobs, a, b)
        blended = copied = 0
        for job in jobs:
            problem = _compare(job, a, b, merged)
            if problem:
                report.problems.append(problem)
            blended += job.blended
            copied += not job.blended
        report.notes.append(f"{'every' if full else 'a sample of'} {blended} blended and {copied} other tensors "
                            "recomputed bit for bit")


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


def sample(jobs) -> list:
    """A deterministic sample: about one tensor in _SAMPLE_EVERY by a hash of its name, plus the first and the last
    blended ones (the same tensors on every machine and every run)."""
    blended = [job for job in jobs if job.blended]
    keep = {job.name for job in jobs if hashlib.sha256(job.name.encode()).digest()[0] % _SAMPLE_EVERY == 0}
    keep |= {job.name for job in blended[:1] + blended[-1:]}
    return [job for job in jobs if job.name in keep]


def _with_slerp_coefficients(jobs, a, b):
    from dataclasses import replace

    from gpumerge.kernels.slerp import coefficients
    from gpumerge.pipeline import DEFAULT_CHUNK_ELEMENTS, _slerp_sums

    out = []
    for job in jobs:
        if job.blended and job.method == "slerp":
            sums = _slerp_sums(job, a, b, DEFAULT_CHUNK_ELEMENTS)
            job = replace(job, coef=coefficients(sums.aa, sums.bb, sums.ab, job.t))
        out.append(job)
    return out


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

    path = Path(path).expanduser()
    if not path.is_dir():
        raise SpecError(f"gpumerge verify: {path} is not a directory (give a merge's output or a sweep's directory)")
    if not (path / SWEEP_FILE).is_file():
        return [verify_model(path, model_path1=model_path1, model_path2=model_path2, full=full)]
    from gpumerge import fsutil

    record = fsutil.load_json(fsutil.read_regular(path / SWEEP_FILE, what=str(path / SWEEP_FILE), error=SpecError),
                              what=str(path / SWEEP_FILE), error=SpecError)
    names = [v.get("name") for v in record.get("variants", []) if isinstance(v, dict) and v.get("same_as") is None] \
        if isinstance(record, dict) else []
    present = [n for n in names if isinstance(n, str) and "/" not in n and (path / n).is_dir()]
    if not present:
        raise SpecError(f"gpumerge verify: the sweep in {path} has no variant written yet")
    return [verify_model(path / n, model_path1=model_path1, model_path2=model_path2, full=full) for n in present]


def summary(report: Report) -> str:
    return "; ".join(report.notes)
