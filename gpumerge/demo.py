"""`gpumerge demo`: two small Llama checkpoints built here (no network), merged with the original README's example
settings, loaded back with transformers and checked value by value against a float64 reference."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from gpumerge.errors import GpumergeError
from gpumerge.signals import GUARD

DEMO_WORDS = ("the a merge of two models blends their blocks along a gradient from one to the other and keeps "
              "everything else of model one so tokenizer embeddings norm and head stay the same").split()


def build_tokenizer(directory: Path):
    """A tiny word-level fast tokenizer (tokenizer.json + tokenizer_config.json), made without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate(specials + sorted(set(DEMO_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_llama(directory: Path, *, seed: int, vocab_size: int, dtype=None, tie: bool = False,
                hidden_size: int = 64, intermediate_size: int = 176, num_layers: int = 6,
                max_shard_size: str | None = "200KB") -> Path:
    """A small random Llama checkpoint saved with save_pretrained (sharded when max_shard_size is given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                         max_position_embeddings=128, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype or torch.float16)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory


def verify_merge(model1: Path, model2: Path, merged: Path, layer_t: dict[int, float]) -> tuple[int, int]:
    """Load all three with transformers; blended tensors within the float64 bound, the rest bit-identical."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from gpumerge.kernels.lerp import max_excess
    from gpumerge.schedule import tensor_weight

    hf_logging.disable_progress_bar()
    out, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    problems = [f"{k}: {v}" for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")]
    if problems:
        raise GpumergeError("transformers loaded the merge with problems: " + "; ".join(problems))
    a = AutoModelForCausalLM.from_pretrained(model1).state_dict()
    b = AutoModelForCausalLM.from_pretrained(model2).state_dict()
    blended = exact = 0
    for name, value in out.state_dict().items():
        t = tensor_weight(name, layer_t)
        if t is None:
            if not torch.equal(value, a[name].to(value.dtype)):
                raise GpumergeError(f"demo check failed: {name} is not model 1's")
            exact += 1
            continue
        if max_excess(value, a[name], b[name], t) > 1.0:
            raise GpumergeError(f"demo check failed: {name} is off the float64 reference")
        blended += 1
    return blended, exact


_DEMO_MARKER = ".gpumerge-demo"


def _demo_root(workdir: Path | None) -> Path:
    """A new temporary directory, or --workdir when it is new, empty, or an earlier demo's (it holds our marker):
    the demo writes model1/, model2/ and merged/ there and must never overwrite a user's files."""
    if workdir is None:
        root = Path(tempfile.mkdtemp(prefix="gpumerge-demo-"))
    else:
        from gpumerge.outdir import canonical

        root = canonical(workdir, flag="--workdir")
        if root.is_symlink() or (root.exists() and not root.is_dir()):
            raise GpumergeError(f"--workdir {root} exists and is not a directory")
        if root.exists() and any(root.iterdir()) and not (root / _DEMO_MARKER).is_file():
            raise GpumergeError(f"--workdir {root} is not empty and is not an earlier demo's directory; give a new "
                                "or empty directory (the demo writes model1/, model2/ and merged/ there)")
        root.mkdir(parents=True, exist_ok=True)
        for name in ("model1", "model2"):  # an earlier demo's models: rebuilt from scratch, never written through
            _remove_demo_model(root / name)
    (root / _DEMO_MARKER).write_text("gpumerge demo\n")
    return root


def _remove_demo_model(path: Path) -> None:
    """Remove a model an earlier demo built (it carries the demo's marker); anything else there is refused."""
    import shutil

    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir() or not (path / _DEMO_MARKER).is_file():
        raise GpumergeError(f"--workdir {path.parent}: {path.name} is not a model an earlier demo built (it is a "
                            "link, a file, or has no demo marker); remove it yourself or give a new directory")
    shutil.rmtree(path)


def run_demo(*, workdir: Path | None, quiet: bool) -> int:
    def say(line: str) -> None:
        if not quiet:
            print(f"gpumerge demo: {line}", file=sys.stderr)

    root = _demo_root(workdir)
    try:
        return _demo(root, say=say, kept=workdir is not None)
    finally:
        if workdir is None:  # our own temporary directory: nothing is left behind (--workdir keeps the models)
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def _demo(root: Path, *, say, kept: bool) -> int:
    from gpumerge.merge import run_merge
    from gpumerge.spec import MergeSpec

    say(f"building two small Llama checkpoints in {root} (no network)")
    tokenizer = None
    for name, seed in (("model1", 1), ("model2", 2)):
        (root / name).mkdir()
        (root / name / _DEMO_MARKER).write_text("gpumerge demo\n")  # first: a run killed mid-build is still ours
        tokenizer = build_tokenizer(root / name)
        build_llama(root / name, seed=seed, vocab_size=len(tokenizer))
        GUARD.poll()
    spec = MergeSpec(model_path1=str(root / "model1"), model_path2=str(root / "model2"),
                     output_model_path=root / "merged", gradient_start=0.9, gradient_end=0.0,
                     layer_start=0, layer_end=12, max_shard_size="300KB", max_shard_bytes=300_000,
                     device="cpu", overwrite=True, quiet=True)
    say("merging with the original's example settings: --gradient_start 0.9 --gradient_end 0.0 "
        "--layer_start 0 --layer_end 12 --max_shard_size 300KB")
    began = time.perf_counter()
    result = run_merge(spec, notice=say)
    elapsed = time.perf_counter() - began
    GUARD.poll()
    blended, exact = verify_merge(root / "model1", root / "model2", result.output, result.plan.layer_t)
    GUARD.poll()
    say(f"transformers loads the merge: {blended} blended tensors match the float64 reference, "
        f"{exact} others are model 1's exactly")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(result.output)
    tok = AutoTokenizer.from_pretrained(result.output)
    ids = tok("the merge of two models", return_tensors="pt").input_ids
    GUARD.poll()
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    GUARD.poll()
    say(f"it generates (random weights, so words at random): {tok.decode(generated[0])!r}")
    t_list = ", ".join(f"{layer}:{t:.3g}" for layer, t in result.plan.layer_t.items())
    where = (f"merged model: {result.output}" if kept else
             "merged model checked and removed with its temporary directory (--workdir DIR keeps it)")
    print(f"{where}  ({len(result.plan.shards)} shards, t per layer {t_list}; merge took {elapsed:.2f} s)")
    return 0
