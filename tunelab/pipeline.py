"""One training run from a task to an artifact: what `tunelab train` and `tunelab.train` do.

Each step is a function, and `train_task` calls them in order: check the request, load the
backbone and the task, build the method, train, score the best weights, write the artifact.
Progress lines go to `say` (the CLI prints them; `tunelab.train(progress=False)` drops them);
the result is returned, not printed."""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunelab import methods
from tunelab.artifact import save_artifact
from tunelab.errors import TunelabError
from tunelab.evaluate.calibrate import measure as measure_calibration
from tunelab.evaluate.calibrate import refuse_generation
from tunelab.evaluate.metrics import headline
from tunelab.evaluate.predict import evaluate_split
from tunelab.io import check_writable_dir, read_meta
from tunelab.io import read_tensors_meta as read_checkpoint_meta
from tunelab.methods.base import TunedLM
from tunelab.models import load_backbone
from tunelab.tasks import TaskSpec
from tunelab.tasks.prepared import PreparedTask
from tunelab.train import distributed
from tunelab.train.config import TrainConfig, apply_settings
from tunelab.train.loop import epochs_in_run, train

Say = Callable[[str], None]


@dataclass
class TrainResult:
    """What a training run returns: where the artifact is, and what it measured (the same
    numbers as the artifact's tunelab.json `summary`)."""

    out: Path
    method: str
    split: str | None  # the reported split; None when it was not read (validate_only)
    metrics: dict | None  # on that split
    validation: dict  # best_validation, best_step, validation_start, validation_zero_shot
    summary: dict  # tunelab.json's summary: the above, steps, time, parameters, memory
    seconds: float  # training time
    zero_shot: dict | None = None  # the untrained model on the reported split (baseline)
    calibration: object | None = None  # evaluate.calibrate.Calibration, when measured
    history: list[dict] = field(default_factory=list, repr=False)

    @property
    def steps(self) -> int:
        return self.summary["steps"]


@dataclass
class Request:
    """A checked training request: the task, the method and its settings, the options."""

    task: TaskSpec
    method: str
    out: Path
    train_cfg: TrainConfig
    method_cfg: object
    model: str | None = None
    resume: bool = False
    overwrite: bool = False
    baseline: bool = False
    eval_split: str | None = None
    limit: int | None = None
    validate_only: bool = False
    validate_only_why: str = "--validate-only"  # who asked for it, for the error without one
    validation_log: Path | None = None  # each validation result as a JSON line, as it comes
    progress: bool = True  # progress bars (lines go to train_task's `say`)
    # the method config the artifact records, where it is not the one trained with (None: that)
    artifact_cfg: object = None

    @property
    def run_id(self) -> dict:
        """What --resume compares with the checkpoint's run."""
        return {
            "task": self.task.name,
            "method": self.method,
            "method_config": dataclasses.asdict(self.artifact_cfg or self.method_cfg),
        }


@dataclass
class Data:
    """The prepared task: training rows per epoch, validation rows, the reported split."""

    prep: PreparedTask
    epochs: object  # tasks.prepared Epochs
    val_ex: list
    report: str | None


def make_request(task: TaskSpec, method: str, out, settings, calibrate=False, **options):
    """Check a request before any work: the method, the settings (a mapping or key=value
    pairs, the names of `--set`), --limit."""
    if calibrate:
        refuse_generation(task)
        task = dataclasses.replace(task, calibrate="content-free")
    methods.get(method)
    train_cfg, method_cfg = apply_settings(settings, TrainConfig(), methods.CONFIGS[method]())
    limit = options.get("limit")
    if limit is not None and limit < 1:
        raise TunelabError(f"--limit must be >= 1, got {limit}")
    return Request(task, method, Path(out), train_cfg, method_cfg, **options)


