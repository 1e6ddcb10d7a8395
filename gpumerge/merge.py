"""One merge from spec to finished directory: open -> plan -> check output -> preflight -> stream -> finalize."""

from __future__ import annotations

import dataclasses
import importlib
import json
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gpumerge.checkpoint import Checkpoint
from gpumerge.errors import IncompatibleCheckpointsError, OutputError, SpecError
from gpumerge.plan import MergePlan, make_plan, ring_depth_of, t_groups
from gpumerge.signals import GUARD
from gpumerge.spec import MergeSpec
from gpumerge.about import version  # noqa: F401 - re-exported: gpumerge.merge.version


@dataclass(frozen=True, slots=True)
class MergeResult:
    output: Path
    plan: MergePlan
    record: dict
    aux_files: tuple[str, ...]
    elapsed_s: float
    bytes_read: int
    bytes_written: int
    report: dict


def open_pair(spec: MergeSpec) -> tuple[Checkpoint, Checkpoint]:
    a = Checkpoint(spec.model_path1, label="model 1 (--model_path1)")
    try:
        b = Checkpoint(spec.model_path2, label="model 2 (--model_path2)")
    except BaseException:
        a.close()
        raise
    return a, b


def plan_merge(spec: MergeSpec, a: Checkpoint, b: Checkpoint, *, notice: Callable[[str], None],
               orders: dict | None = None, recorded_order: dict | None = None) -> MergePlan:
    """make_plan, with model 1's tensor order for the recipes that count tensor positions: the recipe's
    ``tensor_order`` (a SpecError when it cannot be had, never a silent other order), or ``recorded_order``, the
    order a merge record kept (verify recomputes with it, whatever this environment's transformers gives). A sweep
    plans many variants and passes one ``orders`` dict for all, so that each order is built, and model 1's files
    looked at, once."""
    from gpumerge.spec import OperationsRecipe

    cache = orders if orders is not None else {}
    order = tied = kept = None
    if isinstance(spec.recipe, OperationsRecipe):
        if recorded_order is not None:
            order, tied = list(recorded_order["names"]), dict(recorded_order["tied"])
            kept = dict(recorded_order)
        else:
            from gpumerge.architecture import tensor_order

            how = spec.recipe.tensor_order
            if how not in cache:
                try:
                    cache[how] = tensor_order(a, how)
                except SpecError as exc:
                    cache[how] = exc
            if isinstance(cache[how], SpecError):
                raise cache[how]
            order, tied = cache[how]
            kept = {"source": how, "names": list(order), "tied": dict(tied)}
    plan = make_plan(a, b, spec, order=order, tied=tied)
    from gpumerge.writer import missing_tokenizer

    if "tokenizer" not in cache:
        cache["tokenizer"] = missing_tokenizer(a.root, label=a.label)
    tokenizer = cache["tokenizer"]
    for line in spec.notices + plan.notices + ((tokenizer,) if tokenizer else ()):
        notice(line)
    return dataclasses.replace(plan, tensor_order=kept) if kept is not None else plan


def merge_record(spec: MergeSpec, plan: MergePlan, a: Checkpoint, b: Checkpoint) -> dict:
    if spec.recipe is None:
        command = ["gpumerge", "--model_path1", spec.model_path1, "--model_path2", spec.model_path2,
                   "--output_model_path", str(spec.output_model_path),
                   "--gradient_start", repr(spec.gradient_start), "--gradient_end", repr(spec.gradient_end),
                   "--layer_start", str(spec.layer_start), "--layer_end", str(spec.layer_end),
                   "--max_shard_size", spec.max_shard_size, "--dtype", spec.dtype, "--method", spec.method]
    else:
        command = ["gpumerge", "--config", "gpumerge_recipe.yaml", "--output_model_path", str(spec.output_model_path)]
    return {
        "tool": "gpumerge",
        "version": version(),
        "inputs": [
            {"role": "model_path1", "path": spec.model_path1, "resolved": str(a.root), "format": a.format,
             "bytes": a.total_bytes(), "fingerprint": a.fingerprint()},
            {"role": "model_path2", "path": spec.model_path2, "resolved": str(b.root), "format": b.format,
             "bytes": b.total_bytes(), "fingerprint": b.fingerprint()},
        ],
        "settings": spec.settings(),
        "method": spec.blend_method,
        "num_layers": plan.num_layers,
        "output_dtype": plan.out_dtype_name,
        "layer_t": {str(layer): t for layer, t in plan.layer_t.items()},
        "t_groups": [[row.layer, row.group, row.t_min, row.t_max] for row in t_groups(plan)],
        "command": shlex.join(command),
        **({"tensor_order": plan.tensor_order} if plan.tensor_order is not None else {}),
    }


