"""Where gpumerge writes, and the promises about it.

- Inputs are never written: the output directory and every file we write (--report, --plot) are compared with every
  input directory and every input file, each resolved (symbolic links followed) before the comparison.
- The output appears atomically: it is built in a hidden sibling directory and renamed into place when complete.
  An existing output is replaced only with --overwrite, only when it looks like a model directory (MODEL_FILES),
  checked again at the moment of the swap, and swapped in one step (renameat2 RENAME_EXCHANGE on Linux).
- One run at a time per output: an advisory lock (flock) on a hidden sibling file, held by the process and released
  by the kernel if it dies; a second run into the same output is refused at once.

The lock and the swap are written by hand (fcntl, ctypes renameat2): no well-kept library offers an exchange of two
directories, and filelock's lock files would need the same inode re-check as here.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import glob
import hashlib
import os
import re
import secrets
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpumerge.errors import OutputError, SpecError
from gpumerge.signals import GUARD, test_pause
from gpumerge.spec import check_home

# What --overwrite may replace: a directory holding config.json and weights, and nothing but files of these names
# (the files of a Hugging Face model repository and of a gpumerge output). No subdirectories.
MODEL_FILES = (
    "config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "*.tiktoken", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "README.md", "LICENSE*", "USE_POLICY.md", "NOTICE*",
    ".gitattributes", "gpumerge_recipe.yaml", "gpumerge_digests.json", "checksums.sha256", "configuration_*.py",
    "modeling_*.py", "tokenization_*.py",
)
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin")
_STEM_NAME_BYTES = 40  # hidden sibling names stay far below NAME_MAX whatever the output's name


@dataclass(frozen=True, slots=True)
class Inputs:
    """Every input directory and every file in them, resolved, with their identities (device, inode): what no
    output path may be, be inside, or hold, even after a rename."""

    roots: tuple[tuple[str, Path], ...]  # (label, resolved directory)
    files: tuple[tuple[str, Path, Path], ...]  # (label, path as found, resolved)
    identities: dict  # (st_dev, st_ino) -> (label, path) of every input directory and file

    @classmethod
    def of(cls, *checkpoints) -> "Inputs":
        roots, files, identities = [], [], {}
        for ckpt in checkpoints:
            label = ckpt.label.split(" (")[0]
            root = Path(ckpt.root).resolve()
            roots.append((label, root))
            _remember(identities, root, label)
            listed = set(getattr(ckpt, "input_files", lambda: [])())
            try:
                listed.update(p for p in Path(ckpt.root).iterdir())
            except OSError:
                pass
            for path in sorted(listed):
                files.append((label, path, _resolve(path)))
                _remember(identities, path, label)
        return cls(tuple(roots), tuple(files), identities)

    def owner(self, path: Path) -> tuple[str, Path] | None:
        """(label, input path) when ``path`` is, by identity, an input directory or file (links followed)."""
        try:
            info = os.stat(path)
        except OSError:
            return None
        return self.identities.get((info.st_dev, info.st_ino))

    def held_by(self, directory: Path) -> tuple[str, Path] | None:
        """An input that ``directory`` is, holds (as an entry, by identity), or contains (by resolved path)."""
        found = self.owner(directory)
        if found:
            return found
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    found = self.owner(Path(entry.path))
                    if found:
                        return found
        except OSError:
            pass
        real = _resolve(directory)
        for label, root in self.roots:
            if root.is_relative_to(real):
                return label, root
        for label, found_path, resolved in self.files:
            if resolved.is_relative_to(real):
                return label, found_path
        return None


def _remember(identities: dict, path: Path, label: str) -> None:
    try:
        info = os.stat(path)
    except OSError:
        return
    identities.setdefault((info.st_dev, info.st_ino), (label, path))


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare it as it is
        return Path(os.path.abspath(path))


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or path.is_relative_to(directory)


def canonical(path: Path | str, *, flag: str) -> Path:
    """Absolute, with the parent's symbolic links and '..' resolved as the kernel would, the last component kept (a
    link there is the caller's to judge). The name must be UTF-8 (it goes into the model card and record)."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError(f"{flag} {text.encode('utf-8', 'surrogateescape')!r} is not a valid UTF-8 name; "
                        "rename it") from None
    check_home(text, what=f"{flag} {text}")
    path = Path(text).expanduser()
    if path.name in ("", ".", ".."):
        return _resolve(path)
    return _resolve(path.parent) / path.name