def train_task(req: Request, say: Say = print) -> TrainResult | None:
    """Train a method on a task; evaluate the best checkpoint; write the artifact to req.out.

    Under `torchrun` every rank calls this; rank 0 writes the artifact and gets the result,
    the other ranks get None."""
    if not distributed.world().main:  # (read from the launcher's variables: no group yet)
        say = _silent
    staged = two_stage(req)
    if not (staged and req.resume and not (req.out / "checkpoints").is_dir()):
        # (a two-stage hybrid resumed before its stage 2 began has only its core's checkpoints)
        check_out(req.out, req.run_id, req.resume, req.overwrite)
    if staged:
        req = train_core(req, say)
    result = train_one(req, say, staged)
    distributed.finish()  # once, after every stage: a group left and joined again can hang
    return result


def train_one(req: Request, say: Say, staged: bool = False) -> TrainResult | None:
    """One training run (`train_task` without its checks and stages), in the process group
    it joins and leaves joined; rank 0 writes the artifact and gets the result."""
    world, device = distributed.init(req.train_cfg.device)
    backbone = load_backbone(req.model)
    if not (req.train_cfg.fsdp and world.distributed):
        # (under FSDP each block moves to the device as it is sharded, never whole)
        backbone.model.to(device)
    data = prepare_data(req, backbone, say)
    baseline = None
    if req.baseline and world.main and data.report is not None:
        baseline = zero_shot_baseline(req, backbone, data, say)
    tuned, n_train, n_total = build_tuned(req, backbone, data, say)
    if req.overwrite and world.main:  # the replaced run's; kept until this one can start
        shutil.rmtree(req.out / "checkpoints", ignore_errors=True)
    start = time.perf_counter()
    result = fit(req, tuned, backbone, data, say)
    seconds = time.perf_counter() - start
    if staged:  # the core's training is part of the hybrid's cost: time, trained parameters
        core = read_meta(Path(req.method_cfg.core))["metrics"]
        seconds += core["train_seconds"]
        n_train += core["trainable_parameters"]
    metrics, calibration = score_best(req, tuned, data, world)
    if not world.main:  # rank 0 holds the same weights and writes the one artifact
        return None
    summary = run_summary(data.report, metrics, baseline, result, seconds, n_train, n_total)
    summary["peak_memory_mb"] = peak_memory_mb(device)
    summary["world_size"] = world.size
    if baseline is not None:
        summary[f"zero_shot_{data.report}"] = baseline
    save_artifact(
        req.out,
        req.method,
        req.artifact_cfg or req.method_cfg,
        tuned,
        req.task,
        backbone,
        req.train_cfg,
        summary,
        result.history,
        data.prep.demos.pool if data.prep.demos else None,
        calibration.to_dict() if calibration else None,
    )
    validation = {k: summary[k] for k in ("best_validation", "best_step")}
    validation.update(start_scores(result.history))
    return TrainResult(
        req.out, req.method, data.report, metrics, validation, summary, seconds, baseline,
        calibration, result.history,
    )  # fmt: skip


def two_stage(req: Request) -> bool:
    """A hybrid that trains its own core first (stages=two, no core=DIR given)."""
    cfg = req.method_cfg
    return req.method == "hybrid" and cfg.stages == "two" and not cfg.core


def train_core(req: Request, say: Say) -> Request:
    """Stage 1 of the two-stage hybrid: a LoRA core trained on the task with the hybrid's LoRA
    settings and `steps`, selected on validation, written to OUT/core (a `lora` artifact of its
    own, which other tasks can build on with core=OUT/core). Returns stage 2: the prompt on
    that core, frozen. The hybrid's artifact holds the core's weights itself and records
    `core` empty, so it does not need OUT/core to load. A --resume that finds the core done
    goes on to stage 2."""
    from tunelab.io import META
    from tunelab.methods.hybrid import CORE_DIR

    core = req.out / CORE_DIR
    if req.overwrite or not (core / META).is_file():
        say(f"hybrid stage 1 of 2: a LoRA core on the task, into {core}")
        last = core / "checkpoints" / "last.safetensors"
        resume = req.resume and last.is_file()
        core_req = dataclasses.replace(
            req, method="lora", out=core, method_cfg=req.method_cfg.lora_settings(),
            baseline=False, validate_only=True, validation_log=None, resume=resume,
            overwrite=not resume, validate_only_why=(
                "the two-stage hybrid, which picks its LoRA core on validation (stages=joint or "
                "core=DIR train without one),"
            ),
        )  # fmt: skip
        check_out(core, core_req.run_id, core_req.resume, core_req.overwrite)
        train_one(core_req, say)
        distributed.barrier(distributed.world())  # the other ranks read the core rank 0 wrote
    else:
        say(f"hybrid: the LoRA core in {core} is done (stage 1 of 2)")
    say("hybrid stage 2 of 2: the soft prompt on the frozen core")
    cfg = req.method_cfg
    return dataclasses.replace(
        req, method_cfg=dataclasses.replace(cfg, core=str(core)), artifact_cfg=cfg
    )


