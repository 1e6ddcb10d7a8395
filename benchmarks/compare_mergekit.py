"""Run the same mergekit configs through real mergekit and through gpumerge, and compare the outputs tensor by tensor.

Two small Llama checkpoints per dtype are built locally with transformers (no network): an fp16 pair, a bf16 pair,
and an fp16 + bf16 mix made from them. Every config is run with mergekit's CLI (``mergekit-yaml``, from its own
virtual environment) and with ``gpumerge --config``; both outputs are read back with safetensors and compared:

- the tensor names (missing from gpumerge's output / extra in it) and each tensor's dtype;
- the largest difference in ulps of the output dtype, the ulp taken at mergekit's value:
  ulp(x) = 2^floor(log2 max(|x|, finfo.tiny)) * finfo.eps;
- the number of elements over the bound: more than 2 ulp apart AND more than 2^-22 * max(|a|, |b|) apart, where a
  and b are the two input tensors' elements.

    python benchmarks/compare_mergekit.py                     # work dir /tmp/mkcompare
    python benchmarks/compare_mergekit.py --work /tmp/x --mergekit-yaml /path/to/mergekit-yaml

Run it in gpumerge's environment (it needs torch, transformers, safetensors and gpumerge). If the mergekit
executable is not there, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

NUM_LAYERS = 6
ULP_BOUND = 2.0
REL_BOUND = 2.0 ** -22
CLASSIC_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
             {"value": 0.5}]


# ---- inputs -----------------------------------------------------------------------------------------------------

def build_model(directory: Path, *, seed: int, dtype: torch.dtype, tie: bool = False) -> Path:
    """A small Llama (6 layers) with a tokenizer, in one safetensors file; reused when already there."""
    from gpumerge.demo import build_llama, build_tokenizer

    if (directory / "config.json").is_file() and any(directory.glob("*.safetensors")):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    build_llama(directory, seed=seed, vocab_size=len(tokenizer), dtype=dtype, tie=tie,
                num_layers=NUM_LAYERS, max_shard_size=None)
    return directory


def build_models(root: Path) -> dict[str, Path]:
    return {
        "fp16-1": build_model(root / "fp16-model1", seed=1, dtype=torch.float16),
        "fp16-2": build_model(root / "fp16-model2", seed=2, dtype=torch.float16),
        "bf16-1": build_model(root / "bf16-model1", seed=1, dtype=torch.bfloat16),
        "bf16-2": build_model(root / "bf16-model2", seed=2, dtype=torch.bfloat16),
        "tied-1": build_model(root / "bf16-tied-model1", seed=1, dtype=torch.bfloat16, tie=True),
        "tied-2": build_model(root / "bf16-tied-model2", seed=2, dtype=torch.bfloat16, tie=True),
    }


# ---- configs ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    model1: str  # key in build_models (the base / first model)
    model2: str
    config: dict = field(hash=False)


def _sources(m1: str, m2: str, start: int, end: int) -> list[dict]:
    return [{"model": m1, "layer_range": [start, end]}, {"model": m2, "layer_range": [start, end]}]


def make_cases(models: dict[str, Path]) -> list[Case]:
    """The configs; `build` gets the two models' paths (model 1 is the base model / listed first)."""
    cases = []

    def add(name: str, k1: str, k2: str, build) -> None:
        cases.append(Case(name, k1, k2, build(str(models[k1]), str(models[k2]))))

    add("slerp classic filtered t, dtype bf16 (fp16 in)", "fp16-1", "fp16-2", lambda m1, m2: {
        "slices": [{"sources": _sources(m1, m2, 0, NUM_LAYERS)}],
        "merge_method": "slerp", "base_model": m1,
        "parameters": {"t": CLASSIC_T}, "dtype": "bfloat16"})
    add("slerp classic filtered t, dtype bf16 (bf16 in)", "bf16-1", "bf16-2", lambda m1, m2: {
        "slices": [{"sources": _sources(m1, m2, 0, NUM_LAYERS)}],
        "merge_method": "slerp", "base_model": m1,
        "parameters": {"t": CLASSIC_T}, "dtype": "bfloat16"})
    add("slerp classic filtered t, tied embeddings (bf16)", "tied-1", "tied-2", lambda m1, m2: {
        "slices": [{"sources": _sources(m1, m2, 0, NUM_LAYERS)}],
        "merge_method": "slerp", "base_model": m1, "parameters": {"t": CLASSIC_T}})
    add("slerp two slices, slice-level t (bf16)", "bf16-1", "bf16-2", lambda m1, m2: {
        "slices": [
            {"sources": _sources(m1, m2, 0, 3),
             "parameters": {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.3}]}},
            {"sources": _sources(m1, m2, 3, NUM_LAYERS),
             "parameters": {"t": [{"filter": "mlp", "value": 0.25}, {"filter": "layernorm", "value": [0, 1]}]}},
        ],
        "merge_method": "slerp", "base_model": m1,
        "parameters": {"t": [0.6, 0.2]}})  # reached by slice 2's attention weights and by model.norm / lm_head
    add("linear models: weights 0.7/0.5, normalize (fp16)", "fp16-1", "fp16-2", lambda m1, m2: {
        "models": [{"model": m1, "parameters": {"weight": 0.7}}, {"model": m2, "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "parameters": {"normalize": True}, "dtype": "float16"})
    add("linear models: weights 0.6/0.3, normalize false (bf16)", "bf16-1", "bf16-2", lambda m1, m2: {
        "models": [{"model": m1, "parameters": {"weight": 0.6}}, {"model": m2, "parameters": {"weight": 0.3}}],
        "merge_method": "linear", "parameters": {"normalize": False}})
    add("linear dtype fp32, out_dtype bf16 (fp16 in)", "fp16-1", "fp16-2", lambda m1, m2: {
        "models": [{"model": m1, "parameters": {"weight": [0.2, 0.9]}},
                   {"model": m2, "parameters": {"weight": 0.35}}],
        "merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16"})
    add("linear no dtype, fp16 + bf16 mix", "fp16-1", "bf16-2", lambda m1, m2: {
        "models": [{"model": m1, "parameters": {"weight": 0.5}}, {"model": m2, "parameters": {"weight": 0.5}}],
        "merge_method": "linear"})
    return cases


# ---- running ----------------------------------------------------------------------------------------------------

def gpumerge_command() -> list[str]:
    beside = Path(sys.executable).parent / "gpumerge"
    return [str(beside)] if beside.is_file() else [sys.executable, "-m", "gpumerge"]


def run_tool(command: list[str], out: Path, log: Path) -> tuple[bool, float]:
    if out.exists():
        shutil.rmtree(out)
    began = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - began
    log.write_text(" ".join(command) + "\n\n" + proc.stdout)
    return proc.returncode == 0, elapsed


# ---- comparing --------------------------------------------------------------------------------------------------

def load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def ulp_at(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ulp of `dtype` at the values x (float64): 2^floor(log2 max(|x|, tiny)) * eps."""
    info = torch.finfo(dtype)
    magnitude = x.abs().clamp_min(info.tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * info.eps


@dataclass
class Comparison:
    compared: int = 0
    max_ulp: float = 0.0
    worst: str = ""
    worst_values: tuple[float, float] = (0.0, 0.0)  # (mergekit, gpumerge) at the worst element
    differing: int = 0  # elements not bit-identical
    elements: int = 0
    over: int = 0
    over_tensors: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # written by mergekit, not by gpumerge
    extra: list[str] = field(default_factory=list)  # written by gpumerge, not by mergekit
    dtype_mismatch: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    dtypes: set[str] = field(default_factory=set)


def compare(mk_dir: Path, gm_dir: Path, in1: dict[str, torch.Tensor], in2: dict[str, torch.Tensor]) -> Comparison:
    mk, gm = load_tensors(mk_dir), load_tensors(gm_dir)
    result = Comparison(missing=sorted(set(mk) - set(gm)), extra=sorted(set(gm) - set(mk)))
    for name in sorted(set(mk) & set(gm)):
        m, g = mk[name], gm[name]
        result.dtypes.add(str(m.dtype).removeprefix("torch."))
        if m.dtype != g.dtype:
            result.dtype_mismatch.append(f"{name} ({m.dtype} vs {g.dtype})")
        if m.shape != g.shape:
            result.shape_mismatch.append(f"{name} ({tuple(m.shape)} vs {tuple(g.shape)})")
            continue
        result.compared += 1
        if not m.is_floating_point():
            if not torch.equal(m, g):
                result.over += m.numel()
                result.over_tensors.append(name)
            continue
        m64, g64 = m.double(), g.double()
        diff = (g64 - m64).abs()
        ulps = diff / ulp_at(m64, m.dtype)
        result.elements += m.numel()
        result.differing += int((diff != 0).sum())
        if ulps.numel() and float(ulps.max()) > result.max_ulp:
            at = int(ulps.argmax())
            result.max_ulp, result.worst = float(ulps.max()), name
            result.worst_values = (float(m64.flatten()[at]), float(g64.flatten()[at]))
        a = in1[name].double() if name in in1 and in1[name].shape == m.shape else torch.zeros_like(m64)
        b = in2[name].double() if name in in2 and in2[name].shape == m.shape else torch.zeros_like(m64)
        over = int(((ulps > ULP_BOUND) & (diff > REL_BOUND * torch.maximum(a.abs(), b.abs()))).sum())
        if over:
            result.over += over
            result.over_tensors.append(name)
    return result


def verdict(c: Comparison) -> str:
    problems = []
    if c.missing:
        problems.append(f"missing in gpumerge: {', '.join(c.missing)}")
    if c.extra:
        problems.append(f"extra in gpumerge: {', '.join(c.extra)}")
    if c.dtype_mismatch:
        problems.append(f"dtype differs: {', '.join(c.dtype_mismatch[:3])}"
                        + (f" (+{len(c.dtype_mismatch) - 3} more)" if len(c.dtype_mismatch) > 3 else ""))
    if c.shape_mismatch:
        problems.append(f"shape differs: {', '.join(c.shape_mismatch)}")
    if c.over:
        problems.append(f"over the bound in {len(c.over_tensors)} tensors (e.g. {c.over_tensors[0]})")
    if problems:
        return "DIFFERS: " + "; ".join(problems)
    if c.max_ulp == 0:
        return "match (bit-identical)"
    return f"match (worst {c.max_ulp:.3g} ulp in {c.worst})"


# ---- main -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mkcompare"),
                        help="working directory for models, configs, outputs and logs (default /tmp/mkcompare)")
    parser.add_argument("--mergekit-yaml", type=Path, default=Path("/tmp/mkvenv/bin/mergekit-yaml"),
                        help="mergekit's mergekit-yaml executable (default /tmp/mkvenv/bin/mergekit-yaml)")
    args = parser.parse_args(argv)

    mergekit_yaml = args.mergekit_yaml
    if not (mergekit_yaml.is_file() and mergekit_yaml.stat().st_mode & 0o111):
        print(f"compare_mergekit: mergekit executable not found at {mergekit_yaml}; nothing compared "
              "(install mergekit in a venv and pass --mergekit-yaml PATH)")
        return 0

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"compare_mergekit: building checkpoints in {work / 'models'}", file=sys.stderr)
    models = build_models(work / "models")
    inputs = {key: load_tensors(path) for key, path in models.items()}

    rows, details = [], {}
    for index, case in enumerate(make_cases(models), start=1):
        case_dir = work / f"case{index}"
        case_dir.mkdir(parents=True, exist_ok=True)
        config = case_dir / "config.yml"
        config.write_text(yaml.safe_dump(case.config, sort_keys=False))
        mk_out, gm_out = case_dir / "mergekit", case_dir / "gpumerge"
        print(f"compare_mergekit: [{index}] {case.name}", file=sys.stderr)
        mk_ok, mk_s = run_tool([str(mergekit_yaml), str(config), str(mk_out), "--quiet"], mk_out,
                               case_dir / "mergekit.log")
        gm_ok, gm_s = run_tool(gpumerge_command() + ["--config", str(config), "--output_model_path", str(gm_out),
                                                     "--quiet"], gm_out, case_dir / "gpumerge.log")
        if not (mk_ok and gm_ok):
            failed = " and ".join(n for n, ok in (("mergekit", mk_ok), ("gpumerge", gm_ok)) if not ok)
            rows.append((case.name, "-", "-", "-", f"FAILED: {failed} (log in {case_dir})"))
            continue
        c = compare(mk_out, gm_out, inputs[case.model1], inputs[case.model2])
        rows.append((case.name, str(c.compared), f"{c.max_ulp:.3g}", str(c.over), verdict(c)))
        details[case.name] = {"dir": str(case_dir), "output dtypes": sorted(c.dtypes),
                              "mergekit s": round(mk_s, 2), "gpumerge s": round(gm_s, 2),
                              "differing elements": f"{c.differing}/{c.elements}",
                              "worst": f"{c.worst} mergekit {c.worst_values[0]:.4g} gpumerge {c.worst_values[1]:.4g}"
                              if c.worst else "-"}

    print("| config | tensors compared | max ulp diff | elements over the bound | verdict |")
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    print(f"bound: > {ULP_BOUND:g} ulp of the output dtype (at mergekit's value) and > 2^-22 * max(|a|, |b|); "
          "the ulp at a value of 0 is the smallest subnormal, so a tiny difference where one tool gives 0 reads as "
          "a huge ulp count")
    for name, info in details.items():
        print(f"- {name}: {json.dumps(info)}")
    failed = [row[0] for row in rows if row[-1].startswith(("FAILED", "DIFFERS"))]
    if failed:
        print(f"compare_mergekit: {len(failed)} case(s) failed or differ: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
