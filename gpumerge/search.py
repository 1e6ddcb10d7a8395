"""`gpumerge sweep --search optuna`: the variants chosen by a sampler instead of a grid.

A search is an evaluated sweep whose variants are produced one at a time: optuna's sampler (TPE, or CMA-ES) asks
for a point of the --space, the point becomes a variant exactly as a grid point does (the same flags, or a
``layer_gradients`` recipe for per-module anchors), the variant is blended into the model held on the device and
scored like any other row, and the score goes back to the sampler. Nothing is written to disk per trial; at the end
the best --keep trials are written as ordinary merges (byte for byte the merge of their settings), with the same
record files as an evaluated sweep (results.csv, results.json, results.jsonl, sweep.png, sweep.json).

The study lives in RUNS/study.db (optuna's RDB storage on SQLite; only this process touches it, under RUNS's lock).
Rerunning the same command continues the study until --trials trials are complete; a trial a killed run left
RUNNING is marked failed and its parameters are asked again first. With a fixed --seed, an uninterrupted search
asks the same trials every time; a resumed one need not follow the same path (the sampler starts afresh).

The model scored holds every tensor's inputs (both models' tensors that a trial could blend) on its device, since
the space decides per trial which tensors are blended.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from gpumerge.errors import OutputError, SpecError
from gpumerge.distributed import SINGLE
from gpumerge.signals import GUARD, Interrupted, test_pause
from gpumerge.space import Dimension, parse_space, trial_settings
from gpumerge.spec import LayerGradientsRecipe, SweepSpec, shown

SAMPLERS = ("tpe", "cmaes")
STUDY_FILE = "study.db"
MAX_TRIALS = 100_000


def _checked(spec: SweepSpec, scorers) -> tuple[tuple[Dimension, ...], str, int]:
    if spec.grid or spec.settings is not None:
        raise SpecError("--search chooses the variants itself: give --space, not --grid or --settings")
    if not spec.eval_text and (scorers is None or any(s.kind == "perplexity" for s in scorers)):
        raise SpecError("--search scores every trial: give --eval-text FILE (the text each trial's perplexity is "
                        "measured on)" + (", or a --scorers file without a perplexity scorer" if scorers is None
                                          else "; the --scorers file has a perplexity scorer"))
    if spec.trials is None or isinstance(spec.trials, bool) or not 1 <= spec.trials <= MAX_TRIALS:
        raise SpecError(f"--search needs --trials N, from 1 to {MAX_TRIALS}; got {shown(spec.trials, limit=20)}")
    sampler = (spec.sampler or "tpe").lower()
    if sampler not in SAMPLERS:
        raise SpecError(f"--sampler {shown(spec.sampler, limit=20)}: use tpe or cmaes")
    seed = 0 if spec.seed is None else spec.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise SpecError(f"--seed must be an integer from 0 to {2**32 - 1}; got {shown(spec.seed, limit=20)}")
    dims = parse_space(spec.space)
    shared = dict(spec.shared)
    clash = [dim.key for dim in dims if dim.key in shared]
    if clash:
        raise SpecError(f"--{clash[0]} is set and also searched by --space {clash[0]}; give one of them")
    if any(dim.anchor for dim in dims):
        blocks = [key for key in ("gradient_start", "gradient_end", "gradient_values") if key in shared]
        if blocks:
            raise SpecError(f"--space layer_gradients.* sets the blocks' gradients, and --{blocks[0]} sets them too; "
                            "give one of them")
    return dims, sampler, seed


def _scorers(spec: SweepSpec):
    """The scorer file's scorers, or None: each trial is scored by perplexity alone."""
    if spec.scorers is None:
        return None
    from gpumerge.scorers import load_scorers

    return load_scorers(spec.scorers)


