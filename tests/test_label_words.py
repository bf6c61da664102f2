"""`tunelab label-words` (LM-BFF's automatic label words) and `compare --label-words auto`, on a
tiny llama."""

from __future__ import annotations

import json
import re

import torch
import torch.nn.functional as F
import yaml
from conftest import sentences, write_jsonl

from tunelab.__main__ import main
from tunelab.evaluate.label_words import MAX_ASSIGNMENTS, choose
from tunelab.lm.scoring import hidden_states, last_positions
from tunelab.methods.base import TunedLM
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.batch import collate
from tunelab.tasks.prepared import PreparedTask


def printed_block(out: str) -> dict:
    """The `verbalizer:` block the command prints last, parsed as YAML."""
    return yaml.safe_load(out[out.rindex("verbalizer:") :])["verbalizer"]


def test_label_words_prints_a_block_to_paste_and_writes_a_task_that_scores_as_printed(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    out = tmp_path / "proposed.yaml"
    args = ["label-words", "--task", str(tiny_task), "--model", str(tiny_model_dir)]
    assert main([*args, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    words = printed_block(printed)
    assert set(words) == {"positive", "negative"}
    assert all(isinstance(w, str) and w.isalpha() for w in words.values())
    assert words["positive"] != words["negative"]
    assert "* positive" in printed and "* negative" in printed  # the table marks the proposal
    proposal, own = re.search(
        r"train accuracy: proposal (\S+), task's verbalizer (\S+) ", printed
    ).groups()
    proposal, own = map(float, (proposal, own))

    task = load_task(out)  # a task file like any other, usable as --task
    assert task.verbalizer == {label: [w] for label, w in words.items()}
    assert task.template == load_task(tiny_task).template
    # the accuracy it printed is what `eval` measures on the training rows with that task
    assert (
        main(["eval", "--task", str(out), "--model", str(tiny_model_dir), "--split", "train"]) == 0
    )
    assert f"accuracy {proposal:.4f}" in capsys.readouterr().out
    assert (
        main(["eval", "--task", str(tiny_task), "--model", str(tiny_model_dir), "--split", "train"])
        == 0
    )
    assert f"accuracy {own:.4f}" in capsys.readouterr().out


def _rig(model_dir, task_path, out_dir, words: dict[str, str], common: str, steps: int = 80):
    """A copy of the tiny model trained to answer each class's rows with 60% `common` and 40%
    that class's word, saved to `out_dir`."""
    backbone = load_backbone(str(model_dir))
    tok, model = backbone.tokenizer, backbone.model
    prep = PreparedTask.load(load_task(task_path), tok, only={"train"})
    examples = prep.examples("train")
    batch = collate(examples, prep.verbalizer, tok.pad_token_id, "left", expand=False)
    ids = {
        w: tok(" " + w, add_special_tokens=False)["input_ids"] for w in [*words.values(), common]
    }
    assert all(len(i) == 1 for i in ids.values())  # each is one token of the tiny vocabulary
    target = torch.zeros(len(examples), len(tok))
    for r, ex in enumerate(examples):
        target[r, ids[common][0]] = 0.6
        target[r, ids[words[prep.verbalizer.labels[ex.label]]][0]] = 0.4
    tuned = TunedLM(model)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        h, mask = hidden_states(tuned, batch["input_ids"], batch["attention_mask"])
        logits = model.get_output_embeddings()(h[torch.arange(h.size(0)), last_positions(mask)])
        loss = -(target * F.log_softmax(logits, -1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def test_label_words_finds_the_words_a_model_says_for_each_class_not_the_common_one(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    # the rigged model's most likely answer is " film" for every row; " good" follows only
    # positive rows and " bad" only negative ones
    rigged = _rig(
        tiny_model_dir,
        tiny_task,
        tmp_path / "rigged",
        {"positive": "good", "negative": "bad"},
        "film",
    )
    found_file = tmp_path / "search.json"
    args = ["label-words", "--task", str(tiny_task), "--model", str(rigged), "--candidates", "3"]
    assert main([*args, "--json", str(found_file)]) == 0
    printed = capsys.readouterr().out
    assert printed_block(printed) == {"positive": "good", "negative": "bad"}
    found = json.loads(found_file.read_text())
    for label in ("positive", "negative"):
        cands = found["candidates"][label]
        # " film" is the likeliest word on each class's rows, yet it favours neither class
        assert "film" not in {c["word"] for c in cands}
        assert cands[0]["word"] == found["words"][label] and cands[0]["margin"] > 1
    assert found["accuracy"] == 1.0 and "train accuracy: proposal 1.0000" in printed
    assert found["task_words"] == {"positive": ["yes"], "negative": ["no"]}


def test_label_words_refuses_a_generation_task(tmp_path, capsys):
    write_jsonl(tmp_path / "train.jsonl", sentences(8))
    task = tmp_path / "gen.yaml"
    task.write_text(
        'name: gen\ndata:\n  train: train.jsonl\ninput_fields: [text]\ntemplate: "{text}"\n'
        'target: " {label}"\n'
    )
    assert main(["label-words", "--task", str(task), "--model", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "gen is a generation task" in err
    assert "Traceback" not in err


def test_compare_with_auto_label_words_gives_every_method_the_proposal(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    out = tmp_path / "cmp"
    args = (
        f"compare --task {tiny_task} --model {tiny_model_dir} --out {out} --label-words auto "
        "--methods prompt-tuning --set steps=1 --set batch_size=4 --set eval_every=1"
    ).split()
    assert main(args) == 0
    assert "label words: positive: " in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    v = results["verbalizer"]
    proposed = load_task(out / "label-words" / "task.yaml").verbalizer
    assert v["source"] == "auto" and v["searched_on"] == "train" and v["words"] == proposed
    assert v["task_words"] == {"positive": ["yes"], "negative": ["no"]} != proposed
    assert all(r["status"] == "ok" for r in results["records"])
    # the trained method's artifact holds the proposal, so it trained and scored with it
    meta = json.loads((out / "prompt-tuning-seed42" / "tunelab.json").read_text())
    assert meta["task"]["verbalizer"] == proposed
    words = "; ".join(f"{label}: {ws[0]}" for label, ws in proposed.items())
    assert (
        f"- Label words: {words}, searched on the 40 train rows" in (out / "report.md").read_text()
    )


def test_many_classes_search_past_the_exhaustive_product():
    # 6 classes x 5 candidates is past MAX_ASSIGNMENTS: the right word is every class's last
    # candidate, outside the exhaustive part, and coordinate ascent must still reach it
    C, N, rows = 6, 5, 60
    gold = torch.arange(rows) % C
    S = -torch.rand(rows, C * N, generator=torch.Generator().manual_seed(0))  # noise in (-1, 0]
    for c in range(C):
        S[gold == c, c * N + N - 1] = 5.0
    columns = [list(range(c * N, (c + 1) * N)) for c in range(C)]
    assert N**C > MAX_ASSIGNMENTS
    pick, acc, scored = choose(S, gold, columns)
    assert pick == [c * N + N - 1 for c in range(C)] and acc == 1.0
    assert scored > 4**C  # the exhaustive part (4 per class), then the ascent
