"""What the user asked for, as frozen data. No file I/O, no torch."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from gpumerge.errors import SpecError

# Output dtype names accepted by --dtype, mapped to safetensors dtype codes ("auto" is resolved by the planner).
DTYPE_CODES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
DTYPE_CHOICES = ("float16", "bfloat16", "float32", "auto")

# A sweep variant's name: a directory name that is safe everywhere (no '/', no leading '.', no spaces).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}", re.ASCII)
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d{1,9}(,cuda:\d{1,9})*)$", re.ASCII)

# Bounds on what a setting can sensibly be: past them a value is a typo or an attack, and refusing it here keeps
# every later step (int -> float, planning batches, messages) from overflowing, crawling or growing without end.
MAX_SIZE_BYTES = 2**60  # 1 EiB: no shard, memory budget or disk is larger
MIN_DEVICE_BUDGET_BYTES = 16 * 2**20  # one CPU batch; below it planning crawls through millions of tiny batches
MAX_LAYER_NUMBER = 1_000_000  # no model has a million decoder blocks
MAX_RECIPE_BYTES = 2**20  # a recipe is a few kilobytes; PyYAML takes ~60 bytes of memory per byte it parses
MAX_RECIPE_ITEMS = 4 * 2**20  # values and string characters, with every alias expanded
MAX_RECIPE_DEPTH = 64  # a mergekit config nests ~10 levels; deeper structures overflow recursive code

# Size units as huggingface_hub/transformers spell them: decimal KB/MB/GB/TB, binary KiB/MiB/GiB/TiB.
# Written here (not accelerate's convert_file_size_to_int) so that spec parsing stays free of heavy imports,
# so that sizes are exact (no float rounding: 2.01GB is 2010000000 bytes) and every bad string gets one message.
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$", re.ASCII)


def shown(value, *, limit: int = 40) -> str:
    """A value as an error message shows it: strings quoted, anything long cut, huge integers by their length."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a {len(str(abs(value))) if value.bit_length() < 14000 else 'many'}-digit integer"
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit] + "..."


