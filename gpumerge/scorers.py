"""A search's scorers (`--scorers SCORERS.yaml`): what a trial is scored by, when perplexity alone is not the goal.

A scorer file is a YAML list; each entry a kind, its arguments, a weight (default 1) and, for a function, a
direction (default minimize)::

    - kind: perplexity            # on the --eval-text files, as an evaluated sweep scores
      weight: 1
    - kind: function              # your own: function(model, tokenizer) -> float
      function: mypackage.scores:exact_match
      direction: maximize
      weight: 0.5
      name: exact_match           # its column (default: the function's name)
    - kind: lm_eval               # an lm-evaluation-harness task on the model in memory (pip install lm_eval)
      task: my_local_task
      include_path: ./tasks       # a directory of task YAMLs (local tasks need no network)
      metric: acc                 # default acc
      limit: 100                  # samples (default 100)
      weight: 1

Each value becomes "lower is better" (perplexity as its logarithm; a maximized value v as 1 - v, which for an
accuracy is the error rate) and the objective is their weighted sum; each scorer's value is its own column of the
results. A file (rather than a packed command-line syntax) keeps paths and module names free of quoting rules.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gpumerge.errors import SpecError
from gpumerge.spec import shown

KINDS = ("perplexity", "function", "lm_eval")
_KEYS = {"perplexity": {"kind", "weight", "name"},
         "function": {"kind", "weight", "name", "function", "direction"},
         "lm_eval": {"kind", "weight", "name", "task", "include_path", "metric", "limit", "direction"}}
_FUNCTION_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
MAX_SCORERS = 16
MAX_SCORER_BYTES = 2**20


@dataclass(frozen=True)
class Scorer:
    name: str
    kind: str
    weight: float = 1.0
    direction: str = "minimize"
    args: dict = field(default_factory=dict)

    def lower_is_better(self, value: float) -> float:
        if self.kind == "perplexity":
            return math.log(value) if value > 0 else math.nan
        return value if self.direction == "minimize" else 1.0 - value

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, "weight": self.weight, "direction": self.direction,
                **self.args}


def load_scorers(path) -> tuple[Scorer, ...]:
    """The scorers a file lists, each checked (one SpecError naming the file and the entry)."""
    from gpumerge import fsutil
    from gpumerge.recipes import load_yaml
    from gpumerge.spec import check_home

    what = f"--scorers {path}"
    check_home(path, what=what)
    raw = fsutil.read_regular(Path(path).expanduser(), max_bytes=MAX_SCORER_BYTES, what=what, error=SpecError)
    data = load_yaml(fsutil.decode_text(raw, what=what, error=SpecError), source=str(path), mapping=False)
    if not isinstance(data, list) or not data or not all(isinstance(entry, dict) for entry in data):
        raise SpecError(f"{what}: a scorer file is a YAML list of scorers, each a mapping with a kind "
                        f"({', '.join(KINDS)}), e.g. `- {{kind: perplexity, weight: 1}}`")
    if len(data) > MAX_SCORERS:
        raise SpecError(f"{what}: {len(data)} scorers; at most {MAX_SCORERS}")
    scorers = [_scorer(entry, f"{what}: scorer {k + 1}") for k, entry in enumerate(data)]
    names = [s.name for s in scorers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise SpecError(f"{what}: the name {twice[0]} is used twice; give each scorer its own name (name: ...)")
    return tuple(scorers)


def _scorer(entry: dict, where: str) -> Scorer:
    kind = entry.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{where}: kind must be one of {', '.join(KINDS)}; got {shown(kind, limit=30)}")
    unknown = sorted(set(map(str, entry)) - _KEYS[kind])
    if unknown:
        raise SpecError(f"{where}: unknown key {shown(unknown[0], limit=30)} for a {kind} scorer (it takes "
                        f"{', '.join(sorted(_KEYS[kind]))})")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise SpecError(f"{where}: weight must be a positive number; got {shown(weight, limit=30)}")
    direction = entry.get("direction", "maximize" if kind == "lm_eval" else "minimize")
    if direction not in ("minimize", "maximize"):
        raise SpecError(f"{where}: direction must be minimize or maximize; got {shown(direction, limit=30)}")
    args: dict = {}
    if kind == "function":
        target = entry.get("function")
        if not isinstance(target, str) or not _FUNCTION_RE.match(target):
            raise SpecError(f"{where}: function must be package.module:function; got {shown(target, limit=60)}")
        args["function"] = target
        default = target.rsplit(":", 1)[1]
    elif kind == "lm_eval":
        task = entry.get("task")
        if not isinstance(task, str) or not re.fullmatch(r"[\w.-]{1,200}", task):
            raise SpecError(f"{where}: task must be an lm-evaluation-harness task name; got {shown(task, limit=60)}")
        limit = entry.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= 10**6:
            raise SpecError(f"{where}: limit must be a number of samples from 1 to 1000000; got {shown(limit)}")
        metric = entry.get("metric", "acc")
        if not isinstance(metric, str) or not re.fullmatch(r"[\w.,-]{1,100}", metric):
            raise SpecError(f"{where}: metric must be a metric's name such as acc; got {shown(metric, limit=40)}")
        include = entry.get("include_path")
        if include is not None and (not isinstance(include, str) or not Path(include).expanduser().is_dir()):
            raise SpecError(f"{where}: include_path must be a directory of task files; got {shown(include)}")
        args.update(task=task, limit=limit, metric=metric, include_path=include)
        default = task
    else:
        direction, default = "minimize", "perplexity"
    name = entry.get("name", default)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][\w.-]{0,59}", name):
        raise SpecError(f"{where}: name must be 1 to 60 letters, digits, '_', '.', '-', starting with a letter; "
                        f"got {shown(name, limit=60)}")
    return Scorer(name, kind, float(weight), direction, args)


def objective(scorers: tuple[Scorer, ...], values: dict[str, float]) -> float:
    """The weighted sum of every scorer's value made "lower is better" (NaN when any is not finite)."""
    total = 0.0
    for scorer in scorers:
        value = values.get(scorer.name, math.nan)
        part = scorer.lower_is_better(value) if math.isfinite(value) else math.nan
        total += scorer.weight * part
    return total if math.isfinite(total) else math.nan


