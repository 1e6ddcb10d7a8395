"""A sweep's records of its scores: a row per variant scored (and per parent), the append-only log of rows
(results.jsonl, each row marked with the directory's history key so that a copied or edited row is scored again),
the ranking, the verdict, and the files made from the rows (results.csv, results.json, the printed table,
sweep.png). No model, no scoring: gpumerge.sweep_eval scores rows, gpumerge.runs commits these files."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from gpumerge.errors import OutputError

RESULTS_JSONL = "results.jsonl"
_MAX_RESULTS_BYTES = 256 * 2**20  # results.jsonl: ~300 bytes a row


@dataclass
class Row:
    name: str
    values: dict
    key: str
    perplexity: float = math.nan
    per_file: dict = field(default_factory=dict)
    tokens: int = 0
    blend_s: float = 0.0
    eval_s: float = 0.0
    baseline: bool = False
    kept: bool = False
    model_1_itself: bool = False  # a variant whose t is 0 everywhere: model 1's weights, not a blend
    scores: dict = field(default_factory=dict)  # a search's scorers (gpumerge.scorers): name -> value
    objective: float | None = None  # their weighted sum, lower is better; None: ranked by perplexity
    process: int | None = None  # which process scored it, in a launched run of several (gpumerge.distributed)

    def as_dict(self) -> dict:
        data = {"key": self.key, "name": self.name, "perplexity": self.perplexity, "per_file": self.per_file,
                "tokens": self.tokens, "blend_s": round(self.blend_s, 6), "eval_s": round(self.eval_s, 6)}
        if self.objective is not None:
            data.update(scores=self.scores, objective=self.objective)
        if self.process is not None:
            data["process"] = self.process
        return data

    @property
    def measure(self) -> float:
        """What ranks the row, lower is better: the scorers' objective when a search has scorers, else perplexity."""
        return self.objective if self.objective is not None else self.perplexity


def row_key(fingerprints: list[str], rules: str, record: dict) -> str:
    data = json.dumps({"inputs": fingerprints, "rules": rules, "eval": record}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()



# ---- the log ------------------------------------------------------------------------------------------------------

def _mark(row: dict, history: str) -> str:
    """A row's history mark: an HMAC of its fields under the sweep directory's history key (sweep.json)."""
    body = json.dumps({k: v for k, v in row.items() if k != "mark"}, sort_keys=True).encode()
    return hmac.new(bytes.fromhex(history), body, hashlib.sha256).hexdigest()[:32]


def load_done(path: Path, history: str) -> dict[str, dict]:
    """The rows already scored in this directory's history (a results.jsonl), by key. A row without the history's
    mark (copied from elsewhere, edited by hand) or torn (a crash mid-write) is ignored: it is scored again."""
    from gpumerge import fsutil

    done = {}
    if not (path.exists() or path.is_symlink()):
        return done
    raw = fsutil.read_regular(path, max_bytes=_MAX_RESULTS_BYTES, what=f"--output_dir: {path}", error=OutputError)
    for line in raw.decode("utf-8", "replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if (isinstance(row, dict) and isinstance(row.get("key"), str) and _valid(row)
                and hmac.compare_digest(str(row.get("mark")), _mark(row, history))):
            done[row["key"]] = row
    return done


def _valid(row: dict) -> bool:
    """A row as append_row writes it; anything else (a hand edit, a torn line) is scored again."""
    numbers = [row.get("perplexity"), row.get("blend_s"), row.get("eval_s")]
    per_file = row.get("per_file")
    return (all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)
            and (row["perplexity"] >= 1 or math.isnan(row["perplexity"]))
            and isinstance(row.get("tokens"), int) and not isinstance(row.get("tokens"), bool)
            and isinstance(per_file, dict) and bool(per_file)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in per_file.values()))


def _line(row: Row, history: str) -> str:
    data = row.as_dict()
    data["mark"] = _mark(data, history)
    return json.dumps(data) + "\n"


