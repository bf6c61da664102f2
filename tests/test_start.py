"""Never worse than the start: validation at step 0 competes for the best checkpoint, and the
zero-shot backbone's validation score is measured beside it."""

from __future__ import annotations

import json
import re

import torch
from conftest import TASK_YAML, sentences, write_jsonl
from safetensors.torch import load_file

from tunelab.__main__ import main
from tunelab.lm.predict import predict_logprobs
from tunelab.methods import hybrid, prompt_tuning
from tunelab.methods.base import TunedLM, backbone_alone
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train.config import TrainConfig
from tunelab.train.loop import train


def _prepared(task_path, backbone):
    return PreparedTask.load(load_task(task_path), backbone.tokenizer)


def _accuracy(tuned, prep, split="validation") -> float:
    examples = prep.examples(split)
    logp = predict_logprobs(tuned, examples, prep.verbalizer, prep.tokenizer.pad_token_id)
    gold = torch.tensor([ex.label for ex in examples])
    return (logp.argmax(-1) == gold).float().mean().item()


def _scripted(scores):
    """A `validate` that returns the given scores in turn and counts its calls."""
    it = iter(scores)

    def validate(model) -> float:
        validate.calls += 1
        return next(it)

    validate.calls = 0
    return validate


def _run(backbone, prep, out, validate, resume=False, **cfg):
    """Prompt tuning through the loop with a scripted validation; (result, start, tuned)."""
    settings = dict(steps=4, batch_size=4, eval_every=2, save_every=2, warmup=0, lr=0.1)
    tuned = prompt_tuning.build(backbone, prompt_tuning.PromptTuningConfig(), prep.verbalizer)
    start = tuned.prompt.embedding.detach().clone()
    pad = backbone.tokenizer.pad_token_id
    res = train(
        tuned, prep.examples("train"), [], prep.verbalizer, TrainConfig(**{**settings, **cfg}),
        settings["lr"], out, pad, resume=resume, validate=validate,
    )  # fmt: skip
    return res, start, tuned


def test_the_start_is_kept_when_no_step_beats_it(tiny_backbone, tiny_task, tmp_path):
    prep = _prepared(tiny_task, tiny_backbone)
    res, start, tuned = _run(tiny_backbone, prep, tmp_path / "a", _scripted([0.6, 0.5, 0.5]))
    assert res.best_step == 0 and res.best_metric == 0.6
    assert res.history[0] == {"step": 0, "validation": 0.6}  # no loss: nothing trained yet
    assert [h.get("validation") for h in res.history[1:]] == [None, 0.5, None, 0.5]
    torch.testing.assert_close(tuned.prompt.embedding, start, atol=0, rtol=0)


def test_a_tie_with_the_start_goes_to_the_trained_weights(tiny_backbone, tiny_task, tmp_path):
    prep = _prepared(tiny_task, tiny_backbone)
    res, start, tuned = _run(tiny_backbone, prep, tmp_path / "a", _scripted([0.5, 0.5, 0.4]))
    assert res.best_step == 2
    assert not torch.equal(tuned.prompt.embedding, start)


def test_patience_counts_from_the_start(tiny_backbone, tiny_task, tmp_path):
    prep = _prepared(tiny_task, tiny_backbone)
    scores = _scripted([0.6, 0.5, 0.5, 0.9])
    res, _, _ = _run(tiny_backbone, prep, tmp_path / "a", scores, steps=8, patience=2)
    assert res.stopped_early and res.step == 4 and res.best_step == 0 and scores.calls == 3


def test_resume_does_not_validate_the_start_again(tiny_backbone, tiny_task, tmp_path):
    prep = _prepared(tiny_task, tiny_backbone)
    _run(tiny_backbone, prep, tmp_path / "a", _scripted([0.5, 0.6]), steps=2)
    again = _scripted([0.7, 0.8])
    res, _, _ = _run(tiny_backbone, prep, tmp_path / "a", again, steps=6, resume=True)
    assert again.calls == 2  # steps 4 and 6: steps 0 and 2 are in the checkpoint
    assert [h["step"] for h in res.history if "validation" in h] == [0, 2, 4, 6]
    assert [h["step"] for h in res.history].count(0) == 1 and res.best_step == 6


def _logprobs(tuned, prep):
    examples = prep.examples("test")
    return predict_logprobs(tuned, examples, prep.verbalizer, prep.tokenizer.pad_token_id)


def test_the_backbone_alone_switches_adapters_off_and_back(tiny_model_dir, tiny_task):
    backbone = load_backbone(str(tiny_model_dir))
    prep = _prepared(tiny_task, backbone)
    zero_shot = _logprobs(TunedLM(backbone.model), prep)
    tuned = hybrid.build(backbone, hybrid.HybridConfig(), prep.verbalizer, seed=1)
    with torch.no_grad():  # a trained core: B is no longer 0
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            if "lora_" in name and name.endswith(".weight") and "layers.0." in name:
                p.requires_grad_(False)  # a part frozen (as a `core=` is) stays frozen
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    adapted = _logprobs(tuned, prep)
    assert not torch.allclose(adapted, zero_shot, atol=1e-3)
    with backbone_alone(tuned) as bare:
        torch.testing.assert_close(_logprobs(bare, prep), zero_shot)
    torch.testing.assert_close(_logprobs(tuned, prep), adapted)
    assert {n: p.requires_grad for n, p in tuned.named_parameters()} == flags