def score_functions(scorers: tuple[Scorer, ...], model_dir: Path, *, texts, batch: int) -> Callable:
    """A function of (model, device) -> {scorer name: value}: the scorers ready to run on the model in memory
    (custom functions imported, model 1's tokenizer loaded once, lm-eval's task set up), checked before any work."""
    from transformers import AutoTokenizer

    tokenizer = None
    calls = {}
    for scorer in scorers:
        if scorer.kind == "function":
            calls[scorer.name] = _function(scorer)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_dir)
        elif scorer.kind == "lm_eval":
            calls[scorer.name] = _lm_eval(scorer, model_dir, batch=batch)

    def run(model, device: str) -> dict[str, float]:
        from gpumerge.evaluate import perplexity

        values = {}
        for scorer in scorers:
            if scorer.kind == "perplexity":
                values[scorer.name] = perplexity(model, texts, batch=batch, device=device).perplexity
            elif scorer.kind == "function":
                import torch

                with torch.inference_mode():  # scoring, never training: no gradients kept
                    values[scorer.name] = _number(calls[scorer.name](model, tokenizer), scorer)
            else:
                values[scorer.name] = calls[scorer.name](model)
        return values

    return run


def _function(scorer: Scorer):
    module_name, function_name = scorer.args["function"].split(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: whatever it raises while importing is this one line
        raise SpecError(f"--scorers: cannot import {module_name} for the scorer {scorer.name}: "
                        f"{type(exc).__name__}: {exc}") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise SpecError(f"--scorers: {module_name} has no function {function_name} (the scorer {scorer.name})")
    return function


def _number(value, scorer: Scorer) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        from gpumerge.errors import OutputError

        raise OutputError(f"--scorers: the scorer {scorer.name} ({scorer.args['function']}) returned "
                          f"{type(value).__name__}, not a number")
    return float(value)


def _lm_eval(scorer: Scorer, model_dir: Path, *, batch: int):
    """An lm-evaluation-harness task scored on the model in memory (wrapped as lm-eval's HFLM: no reload, no disk).

    lm-eval's own ``evaluate`` rather than ``simple_evaluate``: the latter adds a git hash (a ``git describe`` that
    prints "fatal: not a git repository" outside one) and environment details no score needs, and returns nothing
    on a process whose LOCAL_RANK is not 0 (every process but one under ``accelerate launch``). What it does besides
    is done here: zero-shot unless the task says otherwise, and its fixed seeds."""
    try:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except Exception as exc:  # absent, or broken against this transformers
        raise SpecError(f"--scorers: the lm_eval scorer {scorer.name} needs lm-evaluation-harness, which cannot be "
                        f"imported here ({type(exc).__name__}: {exc}); pip install lm_eval") from None
    from transformers import AutoTokenizer

    class QuietHFLM(HFLM):  # lm-eval's progress bars off: a search prints one line per run, not per task
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    manager = TaskManager(include_path=scorer.args.get("include_path"))
    task, metric = scorer.args["task"], scorer.args["metric"]

    def run(model) -> float:
        import random

        import numpy
        import torch

        random.seed(0)  # simple_evaluate's seeds
        numpy.random.seed(1234)
        torch.manual_seed(1234)
        with contextlib.redirect_stderr(io.StringIO()):
            loaded = manager.load([task])
        for task_object in loaded["tasks"].values():
            if task_object.get_config("num_fewshot") is None:
                task_object.set_config(key="num_fewshot", value=0)
            task_object.set_fewshot_seed(seed=1234)
        # lm-eval builds its requests, and datasets its splits, under progress bars that no argument turns off
        # (tqdm reads its TQDM_DISABLE at import), and it warns that the model is an object, by design here: all
        # of it goes to sys.stderr, set aside while the task runs (its errors still raise)
        with contextlib.redirect_stderr(io.StringIO()):
            wrapped = QuietHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
            results = evaluate(lm=wrapped, task_dict=loaded, limit=scorer.args["limit"], log_samples=False,
                               bootstrap_iters=0, verbosity="ERROR")
        found = results["results"].get(task, {})
        for key, value in found.items():
            if key == metric or key.split(",")[0] == metric:
                return float(value)
        from gpumerge.errors import OutputError

        raise OutputError(f"--scorers: lm_eval task {task} gave no metric {metric} (it gave "
                          f"{', '.join(k for k in found if k != 'alias') or 'nothing'})")

    return run
