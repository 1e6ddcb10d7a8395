"""mergekit configs, the two-model subset: ``linear`` and ``slerp`` with ``slices`` (sources + layer_range) or
``models``, ``base_model``, ``parameters`` (numbers, gradient lists, filtered lists), ``normalize``, ``dtype`` and
``out_dtype``, with mergekit 0.1.5's meaning:

- within a slice of n layers, layer idx is evaluated at x = idx / (n - 1) (x = 1 for a one-layer slice);
- embed_tokens takes the first slice's settings, the final norm and lm_head the last slice's, at x = 0;
- parameters are looked up per source (for that model), then per slice, then at the top; a gradient list is
  piecewise-linear over x; a list of {filter, value} takes the first entry whose filter is in the tensor's name;
- inputs are cast to ``dtype`` (or both to their promoted dtype), the math is fp32, the result is rounded to that
  dtype and then to ``out_dtype``;
- linear: sum of weight * tensor in fp32, divided by the sum of the weights when ``normalize`` (default true);
- slerp: per whole tensor, t = share of the non-base model, lerp when |cos| > 0.9995, eps 1e-8.

Anything else (other methods, a third model, tokenizer surgery, layer remapping) is refused naming the key.
Model 1 is the base model (or the first model listed); model 2 the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from gpumerge import schedule
from gpumerge.errors import SpecError
from gpumerge.rules import Rule
from gpumerge.spec import MAX_LAYER_NUMBER, shown, shown_names

TOP_KEYS = ("merge_method", "slices", "models", "base_model", "parameters", "dtype", "out_dtype",
            "tokenizer_source")
METHOD_PARAMETERS = {"linear": ("weight", "normalize"), "slerp": ("t",)}
DTYPES = {"float16": "F16", "fp16": "F16", "half": "F16", "bfloat16": "BF16", "bf16": "BF16",
          "float32": "F32", "fp32": "F32", "float": "F32"}
_RANK = {"F16": 0, "BF16": 0, "F32": 1, "F64": 2}
_EMBED_IN = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "word_embeddings.weight")


@dataclass(frozen=True)
class Slice:
    layer_start: int
    layer_end: int
    parameters: dict = field(default_factory=dict)
    source_parameters: tuple[dict, dict] = ({}, {})  # model 1's, model 2's


@dataclass(frozen=True)
class MergekitRecipe:
    method: str  # linear | slerp
    slices: tuple[Slice, ...] | None  # None: `models` form (one slice over all layers)
    parameters: dict
    model_parameters: tuple[dict, dict]  # `models` form: each model's parameters
    dtype: str | None  # safetensors code of mergekit's dtype
    out_dtype: str | None
    config: dict  # as given, for the record

    def as_dict(self) -> dict:
        return {"mergekit": self.config}

    def output_dtype(self, dtype_a: str, dtype_b: str) -> str:
        return self.out_dtype or self.dtype or _promote(dtype_a, dtype_b)

    def rules(self, a, num_layers: int | None, *, dtype_b: str, out_dtype: str) -> dict:
        if num_layers is None:
            raise SpecError(f"{a.label} {a.root}: config.json has no layer count; mergekit slices need it")
        slices = self.slices or (Slice(0, num_layers, {}, self.model_parameters),)
        position = 0
        for s in slices:
            if s.layer_start != position:
                raise SpecError(f"mergekit slices: layer_range {[s.layer_start, s.layer_end]} does not continue at "
                                f"layer {position}: only slices that cover model 1's layers 0..{num_layers - 1} in "
                                "order are supported (layer remapping is not)")
            position = s.layer_end
        if position != num_layers:
            raise SpecError(f"mergekit slices cover layers 0..{position - 1}, model 1 has {num_layers}: only slices "
                            "covering every layer are supported; edit the config's layer_range to end at "
                            f"{num_layers} (layer_range: [0, {num_layers}] for one slice)")
        load_main = self.dtype
        rules = {}
        for name, info in a.tensors.items():
            if not info.is_float or schedule.is_block_buffer(name):
                continue
            layer = schedule.layer_index(name)
            if layer is None:
                chosen = slices[0] if name.endswith(_EMBED_IN) else slices[-1]
                x = 0.0
            else:
                chosen = next(s for s in slices if s.layer_start <= layer < s.layer_end)
                n = chosen.layer_end - chosen.layer_start
                x = (layer - chosen.layer_start) / (n - 1) if n > 1 else 1.0
            load = load_main or _promote(info.dtype, dtype_b)
            rules[name] = self._rule(name, chosen, x, load=load,
                                     round_via=load if out_dtype != load else None)
        return rules

    def _rule(self, name: str, chosen: Slice, x: float, *, load: str, round_via: str | None):
        def lookup(key: str, model: int | None):
            scopes = ([chosen.source_parameters[model]] if model is not None else []) + [chosen.parameters,
                                                                                        self.parameters]
            for scope in scopes:
                if scope and key in scope:
                    value = evaluate_setting(name, scope[key], x)
                    if value is not None:
                        return value
            return None

        if self.method == "slerp":
            t = lookup("t", None)
            if t is None:
                raise SpecError(f"mergekit slerp: no `t` parameter applies to {name}")
            return Rule(_number(t, "t"), method="slerp", load_dtype=load, round_via=round_via)
        w1, w2 = lookup("weight", 0), lookup("weight", 1)
        if w1 is None or w2 is None:
            raise SpecError(f"mergekit linear: no `weight` for model {1 if w1 is None else 2} applies to {name}")
        w1, w2 = _number(w1, "weight"), _number(w2, "weight")
        normalize = lookup("normalize", None)
        normalize = True if normalize is None else bool(normalize)
        if normalize:
            total = w1 + w2
            if total == 0:
                raise SpecError(f"mergekit linear: the weights of {name} sum to 0 and normalize is on")
            coef = (w1 / total, w2 / total)
        else:
            coef = (w1, w2)
        return Rule(coef[1], method="linear", coef=coef, load_dtype=load, round_via=round_via)


def _promote(code_a: str, code_b: str) -> str:
    if code_a == code_b:
        return code_a
    if {code_a, code_b} == {"F16", "BF16"}:
        return "F32"
    return max((code_a, code_b), key=lambda c: _RANK.get(c, 0))


def _number(value: Any, key: str) -> float:
    try:
        number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number):
        raise SpecError(f"mergekit parameter {key} must be a finite number, got {shown(value)}")
    return number


def evaluate_setting(tensor_name: str, setting: Any, x: float) -> Any:
    """mergekit's evaluate_setting: a number; a gradient list evaluated at x; or the first {filter, value}
    whose filter (None or "*" matches all) is contained in the tensor name."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            return schedule.interpolate([_number(e, "gradient value") for e in setting], x)
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in tensor_name:
                return evaluate_setting(tensor_name, cond.get("value"), x)
        return None
    raise SpecError(f"mergekit parameter value {shown(setting)} is not a number, a list, or a list of filters")


