"""make_plan: every check that needs no tensor bytes, the output dtype, and the output layout with byte offsets.

Pure data in, pure data out: checkpoints are passed in as indexes (names, dtypes, shapes); nothing is read or
written here, so planning a 70B merge takes milliseconds and can be tested with made-up indexes.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

from gpumerge import schedule
from gpumerge.checkpoint import DTYPE_NAMES, ITEMSIZE, TensorInfo
from gpumerge.errors import IncompatibleCheckpointsError, SpecError
from gpumerge.rules import Rule, check_blend_weights, selection
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
    method: str = "lerp"  # lerp | slerp | linear
    coef: tuple[float, float] | None = None  # out = coef[0]*A + coef[1]*B (linear; slerp once its angle is known)
    blend_rows: int | None = None  # vocabulary mismatch: only the first rows are blended, the rest are model 1's
    load_dtype: str | None = None  # round the inputs to this dtype before the math (mergekit's dtype)
    round_via: str | None = None  # round the result to this dtype before the output dtype (mergekit)

    @property
    def numel(self) -> int:
        return self.nbytes // ITEMSIZE[self.out_dtype]

    @property
    def blended(self) -> bool:
        return self.t is not None

    @property
    def blend_numel(self) -> int:
        """Elements blended, from the start (all of them unless the vocabularies differ)."""
        if not self.blended:
            return 0
        if self.blend_rows is None:
            return self.numel
        return self.blend_rows * (self.numel // self.shape[0])

    @property
    def input_bytes(self) -> int:
        """Bytes the blend reads: all of model 1's tensor, and model 2's blended elements."""
        return self.numel * ITEMSIZE[self.dtype_a] + (self.blend_numel * ITEMSIZE[self.dtype_b] if self.blended
                                                      else 0)


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
    # position-based recipes: the order their positions were counted in, as the merge record keeps it
    # ({"source": "architecture" | "names", "names": [...], "tied": {...}}); None for other recipes
    tensor_order: dict | None = None

    @property
    def jobs(self) -> list[TensorJob]:
        return [job for shard in self.shards for job in shard.jobs]

    @property
    def bytes_written(self) -> int:
        return sum(shard.data_bytes for shard in self.shards)

    @property
    def bytes_read(self) -> int:
        """Input bytes the merge reads: every tensor of model 1, and model 2's blended tensors."""
        # plus model 2's copy of the non-float tensors checked for equality before the merge
        return sum(job.input_bytes + (job.numel * ITEMSIZE[job.dtype_b] if job.verify_equal else 0)
                   for job in self.jobs)

    @property
    def out_dtype_name(self) -> str:
        return DTYPE_NAMES[self.out_dtype]

    def with_jobs(self, updated: Mapping[str, "TensorJob"]) -> "MergePlan":
        """The same plan with some jobs replaced (same names, shapes and offsets)."""
        if not updated:
            return self
        shards = tuple(ShardPlan(s.filename, tuple(updated.get(j.name, j) for j in s.jobs), s.data_bytes)
                       for s in self.shards)
        return dataclasses.replace(self, shards=shards)


_EMBEDDING_RE = re.compile(r"(^|\.)(embed_tokens|wte|embed_in|word_embeddings|lm_head|embed_out)\.weight$")


