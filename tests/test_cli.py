"""The command line end to end on a tiny llama: train, eval, predict, and bad input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tunelab.__main__ import COMMANDS, main

TINY = ["--set", "steps=4", "--set", "batch_size=4", "--set", "eval_every=2"]


def _train(model, task, out, *extra):
    return main(
        ["train", "--task", str(task), "--model", str(model), "--out", str(out), *TINY, *extra]
    )


def test_train_eval_predict(tiny_model_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_task, out, "--baseline") == 0
    printed = capsys.readouterr().out
    assert "test accuracy: zero-shot" in printed and f"artifact: {out}" in printed
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["metrics"]["test"]["n"] == 16 and meta["metrics"]["steps"] == 4
    assert meta["base_model"]["fingerprint"] and meta["versions"]["torch"]
    assert (out / "checkpoints" / "last.safetensors").is_file()

    assert main(["eval", "--adapter", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny [test] prompt-tuning: accuracy" in printed and "gold \\ pred" in printed
    rows = [json.loads(x) for x in (out / "predictions-test.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and set(rows[0]) == {"input", "gold", "predicted", "probabilities"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-4
    # the reported accuracy is the one the predictions file gives
    acc = sum(r["gold"] == r["predicted"] for r in rows) / 16
    assert f"accuracy {acc:.4f}" in printed

    assert (
        main(["predict", "--adapter", str(out), "--json", "the film was good .", "dull plot"]) == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["input"] for x in lines] == ["the film was good .", "dull plot"]
    assert all(x["label"] in ("positive", "negative") for x in lines)


def test_predict_reads_braces_as_text_unless_an_object_of_the_fields(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_task, out) == 0
    capsys.readouterr()
    good = "the film was good ."
    texts = ["{not json", '{"foo": "bar"}', json.dumps({"text": good}), good]
    assert main(["predict", "--adapter", str(out), "--json", *texts]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["input"] for r in rows] == texts
    # the object of the task's fields is that text; the others are text themselves
    assert rows[2]["probabilities"] == rows[3]["probabilities"] != rows[0]["probabilities"]
    assert main(["predict", "--adapter", str(out), "--json-input", "the film"]) == 2
    assert "input 1: not valid JSON" in capsys.readouterr().err


def test_zero_shot_and_in_context_eval(tiny_model_dir, tiny_task, tmp_path, capsys):
    metrics = tmp_path / "m.json"
    base = f"eval --task {tiny_task} --model {tiny_model_dir}"
    assert main(f"{base} --metrics {metrics}".split()) == 0
    assert "tiny [test] zero-shot: accuracy" in capsys.readouterr().out
    assert json.loads(metrics.read_text())["n"] == 16
    assert main(f"{base} --demos 1 --split validation --limit 5".split()) == 0
    assert "tiny [validation] in-context: accuracy" in capsys.readouterr().out


def test_existing_run_needs_resume_or_overwrite(tiny_model_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_task, out) == 0
    before = (out / "tunelab.json").read_bytes()
    # an artifact is never replaced unless asked
    assert _train(tiny_model_dir, tiny_task, out, "--set", "seed=7") == 2
    assert "holds an artifact; pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "tunelab.json").read_bytes() == before
    assert _train(tiny_model_dir, tiny_task, out, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    # the checkpoints of a run that crashed before its artifact: resume or start over
    (out / "tunelab.json").unlink()
    assert _train(tiny_model_dir, tiny_task, out) == 2
    assert "holds a checkpoint of an earlier run; pass --resume" in capsys.readouterr().err
    assert _train(tiny_model_dir, tiny_task, out, "--overwrite", "--set", "seed=7") == 0
    assert "resumed from" not in capsys.readouterr().out
    assert json.loads((out / "tunelab.json").read_text())["train_config"]["seed"] == 7


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "stepz=3"], "--set stepz: unknown setting (known:"),
        (["--set", "steps=many"], "--set steps=many: expected int"),
        (["--set", "lr=fast"], "--set lr=fast: expected float"),
        (["--set", "init=magic"], "init must be one of random, vocab, text, labels, got 'magic'"),
        (["--method", "nope"], None),  # argparse's own message, also exit code 2
    ],
)
def test_bad_settings_exit_2(tiny_model_dir, tiny_task, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message is None else contextlib.nullcontext():
        assert _train(tiny_model_dir, tiny_task, tmp_path / "x", *args) == 2
    if message:
        assert message in capsys.readouterr().err


def test_bad_input_is_one_line_exit_2_no_traceback(tiny_model_dir, tiny_task, tmp_path):
    (tiny_task.parent / "train.jsonl").write_text('{"text": "ok", "label": "positive"}\n{oops\n')
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    args = f"train --task {tiny_task} --model {tiny_model_dir} --out {tmp_path / 'x'}".split()
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tunelab train: error: {tiny_task.parent / 'train.jsonl'}:2: not valid JSON "
        "(Expecting property name enclosed in double quotes): '{oops'"
    )


def test_adapter_for_another_model_exits_2(tiny_model_dir, tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(tiny_model_dir, tiny_task, out) == 0
    import shutil

    from transformers import LlamaForCausalLM

    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    model = LlamaForCausalLM.from_pretrained(other)
    model.model.norm.weight.data += 1
    model.save_pretrained(other)
    capsys.readouterr()
    assert main(["predict", "--adapter", str(out), "--model", str(other), "good"]) == 2
    assert "this adapter was trained on base model" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith("usage: tunelab " + name)
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in (
        "--task",
        "--method",
        "--out",
        "--model",
        "--set",
        "--resume",
        "--baseline",
        "num_virtual_tokens",
        "grad_accum",
        "patience",
        "bf16",
    ):
        assert option in text


def test_set_reads_numbers_as_people_write_them():
    from tunelab.train.config import TrainConfig, apply_overrides

    (cfg,) = apply_overrides(
        ["lr=3e-3", "bf16=true", "warmup=10", "schedule=cosine"], TrainConfig()
    )
    assert (cfg.lr, cfg.bf16, cfg.warmup, cfg.schedule) == (3e-3, True, 10.0, "cosine")


def test_settings_that_need_each_other_apply_in_any_order():
    from tunelab.methods.prompt_tuning import PromptTuningConfig
    from tunelab.train.config import TrainConfig, apply_overrides

    text = "What kind of answer: a person, a place?"  # a colon: still text, not a YAML mapping
    for pairs in (["init=text", f"init_text={text}"], [f"init_text={text}", "init=text"]):
        _, cfg = apply_overrides(pairs, TrainConfig(), PromptTuningConfig())
        assert (cfg.init, cfg.init_text) == ("text", text)


def test_bf16_auto_is_on_only_where_bfloat16_runs_natively(monkeypatch):
    import torch

    from tunelab.errors import TunelabError
    from tunelab.train.config import TrainConfig, apply_overrides

    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        (cfg,) = apply_overrides(["bf16=auto", "device=cpu"], TrainConfig())
        assert cfg.bf16 is native
    with pytest.raises(TunelabError, match="bf16 must be true, false or auto, got 'yes please'"):
        apply_overrides(["bf16=yes please"], TrainConfig())


def test_kill_mid_run_then_resume_matches_an_uninterrupted_run(tiny_model_dir, tiny_task, tmp_path):
    """A real SIGKILL: checkpoints are written atomically, so whatever instant the process dies
    at, --resume continues to the same weights."""
    import signal
    import time

    from safetensors.torch import load_file

    args = [
        "--task",
        str(tiny_task),
        "--model",
        str(tiny_model_dir),
        "--set",
        "steps=150",
        "--set",
        "save_every=1",
        "--set",
        "eval_every=50",
        "--set",
        "batch_size=4",
    ]
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    cmd = [sys.executable, "-m", "tunelab", "train", *args]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([*cmd, "--out", str(whole)], env=env, check=True, capture_output=True)

    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    last = killed / "checkpoints" / "last.safetensors"
    deadline = time.time() + 120
    while not last.is_file() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the run: it checkpoints every step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "tunelab.json").is_file(), "the run finished before it was killed"

    resumed = subprocess.run(
        [*cmd, "--out", str(killed), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(killed / "adapter_model.safetensors"))
    assert torch.equal(a["prompt_embeddings"], b["prompt_embeddings"])


def test_early_stopping_after_patience_runs_without_improvement(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    # a learning rate too small to change any prediction: validation never improves
    budget = "--set steps=40 --set eval_every=2 --set patience=2 --set lr=1e-12".split()
    assert _train(tiny_model_dir, tiny_task, tmp_path / "run", *budget) == 0
    assert "early stop at step 6: no improvement in 2 validation runs" in capsys.readouterr().out
    meta = json.loads((tmp_path / "run" / "tunelab.json").read_text())
    assert meta["metrics"]["steps"] == 6 and meta["metrics"]["best_step"] == 2


def test_train_prints_what_the_filter_kept_and_the_start(tiny_model_dir, tmp_path, capsys):
    from conftest import make_task

    task = make_task(tmp_path, extra="filter:\n  label: {not_in: [negative]}\n")
    assert _train(tiny_model_dir, task, tmp_path / "run") == 0
    printed = capsys.readouterr().out
    assert "train: 24 of 48 rows kept by filter" in printed
    assert "test: 8 of 16 rows kept by filter" in printed
    assert "task tiny: 16 train, 8 validation, 8 test" in printed
    assert re.search(r"validation: zero-shot \d\.\d{4}, start \d\.\d{4}, best \d\.\d{4}", printed)