def _import_optuna(sampler: str):
    try:
        import optuna
        if sampler == "cmaes":
            importlib.import_module("cmaes")  # optuna's CMA-ES sampler needs it
    except ImportError as exc:
        raise SpecError(f"--search optuna needs {exc.name or 'optuna'}, which is not installed: "
                        "pip install 'gpumerge[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _distributions(optuna, dims: tuple[Dimension, ...]) -> dict:
    found = {}
    for dim in dims:
        if dim.kind == "choice":
            found[dim.key] = optuna.distributions.CategoricalDistribution(list(dim.choices))
        elif dim.kind == "int":
            found[dim.key] = optuna.distributions.IntDistribution(dim.low, dim.high)
        else:
            found[dim.key] = optuna.distributions.FloatDistribution(dim.low, dim.high, log=dim.log)
    return found


class _Trials:
    """Trial parameters -> variants, as the grid makes them: the sweep's flags with the searched values in place (and
    a layer_gradients recipe for anchors), through the same merge_spec."""

    def __init__(self, args: SimpleNamespace, dims: tuple[Dimension, ...]) -> None:
        from gpumerge.settings import recipe_settings

        self.args, self.dims = args, dims
        self.config = (recipe_settings(args.config), str(args.config)) if args.config is not None else None
        if self.config is not None and any(dim.anchor for dim in dims):
            settings, source = self.config
            fixed = settings.get("recipe")
            window = [key for key in ("gradient_start", "gradient_end", "layer_start", "layer_end") if key in settings]
            if window or not (fixed is None or isinstance(fixed, LayerGradientsRecipe)):
                what = window[0] if window else "its recipe (gradient_values, operations or a mergekit config)"
                raise SpecError(f"--space layer_gradients.* sets the blocks' gradients, and --config {source} sets "
                                f"{what}; a --config beside searched anchors may give only fixed layer_gradients "
                                "for the modules not searched")

    def variant(self, name: str, params: dict):
        from gpumerge.recipes import parse_recipe
        from gpumerge.settings import merge_spec
        from gpumerge.sweep import Variant

        flags, recipe = trial_settings(self.dims, params)
        merged = {**vars(self.args), **flags}
        source = self.config
        if recipe is not None:
            settings = parse_recipe(recipe, source=f"trial {name}")
            if self.config is not None:  # the --config's other settings, and its fixed gradients of other modules
                settings = {**self.config[0], "recipe": with_fixed(settings["recipe"], self.config[0].get("recipe"))}
            source = (settings, f"trial {name}")
        try:
            spec = merge_spec(merged, output_required=False, recipe=source)
        except SpecError as exc:
            raise SpecError(f"trial {name} ({_shown_params(params)}): {exc}") from None
        return Variant(name, dict(params), spec)

    def midpoint(self) -> dict:
        """A point inside the space (each range's middle, each list's first choice): the search's first check."""
        point = {}
        for dim in self.dims:
            if dim.kind == "choice":
                point[dim.key] = dim.choices[0]
            elif dim.kind == "int":
                point[dim.key] = (dim.low + dim.high) // 2
            else:
                point[dim.key] = math.sqrt(dim.low * dim.high) if dim.log else (dim.low + dim.high) / 2
        return point


def with_fixed(searched: LayerGradientsRecipe, fixed: LayerGradientsRecipe | None) -> LayerGradientsRecipe:
    """A trial's searched per-module gradients with a --config's fixed ones: a searched module replaces the fixed
    entry of its name (in its place); the other searched modules come first, so that where a tensor's name holds both
    a searched and a fixed module key, the searched one decides (the first key contained in a name picks)."""
    if fixed is None:
        return searched
    chosen = dict(searched.modules)
    new = tuple((key, anchors) for key, anchors in searched.modules if key not in dict(fixed.modules))
    return LayerGradientsRecipe(new + tuple((key, chosen.get(key, anchors)) for key, anchors in fixed.modules))


def _shown_params(params: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in params.items())


def _every_tensor_plan(args: SimpleNamespace, a, b, notice):
    """A plan that blends every tensor both models have: the model scored keeps all their inputs on its device."""
    from gpumerge.merge import plan_merge
    from gpumerge.settings import merge_spec

    flags = {key: None for key in vars(args)}
    flags.update(model_path1=args.model_path1, model_path2=args.model_path2, dtype=args.dtype,
                 max_shard_size=args.max_shard_size, device=args.device, max_memory=args.max_memory,
                 gradient_values="[0.5]", tensor_order="names")
    return plan_merge(merge_spec(flags, output_required=False), a, b, notice=lambda line: None)


def _identity(spec: SweepSpec, dims, sampler: str, seed: int, a, b, eval_record: dict, scorers, trials) -> dict:
    # what the --config says, not only where it is: an edited recipe is another search
    config = (hashlib.sha256(repr(sorted(trials.config[0].items(), key=str)).encode()).hexdigest()
              if trials.config is not None else None)
    shared = {key: value for key, value in spec.shared if key not in ("device", "max_memory", "readers")}
    return {"inputs": [a.fingerprint(), b.fingerprint()], "space": [dim.describe() for dim in dims],
            "sampler": sampler, "seed": seed, "shared": shared,
            "scorers": [s.describe() for s in scorers] if scorers else None,
            "config": str(spec.config) if spec.config is not None else None, "config_settings": config,
            "eval": eval_record,
            "definition": "gpumerge-search-1"}


def run_search(spec: SweepSpec, *, notice: Callable[[str], None] = print, progress_factory=None,
               budget: dict[str, int] | None = None, batch_bytes: int | None = None, input_budget: int | None = None):
    """Run (or continue) the search ``spec`` asks for; returns a SweepResult (its rows every trial scored, best
    first; its written the kept trials). Under ``accelerate launch`` with several processes, each batch of trials
    (one per process) is scored in parallel, and every process but the main one returns None."""
    from gpumerge.merge import open_pair, plan_merge
    from gpumerge.outdir import canonical
    from gpumerge.sweep import check_eval_flags, eval_setup, launched, share_scoring

    if not isinstance(spec, SweepSpec):
        spec = SweepSpec.from_flags(vars(spec))
    if not spec.output_dir:
        raise SpecError("--output_dir is required: the directory the search writes its study and kept trials to")
    began = time.perf_counter()
    if spec.search != "optuna":
        raise SpecError(f"--search {shown(spec.search, limit=20)}: the one search is optuna (--search optuna)")
    scorers = _scorers(spec)
    dims, sampler, seed = _checked(spec, scorers)
    args = SimpleNamespace(**{**spec.flags(), "grid": None, "settings": None})
    check_eval_flags(args, scored=True)
    group = launched(args)
    if not group.is_main:
        notice, progress_factory = (lambda line: None), None
    optuna = _import_optuna(sampler)
    trials = _Trials(args, dims)
    first = trials.variant("t0000", trials.midpoint())
    a, b = open_pair(first.spec)
    with a, b:
        GUARD.poll()
        probe = plan_merge(first.spec, a, b, notice=notice)
        for flag, value in (("--model_path1", first.spec.model_path1), ("--model_path2", first.spec.model_path2)):
            canonical(value, flag=flag)
        resident_plan = _every_tensor_plan(args, a, b, notice)
        scoring = eval_setup(args, first.spec, a, [probe], notice)
        if input_budget is not None:
            scoring["input_budget"] = input_budget
        scoring["began"] = began
        share_scoring(scoring, group)
        identity = _identity(spec, dims, sampler, seed, a, b, scoring["record"], scorers, trials)
        scoring["scorers"] = scorers
        if scorers:
            from gpumerge.scorers import score_functions

            scoring["score"] = score_functions(scorers, a.root, texts=scoring["texts"], batch=scoring["settings"].batch)
        name = "gpumerge-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        if not group.is_main:
            score_trials_share(trials, resident_plan, scoring, a, b, group)
            return None
        try:
            return _main_search(optuna, spec, dims, sampler, seed, name, identity, trials, scoring, resident_plan,
                                a, b, notice=notice, progress_factory=progress_factory, budget=budget,
                                batch_bytes=batch_bytes, began=began, args=args)
        except BaseException as exc:
            group.tell_error(exc)  # the others, waiting for a batch, stop with it
            raise


def _main_search(optuna, spec, dims, sampler, seed, name, identity, trials, scoring, resident_plan, a, b, *, notice,
                 progress_factory, budget, batch_bytes, began, args):
    """The main process's search: RUNS checked and locked, the study run, the kept trials written."""
    from gpumerge import runs as runs_dir
    from gpumerge.outdir import Inputs, check_output_path

    inputs = Inputs.of(a, b)

    def existing(path: Path) -> None:
        _check_runs(path, name, overwrite=bool(spec.overwrite))

    runs = check_output_path(args.output_dir, inputs=inputs, overwrite=True, flag="--output_dir",
                             existing=existing)

    def cleanup(created: list[Path]) -> None:  # a study.db a failed first run made, holding no trial
        if runs in created and _only_an_empty_study(runs):
            (runs / STUDY_FILE).unlink(missing_ok=True)

    with runs_dir.locked(runs, notice=notice, check=lambda: _check_runs(runs, name, overwrite=bool(spec.overwrite)),
                         cleanup=cleanup) as earlier:
        return _search(optuna, spec, dims, sampler, seed, name, identity, trials, scoring, resident_plan, a, b,
                       runs=runs, inputs=inputs, notice=notice, progress_factory=progress_factory,
                       budget=budget, batch_bytes=batch_bytes, began=began, earlier=earlier)


def _check_runs(runs: Path, name: str, *, overwrite: bool):
    """RUNS is new, empty, or this search's (its sweep.json names this study, or its study.db holds it): returns
    None, or what an earlier run of it left to retire. With --overwrite, RUNS may hold another sweep or search
    instead, judged as a grid sweep's --overwrite judges it (only its own records, study and variants, nothing
    else): returns its state, whose variants are retired once this search's are in place."""
    from gpumerge import runs as runs_dir

    if not runs.exists():
        return None
    entries = {entry.name for entry in runs.iterdir()} - {runs_dir.PENDING_DIR}
    if not entries:
        return None
    record = runs / runs_dir.SWEEP_FILE
    if record.is_file() and not record.is_symlink():
        from gpumerge import fsutil

        try:
            data = json.loads(fsutil.read_regular(record, max_bytes=2**24, what=str(record), error=OutputError))
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("search"), dict) and data["search"].get("study") == name:
            retiring = data.get("retiring") if isinstance(data.get("retiring"), list) else []
            return runs_dir.RunsState("resume", retire=[n for n in retiring if isinstance(n, str) and n in entries])
    elif (runs / STUDY_FILE).is_file() and not (runs / STUDY_FILE).is_symlink() and _holds_study(runs, name):
        return None
    if overwrite:
        return runs_dir.judge_runs(runs, {"sweep": name}, {}, overwrite=True, read_bytes=False)
    raise OutputError(f"--output_dir {runs} holds another sweep or search (or other files); a search continues only "
                      "its own study: pass --overwrite to replace an earlier sweep or search, or choose another "
                      "directory")


