"""Demonstrations while training (`demonstrations.train`, LM-BFF): what the training rows read,
that training and the artifact use them for any method, and the errors a user sees."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_task

from tunelab import methods
from tunelab.__main__ import main
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train.config import TrainConfig
from tunelab.train.loop import shared_head_ids, train

TRAIN_DEMOS = "demonstrations: {k: 1, train: true}\n"


def _parts(tok, ex) -> list[str]:
    """A prompt's demonstrations and input, as text."""
    return tok.decode(ex.ids, skip_special_tokens=True).split("\n\n")


def test_training_rows_carry_other_rows_as_demonstrations_drawn_afresh_each_epoch(
    tmp_path, tiny_backbone
):
    tok = tiny_backbone.tokenizer
    prep = PreparedTask.load(load_task(make_task(tmp_path, extra=TRAIN_DEMOS)), tok)
    rows = prep.split("train")
    texts = {
        r.fields["text"] + " It was " + ("yes" if r.fields["label"] == "positive" else "no")
        for r in rows
    }
    epochs = prep.training_examples(3)
    assert len(epochs.encodings) == 3
    for rows_ex in epochs.encodings:
        for r, ex in zip(rows, rows_ex):
            *demos, own = _parts(tok, ex)
            assert own == r.fields["text"] + " It was"  # the input, whole, last
            # one solved row per class, each another training row, never this one
            assert [d.endswith(" It was yes") for d in demos] == [True, False]
            assert all(d in texts for d in demos)
            assert all(r.fields["text"] not in d for d in demos)
    # each epoch draws afresh: most rows read other demonstrations than in epoch 0
    e0, e1 = ([_parts(tok, ex)[:-1] for ex in e] for e in epochs.encodings[:2])
    assert sum(a != b for a, b in zip(e0, e1)) > len(rows) // 2
    # epoch 0 is what inference draws for the same row
    assert [ex.ids for ex in epochs.of(0)] == [ex.ids for ex in prep.examples("train")]
    # validation rows get demonstrations from the training rows, as inference does
    for ex in prep.examples("validation"):
        *demos, _ = _parts(tok, ex)
        assert len(demos) == 2 and all(d in texts for d in demos)
    # the cost: a row with two solved demonstrations is over three bare rows long
    plain = prep.training_examples(demonstrations=False)
    assert 3 * plain.mean_tokens() < epochs.mean_tokens() < 4 * plain.mean_tokens()


def test_without_train_true_only_validation_and_inference_get_demonstrations(
    tmp_path, tiny_backbone
):
    tok = tiny_backbone.tokenizer
    prep = PreparedTask.load(load_task(make_task(tmp_path, extra="demonstrations: {k: 1}\n")), tok)
    epochs = prep.training_examples(3)
    assert len(epochs.encodings) == 1
    assert all(len(_parts(tok, ex)) == 1 for ex in epochs.of(0))
    assert all(len(_parts(tok, ex)) == 3 for ex in prep.examples("validation"))


def test_an_over_long_prompt_drops_whole_demonstrations_before_any_of_the_input(
    tmp_path, tiny_backbone
):
    tok = tiny_backbone.tokenizer
    task = load_task(make_task(tmp_path, extra=TRAIN_DEMOS))
    full = PreparedTask.load(task, tok).training_examples(2)
    ex = full.of(1)[0]
    *demos, own = _parts(tok, ex)
    short = PreparedTask.load(task, tok, max_length=len(ex.ids) - 1).training_examples(2)
    cut = _parts(tok, short.of(1)[0])
    assert cut == [demos[1], own]  # the farthest demonstration went, whole
    assert short.of(1)[0].ids[0] == tok.bos_token_id


