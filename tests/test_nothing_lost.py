"""Results are never lost: an artifact rewrite killed midway leaves the old artifact whole and
loadable; train replaces an artifact only with --overwrite and keeps checkpoints and the user's
files; eval creates a missing output folder before evaluating."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import make_task

from tunelab.__main__ import main
from tunelab.artifact import load_artifact
from tunelab.lm.predict import predict_logprobs
from tunelab.tasks.prepared import PreparedTask

TINY = ["--set", "steps=2", "--set", "batch_size=4", "--set", "eval_every=1"]

# rewrites the artifact in `out` with other weights, and SIGKILLs itself at one point of the
# write (after the new weights, or after the new tunelab.json): before the new folder is whole
REWRITE = textwrap.dedent(
    """
    import dataclasses, os, signal, sys
    from pathlib import Path
    import torch
    from tunelab import artifact, methods
    from tunelab.methods import prompt_tuning

    out, point = Path(sys.argv[1]), sys.argv[2]
    tuned, task, meta, backbone = artifact.load_artifact(out)
    with torch.no_grad():
        tuned.prompt.embedding.add_(1.0)
    cfg = prompt_tuning.PromptTuningConfig(**meta["method_config"])

    def killed_after(fn, here):
        def wrapped(*a, **k):
            fn(*a, **k)
            if point == here:
                os.kill(os.getpid(), signal.SIGKILL)
        return wrapped

    record = methods.METHODS["prompt-tuning"]  # the registry's record is what save_artifact calls
    methods.METHODS["prompt-tuning"] = dataclasses.replace(
        record, save_files=killed_after(record.save_files, "weights")
    )
    artifact.write_json = killed_after(artifact.write_json, "metadata")
    artifact.save_artifact(out, "prompt-tuning", cfg, tuned, task, backbone)
    """
)


def _scores(out):
    tuned, task, _, backbone = load_artifact(out)
    prep = PreparedTask.load(task, backbone.tokenizer)
    pad = backbone.tokenizer.pad_token_id
    return predict_logprobs(tuned, prep.examples("test"), prep.verbalizer, pad)


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("point", ["weights", "metadata"])
def test_a_rewrite_killed_midway_leaves_the_old_artifact_whole(
    point, tiny_model_dir, tmp_path, capsys
):
    task, out = make_task(tmp_path), tmp_path / "run"
    argv = ["train", "--task", task, "--model", tiny_model_dir, "--out", out, *TINY]
    assert main([str(a) for a in argv]) == 0
    before, scores = _files(out), _scores(out)

    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-c", REWRITE, str(out), point], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _files(out) == before  # not one byte of the old artifact changed
    assert torch.equal(_scores(out), scores)
    assert (out / "checkpoints" / "last.safetensors").is_file()
    # the half-written new folder sits beside it, and the next write clears it away
    assert len(list(tmp_path.glob(".run.new-*"))) == 1
    assert main([str(a) for a in [*argv, "--overwrite"]]) == 0
    assert not list(tmp_path.glob(".run.*"))


def test_overwrite_replaces_the_artifact_and_keeps_other_files(tiny_model_dir, tmp_path, capsys):
    task, out = make_task(tmp_path), tmp_path / "run"
    argv = [str(a) for a in ["train", "--task", task, "--model", tiny_model_dir, "--out", out]]
    assert main([*argv, *TINY]) == 0
    assert main(["eval", "--adapter", str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    old = (out / "adapter_model.safetensors").read_bytes()

    assert main([*argv, *TINY, "--set", "seed=5"]) == 2
    assert "holds an artifact; pass --overwrite" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").read_bytes() == old

    assert main([*argv, *TINY, "--set", "seed=5", "--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").read_bytes() != old
    assert json.loads((out / "tunelab.json").read_text())["train_config"]["seed"] == 5
    assert (out / "notes.txt").read_text() == "mine"  # the user's file stays
    assert not (out / "predictions-test.jsonl").exists()  # it described the old weights
    # checkpoints are where --resume looks for them, and are the new run's
    assert main([*argv, *TINY, "--set", "seed=5", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out


def test_eval_creates_a_missing_output_folder_first(tiny_model_dir, tiny_task, tmp_path, capsys):
    predictions = tmp_path / "new" / "folder" / "p.jsonl"
    metrics = tmp_path / "other" / "m.json"
    argv = ["eval", "--task", tiny_task, "--model", tiny_model_dir, "--limit", "4"]
    assert main([str(a) for a in [*argv, "--predictions", predictions, "--metrics", metrics]]) == 0
    assert len(predictions.read_text().splitlines()) == 4
    assert json.loads(metrics.read_text())["n"] == 4
