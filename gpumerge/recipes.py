"""Recipe files: gpumerge's YAML recipes (the BlockMerge YAML edition's operations, layer_gradients, every
command-line setting) and the dispatch to mergekit configs. YAML in, MergeSpec keyword arguments out; no file I/O
(the caller reads the file with gpumerge.fsutil).

Apart from gpumerge.spec (the frozen specs and value parsers) so that the imports run one way:
spec <- schedule/rules <- mergekit <- recipes.
"""

from __future__ import annotations

import dataclasses
import functools
import re

from gpumerge.errors import SpecError
from gpumerge.mergekit import parse_mergekit
from gpumerge.spec import (MAX_RECIPE_DEPTH, MAX_RECIPE_ITEMS, LayerGradientsRecipe, OperationsRecipe, TensorOperation,
                           check_tensor_order, parse_gradient_values, shown, shown_names)

# ---- YAML recipes ---------------------------------------------------------------------------------------------

# Keys of gpumerge's recipe format: the original YAML edition's (model_path1, model_path2, output_model_path,
# max_shard_size, operations) plus every command-line setting, so a merge's record can be re-run as it is.
RECIPE_KEYS = ("mergekit", "model_path1", "model_path2", "output_model_path", "max_shard_size", "dtype", "device",
               "method", "gradient_start", "gradient_end", "layer_start", "layer_end", "gradient_values", "layer_only",
               "no_layers", "filter", "custom_filter", "operations", "layer_gradients", "max_memory", "tensor_order")
OPERATION_KEYS = ("operation", "filter", "gradient_values", "layer_only", "no_layers")
MERGEKIT_MARKERS = ("merge_method", "slices", "models")


# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot (1e-3, 1E5) or without a
# sign (2.5e3); YAML 1.1 itself reads only the likes of 2.5e+3.
_YAML12_FLOAT = re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$", re.ASCII)


@functools.cache
def recipe_loader(base: type | None = None) -> type:
    """A safe loader (libyaml's CSafeLoader when present: long lists parse fast) that reads 1e-3 as a float, as
    YAML 1.2, JSON and mergekit's users expect, and refuses a key given twice in one mapping."""
    import yaml

    class RecipeLoader(base or getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
        def flatten_mapping(self, node) -> None:  # every mapping passes here before its << keys are merged in
            _refuse_duplicate_keys(self, node)
            super().flatten_mapping(node)

    return _with_yaml12_floats(RecipeLoader)


@functools.cache
def recipe_dumper() -> type:
    """A safe dumper that knows the YAML 1.2 floats recipe_loader reads: it quotes the string "1e10" (a model
    directory, a filter) that PyYAML's own dumper would write bare, and that would then come back as a float."""
    import yaml

    return _with_yaml12_floats(type("RecipeDumper", (yaml.SafeDumper,), {}))


def _with_yaml12_floats(cls: type) -> type:
    cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))
    return cls


def _refuse_duplicate_keys(loader, node) -> None:
    """A mapping's own keys (merge keys ``<<`` aside) must differ: PyYAML would keep the last one silently."""
    import yaml

    if getattr(loader, "_unique_checked", None) is None:
        loader._unique_checked = set()
    if id(node) in loader._unique_checked:  # a merged-in mapping is flattened again when it is itself built
        return
    loader._unique_checked.add(id(node))
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key)} appears twice in one "
                                                    "mapping; keep one", key_node.start_mark)
        seen.add(key)


def load_yaml(text: str, *, source: str, mapping: bool = True):
    """A recipe file's YAML, checked (check_tree); a mapping unless ``mapping=False`` (a sweep's list of variants)."""
    import yaml

    try:
        data = yaml.load(text, Loader=recipe_loader())  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise SpecError(f"{source}: not valid YAML{at}: {getattr(exc, 'problem', None) or exc}") from None
    except (ValueError, OverflowError, TypeError) as exc:  # a bad date, an integer of over 4300 digits, ...
        raise SpecError(f"{source}: not valid YAML: {shown(str(exc), limit=120)}") from None
    except RecursionError:
        raise SpecError(f"{source}: not valid YAML: nested too deeply") from None
    check_tree(data, source=source)
    if mapping and not isinstance(data, dict):
        raise SpecError(f"{source}: a recipe is a YAML mapping of settings (got {type(data).__name__})")
    return data


