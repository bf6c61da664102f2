"""`tunelab compare`: every method on the same data, budget and seeds, each run in its own process.

With `--tune N` the comparison is fair in the way the field asks for (LM-BFF; PEFT's method
comparison): each trained method first gets the same search (N trials of the same steps,
selected on the validation split only, compare/search.py), then its best settings and its
defaults are both trained again on every seed and scored on the reported split, and the report
gives each method's interval and whether it is tied with the best (compare/stats.py)."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tunelab import methods
from tunelab.compare import runs
from tunelab.compare.runs import BASELINES
from tunelab.compare.search import PRUNERS, STUDY_FILE, Search, best_trial, space
from tunelab.errors import TunelabError
from tunelab.io import write_json
from tunelab.models import DEFAULT_MODEL

DEFAULT_METHODS = "zero-shot,in-context,prompt-tuning,prefix,lora,freeze,head,full,hybrid"
OURS = ("results.json", "report.md", "report.html", STUDY_FILE, "trials", runs.LABEL_WORDS)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task YAML file, or a built-in task: demo")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, run in this order (default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder for the runs, results.json, report.md and report.html",
    )
    p.add_argument("--model", default=None, help="as for `tunelab train`")
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated training seeds; 2+ give mean and spread "
        "(default: 42; with --tune: 1,2,3)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training settings for every trained method (steps, batch_size, bf16, ...)",
    )
    p.add_argument(
        "--eval-split",
        default=None,
        help="the split every method is scored on (default: test, else validation)",
    )
    p.add_argument("--demos", type=int, default=1, help="demonstrations per class for in-context")
    p.add_argument("--limit", type=int, default=None, help="score on the first N rows only")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="also score every method with contextual calibration (as the task key "
        "`calibrate: content-free`): the report shows the calibrated accuracy beside the plain",
    )
    p.add_argument(
        "--label-words",
        default="task",
        choices=("task", "auto"),
        help="auto: first search label words on the training rows (`tunelab label-words`) and "
        "give every method that verbalizer (default: the task's own)",
    )
    p.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="first search each trained method's settings with N trials (the same N and steps "
        "for every method, chosen on the validation split), then train its best and its "
        "default settings on every seed",
    )
    p.add_argument(
        "--search",
        default="",
        help="with --tune: up to two knobs to search besides the learning rate, comma-separated "
        "(num_virtual_tokens, init, reparameterize, r, weight_decay), each where the method "
        "has it",
    )
    p.add_argument(
        "--prune",
        default="median",
        choices=PRUNERS,
        help="with --tune: stop trials whose validation curve trails (default: median)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep runs and trials already finished, continue interrupted ones, retry failed ones",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds an earlier comparison (deletes it)",
    )


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


def run(args: argparse.Namespace) -> None:
    """Train and score every method on the same data, budget and seeds; with --tune, each at
    its own best settings too. Writes results.json, report.md and report.html."""
    from tunelab.tasks import load_task
    from tunelab.train.config import TrainConfig, apply_overrides

    task = load_task(args.task)  # bad task files fail here, once, not in every child
    if task.filter:  # of train and validation only: each run reads its reported split
        from tunelab.tasks.data import filter_summary, load_splits

        filtered: dict = {}
        load_splits(task, {task.validation.split}, filtered)
        print("\n".join(filter_summary(filtered)))
    if args.calibrate:
        from tunelab.evaluate.calibrate import refuse_generation

        refuse_generation(task)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        if name not in BASELINES and name not in methods.METHODS:
            known = ", ".join([*BASELINES, *methods.METHODS])
            raise TunelabError(f"--methods {name}: unknown method (known: {known})")
    seeds = parse_seeds(args.seeds or ("1,2,3" if args.tune else "42"))
    if args.tune < 0:
        raise TunelabError(f"--tune must be >= 1 trials, got {args.tune}")
    extra = [k.strip() for k in args.search.split(",") if k.strip()]
    if extra and not args.tune:
        raise TunelabError("--search needs --tune N")
    if args.label_words == "auto" and task.is_generation:
        raise TunelabError(
            f"--label-words auto: {task.name} is a generation task; label words are for "
            "classification tasks"
        )
    # reject unknown keys and bad values up front; each method gets the keys it understands
    train_cfg, *_ = apply_overrides(
        args.set, TrainConfig(), *(c() for c in methods.CONFIGS.values())
    )
    trained = [m for m in names if m not in BASELINES]
    knobs = {m: space(m, extra) for m in trained}
    prepare_out(args.out, args.resume, args.overwrite)
    task_ref = args.task
    verbalizer = None if task.is_generation else {"source": "task", "words": task.verbalizer}
    if args.label_words == "auto":  # every method below reads the task with the proposal
        verbalizer = runs.run_label_words(args.task, args.model, args.out, args.resume)
        task_ref = verbalizer["task_file"]
        words = ", ".join(f"{label}: {w[0]}" for label, w in verbalizer["words"].items())
        print(
            f"label words: {words} (training accuracy {verbalizer['training_accuracy']:.4f}, "
            f"the task's own {verbalizer['task_training_accuracy']:.4f}); task file {task_ref}",
            file=sys.stderr,
        )
    common = runs.common_args(task_ref, args.model, args.limit)

    tuning = {}
    if args.tune:  # selection first, on validation only; the reported split is read after
        for method in trained:
            tuning[method] = tune_method(method, args, task_ref, train_cfg, knobs[method], seeds[0])

    records = []
    jobs = _jobs(names, seeds, tuning)
    for i, (method, config, seed, params) in enumerate(jobs, start=1):
        tag = f"[{i}/{len(jobs)}] {method}{' tuned' if config == 'tuned' else ''} seed {seed}"
        run_dir = args.out / (f"{method}-tuned-seed{seed}" if config == "tuned" else
                              f"{method}-seed{seed}")  # fmt: skip
        record = _one_run(method, seed, params, run_dir, common, args, tag)
        records.append({**record, "config": config, "params": params})

    results = _results(task, args, train_cfg, seeds, records, tuning, verbalizer)
    write_json(results, args.out / "results.json")
    from tunelab.compare.report import write_reports

    md, html = write_reports(results, args.out)
    print(summary_table(results))
    print(f"results: {args.out / 'results.json'}\nreport: {md}\nreport: {html}")


def tune_method(method: str, args, task_ref: str, train_cfg, knobs, seed: int) -> dict:
    """One method's search on the task file `task_ref`; what results.json keeps of it."""
    search = Search(
        method=method,
        out=args.out,
        n_trials=args.tune,
        steps=train_cfg.steps,
        train_args=[
            *runs.common_args(task_ref, args.model, None),
            *[x for kv in runs.settings_for(method, args.set) for x in ("--set", kv)],
        ],
        knobs=knobs,
        seed=seed,
        pruner=args.prune,
        eval_every=train_cfg.eval_every,
    )
    start = time.perf_counter()
    found = search.run(resume=args.resume, log=lambda m: print(m, file=sys.stderr))
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


