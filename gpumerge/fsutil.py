"""Reading small files we do not trust (recipes, config.json, index files, safetensors headers' JSON) safely:
regular files only (a FIFO would block forever, /dev/zero would grow memory until the kernel kills us), never more
than a bound, and JSON whose nesting or duplicate keys cannot crash or fool the parser.

Written here rather than with a library: none of json, PyYAML or pathlib bounds a read or refuses a FIFO.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from gpumerge.errors import GpumergeError

MAX_TEXT_BYTES = 64 * 2**20  # config.json, index files, recipes: real ones are kilobytes to a few megabytes


def file_kind(mode: int) -> str:
    return ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def open_regular(path: Path | str, *, what: str, error: type[GpumergeError],
                 expected: str = "give a regular file") -> int:
    """A read-only descriptor of ``path``, which must be a regular file. Opened with O_NONBLOCK, so that a FIFO
    (even one swapped in after a stat) cannot block the open; the type is checked on the open descriptor, so there
    is no race between the check and the reads."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{what}: cannot read it ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{what}: is {file_kind(mode)}; {expected}")
    return fd


def read_regular(path: Path | str, *, max_bytes: int = MAX_TEXT_BYTES, what: str,
                 error: type[GpumergeError]) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` (open_regular), reading at most
    ``max_bytes + 1`` bytes; anything else is ``error`` naming ``what``."""
    fd = open_regular(path, what=what, error=error)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise error(f"{what}: is {size} bytes, more than the {max_bytes} bytes such a file can sensibly be")
        chunks: list[bytes] = []
        total = 0
        while total <= max_bytes:
            chunk = os.read(fd, min(2**20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:  # it grew while we read it
            raise error(f"{what}: is more than the {max_bytes} bytes such a file can sensibly be")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{what}: cannot read it ({exc.strerror})") from None
    finally:
        os.close(fd)


def decode_text(raw: bytes, *, what: str, error: type[GpumergeError]) -> str:
    """UTF-8 text (a UTF-8 byte-order mark is dropped); UTF-16/32 or any other encoding is ``error``."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise error(f"{what}: is UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what}: is not UTF-8 text (byte {exc.start} is {raw[exc.start:exc.start + 1]!r}); "
                    "save it as UTF-8") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def load_json(raw: bytes | str, *, what: str, error: type[GpumergeError]) -> Any:
    """JSON from untrusted bytes: bad UTF-8, bad syntax, nesting too deep for the parser and duplicate keys (which
    json.loads would silently resolve to the last) are each one ``error`` naming ``what``."""
    text = decode_text(raw, what=what, error=error) if isinstance(raw, bytes) else raw
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise error(f"{what}: the key {str(exc)[:80]!r} appears twice") from None
    except RecursionError:
        raise error(f"{what}: is nested too deeply to be a real file") from None
    except ValueError as exc:
        raise error(f"{what}: is not valid JSON ({str(exc)[:120]})") from None
