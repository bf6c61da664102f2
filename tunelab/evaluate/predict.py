"""Evaluating a split: batched prediction (tunelab/lm/predict.py) or generation, then metrics."""

from __future__ import annotations

import time

import torch

from tunelab.device import autocast
from tunelab.lm.predict import predict_logprobs
from tunelab.tasks.template import render
from tunelab.train import distributed


def evaluate_split(
    tuned,
    prepared,
    split: str,
    batch_size: int = 32,
    padding_side: str = "left",
    bf16: bool = False,
    calibration=None,
    bars: bool = True,
) -> tuple[dict, torch.Tensor | list[str]]:
    """Metrics of the model on one split of a prepared task, and its outputs: (N, C) label
    log-probabilities for classification, the generated texts for generation.

    `metrics["per_row"]` holds each row's headline score (1 right, 0 wrong), what intervals and
    paired tests between methods resample (tunelab/compare/stats.py). With a `calibration`
    (tunelab/evaluate/calibrate.py) the outputs are the calibrated log-probabilities, and the
    metrics keep the uncalibrated scores beside the calibrated ones (`accuracy_calibrated`,
    `macro_f1_calibrated`, `confusion_calibrated`, `per_row_calibrated`). `bars=False` hides
    the progress bar."""
    from tqdm import tqdm

    from tunelab.evaluate.metrics import classification_metrics, exact_match, generation_metrics
    from tunelab.lm.generate import greedy_generate

    examples = prepared.examples(split)  # encoded before the clock starts
    task = prepared.task
    start = time.perf_counter()
    with (
        tqdm(
            total=len(examples),
            desc=f"eval {split}",
            unit="ex",
            dynamic_ncols=True,
            mininterval=1.0,
            leave=False,
            # one bar (under FSDP every rank evaluates)
            disable=not (bars and distributed.world().main),
        ) as bar,
        autocast(next(tuned.parameters()).device, bf16),
    ):
        if task.is_generation:
            texts = greedy_generate(
                tuned,
                examples,
                prepared.tokenizer,
                task.generation.max_new_tokens,
                task.generation.stop,
                batch_size,
                progress=bar,
            )
            golds = [render(task.target, r.fields).strip() for r in prepared.split(split)]
            metrics = generation_metrics(golds, texts)
            if task.sql is not None:
                metrics.update(_sql_metrics(task, prepared.split(split), golds, texts))
            else:
                metrics["per_row"] = [int(exact_match(g, t)) for g, t in zip(golds, texts)]
            metrics.update(split=split, seconds=round(time.perf_counter() - start, 3))
            return metrics, texts
        logp = predict_logprobs(
            tuned,
            examples,
            prepared.verbalizer,
            prepared.tokenizer.pad_token_id,
            batch_size,
            padding_side,
            bf16,
            progress=bar,
        )
    gold, pred = [ex.label for ex in examples], logp.argmax(-1).tolist()
    metrics = classification_metrics(gold, pred, prepared.verbalizer.labels)
    metrics.update(
        per_row=[int(g == p) for g, p in zip(gold, pred)],
        split=split,
        seconds=round(time.perf_counter() - start, 3),
    )
    if calibration is not None:
        from tunelab.evaluate.calibrate import apply

        logp = apply(logp, calibration)
        pred = logp.argmax(-1).tolist()
        cal = classification_metrics(gold, pred, prepared.verbalizer.labels)
        metrics.update(
            accuracy_calibrated=cal["accuracy"],
            macro_f1_calibrated=cal["macro_f1"],
            confusion_calibrated=cal["confusion"],
            per_row_calibrated=[int(g == p) for g, p in zip(gold, pred)],
            calibration=calibration.to_dict(),
        )
    return metrics, logp


def _sql_metrics(task, records, golds: list[str], texts: list[str]) -> dict:
    """Execution accuracy and exact-set match of generated SQL (tunelab/evaluate/sql)."""
    from tunelab.evaluate.sql import sql_metrics
    from tunelab.models.load import tunelab_home
    from tunelab.tasks.sql import tables_of

    cfg = task.sql
    db_ids = [str(r.fields[cfg.db_field]) for r in records]
    metrics, verdicts = sql_metrics(
        tables_of(cfg.tables),
        db_ids,
        golds,
        texts,
        tunelab_home() / "sql",
        cfg.databases,
        cfg.seed,
        cfg.timeout,
    )
    return {**metrics, "per_row": [int(v.correct) for v in verdicts]}