def make_plan(a: CheckpointIndex, b: CheckpointIndex, spec: MergeSpec, *, order: list[str] | None = None,
              tied: Mapping[str, str] | None = None) -> MergePlan:
    """``order``: model 1's canonical tensor order (its architecture's state_dict) for position-based recipes;
    ``tied``: absent tied names -> the stored name they share (lm_head.weight -> model.embed_tokens.weight)."""
    num_layers = a.num_layers()
    out_dtype, notices = _output_dtype(a, spec, b)
    rules, layer_t, window = selection(a, spec, num_layers, order=order, tied=tied, dtype_b=_main_dtype(b),
                                       out_dtype=out_dtype)
    check_blend_weights(rules)
    notices += _config_differences(a, b)

    problems: list[str] = []
    b_only = [name for name in b.tensors if name not in a.tensors]
    if b_only:
        notices.append(f"{len(b_only)} tensor(s) of model 2 are not in model 1 and are left out: "
                       + _listing(b_only))
    jobs: list[tuple[TensorInfo, TensorInfo | None, Rule | None, bool, int | None]] = []
    for name, info in a.tensors.items():
        rule = rules.get(name)
        if rule is None:
            jobs.append((info, None, None, False, None))
            continue
        other = b.tensors.get(name)
        if other is None:
            tied_b = b.config.get("tie_word_embeddings") and _EMBEDDING_RE.search(name)
            problems.append(f"{name} A={_shape(info)} B=(missing" + (", model 2 ties it to its input embeddings)"
                                                                     if tied_b else ")"))
            continue
        rows = None
        if other.shape != info.shape:
            if not _vocab_mismatch(name, info, other):
                problems.append(f"{name} A={_shape(info)} B={_shape(other)}")
                continue
            rows = min(info.shape[0], other.shape[0])
            notices.append(f"{name}: model 2 has {other.shape[0]} rows (vocabulary), model 1 {info.shape[0]}; "
                           f"blending the {rows} common rows, " + ("keeping model 1's extra rows"
                                                                    if info.shape[0] > rows else
                                                                    "leaving out model 2's extra rows")
                           + " (the output keeps model 1's vocabulary and tokenizer)")
        if not info.is_float or not other.is_float:
            if info.dtype != other.dtype or rows is not None:
                problems.append(f"{name} A={info.dtype} B={other.dtype} (non-float tensors must match exactly)")
                continue
            jobs.append((info, other, None, True, None))
            continue
        jobs.append((info, other, rule, False, rows))

    if problems:
        raise IncompatibleCheckpointsError(
            f"{len(problems)} tensor(s) to blend differ between A ({a.root}) and B ({b.root}): "
            + "; ".join(problems[:_MAX_LISTED])
            + (f"; ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else "")
        )
    if not any(rule is not None for _, _, rule, _, _ in jobs):
        if window is not None:
            example = ", ".join(list(a.tensors)[:3])
            raise IncompatibleCheckpointsError(
                f"{a.label} {a.root}: no tensor belongs to decoder blocks {window.start}..{window.stop - 1}; the "
                f"names ({example}, ...) do not use a known block container (model.layers.N, transformer.h.N, ...)")
        raise SpecError("the recipe selects no float tensor of model 1 to blend")
    shards = _layout(jobs, out_dtype, spec.max_shard_bytes)
    return MergePlan(spec, num_layers or 0, window or range(0), layer_t, out_dtype, shards, tuple(notices))


def _vocab_mismatch(name: str, info: TensorInfo, other: TensorInfo) -> bool:
    """An embedding or LM head whose row counts (vocabularies) differ; any other difference is an error."""
    return (bool(_EMBEDDING_RE.search(name)) and len(info.shape) == len(other.shape) == 2
            and info.shape[1:] == other.shape[1:])


def _layout(jobs, out_dtype: str, max_shard_bytes: int) -> tuple[ShardPlan, ...]:
    """Greedy shards over model 1's on-disk order: a new shard when the next tensor would pass max_shard_bytes."""
    groups: list[list[tuple]] = [[]]
    sizes = [0]
    for info, other, rule, verify, rows in jobs:
        dtype = out_dtype if info.is_float else info.dtype
        nbytes = info.numel * ITEMSIZE[dtype]
        if groups[-1] and sizes[-1] + nbytes > max_shard_bytes:
            groups.append([])
            sizes.append(0)
        groups[-1].append((info, other, rule, verify, rows, dtype, nbytes))
        sizes[-1] += nbytes
    count = len(groups)
    shards = []
    for k, group in enumerate(groups):
        filename = "model.safetensors" if count == 1 else f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        offset = 0
        shard_jobs = []
        for info, other, rule, verify, rows, dtype, nbytes in group:
            ranks = [_RANGE_RANK.get(info.dtype, -1)]
            if rule is not None:
                ranks.append(_RANGE_RANK.get(other.dtype, -1))
            narrowing = info.is_float and max(ranks) > _RANGE_RANK[dtype]
            extrapolating = rule is not None and (rule.method == "linear" or not 0.0 <= rule.t <= 1.0)
            shard_jobs.append(TensorJob(
                name=info.name, shape=info.shape, dtype_a=info.dtype,
                dtype_b=other.dtype if (rule is not None or verify) else None, out_dtype=dtype,
                t=rule.t if rule else None, layer=schedule.layer_index(info.name), shard=k, offset=offset,
                nbytes=nbytes, check_overflow=narrowing or extrapolating or bool(rule and rule.method == "slerp"),
                verify_equal=verify, method=rule.method if rule else "lerp", coef=rule.coef if rule else None,
                blend_rows=rows, load_dtype=rule.load_dtype if rule else None,
                round_via=rule.round_via if rule else None,
            ))
            offset += nbytes
        shards.append(ShardPlan(filename, tuple(shard_jobs), offset))
    return tuple(shards)


def _main_dtype(index: CheckpointIndex) -> str:
    counts = Counter(info.dtype for info in index.tensors.values() if info.is_float)
    return counts.most_common(1)[0][0] if counts else "F16"


def _output_dtype(a: CheckpointIndex, spec: MergeSpec, b: CheckpointIndex | None = None) -> tuple[str, list[str]]:
    counts = Counter(info.dtype for info in a.tensors.values() if info.is_float)
    notices: list[str] = []
    if hasattr(spec.recipe, "output_dtype") and spec.dtype_was_default:  # a mergekit config: its dtypes
        return spec.recipe.output_dtype(_main_dtype(a), _main_dtype(b) if b is not None else _main_dtype(a)), []
    if spec.dtype == "auto":
        if len(counts) > 1:
            found = ", ".join(f"{DTYPE_NAMES[c]}: {n} tensors" for c, n in counts.most_common())
            raise SpecError(f"--dtype auto: {a.label} mixes float dtypes ({found}); choose one with --dtype "
                            "float16, bfloat16 or float32")
        return (next(iter(counts)) if counts else "F16"), notices
    out = DTYPE_CODES[spec.dtype]
    main = _main_dtype(a) if counts else out
    if spec.dtype_was_default and main != out and _RANGE_RANK[main] > _RANGE_RANK[out]:
        notices.append(f"model 1 is stored in {DTYPE_NAMES[main]}; writing float16 like the original script "
                       f"(--dtype {DTYPE_NAMES[main]} or --dtype auto keeps it)")
    return out, notices


def _config_differences(a: CheckpointIndex, b: CheckpointIndex) -> list[str]:
    diffs = [f"{key} A={a.config.get(key)!r} B={b.config.get(key)!r}" for key in _CONFIG_KEYS_TO_COMPARE
             if a.config.get(key) != b.config.get(key)]
    if not diffs:
        return []
    return ["the models' configs differ beyond shapes (" + "; ".join(diffs) + "): the merge runs where the "
            "shapes allow, but models of different families or training setups can blend into garbage"]


def _shape(info: TensorInfo) -> str:
    return "(" + ", ".join(str(d) for d in info.shape) + ("," if len(info.shape) == 1 else "") + ")"


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def module_group(name: str) -> str:
    """The module a tensor belongs to inside its block (self_attn, mlp, input_layernorm, ...), or its full name."""
    layer = schedule.layer_index(name)
    if layer is None:
        return name
    rest = name.split(f".{layer}.", 1)[1] if f".{layer}." in name else name
    return rest.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class GroupRow:
    layer: int | None
    group: str  # "(all)" when every blended tensor of the block has the same t
    t_min: float
    t_max: float
    tensors: int
    nbytes: int


def t_range_text(low: float, high: float) -> str:
    """One t (``0.45``) or a range (``0.2..0.6``), as the plan table, the plot and the model card show it."""
    return f"{high:.6g}" if low == high else f"{low:.4g}..{high:.4g}"


def t_groups(plan: MergePlan) -> list[GroupRow]:
    """t per tensor group for `gpumerge plan`, --plot and the model card: one row per block when its tensors share
    one t, else one per module; then the blended tensors outside blocks."""
    groups: dict[tuple[int | None, str], list[TensorJob]] = {}
    for job in plan.jobs:
        if job.blended:
            groups.setdefault((job.layer, module_group(job.name)), []).append(job)
    rows: list[GroupRow] = []
    layers = sorted({layer for layer, _ in groups if layer is not None})
    for layer in layers:
        jobs_by_group = {g: jobs for (lay, g), jobs in groups.items() if lay == layer}
        ts = {job.t for jobs in jobs_by_group.values() for job in jobs}
        if len(ts) == 1:
            jobs = [j for js in jobs_by_group.values() for j in js]
            rows.append(GroupRow(layer, "(all)", min(ts), max(ts), len(jobs), sum(j.nbytes for j in jobs)))
            continue
        for group, jobs in sorted(jobs_by_group.items()):  # the same row order in every block
            t = [j.t for j in jobs]
            rows.append(GroupRow(layer, group, min(t), max(t), len(jobs), sum(j.nbytes for j in jobs)))
    for (layer, group), jobs in groups.items():
        if layer is None:
            t = [j.t for j in jobs]
            rows.append(GroupRow(None, group, min(t), max(t), len(jobs), sum(j.nbytes for j in jobs)))
    return rows


# ---- batches per device -----------------------------------------------------------------------------------------

DEFAULT_BATCH_BYTES = {"cpu": 16 * 2**20, "cuda": 256 * 2**20}  # CPU: batches stay in L3
# Buffers in flight per device. CPU: one being read, one blended, one written. CUDA: read, H2D + blend, D2H, written;
# four power-of-two buffers make one power-of-two pinned block (torch's pinned allocator rounds each block up to a
# power of two: three buffers of 171 MiB would pin 768 MiB, three of 256 MiB 1 GiB).
RING_DEPTH = {"cpu": 3, "cuda": 4}
ALIGN = 64  # every region starts on a 64-byte boundary (aligned dtype views, vector loads)
_FP32_SCRATCH = 12  # a, b and out widened to fp32 for a mixed-dtype blend


def _align(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def needs_device(job: TensorJob) -> bool:
    """Blends and casts run on a device; tensors kept as they are go file to file."""
    return job.blended or job.out_dtype != job.dtype_a


def needs_scratch(job: TensorJob) -> bool:
    """fp32 scratch for a blend that is not one fused same-dtype torch.lerp."""
    return job.blended and (job.coef is not None or job.method != "lerp" or job.load_dtype is not None
                            or job.round_via is not None or not (job.dtype_a == job.dtype_b == job.out_dtype))


def footprint_per_element(job: TensorJob) -> int:
    size = ITEMSIZE[job.dtype_a] + ITEMSIZE[job.out_dtype]
    if job.blended:
        size += ITEMSIZE[job.dtype_b]
    return size + (_FP32_SCRATCH if needs_scratch(job) else 0)


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements [start, start + count) of one job, and where its regions sit in a batch buffer. A piece lies
    entirely inside or entirely outside the job's blended elements."""

    job: TensorJob
    start: int
    count: int
    a_offset: int = 0
    b_offset: int = 0  # meaningful when the piece is blended
    out_offset: int = 0
    scratch_offset: int = 0  # meaningful when the piece needs fp32 scratch

    @property
    def blended(self) -> bool:
        return self.start < self.job.blend_numel

    @property
    def scratch(self) -> bool:
        return self.blended and needs_scratch(self.job)

    def in_bytes(self) -> int:
        return self.count * (ITEMSIZE[self.job.dtype_a] + (ITEMSIZE[self.job.dtype_b] if self.blended else 0))

    def footprint(self) -> int:
        job, n = self.job, self.count
        total = _align(n * ITEMSIZE[job.dtype_a]) + _align(n * ITEMSIZE[job.out_dtype])
        if self.blended:
            total += _align(n * ITEMSIZE[job.dtype_b])
        return total + (_align(n * _FP32_SCRATCH) if self.scratch else 0)


@dataclass(frozen=True, slots=True)
class Batch:
    """Pieces blended together on one device. Buffer layout: [a regions | b regions) = the bytes read and sent to
    the device, [out regions) = the bytes sent back and written, then fp32 scratch."""

    index: int
    device: str
    pieces: tuple[Piece, ...]  # what is read (and, for a single merge, blended and written)
    in_bytes: int  # end of the input regions
    out_start: int
    out_end: int
    nbytes: int  # the whole footprint, scratch included
    outputs: tuple["Output", ...] = ()  # a sweep's: what is blended from the pieces' inputs, and for which variants

    @property
    def blends(self) -> tuple[Piece, ...]:
        """The pieces blended (or cast) into out regions: a sweep's outputs, else the pieces themselves."""
        return tuple(output.piece for output in self.outputs) if self.outputs else self.pieces

    @property
    def payload_bytes(self) -> int:
        """Bytes read plus bytes written for this batch (a sweep's written once per variant)."""
        if not self.outputs:
            return sum(p.in_bytes() + p.count * ITEMSIZE[p.job.out_dtype] for p in self.pieces)
        return (sum(p.in_bytes() for p in self.pieces)
                + sum(o.piece.count * ITEMSIZE[o.piece.job.out_dtype] * len(o.variants) for o in self.outputs))


@dataclass(frozen=True, slots=True)
class Output:
    """A sweep's blend of one piece of a batch: one variant's job (its rule) over the piece's shared input regions,
    into its own out region; every variant listed takes these bytes (they blend this tensor by the same rule)."""

    piece: Piece
    variants: tuple[int, ...]


def device_kind(device: str) -> str:
    return "cpu" if device == "cpu" else "cuda"


def ring_depth_of(device: str, override: int | None = None) -> int:
    return override or RING_DEPTH[device_kind(device)]


def _floor_pow2(nbytes: int) -> int:
    return 1 << (nbytes.bit_length() - 1) if nbytes > 0 else 0


def batch_capacity(devices: list[str], budget: Mapping[str, int], *, batch_bytes: int | None = None,
                   ring_depth: int | None = None) -> int:
    """The largest batch footprint: within batch_bytes and, for every device, its budget over its ring of buffers.
    A GPU's buffers are also within its share of the host budget (they are pinned), and a power of two, so that its
    ring is one power-of-two pinned block: 256 MiB batches, 1 GiB pinned per GPU, when the budgets allow."""
    cuda = [d for d in devices if device_kind(d) == "cuda"]
    caps = []
    for device in devices:
        kind, depth = device_kind(device), ring_depth_of(device, ring_depth)
        cap = min(batch_bytes or DEFAULT_BATCH_BYTES[kind], budget[device] // depth)
        if kind == "cuda":
            if "cpu" in budget:
                cap = min(cap, budget["cpu"] // (depth * len(cuda)))
            cap = _floor_pow2(cap)
        caps.append((cap, device))
    cap, device = min(caps)
    if cap < 4 * ALIGN + 64:
        depth = ring_depth_of(device, ring_depth)
        raise SpecError(f"the memory budget for {device} ({budget[device]} bytes) is too small for {depth} "
                        f"in-flight buffers; give it at least {depth * (4 * ALIGN + 64)} bytes")
    return cap


def make_batches(plan: MergePlan, budget: Mapping[str, int], *, devices: list[str], batch_bytes: int | None = None,
                 ring_depth: int | None = None) -> tuple[Batch, ...]:
    """Cut the device work into batches no larger than batch_capacity (a tensor too large for one is split into
    row chunks, or element ranges when one row is too large) and assign them to devices balancing bytes."""
    cap = batch_capacity(devices, budget, batch_bytes=batch_bytes, ring_depth=ring_depth)
    groups: list[list[Piece]] = [[]]
    used = 0
    for job in plan.jobs:
        if not needs_device(job):
            continue
        for piece in pieces_of(job, cap):
            size = piece.footprint()
            if groups[-1] and used + size > cap:
                groups.append([])
                used = 0
            groups[-1].append(piece)
            used += size
    load = {device: 0 for device in devices}
    batches = []
    for index, pieces in enumerate(g for g in groups if g):
        device = min(devices, key=lambda d: (load[d], devices.index(d)))
        batch = lay_out(index, device, pieces)
        load[device] += batch.payload_bytes
        batches.append(batch)
    return tuple(batches)


def pieces_of(job: TensorJob, cap: int, *, footprint: Callable[[Piece], int] = Piece.footprint,
              per_element: int | None = None, regions: int = 4) -> list[Piece]:
    """The job cut at the end of its blended elements, then into pieces of at most ``cap`` footprint bytes: whole
    rows where a row fits, element ranges where one row is too large. ``footprint``, ``per_element`` and ``regions``
    (aligned regions per piece) size a sweep's pieces, which carry one out region per distinct rule."""
    bounds = [0, job.numel]
    if 0 < job.blend_numel < job.numel:
        bounds.insert(1, job.blend_numel)
    row = job.numel // job.shape[0] if job.shape and job.shape[0] else max(job.numel, 1)
    pieces = []
    for begin, end in zip(bounds, bounds[1:]):
        whole = Piece(job, begin, end - begin)
        if footprint(whole) <= cap:
            pieces.append(whole)
            continue
        budget_elements = max(1, (cap - regions * ALIGN) // (per_element or footprint_per_element(job)))
        step = (budget_elements // row) * row if row <= budget_elements else budget_elements
        pieces += [Piece(job, start, min(step, end - start)) for start in range(begin, end, step)]
    return pieces or [Piece(job, 0, 0)]


def lay_out(index: int, device: str, pieces: list[Piece]) -> Batch:
    offset = 0
    a_offsets, b_offsets, out_offsets, scratch_offsets = [], [], [], []
    for piece in pieces:
        a_offsets.append(offset)
        offset += _align(piece.count * ITEMSIZE[piece.job.dtype_a])
    for piece in pieces:
        b_offsets.append(offset)
        if piece.blended:
            offset += _align(piece.count * ITEMSIZE[piece.job.dtype_b])
    in_bytes = out_start = offset
    for piece in pieces:
        out_offsets.append(offset)
        offset += _align(piece.count * ITEMSIZE[piece.job.out_dtype])
    out_end = offset
    for piece in pieces:
        scratch_offsets.append(offset)
        if piece.scratch:
            offset += _align(piece.count * _FP32_SCRATCH)
    laid = tuple(Piece(p.job, p.start, p.count, a, b, o, s)
                 for p, a, b, o, s in zip(pieces, a_offsets, b_offsets, out_offsets, scratch_offsets))
    return Batch(index, device, laid, in_bytes, out_start, out_end, offset)


# ---- a sweep's batches: many rule sets over one layout ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SharedJob:
    """One tensor of a sweep that some variant blends or casts: read once (``read``: model 1's tensor, and model 2's
    when some variant blends it), blended once per distinct rule (``outputs``: a variant's job and every variant
    whose job for this tensor is the same)."""

    read: TensorJob
    outputs: tuple[tuple[TensorJob, tuple[int, ...]], ...]

    def per_element(self) -> int:
        size = ITEMSIZE[self.read.dtype_a] + (ITEMSIZE[self.read.dtype_b] if self.read.blended else 0)
        size += sum(ITEMSIZE[job.out_dtype] for job, _ in self.outputs)
        return size + (_FP32_SCRATCH if any(needs_scratch(job) for job, _ in self.outputs) else 0)

    def footprint(self, piece: Piece) -> int:
        n = piece.count
        total = _align(n * ITEMSIZE[self.read.dtype_a]) + (_align(n * ITEMSIZE[self.read.dtype_b]) if piece.blended
                                                           else 0)
        total += sum(_align(n * ITEMSIZE[job.out_dtype]) for job, _ in self.outputs)
        scratch = piece.blended and any(needs_scratch(job) for job, _ in self.outputs)
        return total + (_align(n * _FP32_SCRATCH) if scratch else 0)


def job_rule(job: TensorJob) -> tuple:
    """What decides a job's output bytes besides its inputs: equal keys, equal bytes (the same kernel runs).
    Floats by their bits, so that t = -0.0 and 0.0 stay apart."""
    def bits(x):
        return None if x is None else float(x).hex()
    return (bits(job.t), job.method, None if job.coef is None else tuple(map(bits, job.coef)), job.load_dtype,
            job.round_via, job.out_dtype, job.blend_rows)


def shared_jobs(plans: list[MergePlan]) -> list[SharedJob]:
    """Per tensor of the common layout, the device work of every variant, with variants of one rule grouped."""
    shared = []
    for jobs in zip(*(plan.jobs for plan in plans)):
        groups: dict[tuple, tuple[TensorJob, list[int]]] = {}
        for variant, job in enumerate(jobs):
            if needs_device(job):
                groups.setdefault(job_rule(job), (job, []))[1].append(variant)
        if not groups:
            continue
        outputs = tuple((job, tuple(variants)) for job, variants in groups.values())
        read = next((job for job, _ in outputs if job.blended), outputs[0][0])
        shared.append(SharedJob(read, outputs))
    return shared


def sweep_batches(shared: list[SharedJob], budget: Mapping[str, int], *, devices: list[str],
                  batch_bytes: int | None = None, ring_depth: int | None = None) -> Callable[[str], Iterator[Batch]]:
    """A sweep's batches, made as they are consumed (with many variants they would not fit in memory as a list):
    returns ``batches(device)``, an iterator over that device's batches, each time the same sequence."""
    cap = batch_capacity(devices, budget, batch_bytes=batch_bytes, ring_depth=ring_depth)

    def every() -> Iterator[Batch]:
        load = {device: 0 for device in devices}
        group: list[tuple[Piece, SharedJob]] = []
        used = index = 0
        for job in shared:
            regions = 3 + len(job.outputs)
            for piece in pieces_of(job.read, cap, footprint=job.footprint, per_element=job.per_element(),
                                   regions=regions):
                size = job.footprint(piece)
                if group and used + size > cap:
                    yield _place(index, group, devices, load)
                    index += 1
                    group, used = [], 0
                group.append((piece, job))
                used += size
        if group:
            yield _place(index, group, devices, load)

    def batches(device: str) -> Iterator[Batch]:
        return (batch for batch in every() if batch.device == device)

    return batches


def _place(index: int, group: list[tuple[Piece, SharedJob]], devices: list[str], load: dict[str, int]) -> Batch:
    device = min(devices, key=lambda d: (load[d], devices.index(d)))
    batch = lay_out_shared(index, device, group)
    load[device] += batch.payload_bytes
    return batch


def lay_out_shared(index: int, device: str, group: list[tuple[Piece, SharedJob]]) -> Batch:
    """Like lay_out, with one out region per output of each piece; a piece's outputs share its fp32 scratch (the
    blends of one batch run one after the other)."""
    base = lay_out(index, device, [piece for piece, _ in group])  # a and b regions as a single merge lays them
    offset = base.in_bytes
    placed = []
    for piece, job in zip(base.pieces, (job for _, job in group)):
        outs = []
        for out_job, variants in job.outputs:
            outs.append((out_job, variants, offset))
            offset += _align(piece.count * ITEMSIZE[out_job.out_dtype])
        placed.append((piece, job, outs))
    out_end = offset
    outputs = []
    for piece, job, outs in placed:
        scratch = piece.blended and any(needs_scratch(out_job) for out_job, _ in job.outputs)
        for out_job, variants, out_offset in outs:
            outputs.append(Output(Piece(out_job, piece.start, piece.count, piece.a_offset, piece.b_offset, out_offset,
                                        offset), variants))
        if scratch:
            offset += _align(piece.count * _FP32_SCRATCH)
    return Batch(index, device, base.pieces, base.in_bytes, base.in_bytes, out_end, offset, tuple(outputs))
