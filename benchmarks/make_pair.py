"""Generate a benchmark pair: two Llama-shaped fp16 checkpoints, written with safetensors directly.

Default shape is a ~1B Llama (hidden 2048, intermediate 5632, 16 layers, 16 heads, vocab 32000, untied):
about 1.9 GB per model, in 4 shards of ~480 MB. Tensors are generated one at a time (in fp32 chunks, cast to
fp16) and only one shard's tensors are held in memory at once. Nothing is downloaded; transformers is not needed.

    python benchmarks/make_pair.py                                   # -> benchmarks/data/model{1,2}
    python benchmarks/make_pair.py --out /tmp/tinypair --layers 2 --hidden 256 --intermediate 512 --vocab 1000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

DEFAULT_DATA = Path(__file__).resolve().parent / "data"
MODEL_DIRS = ("model1", "model2")
SEEDS = (1, 2)
NUM_SHARDS = 4
NUM_HEADS = 16
STD = 0.02
INDEX = "model.safetensors.index.json"
CONFIG = "config.json"
RANDN_CHUNK = 2**24  # fp32 elements generated per randn call (64 MiB)


@dataclass(frozen=True)
class PairShape:
    layers: int = 16
    hidden: int = 2048
    intermediate: int = 5632
    vocab: int = 32000
    heads: int = NUM_HEADS

    def config(self) -> dict:
        """A LlamaForCausalLM config.json (MHA: as many key/value heads as heads)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "initializer_range": STD,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "bos_token_id": 1,
            "eos_token_id": 2,
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) in file order: embeddings, blocks 0..n-1, final norm, lm_head."""
        h, i = self.hidden, self.intermediate
        names = [("model.embed_tokens.weight", (self.vocab, h))]
        for layer in range(self.layers):
            p = f"model.layers.{layer}."
            names += [(p + f"self_attn.{proj}_proj.weight", (h, h)) for proj in "qkvo"]
            names += [(p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                      (p + "mlp.down_proj.weight", (h, i))]
            names += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        names += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return names

    def total_bytes(self) -> int:
        return sum(2 * math.prod(shape) for _, shape in self.tensors())


def shard_plan(shape: PairShape, num_shards: int = NUM_SHARDS) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the tensors, in order, into up to `num_shards` contiguous groups of about equal bytes."""
    total = shape.total_bytes()
    groups: list[list] = [[] for _ in range(num_shards)]
    position = 0
    for name, dims in shape.tensors():
        size = 2 * math.prod(dims)
        groups[min(num_shards - 1, int((position + size / 2) * num_shards / total))].append((name, dims))
        position += size
    return [group for group in groups if group]


def shard_name(k: int, count: int) -> str:
    return f"model-{k:05d}-of-{count:05d}.safetensors"


def random_fp16(dims: tuple[int, ...], generator: torch.Generator, *, mean: float = 0.0) -> torch.Tensor:
    """N(mean, STD) in fp16, generated in fp32 chunks so the fp32 scratch stays small; on a GPU when the generator
    is a GPU's (the tensor comes back to host memory)."""
    if generator.device.type == "cuda":
        values = torch.randn(dims, generator=generator, device=generator.device, dtype=torch.float32)
        return values.mul_(STD).add_(mean).to(torch.float16).cpu()
    out = torch.empty(dims, dtype=torch.float16)
    flat = out.view(-1)
    scratch = torch.empty(min(RANDN_CHUNK, flat.numel()), dtype=torch.float32)
    for first in range(0, flat.numel(), RANDN_CHUNK):
        chunk = scratch[:min(RANDN_CHUNK, flat.numel() - first)]
        torch.randn(chunk.shape, generator=generator, out=chunk)
        chunk.mul_(STD).add_(mean)
        flat[first:first + chunk.numel()].copy_(chunk)
    return out


def is_complete(model_dir: Path, shape: PairShape) -> bool:
    """config.json (written last) matches `shape`, and every shard the index names is there."""
    try:
        config = json.loads((model_dir / CONFIG).read_text())
        index = json.loads((model_dir / INDEX).read_text())
    except (OSError, ValueError):
        return False
    shards = set(index.get("weight_map", {}).values())
    return config == shape.config() and bool(shards) and all((model_dir / s).is_file() for s in shards)


def write_model(model_dir: Path, shape: PairShape, seed: int, *, device: str = "cpu") -> None:
    model_dir.mkdir(parents=True, exist_ok=True)
    for stale in [model_dir / CONFIG, model_dir / INDEX, *model_dir.glob("model-*.safetensors")]:
        stale.unlink(missing_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    groups = shard_plan(shape)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        filename = shard_name(k, len(groups))
        # RMSNorm weights are ~1 in real checkpoints; everything else is N(0, 0.02).
        shard = {name: random_fp16(dims, generator, mean=1.0 if len(dims) == 1 else 0.0) for name, dims in group}
        save_file(shard, str(model_dir / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
        del shard
    index = {"metadata": {"total_size": shape.total_bytes()}, "weight_map": weight_map}
    (model_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (model_dir / CONFIG).write_text(json.dumps(shape.config(), indent=2) + "\n")


def ensure_pair(out: Path = DEFAULT_DATA, shape: PairShape = PairShape(), *,
                device: str = "cpu") -> tuple[Path, Path]:
    """The two model directories under `out`, generated (on ``device``) unless already there with a matching
    config."""
    dirs = tuple(out / name for name in MODEL_DIRS)
    if all(is_complete(d, shape) for d in dirs):
        print(f"pair already exists in {out} with a matching config; skipping generation")
        return dirs
    for model_dir, seed in zip(dirs, SEEDS):
        began = time.perf_counter()
        write_model(model_dir, shape, seed, device=device)
        print(f"wrote {model_dir} ({shape.total_bytes() / 1e9:.2f} GB, seed {seed}) "
              f"in {time.perf_counter() - began:.1f} s")
    return dirs


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    default = PairShape()
    parser.add_argument("--layers", type=int, default=default.layers)
    parser.add_argument("--hidden", type=int, default=default.hidden)
    parser.add_argument("--intermediate", type=int, default=default.intermediate)
    parser.add_argument("--vocab", type=int, default=default.vocab)


def shape_from_args(args: argparse.Namespace) -> PairShape:
    if args.hidden % NUM_HEADS:
        raise SystemExit(f"--hidden must be a multiple of {NUM_HEADS} (the number of heads)")
    return PairShape(layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DATA, help="where model1/ and model2/ go")
    add_shape_args(parser)
    args = parser.parse_args()
    ensure_pair(args.out, shape_from_args(args))


if __name__ == "__main__":
    main()
