"""`tunelab train`: adapt a model to a task with one method and save the artifact."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

from tunelab import methods
from tunelab.artifact import save_artifact
from tunelab.errors import TunelabError
from tunelab.evaluate.calibrate import measure as measure_calibration
from tunelab.evaluate.calibrate import refuse_generation
from tunelab.evaluate.metrics import headline
from tunelab.evaluate.predict import evaluate_split
from tunelab.io import check_writable_dir, read_tensors_meta
from tunelab.methods.base import TunedLM
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train import distributed
from tunelab.train.config import TrainConfig, apply_overrides
from tunelab.train.loop import epochs_in_run, train


def settings_help() -> str:
    """Every --set key, from the dataclasses themselves, so the help cannot drift."""

    def names(cls) -> str:
        return ", ".join(f.name for f in dataclasses.fields(cls))

    per_method = "; ".join(f"{m}: {names(c)}" for m, c in methods.CONFIGS.items())
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
        help="report on the first N rows of that split only (a quick look)",
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


def enable_gradient_checkpointing(tuned, method: str) -> None:
    """Recompute activations during backward; only useful where gradients cross the backbone."""
    if tuned.head is not None and not any(p.requires_grad for p in tuned.model.parameters()):
        raise TunelabError(
            f"gradient_checkpointing: method {method} with a frozen backbone sends no gradient "
            "through it, so there is nothing to recompute; use train_backbone=true or drop it"
        )
    kwargs = {"use_reentrant": False}  # works when the inputs themselves need no gradient
    if hasattr(tuned.model, "activation_checkpointing_enable"):  # transformers >= 5
        tuned.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        tuned.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def peak_memory_mb(device) -> float:
    """Peak allocated memory on CUDA, else the process's peak resident set size."""
    import resource
    import sys

    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (2**20 if sys.platform == "darwin" else 2**10), 1)


def demonstrations_line(prep: PreparedTask, epochs) -> str:
    """Where demonstrations go, and with `demonstrations.train` what they cost: tokens per
    training row with and without them."""
    demo = prep.task.demonstrations
    n = f"{demo.k} {'in all' if prep.task.is_generation else 'per class'}"
    if not demo.train:
        return (
            f"demonstrations: {n} in validation and inference prompts, none in training "
            "(demonstrations.train: false)"
        )
    if len(epochs.encodings) > 1:
        how = f"drawn afresh for each of {len(epochs.encodings)} epochs"
    else:
        how = "the same every epoch" if demo.select == "similar" else "drawn for the one epoch"
    plain = prep.training_examples(demonstrations=False).mean_tokens()
    return (
        f"demonstrations in training: {n}, {how}; {epochs.mean_tokens():.1f} tokens per "
        f"training row ({plain:.1f} without)"
    )


def check_out(args: argparse.Namespace, run_id: dict) -> None:
    """Before any work: --out can be written, and what it holds is resumed, replaced
    (--overwrite) or refused; never silently overwritten."""
    out = args.out
    check_writable_dir(out, "--out")
    last = out / "checkpoints" / "last.safetensors"
    if args.resume and args.overwrite:
        raise TunelabError("--resume continues the run in --out, --overwrite replaces it: pick one")
    if args.resume:
        if not last.is_file():
            raise TunelabError(
                f"--resume: {last} does not exist, so there is no run to continue; "
                "drop --resume to start one"
            )
        theirs = read_tensors_meta(last).get("run") or {}  # older checkpoints: not recorded
        for key in ("task", "method", "method_config") if theirs else ():
            a, b = theirs.get(key), run_id[key]
            if a != b:
                if isinstance(a, dict) and isinstance(b, dict):  # only the settings that differ
                    a, b = _differ(a, b), _differ(b, a)
                else:
                    a, b = repr(a), repr(b)
                raise TunelabError(
                    f"--resume: {last} is a checkpoint of another run ({key} {a}, not {b}); "
                    "choose another --out"
                )
        return
    if (out / "tunelab.json").is_file() and not args.overwrite:
        raise TunelabError(
            f"--out {out}: holds an artifact; pass --overwrite to replace it (the old one stays "
            "until the new one is complete), --resume to continue its run, or choose another --out"
        )
    if last.is_file() and not args.overwrite:
        raise TunelabError(
            f"--out {out}: holds a checkpoint of an earlier run; pass --resume to continue it, "
            "--overwrite to start over, or choose another --out"
        )


