"""Evaluated-sweep benchmark (CPU): a 9-variant `gpumerge sweep --eval-text` against its own floor and against the
loop users run today, side by side in one run.

  sweep      `gpumerge sweep --grid gradient_end=0:1:9 --eval-text ... --keep 1` (CLI wall: 9 variants + the 2
             parents = 11 scored rows, the best written)
  floor      one evaluation script, timed whole (python start, imports, tokenizer and texts, one from_pretrained
             of model 1 in fp32, one gpumerge.evaluate.perplexity on the same texts), plus one more evaluation
             for each other scored row: imports + one model load + one evaluation per scored row
  today      9 x (`gpumerge` merge to disk + a fresh python process that loads that merge with transformers and
             evaluates the same perplexity)
Goals (issue 10): sweep <= 1.2x floor; the speed-up over today's loop is reported.

Pairs: the trained pair (benchmarks/trained_pair.py, ~0.5M parameters) and a ~100M-parameter Llama pair (random
weights, make_pair.py's layout: hidden 768, 12 layers, vocab 32000; the trained pair's tokenizer: speed only).

    python benchmarks/bench_eval.py [--pairs trained,100m] [--eval-tokens 2048]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))

from bench_cpu import gpumerge_exe, remove  # noqa: E402
from make_pair import PairShape, ensure_pair  # noqa: E402

DATA = HERE / "data"
OUT = HERE / "out" / "eval"
M100 = PairShape(layers=12, hidden=768, intermediate=2048, vocab=32000, heads=12)
SEQ = 256
COUNT = 9

EVAL_SNIPPET = """
import sys, time
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM
from gpumerge.evaluate import EvalSettings, load_texts, perplexity
model_dir, tokenizer_dir, tokens, *texts = sys.argv[1:]
settings = EvalSettings(tuple(Path(t) for t in texts), eval_tokens=int(tokens), seq_len=%d, batch=4)
loaded = load_texts(settings, Path(tokenizer_dir))
began = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
load_s = time.perf_counter() - began
began = time.perf_counter()
score = perplexity(model, loaded, batch=4, device="cpu")
print(load_s, time.perf_counter() - began, score.perplexity)
""" % SEQ


def pairs(names: list[str]) -> dict[str, tuple[Path, Path, list[Path]]]:
    from trained_pair import build

    trained = build(DATA / "trained_pair")
    texts = [trained / "texts" / "eval_code.txt", trained / "texts" / "eval_prose.txt"]
    out = {}
    if "trained" in names:
        out["trained pair (0.5M parameters)"] = (trained / "model_1", trained / "model_2", texts)
    if "100m" in names:
        a, b = ensure_pair(DATA / "pair_100m", M100)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(trained / "model_1" / name, a / name)
        out["~100M-parameter pair (random weights)"] = (a, b, texts)
    return out


def timed(argv: list[str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(argv, check=True, capture_output=True, text=True)
    return time.perf_counter() - began, done.stdout


def measure(a: Path, b: Path, texts: list[Path], tokens: int) -> dict:
    text_flags = [x for t in texts for x in ("--eval-text", str(t))]
    runs = OUT / "runs"
    remove(runs)
    sweep_s, _ = timed([gpumerge_exe(), "sweep", "--model_path1", str(a), "--model_path2", str(b), "--output_dir",
                        str(runs), "--grid", f"gradient_end=0:1:{COUNT}", *text_flags, "--eval-tokens", str(tokens),
                        "--seq-len", str(SEQ), "--keep", "1", "--quiet"])
    remove(runs)
    # the floor: one evaluation script as a user would write it (imports, tokenizer, texts, one model load, one
    # evaluation), timed whole, plus one more evaluation for each other scored row
    script_s, line = timed([sys.executable, "-c", EVAL_SNIPPET, str(a), str(a), str(tokens), *map(str, texts)])
    load_s, eval_s, _ = map(float, line.split())
    import_s = script_s - load_s - eval_s
    today = 0.0
    for k in range(COUNT):
        merged = OUT / "today"
        remove(merged)
        merge_s, _ = timed([gpumerge_exe(), "--model_path1", str(a), "--model_path2", str(b), "--output_model_path",
                            str(merged), "--gradient_end", repr(k / (COUNT - 1)), "--quiet"])
        score_s, _ = timed([sys.executable, "-c", EVAL_SNIPPET, str(merged), str(a), str(tokens), *map(str, texts)])
        today += merge_s + score_s
    remove(OUT / "today")
    rows = COUNT + 2
    return {"sweep": sweep_s, "import": import_s, "load": load_s, "eval": eval_s,
            "floor": script_s + (rows - 1) * eval_s, "today": today, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="trained,100m")
    parser.add_argument("--eval-tokens", type=int, default=2048, help="tokens per text (default 2048)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results = {name: measure(a, b, texts, args.eval_tokens)
               for name, (a, b, texts) in pairs(args.pairs.split(",")).items()}
    print(f"\n- {COUNT} variants (gradient_end=0:1:{COUNT}) + model_1 + model_2; 2 texts x {args.eval_tokens} tokens, "
          f"--seq-len {SEQ}, --eval-batch 4, fp32 forward on the CPU\n")
    print("| pair | sweep (s) | imports, tokenizer, texts (s) | model load (s) | one evaluation (s) | floor: those + "
          "11 evaluations (s) | sweep / floor (goal <= 1.2) | today's loop: 9 x (merge + load + evaluate) (s) | "
          "speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['sweep']:.2f} | {r['import']:.2f} | {r['load']:.2f} | {r['eval']:.2f} | "
              f"{r['floor']:.2f} | {r['sweep'] / r['floor']:.2f} | {r['today']:.2f} | "
              f"{r['today'] / r['sweep']:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
