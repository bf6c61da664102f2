"""`tunelab train`: adapt a model to a task with one method and save the artifact."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from tunelab import api, methods
from tunelab.errors import SettingError, TunelabError
from tunelab.evaluate.metrics import headline
from tunelab.pipeline import TrainResult, calibrated_text
from tunelab.train import distributed
from tunelab.train.config import TrainConfig, parse_pairs


def settings_help() -> str:
    """Every --set key, from the dataclasses themselves, so the help cannot drift."""

    def names(cls) -> str:
        return ", ".join(f.name for f in dataclasses.fields(cls))

    per_method = "; ".join(f"{name}: {names(m.config)}" for name, m in methods.METHODS.items())
    return f"Training: {names(TrainConfig)}. Per method: {per_method}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task YAML file, or a built-in task: demo")
    p.add_argument(
        "--method",
        default="prompt-tuning",
        choices=list(methods.METHODS),
        help="adaptation method (default: prompt-tuning)",
    )
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument(
        "--model",
        default=None,
        help="hub id, local model directory or .gguf file "
        "(default: built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting, repeatable. " + settings_help(),
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoints/last.safetensors after a crash",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the artifact (or the checkpoints of an unfinished run) in --out; the old "
        "artifact stays until the new one is complete",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also evaluate the untrained model (zero-shot, same template) first",
    )
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="as the task key `calibrate: content-free`: measure the label bias on "
        "content-free inputs with the final weights, store it in the artifact, and report "
        "calibrated scores beside the plain ones",
    )
    p.add_argument(
        "--eval-split",
        default=None,
        help="split reported at the end (default: test, else validation)",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="a quick look: validate and report on the first N rows of each split only",
    )
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="train and validate, but never read the reported split nor evaluate on it "
        "(how `tunelab tune` runs its trials)",
    )
    p.add_argument(
        "--progress",
        type=Path,
        default=None,
        help="append each validation result to this file as a JSON line, as it comes",
    )


def settings_of(pairs: list[str]) -> dict[str, str]:
    """`--set key=value` pairs as the keyword arguments of `tunelab.train` (text values,
    read as YAML there, as before)."""
    return dict(parse_pairs(pairs))


def run(args: argparse.Namespace) -> None:
    """Train a method on a task; evaluate the best checkpoint; write the artifact to --out.

    Under `torchrun --nproc_per_node=N` (or `accelerate launch`) the same command trains with
    DistributedDataParallel (or, with fsdp=true, FSDP); rank 0 writes the artifact."""
    try:
        result = api.train(
            args.task,
            method=args.method,
            out=args.out,
            model=args.model,
            resume=args.resume,
            overwrite=args.overwrite,
            baseline=args.baseline,
            calibrate=args.calibrate,
            eval_split=args.eval_split,
            limit=args.limit,
            validate_only=args.validate_only,
            validation_log=args.progress,
            **settings_of(args.set),
        )
    except SettingError as e:
        raise TunelabError(f"--set {e}") from None
    if result is not None:  # None on the ranks other than 0 of a distributed run
        for line in result_lines(result):
            print(line)
    if distributed.world().distributed:
        # Every file is written and the process group is left. Skip the interpreter's and C++'s
        # teardown: gloo's threads, torn down there, have aborted a finished rank now and then
        # ("terminate called without an active exception", SIGABRT, and torchrun fails the run).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def result_lines(result: TrainResult) -> list[str]:
    """What `tunelab train` prints at the end: time and memory, validation, the score."""
    summary, lines = result.summary, []
    if result.calibration is not None:
        lines.append(result.calibration.describe())
    lines.append(
        f"trained {summary['steps']} steps in {result.seconds:.0f}s; "
        f"peak memory {summary['peak_memory_mb']:,.0f} MB"
    )
    if summary["best_validation"] is not None:
        lines.append(validation_line(summary))
    if result.metrics is not None:
        name, value = headline(result.metrics)
        if result.zero_shot is not None:
            zero = headline(result.zero_shot)[1]
            lines.append(
                f"{result.split} {name}: zero-shot {zero:.4f} -> {result.method} {value:.4f}"
                + calibrated_text(result.metrics)
            )
        else:
            lines.append(f"{result.split} {name}: {value:.4f}" + calibrated_text(result.metrics))
    lines.append(f"artifact: {result.out}")
    return lines


def validation_line(summary: dict) -> str:
    """`validation: zero-shot 0.5200, start 0.4900, best 0.7100 at step 40`."""
    parts = [
        f"{name} {summary[key]:.4f}"
        for name, key in (("zero-shot", "validation_zero_shot"), ("start", "validation_start"))
        if summary.get(key) is not None
    ]
    best = f"best {summary['best_validation']:.4f} at step {summary['best_step']}"
    if summary["best_step"] == 0:
        best += " (no step beat the start: the artifact holds it)"
    return "validation: " + ", ".join([*parts, best])
