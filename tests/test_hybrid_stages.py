"""The two-stage hybrid (issue 17, the default): a LoRA core trains first into OUT/core, then
the soft prompt on it, frozen; the artifact stands alone; --resume after stage 1 goes on from
the core; stages=joint trains both at once."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

import tunelab

TINY = dict(steps=4, batch_size=4, eval_every=2)


def _lora_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_two_stage_trains_the_core_first_and_the_artifact_stands_alone(
    tiny_model_dir, tiny_task, tmp_path
):
    out = tmp_path / "hybrid"
    run = tunelab.train(
        tiny_task, method="hybrid", out=out, model=str(tiny_model_dir), progress=False, **TINY
    )
    core = json.loads((out / "core" / "tunelab.json").read_text())
    meta = json.loads((out / "tunelab.json").read_text())
    assert core["method"] == "lora" and meta["method"] == "hybrid"
    # the artifact records its own settings (no path to OUT/core) and the whole cost
    assert meta["method_config"]["stages"] == "two" and meta["method_config"]["core"] == ""
    m, c = meta["metrics"], core["metrics"]
    prompt_size = meta["method_config"]["num_virtual_tokens"] * 32  # tiny llama: hidden 32
    assert m["trainable_parameters"] == c["trainable_parameters"] + prompt_size
    assert m["train_seconds"] >= c["train_seconds"]
    # the core stayed frozen in stage 2: the hybrid holds exactly the core's LoRA weights
    ours, theirs = _lora_weights(out), _lora_weights(out / "core")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    before = tunelab.load(out, model=str(tiny_model_dir)).evaluate()
    shutil.rmtree(out / "core")  # the artifact does not need it
    after = tunelab.load(out, model=str(tiny_model_dir)).evaluate()
    assert after["per_row"] == before["per_row"] == run.metrics["per_row"]


def test_resume_after_stage_one_goes_on_from_the_core(tiny_model_dir, tiny_task, tmp_path):
    out = tmp_path / "hybrid"
    kw = dict(method="hybrid", out=out, model=str(tiny_model_dir), progress=False, **TINY)
    tunelab.train(tiny_task, **kw)
    core_files = {p.name: p.stat().st_mtime_ns for p in (out / "core").iterdir() if p.is_file()}
    # a crash right after stage 1: the core is done, stage 2 left nothing
    for p in out.iterdir():
        if p.name != "core":
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    tunelab.train(tiny_task, resume=True, **kw)
    assert (out / "tunelab.json").is_file()
    again = {p.name: p.stat().st_mtime_ns for p in (out / "core").iterdir() if p.is_file()}
    assert again == core_files  # not trained again
    with pytest.raises(tunelab.TunelabError, match="holds an artifact"):
        tunelab.train(tiny_task, **kw)  # and a finished run is still refused without --resume


def test_joint_trains_both_at_once_without_a_core_folder(tiny_model_dir, tiny_task, tmp_path):
    out = tmp_path / "joint"
    tunelab.train(
        tiny_task, method="hybrid", out=out, model=str(tiny_model_dir), progress=False,
        stages="joint", **TINY,
    )  # fmt: skip
    meta = json.loads((out / "tunelab.json").read_text())
    assert not (out / "core").exists() and meta["method_config"]["stages"] == "joint"
    lora = sum(v.numel() for v in _lora_weights(out).values())
    assert meta["metrics"]["trainable_parameters"] == lora + 20 * 32


def test_stages_must_be_two_or_joint(tiny_task, tmp_path):
    with pytest.raises(tunelab.TunelabError, match="stages must be one of two, joint, got .three."):
        tunelab.train(tiny_task, method="hybrid", out=tmp_path / "x", stages="three")


def test_two_stage_on_a_task_without_validation_says_what_needs_it(tiny_model_dir, tmp_path):
    from conftest import make_task

    from tunelab.errors import TunelabError

    task = make_task(tmp_path)
    task.write_text(task.read_text().replace("size: 8", "size: 0"))
    with pytest.raises(TunelabError) as e:
        tunelab.train(
            task, method="hybrid", out=tmp_path / "h", model=str(tiny_model_dir), progress=False,
            **TINY,
        )  # fmt: skip
    assert "two-stage hybrid" in str(e.value) and "stages=joint" in str(e.value)
    assert "--validate-only" not in str(e.value)
    # the joint hybrid trains without validation
    run = tunelab.train(
        task, method="hybrid", out=tmp_path / "j", model=str(tiny_model_dir), progress=False,
        stages="joint", **TINY,
    )  # fmt: skip
    assert (tmp_path / "j" / "tunelab.json").is_file() and run is not None
