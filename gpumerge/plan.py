"""make_plan: every check that needs no tensor bytes, the output dtype, and the output layout with byte offsets.

Pure data in, pure data out: checkpoints are passed in as indexes (names, dtypes, shapes); nothing is read or
written here, so planning a 70B merge takes milliseconds and can be tested with made-up indexes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from gpumerge import schedule
from gpumerge.checkpoint import DTYPE_NAMES, FLOAT_CODES, ITEMSIZE, TensorInfo
from gpumerge.errors import IncompatibleCheckpointsError, SpecError
from gpumerge.spec import DTYPE_CODES, MergeSpec

# How far each float dtype reaches; a cast to a shorter reach can overflow to inf.
_RANGE_RANK = {"F16": 0, "BF16": 1, "F32": 2, "F64": 3}
# Config keys whose difference does not change shapes but makes a blend meaningless or suspicious.
_CONFIG_KEYS_TO_COMPARE = ("model_type", "architectures", "vocab_size", "hidden_act", "rope_theta", "rope_scaling",
                           "rope_parameters", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
_MAX_LISTED = 12


class CheckpointIndex(Protocol):
    label: str
    root: Any
    config: dict
    tensors: Mapping[str, TensorInfo]

    def num_layers(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class TensorJob:
    name: str
    shape: tuple[int, ...]
    dtype_a: str
    dtype_b: str | None  # None when model 2 is not read for this tensor
    out_dtype: str
    t: float | None  # share of model 2; None = model 1's tensor (cast if needed)
    layer: int | None
    shard: int
    offset: int  # byte offset in the shard's data section
    nbytes: int  # output bytes
    check_overflow: bool  # the output dtype (or an extrapolating t) can overflow where the inputs did not
    verify_equal: bool = False  # a non-float tensor inside the window: must be equal in both models

    @property
    def numel(self) -> int:
        return self.nbytes // ITEMSIZE[self.out_dtype]

    @property
    def blended(self) -> bool:
        return self.t is not None


@dataclass(frozen=True, slots=True)
class ShardPlan:
    filename: str
    jobs: tuple[TensorJob, ...]
    data_bytes: int


@dataclass(frozen=True, slots=True)
class MergePlan:
    spec: MergeSpec
    num_layers: int
    window: range
    layer_t: dict[int, float]
    out_dtype: str  # safetensors code of float outputs
    shards: tuple[ShardPlan, ...]
    notices: tuple[str, ...] = field(default=())

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for shard in self.shards for job in shard.jobs]

    @property
    def bytes_written(self) -> int:
        return sum(shard.data_bytes for shard in self.shards)

    @property
    def bytes_read(self) -> int:
        """Input bytes the merge reads: every tensor of model 1, and model 2's blended tensors."""
        total = 0
        for job in self.jobs:
            total += job.numel * ITEMSIZE[job.dtype_a]
            if job.dtype_b is not None:
                total += job.numel * ITEMSIZE[job.dtype_b]
        return total

    @property
    def out_dtype_name(self) -> str:
        return DTYPE_NAMES[self.out_dtype]