def shown_names(keys, *, limit: int = 12) -> str:
    """Keys for a message: short strings as they are, anything else as shown(), at most ``limit`` of them."""
    keys = list(keys)
    names = [k if isinstance(k, str) and len(k) <= 40 else shown(k) for k in keys[:limit]]
    return ", ".join(names) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _size_bytes(text: str | int, *, what: str) -> int:
    """A size as a whole number of bytes, exactly (fractions of a byte dropped); 0 is allowed here."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = _SIZE_RE.match(text) if isinstance(text, str) else None
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise SpecError(
                f"{what} {shown(text)} is not a size: use a number of bytes or a number with one of "
                "KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. 2000MiB or 5GB"
            )
        if len(match.group(1)) > 40:  # 10**40 bytes is past any bound: no need to multiply it out
            value = MAX_SIZE_BYTES + 1
        else:
            value = int(Decimal(match.group(1)) * _SIZE_UNITS[unit])
    if value > MAX_SIZE_BYTES:
        raise SpecError(f"{what} {shown(text)} is more than {MAX_SIZE_BYTES} bytes (2**60, 1 EiB), far beyond "
                        "any real size; give a size like 2000MiB or 5GB")
    if value < 0:
        raise SpecError(f"{what} {shown(text)} is negative; give a size like 2000MiB or 5GB")
    return value


def parse_size(text: str | int, *, what: str = "size") -> int:
    """``"2000MiB"``, ``"2GB"``, ``"500MB"``, ``"300KB"``, ``"1048576"`` -> bytes (a positive int, at most 2**60)."""
    value = _size_bytes(text, what=what)
    if value <= 0:
        raise SpecError(f"{what} {shown(text)} must be more than 0 bytes")
    return value


def parse_dtype(text: str) -> str:
    name = DTYPE_ALIASES.get(text.lower(), text.lower())
    if name not in DTYPE_CHOICES:
        raise SpecError(f"--dtype {shown(text)} is not one of {', '.join(DTYPE_CHOICES)}")
    return name


def parse_device(text: str) -> str:
    value = text.strip().lower().replace(" ", "")
    if not DEVICE_RE.match(value):
        raise SpecError(f"--device {shown(text)} is not one of auto, cpu, cuda, cuda:N or a list cuda:0,cuda:2")
    if len(set(value.split(","))) != len(value.split(",")):
        raise SpecError(f"--device {shown(text)} names a device twice")
    return value


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``"0=20GiB,1=20GiB,cpu=8GiB"`` -> accelerate's max_memory dict ``{0: bytes, 1: bytes, "cpu": bytes}``.

    Sizes as --max_shard_size takes them (plain bytes too); each device gets at least MIN_DEVICE_BUDGET_BYTES."""
    budget: dict[int | str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, size = part.partition("=")
        key = key.strip().lower().removeprefix("cuda:")
        if not sep or not (re.fullmatch(r"[0-9]{1,9}", key) or key == "cpu"):
            raise SpecError(f"--max_memory {shown(text)}: each entry is DEVICE=SIZE with DEVICE a GPU index or "
                            f"cpu, e.g. 0=20GiB,1=20GiB,cpu=8GiB (got {shown(part)})")
        device: int | str = int(key) if key != "cpu" else "cpu"
        label = device_label(device)
        if device in budget:
            raise SpecError(f"--max_memory {shown(text)} names {label} twice; give each device once")
        budget[device] = _size_bytes(size.strip(), what=f"--max_memory {shown(text)}: {label}")
        check_device_budget(device, budget[device], what=f"--max_memory {shown(text)}")
    if not budget:
        raise SpecError(f"--max_memory {shown(text)} names no device")
    return budget


def device_label(key: int | str) -> str:
    """A --max_memory key as a device name: ``0`` -> ``cuda:0``, ``"cpu"`` -> ``cpu``."""
    return "cpu" if key == "cpu" else f"cuda:{key}"


def check_device_budget(key: int | str, nbytes: int, *, what: str = "--max_memory") -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < MIN_DEVICE_BUDGET_BYTES:
        raise SpecError(f"{what}: {device_label(key)} gets {shown(nbytes)} bytes, less than the minimum of "
                        f"{MIN_DEVICE_BUDGET_BYTES} bytes (16 MiB) a device needs for its in-flight buffers; "
                        f"give {'cpu' if key == 'cpu' else key}=16MiB or more")


def unused_budget_error(keys, devices: list[str]) -> SpecError:
    """--max_memory for a device the merge does not use (a typo, or a budget that would be silently ignored)."""
    return SpecError(f"--max_memory names device(s) {', '.join(device_label(k) for k in keys)} that the merge does "
                     f"not use ({', '.join(devices)}); budget only those, or choose them with --device")


def check_budget_devices(device: str, max_memory) -> None:
    """The --max_memory entries --device rules out without probing: any GPU with --device cpu, other GPUs than
    those of a cuda:N list."""
    if device in ("auto", "cuda") or not max_memory:
        return
    devices = device.split(",")
    unknown = [key for key, _ in max_memory if key != "cpu" and f"cuda:{key}" not in devices]
    if unknown:
        raise unused_budget_error(unknown, devices)


def check_home(path: str | Path, *, what: str) -> None:
    """A leading ``~user`` must name an existing user: pathlib's expanduser raises RuntimeError otherwise."""
    text = str(path)
    if not text.startswith("~"):
        return
    try:
        Path(text).expanduser()
    except RuntimeError:
        user = text.split("/", 1)[0].removeprefix("~")
        raise SpecError(f"{what}: there is no user named {user} (or no home directory) to expand ~{user}; give "
                        "the path without ~ or with an existing user") from None


def check_layer_number(value, *, key: str) -> int:
    """A block number (layer_start, layer_end): an integer (or integral float) of magnitude <= MAX_LAYER_NUMBER."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())):
        raise SpecError(f"{key} must be an integer, got {shown(value)}")
    if abs(value) > MAX_LAYER_NUMBER:
        raise SpecError(f"{key} must be a block number, an integer of at most {MAX_LAYER_NUMBER} in size (no model "
                        f"has more blocks), got {shown(value)}")
    return int(value)


def check_finite(value, *, flag: str) -> float:
    try:
        number = float(value)
    except (OverflowError, TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise SpecError(f"{flag} must be a finite number, got {shown(value)}")
    return number


def parse_gradient_values(text: str | list, *, what: str = "--gradient_values") -> tuple[float, ...]:
    """``"[1.0, 0.5, 0.0]"`` (a JSON-like list of numbers, never eval'd) or a YAML list -> a tuple of floats."""
    values = text
    if isinstance(text, str):
        try:
            values = json.loads(text.strip())
        except (ValueError, RecursionError):
            raise SpecError(f"{what} {shown(text, limit=60)} is not a list of numbers like [1.0, 0.5, 0.0]") from None
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if (not isinstance(values, list) or not values
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)):
        raise SpecError(f"{what} {shown(text, limit=60)} is not a non-empty list of numbers like [1.0, 0.5, 0.0]")
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


# The orders position-based recipes count tensors in: "architecture" (model 1's architecture's state_dict order,
# built on the meta device with transformers; the original's model.state_dict()) or "names" (a natural sort of
# the stored names, for architectures transformers does not know). The order is part of the result: other orders
# give other bytes, so one is never swapped for the other without the user asking.
TENSOR_ORDERS = ("architecture", "names")


def check_tensor_order(value, *, what: str = "--tensor_order") -> str:
    if value not in TENSOR_ORDERS:
        raise SpecError(f"{what} {shown(value)} is not one of {', '.join(TENSOR_ORDERS)}")
    return value


@dataclass(frozen=True, slots=True)
class OperationsRecipe:
    operations: tuple[TensorOperation, ...]
    tensor_order: str = "architecture"

    def __post_init__(self) -> None:
        check_tensor_order(self.tensor_order, what="tensor_order")

    def as_dict(self) -> dict:
        out: dict = {"operations": [op.as_dict() for op in self.operations]}
        if self.tensor_order != "architecture":  # the default stays implicit, as in records made before it existed
            out["tensor_order"] = self.tensor_order
        return out


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
    readers: int = 1  # reader threads per device (a many-core host with fast disks may want more)
    quiet: bool = False
    notices: tuple[str, ...] = ()  # what reading the recipe found worth saying (told when the merge is planned)

    def __post_init__(self) -> None:
        check_finite(self.gradient_start, flag="--gradient_start")
        check_finite(self.gradient_end, flag="--gradient_end")
        check_layer_number(self.layer_start, key="--layer_start")
        check_layer_number(self.layer_end, key="--layer_end")
        for key, nbytes in self.max_memory or ():
            check_device_budget(key, nbytes)
        check_budget_devices(self.device, self.max_memory)
        if self.dtype not in DTYPE_CHOICES:
            raise SpecError(f"--dtype {shown(self.dtype)} is not one of {', '.join(DTYPE_CHOICES)}")
        if isinstance(self.readers, bool) or not isinstance(self.readers, int) or not 1 <= self.readers <= 64:
            raise SpecError(f"--readers must be an integer from 1 to 64, got {shown(self.readers)}")
        if self.method not in METHODS:
            raise SpecError(f"--method {shown(self.method)} is not one of {', '.join(METHODS)}")

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


# ---- sweeps ---------------------------------------------------------------------------------------------------

# The settings a sweep's --grid can vary, each with its kind and the short name variant names use
# (gradient_start=0.25 and gradient_end=0.75 make the variant gs0.25-ge0.75).
GRID_KEYS = {
    "gradient_start": ("number", "gs"), "gradient_end": ("number", "ge"),
    "layer_start": ("integer", "ls"), "layer_end": ("integer", "le"),
    "gradient_values": ("list", "gv"), "layer_only": ("boolean", "lo"), "no_layers": ("boolean", "nl"),
    "custom_filter": ("text", "f"), "method": ("text", "m"),
}
_GRID_ALIASES = {"filter": "custom_filter"}
MAX_GRID_VALUES = 100_000  # values of one --grid key; the product is bounded by --max-variants
DEFAULT_MAX_VARIANTS = 1000


@dataclass(frozen=True, slots=True)
class GridAxis:
    """One --grid KEY=VALUES: a setting and the values it takes, in order."""

    key: str
    values: tuple

    @property
    def short(self) -> str:
        return GRID_KEYS[self.key][1]


def parse_grid(text: str) -> GridAxis:
    """``KEY=V1,V2,...``, ``KEY=START:STOP:N`` (N evenly spaced values, both ends included, numpy.linspace's
    arithmetic) or ``KEY=[JSON list]`` -> a GridAxis with each value checked as its setting takes it."""
    key, sep, values_text = text.partition("=")
    key = key.strip().lstrip("-").replace("-", "_")
    key = _GRID_ALIASES.get(key, key)
    if not sep or key not in GRID_KEYS:
        raise SpecError(f"--grid {shown(text, limit=60)}: give KEY=VALUES with KEY one of {', '.join(GRID_KEYS)} "
                        "(e.g. --grid gradient_end=0:1:5)")
    kind = GRID_KEYS[key][0]
    what = f"--grid {key}"
    values_text = values_text.strip()
    if not values_text:
        raise SpecError(f"{what}= gives no value; e.g. --grid {key}=" + _GRID_EXAMPLES[kind])
    if values_text.startswith("["):
        try:
            raw = json.loads(values_text)
        except (ValueError, RecursionError):
            raise SpecError(f"{what}={shown(values_text, limit=60)} is not a JSON list; e.g. --grid "
                            f"{key}=" + _GRID_EXAMPLES[kind]) from None
        if not isinstance(raw, list) or not raw:
            raise SpecError(f"{what}={shown(values_text, limit=60)} is not a non-empty JSON list")
        if len(raw) > MAX_GRID_VALUES:
            raise SpecError(f"{what} gives {len(raw)} values, more than {MAX_GRID_VALUES}")
        values = [_grid_value(v, kind, what=what) for v in raw]
    elif kind in ("number", "integer") and values_text.count(":") == 2:
        values = _grid_range(values_text, kind, what=what)
    else:
        tokens = [t.strip() for t in values_text.split(",")]
        if len(tokens) > MAX_GRID_VALUES:
            raise SpecError(f"{what} gives {len(tokens)} values, more than {MAX_GRID_VALUES}")
        values = [_grid_token(t, kind, what=what) for t in tokens]
    if key == "method":
        for value in values:
            if value not in METHODS:
                raise SpecError(f"{what}: {shown(value)} is not one of {', '.join(METHODS)}")
    seen: set = set()
    for value in values:
        marker = _grid_marker(value)
        if marker in seen:
            raise SpecError(f"{what} gives {shown(value)} twice; give each value once")
        seen.add(marker)
    return GridAxis(key, tuple(values))


_GRID_EXAMPLES = {"number": "0,0.25,0.5 or 0:1:5", "integer": "8,12,16 or 0:12:4", "boolean": "true,false",
                  "text": "self_attn,mlp", "list": "'[[1, 0.5, 0], [0.2, 0.8]]'"}


def _grid_marker(value):
    """Equal values by their bits (0.0 and -0.0 differ, as their blends may)."""
    if isinstance(value, float):
        return value.hex()
    if isinstance(value, tuple):
        return tuple(_grid_marker(v) for v in value)
    return (type(value).__name__, value)


def _grid_range(text: str, kind: str, *, what: str) -> list:
    start_text, stop_text, count_text = (part.strip() for part in text.split(":"))
    start, stop = (_grid_token(t, "number", what=what) for t in (start_text, stop_text))
    if not re.fullmatch(r"[0-9]{1,9}", count_text, re.ASCII) or not 1 <= int(count_text) <= MAX_GRID_VALUES:
        raise SpecError(f"{what}={text}: START:STOP:N needs N, the number of values, a whole number from 1 to "
                        f"{MAX_GRID_VALUES} (got {shown(count_text)})")
    from gpumerge.schedule import linspace

    values = linspace(start, stop, int(count_text))
    if kind == "integer":
        if not all(float(v).is_integer() for v in values):
            raise SpecError(f"{what}={text} gives values that are not whole numbers "
                            f"({', '.join(f'{v:g}' for v in values[:6])}{', ...' if len(values) > 6 else ''}); "
                            "choose START, STOP and N so that the steps are whole")
        return [check_layer_number(v, key=what) for v in values]
    return [check_finite(v, flag=what) for v in values]


def _grid_token(token: str, kind: str, *, what: str):
    """One comma-separated value as its setting's command-line flag would read it."""
    if not token:
        raise SpecError(f"{what} has an empty value (two commas in a row, or a comma at an end)")
    if kind in ("number", "integer"):
        try:
            number = float(token)
        except ValueError:
            raise SpecError(f"{what}: {shown(token)} is not a number") from None
        return _grid_value(int(number) if kind == "integer" and number.is_integer() and abs(number) < 2**63
                           else number, kind, what=what)
    if kind == "boolean":
        lowered = token.lower()
        if lowered not in ("true", "false"):
            raise SpecError(f"{what}: {shown(token)} is not true or false")
        return lowered == "true"
    if kind == "list":
        return parse_gradient_values(token, what=what)
    return _grid_value(token, kind, what=what)


def _grid_value(value, kind: str, *, what: str):
    """One value of a JSON list (or a parsed token) checked as its setting takes it."""
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"{what}: {shown(value)} is not a number")
        return check_finite(value, flag=what)
    if kind == "integer":
        return check_layer_number(value, key=what)
    if kind == "boolean":
        if not isinstance(value, bool):
            raise SpecError(f"{what}: {shown(value)} is not true or false")
        return value
    if kind == "list":
        return parse_gradient_values(value if isinstance(value, list) else [value] if isinstance(value, (int, float))
                                     and not isinstance(value, bool) else value, what=what)
    if not isinstance(value, str) or not value or "\0" in value:
        raise SpecError(f"{what}: {shown(value)} is not a non-empty string")
    return value


