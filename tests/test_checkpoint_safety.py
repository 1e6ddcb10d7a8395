"""Hostile checkpoints: every bad input is one CheckpointError naming the file and the rule, never a hang, a traceback
or unbounded memory; the safetensors rules agree with the safetensors library's own reader (the reference)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from test_cli_errors import assert_one_line_error, leftovers, merge_args

from gpumerge.checkpoint import Checkpoint
from gpumerge.errors import CheckpointError

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}


# ---- helpers ------------------------------------------------------------------------------------------------------

def safetensors_bytes(header: str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length (``length`` overrides it), header, data."""
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def model_dir(directory: Path, weights: bytes | None = None, *, config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    if weights is not None:
        (directory / "model.safetensors").write_bytes(weights)
    return directory.resolve()


def open_error(directory: Path) -> str:
    """The one-line CheckpointError that opening ``directory`` raises."""
    with pytest.raises(CheckpointError) as caught:
        Checkpoint(str(directory), label="model 1").close()
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def library_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
        return True
    except Exception:  # SafetensorError, or whatever else the library raises for a file it refuses
        return False


def library_view(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    with safe_open(str(path), framework="pt") as f:
        return {name: (f.get_slice(name).get_dtype(), tuple(f.get_slice(name).get_shape()),
                       f.get_tensor(name).reshape(-1).view(torch.uint8).numpy().tobytes()) for name in f.keys()}


def assert_agrees_with_library(directory: Path) -> None:
    """gpumerge opens it, and its names, dtypes, shapes and bytes are the safetensors library's."""
    path = directory / "model.safetensors"
    reference = library_view(path)
    with Checkpoint(str(directory), label="model 1") as ckpt:
        ours = {name: (info.dtype, info.shape, ckpt.read_bytes(name, 0, info.nbytes))
                for name, info in ckpt.tensors.items()}
    assert ours == reference


def entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def j(value) -> str:
    return json.dumps(value)


A = entry("F32", [2], 0, 8)
B = entry("F16", [3], 8, 14)
VALID = {"__metadata__": {"format": "pt"}, "model.embed_tokens.weight": A, "model.norm.weight": B}
DATA = bytes(range(14))


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


# ---- 2. safetensors headers: crafted files, checked against the library -------------------------------------------

# id -> (file bytes, words the message must contain). The library refuses each of these files too.
REFUSED = {
    "overlapping_offsets": (safetensors_bytes(j({"a": A, "b": entry("F16", [3], 6, 12)}), DATA[:12]),
                            ("overlapping data_offsets", "b begins at byte 6, inside a, which ends at byte 8")),
    "gap_between_tensors": (safetensors_bytes(j({"a": A, "b": entry("F16", [3], 10, 16)}), DATA + b"\0\0"),
                            ("gap", "b begins at byte 10", "a ends at byte 8")),
    "first_tensor_not_at_zero": (safetensors_bytes(j({"a": entry("F32", [2], 2, 10)}), DATA[:10]),
                                 ("gap", "a begins at byte 2", "data begins at byte 0")),
    "bytes_after_the_data": (safetensors_bytes(j(VALID), DATA + b"xyz"), ("3 bytes after the last tensor's data",)),
    "truncated_data": (safetensors_bytes(j(VALID), DATA[:12]), ("truncated", "14 bytes", "12")),
    "end_before_begin": (safetensors_bytes(j({"a": entry("F32", [0], 4, 0)}), b""), ("ends before it begins",)),
    "size_mismatch": (safetensors_bytes(j({"a": entry("F32", [2], 0, 6)}), DATA[:6]), ("needs 8 bytes", "span 6")),
    "shape_product_overflows": (safetensors_bytes(j({"a": entry("F32", [2**40, 2**40, 0], 0, 0)})),
                                ("overflows", "64 bits")),
    "shape_beyond_64_bits": (safetensors_bytes(j({"a": entry("F32", [10**30, 0], 0, 0)})), ("shape", "64-bit")),
    "negative_shape": (safetensors_bytes(j({"a": entry("F32", [-2], 0, 8)}), DATA[:8]), ("non-negative",)),
    "bool_in_shape": (safetensors_bytes(j({"a": entry("F32", [True, 2], 0, 8)}), DATA[:8]), ("shape",)),
    "negative_zero_in_shape": (safetensors_bytes('{"a": {"dtype": "F32", "shape": [2, -0], "data_offsets": [0, 0]}}'),
                               ("-0",)),
    "float_offsets": (safetensors_bytes(j({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.0]}}),
                                        DATA[:8]), ("data_offsets",)),
    "three_offsets": (safetensors_bytes(j({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}),
                                        DATA[:8]), ("data_offsets",)),
    "unknown_dtype_code": (safetensors_bytes(j({"a": entry("X9", [2], 0, 8)}), DATA[:8]), ("dtype", "X9")),
    "entry_not_object": (safetensors_bytes(j({"a": 5})), ("corrupt header entry for a",)),
    "missing_shape": (safetensors_bytes(j({"a": {"dtype": "F32", "data_offsets": [0, 8]}}), DATA[:8]),
                      ("corrupt header entry for a", "shape")),
    "metadata_is_a_list": (safetensors_bytes(j({"__metadata__": ["pt"], "a": A}), DATA[:8]),
                           ("__metadata__ must map strings to strings", "list")),
    "metadata_value_not_a_string": (safetensors_bytes(j({"__metadata__": {"format": 1}, "a": A}), DATA[:8]),
                                    ("__metadata__ must map strings to strings", "format")),
    "header_not_an_object": (safetensors_bytes("[]"), ("header", "not a JSON object")),
    "header_nested_too_deeply": (safetensors_bytes('{"a": ' + deep(100_000) + "}"), ("nested too deeply",)),
    "header_in_utf16": (safetensors_bytes(j({"a": A}).encode("utf-16"), DATA[:8]), ("UTF-8",)),
    "header_with_bom": (safetensors_bytes(b"\xef\xbb\xbf" + j({"a": A}).encode(), DATA[:8]), ("BOM",)),
    "lone_surrogate_name": (safetensors_bytes('{"\\ud800": ' + j(A) + "}", DATA[:8]), ("surrogate",)),
    "header_length_past_the_end": (safetensors_bytes(j({"a": A}), DATA[:8], length=1000),
                                   ("header of 1000 bytes", "file of")),
    "header_length_field_huge": (safetensors_bytes(b"{}", length=2**63), ("100000000",)),
    "shorter_than_the_length_field": (b"\x05\0\0", ("truncated", "3 bytes")),
}

