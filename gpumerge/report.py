"""What the user reads: the one-line summary of a merge, `gpumerge plan`'s table and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

from gpumerge.errors import SpecError
from gpumerge.plan import MergePlan, t_groups, t_range_text
from gpumerge.spec import MergeSpec


def human_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError


def summary_line(result) -> str:
    plan = result.plan
    blended = sum(1 for job in plan.jobs if job.blended)
    rate = (result.bytes_read + result.bytes_written) / max(result.elapsed_s, 1e-9)
    where = (f"in blocks {plan.window.start}..{plan.window.stop - 1} of {plan.num_layers}" if len(plan.window)
             else f"of {len(plan.jobs)}")
    return (f"gpumerge: wrote {result.output} ({len(plan.shards)} shard(s), {human_bytes(result.bytes_written)} "
            f"{plan.out_dtype_name}; {blended} tensors blended {where}, method {plan.spec.blend_method}) in "
            f"{result.elapsed_s:.2f} s ({human_bytes(rate)}/s read+written)")


def recipe_line(plan: MergePlan) -> str:
    spec = plan.spec
    if spec.recipe is None:
        return (f"blocks {plan.window.start}..{plan.window.stop - 1} ({len(plan.window)} of {plan.num_layers}), "
                f"t {spec.gradient_start:g} -> {spec.gradient_end:g}")
    return {"OperationsRecipe": "gradient values over tensor positions (BlockMerge Tensors/YAML edition)",
            "LayerGradientsRecipe": "per-module layer gradients",
            "MergekitRecipe": "mergekit config"}.get(type(spec.recipe).__name__, type(spec.recipe).__name__)


PLOT_FORMATS = ("png", "svg", "pdf")


def describe_plan(spec: MergeSpec, *, plot: Path | None, out: TextIO, notice) -> MergePlan:
    """Everything a merge checks before its first output byte, then the plot and the table; writes nothing else."""
    from gpumerge.merge import check_before_merge, open_pair, plan_devices, plan_merge
    from gpumerge.outdir import AtomicFile, check_write_file

    a, b = open_pair(spec)
    picture = None
    with a, b:
        plan = plan_merge(spec, a, b, notice=notice)
        checked = check_before_merge(spec, a, b, plan)
        device_notice = plan_devices(spec, plan)[1]
        if device_notice:  # nothing is merged here: say what a merge would do
            notice(device_notice.replace("the merge runs", "a merge would run"))
        if plot is not None:
            if plot.suffix.lstrip(".").lower() not in PLOT_FORMATS:
                raise SpecError(f"--plot {plot}: give a {', '.join('.' + f for f in PLOT_FORMATS)} file name")
            plot = check_write_file(plot, flag="--plot", inputs=checked.inputs, out=checked.out)
            picture = AtomicFile(plot, flag="--plot", inputs=checked.inputs)
        try:
            if picture is not None:  # before the table: a reader that stops reading early must not cost the plot
                plot_shares(plan, picture)
        except BaseException:
            picture.discard()
            raise
        write_plan_table(plan, a, b, out)
    if plot is not None:
        print(f"plot: {plot}", file=out)
    return plan


def write_plan_table(plan: MergePlan, a, b, out: TextIO) -> None:
    print(f"model 1: {a.root} ({a.format}, {human_bytes(a.total_bytes())}, {plan.num_layers} blocks)", file=out)
    print(f"model 2: {b.root} ({b.format}, {human_bytes(b.total_bytes())}, {b.num_layers()} blocks)", file=out)
    print(f"blend:   {recipe_line(plan)}; method {plan.spec.blend_method}; output dtype {plan.out_dtype_name}", file=out)
    print(f"{'layer':>5}  {'group':<24}  {'model 1':>9}  {'model 2 (t)':>13}  {'tensors':>7}  {'bytes':>11}",
          file=out)
    for row in t_groups(plan):
        one = t_range_text(1 - row.t_max, 1 - row.t_min)
        layer = str(row.layer) if row.layer is not None else "-"
        print(f"{layer:>5}  {row.group:<24}  {one:>9}  {t_range_text(row.t_min, row.t_max):>13}  {row.tensors:>7}  "
              f"{human_bytes(row.nbytes):>11}", file=out)
    copied = [job for job in plan.jobs if not job.blended]
    outside = sorted({job.layer for job in copied if job.layer is not None})
    others = [job.name for job in copied if job.layer is None]
    print(f"copied from model 1: {len(copied)} tensors ({human_bytes(sum(j.nbytes for j in copied))}): "
          + ", ".join(others[:6]) + (" ..." if len(others) > 6 else "")
          + (f"; blocks {_ranges(outside)}" if outside else ""), file=out)
    print(f"reads {human_bytes(plan.bytes_read)} (all of model 1, model 2's blended tensors); writes "
          f"{human_bytes(plan.bytes_written)} in {len(plan.shards)} shard(s): "
          + ", ".join(s.filename for s in plan.shards[:3]) + (" ..." if len(plan.shards) > 3 else ""), file=out)


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}..{v}")
            start = None
    return ", ".join(parts)


def plot_shares(plan: MergePlan, target) -> None:
    """Each model's share per decoder block, into ``target`` (an outdir.AtomicFile): stacked bars when every tensor
    of a block has the same t (blocks outside the window are all model 1), else model 2's share per module group as
    lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SpecError("--plot needs matplotlib: pip install matplotlib") from exc
    rows = [r for r in t_groups(plan) if r.layer is not None]
    layers = list(range(max(plan.num_layers, 1 + max((r.layer for r in rows), default=0))))
    width_in = max(6.0, len(layers) * 0.3)
    fig, ax = plt.subplots(figsize=(width_in, 3.5))
    if all(r.group == "(all)" for r in rows):
        by_layer = {r.layer: r.t_max for r in rows}
        share2 = [by_layer.get(i, 0.0) for i in layers]
        share1 = [1 - t for t in share2]
        ax.bar(layers, share1, color="#4c72b0", label="model 1")
        ax.bar(layers, share2, bottom=share1, color="#dd8452", label="model 2 (t)")
        ax.set_ylabel("share")
    else:
        groups = sorted({r.group for r in rows})
        for group in groups:
            points = sorted((r.layer, (r.t_min + r.t_max) / 2) for r in rows if r.group == group)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=group)
        ax.set_ylabel("model 2's share (t)")
    ax.set_xlabel("decoder block")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks are whole numbers
    import textwrap

    # the title wrapped to the axes' width (about 13 characters an inch at 9 points), never cut at the edge; the
    # legend beside the axes, where it covers no bar and no line
    title = f"gpumerge: {recipe_line(plan)}, {plan.spec.blend_method}"
    ax.set_title(textwrap.fill(title, width=int(width_in * 13)), fontsize=9)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, borderaxespad=0)
    fig.tight_layout()
    try:
        with target.open() as fh:
            fig.savefig(fh, dpi=100, format=target.path.suffix.lstrip(".").lower(), bbox_inches="tight")
        target.commit()
    except OSError as exc:
        raise SpecError(f"--plot {target.path}: cannot write the picture ({exc.strerror})") from exc
    finally:
        plt.close(fig)
