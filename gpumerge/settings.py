"""The merge a set of flags asks for: the command line's (cli.py hands its flags over as a dict) or a sweep's
variant, with a recipe file's settings under them. No argparse here: cli.py is the only module that knows the parser.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gpumerge.errors import SpecError
from gpumerge.spec import (MergeSpec, OperationsRecipe, TensorOperation, check_tensor_order, parse_device,
                           parse_dtype, parse_gradient_values, parse_max_memory, parse_size)


_WINDOW_FLAGS = ("gradient_start", "gradient_end", "layer_start", "layer_end")
_DEFAULTS = {"gradient_start": 0.0, "gradient_end": 1.0, "layer_start": 0, "layer_end": 99,
             "max_shard_size": "2000MiB", "device": "auto", "method": "lerp"}


def recipe_settings(path: Path) -> dict:
    """A --config file read and parsed: a gpumerge recipe or a two-model mergekit config."""
    from gpumerge import fsutil
    from gpumerge.recipes import is_mergekit_config, load_yaml, parse_recipe
    from gpumerge.spec import MAX_RECIPE_BYTES, check_home

    what = f"--config {path}"
    check_home(path, what=what)
    raw = fsutil.read_regular(path.expanduser(), max_bytes=MAX_RECIPE_BYTES, what=what, error=SpecError)
    data = load_yaml(fsutil.decode_text(raw, what=what, error=SpecError), source=str(path))
    if is_mergekit_config(data):
        from gpumerge.mergekit import parse_mergekit

        return parse_mergekit(data, source=str(path))
    return parse_recipe(data, source=str(path))


_NOT_SETTINGS = ("config", "plot", "report", "checksums", "output_dir", "grid", "settings", "max_variants", "eval_text",
                 "eval_tokens", "seq_len", "eval_batch", "keep", "no_baselines", "eval_dtype")


def merge_spec(flags: dict, *, output_required: bool = True, recipe: tuple[dict, str] | None = None) -> MergeSpec:
    """The merge ``flags`` (flag name -> value, None for a flag not given) ask for. ``recipe``: settings already
    read from a recipe (a sweep's --config, read once, or one entry of its settings file) and where they come from,
    in place of reading ``flags["config"]``."""
    if recipe is None and flags.get("config") is not None:
        recipe = (recipe_settings(flags["config"]), str(flags["config"]))
    settings, source = (dict(recipe[0]), recipe[1]) if recipe is not None else ({}, None)
    given = {k: v for k, v in flags.items() if v is not None and k not in _NOT_SETTINGS}
    window = [f"--{k}" for k in _WINDOW_FLAGS if k in given]
    if "method" in given and hasattr(settings.get("recipe"), "config"):
        raise SpecError("--method does not apply to a mergekit config: its merge_method says how to blend")
    if "gradient_values" in given:
        window += [k for k in _WINDOW_FLAGS if k in settings]
        if window:
            raise SpecError(f"--gradient_values replaces {', '.join(window)}; give one or the other")
        if settings.get("recipe") is not None:
            raise SpecError("--gradient_values and the recipe in --config both say how to blend; give one")
        settings["recipe"] = OperationsRecipe((TensorOperation(
            parse_gradient_values(given["gradient_values"]), layer_only=bool(given.get("layer_only")),
            no_layers=bool(given.get("no_layers")), filter=given.get("custom_filter")),))
    elif any(k in given for k in ("layer_only", "no_layers", "custom_filter")):
        if settings.get("recipe") is not None:
            raise SpecError("--layer_only, --no_layers and --custom_filter cannot change the recipe in --config; "
                            "set layer_only, no_layers or filter there")
        raise SpecError("--layer_only, --no_layers and --custom_filter select tensors for --gradient_values; "
                        "give --gradient_values too")
    if window and settings.get("recipe") is not None:
        raise SpecError(f"{', '.join(window)} cannot change the recipe in --config (it has no layer window)")
    if "tensor_order" in given:
        if not isinstance(settings.get("recipe"), OperationsRecipe):
            raise SpecError("--tensor_order says how --gradient_values (or an operations recipe) counts tensor "
                            "positions; give one of those too")
        settings["recipe"] = dataclasses.replace(settings["recipe"], tensor_order=check_tensor_order(
            given["tensor_order"]))
    for key, value in given.items():  # the command line wins over the recipe
        if key in _WINDOW_FLAGS or key in ("model_path1", "model_path2", "output_model_path", "max_shard_size",
                                           "dtype", "device", "method", "max_memory"):
            settings[key] = value
    merged = {**_DEFAULTS, **settings}
    for key in ("model_path1", "model_path2") + (("output_model_path",) if output_required else ()):
        if not merged.get(key):
            raise SpecError(f"--{key} is required (on the command line or in a --config recipe)")
    dtype = parse_dtype(str(merged["dtype"])) if merged.get("dtype") is not None else "float16"
    max_memory = merged.get("max_memory")

    def origin(key: str) -> str:  # where a bad value came from: the command line or the recipe file
        return f"--{key}" if key in given or source is None else f"{source}: {key}"

    from gpumerge.spec import check_home

    for key in ("model_path1", "model_path2", "output_model_path"):
        if merged.get(key):
            check_home(merged[key], what=f"{origin(key)} {merged[key]}")

    spec = MergeSpec(
        model_path1=str(merged["model_path1"]),
        model_path2=str(merged["model_path2"]),
        output_model_path=Path(merged["output_model_path"]) if merged.get("output_model_path") else None,
        gradient_start=_number(merged["gradient_start"], float, origin("gradient_start")),
        gradient_end=_number(merged["gradient_end"], float, origin("gradient_end")),
        layer_start=_number(merged["layer_start"], int, origin("layer_start")),
        layer_end=_number(merged["layer_end"], int, origin("layer_end")),
        max_shard_bytes=parse_size(merged["max_shard_size"], what=origin("max_shard_size")),
        max_shard_size=str(merged["max_shard_size"]),
        dtype=dtype,
        dtype_was_default=merged.get("dtype") is None,
        recipe=merged.get("recipe"),
        method=str(merged["method"]),
        device=parse_device(str(merged["device"])),
        max_memory=tuple(sorted(parse_max_memory(str(max_memory)).items(), key=str)) if max_memory else None,
        overwrite=bool(flags.get("overwrite")),
        allow_nonfinite=bool(flags.get("allow_nonfinite")),
        readers=flags["readers"] if flags.get("readers") is not None else 1,
        quiet=bool(flags.get("quiet")),
        notices=tuple(settings.get("notices", ())),
    )
    from gpumerge.devices import check_without_torch

    check_without_torch(spec.device, spec.max_memory)  # what the merge would refuse here; `gpumerge plan` too
    return spec


def _number(value, kind, key: str):
    """A recipe's or the command line's number: a finite float, or a block number (an integer within bounds)."""
    from gpumerge.spec import check_finite, check_layer_number, shown

    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {shown(value)}")
    return check_layer_number(value, key=key) if kind is int else check_finite(value, flag=key)