def _protected(path: Path) -> str | None:
    """The root, the home directory, the current directory and every directory above them are never replaced."""
    places = [("the root directory", lambda: Path("/")), ("your home directory", Path.home),
              ("the current directory", Path.cwd)]
    for what, where in places:
        try:
            place = _resolve(where())
        except (OSError, RuntimeError):  # no home directory, or a current directory that was deleted
            continue
        if place == path:
            return what
        if place.is_relative_to(path):
            return f"a directory above {what} ({place})"
    return None


def check_output_path(out: Path | str, *, inputs: Inputs, overwrite: bool, flag: str = "--output_model_path",
                      existing: Callable[[Path], None] | None = None) -> Path:
    """Refuse an OUT that could damage an input or an existing directory, before any work. Returns OUT canonical.
    ``existing`` judges a non-empty OUT instead of the merge's rule (--overwrite, and a model directory): a sweep
    resumes in, or replaces, a directory of its own kind."""
    out = canonical(out, flag=flag)
    where = existing_parent(out)
    name_max = _name_max(where)
    if len(os.fsencode(out.name)) > name_max:
        raise OutputError(f"{flag}: the name {out.name[:40]}... is {len(os.fsencode(out.name))} bytes, more than "
                          f"the {name_max} this filesystem allows")
    if not where.is_dir():
        raise OutputError(f"{flag} {out}: {where} is not a directory")
    if out.is_symlink():
        raise OutputError(f"{flag} {out} is a symbolic link (to {os.readlink(out)}); give the directory itself")
    overlap_problem(out, inputs, flag=flag, directory=True)
    _check_siblings(out, inputs, overwrite=overwrite, flag=flag)
    protected = _protected(out)
    if protected:
        raise OutputError(f"{flag} {out} is {protected}; write the merge into a new directory "
                          "(this is refused even with --overwrite)")
    if not os.access(where, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: {where} is not writable")
    if is_working_name(out.name):
        raise OutputError(f"{flag} {out} is named like gpumerge's hidden working files; give another name")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"{flag} {out} exists and is not a directory")
        if os.path.ismount(out):
            raise OutputError(f"{flag} {out} is a mount point: the merge is put in place by a rename, which a mount "
                              "point refuses; write into a new directory inside it")
        if _non_empty(out) and existing is not None:
            existing(out)
        elif _non_empty(out):
            if not overwrite:
                raise OutputError(f"{flag} {out} exists and is not empty; pass --overwrite to replace it")
            problem = replace_problem(out)
            if problem:
                raise OutputError(f"--overwrite would delete {out}, which {problem}; remove it yourself or choose "
                                  "another output directory")
    return out


def _reserved(path: Path, out: Path) -> bool:
    """``path``, or a directory above it, is one of the hidden siblings gpumerge makes, removes or moves for OUT."""
    stem = sibling_stem(out)
    return any(p.parent == out.parent and p.name.startswith(stem) for p in (path, *path.parents))


def _check_siblings(out: Path, inputs: Inputs, *, overwrite: bool, flag: str) -> None:
    """No input may go by the names of OUT's hidden siblings (a leftover partial directory is removed, an '.old' one
    moved back to OUT); the lock file's name must be free for a lock file; an OUT that an interrupted run moved aside
    comes back only with --overwrite (what the merge would say, `plan` says too)."""
    for label, root in inputs.roots:
        for path in (root, *(found for lab, found, _ in inputs.files if lab == label)):
            if _reserved(Path(os.path.abspath(path)), out) or _reserved(_resolve(path), out):
                raise OutputError(f"{label}'s {path} is named like gpumerge's hidden working files for {out} "
                                  f"({sibling_stem(out)}*); rename it or choose another output directory")
    lock = out.parent / (sibling_stem(out) + ".lock")
    if os.path.lexists(lock):
        info = os.lstat(lock)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or info.st_size > _LOCK_MAX_BYTES:
            raise OutputError(f"{flag} {out}: {lock} is in the way of gpumerge's lock file (it is not "
                              "one); remove it")
    if not overwrite and not out.exists() and _stale(out, ".old"):
        raise OutputError(f"an earlier run was interrupted while replacing {out}; its previous contents are at "
                          f"{_stale(out, '.old')[0]}: move them back yourself, or pass --overwrite to replace them")