def run_summary(report, metrics, baseline, result, seconds, n_train, n_total) -> dict:
    """tunelab.json's `summary` (SCHEMA.md): the reported split's metrics, validation, cost."""
    return {
        "split": report,
        **({report: metrics} if report else {}),
        "best_validation": result.best_metric,
        "best_step": result.best_step,
        **start_scores(result.history),
        "steps": result.step,
        "train_seconds": round(seconds, 1),
        "trainable_parameters": n_train,
        "total_parameters": n_total,
    }


def _silent(*_a, **_k) -> None:
    pass


def prepare_data(req: Request, backbone, say: Say) -> Data:
    """Read and encode the task; say what was kept and how many rows each split has."""
    task, cfg = req.task, req.train_cfg
    val_name = task.validation.split
    # validate_only: the split reported on is never read (its file is not even opened)
    only = {val_name} if req.validate_only else None
    prep = PreparedTask.load(task, backbone.tokenizer, cfg.max_length, only=only)
    if req.validate_only and val_name not in prep.splits:
        raise TunelabError(f"{task.source}: {req.validate_only_why} needs a {val_name!r} split")
    report = None if req.validate_only else prep.eval_split(req.eval_split)
    if report is not None:
        prep.limit(report, req.limit)
    if val_name in prep.splits:  # a quick look validates on as few rows as it reports on
        prep.limit(val_name, req.limit)
    epochs = prep.training_examples(epochs_in_run(max(1, len(prep.split("train"))), cfg))
    train_ex = epochs.of(0)
    val_ex = prep.examples(val_name) if val_name in prep.splits else []
    kind = "generation" if task.is_generation else "labels " + ", ".join(prep.verbalizer.labels)
    reported = f"{len(prep.split(report))} {report}" if report else "no reported split read"
    for line in prep.filter_summary():
        say(line)
    say(f"task {task.name}: {len(train_ex)} train, {len(val_ex)} validation, {reported}; {kind}")
    if prep.demos is not None:
        say(demonstrations_line(prep, epochs))
    return Data(prep, epochs, val_ex, report)


def eval_options(cfg: TrainConfig) -> dict:
    return dict(batch_size=cfg.eval_batch_size, padding_side=cfg.padding_side, bf16=cfg.bf16)


def zero_shot_baseline(req: Request, backbone, data: Data, say: Say) -> dict:
    """The untrained model (same template) on the reported split."""
    untrained = TunedLM(backbone.model)
    evaluate = eval_options(req.train_cfg)
    cal = measure_calibration(untrained, data.prep, **evaluate) if req.task.calibrate else None
    baseline, _ = evaluate_split(
        untrained, data.prep, data.report, calibration=cal, bars=req.progress, **evaluate
    )
    say(
        "zero-shot {} {}: {:.4f}".format(data.report, *headline(baseline))
        + calibrated_text(baseline)
    )
    return baseline


