"""Scoring a model held in memory: perplexity, exactly as defined below, so anyone can reproduce a figure with
transformers. transformers is imported here only (an evaluated sweep), never on the merge path.

Perplexity over texts T1..Tk:
- each file is read as UTF-8 and tokenized on its own with model 1's tokenizer, ``add_special_tokens=False``;
  ``--eval-tokens N`` keeps a file's first N tokens;
- a file's tokens are cut into consecutive windows of ``--seq-len`` tokens (the last kept if it has >= 2 tokens);
  windows never cross files;
- in each window every token but the first is predicted from those before it in the window;
- perplexity = exp(sum of negative log-likelihoods / number of predicted tokens) over all files, log-softmax in fp32.
Batches hold windows of equal length (a file's short last window goes in a batch of its own), so the result does not
depend on ``--eval-batch`` beyond float noise.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

from gpumerge.errors import SpecError, brief

MAX_TEXT_BYTES = 256 * 2**20  # an evaluation text is a few MB; past this it is a mistake (or /dev/zero)


@dataclass(frozen=True, slots=True)
class EvalSettings:
    texts: tuple[Path, ...]
    eval_tokens: int | None = None  # per file
    seq_len: int = 512
    batch: int = 4
    dtype: str | None = None  # the forward pass's dtype; None: fp32 on a CPU, the output dtype on a GPU
    required: bool = True  # False: no texts (a search scored only by its own scorers), the other settings checked

    def __post_init__(self) -> None:
        if self.required and not self.texts:
            raise SpecError("--eval-text: give at least one text file")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or not 2 <= self.seq_len <= 2**20:
            raise SpecError(f"--seq-len must be a whole number from 2 to {2**20}, got {self.seq_len}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or not 1 <= self.batch <= 4096:
            raise SpecError(f"--eval-batch must be a whole number from 1 to 4096, got {self.batch}")
        if self.eval_tokens is not None and not 2 <= self.eval_tokens <= 2**40:
            raise SpecError(f"--eval-tokens must be a whole number from 2 to {2**40}, got {self.eval_tokens}")


@dataclass(frozen=True, slots=True)
class EvalText:
    name: str  # the file's name, for the per-file columns
    path: Path
    sha256: str
    windows: tuple[tuple[int, ...], ...]
    tokens_sha256: str = ""  # of the windows' token ids: another tokenizer, another evaluation

    @property
    def predicted(self) -> int:
        return sum(len(w) - 1 for w in self.windows)


def windows_of(ids: list[int], seq_len: int, eval_tokens: int | None) -> tuple[tuple[int, ...], ...]:
    ids = ids[:eval_tokens] if eval_tokens is not None else ids
    cut = [tuple(ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)]
    return tuple(w for w in cut if len(w) >= 2)


# Tokenizing a whole text at once takes ~150 bytes of memory per byte of text (measured with a fast tokenizer:
# 2 MB -> 630 MB, 16 MB -> 2.75 GB): a text is tokenized only as far as --eval-tokens needs, and a whole text that
# would not fit is refused before any work.
_TOKENIZE_BYTES_PER_BYTE = 160
_BYTES_PER_TOKEN = 8  # a first guess of the text a token takes (English and code: 3-5 bytes); grown as needed
_MARGIN_TOKENS = 64  # tokens beyond the ones kept, so that a cut in the text cannot change them


def load_texts(settings: EvalSettings, tokenizer_dir: Path, *, vocab_size: int | None = None,
               available_bytes: int | None = None) -> list[EvalText]:
    """Every text tokenized on its own with model 1's tokenizer (no special tokens), cut into windows. With
    --eval-tokens N only a prefix of the text is tokenized: growing prefixes cut at whitespace until two of them
    (one twice the other) agree on the first N tokens, then those (the whole text's first N tokens: tokens near a
    cut may differ, the first N do not). ``vocab_size``: model 1's; a token id at or past it is an error."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # one line per problem: transformers' own warnings would add more
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        raise SpecError(f"--eval-text needs model 1's tokenizer, and {tokenizer_dir} has none that transformers can "
                        f"load ({type(exc).__name__}: {brief(exc, limit=300)})") from None
    out, names = [], set()
    for path in settings.texts:
        what = f"--eval-text {path}"
        from gpumerge.spec import check_home

        check_home(path, what=what)
        digest, ids = _tokenized(tokenizer, Path(path).expanduser(), settings.eval_tokens, what=what,
                                 available_bytes=available_bytes)
        windows = windows_of(ids, settings.seq_len, settings.eval_tokens)
        if not windows:
            raise SpecError(f"{what} gives {len(ids)} token(s): at least 2 are needed to predict one")
        _check_ids(windows, vocab_size, tokenizer_dir, what=what)
        name = Path(path).name
        if name in names:
            raise SpecError(f"{what}: two texts are named {name}; their columns in the results would be one")
        names.add(name)
        out.append(EvalText(name, Path(path), digest, windows, hashlib.sha256(repr(windows).encode()).hexdigest()))
    return out