def _stale(out: Path, suffix: str) -> list[Path]:
    """OUT's own leftovers, by their exact shape 'STEM-PID-XXXXXXXX.partial' (or '.old'): a prefix match would also
    take another OUT's, whose name may start like this stem."""
    shape = re.compile(re.escape(sibling_stem(out)) + r"-[0-9]+-[a-z0-9_]{8}" + re.escape(suffix))
    pattern = os.path.join(glob.escape(str(out.parent)), glob.escape(sibling_stem(out)) + "-*" + suffix)
    return sorted(Path(p) for p in glob.glob(pattern) if shape.fullmatch(Path(p).name))


# The hidden names gpumerge makes beside the paths it writes, for any OUT or report: never a name for a user's file.
_WORKING_NAME = re.compile(r"\..*\.gpumerge(\.lock|-[0-9]+-[a-z0-9_]{8}\.(partial|old)|-[0-9]+-.*\.tmp)")


def is_working_name(name: str) -> bool:
    return bool(_WORKING_NAME.fullmatch(name))


def overlap_problem(path: Path, inputs: Inputs, *, flag: str, directory: bool) -> None:
    """``path`` (canonical) must not be an input, be inside one, or (a directory) hold one; links are followed."""
    real = _resolve(path)
    for label, root in inputs.roots:
        for candidate in {path, real}:
            if _inside(candidate, root) or (directory and root.is_relative_to(candidate)):
                verb = "is" if candidate == root else "overlaps"
                raise OutputError(f"{flag} {path} {verb} the input directory of {label} ({root}): write somewhere "
                                  "else (this is refused even with --overwrite)")
    for label, found, resolved in inputs.files:
        for candidate in {path, real}:
            if resolved == candidate or (directory and resolved.is_relative_to(candidate)):
                raise OutputError(f"{flag} {path} {'is' if resolved == candidate else 'holds'} {label}'s file "
                                  f"{found}" + (f" (a link to {resolved})" if resolved != found else "")
                                  + ": write somewhere else (this is refused even with --overwrite)")
    held = (inputs.held_by(path) if directory and path.is_dir() else inputs.owner(path)) if path.exists() else None
    if held:  # by identity: a hard link, or an input renamed since it was opened
        raise OutputError(f"{flag} {path} is or holds {held[0]}'s {held[1]} (the same file): write somewhere else "
                          "(this is refused even with --overwrite)")


def check_write_file(path: Path | str, *, flag: str, inputs: Inputs, out: Path | None) -> Path:
    """A file we write besides the output directory (--report, --plot): never an input file, nothing inside an input
    or the output directory, a regular file or nothing, in an existing writable directory. Returns it canonical."""
    path = canonical(path, flag=flag)
    overlap_problem(path, inputs, flag=flag, directory=False)
    if is_working_name(path.name) or is_working_name(_resolve(path).name):
        raise SpecError(f"{flag} {path} is named like gpumerge's hidden working files (locks, partial outputs, "
                        "temporary files); give another name")
    if out is not None:
        for candidate in {path, _resolve(path)}:
            if _reserved(candidate, out):
                raise SpecError(f"{flag} {path} is named like gpumerge's hidden working files for {out}; give "
                                "another name")
            if _inside(candidate, out):
                raise SpecError(f"{flag} {path} is {'the' if candidate == out else 'inside the'} output directory "
                                f"{out}; give a file elsewhere")
    if path.exists() or path.is_symlink():
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            raise SpecError(f"{flag} {path}: {exc.strerror}") from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            raise SpecError(f"{flag} {path} is {kind}; give a file name")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"{flag} {path}: give a file name in an existing, writable directory")
    return path


