"""`tunelab eval`, `tunelab predict` and `tunelab label-words`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tunelab.device import resolve_device
from tunelab.errors import TunelabError
from tunelab.evaluate.loaded import distribution, load
from tunelab.evaluate.metrics import format_confusion
from tunelab.io import check_writable_dir, prepare_output_file, write_json, write_text
from tunelab.methods.base import TunedLM
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.tasks.template import render


def _prediction_rows(prep, split: str, outputs):
    """One dict per row: input, gold, prediction (and label probabilities)."""
    task = prep.task
    for i, rec in enumerate(prep.split(split)):
        row = {"input": {k: rec.fields[k] for k in task.input_fields}}
        if task.is_generation:
            row.update(gold=render(task.target, rec.fields).strip(), predicted=outputs[i])
        else:
            labels = prep.verbalizer.labels
            best, dist = distribution(labels, outputs[i].exp().tolist())
            row.update(
                gold=labels[prep.examples(split)[i].label], predicted=best, probabilities=dist
            )
        yield row


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        default=None,
        help="task YAML file or built-in task (default with --adapter: its own task)",
    )
    p.add_argument(
        "--adapter",
        type=Path,
        default=None,
        help="artifact directory from `tunelab train`; without it the untrained "
        "model is evaluated (zero-shot, or in-context with --demos)",
    )
    p.add_argument(
        "--split", default=None, help="split to evaluate (default: test, else validation)"
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model (default: the artifact's, else the built-in SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--demos",
        type=int,
        default=None,
        help="context demonstrations per class (overrides the task file)",
    )
    p.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="write one JSON line per row (default with --adapter: "
        "ADAPTER/predictions-SPLIT.jsonl)",
    )
    p.add_argument("--metrics", type=Path, default=None, help="also write the metrics as JSON")
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="evaluate the first N rows of the split only (a quick look)",
    )
    add_calibrate_argument(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def add_calibrate_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="contextual calibration: divide out the label bias measured on content-free "
        "inputs (default: on where the task says `calibrate: content-free`; an artifact's "
        "stored bias is used, else it is measured now, one forward pass per input)",
    )


def _check_eval_args(args: argparse.Namespace) -> None:
    """Refuse bad options before the model loads, and make sure the outputs can be written
    (a missing folder of --predictions or --metrics is created)."""
    for option, value, least in (
        ("--demos", args.demos, 0),
        ("--batch-size", args.batch_size, 1),
        ("--limit", args.limit, 1),
    ):
        if value is not None and value < least:
            raise TunelabError(f"{option} must be >= {least}, got {value}")
    resolve_device(args.device)
    if args.predictions is not None:
        prepare_output_file(args.predictions, "--predictions")
    elif args.adapter is not None and args.adapter.is_dir():  # the default: inside the artifact
        try:
            check_writable_dir(args.adapter, "--adapter")
        except TunelabError as e:
            raise TunelabError(f"{e} (predictions go there; or --predictions FILE)") from None
    if args.metrics is not None:
        prepare_output_file(args.metrics, "--metrics")


def run_eval(args: argparse.Namespace) -> None:
    """Accuracy, macro-F1 and confusion matrix (exact match and token F1 for generation) of a
    model on a task split."""
    if args.task is None and args.adapter is None:
        raise TunelabError("eval needs --task, --adapter, or both")
    _check_eval_args(args)
    model = load(
        args.adapter,
        task=args.task,
        model=args.model,
        demos=args.demos,
        device=args.device,
        calibrate=args.calibrate,
        bf16=args.bf16,
        batch_size=args.batch_size,
    )
    ev = model.evaluation(args.split, args.limit)
    task, split, metrics, cal = model.task, ev.split, ev.metrics, ev.calibration
    mode = model.method
    if task.sql is not None:
        print(
            f"{task.name} [{split}] {mode}: execution accuracy "
            f"{metrics['execution_accuracy']:.4f}, exact-set match "
            f"{metrics['exact_set_match']:.4f}, exact match {metrics['exact_match']:.4f}, "
            f"n={metrics['n']}"
        )
        print("outcomes: " + ", ".join(f"{k} {v}" for k, v in metrics["sql_outcomes"].items()))
    elif task.is_generation:
        print(
            f"{task.name} [{split}] {mode}: exact match {metrics['exact_match']:.4f}, "
            f"token F1 {metrics['token_f1']:.4f}, n={metrics['n']}"
        )
    else:
        print(
            f"{task.name} [{split}] {mode}: accuracy {metrics['accuracy']:.4f}, "
            f"macro-F1 {metrics['macro_f1']:.4f}, n={metrics['n']}"
        )
        if cal is not None:  # the predictions (and the matrix below) are the calibrated ones
            print(
                f"calibrated: accuracy {metrics['accuracy_calibrated']:.4f}, macro-F1 "
                f"{metrics['macro_f1_calibrated']:.4f} ({cal.describe()})"
            )
            print(format_confusion({**metrics, "confusion": metrics["confusion_calibrated"]}))
        else:
            print(format_confusion(metrics))
    out = args.predictions or (
        args.adapter / f"predictions-{split}.jsonl" if args.adapter else None
    )
    if out is not None:
        rows = _prediction_rows(ev.prep, split, ev.outputs)
        write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), out)
        print(f"predictions: {out}")
    if args.metrics:
        write_text(json.dumps(metrics, indent=2) + "\n", args.metrics)


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", type=Path, required=True, help="artifact directory")
    p.add_argument(
        "text",
        nargs="+",
        metavar="TEXT",
        help="inputs; for a task with several input fields, a JSON object per input",
    )
    p.add_argument("--model", default=None, help="base model (default: the artifact's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per input")
    p.add_argument(
        "--json-input",
        action="store_true",
        help="read every TEXT as a JSON object of the task's input fields (without it, a TEXT "
        "is such an object only when it parses as one; otherwise it is plain text)",
    )
    add_calibrate_argument(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run_predict(args: argparse.Namespace) -> None:
    """The label and label probabilities (or the generated text) for each TEXT, from a trained
    artifact."""
    resolve_device(args.device)
    model = load(args.adapter, model=args.model, device=args.device, calibrate=args.calibrate)
    for p in model.predict(args.text, args.json_input):
        if args.json:
            print(json.dumps(p.to_dict(), ensure_ascii=False))
        elif p.output is not None:
            print(f"{p.output}\t{p.input}")
        else:
            shown = "  ".join(f"{lab}={q:.3f}" for lab, q in p.probabilities.items())
            print(f"{p.label}\t{shown}\t{p.input}")
    sys.stdout.flush()


def add_label_words_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task YAML file or built-in task (classification)")
    p.add_argument(
        "--model", default=None, help="base model (default: the built-in SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--top",
        type=int,
        default=100,
        metavar="K",
        help="each class's candidates come from its K most likely words (default: 100)",
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=10,
        metavar="N",
        help="per class, the N of those that most favour it over the other classes enter the "
        "search for the best assignment (default: 10)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the task with the proposed verbalizer as a task YAML (usable as --task)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the search as JSON")
    p.add_argument(
        "--limit", type=int, default=None, help="search on the first N training rows only"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def run_label_words(args: argparse.Namespace) -> None:
    """Propose label words from the model's vocabulary by their likelihood on the training rows
    (LM-BFF's automatic search); prints a verbalizer block to paste into the task YAML."""
    from tunelab.evaluate.label_words import search
    from tunelab.tasks.yamlfile import task_yaml

    task = load_task(args.task)
    if task.is_generation:
        raise TunelabError(
            f"{args.task}: {task.name} is a generation task (`target:`); label words are for "
            "classification tasks"
        )
    for option, value in (("--top", args.top), ("--candidates", args.candidates),
                          ("--limit", args.limit), ("--batch-size", args.batch_size)):  # fmt: skip
        if value is not None and value < 1:
            raise TunelabError(f"{option} must be >= 1, got {value}")
    resolve_device(args.device)
    for option, path in (("--out", args.out), ("--json", args.json)):
        if path is not None:
            prepare_output_file(path, option)
    backbone = load_backbone(args.model)
    tuned = TunedLM(backbone.model).to(resolve_device(args.device))
    prep = PreparedTask.load(task, backbone.tokenizer, only={"train"})
    prep.limit("train", args.limit)
    found = search(tuned, prep, "train", args.top, args.candidates, args.batch_size)
    print(label_words_table(task, found))
    if args.out is not None:
        header = (
            f"{task.name} with label words proposed by `tunelab label-words` from {found.rows} "
            f"{found.split} rows of {task.source}\n(training accuracy {found.accuracy:.4f}; "
            f"the task's own verbalizer {found.task_accuracy:.4f})"
        )
        write_text(task_yaml(found.task(task), header), args.out)
        print(f"\ntask file: {args.out}")
    if args.json is not None:
        record = {"task": task.name, "task_words": task.verbalizer, **found.to_dict()}
        write_json(record, args.json)
    print("\n" + yaml_block(found.words))


def yaml_block(words: dict[str, str]) -> str:
    """The `verbalizer:` block to paste into a task YAML."""
    import yaml

    return yaml.safe_dump({"verbalizer": words}, sort_keys=False, allow_unicode=True).rstrip()


def label_words_table(task, found, shown: int = 5) -> str:
    """Each class's best candidates (* the proposal) and the training accuracy of the proposal
    against the task's own verbalizer."""
    lines = [
        f"{task.name}: searched {found.vocabulary:,} vocabulary words on {found.rows} "
        f"{found.split} rows, {found.assignments:,} assignments scored",
        f"  {'label':<16}{'word':<18}{'log p':>9}{'vs others':>11}",
    ]
    for label, cands in found.candidates.items():
        chosen = [c for c in cands[shown:] if c.word == found.words[label]]
        for c in cands[:shown] + chosen:
            mark = "*" if c.word == found.words[label] else " "
            lines.append(f"{mark} {label:<16}{c.word:<18}{c.logp:>9.3f}{c.margin:>+11.3f}")
    own = ", ".join(f"{label}: {' / '.join(ws)}" for label, ws in task.verbalizer.items())
    lines += [
        "log p: mean log-probability on the label's rows; vs others: minus its mean on the other "
        "labels' rows",
        f"{found.split} accuracy: proposal {found.accuracy:.4f}, task's verbalizer "
        f"{found.task_accuracy:.4f} ({own})",
    ]
    return "\n".join(lines)
