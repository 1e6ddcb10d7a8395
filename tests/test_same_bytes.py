"""Refactors change no output byte: a few merges and a write-mode sweep of a pair built by integer arithmetic (no
random generator, no transcendental function, so the inputs are the same bytes on any machine) give shards whose
sha256 were recorded with the code as it stood before the layers refactor (commit 1e38d69, run through the same
command lines). A change that moves one output byte fails here, naming the case and the file.

Only the tensor shards are compared: the records beside them (merge record, digests, index) gained fields on
purpose since, and their contents are checked by test_verify and test_sweep_records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, source_env
from safetensors.torch import save_file

LAYERS = 4
HIDDEN, INTERMEDIATE, VOCAB = 16, 40, 61


def _values(shape: tuple[int, ...], salt: int) -> torch.Tensor:
    """Numbers in [-1, 1) with 10 fractional bits from a multiplicative hash: exact in float32 and float16."""
    count = 1
    for size in shape:
        count *= size
    index = torch.arange(count, dtype=torch.int64)
    codes = (index * 2654435761 + salt * 40503) % 2048 - 1024
    return (codes.to(torch.float32) / 1024).reshape(shape)


def _llama_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (HIDDEN, HIDDEN),
                       p + "self_attn.v_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), p + "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE)})
    return shapes


def _build(directory: Path, *, model: int, dtype) -> Path:
    directory.mkdir(parents=True)
    tensors = {name: _values(shape, salt=model * 1000 + k).to(dtype)
               for k, (name, shape) in enumerate(sorted(_llama_shapes().items()))}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": LAYERS,
              "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
              "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch.")}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# case -> the argv after the model paths, and {shard, relative to the run's output: its tensors' sha256 at 1e38d69}.
# At 1e38d69 a position-based recipe silently fell back to the names' natural order whenever transformers failed to
# import, and from the source tree it always did (the `kernels` name clash of issue #15): the recorded bytes are that
# order's, so those cases now ask for it by name ("now_add": --tensor_order names). The architecture's order is
# checked against a float64 reference in test_tensor_order.
CASES = json.loads((Path(__file__).parent / "same_bytes.json").read_text())


def _tensor_digest(path: Path) -> str:
    """sha256 of a shard's tensors: its header without ``__metadata__`` (which holds the merge record, with the
    inputs' temporary paths) and every byte after the header."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(raw[8 + size:])
    return digest.hexdigest()


def _shards(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _tensor_digest(p) for p in sorted(root.rglob("*.safetensors"))}


def run_case(name: str, argv: list[str], pair: tuple[Path, Path], out: Path, *, repo: Path = REPO) -> dict[str, str]:
    a, b = pair
    sub = argv[:1] if argv[:1] == ["sweep"] else []
    target = ["--output_dir", str(out)] if sub else ["--output_model_path", str(out)]
    cmd = [sys.executable, "-m", "gpumerge", *sub, "--model_path1", str(a), "--model_path2", str(b), *target,
           *argv[len(sub):], "--device", "cpu", "--quiet"]
    env = source_env()
    env["PYTHONPATH"] = str(repo)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=repo, timeout=300)
    assert done.returncode == 0, f"{name}: {done.stderr[-2000:]}"
    return _shards(out)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("same_bytes")
    return {dtype: (_build(root / f"a_{dtype}", model=1, dtype=getattr(torch, dtype)),
                    _build(root / f"b_{dtype}", model=2, dtype=getattr(torch, dtype)))
            for dtype in ("float32", "float16")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_outputs_are_the_bytes_recorded_before_the_refactor(name, pairs, tmp_path):
    case = CASES[name]
    got = run_case(name, case["argv"] + case.get("now_add", []), pairs[case["inputs"]], tmp_path / "out")
    assert got == case["sha256"], f"{name}: shards differ from the bytes recorded at {case['recorded_at']}"


def test_the_inputs_are_exact_in_half_precision():
    values = _values((5, 7), salt=3)
    assert torch.equal(values.to(torch.float16).to(torch.float32), values)
    assert values.min() >= -1 and values.max() < 1 and len(values.unique()) > 20


if __name__ == "__main__":  # records the table: python tests/test_same_bytes.py REPO_AT_REVISION REVISION
    import tempfile

    repo, revision = Path(sys.argv[1]), sys.argv[2]
    wanted = {
        "seed_flags_sharded": ("float32", ["--gradient_start", "0.2", "--gradient_end", "0.9", "--layer_start", "1",
                                           "--layer_end", "3", "--max_shard_size", "6KB"]),
        "seed_flags_fp16_default_dtype": ("float16", ["--gradient_start", "0.7", "--gradient_end", "0.1"]),
        "gradient_values_bf16": ("float32", ["--gradient_values", "[1.0, 0.3, 0.0]", "--dtype", "bfloat16"]),
        "gradient_values_no_layers": ("float16", ["--gradient_values", "[0.25, 0.75]", "--no_layers",
                                                  "--dtype", "float32"]),
        "slerp": ("float32", ["--method", "slerp", "--gradient_start", "0.1", "--gradient_end", "0.8"]),
        "sweep_grid": ("float16", ["sweep", "--grid", "gradient_end=0:1:3", "--grid", "layer_start=0,2",
                                   "--max_shard_size", "8KB"]),
    }
    with tempfile.TemporaryDirectory() as tmp:
        built = {dtype: (_build(Path(tmp) / f"a_{dtype}", model=1, dtype=getattr(torch, dtype)),
                         _build(Path(tmp) / f"b_{dtype}", model=2, dtype=getattr(torch, dtype)))
                 for dtype in ("float32", "float16")}
        table = {name: {"inputs": inputs, "argv": argv, "recorded_at": revision,
                        "sha256": run_case(name, argv, built[inputs], Path(tmp) / name, repo=repo)}
                 for name, (inputs, argv) in wanted.items()}
    for case in table.values():
        if "--gradient_values" in case["argv"]:
            case["now_add"] = ["--tensor_order", "names"]
    print(json.dumps(table, indent=1, sort_keys=True))
