"""Placing a pair bigger than one GPU: the live model and the resident A and B inputs split by layer across a
process's GPUs.

An evaluated sweep holds three copies of the blended tensors: the live model, and A's and B's inputs. A decoder block
and its inputs always share a GPU, so blending a block is GPU-local. Units are placed in model order, whole, filling
cuda:0, then cuda:1, ... (accelerate's sequential placement); the result is an accelerate device map for
``accelerate.dispatch_model(model, device_map=...)``.

Pure data: the budgets are passed in (probed by ``devices``, or made up by a test), and nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Sequence

from gpumerge.errors import SpecError
from gpumerge.schedule import layer_index
from gpumerge.spec import shown, shown_names

# Output heads, placed after the final norm (GPT-NeoX calls its head embed_out: a head, not an embedding).
_HEADS = ("lm_head", "embed_out")
_EMBEDDINGS = ("wte", "wpe")
ADVICE = ("use more GPUs per process (--gpus-per-process) and fewer processes, GPUs with more memory, or a smaller "
          "--eval-batch for the forward pass")


@dataclass(frozen=True, slots=True)
class Placement:
    """Where each unit lives. ``device_map``: unit name -> ``"cuda:K"`` (accelerate's form); ``used``: resident bytes
    of the units on each device that holds any, in device order; ``reserved_bytes``: what each of those devices
    keeps free besides (the forward pass and the margin)."""

    device_map: dict[str, str]
    used: dict[str, int]
    reserved_bytes: int = 0

    @property
    def devices(self) -> list[str]:
        return list(self.used)

    def device_of(self, name: str) -> str:
        """The device of a tensor or module: the map's entry for its longest prefix (accelerate's rule)."""
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            device = self.device_map.get(".".join(parts[:end]))
            if device is not None:
                return device
        raise KeyError(f"{name} is under no unit of the device map")

    def describe(self) -> str:
        """One line: ``cuda:0 embed_tokens, layers 0-13 (72.8 GiB); cuda:1 layers 14-28 (71.7 GiB); ...``."""
        return "; ".join(f"{device} {_contents(self.device_map, device)} ({_size(nbytes)})"
                         for device, nbytes in self.used.items())


def _size(nbytes: int) -> str:
    """``61.2 GiB``; below a GiB ``12.0 MiB``, below a MiB ``4096 bytes``."""
    if nbytes >= 2**30:
        return f"{nbytes / 2**30:.1f} GiB"
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def unit_of(name: str) -> str:
    """The unit a tensor belongs to: its decoder block (``model.layers.12.mlp.up_proj.weight`` -> ``model.layers.12``),
    else its module (``model.embed_tokens.weight`` -> ``model.embed_tokens``; a name without a dot is its own)."""
    layer = layer_index(name)
    parts = name.split(".")
    if layer is not None:
        for end in range(1, len(parts)):
            if layer_index(".".join(parts[:end]) + ".") == layer:
                return ".".join(parts[:end])
    return ".".join(parts[:-1]) or name


def units_of(tensor_bytes: Mapping[str, int], blended: Collection[str] | None = None) -> list[tuple[str, int]]:
    """(unit, resident bytes) in model order: embeddings, blocks by index, the rest (final norm, ...), the head.
    A tensor costs its live bytes, and twice more (A's and B's inputs) when it is in ``blended`` (None: all)."""
    units: dict[str, int] = {}
    for name, nbytes in tensor_bytes.items():
        copies = 3 if blended is None or name in blended else 1
        unit = unit_of(name)
        units[unit] = units.get(unit, 0) + copies * nbytes
    first = {unit: k for k, unit in enumerate(units)}
    return sorted(units.items(), key=lambda item: (*_rank(item[0]), first[item[0]]))


def _rank(unit: str) -> tuple[int, int]:
    layer = layer_index(unit + ".")
    if layer is not None:
        return 1, layer
    last = unit.rsplit(".", 1)[-1]
    if unit in _HEADS:
        return 3, 0
    if "embed" in last or last in _EMBEDDINGS:
        return 0, 0
    return 2, 0


def place_by_layer(units: Sequence[tuple[str, int]], budgets: Mapping[str | int, int], *, forward_bytes: int = 0,
                   reserve_bytes: int = 0, tied: Sequence[Sequence[str]] = (), advice: str = ADVICE) -> Placement:
    """Units (name, resident bytes), in model order, on the devices of ``budgets`` (``{"cuda:0": bytes, ...}`` or
    accelerate's ``{0: bytes, ...}``; sorted by index): whole and in order, filling each device before the next.
    Each device that holds a unit keeps ``forward_bytes + reserve_bytes`` free.

    ``tied``: groups of module names sharing storage (``[["model.embed_tokens", "lm_head"]]``): every member goes
    on the device of the group's first unit in ``units`` order, and only that unit's bytes count (a member not in
    ``units``, like the lm_head of a checkpoint that stores only the embedding, is added to the map there).

    A pair that does not fit raises one SpecError naming what it needs and what the budgets give."""
    budget = _budgets(budgets)
    _check_units(units, forward_bytes, reserve_bytes)
    leader = _leaders(units, tied)
    reserved = forward_bytes + reserve_bytes
    capacity = {device: nbytes - reserved for device, nbytes in budget.items()}
    found = _fill(units, list(capacity.values()), leader)
    if found is None:
        raise _not_fitting(units, budget, reserved, leader, advice)
    devices = list(capacity)
    device_map = {name: devices[k] for name, k in found.items()}
    for group in tied:
        for name in group:
            device_map.setdefault(name, device_map[_first(group, units)])
    used: dict[str, int] = {}
    for name, nbytes in units:
        device = device_map[name]
        used[device] = used.get(device, 0) + (0 if name in leader else nbytes)
    return Placement(device_map, dict(sorted(used.items(), key=lambda kv: _device_key(kv[0]))), reserved)


def _fill(units: Sequence[tuple[str, int]], capacities: list[int], leader: dict[str, str]) -> dict[str, int] | None:
    """Unit -> device index, filling the devices in order (a tied member follows its group's first unit), or None
    when the devices run out."""
    found: dict[str, int] = {}
    device, free = 0, capacities[0]
    for name, nbytes in units:
        if name in leader:
            found[name] = found[leader[name]]
            continue
        while nbytes > free:
            device += 1
            if device == len(capacities):
                return None
            free = capacities[device]
        found[name] = device
        free -= nbytes
    return found


def _leaders(units: Sequence[tuple[str, int]], tied: Sequence[Sequence[str]]) -> dict[str, str]:
    """Tied unit -> the first unit of its group in model order (which alone is counted)."""
    names = [name for name, _ in units]
    leader: dict[str, str] = {}
    for group in tied:
        members = [name for name in names if name in set(group)]
        if not members:
            raise SpecError(f"tied weights {shown_names(group)} name no unit of the model to place")
        for name in members[1:]:
            leader[name] = members[0]
    return leader


def _first(group: Sequence[str], units: Sequence[tuple[str, int]]) -> str:
    return next(name for name, _ in units if name in set(group))


def _budgets(budgets: Mapping[str | int, int]) -> dict[str, int]:
    """``{"cuda:K" or K: bytes}`` -> ``{"cuda:K": bytes}`` sorted by index."""
    found: dict[str, int] = {}
    for key, nbytes in budgets.items():
        device = f"cuda:{key}" if isinstance(key, int) and not isinstance(key, bool) else key
        if not isinstance(device, str) or _device_key(device) is None:
            raise SpecError(f"a GPU budget's device must be cuda:K or K, got {shown(key)}")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise SpecError(f"the budget of {device} must be a whole number of bytes, got {shown(nbytes)}")
        if device in found:
            raise SpecError(f"the GPU budgets name {device} twice")
        found[device] = nbytes
    if not found:
        raise SpecError("no GPU budget to place the pair on: this process owns no GPU")
    return dict(sorted(found.items(), key=lambda kv: _device_key(kv[0])))


def _device_key(device: str) -> int | None:
    """``"cuda:K"`` -> K; anything else (the CPU included: this places on GPUs) -> None."""
    prefix, _, index = device.partition(":")
    return int(index) if prefix == "cuda" and index.isdigit() else None


def _check_units(units: Sequence[tuple[str, int]], forward_bytes: int, reserve_bytes: int) -> None:
    for what, value in (("forward_bytes", forward_bytes), ("reserve_bytes", reserve_bytes),
                        *((name, nbytes) for name, nbytes in units)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SpecError(f"{what} must be a whole number of bytes, got {shown(value)}")
    names = [name for name, _ in units]
    if len(set(names)) != len(names):
        raise SpecError(f"units named twice: {shown_names(sorted({n for n in names if names.count(n) > 1}))}")


def _not_fitting(units: Sequence[tuple[str, int]], budget: dict[str, int], reserved: int, leader: dict[str, str],
                 advice: str) -> SpecError:
    """One line: a unit no GPU can hold, or the whole pair against the budgets with the GPUs it would need."""
    counted = [(name, nbytes) for name, nbytes in units if name not in leader]
    largest = max(budget.values())
    head = "the pair does not fit the GPUs of this process: "
    if largest <= reserved:
        return SpecError(f"{head}{_given(budget)}, no more than the {_size(reserved)} each GPU keeps for the forward "
                         f"pass and margin; {advice}")
    each = f", less {_size(reserved)} each for the forward pass and margin" if reserved else ""
    too_big = [f"{name} ({_size(nbytes)})" for name, nbytes in counted if nbytes > largest - reserved]
    if too_big:
        verb = "needs" if len(too_big) == 1 else "each need"
        return SpecError(f"{head}{shown_names(too_big, limit=3)} alone {verb} more than one GPU holds "
                         f"({_given(budget)}{each}), and a unit (a decoder block with its A and B inputs) is never "
                         f"split across GPUs; {advice}")
    total = sum(nbytes for _, nbytes in counted)
    need = len(set(_fill(units, [largest - reserved] * len(units), leader).values()))
    forward = f" (+ {_size(reserved)} per GPU for the forward pass and margin)" if reserved else ""
    return SpecError(f"{head}the live model and the resident A and B inputs need {_size(total)}{forward}, and "
                     f"{_given(budget)}; placed whole and in order they need {need} GPUs of {_size(largest)}; {advice}")


def _given(budget: dict[str, int]) -> str:
    """``cuda:0..cuda:7 give 8 x 76.0 GiB``, ``cuda:0 gives 76.0 GiB``, ``cuda:0, cuda:2 give 40.0 + 76.0 GiB``."""
    devices = list(budget)
    if len(devices) == 1:
        return f"{devices[0]} gives {_size(budget[devices[0]])}"
    indices = [_device_key(d) for d in devices]
    consecutive = indices == list(range(indices[0], indices[-1] + 1))
    names = f"{devices[0]}..{devices[-1]}" if consecutive else ", ".join(devices)
    sizes = set(budget.values())
    each = f"{len(devices)} x {_size(sizes.pop())}" if len(sizes) == 1 else " + ".join(map(_size, budget.values()))
    return f"{names} give {each}"


def _contents(device_map: dict[str, str], device: str) -> str:
    """``embed_tokens, layers 0-13`` for the units on one device: block ranges, other modules by their last name."""
    names = [name for name, where in device_map.items() if where == device]
    layers = sorted(layer for layer in (layer_index(name + ".") for name in names) if layer is not None)
    parts = [name.rsplit(".", 1)[-1] for name in names if layer_index(name + ".") is None]
    ranges: list[list[int]] = []
    for layer in layers:
        if ranges and layer == ranges[-1][1] + 1:
            ranges[-1][1] = layer
        else:
            ranges.append([layer, layer])
    if ranges:
        text = ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in ranges)
        parts.insert(_layers_at(names), f"layer{'s' if len(layers) > 1 else ''} {text}")
    return ", ".join(parts)


def _layers_at(names: list[str]) -> int:
    """Where the block ranges go among the other names: after the modules that come before the first block."""
    first = next(k for k, name in enumerate(names) if layer_index(name + ".") is not None)
    return sum(1 for name in names[:first] if layer_index(name + ".") is None)


def process_gpu_groups(visible: int, num_processes: int, gpus_per_process: int | None, local_rank: int) -> list[int]:
    """The visible GPU indices process ``local_rank`` (of ``num_processes`` on this machine) owns: ``[k*g, (k+1)*g)``,
    g = ``--gpus-per-process`` or ``visible // num_processes`` (at least 1). No GPU visible: ``[]`` (the CPU)."""
    if gpus_per_process is not None and (isinstance(gpus_per_process, bool) or not isinstance(gpus_per_process, int)
                                         or gpus_per_process < 1):
        raise SpecError(f"--gpus-per-process must be a whole number of 1 or more, got {shown(gpus_per_process)}")
    if num_processes < 1 or not 0 <= local_rank < num_processes:
        raise SpecError(f"process {local_rank} of {num_processes} on this machine: a local rank runs from 0 to the "
                        "number of processes less one")
    if visible == 0:
        if gpus_per_process is not None:
            raise SpecError(f"--gpus-per-process {gpus_per_process}: no GPU is visible to this run; drop it to score "
                            "on the CPU")
        return []
    per = gpus_per_process or max(1, visible // num_processes)
    if num_processes * per > visible:
        raise SpecError(_too_few_gpus(visible, num_processes, gpus_per_process, per))
    return list(range(local_rank * per, (local_rank + 1) * per))


def _too_few_gpus(visible: int, num_processes: int, asked: int | None, per: int) -> str:
    names = f"cuda:0..cuda:{visible - 1}" if visible > 1 else "cuda:0"
    have = f"{visible} {'is' if visible == 1 else 'are'} visible ({names})"
    if asked is None:
        return (f"{num_processes} processes on this machine need a GPU each, and {have}; launch at most {visible} "
                f"(accelerate launch --num_processes {visible}), or score on the CPU (--device cpu)")
    if per > visible:
        return f"--gpus-per-process {asked} asks for {asked} GPUs per process, and {have}; give {visible} or fewer"
    fewer = f"--gpus-per-process {visible // num_processes}, or " if visible // num_processes else ""
    return (f"--gpus-per-process {asked} with {num_processes} processes on this machine asks for "
            f"{num_processes * per} GPUs, and {have}; give {fewer}launch at most {visible // per} processes")