def check_tree(data, *, source: str) -> None:
    """YAML aliases make a document a graph: refuse a cycle (``t: &a [*a]``), nesting deeper than
    MAX_RECIPE_DEPTH and a size past MAX_RECIPE_ITEMS with every alias expanded (the "billion laughs"). One pass
    over the distinct containers, each one's expanded size and height memoized by id, so it takes linear time."""
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded items, height)
    open_ids: set[int] = set()  # containers on the current path: meeting one again is a cycle
    stack: list[tuple[object, bool]] = [(data, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        children = _children(node)
        if finished:
            open_ids.discard(key)
            sizes = [done[id(c)] if _children(c) is not None else (_leaf_items(c), 0) for c in children]
            done[key] = (1 + sum(s for s, _ in sizes), 1 + max((h for _, h in sizes), default=0))
            continue
        if children is None or key in done:
            continue
        if key in open_ids:
            raise SpecError(f"{source}: a recursive alias (an anchor used inside its own value, like "
                            "`t: &a [*a]`) makes an endless value; write the value out")
        open_ids.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if _children(c) is not None and id(c) not in done)
    items, height = done.get(id(data), (_leaf_items(data), 0))
    if height > MAX_RECIPE_DEPTH:
        raise SpecError(f"{source}: is nested {height} levels deep, more than the {MAX_RECIPE_DEPTH} a recipe can "
                        "sensibly need; flatten it")
    if items > MAX_RECIPE_ITEMS:
        raise SpecError(f"{source}: expands to more than {MAX_RECIPE_ITEMS} values and characters once its aliases "
                        "(*name) are expanded; a recipe is a few settings: write them out without nested aliases")


def _children(node) -> list | None:
    """A container's members (a mapping's keys and values), or None for a scalar."""
    if isinstance(node, dict):
        return [*node.keys(), *node.values()]
    if isinstance(node, (list, tuple, set, frozenset)):
        return list(node)
    return None


def _leaf_items(value) -> int:
    return 1 + (len(value) if isinstance(value, (str, bytes)) else 0)


def is_mergekit_config(data: dict) -> bool:
    return any(key in data for key in MERGEKIT_MARKERS)


def _unknown(keys, allowed, *, where: str) -> None:
    unknown = [k for k in keys if k not in allowed]
    if unknown:
        raise SpecError(f"{where}: unknown key(s) {shown_names(unknown)} (known: {', '.join(allowed)})")


def _bool(value, *, key: str, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: {key} must be true or false, got {shown(value)}")
    return value


def parse_recipe(data: dict, *, source: str) -> dict:
    """gpumerge's YAML recipe -> MergeSpec keyword arguments (strings still to be checked by their parsers)."""
    _unknown(data, RECIPE_KEYS, where=source)
    for key in ("model_path1", "model_path2", "output_model_path", "max_shard_size", "dtype", "device", "method",
                "max_memory"):
        allowed = (str, int) if key == "max_shard_size" else (str,)
        if key in data and (not isinstance(data[key], allowed) or isinstance(data[key], bool)):
            raise SpecError(f"{source}: {key} must be a string, got {shown(data[key])}")
        if key in data and "\0" in str(data[key]):
            raise SpecError(f"{source}: {key} {shown(data[key])} contains a NUL character, which no path or setting "
                            "can hold")
    if "mergekit" in data:  # a merge record of a mergekit config: its settings around the config itself
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
    notices: list[str] = []
    if "gradient_values" in data:
        op = _operation({k: data[k] for k in ("gradient_values", "layer_only", "no_layers", "filter",
                                              "custom_filter") if k in data}, source=source, label=None,
                        notices=notices)
        out["recipe"] = OperationsRecipe((op,))
    elif any(k in data for k in ("layer_only", "no_layers", "filter", "custom_filter")):
        raise SpecError(f"{source}: layer_only, no_layers and filter select tensors for gradient_values")
    if "operations" in data:
        ops = data["operations"]
        if not isinstance(ops, list) or not ops:
            raise SpecError(f"{source}: operations must be a non-empty list")
        out["recipe"] = OperationsRecipe(tuple(
            _operation(op, source=source, label=f"{source}: operations[{i}]", notices=notices)
            for i, op in enumerate(ops)))
    if "layer_gradients" in data:
        modules = data["layer_gradients"]
        if not isinstance(modules, dict) or not modules:
            raise SpecError(f"{source}: layer_gradients must map module names (or default) to lists of values")
        out["recipe"] = LayerGradientsRecipe(tuple(
            (_module_key(key, source=source), parse_gradient_values(value, what=f"{source}: layer_gradients.{key}"))
            for key, value in modules.items()))
    if "tensor_order" in data:
        if not isinstance(out.get("recipe"), OperationsRecipe):
            raise SpecError(f"{source}: tensor_order says how gradient_values and operations count tensor positions; "
                            "this recipe has neither")
        out["recipe"] = dataclasses.replace(out["recipe"], tensor_order=check_tensor_order(
            data["tensor_order"], what=f"{source}: tensor_order"))
    if notices:
        out["notices"] = tuple(notices)
    return out


def _module_key(key, *, source: str) -> str:
    if not isinstance(key, str) or not key:
        raise SpecError(f"{source}: layer_gradients keys are module names (substrings of tensor names) or default, "
                        f"got {shown(key)}")
    return key


def _operation(entry, *, source: str, label: str | None, notices: list[str]) -> TensorOperation:
    """One operation. layer_only and no_layers together: the original YAML edition's if/elif lets layer_only win, and
    shared recipe files rely on it, so a recipe file is accepted with a notice (the command line refuses the pair)."""
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
        raise SpecError(f"{where}: filter must be a string, got {shown(substring)}")
    name = entry.get("operation")
    if name is not None and not isinstance(name, (str, int, float)):
        raise SpecError(f"{where}: operation is a name (a string), got {shown(name)}")
    layer_only = _bool(entry.get("layer_only", False), key="layer_only", where=where)
    no_layers = _bool(entry.get("no_layers", False), key="no_layers", where=where)
    if layer_only and no_layers:
        notices.append(f"{where}: layer_only and no_layers are both set; as in the original YAML edition, "
                       "layer_only wins and no_layers is ignored")
        no_layers = False
    return TensorOperation(
        gradient_values=parse_gradient_values(entry["gradient_values"], what=f"{where}: gradient_values"),
        layer_only=layer_only,
        no_layers=no_layers,
        filter=substring or None,
        label=str(name) if name is not None else None,
    )
