"""An evaluated sweep (`gpumerge sweep --eval-text FILE`): the inputs read once, each variant blended straight into a
model held in memory, scored (gpumerge.evaluate), and only the best written (with the sweep's writer, so a kept
model is byte for byte the merge of its settings).

The model is built once from model 1 with transformers (sdpa attention) on the chosen device; every float parameter
is then set to the merge's rounded output value (model 1's tensor in the output dtype, widened to the forward pass's
dtype). The tensors some variant blends are the only ones that change between variants: their inputs (model 1's and
model 2's) stay resident on the device when they fit, and each variant is blended into the parameters in place with
the merge's own kernel (gpumerge.pipeline.blend_values; slerp angles computed once per tensor pair). When they do not
fit they are read again for each variant (the run says so).
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from gpumerge.errors import OutputError, SpecError, brief
from gpumerge.signals import GUARD, Interrupted, test_pause
# the rows and their files live in gpumerge.results (load_done, ranked and verdict named here for older callers)
from gpumerge.results import Row, append_row, fill_row, load_done, ranked, verdict  # noqa: F401

BASELINES = ("model_1", "model_2")
# The largest batch chosen for a GPU when --eval-batch is not given: 32 windows of 512 tokens fill an H200's matrix
# units (benchmarks/RESULTS.md, the device command's batch rows) and keep the logits' memory bounded.
AUTO_BATCH_MAX = 32
READ_THREADS = 4  # threads reading a model's tensors to the device (each with a buffer of the largest tensor)
_MARGIN_BYTES = 512 * 2**20  # what the forward pass and the rest of the process need beyond the weights, on a CPU


def eval_record(settings, texts, *, out_dtype: str, eval_dtype: str, device_kind: str) -> dict:
    """What decides a score besides the weights: part of the sweep's identity and of every row's key."""
    return {"texts": [{"name": t.name, "sha256": t.sha256, "tokens_sha256": t.tokens_sha256} for t in texts],
            "eval_tokens": settings.eval_tokens,
            "seq_len": settings.seq_len, "eval_dtype": eval_dtype, "output_dtype": out_dtype, "attention": "sdpa",
            "device": device_kind, "definition": "gpumerge-perplexity-1"}


# ---- the model in memory -------------------------------------------------------------------------------------------

class ResidentModel:
    """Model 1's architecture with the merge's output values as parameters; variants blended into it in place."""

    def __init__(self, a, b, plans: list, *, device: str, eval_dtype: str, budget_bytes: int | None,
                 notice: Callable[[str], None], max_memory=None) -> None:
        from gpumerge.kernels.dtypes import torch_dtype
        from gpumerge.spec import DTYPE_CODES

        began = time.perf_counter()
        self.a, self.b, self.device = a, b, device
        self.layout = {job.name: job for job in plans[0].jobs}
        self.eval_dtype = torch_dtype(DTYPE_CODES[eval_dtype])
        self.model = _empty_model(a, self.eval_dtype, device)
        self.params = self._parameters()
        self.blended = sorted({job.name for plan in plans for job in plan.jobs if job.blended},
                              key=list(self.layout).index)
        need = resident_bytes(plans, b)
        keep = budget_bytes is None or need <= budget_bytes
        if not keep:
            notice(f"the inputs of the blended tensors ({need / 2**30:.2f} GiB) do not fit beside the model "
                   f"({budget_bytes / 2**30:.2f} GiB free for them): each variant streams them again from disk "
                   "through the merge's pipeline")
        # every parameter set to model 1's value in the output dtype: each tensor of model 1 read once, straight
        # to the device; a blended tensor's stays there as the blends' first input
        self.resident: dict[str, tuple] = {}
        blended = set(self.blended) if keep else set()
        for name, values in self._read_all(a, [name for name in self.layout if name in self.params]):
            GUARD.poll()
            self._set(name, self._output(self.layout[name], values))
            if name in blended:
                self.resident[name] = (values, None)
        self.synchronize()
        self.load_s = time.perf_counter() - began
        began = time.perf_counter()
        for name, values in self._read_all(b, self.blended if keep else [], rows=True):
            GUARD.poll()
            self.resident[name] = (self.resident[name][0], values)
        self.synchronize()
        self.inputs_s = time.perf_counter() - began
        self.max_memory = max_memory
        self._wide = None

    def _parameters(self) -> dict:
        """The checkpoint's float tensors by name, each a parameter of the model; every parameter must be one of
        them (the model is built empty: a parameter no tensor sets would be uninitialised memory)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        floats = [name for name, job in self.layout.items() if job.out_dtype in _FLOATS]
        missing = [name for name in floats if name not in params]
        if missing:
            raise SpecError(f"--eval-text: the model transformers builds from model 1 has no parameter named "
                            f"{missing[0]}{_more(missing)}: its checkpoint's names are not the "
                            "architecture's, so gpumerge cannot score its variants")
        covered = {id(params[name]) for name in floats}
        unset = [name for name, param in self.model.named_parameters() if id(param) not in covered]
        if unset:
            raise SpecError(f"--eval-text: model 1's checkpoint has no tensor for the parameter {unset[0]}"
                            f"{_more(unset)} "
                            "of the model transformers builds from its config.json, so "
                            "gpumerge cannot score its variants")
        return {name: params[name] for name in floats}

    # -- reading --
    def _read_all(self, ckpt, names: list[str], *, rows: bool = False) -> Iterator[tuple[str, object]]:
        """(name, values) for each of ``names`` in order (flat, on the device, in the stored dtype; model 2's: the
        rows a blend uses), read READ_THREADS at a time: each
        thread preads a tensor into its own reusable buffer (pinned, for a GPU) and copies it to the device, so the
        reads from the page cache and the copies overlap (one thread read 7B at ~1 GB/s on the H200 machine). At
        most twice as many tensors as threads are in flight: memory stays bounded whatever the consumer does."""
        import collections
        from concurrent.futures import ThreadPoolExecutor

        if not names:
            return
        sizes = {name: self._nbytes(ckpt, name, rows=rows) for name in names}
        largest = max(sizes.values())
        local = threading.local()

        def read(name: str):
            import torch

            from gpumerge.kernels.dtypes import torch_dtype

            nbytes = sizes[name]
            if self.device == "cpu":  # the tensor read is the one kept
                values = torch.empty(nbytes, dtype=torch.uint8)
                ckpt.read_into(name, values)
            else:
                if getattr(local, "buffer", None) is None:
                    local.buffer = torch.empty(largest, dtype=torch.uint8, pin_memory=True)
                staging = local.buffer[:nbytes]
                ckpt.read_into(name, staging)
                values = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                values.copy_(staging)  # synchronous: the buffer is free again when it returns
            return values.view(torch_dtype(ckpt.tensors[name].dtype))

        threads = min(READ_THREADS, len(names))
        with ThreadPoolExecutor(threads, thread_name_prefix="gpumerge-load") as pool:
            queued = collections.deque()
            pending = iter(names)
            try:
                for name in itertools.islice(pending, 2 * threads):
                    queued.append((name, pool.submit(read, name)))
                while queued:
                    name, future = queued.popleft()
                    values = future.result()
                    following = next(pending, None)
                    if following is not None:
                        queued.append((following, pool.submit(read, following)))
                    yield name, values
            finally:
                for _, future in queued:
                    future.cancel()

    def _nbytes(self, ckpt, name: str, *, rows: bool = False) -> int:
        from gpumerge.checkpoint import ITEMSIZE

        info = ckpt.tensors[name]
        job = self.layout[name]
        numel = info.numel
        if rows and job.blend_rows is not None:
            numel = job.blend_rows * (info.numel // info.shape[0])
        return numel * ITEMSIZE[info.dtype]

    # -- setting parameters --
    def _set(self, name: str, values) -> None:
        self.params[name].data.copy_(values.view(self.params[name].shape))

    def _out(self, job):
        import torch

        from gpumerge.kernels.dtypes import torch_dtype

        return torch.empty(job.numel, dtype=torch_dtype(job.out_dtype), device=self.device)

    def _output(self, job, values):
        """``values`` (a tensor as stored) in the output dtype: what the merge writes for a tensor it copies."""
        out = self._out(job)
        out.copy_(values)
        return out

    def set_all(self, which: str, *, unblended_only: bool = False) -> None:
        """Every float parameter to model 1's ("a") or model 2's ("b") tensor in the output dtype (model 2's with
        the vocabulary rule: its rows where both have them, model 1's beyond). The blended tensors come from their
        resident inputs, the others (embeddings, norms: what no variant blends) from the files.
        ``unblended_only``: only the tensors no variant blends (a variant's blend sets the others next)."""
        skip = set(self.blended) if unblended_only else set()
        names = [name for name in self.layout if name in self.params and name not in skip]
        from_b = [name for name in names if which == "b" and name in self.b.tensors
                  and self.b.tensors[name].dtype in _FLOATS]
        firsts = self._read_all(self.a, [name for name in names if name not in self.resident])
        seconds = self._read_all(self.b, [name for name in from_b if name not in self.resident])
        for name in names:
            GUARD.poll()
            job = self.layout[name]
            first, second = self.resident.get(name, (None, None))
            out = self._output(job, first if first is not None else next(firsts)[1])
            if name in from_b:
                other = second if second is not None else next(seconds)[1]
                rows = min(job.shape[0], self.b.tensors[name].shape[0]) if job.shape else 0
                count = job.numel if other.numel() == job.numel else rows * (job.numel // max(job.shape[0], 1))
                out[:count].copy_(other[:count])
            self._set(name, out)

    def apply(self, plan) -> None:
        """The variant's values for every tensor some variant blends (the others never change)."""
        from gpumerge.pipeline import blend_values

        if self.blended and not self.resident:
            self._stream(plan)
            return
        jobs = {job.name: job for job in plan.jobs}
        for name in self.blended:
            GUARD.poll()
            job = jobs[name]
            a, b = self.resident[name]
            param = self.params[name].data
            out = param.view(-1) if _same_dtype(param, job) and param.is_contiguous() else self._out(job)
            span = job.blend_numel
            if span:
                blend_values(job, a[:span], out[:span], b[:span], self._scratch(span) if _scratch(job) else None)
            if span < job.numel:
                out[span:].copy_(a[span:])
            if out.data_ptr() != param.data_ptr():
                self._set(name, out)

    def _stream(self, plan) -> None:
        """The variant's tensors that some variant blends, read and blended by the merge's pipelined engine, each
        piece landing in its parameter instead of a shard (_ParamSink): memory stays the engine's ring."""
        from gpumerge.copier import Copier
        from gpumerge.devices import probe_budget
        from gpumerge.pipeline import PipelinedEngine
        from gpumerge.plan import MergePlan, ShardPlan, batch_capacity, make_batches

        union = set(self.blended)
        shards = tuple(ShardPlan(s.filename, tuple(j for j in s.jobs if j.name in union), s.data_bytes)
                       for s in plan.shards)
        part = MergePlan(plan.spec, plan.num_layers, plan.window, plan.layer_t, plan.out_dtype, shards,
                         plan.notices)
        sinks = [_ParamSink(shard.jobs, self.params) for shard in shards]
        budget = probe_budget([self.device], dict(self.max_memory) if self.max_memory else None)
        capacity = batch_capacity([self.device], budget)
        batches = make_batches(part, budget, devices=[self.device])
        copier = Copier(part, self.a, sinks).start()
        engine = PipelinedEngine(self.a, self.b, devices=[self.device], capacity=capacity)
        engine.run(part, batches, sinks, copier)

    def _scratch(self, n: int):
        import torch

        if self._wide is None or self._wide.numel() < 3 * n:
            self._wide = torch.empty(3 * n, dtype=torch.float32, device=self.device)
        return self._wide[:3 * n]

    def synchronize(self) -> None:
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize(self.device)


_FLOATS = ("F16", "BF16", "F32", "F64")


def resident_bytes(plans: list, b) -> int:
    """What the blends' inputs take held on the device: model 1's tensor and the rows of model 2's that a blend
    uses, for every tensor some variant blends."""
    from gpumerge.checkpoint import ITEMSIZE

    layout = {job.name: job for job in plans[0].jobs}
    total = 0
    for name in {job.name for plan in plans for job in plan.jobs if job.blended}:
        job = layout[name]
        rows_b = job.numel if job.blend_rows is None else job.blend_rows * (job.numel // job.shape[0])
        total += job.numel * ITEMSIZE[job.dtype_a] + rows_b * ITEMSIZE[b.tensors[name].dtype]
    return total


def _more(names: list[str]) -> str:
    return f" (and {len(names) - 1} more)" if len(names) > 1 else ""


def _empty_model(a, dtype, device: str):
    """Model 1's architecture from its config.json, its parameters allocated on ``device`` and not initialised (the
    caller sets each from the checkpoint): no copy of the model in host memory, no read of its weights by
    transformers. Built with accelerate's ``init_empty_weights`` (parameters on the meta device); the buffers the
    model computes itself (rotary frequencies) are built for real and carried over."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(a.root)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    except Exception as exc:  # transformers raises many kinds for an architecture it cannot build
        raise SpecError(f"--eval-text: transformers cannot build model 1 ({a.root}) to score it: "
                        f"{type(exc).__name__}: {brief(exc)}") from None
    buffers = {name: buffer for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    for name, buffer in buffers.items():
        model.get_buffer(name).copy_(buffer)
    model.tie_weights()  # to_empty gives each module its own new parameter: tied ones are tied again
    return model.eval()


class _ParamSink:
    """Stands where a ShardWriter stands in the pipeline: bytes written at a shard offset land in the parameter of
    the tensor there (cast to the forward pass's dtype), on the model's device."""

    def __init__(self, jobs, params: dict) -> None:
        self.jobs = sorted(jobs, key=lambda job: job.offset)
        self.starts = [job.offset for job in self.jobs]
        self.params = params

    def pwrite(self, data: memoryview, offset: int, *, absolute: bool = False) -> None:
        import bisect

        import torch

        from gpumerge.checkpoint import ITEMSIZE
        from gpumerge.kernels.dtypes import torch_dtype

        job = self.jobs[bisect.bisect_right(self.starts, offset) - 1]
        size = ITEMSIZE[job.out_dtype]
        first = (offset - job.offset) // size
        values = torch.frombuffer(bytearray(data), dtype=torch_dtype(job.out_dtype))
        self.params[job.name].data.view(-1)[first:first + values.numel()].copy_(values)

    def copy_from(self, src_fd: int, src_offset: int, nbytes: int, offset: int) -> None:
        from gpumerge.writer import copy_by_reads

        copy_by_reads(src_fd, src_offset, nbytes, lambda data, start: self.pwrite(data, offset + start))

    def close(self) -> None:
        pass


def _same_dtype(param, job) -> bool:
    """The forward pass runs in the output dtype (a GPU's default): blend straight into the parameter."""
    from gpumerge.kernels.dtypes import torch_dtype

    return param.dtype == torch_dtype(job.out_dtype)


def _scratch(job) -> bool:
    from gpumerge.plan import needs_scratch

    return needs_scratch(job)


# ---- the loop ------------------------------------------------------------------------------------------------------

def stop_after() -> int | None:
    """Test hook: GPUMERGE_TEST_STOP_AFTER=k interrupts the run (as SIGINT) after k rows (a search's trials) newly
    scored."""
    value = os.environ.get("GPUMERGE_TEST_STOP_AFTER")
    return int(value) if value and value.isdigit() else None


class RowScorer:
    """Rows scored one after another on one resident model; what its parameters hold (model 1 as built, model 2,
    or a variant) is carried from row to row."""

    def __init__(self, model: ResidentModel, plans: dict, texts, *, settings) -> None:
        self.model, self.plans, self.texts, self.settings = model, plans, texts, settings
        self.state = "a"

    def score(self, row: Row) -> None:
        """The row blended into the model and scored: its perplexity, per-file figures and timings filled in."""
        from gpumerge.evaluate import perplexity

        model = self.model
        began = time.perf_counter()
        if row.name == "model_2":
            model.set_all("b")
            self.state = "b"
        elif row.name == "model_1":
            if self.state != "a":
                model.set_all("a")
                self.state = "a"
        else:
            if self.state == "b":  # apply sets only the tensors some variant blends: the others must be model 1's
                model.set_all("a", unblended_only=True)
            model.apply(self.plans[row.name])
            self.state = "variant"
        model.synchronize()
        row.blend_s = time.perf_counter() - began
        evaluated = time.perf_counter()
        score = perplexity(model.model, self.texts, batch=self.settings.batch, device=model.device)
        row.eval_s = time.perf_counter() - evaluated
        row.perplexity, row.per_file, row.tokens = score.perplexity, score.per_file, score.tokens


def score_rows(model, rows: list[Row], plans: dict, texts, *, settings, results: Path | None,
               done: dict[str, dict], history: str, progress=None, processes=None) -> dict[str, float]:
    """Score every row not yet ``done`` (by key), in order; each result appended to ``results`` as soon as it is
    known. ``model``: the ResidentModel, or a function that builds it (called at the first row to score: none is
    built when nothing is left). Returns the wall time this run spent on the parents' rows and on the variants'
    (``baselines_s``, ``scoring_s``: each row's own time, summed) and how many of each it scored, the loop's wall time
    (``loop_s``: less than their sum when several processes score at once), and the model's ``load_s`` and
    ``inputs_s`` (0 when none was built).

    With several ``processes`` (gpumerge.distributed) the rows still to score are dealt out in rounds, one to each
    process (row k to process k mod N, in order); after each round every process's row, or its error, is gathered,
    and the main process logs the rows (``results`` is the main process's; the others pass None). Whatever a process
    meets in its part of a round (building its model included; a signal too) is gathered as its error, so that no
    process is left waiting in a round another has left: every process then raises it (a signal, where it landed)."""
    from gpumerge.distributed import SINGLE, as_error, told

    group = processes or SINGLE
    stop = stop_after()
    scored = 0
    spent = {"baselines_s": 0.0, "scoring_s": 0.0, "baselines": 0, "variants": 0, "load_s": 0.0, "inputs_s": 0.0}
    for row in rows:
        if row.key in done:
            fill_row(row, done[row.key])
            if progress:
                progress(row)
    todo = [row for row in rows if row.key not in done]
    began = time.perf_counter()
    scorer = None
    fail = fail_on_process()
    for first in range(0, len(todo), group.size):
        GUARD.poll()
        mine = todo[first + group.rank] if first + group.rank < len(todo) else None
        outcome, own = None, None
        if mine is not None:
            try:
                if scorer is None:
                    built = model() if callable(model) else model
                    scorer = RowScorer(built, plans, texts, settings=settings)
                    spent["load_s"], spent["inputs_s"] = built.load_s, built.inputs_s
                if first > 0:
                    fail_on_purpose(fail, group)
                started = time.perf_counter()
                scorer.score(mine)
                outcome = ("row", mine.as_dict(), time.perf_counter() - started)
            except BaseException as exc:  # every process stops with it; the main one says it
                if group.size == 1:
                    raise
                outcome, own = ("error", as_error(exc), 0.0), exc
        gathered = group.gather(outcome) if group.size > 1 else [outcome]
        errors = [item[1] for item in gathered if item is not None and item[0] == "error"]
        for rank, item in enumerate(gathered):
            if item is None or item[0] != "row":
                continue
            row = todo[first + rank]
            if group.size > 1:
                if item[1].get("key") != row.key:  # the processes' lists of rows differ: a bug, never a wrong row
                    raise OutputError(f"process {rank} scored another row than {row.name}: the processes do not "
                                      "agree on the sweep's rows (are their inputs the same files?)")
                fill_row(row, item[1])
                row.process = rank
            if results is not None:
                append_row(results, row, history)
            kind = "baselines" if row.baseline else "variants"
            spent[kind] += 1
            spent["baselines_s" if row.baseline else "scoring_s"] += item[2]
            scored += 1
            if progress:
                progress(row)
        if own is not None:
            raise told(own, group)
        if errors:
            raise told(errors[0], group)
        test_pause("score")
        if stop is not None and scored >= stop:
            import signal

            raise Interrupted(signal.SIGINT)
    spent["loop_s"] = time.perf_counter() - began
    if group.size > 1:
        spent["processes"] = group.size
    return spent


def fail_on_process() -> int | None:
    """Test hook: GPUMERGE_TEST_FAIL_ON_PROCESS=k makes process k fail at its second row or trial (a launched
    run; ``fail_on_purpose``)."""
    value = os.environ.get("GPUMERGE_TEST_FAIL_ON_PROCESS")
    return int(value) if value and value.isdigit() else None


def fail_on_purpose(fail: int | None, group) -> None:
    """The test hook's failure, in the process ``fail`` names (what ``fail_on_process()`` gave)."""
    if fail is not None and fail == group.rank:
        raise OutputError(f"process {group.rank} failed on purpose (GPUMERGE_TEST_FAIL_ON_PROCESS)")


def _free_bytes(device: str, free: int | None = None) -> int:
    """The available RAM for the CPU, the free memory of a GPU; ``free`` instead when given: this process's part of
    a device that several processes of a launched run share (measured when each started, before any loaded its model,
    and divided among them: gpumerge.distributed)."""
    if free is not None:
        return free
    from gpumerge.devices import free_bytes

    return free_bytes(device)


def budget_for_inputs(device: str, model_bytes: int, max_memory, *, reserve: int = _MARGIN_BYTES,
                      free: int | None = None) -> int | None:
    """Bytes the blended tensors' inputs may take beside the model: --max_memory for the device, else the GPU's free
    memory or the available RAM, less the model (not loaded yet) and what the forward pass needs (``reserve``, at
    least a margin)."""
    given = dict(max_memory or {})
    key = "cpu" if device == "cpu" else int(device.split(":")[1]) if ":" in device else 0
    if key in given:
        return given[key]
    return max(0, _free_bytes(device, free) - model_bytes - max(reserve, _MARGIN_BYTES))


def check_fits(device: str, model_bytes: int, *, reserve: int = _MARGIN_BYTES, units=None,
               free: int | None = None) -> None:
    """The model itself and one forward pass (``reserve``) must fit on the device: one line with the bytes needed
    and available. ``units``: the model's layers with their resident bytes (gpumerge.placement.units_of): on a GPU
    the line also says how many such GPUs the model and its resident inputs would take, split by layer."""
    free = _free_bytes(device, free)
    reserve = max(reserve, _MARGIN_BYTES)
    if model_bytes + reserve > free:
        split = gpus_needed(units, free, reserve) if units and device != "cpu" else None
        raise OutputError(f"--eval-text: the model to score needs {model_bytes / 2**30:.2f} GiB (plus "
                          f"{reserve / 2**30:.1f} GiB for the forward pass) on {device}, and "
                          f"{free / 2**30:.2f} GiB are available; score on a bigger device, or in a narrower "
                          "--eval-dtype" + (f"; split by layer, the model with its resident inputs would take {split} "
                                            "GPUs like this one, and gpumerge scores on one GPU per process"
                                            if split else ""))


def gpus_needed(units, per_gpu_bytes: int, forward_bytes: int, *, most: int = 64) -> int | None:
    """How many GPUs of ``per_gpu_bytes`` the units take placed by layer (gpumerge.placement), or None: more than
    ``most``, or a layer bigger than one GPU."""
    from gpumerge.errors import SpecError
    from gpumerge.placement import place_by_layer

    for count in range(1, most + 1):
        try:
            return len(place_by_layer(units, {f"cuda:{k}": per_gpu_bytes for k in range(count)},
                                      forward_bytes=forward_bytes).devices)
        except SpecError:
            continue
    return None


def forward_bytes(config: dict, batch: int, seq_len: int, itemsize: int) -> int:
    """An estimate of one forward pass's peak memory from the model's shapes: the logits in the eval dtype, their
    fp32 copy and log-softmax, a block's activations (hidden and MLP widths), and the attention scores (sdpa's math
    path on a CPU materializes them)."""
    def number(key: str, default: int) -> int:
        value = config.get(key, default)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

    vocab, hidden = number("vocab_size", 32000), number("hidden_size", 4096)
    inner, heads = number("intermediate_size", 4 * hidden), number("num_attention_heads", 32)
    tokens = batch * seq_len
    logits = tokens * vocab * (itemsize + 8)
    activations = tokens * (8 * hidden + 3 * inner) * max(itemsize, 4)
    attention = batch * heads * seq_len * seq_len * 4
    return logits + activations + attention


def fit_batch(device: str, model_bytes: int, config: dict, settings, itemsize: int, *, given: bool = True,
              windows: int = 0, beside: int = 0, free: int | None = None) -> tuple[int, int]:
    """(the batch to score with, its forward pass's estimated bytes). ``given`` (a user's --eval-batch, or any
    batch on a CPU): that batch, halved until its forward pass fits in half of what is free beside the model.
    Else, on a GPU: the largest batch up to AUTO_BATCH_MAX and the text's ``windows`` whose forward pass fits in
    half of what is free beside the model and ``beside`` (the blends' resident inputs), so that a bigger batch
    never pushes the inputs off the device. A batch of 1 that does not fit is check_fits' error."""
    free = _free_bytes(device, free) - model_bytes
    batch = settings.batch
    if not given and device != "cpu":
        free -= beside
        batch = max(1, min(AUTO_BATCH_MAX, windows or AUTO_BATCH_MAX))
    while batch > 1 and forward_bytes(config, batch, settings.seq_len, itemsize) > free // 2:
        batch //= 2
    return batch, forward_bytes(config, batch, settings.seq_len, itemsize)