@pytest.mark.parametrize("method", ["prompt-tuning", "lora"])
def test_training_with_demonstrations_reusing_the_shared_head_matches_the_plain_path(
    tiny_model_dir, tmp_path, method
):
    path = make_task(tmp_path, extra=TRAIN_DEMOS)
    path.write_text(path.read_text().replace('"{text} It was"', '"Film review: {text} It was"'))
    trained = []
    for reuse in (True, False):
        backbone = load_backbone(str(tiny_model_dir))
        prep = PreparedTask.load(load_task(path), backbone.tokenizer)
        overrides = {"dropout": 0.0} if method == "lora" else {}
        tuned = methods.get(method).build(
            backbone, methods.CONFIGS[method](**overrides), prep.verbalizer, 0
        )
        # 6 steps of 2 micro-batches of 5 rows: 12 of the 8 batches an epoch has, two epochs
        cfg = TrainConfig(
            steps=6, batch_size=5, grad_accum=2, eval_every=100, warmup=1, reuse_head=reuse
        )
        epochs = prep.training_examples(2)
        head = shared_head_ids(tuned, epochs.every_row(), prep.verbalizer, cfg)
        if reuse:  # demonstrations come first: the head is what every one starts with
            assert backbone.tokenizer.decode(head, skip_special_tokens=True) == "Film review: the"
        pad = backbone.tokenizer.pad_token_id
        train(tuned, epochs, [], prep.verbalizer, cfg, 3e-2, tmp_path / str(reuse), pad)
        trained.append(tuned.trainable_state())
    for name in trained[0]:
        torch.testing.assert_close(trained[0][name], trained[1][name], atol=1e-5, rtol=1e-4)


def _train(model, task, out, method, capsys) -> tuple[dict, str]:
    code = main(
        f"train --task {task} --model {model} --method {method} --out {out} --set steps=6 "
        "--set batch_size=8 --set eval_every=3".split()
    )
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return json.loads((out / "tunelab.json").read_text()), printed.out


def _probabilities(path) -> list[dict]:
    return [json.loads(x)["probabilities"] for x in path.read_text().splitlines()]


@pytest.mark.parametrize("method", ["prompt-tuning", "lora"])
def test_train_true_changes_training_and_the_artifact_predicts_with_demonstrations(
    tiny_model_dir, tmp_path, method, capsys
):
    plain_task = make_task(tmp_path)
    plain, said = _train(tiny_model_dir, plain_task, tmp_path / "plain", method, capsys)
    assert "demonstrations" not in said
    task = tmp_path / "demo-task.yaml"
    task.write_text(plain_task.read_text() + TRAIN_DEMOS)
    out = tmp_path / "demos"
    meta, said = _train(tiny_model_dir, task, out, method, capsys)
    # 6 steps of 8 rows read 48 rows: two epochs of the 40 training rows
    line = next(x for x in said.splitlines() if x.startswith("demonstrations in training"))
    assert "1 per class, drawn afresh for each of 2 epochs;" in line
    costs = re.search(r"; ([\d.]+) tokens per training row \(([\d.]+) without\)$", line)
    assert float(costs[1]) > 3 * float(costs[2])
    # (the step-0 record, validation before any update, has no loss)
    losses = [[h["loss"] for h in m["history"] if "loss" in h] for m in (plain, meta)]
    assert losses[0] != losses[1]
    # the artifact keeps the pool and draws from it at inference
    assert meta["task"]["demonstrations"]["train"] is True
    assert len(meta["demonstration_pool"]) == 40
    assert main(["eval", "--adapter", str(out)]) == 0
    with_pool = _probabilities(out / "predictions-test.jsonl")
    assert main(["eval", "--adapter", str(out), "--demos", "0"]) == 0
    bare = _probabilities(out / "predictions-test.jsonl")
    assert with_pool != bare
    first = json.loads((tmp_path / "test.jsonl").read_text().splitlines()[0])["text"]
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out), "--json", first]) == 0
    predicted = json.loads(capsys.readouterr().out)["probabilities"]
    assert predicted == pytest.approx(with_pool[0], abs=1e-4)
    assert predicted != pytest.approx(bare[0], abs=1e-4)


@pytest.mark.parametrize(
    "block, expected",
    [
        ("demonstrations: {train: true}\n", "demonstrations.train: true needs demonstrations.k"),
        ("demonstrations: {k: 1, train: maybe}\n", "expected true or false, got 'maybe'"),
    ],
)
def test_bad_demonstrations_train_exits_2_naming_file_and_line(
    tiny_model_dir, tmp_path, capsys, block, expected
):
    task = make_task(tmp_path, extra=block)
    line = task.read_text().splitlines().index(block.strip()) + 1
    code = main(f"train --task {task} --model {tiny_model_dir} --out {tmp_path / 'run'}".split())
    err = capsys.readouterr().err
    assert code == 2 and f"{task}:{line}: " in err and expected in err
    assert "Traceback" not in err