# Files the library accepts that gpumerge refuses on purpose (stricter, never looser).
STRICTER = {
    "duplicate_tensor_name": (safetensors_bytes('{"a": ' + j(A) + ', "a": ' + j(A) + "}", DATA[:8]),
                              ("'a' appears twice",)),
    "unknown_key_in_entry": (safetensors_bytes(j({"a": {**A, "note": 1}}), DATA[:8]), ("unexpected key 'note'",)),
    "entry_as_an_array": (safetensors_bytes(j({"a": ["F32", [2], [0, 8]]}), DATA[:8]),
                          ("corrupt header entry for a",)),
    "dtype_gpumerge_cannot_read": (safetensors_bytes(j({"a": entry("C64", [1], 0, 8)}), DATA[:8]), ("C64",)),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_safetensors_file_is_refused_like_the_library_does(case, tmp_path):
    weights, needles = REFUSED[case]
    directory = model_dir(tmp_path / case, weights)
    message = open_error(directory)
    assert str(directory / "model.safetensors") in message
    for needle in needles:
        assert needle in message, (needle, message)
    assert not library_accepts(directory / "model.safetensors")


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_stricter_than_the_library_on_purpose(case, tmp_path):
    weights, needles = STRICTER[case]
    directory = model_dir(tmp_path / case, weights)
    message = open_error(directory)
    for needle in needles:
        assert needle in message, (needle, message)
    assert library_accepts(directory / "model.safetensors")


def test_header_length_between_the_library_limit_and_100_mib(tmp_path):
    """The library refuses headers over 100,000,000 bytes (not 100 MiB); refused before anything is read."""
    directory = model_dir(tmp_path / "m")
    path = directory / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001))
    os.truncate(path, 8 + 100_000_001)  # sparse: no disk, no time
    message = open_error(directory)
    assert "100000001" in message and "100000000" in message
    assert not library_accepts(path)