# ---- parsing ------------------------------------------------------------------------------------------------

def parse_mergekit(data: dict, *, source: str) -> dict:
    """A mergekit config -> MergeSpec keyword arguments (model paths and a MergekitRecipe)."""
    unknown = [k for k in data if k not in TOP_KEYS]
    if unknown:
        raise SpecError(f"{source}: mergekit key(s) {shown_names(unknown)} are not supported (gpumerge "
                        f"takes two-model linear/slerp configs: {', '.join(TOP_KEYS)})")
    method = data.get("merge_method")
    if not isinstance(method, str) or method not in METHOD_PARAMETERS:
        raise SpecError(f"{source}: merge_method {shown(method)} is not supported (gpumerge runs linear and slerp)")
    if data.get("tokenizer_source") not in (None, "base"):
        raise SpecError(f"{source}: tokenizer_source {shown(data['tokenizer_source'])} (tokenizer surgery) is not "
                        "supported; the output keeps model 1's (the base model's) tokenizer")
    if ("slices" in data) == ("models" in data):
        raise SpecError(f"{source}: give exactly one of slices or models")
    parameters = _parameters(data.get("parameters"), method, where=f"{source}: parameters")
    base = _model_ref(data["base_model"], where=f"{source}: base_model") if data.get("base_model") is not None else None
    if method == "slerp" and base is None:
        raise SpecError(f"{source}: slerp needs base_model (t is the share of the other model)")

    if "models" in data:
        entries = data["models"]
        if not isinstance(entries, list):
            raise SpecError(f"{source}: models must be a list")
        refs, params = [], []
        for i, entry in enumerate(entries):
            where = f"{source}: models[{i}]"
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                raise SpecError(f"{where}: each model is a path or {{model: ..., parameters: ...}}")
            _only(entry, ("model", "parameters"), where=where)
            refs.append(_model_ref(entry["model"], where=where))
            params.append(_parameters(entry.get("parameters"), method, where=f"{where}.parameters"))
        if base is not None and base not in refs:  # mergekit adds the base model with no parameters
            refs.append(base)
            params.append({})
        models, order = _two_models(refs, base, source=source)
        recipe_slices = None
        model_parameters = tuple(params[i] for i in order)
    else:
        slices_in = data["slices"]
        if not isinstance(slices_in, list) or not slices_in:
            raise SpecError(f"{source}: slices must be a non-empty list")
        models = None
        recipe_slices = []
        for i, entry in enumerate(slices_in):
            where = f"{source}: slices[{i}]"
            if not isinstance(entry, dict):
                raise SpecError(f"{where}: a slice is a mapping with sources")
            _only(entry, ("sources", "parameters"), where=where)
            sources = entry.get("sources")
            if not isinstance(sources, list):
                raise SpecError(f"{where}: sources must be a list")
            refs, ranges, params = [], [], []
            for j, src in enumerate(sources):
                sw = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src:
                    raise SpecError(f"{sw}: a source is {{model: ..., layer_range: [start, end]}}")
                _only(src, ("model", "layer_range", "parameters"), where=sw)
                refs.append(_model_ref(src["model"], where=sw))
                ranges.append(_layer_range(src.get("layer_range"), where=sw))
                params.append(_parameters(src.get("parameters"), method, where=f"{sw}.parameters"))
            if base is not None and base not in refs and len(ranges) == 1:  # the base joins with the same range
                refs.append(base)
                ranges.append(ranges[0])
                params.append({})
            slice_models, order = _two_models(refs, base, source=where)
            if models is not None and slice_models != models:
                raise SpecError(f"{where}: every slice must use the same two models ({models[0]}, {models[1]})")
            models = slice_models
            first, second = (ranges[i] for i in order)
            if first != second:
                raise SpecError(f"{where}: layer_range {list(first)} and {list(second)} differ: layer remapping "
                                "is not supported")
            recipe_slices.append(Slice(first[0], first[1],
                                       _parameters(entry.get("parameters"), method, where=f"{where}.parameters"),
                                       tuple(params[i] for i in order)))
        recipe_slices = tuple(recipe_slices)
        model_parameters = ({}, {})
    recipe = MergekitRecipe(method=method, slices=recipe_slices, parameters=parameters,
                            model_parameters=model_parameters, dtype=_dtype(data.get("dtype"), "dtype", source),
                            out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source), config=data)
    return {"model_path1": models[0], "model_path2": models[1], "recipe": recipe}