def preflight(plan: MergePlan, a: Checkpoint, b: Checkpoint, *, more: tuple[MergePlan, ...] = ()) -> None:
    """Checks that need tensor bytes, before the first output byte: non-float tensors in the window must be equal
    (in any of the plans: a sweep's ``more`` variants; each tensor compared once)."""
    names = dict.fromkeys(job.name for p in (plan, *more) for job in p.jobs if job.verify_equal)
    differ = [name for name in names
              if a.read_bytes(name, 0, a.tensors[name].nbytes) != b.read_bytes(name, 0, b.tensors[name].nbytes)]
    if differ:
        raise IncompatibleCheckpointsError(
            f"{len(differ)} non-float tensor(s) in the layer window differ between the models and cannot be "
            "blended: " + ", ".join(differ[:8])
        )


class _Import(threading.Thread):
    """torch takes seconds to import on a small CPU machine: import it while the checkpoints are indexed, the plan
    is made and the unchanged tensors are copied (those need no torch). A failure is raised where it is awaited."""

    def __init__(self) -> None:
        super().__init__(name="gpumerge-import", daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            importlib.import_module("torch")
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that awaits it
            self.error = exc


def import_torch_in_background() -> _Import:
    thread = _Import()
    thread.start()
    return thread


def await_import(thread: _Import) -> None:
    """Join the import, a signal stopping the wait at once (never inside the import itself); its error, if any."""
    while thread.is_alive():
        with GUARD.interruptible():
            thread.join(0.1)
    if thread.error is not None:
        raise thread.error


def open_files_needed(a: Checkpoint, b: Checkpoint, *, outputs: int = 0) -> int:
    """Files a run holds open at once: every input file, ``outputs`` (a sweep's shards and locks), and a margin
    for its own lock, pipes and torch's."""
    return 64 + len(a.files) + len(b.files) + outputs


def check_open_files(a: Checkpoint, b: Checkpoint, *, outputs: int = 0) -> None:
    """The merge holds every input file open at once, plus its shards, lock, pipes and torch's own: with too low a
    limit it would fail half-way (and could not even remove its partial output). Raise the soft limit to the hard
    one if that is enough, else refuse before any work."""
    import resource

    need = open_files_needed(a, b, outputs=outputs)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard == resource.RLIM_INFINITY or hard >= need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        return
    raise OutputError(f"the {'sweep' if outputs else 'merge'} needs about {need} open files and the limit is {hard} "
                      "(ulimit -n); raise it")


class LockedProgress:
    def __init__(self, update: Callable[[int], None] | None) -> None:
        self._update = update
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        if self._update is not None:
            with self._lock:
                self._update(nbytes)


@dataclass(frozen=True, slots=True)
class Checked:
    out: Path | None  # canonical
    report: object | None  # outdir.AtomicFile, made at the check: discard() it unless the merge commits it
    inputs: object  # outdir.Inputs


def check_before_merge(spec: MergeSpec, a: Checkpoint, b: Checkpoint, plan: MergePlan, *,
                       report_path: Path | None = None) -> Checked:
    """What `gpumerge plan` and a merge both check before the first output byte, beyond the plan itself: the output
    and report paths against every input file, the disk space, and the non-float tensors that must be equal."""
    from gpumerge import writer
    from gpumerge.outdir import AtomicFile, Inputs, canonical, check_output_path, check_space, check_write_file

    for flag, value in (("--model_path1", spec.model_path1), ("--model_path2", spec.model_path2)):
        canonical(value, flag=flag)  # a name that is not UTF-8 could not be written into the merge record
    inputs = Inputs.of(a, b)
    out = None
    if spec.output_model_path is not None:
        out = check_output_path(spec.output_model_path, inputs=inputs, overwrite=spec.overwrite)
        check_space(out, plan.bytes_written + writer.aux_bytes(a.root) + 2**20 * len(plan.shards))
    report = check_write_file(report_path, flag="--report", inputs=inputs, out=out) if report_path else None
    preflight(plan, a, b)
    report_file = AtomicFile(report, flag="--report", inputs=inputs) if report is not None else None
    return Checked(out, report_file, inputs)


def needs_cuda(spec: MergeSpec) -> bool:
    """Whether choosing the devices asks torch (then torch's import is awaited first): a GPU asked for, or ``auto``
    with a GPU budget on a machine that may have CUDA (``auto`` alone blends on the CPU)."""
    from gpumerge.devices import cuda_possible, gpu_budgets

    if spec.device == "auto":
        return gpu_budgets(spec.max_memory) and cuda_possible()
    return spec.device != "cpu"


def plan_devices(spec: MergeSpec, plan: MergePlan, *, budget: dict[str, int] | None = None,
                 batch_bytes: int | None = None, ring_depth: int | None = None):
    """Devices, memory budget, batch capacity and batches: (devices, notice, budget, capacity, batches)."""
    from gpumerge.devices import gpu_budgets, probe_budget, resolve_devices
    from gpumerge.plan import batch_capacity, make_batches

    devices, device_notice = resolve_devices(spec.device, gpu_budgets=gpu_budgets(spec.max_memory))
    if budget is None:
        budget = probe_budget(devices, dict(spec.max_memory) if spec.max_memory else None)
    capacity = batch_capacity(devices, budget, batch_bytes=batch_bytes, ring_depth=ring_depth)
    batches = make_batches(plan, budget, devices=devices, batch_bytes=batch_bytes, ring_depth=ring_depth)
    return devices, device_notice, budget, capacity, batches


def run_merge(spec: MergeSpec, *, notice: Callable[[str], None] = print, progress_factory=None,
              engine: str = "pipelined", batch_bytes: int | None = None, ring_depth: int | None = None,
              chunk_elements: int | None = None, budget: dict[str, int] | None = None,
              simulate_staging: bool = False, report_path: Path | None = None,
              checksums: bool = False) -> MergeResult:
    """Everything is checked before the first output byte; the output appears at OUT only when complete, and the
    report (``report_path``) only with it.

    ``engine="sequential"`` runs the plain reference engine (tests compare the pipeline with it bit for bit);
    ``budget`` replaces the probed memory budget (tests and benchmarks force small batches with it);
    ``simulate_staging`` runs the GPU path's host -> device -> host staging on the CPU (tests without CUDA).
    """
    from gpumerge.outdir import OutputDir

    began = time.perf_counter()
    a, b = open_pair(spec)
    with a, b:
        GUARD.poll()
        check_open_files(a, b)
        plan = plan_merge(spec, a, b, notice=notice)
        GUARD.poll()
        checked = check_before_merge(spec, a, b, plan, report_path=report_path)
        try:
            with OutputDir(checked.out, overwrite=spec.overwrite, inputs=checked.inputs, notice=notice) as output:
                GUARD.poll()  # the lock on OUT is held from here on
                done = _merge_into(output, spec, plan, a, b, began=began, notice=notice,
                                   progress_factory=progress_factory, engine=engine, batch_bytes=batch_bytes,
                                   ring_depth=ring_depth, chunk_elements=chunk_elements, budget=budget,
                                   simulate_staging=simulate_staging, checksums=checksums)
                if checked.report is not None:  # written before the output is put in place, shown only with it
                    checked.report.write_bytes((json.dumps(done.report, indent=2) + "\n").encode())
                output.finalize(companion=checked.report)
        except BaseException:
            if checked.report is not None:
                checked.report.discard()
            raise
    if output.companion_error:  # the merge is done; the report that was asked for is not: say so, exit non-zero
        raise OutputError(output.companion_error)
    return done


def _merge_into(output, spec: MergeSpec, plan: MergePlan, a: Checkpoint, b: Checkpoint, *, began: float, notice,
                progress_factory, engine: str, batch_bytes, ring_depth, chunk_elements, budget,
                simulate_staging: bool, checksums: bool = False) -> MergeResult:
    """The merge's files, complete, in the output's hidden directory (output.tmp)."""
    from gpumerge import writer
    from gpumerge.copier import Copier
    from gpumerge.devices import Telemetry

    if any(job.method == "slerp" for job in plan.jobs):
        from gpumerge.pipeline import slerp_prepass

        plan = slerp_prepass(plan, a, b)
    record = merge_record(spec, plan, a, b)
    metadata = {"format": "pt", "gpumerge": json.dumps(record, separators=(",", ":"))}
    # Started only now: while torch imports it holds the GIL, and the many small reads above would crawl. On a
    # machine without an NVIDIA driver the device checks below need no torch, so the import overlaps the copy of
    # the unchanged tensors; when CUDA may be there it is awaited here, before any check that needs it.
    importing = import_torch_in_background() if "torch" not in sys.modules else None
    if importing is not None and needs_cuda(spec):
        await_import(importing)
    devices, device_notice, budget, capacity, batches = plan_devices(
        spec, plan, budget=budget, batch_bytes=batch_bytes, ring_depth=ring_depth)
    if device_notice:
        notice(device_notice)
    progress = progress_factory(plan.bytes_written) if progress_factory else None
    advance = LockedProgress(progress.update if progress else None)
    telemetry = Telemetry(devices)
    try:
        if progress is not None:
            progress.telemetry = telemetry.start()
        writers = writer.open_writers(plan, output.tmp, metadata)
        copier = Copier(plan, a, writers, progress=advance) if engine != "sequential" else None
        try:
            if copier is not None:
                copier.start()
            if importing is not None:
                await_import(importing)
            stats = _run_engine(a, b, plan, batches, writers, copier, devices=devices, capacity=capacity,
                                engine=engine, ring_depth=ring_depth, chunk_elements=chunk_elements,
                                advance=advance, simulate_staging=simulate_staging)
        finally:
            if copier is not None:
                copier.cancel()
            writer.close_writers(writers)
        aux = writer.finish_model_dir(output.tmp, plan, record, a.root, a.config, checksums=checksums)
    finally:
        telemetry.stop()
        if progress:
            progress.close()
    report = engine_report(stats, wall_s=time.perf_counter() - began, devices=devices, budget=budget,
                           capacity=capacity, ring_depth=ring_depth, telemetry=telemetry.summary(), engine=engine)
    return MergeResult(output.out, plan, record, tuple(aux), stats.elapsed_s, stats.bytes_read,
                       stats.bytes_written, report)


def _run_engine(a, b, plan, batches, writers, copier, *, devices, capacity, engine, ring_depth, chunk_elements,
                advance, simulate_staging=False):
    from gpumerge.pipeline import DEFAULT_CHUNK_ELEMENTS, PipelinedEngine, SequentialEngine

    if engine == "sequential":
        runner = SequentialEngine(a, b, chunk_elements=chunk_elements or DEFAULT_CHUNK_ELEMENTS, progress=advance)
        return runner.run(plan, writers)
    runner = PipelinedEngine(a, b, devices=devices, capacity=capacity, ring_depth=ring_depth,
                             readers=plan.spec.readers, progress=advance,
                             simulate_staging=simulate_staging)
    return runner.run(plan, batches, writers, copier)


def engine_report(stats, *, wall_s: float, devices: list[str], budget: dict[str, int], capacity: int,
                  ring_depth: int | None, telemetry: list[dict], engine: str) -> dict:
    """The --report JSON: wall_s (from opening the inputs to the output complete, just before it is renamed into
    place), devices, per-stage busy time and bytes, peaks."""
    moved = stats.bytes_read + stats.bytes_written
    return {
        "wall_s": round(wall_s, 6),
        "engine_s": round(stats.elapsed_s, 6),
        "engine": engine,
        "devices": [{"device": d, "budget_bytes": budget.get(d)} for d in devices],
        "batch_capacity_bytes": capacity,
        "ring_depth": {d: ring_depth_of(d, ring_depth) for d in devices},
        "rings": stats.rings,  # as allocated: sized to each device's batches, within the capacity and the depth
        "batches": stats.batches,
        "bytes_read": stats.bytes_read,
        "bytes_written": stats.bytes_written,
        "gbps": round(moved / wall_s / 1e9, 3) if wall_s > 0 else None,
        "stages": {name: stage.as_dict() for name, stage in stats.stages.items()},
        "peak_pinned_bytes": stats.peak_pinned_bytes,
        "pinned_allocator_bytes": stats.pinned_allocator_bytes,
        "peak_host_buffer_bytes": stats.peak_host_buffer_bytes,
        "peak_device_bytes": stats.peak_device_bytes,
        "gpu_telemetry": telemetry,
        "tensors_blended": stats.tensors_blended,
        "tensors_copied": stats.tensors_copied,
    }