def make_plan(a: CheckpointIndex, b: CheckpointIndex, spec: MergeSpec) -> MergePlan:
    num_layers = a.num_layers()
    if num_layers is None:
        raise IncompatibleCheckpointsError(
            f"{a.label} {a.root}: config.json has no layer count (num_hidden_layers or n_layer); "
            "cannot place the layer window"
        )
    window = schedule.resolve_window(spec.layer_start, spec.layer_end, num_layers)
    layer_t = schedule.gradient_weights(spec.gradient_start, spec.gradient_end, window)
    out_dtype, notices = _output_dtype(a, spec)
    notices += _config_differences(a, b)

    problems: list[str] = []
    b_only = [name for name, info in b.tensors.items()
              if schedule.tensor_weight(name, layer_t) is not None and name not in a.tensors]
    if b_only:
        notices.append(f"{len(b_only)} tensor(s) of model 2 in the window are not in model 1 and are left out: "
                       + _listing(b_only))

    jobs: list[tuple[TensorInfo, TensorInfo | None, float | None, bool]] = []
    for name, info in a.tensors.items():
        t = schedule.tensor_weight(name, layer_t)
        in_window = schedule.layer_index(name) in layer_t
        if not in_window:
            jobs.append((info, None, None, False))
            continue
        other = b.tensors.get(name)
        if other is None:
            if t is None:  # a block buffer model 2 does not store: model 1's, as in the original
                jobs.append((info, None, None, False))
            else:
                problems.append(f"{name} A={_shape(info)} B=(missing)")
            continue
        if other.shape != info.shape:
            problems.append(f"{name} A={_shape(info)} B={_shape(other)}")
            continue
        if not info.is_float or not other.is_float:
            if info.dtype != other.dtype:
                problems.append(f"{name} A={info.dtype} B={other.dtype} (non-float tensors must match exactly)")
                continue
            jobs.append((info, other, None, True))
            continue
        jobs.append((info, other, t, False))

    if problems:
        raise IncompatibleCheckpointsError(
            f"{len(problems)} tensor(s) to blend differ between A ({a.root}) and B ({b.root}): "
            + "; ".join(problems[:_MAX_LISTED])
            + (f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
        )
    if not any(t is not None for _, _, t, _ in jobs):
        example = ", ".join(list(a.tensors)[:3])
        raise IncompatibleCheckpointsError(
            f"{a.label} {a.root}: no tensor belongs to decoder blocks {window.start}..{window.stop - 1}; the names "
            f"({example}, ...) do not use a known block container (model.layers.N, transformer.h.N, ...)"
        )
    shards = _layout(jobs, out_dtype, spec.max_shard_bytes, window, layer_t)
    return MergePlan(spec, num_layers, window, layer_t, out_dtype, shards, tuple(notices))


def _layout(jobs, out_dtype: str, max_shard_bytes: int, window: range, layer_t) -> tuple[ShardPlan, ...]:
    """Greedy shards over model 1's on-disk order: a new shard when the next tensor would pass max_shard_bytes."""
    groups: list[list[tuple]] = [[]]
    sizes = [0]
    for info, other, t, verify in jobs:
        dtype = out_dtype if info.is_float else info.dtype
        nbytes = info.numel * ITEMSIZE[dtype]
        if groups[-1] and sizes[-1] + nbytes > max_shard_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append((info, other, t, verify, dtype, nbytes))
        sizes[-1] += nbytes
    count = len(groups)
    shards = []
    for k, group in enumerate(groups):
        filename = "model.safetensors" if count == 1 else f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        offset = 0
        shard_jobs = []
        for info, other, t, verify, dtype, nbytes in group:
            ranks = [_RANGE_RANK.get(info.dtype, -1)]
            if t is not None:
                ranks.append(_RANGE_RANK.get(other.dtype, -1))
            narrowing = info.is_float and max(ranks) > _RANGE_RANK[dtype]
            extrapolating = t is not None and not 0.0 <= t <= 1.0
            shard_jobs.append(TensorJob(
                name=info.name, shape=info.shape, dtype_a=info.dtype,
                dtype_b=other.dtype if (t is not None or verify) else None, out_dtype=dtype, t=t,
                layer=schedule.layer_index(info.name), shard=k, offset=offset, nbytes=nbytes,
                check_overflow=narrowing or extrapolating, verify_equal=verify,
            ))
            offset += nbytes
        shards.append(ShardPlan(filename, tuple(shard_jobs), offset))
    return tuple(shards)


def _output_dtype(a: CheckpointIndex, spec: MergeSpec) -> tuple[str, list[str]]:
    counts = Counter(info.dtype for info in a.tensors.values() if info.is_float)
    notices: list[str] = []
    if spec.dtype == "auto":
        if len(counts) > 1:
            found = ", ".join(f"{DTYPE_NAMES[c]}: {n} tensors" for c, n in counts.most_common())
            raise SpecError(f"--dtype auto: {a.label} mixes float dtypes ({found}); choose one with --dtype "
                            "float16, bfloat16 or float32")
        return (next(iter(counts)) if counts else "F16"), notices
    out = DTYPE_CODES[spec.dtype]
    main = counts.most_common(1)[0][0] if counts else out
    if spec.dtype_was_default and main != out and _RANGE_RANK[main] > _RANGE_RANK[out]:
        notices.append(f"model 1 is stored in {DTYPE_NAMES[main]}; writing float16 like the original script "
                       f"(--dtype {DTYPE_NAMES[main]} or --dtype auto keeps it)")
    return out, notices


def _config_differences(a: CheckpointIndex, b: CheckpointIndex) -> list[str]:
    diffs = [f"{key} A={a.config.get(key)!r} B={b.config.get(key)!r}" for key in _CONFIG_KEYS_TO_COMPARE
             if a.config.get(key) != b.config.get(key)]
    if not diffs:
        return []
    return ["the models' configs differ beyond shapes (" + "; ".join(diffs) + "): shapes match, so the merge runs, "
            "but models of different families or training setups can blend into garbage"]


def _shape(info: TensorInfo) -> str:
    return "(" + ", ".join(str(d) for d in info.shape) + ("," if len(info.shape) == 1 else "") + ")"


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def layer_table(plan: MergePlan) -> list[tuple[int, float, int, int]]:
    """(layer, t, tensors blended, output bytes) for each block in the window, for `gpumerge plan`."""
    rows = {layer: [t, 0, 0] for layer, t in plan.layer_t.items()}
    for job in plan.jobs:
        if job.blended:
            rows[job.layer][1] += 1
            rows[job.layer][2] += job.nbytes
    return [(layer, t, n, nbytes) for layer, (t, n, nbytes) in sorted(rows.items())]
