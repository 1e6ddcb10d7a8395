"""Tiny checkpoints built locally (transformers' LlamaConfig + save_pretrained, or safetensors directly)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gpumerge.cli import main

# Odd sizes on purpose: head_dim 12, intermediate 100, vocab 97, 5 blocks.
SMALL = dict(hidden_size=48, intermediate_size=100, num_layers=5, vocab_size=97)


def build(directory: Path, *, seed: int, dtype=torch.float16, tie: bool = False, shard: str | None = "60KB",
          **overrides) -> Path:
    from gpumerge.demo import build_llama

    sizes = {**SMALL, **overrides}
    return build_llama(directory, seed=seed, dtype=dtype, tie=tie, max_shard_size=shard, **sizes)


def to_bin(src: Path, dst: Path, *, shards: int = 1) -> Path:
    """Re-save a safetensors checkpoint as pickled pytorch_model.bin (optionally sharded with an index)."""
    dst.mkdir(parents=True, exist_ok=True)
    state = load_state(src)
    (dst / "config.json").write_text((src / "config.json").read_text())
    names = list(state)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state[n] for n in names[k * per:(k + 1) * per]}
        torch.save(part, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], *, num_layers: int,
                     config: dict | None = None) -> Path:
    """A checkpoint written with safetensors directly (for shapes transformers would not build)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    cfg = {"model_type": "llama", "num_hidden_layers": num_layers, "architectures": ["LlamaForCausalLM"]}
    cfg.update(config or {})
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with the libraries (independently of gpumerge's reader)."""
    directory = Path(directory)
    state: dict[str, torch.Tensor] = {}
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    for path in files:
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        else:
            state.update(torch.load(path, weights_only=True))
    return state


REPO = Path(__file__).resolve().parents[1]


def source_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m gpumerge` subprocess: the source tree first on the path, so the tests run
    the same from an install and from a plain checkout (and from any current directory)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


_INPUT_FLAGS = ("--model_path1", "--model-path1", "--model_path2", "--model-path2", "--config")


def input_paths(argv) -> list[Path]:
    """The inputs a command line names (model directories, the recipe file)."""
    argv = [str(a) for a in argv]
    return [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in _INPUT_FLAGS and Path(argv[i + 1]).exists()]


def snapshot(paths) -> dict[str, tuple[str, int, int]]:
    """Every file under the given inputs (links followed), with its sha256, size and mtime."""
    state = {}
    for root in paths:
        root = Path(root)
        files = [root] if not root.is_dir() else sorted(p for p in root.rglob("*"))
        for path in files:
            if path.is_file():
                info = path.stat()
                state[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns)
            else:
                state[str(path)] = ("dir" if path.is_dir() else "other", 0, 0)
    return state


def run_cli(*argv, capsys=None) -> tuple[int, str, str]:
    """main() in this process; every run, failed and interrupted ones included, must leave the inputs' bytes and
    mtimes as they were."""
    inputs = input_paths(argv)
    before = snapshot(inputs)
    code = main([str(a) for a in argv])
    assert snapshot(inputs) == before, "an input changed"
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """All fixture checkpoints, built once per test session."""
    root = tmp_path_factory.mktemp("models")
    m = {
        "fp16_a": build(root / "fp16_a", seed=1),
        "fp16_b": build(root / "fp16_b", seed=2),
        "bf16_a": build(root / "bf16_a", seed=3, dtype=torch.bfloat16),
        "bf16_b": build(root / "bf16_b", seed=4, dtype=torch.bfloat16, shard=None),
        "tied_a": build(root / "tied_a", seed=5, tie=True, shard=None),
        "tied_b": build(root / "tied_b", seed=6, tie=True),
        "wide": build(root / "wide", seed=7, hidden_size=64, intermediate_size=128),
        "fp32_a": build(root / "fp32_a", seed=8, dtype=torch.float32, shard=None),
    }
    m["bin_a"] = to_bin(m["fp16_a"], root / "bin_a")
    m["bin_b"] = to_bin(m["fp16_b"], root / "bin_b", shards=3)
    # aux files a user's model carries
    from gpumerge.demo import build_tokenizer

    build_tokenizer(m["fp16_a"])
    (m["fp16_a"] / "chat_template.jinja").write_text("{{ messages }}")
    (m["fp16_a"] / "README.md").write_text("model 1's own card")
    return m


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A small real pair (benchmarks/trained_pair.py: a base trained on local text, two fine-tunes), built once."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from trained_pair import build

    return build(tmp_path_factory.mktemp("trained"), quiet=True)