def _holds_study(runs: Path, name: str) -> bool:
    try:
        storage, backend = _open_study(runs, readonly=True)
    except (OutputError, OSError):
        return False
    try:
        return any(study.study_name == name for study in storage.get_all_studies())
    finally:
        backend.close()


def _only_an_empty_study(runs: Path) -> bool:
    """The study.db a failed first run made holds no trial: it goes with the directory this run made."""
    if not (runs / STUDY_FILE).is_file():
        return False
    try:
        storage, backend = _open_study(runs, readonly=True)
    except (OutputError, OSError):
        return False
    try:
        return all(not storage.get_all_trials(storage.get_study_id_from_name(study.study_name), deepcopy=False)
                   for study in storage.get_all_studies())
    finally:
        backend.close()


def study_storage(runs, *, readonly: bool = True):
    """The optuna storage of a search's RUNS/study.db: ``optuna.load_study(study_name=..., storage=...)`` reads it
    (its name is in RUNS/sweep.json, ``search.study``), e.g. for optuna's own plots.

    optuna's JournalStorage on a table of SQLite (one row per journal entry), not optuna's RDB storage: the RDB
    storage writes every suggested parameter and attribute as its own SQLAlchemy transaction, ~20 ms a trial here,
    which the search's overhead goal (<= 5 % of a trial) cannot afford; the journal appends a trial's entries in
    ~2.5 ms (benchmarks/RESULTS.md). Each append is one SQLite transaction (write-ahead log, synchronous=NORMAL: a
    killed process loses nothing committed, a power cut at most the last entries, never the file). optuna has no
    journal backend on SQLite, hence this one; only the main process opens it, under RUNS's lock."""
    return _open_study(runs, readonly=readonly)[0]