def test_full_fine_tuning_starts_at_zero_shot_without_a_second_pass(
    tiny_backbone, tiny_task, tmp_path
):
    from tunelab.methods import full

    prep = _prepared(tiny_task, tiny_backbone)
    tuned = full.build(tiny_backbone, full.FullConfig(), None)
    with backbone_alone(tuned) as bare:
        assert bare is None  # no parts to take away: its start is the zero-shot model
    scores = _scripted([0.5, 0.6])
    res = train(
        tuned, prep.examples("train"), [], prep.verbalizer, TrainConfig(steps=1, batch_size=4),
        1e-5, tmp_path, tiny_backbone.tokenizer.pad_token_id, validate=scores, zero_shot=True,
    )  # fmt: skip
    assert res.history[0] == {"step": 0, "validation": 0.5, "zero_shot": 0.5}
    assert scores.calls == 2  # step 0 once, step 1


def test_zero_shot_and_start_are_measured_at_step_0(tiny_backbone, tiny_task, tmp_path):
    """A soft prompt changes the answers before any step: the start is not zero-shot."""
    prep = _prepared(tiny_task, tiny_backbone)

    def score(model) -> float:  # a score that sees any change of the answers' probabilities
        return _logprobs(model, prep)[:, 0].mean().item()

    zero_shot = score(TunedLM(tiny_backbone.model))
    tuned = prompt_tuning.build(tiny_backbone, prompt_tuning.PromptTuningConfig(), prep.verbalizer)
    start = score(tuned)
    assert abs(start - zero_shot) > 1e-4  # else this test could not tell them apart
    res = train(
        tuned, prep.examples("train"), [], prep.verbalizer, TrainConfig(steps=1, batch_size=4),
        1e-3, tmp_path, tiny_backbone.tokenizer.pad_token_id, validate=score, zero_shot=True,
    )  # fmt: skip
    assert res.history[0].keys() == {"step", "validation", "zero_shot"}
    assert abs(res.history[0]["validation"] - start) < 1e-5
    assert abs(res.history[0]["zero_shot"] - zero_shot) < 1e-5


def test_a_run_that_training_only_hurts_ends_holding_its_start(tiny_model_dir, tmp_path, capsys):
    """Validation rows carry the label the start gives them all; training rows the other one:
    every step makes validation worse, so the artifact is the initial prompt and scores the
    start's validation accuracy."""
    backbone = load_backbone(str(tiny_model_dir))
    rows = sentences(24, seed=1)
    for name in ("train", "validation", "test"):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
    task = tmp_path / "task.yaml"
    task.write_text(
        TASK_YAML.format(pos="yes", neg="no").replace(
            "  test: test.jsonl", "  test: test.jsonl\n  validation: validation.jsonl"
        )
    )
    prep = _prepared(task, backbone)
    cfg = prompt_tuning.PromptTuningConfig()
    start = prompt_tuning.build(backbone, cfg, prep.verbalizer, seed=42)
    examples = prep.examples("validation")
    pad = prep.tokenizer.pad_token_id
    answers = predict_logprobs(start, examples, prep.verbalizer, pad).argmax(-1).bincount()
    given = prep.verbalizer.labels[int(answers.argmax())]
    other = next(label for label in prep.verbalizer.labels if label != given)
    write_jsonl(tmp_path / "validation.jsonl", [dict(r, label=given) for r in rows])
    write_jsonl(tmp_path / "train.jsonl", [dict(r, label=other) for r in rows])

    out = tmp_path / "run"
    budget = "--set steps=10 --set eval_every=5 --set batch_size=8 --set lr=0.1".split()
    argv = ["train", "--task", str(task), "--model", str(tiny_model_dir), "--out", str(out)]
    assert main([*argv, *budget]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "tunelab.json").read_text())
    m = meta["metrics"]
    assert m["best_step"] == 0 and m["validation_start"] == m["best_validation"] > 0
    assert [h["validation"] for h in meta["history"] if "validation" in h][1:] == [0.0, 0.0]
    line = re.search(r"validation: zero-shot (\S+), start (\S+), best (\S+) at step 0", printed)
    assert line, printed
    assert [float(x.rstrip(",")) for x in line.groups()] == [
        round(m["validation_zero_shot"], 4), round(m["validation_start"], 4),
        round(m["best_validation"], 4),
    ]  # fmt: skip
    saved = load_file(str(out / "adapter_model.safetensors"))["prompt_embeddings"]
    torch.testing.assert_close(saved, start.prompt.embedding.float(), atol=0, rtol=0)
    assert main(["eval", "--adapter", str(out), "--split", "validation"]) == 0
    assert f"accuracy {m['validation_start']:.4f}" in capsys.readouterr().out