def _one_run(method, seed, params, run_dir: Path, common, args, tag: str) -> dict:
    record_file = run_dir / "record.json"
    if args.resume and record_file.is_file():
        kept = json.loads(record_file.read_text())
        if kept.get("status") == "ok":
            print(f"{tag}: done before, kept", file=sys.stderr)
            return kept
        print(f"{tag}: failed before ({kept.get('error')}), trying again", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    print(tag, file=sys.stderr)
    start = time.perf_counter()
    try:
        if method in BASELINES:
            record = runs.run_baseline(
                method, common, args.eval_split, args.demos, run_dir, args.calibrate
            )
        else:
            settings = [*args.set, *(f"{k}={v}" for k, v in params.items())]
            record = runs.run_trained(
                method,
                seed,
                common,
                settings,
                args.eval_split,
                run_dir,
                args.resume,
                args.calibrate,
            )
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
    print(
        f"{tag}: {record['status']}" + (f" ({record['error']})" if record["error"] else ""),
        file=sys.stderr,
    )
    write_json(record, record_file)
    return record


def _results(task, args, train_cfg, seeds, records, tuning, verbalizer=None) -> dict:
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
            r["total_parameters"]
            - (0 if r["method"] in ("full", "freeze") else r["trainable_parameters"])
            for r in ok
            if r.get("total_parameters")
        ),
        None,
    )
    for r in records:
        r.setdefault("total_parameters", base)  # the baselines run the backbone as it is
    rows_per_step = train_cfg.batch_size * train_cfg.grad_accum
    return {
        "format": 2,
        "task": task.name,
        "task_kind": "generation" if task.is_generation else "classification",
        "split": next((r["split"] for r in ok), args.eval_split),
        "metric": runs.headline_metric(task),
        # records' metrics hold `accuracy_calibrated` too (content-free calibration)
        "calibrate": bool(args.calibrate or task.calibrate),
        "verbalizer": verbalizer,
        "model": {
            "name": args.model or DEFAULT_MODEL,
            "fingerprint": fingerprint,
            "parameters": base,
        },
        "budget": {
            "steps": train_cfg.steps,
            "batch_size": train_cfg.batch_size,
            "grad_accum": train_cfg.grad_accum,
            "seeds": seeds,
            "settings": args.set,
            "trials": args.tune,
            "search": args.search or None,
            "pruner": args.prune if args.tune else None,
            # what every method's search was given: trials x steps x rows per step
            "search_examples": args.tune * train_cfg.steps * rows_per_step,
        },
        "command": "tunelab " + shlex.join(args.argv),
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