def _open_study(runs, *, readonly: bool = False):
    """(the storage, its SQLite journal: close() it when done)."""
    from optuna.storages import JournalStorage

    backend = _journal_backend()(Path(runs) / STUDY_FILE, readonly=readonly)
    return JournalStorage(backend), backend


def _journal_backend():
    from optuna.storages.journal import BaseJournalBackend

    class SQLiteJournal(BaseJournalBackend):
        """optuna's journal as rows of SQLite: (number, the entry as JSON), numbered from 0 without gaps."""

        def __init__(self, path: Path, *, readonly: bool) -> None:
            import sqlite3

            self.path, self.readonly = path, readonly
            try:
                if readonly:  # a URI: the path's own '#', '?' or '%' are not URI syntax
                    self.db = sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True,
                                              isolation_level=None)
                else:
                    self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
                tables = {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                if not tables and not readonly:
                    self.db.execute("CREATE TABLE journal (number INTEGER PRIMARY KEY, entry TEXT NOT NULL)")
                    tables = {"journal"}
                if "journal" in tables and not readonly:  # never a write to a file that is then refused
                    self.db.execute("PRAGMA journal_mode=WAL")
                    self.db.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.Error as exc:
                raise OutputError(f"--output_dir: {path} is not a study gpumerge can read ({exc})") from None
            if "journal" not in tables:
                self.readonly = True  # nothing of ours to fold back: closed as it was found
                self.close()
                raise OutputError(f"--output_dir: {path} holds no study of this gpumerge (a search's study.db is "
                                  "a SQLite file with a journal table; one with optuna's RDB tables is from "
                                  "gpumerge before 2026-12-05): choose another directory")

        def read_logs(self, log_number_from: int):
            import sqlite3

            try:
                rows = self.db.execute("SELECT entry FROM journal WHERE number >= ? ORDER BY number",
                                       (log_number_from,)).fetchall()
                return [json.loads(entry) for (entry,) in rows]
            except (sqlite3.Error, ValueError) as exc:
                raise OutputError(f"--output_dir: the study {self.path} cannot be read ({exc})") from None

        def append_logs(self, logs) -> None:
            import sqlite3

            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    first = self.db.execute("SELECT COALESCE(MAX(number) + 1, 0) FROM journal").fetchone()[0]
                    self.db.executemany("INSERT INTO journal (number, entry) VALUES (?, ?)",
                                        [(first + k, json.dumps(log)) for k, log in enumerate(logs)])
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            except sqlite3.Error as exc:  # a full disk, a file another program holds locked
                raise OutputError(f"--output_dir: the study {self.path} cannot be written ({exc}); what it held "
                                  "before stays as it was") from None

        def close(self) -> None:
            """Back to SQLite's rollback journal, which folds the write-ahead log into study.db and removes
            study.db-wal and -shm (a read-only reader of a file in WAL mode would leave them behind), then closed."""
            import sqlite3

            if not self.readonly:
                try:
                    self.db.execute("PRAGMA journal_mode=DELETE")
                except sqlite3.Error:  # another connection holds it: it stays in WAL mode, whole
                    pass
            self.db.close()

    return SQLiteJournal


def _study(optuna, storage, name: str, sampler: str, seed: int, notice):
    if sampler == "cmaes":
        chosen = optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    else:  # multivariate: the anchors of a gradient move together; one joint sample is also cheaper than one each
        chosen = optuna.samplers.TPESampler(seed=seed, multivariate=True)
    study = optuna.create_study(study_name=name, storage=storage, sampler=chosen, direction="minimize",
                                load_if_exists=True)
    stale = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(name)
    for trial in stale:  # a killed run's trial: failed, and asked again first
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        study.enqueue_trial(trial.params)
    if stale:
        notice(f"{len(stale)} trial(s) an interrupted run left unfinished are marked failed and asked again")
    return study


def _search(optuna, spec, dims, sampler, seed, name, identity, trials: _Trials, scoring, resident_plan, a, b, *,
            runs: Path, inputs, notice, progress_factory, budget, batch_bytes, began, earlier):
    storage, backend = _open_study(runs)
    try:
        return _run_study(optuna, storage, spec, dims, sampler, seed, name, identity, trials, scoring, resident_plan,
                          a, b, runs=runs, inputs=inputs, notice=notice, progress_factory=progress_factory,
                          budget=budget, batch_bytes=batch_bytes, began=began, earlier=earlier)
    finally:  # closed: SQLite folds its log back into study.db and removes study.db-wal and study.db-shm
        backend.close()


def _run_study(optuna, storage, spec, dims, sampler, seed, name, identity, trials: _Trials, scoring, resident_plan,
               a, b, *, runs: Path, inputs, notice, progress_factory, budget, batch_bytes, began, earlier):
    from gpumerge import runs as runs_dir
    from gpumerge.merge import plan_merge
    from gpumerge.results import Row, ranked, ranked_rows, row_key
    from gpumerge.sweep import SweepResult, resident_model, write_variants
    from gpumerge.sweep_eval import stop_after

    study = _study(optuna, storage, name, sampler, seed, notice)
    distributions = _distributions(optuna, dims)
    complete = optuna.trial.TrialState.COMPLETE
    fingerprints = identity["inputs"]
    done = len(study.get_trials(deepcopy=False, states=(complete,)))
    baselines = {key[len("baseline:"):]: value for key, value in study.user_attrs.items()
                 if key.startswith("baseline:")}
    wanted = ["model_1", "model_2"] if scoring["baselines"] else []
    model = None
    setup_s = time.perf_counter() - began
    timings = {"setup_s": setup_s, "load_s": 0.0, "inputs_s": 0.0, "baselines_s": 0.0, "scoring_s": 0.0,
               "baselines": 0, "variants": 0}
    settings = scoring["settings"]
    stop = stop_after()
    group = scoring.get("processes") or SINGLE
    bar = None
    if done < spec.trials or any(w not in baselines for w in wanted):
        model = resident_model(scoring, [resident_plan], [resident_plan], a, b, notice)
        settings = scoring["settings"]  # (the batch fitted to the device)
        timings["load_s"], timings["inputs_s"] = model.load_s, model.inputs_s
        state = "a"
        for which in wanted:
            if which in baselines:
                continue
            started = time.perf_counter()
            if which == "model_2":
                model.set_all("b")
                state = "b"
            baselines[which] = {**_score_model(model, scoring, settings), "eval_s": time.perf_counter() - started}
            study.set_user_attr(f"baseline:{which}", baselines[which])
            timings["baselines_s"] += time.perf_counter() - started
            timings["baselines"] += 1
        if state == "b":
            model.set_all("a", unblended_only=True)
        bar = progress_factory(spec.trials, desc="search", unit="trial") if progress_factory else None
        if bar is not None:
            bar.update(done)
        scored = 0
        while done < spec.trials:
            GUARD.poll()
            started = time.perf_counter()
            # one trial per process: asked together (optuna's sampler draws each with its own random state), scored
            # in parallel, told together; in one process, ask-score-tell one at a time
            asked = [study.ask(distributions) for _ in range(min(group.size, spec.trials - done))]
            group.broadcast(("trials", [(trial.number, trial.params) for trial in asked]))
            outcome, own = _score_trial(asked[0].number, asked[0].params, trials, model, scoring, a, b, group)
            gathered = group.gather(outcome) if group.size > 1 else [outcome]
            group.listening = True  # the others wait for the next batch (or the end)
            errors = [own] if own is not None else []
            errors += [item[1] for item in gathered if item is not None and item[0] == "error"]
            for trial, item in zip(asked, gathered):
                if item is None or item[0] != "row":
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                trial.set_user_attr("row", item[1])
                measure = _measure(item[1], scoring)
                if math.isfinite(measure):
                    study.tell(trial, measure)
                    done += 1  # counted here: asking the storage for every trial each time grows with the study
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                scored += 1
                timings["variants"] += 1
                if bar is not None:
                    bar.update(1)
            if errors:
                raise errors[0]
            test_pause("score")
            timings["scoring_s"] += time.perf_counter() - started
            if stop is not None and scored >= stop:
                import signal

                raise Interrupted(signal.SIGINT)
        if bar is not None:
            bar.close()
    if group.listening:
        group.broadcast(("done",))  # the other processes' part is over: the main one writes
    rows, by_name = [], {}
    for which in wanted:
        row = Row(which, {}, row_key(fingerprints, which, scoring["record"]), baseline=True)
        _fill(row, baselines[which])
        rows.append(row)
    for trial in study.get_trials(deepcopy=False, states=(complete,))[:spec.trials]:
        variant = trials.variant(f"t{trial.number + 1:04d}", trial.params)
        row = Row(variant.name, dict(trial.params), row_key(fingerprints, json.dumps(trial.params, sort_keys=True),
                                                           scoring["record"]))
        _fill(row, trial.user_attrs.get("row", {}))
        rows.append(row)
        by_name[variant.name] = variant
    keep = [r.name for r in ranked([r for r in rows if not r.baseline and math.isfinite(r.measure)])]
    keep = keep[:scoring["keep"]]
    for row in rows:
        row.kept = row.name in keep
        row.model_1_itself = False
    replacing = earlier is not None and earlier.action == "replace"  # --overwrite over another sweep or search
    # a kept trial already in RUNS is this study's (the same settings, written by an earlier run of it), unless RUNS
    # held another sweep or search: then every kept trial is written anew, swapped in over a directory of its name
    plans = {n: plan_merge(by_name[n].spec, a, b, notice=lambda line: None) for n in keep}
    broken = [n for n in keep if not replacing and ((runs / n).exists() or (runs / n).is_symlink())
              and not runs_dir.is_complete(runs / n, plans[n], runs_dir.expected_record(by_name[n], plans[n], a, b),
                                           read_bytes=False)]
    if broken and not spec.overwrite:  # a kept trial already there must be that trial, complete (as a variant must)
        raise OutputError(f"--output_dir {runs}: {runs / broken[0]} is in the way of the kept trial {broken[0]}: it "
                          "is not that trial, complete (its merge record or shards differ from what it recorded); "
                          "remove it, or pass --overwrite to write it again")
    pending = [(by_name[n], plans[n]) for n in keep if replacing or n in broken or not (runs / n).is_dir()]
    replace = [n for n in keep if (replacing or n in broken) and (runs / n).is_dir()]
    retire = sorted(set(earlier.retire + earlier.replace if earlier is not None else []) - set(keep))
    history = study.user_attrs.get("history")
    if history is None:
        import secrets

        history = secrets.token_hex(16)
        study.set_user_attr("history", history)
    columns = [dim.key for dim in dims]
    from gpumerge.about import version

    # a sweep record (gpumerge verify reads it as one): its variants are the trials written to RUNS, now or by an
    # earlier run of this study (every trial would make it grow with the study; results.csv lists them all); the
    # kept ones are those results.json names (its evaluation record makes verify ask for those alone)
    written = [n for n in by_name if n in keep or (runs / n).is_dir()]
    record = {"tool": "gpumerge", "version": version(), "inputs": [], "sweep": name, "history": history,
              "swept": columns, "variants": [{"name": n, "values": by_name[n].values,
                                              "settings": by_name[n].spec.settings(), "same_as": None}
                                             for n in written],
              "retiring": retire, "eval": scoring["record"],
              "search": {"study": name, "file": STUDY_FILE, "trials": spec.trials, **identity}}
    for role, ckpt in (("model_path1", a), ("model_path2", b)):
        record["inputs"].append({"role": role, "path": str(ckpt.root), "fingerprint": ckpt.fingerprint()})
    runs_dir.start_pending(runs, name, history)
    writing = time.perf_counter()
    files: dict[str, bytes] = {}

    def commit() -> None:
        timings["writing_s"] = time.perf_counter() - writing
        files.update(_files(rows, columns, record, scoring, timings, study, dims))
        runs_dir.commit_records(runs, files, remove=tuple(n for n in ("variants.csv",) if n not in files))

    stats = write_variants(pending, a, b, runs=runs, inputs=inputs, notice=notice, progress_factory=progress_factory,
                           budget=budget, batch_bytes=batch_bytes, said_devices=True, replace=replace,
                           checksums=bool(spec.checksums), on_finalized=commit)
    runs_dir.tidy_locks(runs, [])
    runs_dir.retire(runs, retire, notice=notice)  # the earlier run's variants this search does not keep
    if replacing:  # the earlier search's study, replaced by this one (never another's a run cut short had begun)
        for other in optuna.get_all_study_names(storage):
            if other != name:
                optuna.delete_study(study_name=other, storage=storage)
    from gpumerge.results import table_text, verdict

    outcome = verdict(rows)
    best = (outcome["best"] or "none") + (f" ({outcome['note']})" if outcome["note"] else "")
    return SweepResult(runs, tuple(v.name for v, _ in pending), (), {}, time.perf_counter() - began, *stats,
                       table=table_text(rows, columns), best=best, rows=tuple(ranked_rows(rows)), timings=timings)


def _score_trial(number: int | None, params: dict, trials: _Trials, model, scoring: dict, a, b, group):
    """This process's trial of a batch (the batch's ``group.rank``-th; the main process passes the first) blended into
    its model and scored: (("row", figures), None), or (None, None) when the batch has no trial for it. ``model``: the
    ResidentModel, or a function giving it. With several processes whatever it meets (a signal too) comes back as
    (("error", the error as the others raise it), the exception itself), to be gathered before it is raised."""
    from gpumerge.distributed import as_error
    from gpumerge.merge import plan_merge

    if number is None:
        return None, None
    try:
        model = model() if callable(model) else model
        variant = trials.variant(f"t{number + 1:04d}", params)
        plan = _scored_plan(plan_merge(variant.spec, a, b, notice=lambda line: None), a, b)
        blending = time.perf_counter()  # the sampler's ask and the trial's plan are the search's overhead
        model.apply(plan)
        model.synchronize()
        blend_s = time.perf_counter() - blending
        evaluated = time.perf_counter()
        figures = _score_model(model, scoring, scoring["settings"])
        row = {**figures, "blend_s": blend_s, "eval_s": time.perf_counter() - evaluated}
        if group.size > 1:
            row["process"] = group.rank
        return ("row", row), None
    except BaseException as exc:  # every process stops with it, the main one says it
        if group.size == 1:
            raise
        return ("error", as_error(exc)), exc


def _measure(row: dict, scoring: dict) -> float:
    """What the sampler minimizes: the scorers' objective, or the log of the perplexity."""
    if scoring.get("scorers"):
        return row["objective"]
    return math.log(row["perplexity"]) if row["perplexity"] > 0 else math.nan


def score_trials_share(trials: _Trials, resident_plan, scoring: dict, a, b, group) -> None:
    """A process other than the main one: for each batch the main process asks, its trial scored into its own
    resident model (built at its first trial, inside the trial: a failure to build is its trial's error) and handed
    back; until the main process says the search is over (or why it stopped)."""
    from gpumerge.distributed import as_error, told
    from gpumerge.sweep import resident_model
    from gpumerge.sweep_eval import fail_on_process, fail_on_purpose

    quiet = lambda line: None  # noqa: E731 - the main process says what the run does
    built: list = []

    def model():
        if not built:
            built.append(resident_model(scoring, [resident_plan], [resident_plan], a, b, quiet))
        return built[0]

    fail, scored = fail_on_process(), 0
    while True:
        said = group.broadcast(None)
        if said[0] == "error":
            raise told(said[1], group)
        if said[0] == "done":
            return
        batch = said[1]
        number, params = batch[group.rank] if group.rank < len(batch) else (None, None)
        own = None
        try:
            if number is not None and scored:
                fail_on_purpose(fail, group)
            outcome, own = _score_trial(number, params, trials, model, scoring, a, b, group)
        except OutputError as exc:  # the test hook's failure, gathered like any trial's error
            outcome = ("error", as_error(exc))
        scored += number is not None
        group.gather(outcome)
        if own is not None and not isinstance(own, Exception):  # a signal: this process stops where it landed
            raise own


def _score_model(model, scoring: dict, settings) -> dict:
    """A row's figures for the model as it is now: its perplexity, or every scorer's value and their objective."""
    from gpumerge.evaluate import perplexity

    if not scoring.get("scorers"):
        score = perplexity(model.model, scoring["texts"], batch=settings.batch, device=model.device)
        return {"perplexity": score.perplexity, "per_file": score.per_file, "tokens": score.tokens}
    from gpumerge.scorers import objective

    values = scoring["score"](model.model, model.device)
    names = [s.name for s in scoring["scorers"] if s.kind == "perplexity"]
    return {"perplexity": values[names[0]] if names else math.nan, "per_file": {}, "tokens": 0, "scores": values,
            "objective": objective(scoring["scorers"], values)}


def _scored_plan(plan, a, b):
    """A trial's plan as a resident model applies it: slerp coefficients computed (its tensors read for them)."""
    if any(job.method == "slerp" for job in plan.jobs):
        from gpumerge.pipeline import slerp_prepass_many

        return slerp_prepass_many([plan], a, b)[0]
    return plan


def _fill(row, data: dict) -> None:
    row.perplexity = float(data.get("perplexity", math.nan))
    row.per_file = dict(data.get("per_file", {}))
    row.tokens = int(data.get("tokens", 0))
    row.blend_s = float(data.get("blend_s", 0.0))
    row.eval_s = float(data.get("eval_s", 0.0))
    row.process = data.get("process")
    if "objective" in data:
        row.scores = {key: float(value) for key, value in data.get("scores", {}).items()}
        row.objective = float(data["objective"])


def _files(rows, columns, record, scoring, timings, study, dims) -> dict[str, bytes]:
    from gpumerge.results import result_files

    files = result_files(rows, columns, record, scoring, timings=timings,
                         draw=lambda file: plot_search(rows, dims, file))
    files["sweep.json"] = (json.dumps(record, indent=2, default=str) + "\n").encode()
    return files


def plot_search(rows, dims, file) -> None:
    """sweep.png of a search: the best perplexity so far against the trial number (every trial a dot), and the
    perplexity against each searched numeric setting (up to 6); the parents as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [r for r in rows if not r.baseline and math.isfinite(r.measure)]
    label = "objective" if any(r.objective is not None for r in rows) else "perplexity"
    numeric = [dim for dim in dims if dim.kind != "choice"][:6]
    panels = 1 + len(numeric)
    columns = min(panels, 3)
    lines = math.ceil(panels / columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.4 * lines), dpi=100, squeeze=False)
    flat = [ax for line in axes for ax in line]
    order = sorted(trials, key=lambda r: r.name)
    best, so_far = math.inf, []
    for row in order:
        best = min(best, row.measure)
        so_far.append(best)
    numbers = range(1, len(order) + 1)
    flat[0].scatter(numbers, [r.measure for r in order], s=10, color="tab:blue", alpha=0.5, label="trial")
    flat[0].plot(numbers, so_far, color="tab:red", label="best so far")
    flat[0].set_xlabel("trial")
    flat[0].set_ylabel(label)
    for ax, dim in zip(flat[1:], numeric):
        ax.scatter([r.values[dim.key] for r in order], [r.measure for r in order], s=10, alpha=0.6)
        ax.set_xlabel(dim.key)
        if dim.log:
            ax.set_xscale("log")
    for ax in flat[:panels]:
        for row in rows:
            if row.baseline and math.isfinite(row.measure):
                ax.axhline(row.measure, linestyle="--", color="gray" if row.name == "model_1" else "black",
                           linewidth=1, label=f"{row.name} ({row.measure:.3f})" if ax is flat[0] else None)
    for ax in flat[panels:]:
        ax.axis("off")
    flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(file, format="png")
    plt.close(fig)