def results_lines(rows: list[Row], history: str) -> bytes:
    """results.jsonl as the sweep's records keep it: every row, marked."""
    return "".join(_line(row, history) for row in rows).encode()


def append_row(path: Path, row: Row, history: str) -> None:
    """One line per scored row, appended and flushed to disk at once: a crash loses at most the row in progress."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"--output_dir: {path} is not a regular file; remove it")
        torn = info.st_size > 0 and os.pread(fd, 1, info.st_size - 1) != b"\n"  # a crash mid-line: start afresh
        os.write(fd, (("\n" if torn else "") + _line(row, history)).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def fill_row(row: Row, done: dict) -> None:
    """A row already scored in this history: its figures from its log line."""
    row.perplexity = float(done["perplexity"])
    row.per_file = dict(done["per_file"])
    row.tokens = int(done.get("tokens", 0))
    row.blend_s = float(done.get("blend_s", 0.0))
    row.eval_s = float(done.get("eval_s", 0.0))


def ranked(rows: list[Row]) -> list[Row]:
    """Lowest perplexity (or objective) first; a NaN or infinite one (a blend that overflowed) last, never best."""
    return sorted(rows, key=lambda r: (not math.isfinite(r.measure), r.measure if math.isfinite(
        r.measure) else 0.0, r.name))


# ---- the files --------------------------------------------------------------------------------------------------

def results_csv(rows: list[Row], columns: list[str], texts) -> bytes:
    """rank, name, one column per swept setting, perplexity (per file when several), tokens, blend_s, eval_s, kept;
    values written exactly (repr), so a row can be re-run."""
    import csv
    import io

    from gpumerge.runs import csv_cell

    per_file = [f"perplexity:{t.name}" for t in texts] if len(texts) > 1 else []
    scorers = list(dict.fromkeys(name for row in rows for name in row.scores))
    scored = ["objective", *(f"score:{name}" for name in scorers)] if any(r.objective is not None for r in rows) else []
    out = io.StringIO()
    table = csv.writer(out, lineterminator="\n")
    table.writerow(["rank", "name", *columns, *scored, "perplexity", *per_file, "tokens", "blend_s", "eval_s", "kept",
                    "model_1_itself"])
    for rank, row in enumerate(ranked(rows), 1):
        marks = [repr(row.objective), *(repr(row.scores.get(name, math.nan)) for name in scorers)] if scored else []
        table.writerow([rank, row.name, *(csv_cell(row.values.get(c)) for c in columns), *marks, repr(row.perplexity),
                        *(repr(row.per_file.get(t.name, math.nan)) for t in texts if per_file), row.tokens,
                        repr(round(row.blend_s, 6)), repr(round(row.eval_s, 6)), "true" if row.kept else "false",
                        "true" if row.model_1_itself else "false"])
    return out.getvalue().encode()


def verdict(rows: list[Row]) -> dict:
    """The sweep's outcome: the best variant (None when none scored a finite perplexity), whether it beat model 1
    (None without the baselines), whether it is model 1 itself, and a sentence that says so."""
    best = next((r for r in ranked(rows) if not r.baseline and math.isfinite(r.measure)), None)
    model_1 = next((r for r in rows if r.name == "model_1" and r.baseline and math.isfinite(r.measure)), None)
    if best is None:
        return {"best": None, "beats_model_1": None, "model_1_itself": False,
                "note": "no variant scored a finite perplexity; there is no best"}
    beats = None if model_1 is None else best.measure < model_1.measure
    note = None
    if best.model_1_itself:
        note = f"the best variant, {best.name}, is model 1 itself (t = 0 everywhere): no blend beat model 1"
        beats = False
    elif beats is False:
        what = "objective " if best.objective is not None else ""
        note = (f"no blend beat model 1 ({what}model_1 {model_1.measure:.4f}; the best variant, {best.name}, "
                f"{best.measure:.4f})")
    return {"best": best.name, "beats_model_1": beats, "model_1_itself": best.model_1_itself, "note": note}


def ranked_rows(rows: list[Row]) -> list[dict]:
    """Every row, best first, as results.json lists them (and run_sweep returns them)."""
    return [{"rank": rank, "name": row.name, "values": row.values, "baseline": row.baseline, **row.as_dict(),
             "kept": row.kept, "model_1_itself": row.model_1_itself} for rank, row in enumerate(ranked(rows), 1)]


def results_json(rows: list[Row], columns: list[str], record: dict, eval_settings: dict,
                 timings: dict | None = None) -> bytes:
    """results.json; ``timings``: where this run's time went (see timings_text)."""
    data = {"tool": "gpumerge", "inputs": record["inputs"], "sweep": record["sweep"], "eval": eval_settings,
            "swept": columns, "verdict": verdict(rows), "rows": ranked_rows(rows)}
    if timings is not None:
        data["timings"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in timings.items()}
    return (json.dumps(data, indent=2) + "\n").encode()