def _two_models(refs: list[str], base: str | None, *, source: str) -> tuple[tuple[str, str], tuple[int, int]]:
    unique = list(dict.fromkeys(refs + ([base] if base else [])))
    if len(unique) != 2 or len(refs) != 2:
        raise SpecError(f"{source}: gpumerge merges exactly two models, this names {len(unique)} "
                        f"({', '.join(shown(ref, limit=200) for ref in unique[:12])})")
    first = refs.index(base) if base is not None else 0
    return (refs[first], refs[1 - first]), (first, 1 - first)


def _model_ref(value: Any, *, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: a model is a path or hub id, got {shown(value)}")
    if "\0" in value:
        raise SpecError(f"{where}: the model {shown(value)} contains a NUL character, which no path can hold")
    if "+" in value:
        raise SpecError(f"{where}: {shown(value)} applies a LoRA (model+lora), which is not supported")
    return value


def _layer_range(value: Any, *, where: str) -> tuple[int, int]:
    if (not isinstance(value, list) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value) or not 0 <= value[0] < value[1]):
        raise SpecError(f"{where}: layer_range must be [start, end] with 0 <= start < end, got {shown(value)}")
    if value[1] > MAX_LAYER_NUMBER:
        raise SpecError(f"{where}: layer_range ends at {shown(value[1])}, more than the {MAX_LAYER_NUMBER} blocks "
                        "any model has")
    return value[0], value[1]


def _parameters(value: Any, method: str, *, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: parameters must be a mapping")
    unknown = [k for k in value if k not in METHOD_PARAMETERS[method]]
    if unknown:
        raise SpecError(f"{where}: parameter(s) {shown_names(unknown)} are not used by {method} "
                        f"(it takes {', '.join(METHOD_PARAMETERS[method])})")
    for key, setting in value.items():
        _check_setting(setting, where=f"{where}.{key}")
    return value


def _check_setting(setting: Any, *, where: str) -> None:
    if isinstance(setting, bool):
        return
    if isinstance(setting, (int, float)):
        _check_finite(setting, where=where)
        return
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting:
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            for e in setting:
                _check_finite(e, where=where)
            return
        for cond in setting:
            if not isinstance(cond, dict) or "value" not in cond or not isinstance(cond.get("filter", ""), (str, type(None))):
                raise SpecError(f"{where}: a filtered value is {{filter: SUBSTRING, value: ...}}, got {shown(cond)}")
            _only(cond, ("filter", "value"), where=where)
            _check_setting(cond["value"], where=where)
        return
    raise SpecError(f"{where}: {shown(setting)} is not a number, a gradient list, or a list of {{filter, value}}")


def _check_finite(value: int | float, *, where: str) -> None:
    try:
        finite = math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise SpecError(f"{where}: {shown(value)} is not a finite number (a weight or t is a plain number like 0.5)")


def _only(entry: dict, allowed: tuple[str, ...], *, where: str) -> None:
    unknown = [k for k in entry if k not in allowed]
    if unknown:
        raise SpecError(f"{where}: key(s) {shown_names(unknown)} are not supported here "
                        f"(known: {', '.join(allowed)})")


def _dtype(value: Any, key: str, source: str) -> str | None:
    if value is None:
        return None
    code = DTYPES.get(str(value).lower())
    if code is None:
        raise SpecError(f"{source}: {key} {shown(value)} is not one of float16, bfloat16, float32")
    return code
