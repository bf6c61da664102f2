"""A comparison: every method on the same data, budget and seeds, each run in its own process
(what `tunelab compare` and `tunelab.compare` do).

With `--tune N` the comparison is fair in the way the field asks for (LM-BFF; PEFT's method
comparison): each trained method first gets the same search (N trials of the same steps,
selected on the validation split only, compare/search.py), then its best settings and its
defaults are both trained again on every seed and scored on the reported split, and the report
gives each method's interval and whether it is tied with the best (compare/stats.py)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.compare import runs
from tunelab.compare.runs import BASELINES
from tunelab.compare.search import PRUNERS, STUDY_FILE, Search, best_trial, space
from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import headline_key
from tunelab.io import write_json
from tunelab.methods import METHODS, find
from tunelab.models import DEFAULT_MODEL

DEFAULT_METHODS = ",".join([*BASELINES, *METHODS])
OURS = ("results.json", "report.md", "report.html", STUDY_FILE, "trials", runs.LABEL_WORDS)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise TunelabError(f"--seeds {text}: expected integers, e.g. 1,2,3") from None
    if not seeds:
        raise TunelabError(f"--seeds {text!r}: no seed given")
    return seeds


def prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix with (or silently replace) an earlier comparison's results."""
    if out.exists() and not out.is_dir():
        raise TunelabError(f"--out {out}: is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not resume:
        if not overwrite:
            raise TunelabError(
                f"--out {out}: not empty; pass --resume to continue the comparison there, "
                "--overwrite to replace it, or choose another folder"
            )
        if not any((out / name).exists() for name in OURS):
            raise TunelabError(
                f"--out {out}: holds no results.json or study; --overwrite deletes only a "
                "folder `tunelab compare` wrote"
            )
        for entry in out.iterdir():  # what compare wrote: its files and its run folders
            if entry.name in OURS or (entry / "run.log").is_file():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


@dataclass
class Comparison:
    """A checked comparison request (`tunelab compare`'s options, typed)."""

    task: object  # TaskSpec
    task_ref: str  # the task file (or built-in name) every run reads
    methods: list[str]
    out: Path
    seeds: list[int]
    train_cfg: object  # TrainConfig: the training settings every trained method shares
    knobs: dict  # method -> the knobs its search tries (with --tune)
    settings: list[str] = field(default_factory=list)  # the --set pairs, as given
    model: str | None = None
    eval_split: str | None = None
    demos: int = 1
    limit: int | None = None
    calibrate: bool = False
    label_words: str = "task"
    tune: int = 0
    search: str = ""
    prune: str = "median"
    resume: bool = False
    overwrite: bool = False
    command: str = ""  # recorded in results.json

    @property
    def trained(self) -> list[str]:
        return [m for m in self.methods if m not in BASELINES]


@dataclass
class CompareResult:
    """What a comparison returns: results.json's contents and where the files are."""

    out: Path
    results: dict  # results.json (SCHEMA.md)
    results_file: Path
    reports: tuple[Path, Path]  # report.md, report.html

    def rows(self) -> list[dict]:
        """The report's rows: per method, its mean, interval and verdict (compare/summary.py)."""
        from tunelab.compare.summary import summarise

        return summarise(self.results)

    def table(self) -> str:
        """A few columns of the report, as `tunelab compare` prints them."""
        return summary_table(self.results)


def make_comparison(
    task_ref: str,
    *,
    methods: str | list[str] = DEFAULT_METHODS,
    seeds: str | list[int] | None = None,
    settings: list[str] = (),
    tune: int = 0,
    search: str | list[str] = "",
    label_words: str = "task",
    prune: str = "median",
    say: Callable[[str], None] = print,
    **options,
) -> Comparison:
    """Check a request before any run: the task (read once here, not in every child), the
    methods, seeds, settings and search. `methods`, `seeds` and `search` may be lists or
    comma-separated text as on the command line."""
    from tunelab.tasks import load_task
    from tunelab.train.config import TrainConfig, apply_settings, parse_pairs

    task = load_task(task_ref)  # bad task files fail here, once, not in every child
    if task.filter:  # of train and validation only: each run reads its reported split
        from tunelab.tasks.data import filter_summary, load_splits

        filtered: dict = {}
        load_splits(task, {task.validation.split}, filtered)
        say("\n".join(filter_summary(filtered)))
    if options.get("calibrate"):
        from tunelab.evaluate.calibrate import refuse_generation

        refuse_generation(task)
    names, seeds, search = check_methods_and_search(methods, seeds, tune, search)
    extra = [k.strip() for k in search.split(",") if k.strip()]
    if label_words not in ("task", "auto"):
        raise TunelabError(f"--label-words must be task or auto, got {label_words!r}")
    if label_words == "auto" and task.is_generation:
        raise TunelabError(
            f"--label-words auto: {task.name} is a generation task; label words are for "
            "classification tasks"
        )
    if prune not in PRUNERS:
        raise TunelabError(f"--prune must be one of {', '.join(PRUNERS)}, got {prune!r}")
    # reject unknown keys and bad values up front; each method gets the keys it understands
    train_cfg, *_ = apply_settings(
        parse_pairs(list(settings)), TrainConfig(), *(m.config() for m in METHODS.values())
    )
    knobs = {m: space(m, extra) for m in names if m not in BASELINES}
    return Comparison(
        task, str(task_ref), names, Path(options.pop("out")), seeds, train_cfg, knobs,
        list(settings), tune=tune, search=search, label_words=label_words, prune=prune,
        **options,
    )  # fmt: skip


def check_methods_and_search(methods, seeds, tune: int, search) -> tuple[list, list, str]:
    """(method names, seeds, search knobs as text), from lists or comma-separated text."""
    if isinstance(methods, str):
        methods = methods.split(",")
    names = [m.strip() for m in methods if m.strip()]
    for name in names:
        if name not in BASELINES and name not in METHODS:
            known = ", ".join([*BASELINES, *METHODS])
            raise TunelabError(f"--methods {name}: unknown method (known: {known})")
    if seeds is None or isinstance(seeds, str):
        seeds = parse_seeds(seeds or ("1,2,3" if tune else "42"))
    if tune < 0:
        raise TunelabError(f"--tune must be >= 1 trials, got {tune}")
    search = search if isinstance(search, str) else ",".join(search)
    if any(k.strip() for k in search.split(",")) and not tune:
        raise TunelabError("--search needs --tune N")
    return names, list(seeds), search


def run_comparison(
    c: Comparison, log: Callable[[str], None] = _stderr, echo: bool = True
) -> CompareResult:
    """Train and score every method on the same data, budget and seeds; with `tune`, each at
    its own best settings too. Writes results.json, report.md and report.html into c.out.
    `log` gets the runs' progress lines; `echo` passes the runs' own progress bars through."""
    prepare_out(c.out, c.resume, c.overwrite)
    task_ref, verbalizer = choose_verbalizer(c, log, echo)
    tuning = {}
    if c.tune:  # selection first, on validation only; the reported split is read after
        for method in c.trained:
            tuning[method] = tune_method(method, c, task_ref, c.knobs[method], c.seeds[0], log)
    records = run_all(c, runs.common_args(task_ref, c.model, c.limit), tuning, log, echo)
    results = _results(c, records, tuning, verbalizer)
    write_json(results, c.out / "results.json")
    from tunelab.compare.report import write_reports

    reports = write_reports(results, c.out)
    return CompareResult(c.out, results, c.out / "results.json", reports)


def choose_verbalizer(c: Comparison, log, echo: bool) -> tuple[str, dict | None]:
    """(the task file every run reads, what results.json records as `verbalizer`): the task's
    own label words, or with label_words=auto the ones searched on the training rows."""
    if c.label_words != "auto":
        words = None if c.task.is_generation else {"source": "task", "words": c.task.verbalizer}
        return c.task_ref, words
    # every method below reads the task with the proposal
    verbalizer = runs.run_label_words(c.task_ref, c.model, c.out, c.resume, log, echo)
    words = ", ".join(f"{label}: {w[0]}" for label, w in verbalizer["words"].items())
    log(
        f"label words: {words} (training accuracy {verbalizer['training_accuracy']:.4f}, "
        f"the task's own {verbalizer['task_training_accuracy']:.4f}); task file "
        f"{verbalizer['task_file']}"
    )
    return verbalizer["task_file"], verbalizer


def run_all(c: Comparison, common: list[str], tuning: dict, log, echo: bool) -> list[dict]:
    """Every run in order (compare/runs.py), each in its own process; their records."""
    records = []
    jobs = _jobs(c.methods, c.seeds, tuning)
    for i, (method, config, seed, params) in enumerate(jobs, start=1):
        tag = f"[{i}/{len(jobs)}] {method}{' tuned' if config == 'tuned' else ''} seed {seed}"
        run_dir = c.out / (f"{method}-tuned-seed{seed}" if config == "tuned" else
                           f"{method}-seed{seed}")  # fmt: skip
        record = _one_run(method, seed, params, run_dir, common, c, tag, log, echo)
        records.append({**record, "config": config, "params": params})
    return records


def tune_method(method: str, c: Comparison, task_ref: str, knobs, seed: int, log=_stderr) -> dict:
    """One method's search on the task file `task_ref`; what results.json keeps of it."""
    search = Search(
        method=method,
        out=c.out,
        n_trials=c.tune,
        steps=c.train_cfg.steps,
        train_args=[
            *runs.common_args(task_ref, c.model, None),
            *[x for kv in runs.settings_for(method, c.settings) for x in ("--set", kv)],
        ],
        knobs=knobs,
        seed=seed,
        pruner=c.prune,
        eval_every=c.train_cfg.eval_every,
    )
    start = time.perf_counter()
    found = search.run(resume=c.resume, log=log)
    best = best_trial(found)
    default = next((t for t in found if t.number == 0), None)
    return {
        "knobs": [k.name for k in knobs],
        "default": default.params if default else None,
        "best": asdict(best) if best else None,
        "trials": [asdict(t) for t in found],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _jobs(names, seeds, tuning) -> list[tuple[str, str, int, dict]]:
    """(method, config, seed, params) in run order: baselines once; trained methods on every
    seed at their defaults, and with --tune at their best settings too (unless the defaults
    were the best)."""
    jobs = []
    for m in names:
        if m in BASELINES:
            jobs.append((m, "default", seeds[0], {}))
            continue
        t = tuning.get(m)
        best = t and t["best"]
        if best:
            jobs += [(m, "tuned", s, best["params"]) for s in seeds]
        if not best or best["number"] != 0:
            jobs += [(m, "default", s, (t or {}).get("default") or {}) for s in seeds]
    return jobs


def _one_run(method, seed, params, run_dir: Path, common, c: Comparison, tag: str, log,
             echo: bool) -> dict:  # fmt: skip
    record_file = run_dir / "record.json"
    if c.resume and record_file.is_file():
        kept = json.loads(record_file.read_text())
        if kept.get("status") == "ok":
            log(f"{tag}: done before, kept")
            return kept
        log(f"{tag}: failed before ({kept.get('error')}), trying again")
    run_dir.mkdir(parents=True, exist_ok=True)
    log(tag)
    start = time.perf_counter()
    try:
        if method in BASELINES:
            record = runs.run_baseline(
                method, common, c.eval_split, c.demos, run_dir, c.calibrate, echo
            )
        else:
            settings = [*c.settings, *(f"{k}={v}" for k, v in params.items())]
            record = runs.run_trained(
                method, seed, common, settings, c.eval_split, run_dir, c.resume, c.calibrate,
                echo,
            )  # fmt: skip
    except (OSError, KeyError, ValueError) as e:  # a run that left unreadable results
        record = {"status": "failed", "error": f"{run_dir}: unreadable results: {e!r}"}
    record = {
        "method": method,
        "seed": seed,
        "error": None,
        **record,
        "artifact": str(run_dir),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    log(f"{tag}: {record['status']}" + (f" ({record['error']})" if record["error"] else ""))
    write_json(record, record_file)
    return record


def _adds_parts(method: str) -> bool:
    """Whether a run's total parameters count its trainable ones beside the backbone's (a
    baseline's are 0)."""
    record = find(method)
    return record is None or record.adds_parts


def _results(c: Comparison, records, tuning, verbalizer=None) -> dict:
    """results.json (SCHEMA.md)."""
    from tunelab.artifact import versions

    ok = [r for r in records if r["status"] == "ok"]
    fingerprint = next(
        (
            json.loads((Path(r["artifact"]) / "tunelab.json").read_text())["base_model"][
                "fingerprint"
            ]
            for r in ok
            if (Path(r["artifact"]) / "tunelab.json").is_file()
        ),
        None,
    )
    # the backbone alone: methods that add parameters count them in their total
    base = next(
        (
            r["total_parameters"] - (r["trainable_parameters"] if _adds_parts(r["method"]) else 0)
            for r in ok
            if r.get("total_parameters")
        ),
        None,
    )
    for r in records:
        r.setdefault("total_parameters", base)  # the baselines run the backbone as it is
    task, train_cfg = c.task, c.train_cfg
    rows_per_step = train_cfg.batch_size * train_cfg.grad_accum
    return {
        "format": 2,
        "task": task.name,
        "task_kind": "generation" if task.is_generation else "classification",
        "split": next((r["split"] for r in ok), c.eval_split),
        "metric": headline_key(task),
        # records' metrics hold `accuracy_calibrated` too (content-free calibration)
        "calibrate": bool(c.calibrate or task.calibrate),
        "verbalizer": verbalizer,
        "model": {
            "name": c.model or DEFAULT_MODEL,
            "fingerprint": fingerprint,
            "parameters": base,
        },
        "budget": {
            "steps": train_cfg.steps,
            "batch_size": train_cfg.batch_size,
            "grad_accum": train_cfg.grad_accum,
            "seeds": c.seeds,
            "settings": c.settings,
            "trials": c.tune,
            "search": c.search or None,
            "pruner": c.prune if c.tune else None,
            # what every method's search was given: trials x steps x rows per step
            "search_examples": c.tune * train_cfg.steps * rows_per_step,
        },
        "command": c.command,
        "machine": runs.machine(),
        "versions": versions(),
        "tuning": tuning,
        "records": records,
    }


def _gain(over) -> str:
    name, p = over
    return f"{p.difference:+.3f} over {name}, 95% {p.low:+.3f} to {p.high:+.3f}"


def summary_table(results: dict) -> str:
    """A few columns of the report, for the terminal."""
    from tunelab.compare.summary import summarise

    name = results["metric"].replace("_", " ")
    rows = summarise(results)
    key = results["metric"] + "_calibrated"
    shown = any((r["metrics"].get(key) or (None,))[0] is not None for r in rows)
    lines = [
        f"{'method':<15}{name:>12}" + (f"{'calibrated':>12}" if shown else "")
        + f"{'95% interval':>17}{'trainable':>14}{'peak MB':>10}{'train s':>9}  vs best"
    ]  # fmt: skip
    for r in rows:
        if not r["seeds"]:
            lines.append(f"{r['method']:<15}  failed: {r['failed'][0]}")
            continue
        ci = r.get("interval")
        ci_text = f"{ci.low:.3f}-{ci.high:.3f}" if ci else ""
        cal = (r["metrics"].get(key) or (None,))[0]
        cal_text = f"{'—' if cal is None else f'{cal:.4f}':>12}" if shown else ""
        lines.append(
            f"{r['method']:<15}{r['metric']:>12.4f}{cal_text}{ci_text:>17}"
            f"{r['trainable_parameters']:>14,.0f}"
            f"{r['peak_memory_mb']:>10,.0f}{r['train_seconds'] or 0:>9.0f}"
            + f"  {r['verdict'] or ''}"
            + (f" ({_gain(r['over_untrained'])})" if r.get("over_untrained") else "")
        )
    return "\n".join(lines)
