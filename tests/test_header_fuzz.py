"""Fuzzing the readers of safetensors headers, index files and config.json.

Property: opening the checkpoint either succeeds, and then the safetensors library accepts every weight file too and
agrees on every name, dtype, shape and byte; or it raises CheckpointError / IncompatibleCheckpointsError with a
one-line message, never another exception, within the deadline. Where the library accepts a file gpumerge refuses,
the message must be one of the rules where gpumerge is deliberately stricter.

GPUMERGE_FUZZ_EXAMPLES=5000 runs a longer search than the default.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_checkpoint_safety import library_accepts, library_view

from gpumerge.checkpoint import _QUANT_SUFFIXES, FP8_CODES, ITEMSIZE, Checkpoint
from gpumerge.errors import CheckpointError, IncompatibleCheckpointsError

FUZZ = settings(max_examples=int(os.environ.get("GPUMERGE_FUZZ_EXAMPLES", "200")), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIG = {"model_type": "llama"}
READABLE = sorted(code for code in ITEMSIZE if code not in FP8_CODES)
# The library's dtype codes (safetensors 0.8) and a few that are no dtype at all.
DTYPES = sorted(ITEMSIZE) + ["F4", "F6_E2M3", "F6_E3M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", "f32", "", "F 32"]
# What gpumerge refuses although the library accepts it (each rule on purpose; see test_checkpoint_safety.STRICTER).
STRICTER_REASONS = ("appears twice", "unexpected key", "unsupported dtype", "hold no tensors", "found a list",
                    "is a quantized checkpoint")
HUGE = st.sampled_from([10**30, 2**64, 2**64 - 1, 2**63, 2**40, 2**32, 100_000_000, 100_000_001, -1, -(2**63)])


# ---- building files ----------------------------------------------------------------------------------------------

@dataclass
class Crafted:
    """A safetensors file being mutated: header pairs (duplicates allowed), data, and damage to the framing."""
    pairs: list[list]
    data: bytes
    length: int | None = None  # the 8-byte length field, when it lies
    length_delta: int = 0
    before: str = ""  # text before and after the JSON header
    after: str = ""
    suffix: bytes = b""  # bytes after the data
    cut: int = 0  # bytes cut off the end of the file
    flips: list[tuple[int, int]] = field(default_factory=list)  # (position, byte) written into the header

    def header_bytes(self) -> bytes:
        body = ", ".join(f"{json.dumps(key)}: {_dump(value)}" for key, value in self.pairs)
        raw = bytearray((self.before + "{" + body + "}" + self.after).encode("utf-8", "surrogatepass"))
        for position, byte in self.flips:
            if raw:
                raw[position % len(raw)] = byte
        return bytes(raw)

    def file_bytes(self) -> bytes:
        header = self.header_bytes()
        length = self.length if self.length is not None else max(0, len(header) + self.length_delta)
        whole = struct.pack("<Q", length % 2**64) + header + self.data + self.suffix
        return whole[:max(0, len(whole) - self.cut)]

    def tensors(self) -> list[dict]:
        return [value for key, value in self.pairs if key != "__metadata__" and isinstance(value, dict)]


@dataclass(frozen=True)
class Deep:
    """A list nested ``depth`` levels deep, written as text (json.dumps itself would recurse too deeply)."""
    depth: int


def _dump(value) -> str:
    if isinstance(value, Deep):
        return "[" * value.depth + "]" * value.depth
    if isinstance(value, list):
        return "[" + ", ".join(map(_dump, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_dump(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


NAMES = st.text(max_size=12).filter(lambda name: name != "__metadata__" and not name.endswith(_QUANT_SUFFIXES))


@st.composite
def valid_files(draw) -> Crafted:
    specs = draw(st.lists(st.tuples(NAMES, st.sampled_from(READABLE), st.lists(st.integers(0, 3), max_size=3)),
                          min_size=1, max_size=4, unique_by=lambda spec: spec[0]))
    order = draw(st.permutations(range(len(specs))))
    entries: dict[int, dict] = {}
    position = 0
    for i in order:  # data in one order, header entries in another: offsets tile the buffer either way
        name, dtype, shape = specs[i]
        nbytes = ITEMSIZE[dtype]
        for dim in shape:
            nbytes *= dim
        entries[i] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    pairs = [[specs[i][0], entries[i]] for i in range(len(specs))]
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))
    if metadata is not None:
        pairs.insert(draw(st.integers(0, len(pairs))), ["__metadata__", metadata])
    return Crafted(pairs, draw(st.binary(min_size=position, max_size=position)))


# ---- mutations: each a function Crafted -> None --------------------------------------------------------------------

def _tensor(crafted: Crafted, index: int) -> dict | None:
    tensors = crafted.tensors()
    return tensors[index % len(tensors)] if tensors else None


def set_length(crafted: Crafted, length: int) -> None:
    crafted.length = length


def shift_length(crafted: Crafted, delta: int) -> None:
    crafted.length_delta = delta


def set_offset(crafted: Crafted, index: int, which: int, value) -> None:
    entry = _tensor(crafted, index)
    if entry is not None and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
        entry["data_offsets"][which] = value


def set_field(crafted: Crafted, index: int, key: str, value) -> None:
    entry = _tensor(crafted, index)
    if entry is not None:
        entry[key] = value


def drop_field(crafted: Crafted, index: int, key: str) -> None:
    entry = _tensor(crafted, index)
    if entry is not None:
        entry.pop(key, None)


def replace_entry(crafted: Crafted, index: int, value) -> None:
    if crafted.pairs:
        crafted.pairs[index % len(crafted.pairs)][1] = value


def duplicate_pair(crafted: Crafted, index: int) -> None:
    if crafted.pairs:
        key, value = crafted.pairs[index % len(crafted.pairs)]
        crafted.pairs.append([key, copy.deepcopy(value)])


def nest(crafted: Crafted, index: int, depth: int, where: str) -> None:
    if where == "metadata":
        crafted.pairs.append(["__metadata__", {"k": Deep(depth)}])
    else:
        set_field(crafted, index, where, Deep(depth))


def rename(crafted: Crafted, index: int, name: str) -> None:
    if crafted.pairs:
        crafted.pairs[index % len(crafted.pairs)][0] = name


def set_metadata(crafted: Crafted, value) -> None:
    crafted.pairs = [pair for pair in crafted.pairs if pair[0] != "__metadata__"] + [["__metadata__", value]]


def frame(crafted: Crafted, before: str, after: str) -> None:
    crafted.before, crafted.after = before, after


def damage_end(crafted: Crafted, suffix: bytes, cut: int) -> None:
    crafted.suffix, crafted.cut = suffix, cut


def flip(crafted: Crafted, position: int, byte: int) -> None:
    crafted.flips.append((position, byte))


@dataclass(frozen=True)
class Mutation:
    function: object
    args: tuple

    def __call__(self, crafted: Crafted) -> None:
        self.function(crafted, *self.args)

    def __repr__(self) -> str:
        return f"{self.function.__name__}{self.args!r}"


def _mutation(function, *strategies):
    return st.tuples(*strategies).map(partial(Mutation, function))


JSON_SCALARS = st.none() | st.booleans() | st.integers() | HUGE | st.floats(allow_nan=False) | st.text(max_size=4)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
DIMS = st.lists(st.integers(-3, 8) | HUGE | st.booleans() | st.just(1.0), max_size=4)
INDEX = st.integers(0, 7)
MUTATIONS = st.one_of(
    _mutation(set_length, st.integers(0, 2**64 - 1) | HUGE.filter(lambda n: n >= 0)),
    _mutation(shift_length, st.integers(-16, 16)),
    _mutation(set_offset, INDEX, st.integers(0, 1), st.integers(-4, 64) | HUGE | st.just(1.5)),
    _mutation(set_field, INDEX, st.just("shape"), DIMS | JSON_VALUES),
    _mutation(set_field, INDEX, st.just("dtype"), st.sampled_from(DTYPES) | JSON_VALUES),
    _mutation(set_field, INDEX, st.just("data_offsets"), st.lists(st.integers(-2, 64) | HUGE, max_size=3)),
    _mutation(set_field, INDEX, st.text(max_size=6), JSON_VALUES),
    _mutation(drop_field, INDEX, st.sampled_from(["dtype", "shape", "data_offsets"])),
    _mutation(replace_entry, INDEX, JSON_VALUES),
    _mutation(duplicate_pair, INDEX),
    _mutation(rename, INDEX, NAMES | st.sampled_from(["\ud800", "a\udfff", "__metadata__", "x.qweight"])),
    _mutation(nest, INDEX, st.integers(1, 200) | st.sampled_from([1000, 5000, 100_000]),
              st.sampled_from(["shape", "extra", "metadata"])),
    _mutation(set_metadata, JSON_VALUES | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3)),
    _mutation(frame, st.sampled_from(["", " ", "\n\t", "\ufeff", "x"]), st.sampled_from(["", "  ", "\0", "}", "x"])),
    _mutation(damage_end, st.binary(max_size=8), st.integers(0, 8)),
    _mutation(flip, st.integers(0, 10**6), st.integers(0, 255)),
)


# ---- the property --------------------------------------------------------------------------------------------------

def check_open(directory: Path) -> CheckpointError | IncompatibleCheckpointsError | None:
    """Open ``directory``; on success the library must agree on every weight file it read, on refusal the message
    must be one line naming the model. Returns the refusal, or None."""
    try:
        with Checkpoint(str(directory), label="model 1") as ckpt:
            ours = {name: (info.dtype, info.shape, ckpt.read_bytes(name, 0, info.nbytes))
                    for name, info in ckpt.tensors.items()}
            paths = {name: info.path.name for name, info in ckpt.tensors.items()}
            weight_files = list(ckpt.files)
    except (CheckpointError, IncompatibleCheckpointsError) as exc:
        message = str(exc)
        assert message and "\n" not in message and "\r" not in message, message
        assert message.startswith("model 1"), message
        return exc
    reference: dict = {}
    for path in weight_files:
        view = library_view(path)  # raises when the library refuses a file gpumerge accepted
        assert all(paths[name] == path.name for name in view if name in paths)
        reference.update(view)
    assert ours == reference
    return None


def write_model(directory: Path, weights: bytes, *, config: dict | None = None) -> Path:
    (directory / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    (directory / "model.safetensors").write_bytes(weights)
    return directory / "model.safetensors"


def check_safetensors_file(weights: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        path = write_model(directory, weights)
        refusal = check_open(directory)
        if refusal is None:
            event("accepted by both")
        elif library_accepts(path):
            reason = next((reason for reason in STRICTER_REASONS if reason in str(refusal)), None)
            assert reason is not None, str(refusal)
            event(f"gpumerge stricter: {reason}")
        else:
            event("refused by both")


@FUZZ
@given(st.binary(max_size=400))
def test_arbitrary_bytes(weights):
    check_safetensors_file(weights)


@FUZZ
@given(st.binary(max_size=400), st.integers(-4, 4))
def test_arbitrary_header_with_a_plausible_length(body, delta):
    check_safetensors_file(struct.pack("<Q", max(0, len(body) + delta)) + body)


@FUZZ
@given(valid_files())
def test_valid_files_open_and_agree(crafted):
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), crafted.file_bytes())
        assert check_open(Path(tmp)) is None


@FUZZ
@given(valid_files(), st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutated_headers(crafted, mutations):
    for mutate in mutations:
        mutate(crafted)
    check_safetensors_file(crafted.file_bytes())


# ---- index files ---------------------------------------------------------------------------------------------------

SHARDS = {"s1.safetensors": ("a", "F32", [2]), "s2.safetensors": ("b", "F16", [3])}
SHARD_NAMES = st.sampled_from(["s1.safetensors", "s2.safetensors", "missing.safetensors", "../s1.safetensors",
                               "/tmp/s1.safetensors", "sub/s1.safetensors", "", ".", "..", "s1.safetensors\0"])


def _shard_bytes(name: str, dtype: str, shape: list[int]) -> bytes:
    nbytes = ITEMSIZE[dtype] * shape[0]
    header = json.dumps({name: {"dtype": dtype, "shape": shape, "data_offsets": [0, nbytes]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(range(nbytes))


def index_texts() -> st.SearchStrategy[str]:
    weight_maps = st.dictionaries(st.sampled_from(["a", "b", "c"]) | st.text(max_size=4),
                                  SHARD_NAMES | st.text(max_size=6) | JSON_SCALARS, max_size=4)
    valid = {"a": "s1.safetensors", "b": "s2.safetensors"}
    as_json = st.one_of(
        st.builds(lambda wm: {"metadata": {}, "weight_map": wm}, weight_maps),
        st.builds(lambda wm: {"weight_map": {**valid, **wm}}, weight_maps),
        st.builds(lambda value: {"weight_map": value}, JSON_VALUES),
        JSON_VALUES,
    ).map(json.dumps)
    nested = st.integers(1, 3000).map(lambda depth: '{"weight_map": ' + "[" * depth + "]" * depth + "}")
    duplicated = st.just('{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}}')
    garbage = st.binary(max_size=64).map(lambda raw: raw.decode("latin-1"))
    return st.one_of(as_json, nested, duplicated, garbage)


@FUZZ
@given(index_texts())
def test_index_files(text):
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "config.json").write_text(json.dumps(CONFIG))
        (directory / "sub").mkdir()
        for shard, spec in SHARDS.items():
            (directory / shard).write_bytes(_shard_bytes(*spec))
            (directory / "sub" / shard).write_bytes(_shard_bytes(*spec))
        (directory / "model.safetensors.index.json").write_bytes(text.encode("utf-8", "surrogatepass"))
        if check_open(directory) is None:
            index = json.loads(text)
            assert all("/" not in shard and shard not in ("", ".", "..") for shard in index["weight_map"].values())


# ---- config.json layer counts ----------------------------------------------------------------------------------------

@FUZZ
@given(st.dictionaries(st.sampled_from(["num_hidden_layers", "n_layer", "num_layers", "text_config"]),
                       JSON_VALUES | st.builds(lambda v: {"num_hidden_layers": v}, JSON_SCALARS), max_size=3),
       st.integers(0, 4))
def test_config_layer_counts(config, stored_blocks):
    names = [f"model.layers.{i}.w" for i in range(stored_blocks)] + ["model.norm.weight"]
    header = {name: {"dtype": "U8", "shape": [1], "data_offsets": [i, i + 1]} for i, name in enumerate(names)}
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), struct.pack("<Q", len(raw)) + raw + bytes(len(names)), config=config)
        try:
            with Checkpoint(tmp, label="model 1") as ckpt:
                count = ckpt.num_layers()
        except CheckpointError as exc:
            assert "\n" not in str(exc) and "config.json" in str(exc)
            return
    assert count is None or (type(count) is int and count > 0)
    assert count is None or stored_blocks in (0, count)
