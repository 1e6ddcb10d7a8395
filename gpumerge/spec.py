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


def check_finite(value: float, *, flag: str) -> float:
    if not math.isfinite(value):
        raise SpecError(f"{flag} must be a finite number, got {value!r}")
    return value


def parse_gradient_values(text: str | list, *, what: str = "--gradient_values") -> tuple[float, ...]:
    """``"[1.0, 0.5, 0.0]"`` (a JSON-like list of numbers, never eval'd) or a YAML list -> a tuple of floats."""
    values = text
    if isinstance(text, str):
        try:
            values = json.loads(text.strip())
        except ValueError:
            raise SpecError(f"{what} {text!r} is not a list of numbers like [1.0, 0.5, 0.0]") from None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise SpecError(f"{what} {text!r} is not a non-empty list of numbers like [1.0, 0.5, 0.0]")
    return tuple(check_finite(float(v), flag=what) for v in values)


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
            raise SpecError(f"{self.label or 'the command line'}: layer_only and no_layers together select nothing; "
                            "use one of them")

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
    quiet: bool = False

    def __post_init__(self) -> None:
        check_finite(self.gradient_start, flag="--gradient_start")
        check_finite(self.gradient_end, flag="--gradient_end")
        if self.dtype not in DTYPE_CHOICES:
            raise SpecError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        if self.method not in METHODS:
            raise SpecError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")

    def settings(self) -> dict:
        """The recipe part of the merge record (JSON-serialisable), in the YAML recipe format: written to OUT as
        gpumerge_recipe.yaml, so that `gpumerge --config OUT/gpumerge_recipe.yaml` re-runs the merge."""
        out: dict = {"method": self.method}
        if self.recipe is None:
            out.update(gradient_start=self.gradient_start, gradient_end=self.gradient_end,
                       layer_start=self.layer_start, layer_end=self.layer_end)
        else:
            out.update(self.recipe.as_dict())
        out.update(max_shard_size=self.max_shard_size, dtype=self.dtype)
        return out