def _tokenized(tokenizer, path: Path, eval_tokens: int | None, *, what: str,
               available_bytes: int | None) -> tuple[str, list[int]]:
    """(the file's sha256, its first ``eval_tokens`` token ids, or all of them)."""
    import os

    from gpumerge import fsutil

    fd = fsutil.open_regular(path, what=what, error=SpecError)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_TEXT_BYTES:
            raise SpecError(f"{what}: is {size} bytes, more than the {MAX_TEXT_BYTES} bytes an evaluation text can "
                            "sensibly be; give a shorter text or --eval-tokens N")
        digest = hashlib.sha256()
        for start in range(0, size, 2**24):
            digest.update(os.pread(fd, min(2**24, size - start), start))

        def ids_of(nbytes: int) -> tuple[list[int], bool]:
            """Token ids of the first ``nbytes`` of the file cut back to whitespace; True when that is all of it."""
            raw = os.pread(fd, min(nbytes, size), 0)
            whole = len(raw) >= size
            if not whole:
                cut = max(raw.rfind(b"\n"), raw.rfind(b" "))  # never inside a UTF-8 sequence
                raw = raw[:cut + 1] if cut > 0 else raw
            _check_memory(len(raw), available_bytes, what=what, whole=whole and eval_tokens is None)
            text = fsutil.decode_text(raw, what=what, error=SpecError)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]), whole

        if eval_tokens is None:
            return digest.hexdigest(), ids_of(size)[0]
        nbytes = max(4096, (eval_tokens + _MARGIN_TOKENS) * _BYTES_PER_TOKEN)
        ids, whole = ids_of(nbytes)
        while not whole:  # the whole text's tokens, or a prefix whose first N a prefix twice as long agrees on
            longer, whole = ids_of(2 * nbytes)
            if len(ids) >= eval_tokens + _MARGIN_TOKENS and ids[:eval_tokens] == longer[:eval_tokens]:
                break
            ids, nbytes = longer, 2 * nbytes  # the longer prefix is the next one's shorter: tokenized once
        return digest.hexdigest(), ids[:eval_tokens]
    finally:
        os.close(fd)


def _check_memory(nbytes: int, available_bytes: int | None, *, what: str, whole: bool) -> None:
    if available_bytes is None:
        from gpumerge.devices import available_ram

        available_bytes = available_ram()
    need = nbytes * _TOKENIZE_BYTES_PER_BYTE
    if need > available_bytes // 2:
        more = " give --eval-tokens N (a prefix is tokenized, not the whole text), or" if whole else ""
        raise SpecError(f"{what}: tokenizing {nbytes / 2**20:.2f} MiB of text takes about {need / 2**20:.0f} MiB "
                        f"of memory, more than half of the {available_bytes / 2**20:.0f} MiB available;{more} "
                        "give a shorter text")


def _check_ids(windows, vocab_size: int | None, tokenizer_dir: Path, *, what: str) -> None:
    """Every token id must index model 1's embeddings: a tokenizer that is not the model's is named, not an
    IndexError in the middle of scoring."""
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        return
    beyond = sorted({t for window in windows for t in window if not 0 <= t < vocab_size})
    if beyond:
        raise SpecError(f"{what}: model 1's tokenizer ({tokenizer_dir}) gives token id(s) "
                        f"{', '.join(map(str, beyond[:5]))}{' ...' if len(beyond) > 5 else ''} ({len(beyond)} in "
                        f"all), beyond the vocab_size {vocab_size} of {tokenizer_dir / 'config.json'}: the "
                        "tokenizer is not this model's")


@dataclass(frozen=True, slots=True)
class Score:
    perplexity: float
    per_file: dict  # name -> perplexity
    tokens: int  # predicted tokens, all files


def perplexity(model, texts: list[EvalText], *, batch: int, device: str) -> Score:
    """The definition above, on ``model`` as it is (in eval mode, no gradients)."""
    import torch

    total_nll, total_count = 0.0, 0
    per_file = {}
    with torch.inference_mode():
        for text in texts:
            nll = 0.0
            by_length: dict[int, list[tuple[int, ...]]] = {}
            for window in text.windows:
                by_length.setdefault(len(window), []).append(window)
            for length in sorted(by_length, reverse=True):
                group = by_length[length]
                for first in range(0, len(group), batch):
                    ids = torch.tensor(group[first:first + batch], dtype=torch.long, device=device)
                    logits = model(input_ids=ids).logits[:, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    picked = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
                    nll -= float(picked.double().sum())
            per_file[text.name] = _exp(nll / text.predicted)
            total_nll += nll
            total_count += text.predicted
    return Score(_exp(total_nll / total_count), per_file, total_count)


def _exp(mean_nll: float) -> float:
    """exp, inf past float64's range (a model that puts ~0 probability on the text), NaN stays NaN."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf
