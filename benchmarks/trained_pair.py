"""A small real pair worth sweeping, built here without network: a tiny Llama base trained briefly on local text,
then two fine-tunes of it on two different local texts, so that blends land between (or below) their parents on a
third text. Random weights would make every perplexity the vocabulary size: rankings, baselines and plots would mean
nothing.

    python benchmarks/trained_pair.py [--out DIR]      # ~60-85 s on 2 cores; skipped when DIR already holds it

Texts, all from this machine's Python standard library (the same pair wherever the same Python is installed):
  model 1's fine-tune  code: the source of TRAIN_MODULES with docstrings and comments taken out (ast.unparse)
  model 2's fine-tune  prose: the docstrings of the same modules
  the base             both, interleaved, for a shorter while
  eval texts           EVAL_MODULES (never trained on): eval_code.txt (code), eval_prose.txt (docstrings)
The tokenizer is a byte-level BPE trained on the base text (gpumerge.demo.build_tokenizer's way: made locally,
saved with save_pretrained), the same for all three models. Layout of DIR: base/, model_1/, model_2/, texts/.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import time
from pathlib import Path

TRAIN_MODULES = ("json", "csv", "argparse", "textwrap", "string", "shlex", "pathlib", "fractions", "statistics",
                 "heapq", "bisect", "calendar", "difflib", "configparser", "dataclasses", "enum", "functools",
                 "gettext", "glob", "fnmatch", "ipaddress", "locale", "logging", "netrc", "numbers", "pprint",
                 "queue", "random", "sched", "secrets", "shutil", "tempfile", "timeit", "tokenize", "typing",
                 "uuid", "zipfile", "email", "http", "urllib")
EVAL_MODULES = ("decimal", "inspect", "collections", "datetime", "subprocess", "threading")
SHAPE = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
VOCAB = 768
SEQ = 96
BATCH = 16
STEPS = {"base": 260, "model_1": 160, "model_2": 160}
LR = {"base": 3e-3, "model_1": 1.5e-3, "model_2": 1.5e-3}
VERSION = 1  # bump when anything above changes: the cache key
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "trained_pair"


def _sources(names) -> list[tuple[str, str]]:
    """(module, source) of each stdlib module (packages: every .py file in them), in a fixed order."""
    import importlib.util

    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        origin = Path(spec.origin)
        files = sorted(origin.parent.glob("*.py")) if origin.name == "__init__.py" else [origin]
        out += [(f"{name}:{path.name}", path.read_text(encoding="utf-8")) for path in files]
    return out


def split_code_and_prose(source: str) -> tuple[str, str]:
    """(the code without docstrings or comments, the docstrings joined as paragraphs)."""
    tree = ast.parse(source)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                docs.append(ast.get_docstring(node, clean=True) or "")
                node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree), "\n\n".join(d for d in docs if d)


def texts(names) -> tuple[str, str]:
    code, prose = [], []
    for _, source in _sources(names):
        try:
            c, p = split_code_and_prose(source)
        except SyntaxError:
            continue
        code.append(c)
        prose.append(p)
    return "\n\n".join(code), "\n\n".join(prose)


def cache_key() -> str:
    return hashlib.sha256(json.dumps([VERSION, TRAIN_MODULES, EVAL_MODULES, SHAPE, VOCAB, SEQ, BATCH, STEPS, LR,
                                      sys.version_info[:2]]).encode()).hexdigest()[:16]


def build_tokenizer(directory: Path, corpus: str):
    """A byte-level BPE trained on ``corpus`` (deterministic), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([corpus[i:i + 4096] for i in range(0, len(corpus), 4096)], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    return tokenizer


def _train(model, ids, steps: int, lr: float, seed: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = None
    for step in range(steps):
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=generator)
        batch = torch.stack([ids[s:s + SEQ] for s in starts])
        for group in optimizer.param_groups:  # linear decay: a smoother end point
            group["lr"] = lr * (1 - step / steps)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss.detach())


def build(out: Path = DEFAULT_OUT, *, quiet: bool = False) -> Path:
    """The pair in ``out`` (built unless already there for this cache key); returns ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    marker = out / "pair.json"
    key = cache_key()
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        return out
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    began = time.perf_counter()
    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    code, prose = texts(TRAIN_MODULES)
    eval_code, eval_prose = texts(EVAL_MODULES)
    (out / "texts").mkdir(parents=True, exist_ok=True)
    for name, text in (("train_code.txt", code), ("train_prose.txt", prose), ("eval_code.txt", eval_code),
                       ("eval_prose.txt", eval_prose)):
        (out / "texts" / name).write_text(text, encoding="utf-8")
    mixed = "\n\n".join(x for pair in zip(code.split("\n\n"), prose.split("\n\n")) for x in pair)
    tokenizer = build_tokenizer(out / "base", mixed)
    ids = {name: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
           for name, text in (("base", mixed), ("model_1", code), ("model_2", prose))}
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                         **SHAPE)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    base = LlamaForCausalLM(config)
    loss = _train(base, ids["base"], STEPS["base"], LR["base"], seed=1)
    say(f"base: loss {loss:.3f} after {STEPS['base']} steps ({time.perf_counter() - began:.0f} s)")
    state = {k: v.clone() for k, v in base.state_dict().items()}
    base.to(torch.float16).save_pretrained(out / "base")
    for seed, name in ((2, "model_1"), (3, "model_2")):
        model = LlamaForCausalLM(config)
        model.load_state_dict(state)
        loss = _train(model, ids[name], STEPS[name], LR[name], seed=seed)
        say(f"{name}: loss {loss:.3f} after {STEPS[name]} steps ({time.perf_counter() - began:.0f} s)")
        model.to(torch.float16).save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
    marker.write_text(json.dumps({"key": key, "seconds": round(time.perf_counter() - began, 1)}) + "\n")
    say(f"trained pair in {out} ({time.perf_counter() - began:.0f} s)")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