TIMED = (("setup_s", "setup"), ("load_s", "load"), ("inputs_s", "inputs"), ("baselines_s", "baselines"), ("scoring_s", "scoring"),
         ("writing_s", "writing"))


def timings_text(timings: dict) -> str:
    """One line: where an evaluated sweep's time went, e.g. ``load 3.1 s, inputs 2.0 s, baselines 1.1 s (2 rows),
    scoring 52.4 s (100 rows, 0.52 s each), writing 8.8 s``. setup: from the sweep's start to the model's (planning,
    tokenizing, checks); load: model 1 read into the model built on the device;
    inputs: model 2's blended tensors read to it; baselines, scoring: the parents' rows and the variants' (blend and
    perplexity) scored in this run; writing: the kept variants written and committed."""
    parts = []
    for key, label in TIMED:
        if key not in timings:
            continue
        text = f"{label} {timings[key]:.1f} s"
        count = timings.get({"baselines_s": "baselines", "scoring_s": "variants"}.get(key, ""), None)
        if count:
            text += f" ({count} rows" + (f", {timings[key] / count:.2f} s each)" if key == "scoring_s" else ")")
        parts.append(text)
    if timings.get("processes", 1) > 1 and "loop_s" in timings:  # the rows' own times overlap across processes
        parts.append(f"on {timings['processes']} processes: rows scored in {timings['loop_s']:.1f} s of wall time")
    return ", ".join(parts)


def table_text(rows: list[Row], columns: list[str]) -> str:
    """The ranked table printed at the end: rank, name, swept settings, perplexity, change against model_1."""
    if any(r.objective is not None for r in rows):  # a search with scorers: the objective and each score
        scorers = list(dict.fromkeys(name for row in rows for name in row.scores))
        head = ["rank", "name", *columns, "objective", *scorers]
        body = [[str(rank), row.name + (" (kept)" if row.kept else ""), *(_short(row.values.get(c)) for c in columns),
                 f"{row.objective:.4f}", *(f"{row.scores.get(n, math.nan):.4f}" for n in scorers)]
                for rank, row in enumerate(ranked(rows), 1)]
    else:
        reference = next((r.perplexity for r in rows if r.name == "model_1"), None)
        head = ["rank", "name", *columns, "perplexity", "vs model_1"]
        body = []
        for rank, row in enumerate(ranked(rows), 1):
            change = f"{(row.perplexity / reference - 1) * 100:+.2f}%" if reference else ""
            body.append([str(rank), row.name + (" (kept)" if row.kept else ""),
                         *(_short(row.values.get(c)) for c in columns), f"{row.perplexity:.4f}", change])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *body])


def _short(value) -> str:
    from gpumerge.runs import csv_cell

    text = csv_cell(value)
    return text if len(text) <= 24 else text[:21] + "..."