def _differ(a: dict, b: dict) -> str:
    """a's settings that b does not share, as key=value."""
    return ", ".join(f"{k}={v!r}" for k, v in a.items() if b.get(k, object()) != v)


def start_scores(history: list[dict]) -> dict:
    """The validation score of the start (step 0, the method's initialisation) and of the
    backbone alone (zero-shot), from the training history; None where not measured."""
    start = next((h for h in history if h.get("step") == 0), {})
    return {
        "validation_start": start.get("validation"),
        "validation_zero_shot": start.get("zero_shot"),
    }


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


def _calibrated(metrics: dict) -> str:
    """The calibrated accuracy, to follow the plain one on a line ("" when not calibrated)."""
    if "accuracy_calibrated" not in metrics:
        return ""
    return f" (calibrated {metrics['accuracy_calibrated']:.4f})"


def run(args: argparse.Namespace) -> None:
    """Train a method on a task; evaluate the best checkpoint; write the artifact to --out.

    Under `torchrun --nproc_per_node=N` (or `accelerate launch`) the same command trains with
    DistributedDataParallel (or, with fsdp=true, FSDP); rank 0 writes the artifact."""
    task = load_task(args.task)
    if args.calibrate:
        refuse_generation(task)
        task = dataclasses.replace(task, calibrate="content-free")
    method = methods.get(args.method)
    train_cfg, method_cfg = apply_overrides(args.set, TrainConfig(), methods.CONFIGS[args.method]())
    if args.limit is not None and args.limit < 1:
        raise TunelabError(f"--limit must be >= 1, got {args.limit}")
    run_id = {
        "task": task.name,
        "method": args.method,
        "method_config": dataclasses.asdict(method_cfg),
    }
    check_out(args, run_id)
    world, device = distributed.init(train_cfg.device)
    say = print if world.main else lambda *a, **k: None
    backbone = load_backbone(args.model)
    fsdp = train_cfg.fsdp and world.distributed
    if not fsdp:  # under FSDP each block moves to the device as it is sharded, never whole
        backbone.model.to(device)
    val_name = task.validation.split
    # --validate-only: the split reported on is never read (its file is not even opened)
    only = {val_name} if args.validate_only else None
    prep = PreparedTask.load(task, backbone.tokenizer, train_cfg.max_length, only=only)
    if args.validate_only and val_name not in prep.splits:
        raise TunelabError(f"{task.source}: --validate-only needs a {val_name!r} split")
    report = None if args.validate_only else prep.eval_split(args.eval_split)
    if report is not None:
        prep.limit(report, args.limit)
    epochs = prep.training_examples(epochs_in_run(max(1, len(prep.split("train"))), train_cfg))
    train_ex = epochs.of(0)
    val_ex = prep.examples(val_name) if val_name in prep.splits else []
    kind = "generation" if task.is_generation else "labels " + ", ".join(prep.verbalizer.labels)
    reported = f"{len(prep.split(report))} {report}" if report else "no reported split read"
    for line in prep.filter_summary():
        say(line)
    say(f"task {task.name}: {len(train_ex)} train, {len(val_ex)} validation, {reported}; {kind}")
    if prep.demos is not None:
        say(demonstrations_line(prep, epochs))
    evaluate = dict(
        batch_size=train_cfg.eval_batch_size,
        padding_side=train_cfg.padding_side,
        bf16=train_cfg.bf16,
    )

    baseline = None
    if args.baseline and world.main and report is not None:
        untrained = TunedLM(backbone.model)
        cal = measure_calibration(untrained, prep, **evaluate) if task.calibrate else None
        baseline, _ = evaluate_split(untrained, prep, report, calibration=cal, **evaluate)
        print("zero-shot {} {}: {:.4f}".format(report, *headline(baseline)) + _calibrated(baseline))

    tuned = method.build(backbone, method_cfg, prep.verbalizer, train_cfg.seed)
    n_train = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in tuned.parameters())
    folded = ""
    if getattr(tuned.prompt, "reparam", None) is not None:  # reparameterize=residual
        folded = (
            f"; the artifact keeps {tuned.prompt.embedding.numel():,} "
            "(the prompt's MLP is folded into its vectors)"
        )
    say(
        f"{args.method}: {n_train:,} trainable of {n_total:,} parameters "
        f"({100 * n_train / n_total:.4f}%){folded}"
    )
    if train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(tuned, args.method)
    validate = None
    if task.is_generation and val_ex:
        # exact match (execution accuracy for SQL) of greedy decoding on the validation split
        # picks the best checkpoint
        def validate(t) -> float:
            return headline(evaluate_split(t, prep, val_name, **evaluate)[0])[1]

    def follow(record: dict) -> None:  # one JSON line per validation, flushed at once
        with open(args.progress, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    if args.overwrite and world.main:  # the replaced run's; kept until this one can start
        shutil.rmtree(args.out / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    result = train(
        tuned,
        epochs,
        val_ex,
        prep.verbalizer,
        train_cfg,
        train_cfg.lr or method_cfg.lr,
        args.out,
        backbone.tokenizer.pad_token_id,
        resume=args.resume,
        weight_decay=method_cfg.weight_decay
        if train_cfg.weight_decay is None
        else train_cfg.weight_decay,
        validate=validate,
        on_validation=follow if args.progress else None,
        run=run_id,
        zero_shot=not args.validate_only,  # a search's trials need only their own curve
    )
    seconds = time.perf_counter() - start
    sharded = distributed.sharded(tuned)
    metrics = calibration = None
    if world.main or sharded:  # under FSDP every rank runs the model
        with distributed.full_weights(tuned):
            if task.calibrate:  # the label bias of the final weights, kept in the artifact
                calibration = measure_calibration(tuned, prep, **evaluate)
            if report is not None:
                metrics, _ = evaluate_split(
                    tuned, prep, report, calibration=calibration, **evaluate
                )
    if sharded:
        distributed.unshard_to_main(tuned, world)  # rank 0 writes whole tensors
    if not world.main:  # rank 0 holds the same weights and writes the one artifact
        distributed.finish()
        return
    summary = {
        "split": report,
        **({report: metrics} if report else {}),
        "best_validation": result.best_metric,
        "best_step": result.best_step,
        **start_scores(result.history),
        "steps": result.step,
        "train_seconds": round(seconds, 1),
        "trainable_parameters": n_train,
        "total_parameters": n_total,
        "peak_memory_mb": peak_memory_mb(device),
        "world_size": world.size,
    }
    if baseline is not None:
        summary[f"zero_shot_{report}"] = baseline
    save_artifact(
        args.out,
        args.method,
        method_cfg,
        tuned,
        task,
        backbone,
        train_cfg,
        summary,
        result.history,
        prep.demos.pool if prep.demos else None,
        calibration.to_dict() if calibration else None,
    )
    if calibration is not None:
        print(calibration.describe())
    print(
        f"trained {result.step} steps in {seconds:.0f}s; "
        f"peak memory {summary['peak_memory_mb']:,.0f} MB"
    )
    if result.best_metric is not None:
        print(validation_line(summary))
    if metrics is None:
        print(f"artifact: {args.out}")
        distributed.finish()
        return
    name, value = headline(metrics)
    if baseline is not None:
        print(
            f"{report} {name}: zero-shot {headline(baseline)[1]:.4f} -> {args.method} {value:.4f}"
            + _calibrated(metrics)
        )
    else:
        print(f"{report} {name}: {value:.4f}" + _calibrated(metrics))
    print(f"artifact: {args.out}")
    distributed.finish()