def grid_size(axes: list[GridAxis]) -> int:
    return math.prod(len(axis.values) for axis in axes)


# The merge flags a sweep's variants share (as `gpumerge sweep` takes them), besides the pair and the output.
SWEEP_SHARED_FLAGS = ("gradient_start", "gradient_end", "layer_start", "layer_end", "gradient_values", "layer_only",
                      "no_layers", "custom_filter", "method", "tensor_order", "max_shard_size", "dtype", "device",
                      "max_memory", "readers", "allow_nonfinite")


@dataclass(frozen=True, slots=True)
class SweepSpec:
    """A sweep, as `gpumerge sweep` runs it: one pair, the settings every variant shares, the variants (a grid, or a
    settings file), and for an evaluated sweep how the variants are scored. Built from the command line's flags by
    the CLI (``from_flags``), or by keyword from Python::

        SweepSpec(model_path1="A", model_path2="B", output_dir="runs", grid={"gradient_end": [0, 0.5, 1]},
                  shared={"dtype": "bfloat16"}, eval_text=["wiki.txt"], eval_tokens=4096)

    ``grid``: ``KEY=VALUES`` strings as --grid takes them, or a mapping KEY -> list of values; ``shared``: other
    merge settings every variant shares (SWEEP_SHARED_FLAGS). Values are checked where the sweep checks them."""

    model_path1: str | None = None
    model_path2: str | None = None
    output_dir: str | Path | None = None
    grid: tuple[str, ...] = ()
    settings: str | Path | None = None  # a YAML list of variants, instead of a grid
    config: str | Path | None = None  # a recipe every grid variant starts from
    shared: tuple[tuple[str, object], ...] = ()
    max_variants: int | None = None
    eval_text: tuple[Path, ...] = ()
    eval_tokens: int | None = None
    seq_len: int | None = None
    eval_batch: int | None = None
    keep: int | str | None = None
    baselines: bool = True
    eval_dtype: str | None = None
    overwrite: bool = False
    checksums: bool = False
    quiet: bool = True
    search: str | None = None  # "optuna": trials chosen by a sampler instead of a grid (gpumerge.search)
    trials: int | None = None
    space: tuple[str, ...] = ()  # --space SPEC strings (gpumerge.space)
    sampler: str | None = None  # tpe (default) or cmaes
    seed: int | None = None
    scorers: str | Path | None = None  # a search's scorer file (gpumerge.scorers); default: perplexity

    def __post_init__(self) -> None:
        object.__setattr__(self, "space", (self.space,) if isinstance(self.space, str) else tuple(self.space or ()))
        grid = self.grid
        if isinstance(grid, str):
            grid = (grid,)
        elif isinstance(grid, dict):
            grid = tuple(f"{key}={json.dumps(list(values))}" for key, values in grid.items())
        object.__setattr__(self, "grid", tuple(grid))
        shared = dict(self.shared)
        unknown = sorted(set(shared) - set(SWEEP_SHARED_FLAGS))
        if unknown:
            raise SpecError(f"SweepSpec shared: {', '.join(map(str, unknown))} is not a merge setting a sweep's "
                            f"variants share; use {', '.join(SWEEP_SHARED_FLAGS)}")
        object.__setattr__(self, "shared", tuple(sorted(shared.items())))
        texts = self.eval_text
        texts = (texts,) if isinstance(texts, (str, Path)) else tuple(texts or ())
        object.__setattr__(self, "eval_text", tuple(Path(t) for t in texts))

    def flags(self) -> dict:
        """The flags `gpumerge sweep` would have for this sweep (flag name -> value; None: not given)."""
        flags = {key: None for key in SWEEP_SHARED_FLAGS}
        flags.update(dict(self.shared))
        flags.update(model_path1=self.model_path1, model_path2=self.model_path2,
                     output_dir=str(self.output_dir) if self.output_dir is not None else None,
                     grid=list(self.grid) or None, settings=Path(self.settings) if self.settings is not None else None,
                     config=Path(self.config) if self.config is not None else None, max_variants=self.max_variants,
                     eval_text=list(self.eval_text) or None, eval_tokens=self.eval_tokens, seq_len=self.seq_len,
                     eval_batch=self.eval_batch, keep=self.keep, no_baselines=not self.baselines,
                     eval_dtype=self.eval_dtype, overwrite=self.overwrite, checksums=self.checksums,
                     quiet=self.quiet, search=self.search, trials=self.trials, space=list(self.space) or None,
                     sampler=self.sampler, seed=self.seed,
                     scorers=Path(self.scorers) if self.scorers is not None else None)
        return flags

    @classmethod
    def from_flags(cls, flags: dict) -> "SweepSpec":
        """The sweep a command line's flags (as a dict: flag name -> value) ask for."""
        shared = {key: flags[key] for key in SWEEP_SHARED_FLAGS  # a store_true flag not given is False or None
                  if flags.get(key) is not None and flags.get(key) is not False}
        return cls(model_path1=flags.get("model_path1"), model_path2=flags.get("model_path2"),
                   output_dir=flags.get("output_dir"), grid=tuple(flags.get("grid") or ()),
                   settings=flags.get("settings"), config=flags.get("config"), shared=shared,
                   max_variants=flags.get("max_variants"), eval_text=tuple(flags.get("eval_text") or ()),
                   eval_tokens=flags.get("eval_tokens"), seq_len=flags.get("seq_len"),
                   eval_batch=flags.get("eval_batch"), keep=flags.get("keep"),
                   baselines=not flags.get("no_baselines"), eval_dtype=flags.get("eval_dtype"),
                   overwrite=bool(flags.get("overwrite")), checksums=bool(flags.get("checksums")),
                   quiet=bool(flags.get("quiet")), search=flags.get("search"), trials=flags.get("trials"),
                   space=tuple(flags.get("space") or ()), sampler=flags.get("sampler"), seed=flags.get("seed"),
                   scorers=flags.get("scorers"))
