"""`tunelab compare` and `tunelab advise`: arguments in, `tunelab.compare` / `tunelab.advise`
called, their results printed."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from tunelab import api
from tunelab.compare.advise import PRIORITIES, Advice
from tunelab.compare.run import DEFAULT_METHODS
from tunelab.compare.search import PRUNERS
from tunelab.errors import SettingError, TunelabError
from tunelab.train.config import parse_pairs


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="a quick look: validate and score every run on the first N rows of each split only",
    )
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


def run_compare(args: argparse.Namespace) -> None:
    """Train and score every method on the same data, budget and seeds; with --tune, each at
    its own best settings too. Writes results.json, report.md and report.html."""
    try:
        result = api.compare(
            args.task,
            methods=args.methods,
            out=args.out,
            model=args.model,
            seeds=args.seeds,
            eval_split=args.eval_split,
            demos=args.demos,
            limit=args.limit,
            calibrate=args.calibrate,
            label_words=args.label_words,
            tune=args.tune,
            search=args.search,
            prune=args.prune,
            resume=args.resume,
            overwrite=args.overwrite,
            command="tunelab " + shlex.join(args.argv),
            **dict(parse_pairs(args.set)),
        )
    except SettingError as e:
        raise TunelabError(f"--set {e}") from None
    md, html = result.reports
    print(result.table())
    print(f"results: {result.results_file}\nreport: {md}\nreport: {html}")


def add_advise_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="as for `tunelab train` (its config is read)")
    p.add_argument("--tasks", type=int, default=1, help="how many tasks will be served")
    p.add_argument("--memory-gb", type=float, required=True, help="memory for training, GB")
    p.add_argument("--priority", default="accuracy", choices=PRIORITIES)
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="a `tunelab compare` folder or its results.json: rank by the accuracy measured "
        "there (means, 95%% intervals and ties when it kept per-row scores)",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")


def run_advise(args: argparse.Namespace) -> None:
    """Recommend a method (and a runner-up, with reasons) for your resources and tasks."""
    advice = api.advise(
        model=args.model,
        tasks=args.tasks,
        memory_gb=args.memory_gb,
        priority=args.priority,
        results=args.results,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
    )
    for line in advice_lines(advice):
        print(line)


def advice_lines(advice: Advice) -> list[str]:
    """What `tunelab advise` prints: the pick, the reasons, and every method's row."""
    shape, measured = advice.shape, advice.measured
    lines = [
        f"model: {shape.parameters / 1e6:.0f}M parameters, {shape.layers} layers",
        f"recommended: {advice.recommended}",
        f"runner-up: {advice.runner_up}",
        *(f"  - {reason}" for reason in advice.reasons),
    ]
    label = "accuracy" if measured else "vs best"
    lines.append(f"\n{'method':<14}{label:>9}{'train GB':>10}{'serve GB':>10}  fits  why here")
    for r in advice.table:
        value = r["accuracy"] if measured else r["prior_gap"]
        shown = "—" if value is None else f"{value:+.3f}" if not measured else f"{value:.4f}"
        lines.append(
            f"{r['method']:<14}{shown:>9}{r['train_gb']:>10.2f}{r['serve_gb']:>10.2f}  "
            f"{'yes ' if r['fits'] else 'no  '}  {r['note'] or ''}"
        )
    return lines
