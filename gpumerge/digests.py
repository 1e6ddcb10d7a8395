"""Every file of an output, digested as the merge writes it: OUT/gpumerge_digests.json lists each file (bar itself
and checksums.sha256) with its size and xxh3-128, and is tied to the merge record by the record's sha256. `verify`
checks every byte against it at disk speed, and a sweep's resume takes a variant as complete only when its bytes
match.

Why a file beside the record rather than inside it: the record sits in every shard's safetensors header, which is
written before the shard's bytes exist. Why xxh3-128 (the xxhash package): it hashes at ~28 GB/s on one core of the
2-core CI machine (sha256: 0.8 GB/s), so digesting the shards from the page cache right after they are written
costs a small part of a merge that is bound by the disk (benchmarks/bench_checksums.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from gpumerge import fsutil
from gpumerge.errors import GpumergeError, OutputError, SpecError

DIGESTS_FILE = "gpumerge_digests.json"
CHECKSUMS = "checksums.sha256"
ALGORITHM = "xxh3_128"
_CHUNK = 16 * 2**20  # each read of a file being hashed
_MAX_DIGESTS_BYTES = 16 * 2**20  # a few hundred bytes a file
_MAX_CHECKSUMS_BYTES = 16 * 2**20
_LINE = re.compile(r"^(\\?)([0-9a-f]{64}) [ *](.+)$")  # a sha256sum line (a leading backslash: an escaped name)


def record_sha256(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _stream(fd: int, update) -> int:
    """Every byte of an open file, in bounded chunks, into ``update``; the bytes read."""
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    total = 0
    while n := os.readv(fd, [buffer]):
        update(view[:n])
        total += n
    return total


def file_digest(path: Path, *, what: str | None = None, expected_bytes: int | None = None) -> tuple[int, str]:
    """(bytes, xxh3-128 hex) of a regular file (links followed), read in bounded chunks; a FIFO or device is an
    OutputError, never a hang. A file whose size is not ``expected_bytes`` is not read at all (digest "")."""
    import xxhash

    fd = fsutil.open_regular(path, what=what or str(path), error=OutputError)
    try:
        size = os.fstat(fd).st_size
        if expected_bytes is not None and size != expected_bytes:
            return size, ""
        digest = xxhash.xxh3_128()
        return _stream(fd, digest.update), digest.hexdigest()
    finally:
        os.close(fd)


def _listed(directory: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(directory)
                  if e.name not in (DIGESTS_FILE, CHECKSUMS) and e.is_file(follow_symlinks=False))


def write_digests(directory: Path, record: dict, *, checksums: bool = False) -> None:
    """OUT/gpumerge_digests.json for every file already in OUT (the shards just written are in the page cache);
    ``checksums``: a checksums.sha256 follows, and its absence later is a problem."""
    files = {}
    for name in _listed(directory):
        nbytes, digest = file_digest(directory / name)
        files[name] = {"bytes": nbytes, ALGORITHM: digest}
    data = {"tool": "gpumerge", "algorithm": ALGORITHM, "record_sha256": record_sha256(record), "files": files,
            "checksums": checksums}
    (directory / DIGESTS_FILE).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_digests(directory: Path) -> dict:
    """The digests file, checked for shape; an OutputError says what is wrong with it."""
    path = directory / DIGESTS_FILE
    if not os.path.lexists(path):
        raise OutputError(f"{DIGESTS_FILE} is missing, so its bytes cannot be checked against the record")
    data = fsutil.load_json(fsutil.read_regular(path, max_bytes=_MAX_DIGESTS_BYTES, what=DIGESTS_FILE,
                                                error=OutputError), what=DIGESTS_FILE, error=OutputError)
    files = data.get("files") if isinstance(data, dict) else None
    if (not isinstance(files, dict) or data.get("algorithm") != ALGORITHM
            or not all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get(ALGORITHM), str)
                       for v in files.values())
            or not all(isinstance(k, str) and k and "/" not in k and k not in (".", "..") for k in files)):
        raise OutputError(f"{DIGESTS_FILE} is not a gpumerge digests file")
    return data


def check_digests(directory: Path, record: dict | None) -> tuple[list[str], int]:
    """(problems, bytes checked): every file listed has its size and digest, none is missing, and no file is there
    beyond them; the list belongs to ``record`` when one is given."""
    try:
        data = read_digests(directory)
    except GpumergeError as exc:
        return [str(exc)], 0
    problems: list[str] = []
    if record is not None and data.get("record_sha256") != record_sha256(record):
        problems.append(f"{DIGESTS_FILE} belongs to another merge record than the shards'")
    checked = 0
    for name, want in sorted(data["files"].items()):
        path = directory / name
        if not os.path.lexists(path):
            problems.append(f"{name} is missing (listed in {DIGESTS_FILE})")
            continue
        try:
            nbytes, digest = file_digest(path, what=name, expected_bytes=want["bytes"])
        except GpumergeError as exc:
            problems.append(str(exc))
            continue
        checked += nbytes
        if nbytes != want["bytes"] or digest != want[ALGORITHM]:
            problems.append(f"{name} differs from its recorded digest (" + (
                f"{nbytes} bytes, recorded {want['bytes']})" if nbytes != want["bytes"] else "a byte changed)"))
    if data.get("checksums") is True and not os.path.lexists(directory / CHECKSUMS):
        problems.append(f"{CHECKSUMS} was written with the merge and is missing")
    extra = sorted(set(os.listdir(directory)) - set(data["files"]) - {DIGESTS_FILE, CHECKSUMS})
    if extra:
        problems.append("holds files its digests do not list: " + ", ".join(extra[:4])
                        + (", ..." if len(extra) > 4 else ""))
    return problems, checked


# ---- checksums.sha256 (--checksums) ----------------------------------------------------------------------------

def file_sha256(path: Path) -> str:
    """A regular file's sha256 (links followed); a FIFO or device is a SpecError, never a hang."""
    digest = hashlib.sha256()
    fd = fsutil.open_regular(path, what=path.name, error=SpecError)
    try:
        _stream(fd, digest.update)
    finally:
        os.close(fd)
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
        try:
            same = file_sha256(path) == found.group(2)
        except GpumergeError as exc:
            problems.append(str(exc))
            continue
        if not same:
            problems.append(f"{name}: its sha256 differs from {CHECKSUMS}")
    if checked == 0 and not problems:
        problems.append(f"{CHECKSUMS} lists no file")
    listed = {(_unescaped(m.group(3)) if m.group(1) else m.group(3)) for m in map(_LINE.match, text.splitlines()) if m}
    unlisted = sorted(e.name for e in os.scandir(directory) if e.name != CHECKSUMS and e.name not in listed)
    if unlisted:
        problems.append(f"{CHECKSUMS} does not list {len(unlisted)} file(s) of the directory: "
                        + ", ".join(unlisted[:4]) + (", ..." if len(unlisted) > 4 else ""))
    return problems, checked
