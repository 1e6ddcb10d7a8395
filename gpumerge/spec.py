"""What the user asked for, as frozen data. No file I/O, no torch."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from gpumerge.errors import SpecError

# Output dtype names accepted by --dtype, mapped to safetensors dtype codes ("auto" is resolved by the planner).
DTYPE_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
DTYPE_CHOICES = ("float16", "bfloat16", "float32", "auto")

DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+(,cuda:\d+)*)$")

# Size units as huggingface_hub/transformers spell them: decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB.
# Written here (not accelerate's convert_file_size_to_int) so that spec parsing stays free of heavy imports
# and so that every bad string gets the same one-line message.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int, *, what: str = "size") -> int:
    """``"2000MiB"``, ``"2GB"``, ``"500MB"``, ``"300KB"``, ``"1048576"`` -> bytes (a positive int)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE_RE.match(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise SpecError(
                f"{what} {text!r} is not a size: use a number of bytes or a number with one of "
                "KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 2000MiB or 5GB"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise SpecError(f"{what} {text!r} must be more than 0 bytes")
    return value


def parse_dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPE_CHOICES:
        raise SpecError(f"--dtype {text!r} is not one of {', '.join(DTYPE_CHOICES)}")
    return name


def parse_device(text: str) -> str:
    value = text.strip().lower().replace(" ", "")
    if not DEVICE_RE.match(value):
        raise SpecError(f"--device {text!r} is not one of auto, cpu, cuda, cuda:N or a list cuda:0,cuda:2")
    if len(set(value.split(","))) != len(value.split(",")):
        raise SpecError(f"--device {text!r} names a device twice")
    return value


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"0=20GiB,1=20GiB,cpu=8GiB"`` -> accelerate's max_memory dict ``{0: bytes, 1: bytes, "cpu": bytes}``."""
    from accelerate.utils import convert_file_size_to_int  # accelerate's size parsing, as its max_memory uses

    budget: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key = key.strip().lower().removeprefix("cuda:")
        if not sep or not (key.isdigit() or key == "cpu"):
            raise SpecError(f"--max_memory {text!r}: each entry is DEVICE=SIZE with DEVICE a GPU index or cpu, "
                            f"e.g. 0=20GiB,1=20GiB,cpu=8GiB (got {part!r})")
        try:
            value = convert_file_size_to_int(size.strip())
        except (ValueError, TypeError) as exc:
            raise SpecError(f"--max_memory {text!r}: {size.strip()!r} is not a size (e.g. 20GiB, 500MB)") from exc
        if value <= 0:
            raise SpecError(f"--max_memory {text!r}: {part!r} must be more than 0 bytes")
        budget[int(key) if key.isdigit() else "cpu"] = value
    if not budget:
        raise SpecError(f"--max_memory {text!r} names no device")
    return budget


def check_finite(value, *, flag: str) -> float:
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SpecError(f"{flag} must be a finite number, got {str(value)[:40]}")
    return number


def parse_gradient_values(text: str | list, *, what: str = "--gradient_values") -> tuple[float, ...]:
    """``"[1.0, 0.5, 0.0]"`` (a JSON-like list of numbers, never eval'd) or a YAML list -> a tuple of floats."""
    values = text
    if isinstance(text, str):
        try:
            values = json.loads(text.strip())
        except (ValueError, RecursionError):
            raise SpecError(f"{what} {text[:60]!r} is not a list of numbers like [1.0, 0.5, 0.0]") from None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise SpecError(f"{what} {str(text)[:60]!r} is not a non-empty list of numbers like [1.0, 0.5, 0.0]")
    return tuple(check_finite(v, flag=what) for v in values)


@dataclass(frozen=True, slots=True)
class TensorOperation:
    """One BlockMerge_Gradient Tensors/YAML-edition operation: values over the selected tensors' positions."""

    gradient_values: tuple[float, ...]
    layer_only: bool = False
    no_layers: bool = False
    filter: str | None = None
    label: str | None = None

    def __post_init__(self) -> None:
        if self.layer_only and self.no_layers:
            what = f"operation {self.label!r}" if self.label else "gradient_values"
            raise SpecError(f"{what}: layer_only and no_layers together select nothing; use one of them")

    def as_dict(self) -> dict:
        out = {"operation": self.label, "gradient_values": list(self.gradient_values), "filter": self.filter,
               "layer_only": self.layer_only, "no_layers": self.no_layers}
        return {k: v for k, v in out.items() if v not in (None, False)}


@dataclass(frozen=True, slots=True)
class OperationsRecipe:
    operations: tuple[TensorOperation, ...]

    def as_dict(self) -> dict:
        return {"operations": [op.as_dict() for op in self.operations]}


@dataclass(frozen=True, slots=True)
class LayerGradientsRecipe:
    """Per-module layer gradients: (module substring or "default", anchors) in the order given."""

    modules: tuple[tuple[str, tuple[float, ...]], ...]

    def as_dict(self) -> dict:
        return {"layer_gradients": {key: list(anchors) for key, anchors in self.modules}}


METHODS = ("lerp", "slerp")


@dataclass(frozen=True, slots=True)
class MergeSpec:
    """One two-model gradient merge, with the original BlockMerge_Gradient's meaning.

    ``t`` is always the share of model 2: out = A + t * (B - A).
    """

    model_path1: str
    model_path2: str
    output_model_path: Path | None
    gradient_start: float = 0.0
    gradient_end: float = 1.0
    layer_start: int = 0
    layer_end: int = 99  # exclusive, clamped to the model's layer count
    max_shard_bytes: int = 2000 * 2**20
    max_shard_size: str = "2000MiB"  # as the user wrote it, for the merge record
    dtype: str = "float16"  # float16 | bfloat16 | float32 | auto
    dtype_was_default: bool = True
    recipe: OperationsRecipe | LayerGradientsRecipe | object | None = None  # None: the gradient fields above
    method: str = "lerp"  # lerp | slerp
    device: str = "auto"
    max_memory: tuple[tuple[int | str, int], ...] | None = None  # accelerate-style budget, as sorted items
    overwrite: bool = False
    allow_nonfinite: bool = False  # blend NaN/inf inputs in IEEE arithmetic instead of refusing them
    quiet: bool = False

    def __post_init__(self) -> None:
        check_finite(self.gradient_start, flag="--gradient_start")
        check_finite(self.gradient_end, flag="--gradient_end")
        if self.dtype not in DTYPE_CHOICES:
            raise SpecError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.method not in METHODS:
            raise SpecError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")

    @property
    def blend_method(self) -> str:
        """The method the blend uses: a mergekit config's merge_method, else --method."""
        return getattr(self.recipe, "method", self.method)

    def settings(self) -> dict:
        """The recipe part of the merge record (JSON-serialisable), in the YAML recipe format: written to OUT as
        gpumerge_recipe.yaml, so that `gpumerge --config OUT/gpumerge_recipe.yaml` re-runs the merge."""
        out: dict = {} if hasattr(self.recipe, "config") else {"method": self.method}
        if self.recipe is None:
            out.update(gradient_start=self.gradient_start, gradient_end=self.gradient_end,
                       layer_start=self.layer_start, layer_end=self.layer_end)
        else:
            out.update(self.recipe.as_dict())
        out["max_shard_size"] = self.max_shard_size
        if not self.dtype_was_default:  # an explicit choice; the default is the default again on a re-run
            out["dtype"] = self.dtype
        return out


# ---- YAML recipes ---------------------------------------------------------------------------------------------

# Keys of gpumerge's recipe format: the original YAML edition's (model_path1, model_path2, output_model_path,
# max_shard_size, operations) plus every command-line setting, so a merge's record can be re-run as it is.
RECIPE_KEYS = ("mergekit", "model_path1", "model_path2", "output_model_path", "max_shard_size", "dtype", "device", "method",
               "gradient_start", "gradient_end", "layer_start", "layer_end", "gradient_values", "layer_only",
               "no_layers", "filter", "custom_filter", "operations", "layer_gradients", "max_memory")
OPERATION_KEYS = ("operation", "filter", "gradient_values", "layer_only", "no_layers")
MERGEKIT_MARKERS = ("merge_method", "slices", "models")


def load_yaml(text: str, *, source: str) -> dict:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: long lists parse fast
    try:
        data = yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    except (ValueError, RecursionError) as exc:
        raise SpecError(f"{source}: cannot read this YAML ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source}: a recipe is a YAML mapping of settings (got {type(data).__name__})")
    return data


def is_mergekit_config(data: dict) -> bool:
    return any(key in data for key in MERGEKIT_MARKERS)


def _unknown(keys, allowed, *, where: str) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {', '.join(map(str, unknown))} (known: {', '.join(allowed)})")


def _bool(value, *, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def parse_recipe(data: dict, *, source: str) -> dict:
    """gpumerge's YAML recipe -> MergeSpec keyword arguments (strings still to be checked by their parsers)."""
    _unknown(data, RECIPE_KEYS, where=source)
    for key in ("model_path1", "model_path2", "output_model_path", "max_shard_size", "dtype", "device", "method",
                "max_memory"):
        allowed = (str, int) if key == "max_shard_size" else (str,)
        if key in data and (not isinstance(data[key], allowed) or isinstance(data[key], bool)):
            raise SpecError(f"{source}: {key} must be a string, got {data[key]!r}")
    if "mergekit" in data:  # a merge record of a mergekit config: its settings around the config itself
        from gpumerge.mergekit import parse_mergekit

        if not isinstance(data["mergekit"], dict):
            raise SpecError(f"{source}: mergekit must be a mergekit config (a mapping)")
        out = parse_mergekit(data["mergekit"], source=f"{source}: mergekit")
        extra = [k for k in data if k not in ("mergekit", "model_path1", "model_path2", "output_model_path",
                                              "max_shard_size", "dtype", "device", "max_memory")]
        if extra:
            raise SpecError(f"{source}: {', '.join(extra)} cannot be combined with a mergekit config")
        out.update({k: data[k] for k in data if k != "mergekit"})
        return out
    out = {k: data[k] for k in ("model_path1", "model_path2", "output_model_path", "max_shard_size", "dtype",
                                "device", "method", "gradient_start", "gradient_end", "layer_start", "layer_end",
                                "max_memory") if k in data}
    recipes = [k for k in ("gradient_values", "operations", "layer_gradients") if k in data]
    if len(recipes) > 1:
        raise SpecError(f"{source}: use one of gradient_values, operations, layer_gradients (got {recipes})")
    window_keys = [k for k in ("gradient_start", "gradient_end", "layer_start", "layer_end") if k in data]
    if recipes and window_keys:
        raise SpecError(f"{source}: {recipes[0]} replaces {', '.join(window_keys)}; remove one of them")
    if "gradient_values" in data:
        op = _operation({k: data[k] for k in ("gradient_values", "layer_only", "no_layers", "filter",
                                              "custom_filter") if k in data}, source=source, label=None)
        out["recipe"] = OperationsRecipe((op,))
    elif any(k in data for k in ("layer_only", "no_layers", "filter", "custom_filter")):
        raise SpecError(f"{source}: layer_only, no_layers and filter select tensors for gradient_values")
    if "operations" in data:
        ops = data["operations"]
        if not isinstance(ops, list) or not ops:
            raise SpecError(f"{source}: operations must be a non-empty list")
        out["recipe"] = OperationsRecipe(tuple(
            _operation(op, source=source, label=f"{source}: operations[{i}]") for i, op in enumerate(ops)))
    if "layer_gradients" in data:
        modules = data["layer_gradients"]
        if not isinstance(modules, dict) or not modules:
            raise SpecError(f"{source}: layer_gradients must map module names (or default) to lists of values")
        out["recipe"] = LayerGradientsRecipe(tuple(
            (str(key), parse_gradient_values(value, what=f"{source}: layer_gradients.{key}"))
            for key, value in modules.items()))
    return out


def _operation(entry, *, source: str, label: str | None) -> TensorOperation:
    where = label or source
    if not isinstance(entry, dict):
        raise SpecError(f"{where}: an operation is a mapping with gradient_values (and filter, layer_only, ...)")
    allowed = OPERATION_KEYS + (("custom_filter",) if label is None else ())
    _unknown(entry, allowed, where=where)
    if "gradient_values" not in entry:
        raise SpecError(f"{where}: gradient_values is missing")
    if "filter" in entry and "custom_filter" in entry:
        raise SpecError(f"{where}: give filter or custom_filter, not both")
    substring = entry.get("filter", entry.get("custom_filter"))
    if substring is not None and not isinstance(substring, str):
        raise SpecError(f"{where}: filter must be a string, got {substring!r}")
    name = entry.get("operation")
    return TensorOperation(
        gradient_values=parse_gradient_values(entry["gradient_values"], what=f"{where}: gradient_values"),
        layer_only=_bool(entry.get("layer_only", False), key="layer_only", where=where),
        no_layers=_bool(entry.get("no_layers", False), key="no_layers", where=where),
        filter=substring or None,
        label=str(name) if name is not None else None,
    )
