"""Generation tasks (a `target:` template): loss on target tokens only, greedy decoding that
agrees with transformers' own, exact match and token F1, training end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_jsonl

from tunelab import methods
from tunelab.__main__ import main
from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import generation_metrics, token_f1
from tunelab.lm.generate import cut_at_stop, greedy_generate
from tunelab.lm.scoring import make_batch
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train.loop import Objective


def target_nll(tuned, batch: dict) -> torch.Tensor:
    """The mean target-token NLL of `batch`, as the training loop computes it."""
    return Objective(tuned, None)(batch, 1 / batch["target_mask"].sum().item())


TABLES = ["singer", "concert", "stadium", "song"]

SQL_TASK = """\
name: tiny-sql
data:
  train: train.jsonl
  test: test.jsonl
input_fields: [question]
template: "Question: {question}\\nSQL:"
target: " {query}"
generation:
  max_new_tokens: 48  # the tiny BPE splits SQL into near-characters
  stop: ["\\n"]
validation:
  size: 0
"""


def sql_rows(tables):
    return [
        {"question": f"How many {t} rows are there?", "query": f"SELECT count(*) FROM {t}"}
        for t in tables
    ]


@pytest.fixture
def sql_task(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", sql_rows(TABLES))
    write_jsonl(tmp_path / "test.jsonl", sql_rows(TABLES[:2]))
    path = tmp_path / "task.yaml"
    path.write_text(SQL_TASK)
    return path


def _prepared(task_path, model_dir):
    backbone = load_backbone(str(model_dir))
    return backbone, PreparedTask.load(load_task(task_path), backbone.tokenizer)


def test_the_loss_counts_target_tokens_only(tiny_model_dir, sql_task):
    backbone, prep = _prepared(sql_task, tiny_model_dir)
    tuned = methods.get("prompt-tuning").build(
        backbone, methods.CONFIGS["prompt-tuning"](num_virtual_tokens=3, init="random"), None
    )
    examples = prep.examples("train")
    assert all(e.target[-1] == backbone.tokenizer.eos_token_id for e in examples)
    batch = make_batch(
        tuned, examples, None, backbone.tokenizer.pad_token_id, "left", torch.device("cpu")
    )
    # the training loss: summed target-token NLL scaled by 1 / (target tokens in the batch)
    got = target_nll(tuned, batch)
    # brute force: full logits of each unpadded row, cross-entropy over its target slots only
    total, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.ids + e.target])
        embeds, mask = tuned.embed(ids, torch.ones_like(ids))
        logits = tuned.model(inputs_embeds=embeds, attention_mask=mask).logits[0]
        n = len(e.target)
        total += F.cross_entropy(logits[-n - 1 : -1], torch.tensor(e.target), reduction="sum")
        count += n
    torch.testing.assert_close(got, total / count, atol=1e-5, rtol=1e-5)


def test_greedy_decoding_matches_transformers_generate(tiny_model_dir, sql_task):
    backbone, prep = _prepared(sql_task, tiny_model_dir)
    tuned = methods.get("lora").build(backbone, methods.CONFIGS["lora"](), None)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)
    tuned.eval()  # LoRA dropout off, for transformers' generate below
    examples = prep.examples("train")
    tok = backbone.tokenizer
    ours = greedy_generate(tuned, examples, tok, max_new_tokens=8, stop=[])
    for e, text in zip(examples, ours):
        ref = tuned.model.generate(
            torch.tensor([e.ids]),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        assert text == tok.decode(ref[0, len(e.ids) :], skip_special_tokens=True).strip()


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix", "hybrid"])
def test_batched_decoding_equals_one_at_a_time(tiny_model_dir, sql_task, method):
    backbone, prep = _prepared(sql_task, tiny_model_dir)
    tuned = methods.get(method).build(backbone, methods.CONFIGS[method](), None)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    examples = prep.examples("train")
    tok = backbone.tokenizer
    batched = greedy_generate(tuned, examples, tok, 8, [], batch_size=4)
    alone = [greedy_generate(tuned, [e], tok, 8, [])[0] for e in examples]
    assert batched == alone


def test_metrics_and_stop_strings():
    assert cut_at_stop("SELECT 1\nQuestion: next", ["\n"]) == "SELECT 1"
    assert cut_at_stop("SELECT 1;", [";", "\n"]) == "SELECT 1"
    m = generation_metrics(["SELECT  a FROM t", "SELECT b FROM t"], ["select a from t", "SELECT c"])
    assert m["exact_match"] == 0.5
    assert token_f1("SELECT b FROM t", "SELECT c") == pytest.approx(2 * (1 / 2) * (1 / 4) / (3 / 4))
    assert m["token_f1"] == pytest.approx((1 + token_f1("SELECT b FROM t", "SELECT c")) / 2)


def test_a_task_is_classification_or_generation(tmp_path, sql_task):
    text = sql_task.read_text()
    sql_task.write_text(text + "label_field: query\nverbalizer: {a: b}\n")
    with pytest.raises(TunelabError, match="either `target:` .* not both"):
        load_task(sql_task)
    sql_task.write_text(text.replace('target: " {query}"\n', ""))
    with pytest.raises(
        TunelabError, match="needs `label_field:` and `verbalizer:` .* or `target:`"
    ):
        load_task(sql_task)
    sql_task.write_text(text)
    (sql_task.parent / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(TunelabError, match=r"train.jsonl:1: missing field 'query'"):
        PreparedTask.load(load_task(sql_task), None)


def test_full_fine_tuning_learns_the_sql_and_the_cli_reports_it(
    tiny_model_dir, sql_task, tmp_path, capsys
):
    out = tmp_path / "run"
    code = main(
        f"train --task {sql_task} --model {tiny_model_dir} --method full --out {out} "
        "--eval-split train --baseline --set steps=80 --set batch_size=4 --set lr=1e-2 "
        "--set warmup=5".split()
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "train exact match: zero-shot 0.0000 -> full 1.0000" in printed
    assert main(["eval", "--adapter", str(out), "--split", "test"]) == 0
    assert "tiny-sql [test] full: exact match 1.0000" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "predictions-test.jsonl").read_text().splitlines()]
    assert rows[0]["predicted"] == rows[0]["gold"] == "SELECT count(*) FROM singer"
    assert main(["predict", "--adapter", str(out), "--json", "How many song rows are there?"]) == 0
    assert json.loads(capsys.readouterr().out)["output"] == "SELECT count(*) FROM song"


def test_head_refuses_a_generation_task(tiny_model_dir, sql_task, tmp_path, capsys):
    code = main(
        f"train --task {sql_task} --model {tiny_model_dir} --method head --out {tmp_path / 'x'} "
        "--set steps=1".split()
    )
    assert code == 2 and "method head needs a classification task" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["prompt-tuning", "prefix", "lora", "full", "freeze", "hybrid"])
def test_every_method_trains_on_generation_and_reloads(tiny_model_dir, sql_task, tmp_path, method):
    from tunelab.artifact import load_artifact, save_artifact
    from tunelab.train.config import TrainConfig
    from tunelab.train.loop import train

    backbone, prep = _prepared(sql_task, tiny_model_dir)
    cfg = methods.CONFIGS[method]()
    tuned = methods.get(method).build(backbone, cfg, None)
    examples = prep.examples("train")
    pad = backbone.tokenizer.pad_token_id
    batch = make_batch(tuned, examples, None, pad, "left", torch.device("cpu"))
    with torch.no_grad():
        before = target_nll(tuned.eval(), batch).item()
    lr = {"full": 1e-3, "freeze": 1e-3, "lora": 1e-2}.get(method, 0.3)
    train(
        tuned,
        examples,
        [],
        None,
        TrainConfig(steps=30, batch_size=4, warmup=1),
        lr,
        tmp_path / "run",
        pad,
    )
    with torch.no_grad():
        after = target_nll(tuned, batch).item()
    # the random tiny model's logits are nearly uniform (loss ~ ln 351), so a prompt can only
    # move them a little: a drop at all shows the trainable part learns
    assert after < before - 0.02, (before, after)
    outputs = greedy_generate(tuned, examples, backbone.tokenizer, 12, ["\n"])
    save_artifact(tmp_path / "art", method, cfg, tuned, prep.task, backbone)
    reloaded, task, *_ = load_artifact(tmp_path / "art", load_backbone(str(tiny_model_dir)))
    assert task.is_generation
    assert greedy_generate(reloaded, examples, backbone.tokenizer, 12, ["\n"]) == outputs