def replace_problem(out: Path) -> str | None:
    """Why --overwrite may not replace ``out``, or None: it must hold config.json and weights, no subdirectories
    and nothing but model files (MODEL_FILES), and be no protected directory."""
    protected = _protected(out)
    if protected:
        return f"is {protected}"
    try:
        entries = list(os.scandir(out))
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})"
    names = {e.name for e in entries}
    subdirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
    if subdirs:
        return f"has subdirectories ({', '.join(subdirs[:3])}), which a model directory does not"
    if "config.json" not in names:
        return "has no config.json, so it does not look like a model directory"
    if not any(fnmatch.fnmatch(n, pattern) for n in names for pattern in WEIGHT_FILES):
        return "holds no weights (*.safetensors or pytorch_model*.bin), so it does not look like a model directory"
    unrelated = sorted(n for n in names if not any(fnmatch.fnmatch(n, pattern) for pattern in MODEL_FILES))
    if unrelated:
        return (f"holds files that are not a model's ({', '.join(unrelated[:4])}"
                + (", ..." if len(unrelated) > 4 else "") + ")")
    return None


def _non_empty(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(True for _ in entries)


def existing_parent(path: Path) -> Path:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def sibling_stem(out: Path) -> str:
    """Hidden sibling names: '.NAME-HASH.gpumerge' with NAME cut to 40 bytes, so a long OUT name still leaves room."""
    raw = os.fsencode(out.name)
    short = raw[:_STEM_NAME_BYTES].decode("utf-8", "ignore") or "out"
    return f".{short}-{hashlib.sha256(raw).hexdigest()[:8]}.gpumerge"


# ---- renameat2 ----------------------------------------------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> None:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE). OSError(ENOSYS/EINVAL) where the
    platform or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


# ---- the lock -----------------------------------------------------------------------------------------------------

_LOCK_MAX_BYTES = 32  # a lock file holds its holder's pid


def check_space(out: Path, nbytes: int, margin_bytes: int = 64 * 2**20, *, what: str = "the merge") -> None:
    """Room for the merge's ``nbytes`` (and a margin) on OUT's filesystem, before any work."""
    parent = existing_parent(out)
    free = shutil.disk_usage(parent).free
    if free < nbytes + margin_bytes:
        raise OutputError(f"not enough disk space for {what} at {parent}: it needs {size_text(nbytes)} plus a "
                          f"margin of {size_text(margin_bytes)}, and {size_text(free)} are free")


class OutputLock:
    """flock on '.NAME-HASH.gpumerge.lock' beside OUT: held while a run may write OUT; the kernel drops it when the
    process dies. The file is removed by its holder at the end; the inode is re-checked after locking, so a run that
    opened a file just removed by the previous holder does not believe it holds the lock."""

    def __init__(self, out: Path, *, flag: str = "--output_model_path") -> None:
        self.out = out
        self.flag = flag
        self.path = out.parent / (sibling_stem(out) + ".lock")
        self.fd = -1

    def acquire(self) -> None:
        import fcntl

        for _ in range(20):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise OutputError(f"{self.flag} {self.out} is being written by another gpumerge run"
                                  + (f" (pid {holder})" if holder.isdigit() else "")
                                  + "; wait for it to finish or choose another output directory") from None
            except BaseException:
                os.close(fd)
                raise
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1 or info.st_size > _LOCK_MAX_BYTES:
                os.close(fd)  # a hard link to someone's file (an input?) must never be truncated
                raise OutputError(f"{self.flag} {self.out}: {self.path} is not a gpumerge lock file (it has "
                                  f"{info.st_nlink} links and {info.st_size} bytes); remove it")
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == info.st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self.fd = fd
                return
            os.close(fd)  # the previous holder removed it meanwhile: lock the new one
        raise OutputError(f"{self.flag} {self.out}: could not take the lock {self.path}")

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self.fd)
            self.fd = -1


# ---- the output directory -----------------------------------------------------------------------------------------