VALID_FILES = {
    "unsorted_entries_and_empty_tensors": (
        j({"z": entry("F32", [0], 14, 14), "model.norm.weight": B, "y": entry("U8", [0, 5], 0, 0),
           "model.embed_tokens.weight": A}), DATA),
    "metadata_null": (j({"__metadata__": None, "a": A}), DATA[:8]),
    "metadata_empty": (j({"__metadata__": {}, "a": A}), DATA[:8]),
    "whitespace_around_the_header": ("\n  " + j(VALID) + "    \t", DATA),
    "unicode_and_escaped_names": (j({"ünï.wéight": A, "tab\there": B}), DATA),
    "every_dtype": (j({"bool": entry("BOOL", [2], 0, 2), "u8": entry("U8", [2], 2, 4), "i8": entry("I8", [2], 4, 6),
                       "i16": entry("I16", [1], 6, 8), "u16": entry("U16", [1], 8, 10),
                       "f16": entry("F16", [1], 10, 12), "bf16": entry("BF16", [1], 12, 14),
                       "i32": entry("I32", [1], 14, 18), "u32": entry("U32", [1], 18, 22),
                       "f32": entry("F32", [1], 22, 26), "i64": entry("I64", [1], 26, 34),
                       "u64": entry("U64", [1], 34, 42), "f64": entry("F64", [1], 42, 50),
                       "scalar": entry("F32", [], 50, 54)}), bytes(54)),
}


@pytest.mark.parametrize("case", sorted(VALID_FILES))
def test_valid_files_agree_with_the_library(case, tmp_path):
    header, data = VALID_FILES[case]
    directory = model_dir(tmp_path / case, safetensors_bytes(header, data))
    assert_agrees_with_library(directory)


def test_real_checkpoints_agree_with_the_library(models):
    for key in ("fp16_a", "bf16_b", "tied_a"):
        for shard in sorted(models[key].glob("*.safetensors")):
            reference = library_view(shard)
            with Checkpoint(str(models[key]), label="model 1") as ckpt:
                ours = {n: (i.dtype, i.shape, ckpt.read_bytes(n, 0, i.nbytes))
                        for n, i in ckpt.tensors.items() if i.path.name == shard.name}
            assert ours == reference


# ---- 1. config.json and index files: bounded reads of regular files, strict JSON ----------------------------------

def _open_in_thread(directory: Path, unblock: Path, timeout_s: float = 30) -> BaseException | None:
    """Open the checkpoint in a thread; if it blocks on the FIFO ``unblock``, feed it EOF and fail."""
    result: list[BaseException | None] = []

    def target():
        try:
            Checkpoint(str(directory), label="model 1").close()
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader gets EOF
        worker.join(timeout_s)
        pytest.fail(f"opening the checkpoint blocked on the FIFO {unblock}")
    return result[0]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_fifo_is_refused_without_blocking(name, tmp_path):
    directory = model_dir(tmp_path / "m", safetensors_bytes(j(VALID), DATA))
    fifo = directory / name
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    exc = _open_in_thread(directory, fifo)
    assert isinstance(exc, CheckpointError), exc
    assert str(fifo) in str(exc) and "FIFO" in str(exc), str(exc)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "model.safetensors"])