def build_tuned(req: Request, backbone, data: Data, say: Say):
    """The method's model on the backbone; say how many parameters train."""
    tuned = methods.get(req.method).build(
        backbone, req.method_cfg, data.prep.verbalizer, req.train_cfg.seed
    )
    n_train = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in tuned.parameters())
    folded = ""
    if getattr(tuned.prompt, "reparam", None) is not None:  # reparameterize=residual
        folded = (
            f"; the artifact keeps {tuned.prompt.embedding.numel():,} "
            "(the prompt's MLP is folded into its vectors)"
        )
    say(
        f"{req.method}: {n_train:,} trainable of {n_total:,} parameters "
        f"({100 * n_train / n_total:.4f}%){folded}"
    )
    if req.train_cfg.gradient_checkpointing:
        enable_gradient_checkpointing(tuned, req.method)
    return tuned, n_train, n_total


def fit(req: Request, tuned, backbone, data: Data, say: Say):
    """The training loop (train/loop.py), with the task's validation and the request's options."""
    cfg, method_cfg, evaluate = req.train_cfg, req.method_cfg, eval_options(req.train_cfg)
    validate = None
    if req.task.is_generation and data.val_ex:
        # exact match (execution accuracy for SQL) of greedy decoding on the validation split
        # picks the best checkpoint
        def validate(t) -> float:
            split = req.task.validation.split
            scored = evaluate_split(t, data.prep, split, bars=req.progress, **evaluate)
            return headline(scored[0])[1]

    def follow(record: dict) -> None:  # one JSON line per validation, flushed at once
        with open(req.validation_log, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    return train(
        tuned,
        data.epochs,
        data.val_ex,
        data.prep.verbalizer,
        cfg,
        cfg.lr or method_cfg.lr,
        req.out,
        backbone.tokenizer.pad_token_id,
        resume=req.resume,
        weight_decay=method_cfg.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        validate=validate,
        on_validation=follow if req.validation_log else None,
        run=req.run_id,
        zero_shot=not req.validate_only,  # a search's trials need only their own curve
        say=say,
        bars=req.progress,
    )


def score_best(req: Request, tuned, data: Data, world):
    """(metrics on the reported split, calibration) of the best weights; under FSDP every
    rank runs the model, then rank 0 gathers whole tensors to write."""
    sharded = distributed.sharded(tuned)
    metrics = calibration = None
    evaluate = eval_options(req.train_cfg)
    if world.main or sharded:
        with distributed.full_weights(tuned):
            if req.task.calibrate:  # the label bias of the final weights, kept in the artifact
                calibration = measure_calibration(tuned, data.prep, **evaluate)
            if data.report is not None:
                metrics, _ = evaluate_split(
                    tuned,
                    data.prep,
                    data.report,
                    calibration=calibration,
                    bars=req.progress,
                    **evaluate,
                )
    if sharded:
        distributed.unshard_to_main(tuned, world)  # rank 0 writes whole tensors
    return metrics, calibration


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


def check_out(out: Path, run_id: dict, resume: bool, overwrite: bool) -> None:
    """Before any work: `out` can be written, and what it holds is resumed, replaced
    (overwrite) or refused; never silently overwritten."""
    check_writable_dir(out, "--out")
    last = out / "checkpoints" / "last.safetensors"
    if resume and overwrite:
        raise TunelabError("--resume continues the run in --out, --overwrite replaces it: pick one")
    if resume:
        if not last.is_file():
            raise TunelabError(
                f"--resume: {last} does not exist, so there is no run to continue; "
                "drop --resume to start one"
            )
        theirs = read_checkpoint_meta(last).get("run") or {}  # older checkpoints: not recorded
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
    if (out / "tunelab.json").is_file() and not overwrite:
        raise TunelabError(
            f"--out {out}: holds an artifact; pass --overwrite to replace it (the old one stays "
            "until the new one is complete), --resume to continue its run, or choose another --out"
        )
    if last.is_file() and not overwrite:
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


def calibrated_text(metrics: dict) -> str:
    """The calibrated accuracy, to follow the plain one on a line ("" when not calibrated)."""
    if "accuracy_calibrated" not in metrics:
        return ""
    return f" (calibrated {metrics['accuracy_calibrated']:.4f})"