class OutputDir:
    """A hidden sibling of OUT that becomes OUT only when complete; the lock on OUT held from entry to exit.

    On entry (under the lock) leftovers of earlier runs into the same OUT that were killed (SIGKILL, power loss) are
    removed: no live run holds the lock, so they are all stale. On any error or interrupt the sibling is removed,
    along with any parent directories this run created, and OUT is as it was."""

    def __init__(self, out: Path, *, overwrite: bool, inputs: Inputs | None = None,
                 notice: Callable[[str], None] = lambda line: None, flag: str = "--output_model_path") -> None:
        self.out = out
        self.flag = flag
        self.overwrite = overwrite
        self.inputs = inputs or Inputs((), (), {})
        self.notice = notice
        self.tmp: Path | None = None
        self.finalized = False
        self.companion_error: str | None = None  # the companion (the report) could not be put in place
        self._lock = OutputLock(out, flag=flag)
        self._created: list[Path] = []

    @property
    def stem(self) -> str:
        return sibling_stem(self.out)

    def __enter__(self) -> "OutputDir":
        try:
            make_parents(self.out, self._created)
            self._lock.acquire()
            if self._recover_stale() and not self.overwrite:
                raise OutputError(f"an earlier run was interrupted while replacing {self.out}; its previous contents "
                                  "were put back there: pass --overwrite to replace them")
            self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.stem}-{os.getpid()}-", suffix=".partial",
                                             dir=self.out.parent))
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._cleanup()


    def _recover_stale(self) -> bool:
        """Remove partial outputs; put back an OUT that the two-rename fallback had moved aside. True if it did.
        Nothing that is or holds an input is touched (check_output_path refused such names; this is the re-check
        under the lock)."""
        leftovers = _stale(self.out, ".partial") + _stale(self.out, ".old")
        for path in leftovers:
            held = self.inputs.held_by(path)
            if held:
                raise OutputError(f"{held[0]}'s {held[1]} is, or is inside, {path}, which is named like gpumerge's "
                                  "hidden working files; rename it or choose another output directory")
        for path in _stale(self.out, ".partial"):
            if not path.is_symlink():  # a link named like our working files is not ours: never followed or moved
                shutil.rmtree(path, ignore_errors=True)
        restored = False
        for path in _stale(self.out, ".old"):  # only the two-rename fallback leaves these: an earlier OUT, aside
            if path.is_symlink() or not path.is_dir():
                continue
            if self.out.exists() or self.out.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, self.out)
                restored = True
                self.notice(f"an earlier run was interrupted while replacing {self.out}; its previous contents "
                            "were put back")
        return restored

    def finalize(self, *, companion: "AtomicFile | None" = None) -> None:
        """Put the finished directory at OUT, replacing only what --overwrite allows as OUT is *now*, then the
        ``companion`` file (the report) at its path. Signals wait until both are done; a crash at any point leaves
        either the old OUT or the new one in place."""
        assert self.tmp is not None
        with GUARD.critical():
            test_pause("finalize")
            os.chmod(self.tmp, 0o755)
            for _ in range(5):
                if self._place():
                    break
            else:
                raise OutputError(f"{self.flag} {self.out} kept changing while the merge was put in place")
            self.finalized = True
            GUARD.completed_output = self.out
            if companion is not None:
                try:
                    companion.commit()
                except OSError as exc:  # the caller reports it: a file that was asked for and not written
                    companion.discard()
                    self.companion_error = (f"the merge is complete at {self.out}, but {companion.path} could not "
                                            f"be written ({exc.strerror})")

    def _place(self) -> bool:
        out, tmp = self.out, self.tmp
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise OutputError(f"{self.flag} {out} appeared during the merge and is not a directory; it was "
                              "left as it is and the merge was discarded")
        if not out.exists() or not _non_empty(out):
            try:
                os.rename(tmp, out)  # onto nothing or an empty directory: atomic; a non-empty one is refused
                return True
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    return False  # OUT changed under us: look again
                raise
        if not self.overwrite:
            raise OutputError(f"{self.flag} {out} appeared during the merge and is not empty; it was left as "
                              "it is and the merge was discarded (pass --overwrite to replace it)")
        held = self.inputs.held_by(out)
        if held:
            raise OutputError(f"{self.flag} {out} is or holds {held[0]}'s {held[1]} now (it changed during "
                              "the merge); it was left as it is and the merge was discarded")
        problem = replace_problem(out)
        if problem:
            raise OutputError(f"--overwrite would delete {out}, which {problem} (it changed during the merge); it "
                              "was left as it is and the merge was discarded")
        try:
            exchange(tmp, out)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._two_renames()
            return True
        shutil.rmtree(tmp, ignore_errors=True)  # the previous OUT, now at the hidden name
        self.tmp = None
        return True

    def _two_renames(self) -> None:
        """Where renameat2 cannot exchange: OUT aside to '.NAME-HASH.gpumerge-PID-X.old', the new one in. If we die
        between the two, the next run into OUT puts the old one back; the interrupt message says where it is."""
        aside = Path(tempfile.mkdtemp(prefix=f"{self.stem}-{os.getpid()}-", suffix=".old", dir=self.out.parent))
        os.rmdir(aside)
        os.rename(self.out, aside)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            os.rename(aside, self.out)
            raise
        shutil.rmtree(aside, ignore_errors=True)

    def _cleanup(self) -> None:
        with GUARD.critical():
            if not self.finalized and self.tmp is not None:
                test_pause("cleanup")
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._lock.release()
            if not self.finalized:
                remove_made(self._created)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def make_parents(path: Path, created: list[Path] | None = None) -> list[Path]:
    """Create the missing directories above ``path``, each added to ``created`` as it is made (so that a failure
    half-way still knows what to remove); returns ``created``, outermost first (for remove_made)."""
    missing = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = [] if created is None else created
    for directory in reversed(missing):
        directory.mkdir()
        created.append(directory)
    return created


