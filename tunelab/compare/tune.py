"""`tunelab tune`: one method's search on its own (`tunelab compare --tune` runs one per method)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from tunelab import methods
from tunelab.compare import runs
from tunelab.compare.search import PRUNERS, STUDY_FILE, Search, best_trial, show_params, space
from tunelab.errors import TunelabError
from tunelab.io import write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task YAML file, or a built-in task: demo")
    p.add_argument("--method", required=True, choices=list(methods.METHODS))
    p.add_argument("--trials", type=int, required=True, help="trials in the study")
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help=f"folder for {STUDY_FILE} (the study), trials/ and search.json",
    )
    p.add_argument("--model", default=None, help="as for `tunelab train`")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training settings every trial shares (steps, batch_size, eval_every, ...)",
    )
    p.add_argument(
        "--search",
        default="",
        help="up to two knobs to search besides the learning rate, comma-separated "
        "(num_virtual_tokens, init, reparameterize, r, weight_decay)",
    )
    p.add_argument("--prune", default="median", choices=PRUNERS)
    p.add_argument("--seed", type=int, default=0, help="the sampler's and every trial's seed")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --out (after a crash, or from another process: several "
        "processes may work on one study)",
    )


def run(args: argparse.Namespace) -> None:
    """Search a method's learning rate (and up to two more knobs) on the validation split."""
    from tunelab.tasks import load_task
    from tunelab.train.config import TrainConfig, apply_overrides

    task = load_task(args.task)
    if task.validation.size <= 0 and task.validation.split not in task.data:
        raise TunelabError(f"{task.source}: a search needs a validation split to select on")
    if args.trials < 1:
        raise TunelabError(f"--trials must be >= 1, got {args.trials}")
    train_cfg, _ = apply_overrides(args.set, TrainConfig(), methods.get(args.method).config())
    extra = [k.strip() for k in args.search.split(",") if k.strip()]
    search = Search(
        method=args.method,
        out=args.out,
        n_trials=args.trials,
        steps=train_cfg.steps,
        train_args=[
            *runs.common_args(args.task, args.model, None),
            *[x for kv in args.set for x in ("--set", kv)],
        ],
        knobs=space(args.method, extra),
        seed=args.seed,
        pruner=args.prune,
        eval_every=train_cfg.eval_every,
    )
    found = search.run(resume=args.resume, log=lambda m: print(m, file=sys.stderr))
    best = best_trial(found)
    write_json(
        {"method": args.method, "best": asdict(best) if best else None,
         "trials": [asdict(t) for t in found]},
        args.out / "search.json",
    )  # fmt: skip
    print(f"{'trial':>5}  {'state':<9}{'best validation':>16}  settings")
    for t in found:
        value = f"{t.value:.4f}" if t.value is not None else "—"
        print(f"{t.number:>5}  {t.state:<9}{value:>16}  {show_params(t.params)}")
    if best is None:
        raise TunelabError(f"{args.method}: no trial finished; see {args.out / 'trials'}")
    sets = " ".join(
        f"--set {kv}" for kv in [*args.set, *(f"{k}={v}" for k, v in best.params.items())]
    )
    print(f"best: trial {best.number}, validation {best.value:.4f}")
    print(f"train it: tunelab train --task {args.task} --method {args.method} {sets}")