def test_device_file_is_refused(name, tmp_path):
    directory = model_dir(tmp_path / "m", safetensors_bytes(j(VALID), DATA))
    (directory / name).unlink(missing_ok=True)
    (directory / name).symlink_to("/dev/zero")
    message = open_error(directory)
    assert str(directory / name) in message and "device" in message


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_huge_json_file_is_refused_before_reading(name, tmp_path):
    directory = model_dir(tmp_path / "m", safetensors_bytes(j(VALID), DATA))
    path = directory / name
    path.write_bytes(b"{")
    os.truncate(path, 2**40)  # sparse 1 TiB
    message = open_error(directory)
    assert str(path) in message and "more than" in message


def _sharded(directory: Path) -> Path:
    """Two shards and an index, written by hand."""
    directory = model_dir(directory)
    (directory / "s1.safetensors").write_bytes(safetensors_bytes(j({"a": A}), DATA[:8]))
    (directory / "s2.safetensors").write_bytes(safetensors_bytes(j({"b": entry("F16", [3], 0, 6)}), DATA[:6]))
    (directory / "model.safetensors.index.json").write_text(
        j({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
    return directory


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_json_is_a_clean_error(name, tmp_path):
    directory = _sharded(tmp_path / "m")
    (directory / name).write_text(deep(100_000))
    message = open_error(directory)
    assert str(directory / name) in message and "nested too deeply" in message


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_duplicate_keys_in_json_are_refused(name, tmp_path):
    directory = _sharded(tmp_path / "m")
    text = ('{"model_type": "llama", "model_type": "gpt2"}' if name == "config.json" else
            '{"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}}')
    (directory / name).write_text(text)
    message = open_error(directory)
    assert str(directory / name) in message and "appears twice" in message


# ---- 5. index files: shard names are plain names inside the model directory ---------------------------------------

@pytest.mark.parametrize("shard", ["../outside.safetensors", "/abs/s1.safetensors", "sub/s1.safetensors", "..", ".",
                                   "", "s1.safetensors\0x"])
def test_index_names_only_plain_files_inside_the_directory(shard, tmp_path):
    directory = _sharded(tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes((directory / "s1.safetensors").read_bytes())
    (directory / "sub").mkdir()
    (directory / "sub" / "s1.safetensors").write_bytes((directory / "s1.safetensors").read_bytes())
    (directory / "model.safetensors.index.json").write_text(
        j({"weight_map": {"a": shard, "b": "s2.safetensors"}}))
    message = open_error(directory)
    assert "weight_map" in message and "'a'" in message and repr(shard) in message, message
    assert "plain file name" in message


@pytest.mark.parametrize("index", [[], {"weight_map": []}, {"weight_map": {"a": 5}}, {"weight_map": {"a": None}}])
def test_index_of_the_wrong_shape(index, tmp_path):
    directory = _sharded(tmp_path / "m")
    (directory / "model.safetensors.index.json").write_text(j(index))
    message = open_error(directory)
    assert "not a valid index" in message and str(directory / "model.safetensors.index.json") in message


def test_sharded_checkpoint_still_opens(tmp_path):
    directory = _sharded(tmp_path / "m")
    with Checkpoint(str(directory), label="model 1") as ckpt:
        assert list(ckpt.tensors) == ["a", "b"]
        assert ckpt.read_bytes("b", 0, 6) == DATA[:6]


# ---- 3. and 4. layer counts -----------------------------------------------------------------------------------------

def _blocks_dir(directory: Path, blocks: list[int], config: dict) -> Path:
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": entry("F32", [1], 4 * k, 4 * k + 4)
               for k, i in enumerate(blocks)}
    tensors["model.norm.weight"] = entry("F32", [1], 4 * len(blocks), 4 * len(blocks) + 4)
    return model_dir(directory, safetensors_bytes(j(tensors), bytes(4 * len(tensors))), config={**CONFIG, **config})


def test_declared_layers_more_than_the_stored_blocks(tmp_path):
    directory = _blocks_dir(tmp_path / "m", list(range(6)), {"num_hidden_layers": 100000})
    message = open_error(directory)
    assert "config.json says num_hidden_layers = 100000, the weights store decoder blocks 0..5 (6 blocks)" in message


@pytest.mark.parametrize("blocks, declared, stored", [
    ([0, 1, 2, 3], 3, "0..3 (4 blocks)"),
    ([0, 1, 3], 3, "0, 1, 3 (3 blocks)"),
    ([1, 2, 3], 3, "1..3 (3 blocks)"),
])
def test_stored_blocks_must_be_exactly_those_declared(blocks, declared, stored, tmp_path):
    directory = _blocks_dir(tmp_path / "m", blocks, {"num_hidden_layers": declared})
    message = open_error(directory)
    assert f"num_hidden_layers = {declared}, the weights store decoder blocks {stored}" in message


def test_text_config_layer_count_is_checked_against_the_blocks(tmp_path):
    directory = _blocks_dir(tmp_path / "m", [0, 1], {"text_config": {"num_hidden_layers": 7}})
    message = open_error(directory)
    assert "text_config.num_hidden_layers = 7, the weights store decoder blocks 0..1 (2 blocks)" in message


@pytest.mark.parametrize("config, expected", [
    ({"num_hidden_layers": 3}, 3),
    ({"n_layer": 3}, 3),
    ({"text_config": {"num_hidden_layers": 3}}, 3),
    ({}, None),
    ({"num_hidden_layers": None}, None),
    ({"num_hidden_layers": 3, "num_nextn_predict_layers": 1}, 3),  # a stored multi-token-prediction block 3
])
def test_layer_counts_that_match(config, expected, tmp_path):
    blocks = [0, 1, 2, 3] if config.get("num_nextn_predict_layers") else [0, 1, 2]
    with Checkpoint(str(_blocks_dir(tmp_path / "m", blocks, config)), label="model 1") as ckpt:
        assert ckpt.num_layers() == expected


def test_declared_layers_without_recognised_blocks_are_kept(tmp_path):
    directory = model_dir(tmp_path / "m", safetensors_bytes(j({"encoder.block.0.w": A}), DATA[:8]),
                          config={**CONFIG, "num_hidden_layers": 12})
    with Checkpoint(str(directory), label="model 1") as ckpt:
        assert ckpt.num_layers() == 12


@pytest.mark.parametrize("config, shown", [
    ({"num_hidden_layers": True}, "num_hidden_layers = true"),
    ({"num_hidden_layers": False}, "num_hidden_layers = false"),
    ({"num_hidden_layers": 0}, "num_hidden_layers = 0"),
    ({"num_hidden_layers": -5}, "num_hidden_layers = -5"),
    ({"num_hidden_layers": 3.0}, "num_hidden_layers = 3.0"),
    ({"num_hidden_layers": "3"}, 'num_hidden_layers = "3"'),
    ({"n_layer": [3]}, "n_layer = [3]"),
    ({"text_config": {"num_hidden_layers": -5}}, "text_config.num_hidden_layers = -5"),
    ({"text_config": {"num_hidden_layers": False}}, "text_config.num_hidden_layers = false"),
])
def test_declared_layer_count_must_be_a_positive_integer(config, shown, tmp_path):
    directory = _blocks_dir(tmp_path / "m", [0, 1, 2], config)
    message = open_error(directory)
    assert shown in message and "positive integer" in message and str(directory / "config.json") in message


def test_huge_layer_count_fails_fast_through_the_cli(models, tmp_path, capsys):
    a = _blocks_dir(tmp_path / "a", list(range(6)), {"num_hidden_layers": 100000})
    out = tmp_path / "out"
    code, _, err = run_cli(*merge_args(a, models["fp16_b"], out), capsys=capsys)
    assert_one_line_error(code, err, "num_hidden_layers = 100000", "0..5 (6 blocks)")
    assert not out.exists() and leftovers(out) == []


# ---- 6. .bin files with tensors that are not plain dense CPU tensors -----------------------------------------------

def _bin_dir(directory: Path, state: dict) -> Path:
    directory = model_dir(directory)
    torch.save(state, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("kind, needle", [
    ("sparse_coo", "sparse_coo"),
    ("sparse_csr", "sparse_csr"),
    ("meta", "meta"),
    ("quantized", "quantized"),
    ("nested", "nested"),
    ("expanded", "overlap"),
])
def test_bin_tensors_that_are_not_dense_cpu_tensors(kind, needle, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR and nested tensors are "beta"
        tensor = {
            "sparse_coo": lambda: torch.eye(3).to_sparse(),
            "sparse_csr": lambda: torch.eye(3).to_sparse_csr(),
            "meta": lambda: torch.empty(3, 3, device="meta"),
            "quantized": lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
            "nested": lambda: torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
            # 2**45 float32 elements from one stored element: .contiguous() would need 128 TiB
            "expanded": lambda: torch.ones(1).expand(2**45),
        }[kind]()
        directory = _bin_dir(tmp_path / "m", {"model.norm.weight": torch.ones(2), "model.layers.0.w": tensor})
    message = open_error(directory)
    assert "model.layers.0.w" in message and needle in message and "pytorch_model.bin" in message, message


def test_bin_transposed_tensor_is_made_contiguous(tmp_path):
    weight = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    directory = _bin_dir(tmp_path / "m", {"model.norm.weight": weight.t()})
    with Checkpoint(str(directory), label="model 1") as ckpt:
        assert ckpt.tensors["model.norm.weight"].shape == (4, 3)
        assert ckpt.read_bytes("model.norm.weight", 0, 48) == weight.t().contiguous().numpy().tobytes()


def test_bin_entry_names_must_be_strings(tmp_path):
    directory = _bin_dir(tmp_path / "m", {"model.norm.weight": torch.ones(2), 5: torch.ones(2)})
    assert "name" in open_error(directory)


# ---- 7. input_files -----------------------------------------------------------------------------------------------

def test_input_files_single_and_sharded(models, tmp_path):
    with Checkpoint(str(models["bf16_b"]), label="model 1") as ckpt:
        assert ckpt.input_files() == [ckpt.root / "config.json", ckpt.root / "model.safetensors"]
    with Checkpoint(str(models["fp16_a"]), label="model 1") as ckpt:
        shards = sorted(ckpt.root.glob("model-*.safetensors"))
        assert len(shards) > 1
        assert ckpt.input_files() == [ckpt.root / "config.json", ckpt.root / "model.safetensors.index.json", *shards]
    with Checkpoint(str(models["bin_b"]), label="model 1") as ckpt:
        shards = sorted(ckpt.root.glob("pytorch_model-*.bin"))
        assert ckpt.input_files() == [ckpt.root / "config.json", ckpt.root / "pytorch_model.bin.index.json", *shards]


def test_input_files_are_not_resolved(tmp_path):
    """A hub-cache snapshot is symlinks to blobs: the inputs are the names in the snapshot, not the blobs."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "weights").write_bytes(safetensors_bytes(j(VALID), DATA))
    (blobs / "config").write_text(j(CONFIG))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "model.safetensors").symlink_to(blobs / "weights")
    (snapshot / "config.json").symlink_to(blobs / "config")
    with Checkpoint(str(snapshot), label="model 1") as ckpt:
        assert ckpt.input_files() == [snapshot.resolve() / "config.json", snapshot.resolve() / "model.safetensors"]


# ---- the CLI: crafted files are one line, exit 2, nothing at OUT ---------------------------------------------------

@pytest.mark.parametrize("case", ["overlapping_offsets", "bytes_after_the_data", "metadata_is_a_list",
                                  "header_nested_too_deeply", "shape_product_overflows"])
def test_crafted_files_through_the_cli(case, models, tmp_path, capsys):
    weights, needles = REFUSED[case]
    a = model_dir(tmp_path / "a", weights)
    out = tmp_path / "out"
    code, _, err = run_cli(*merge_args(a, models["fp16_b"], out), capsys=capsys)
    assert_one_line_error(code, err, "model 1", str(a / "model.safetensors"), *needles)
    assert not out.exists() and leftovers(out) == []