def remove_made(created: list[Path]) -> None:
    """Remove the directories a run made (make_parents), innermost first, as long as they are empty again."""
    for directory in reversed(created):
        try:
            directory.rmdir()
        except OSError:
            break


def size_text(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


class AtomicFile:
    """A file (the report, the plot) that appears at its path only on commit(): a temporary in the same directory,
    renamed into place. Made when the path is checked, before any work: the directory is held open from then on (a
    directory renamed, or replaced by a link, meanwhile does not redirect the write), and the temporary is created at
    once (a directory where no file can be made fails before the merge, not after). The rename replaces a link at the
    path, never the file it points to. discard() removes the temporary; either closes the directory."""

    def __init__(self, path: Path, *, flag: str, inputs: Inputs) -> None:
        self.path = path
        self.name = path.name
        prefix = f".{os.fsencode(path.name)[:40].decode('utf-8', 'ignore')}.gpumerge-"
        self.tmp_name = f"{prefix}{os.getpid()}-{secrets.token_hex(4)}.tmp"
        self.fd = -1
        try:
            self.dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise SpecError(f"{flag} {path}: cannot open {path.parent} ({exc.strerror})") from None
        try:
            self._remove_stale(prefix, inputs)
            self.fd = os.open(self.tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644,
                              dir_fd=self.dir_fd)
        except OSError as exc:
            os.close(self.dir_fd)
            raise SpecError(f"{flag} {path}: cannot create a file in {path.parent} ({exc.strerror})") from None

    def _remove_stale(self, prefix: str, inputs: Inputs) -> None:
        """Temporaries of this path left by killed runs (SIGKILL: the pid in their name is not alive); never one
        that is an input, or a link, or has other names (hard links)."""
        shape = re.compile(re.escape(prefix) + r"([0-9]+)-[0-9a-f]{8}\.tmp")
        for name in os.listdir(self.dir_fd):
            found = shape.fullmatch(name)
            if not found or _alive(int(found.group(1))):
                continue
            try:
                info = os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and not inputs.owner(self.path.parent / name):
                try:
                    os.unlink(name, dir_fd=self.dir_fd)
                except OSError:
                    pass

    def write_bytes(self, data: bytes) -> None:
        view = memoryview(data)
        os.ftruncate(self.fd, 0)
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], done)

    def open(self):
        """A binary file object on the temporary (for writers that want one, e.g. matplotlib)."""
        return os.fdopen(os.dup(self.fd), "wb")

    def commit(self) -> None:
        os.fchmod(self.fd, 0o644)
        os.replace(self.tmp_name, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self._close()

    def discard(self) -> None:
        if self.fd < 0 and self.dir_fd < 0:
            return
        try:
            os.unlink(self.tmp_name, dir_fd=self.dir_fd)
        except OSError:
            pass
        self._close()

    def _close(self) -> None:
        for attr in ("fd", "dir_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)