def plot(rows: list[Row], columns: list[str], file) -> None:
    """sweep.png: perplexity against the swept value (one swept setting), a heat map (two), or the best 20 variants
    as bars (more, or a settings file); the parents as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [r for r in rows if not r.baseline]
    numeric = [c for c in columns if all(isinstance(r.values.get(c), (int, float)) and not isinstance(
        r.values.get(c), bool) for r in variants)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    if len(columns) == 1 and numeric:
        points = sorted((r.values[columns[0]], r.perplexity) for r in variants)
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label="variants")
        ax.set_xlabel(columns[0])
    elif len(columns) == 2 and len(numeric) == 2:
        xs = sorted({r.values[columns[0]] for r in variants})
        ys = sorted({r.values[columns[1]] for r in variants})
        grid = [[math.nan] * len(xs) for _ in ys]
        for r in variants:
            grid[ys.index(r.values[columns[1]])][xs.index(r.values[columns[0]])] = r.perplexity
        # the colour range takes in the parents too, so that each has its place on the scale
        finite = [r.perplexity for r in rows if math.isfinite(r.perplexity)]
        low, high = (min(finite), max(finite)) if finite else (None, None)
        margin = (high - low) * 0.03 if finite else 0  # a line at either end stays visible
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r",
                          vmin=low - margin if finite else None, vmax=high + margin if finite else None)
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set_xlabel(columns[0])
        ax.set_ylabel(columns[1])
        bar = fig.colorbar(image, ax=ax, label="perplexity")
        from matplotlib.lines import Line2D

        handles = []
        for r, colour in zip([r for r in rows if r.baseline and math.isfinite(r.perplexity)], ("red", "darkorange")):
            # the parents as reference lines on the colour scale, named in a legend below the map
            bar.ax.axhline(r.perplexity, color=colour, linewidth=2.5)
            handles.append(Line2D([], [], color=colour, linewidth=2.5, label=f"{r.name} ({r.perplexity:.3f})"))
        if handles:
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles),
                      fontsize=8, frameon=False, title="on the colour scale", title_fontsize=8)
        ax.set_title("perplexity of each variant", fontsize=9)
    else:
        best = ranked(variants)[:20]
        ax.barh([r.name for r in best][::-1], [r.perplexity for r in best][::-1], label="variants")
        ax.set_xlabel("perplexity")
        ax.set_ylabel(f"variant (the best {len(best)})")
    if not (len(columns) == 2 and len(numeric) == 2):
        for r in rows:
            if r.baseline:
                draw = ax.axvline if ax.get_xlabel() == "perplexity" else ax.axhline
                draw(r.perplexity, linestyle="--", color="gray" if r.name == "model_1" else "black",
                     label=f"{r.name} ({r.perplexity:.3f})")
        ax.set_ylabel(ax.get_ylabel() or "perplexity")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(file, format="png", bbox_inches="tight")
    plt.close(fig)


def result_files(rows: list[Row], columns: list[str], record: dict, scoring: dict, *, timings: dict | None = None,
                 draw=None) -> dict[str, bytes]:
    """An evaluated sweep's (or a search's) results files: results.jsonl (every row with its history mark),
    results.csv, results.json (with ``timings``), and sweep.png drawn by ``draw(file)`` when matplotlib is there."""
    import io

    texts = scoring["texts"]
    settings = {**scoring["record"], "eval_batch": scoring["settings"].batch,
                "texts": [{"name": t.name, "path": str(t.path), "sha256": t.sha256, "tokens": t.predicted}
                          for t in texts]}
    files = {RESULTS_JSONL: results_lines(rows, record["history"]),
             "results.csv": results_csv(rows, columns, texts),
             "results.json": results_json(rows, columns, record, settings, timings)}
    if scoring["plot"] and draw is not None:
        picture = io.BytesIO()
        draw(picture)
        files["sweep.png"] = picture.getvalue()
    return files
