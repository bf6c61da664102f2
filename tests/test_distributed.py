"""Data-parallel training with gloo on 2 CPU processes under torchrun: both ranks end with the
same weights, equal to one process training on the same global batches; the CLI writes one
artifact from rank 0 that matches a single-process run's, under torchrun (with a resume) and
under `accelerate launch`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port, write_jsonl

from tunelab.io import load_tensors

HERE = Path(__file__).resolve().parent
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")
ACCELERATE = shutil.which("accelerate", path=str(Path(sys.executable).parent))


def launch(args: list[str], nproc: int, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    """`python ARGS` for one process, else `torchrun --nproc_per_node=N ARGS` (or `accelerate
    launch`) on loopback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    if nproc == 1:
        cmd = [sys.executable, *args]
    elif launcher == "accelerate":
        cmd = [
            ACCELERATE, "launch", "--multi_gpu", f"--num_processes={nproc}", "--num_machines=1",
            "--mixed_precision=no", "--dynamo_backend=no", "--main_process_ip=127.0.0.1",
            f"--main_process_port={free_port()}", *args,
        ]  # fmt: skip
    else:
        cmd = [
            TORCHRUN,
            f"--nproc_per_node={nproc}",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            *args,
        ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@needs_torchrun
@pytest.mark.parametrize(
    "method, settings",
    [
        # 5 rows per micro-batch: the ranks get 3 and 2, so the loss weighting matters
        ("prompt-tuning", ["batch_size=5", "grad_accum=2"]),
        # dropout draws different masks once rows move between processes: off, to compare
        ("lora", ["batch_size=4", "dropout=0"]),
        # the weights themselves split across the ranks (FSDP2), gradients accumulated unsynced
        ("full", ["fsdp=true", "batch_size=5", "grad_accum=2", "lr=1e-3"]),
        ("lora", ["fsdp=true", "batch_size=4", "dropout=0"]),
        ("prompt-tuning", ["fsdp=true", "batch_size=5"]),
    ],
)
def test_two_ranks_agree_and_equal_one_process(
    tiny_model_dir, tiny_task, tmp_path, method, settings
):
    common = [str(tiny_model_dir), str(tiny_task), method]
    settings = ["steps=4", "warmup=1", "lr=0.05", *settings]
    launch([str(HERE / "ddp_train.py"), *common, str(tmp_path / "one"), *settings], 1)
    launch([str(HERE / "ddp_train.py"), *common, str(tmp_path / "two"), *settings], 2)

    single, _ = load_tensors(tmp_path / "one" / "rank0.safetensors")
    rank0, meta = load_tensors(tmp_path / "two" / "rank0.safetensors")
    assert meta["sharded"] == ("fsdp=true" in settings)
    rank1, _ = load_tensors(tmp_path / "two" / "rank1.safetensors")
    initial = _initial(tiny_model_dir, tiny_task, method)
    assert rank0.keys() == rank1.keys() == single.keys()
    for name in single:
        assert not torch.equal(single[name], initial[name]), f"{name} did not train"
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0)
        # float sums in another order; a missing gradient sync is off by 1e-1
        torch.testing.assert_close(rank0[name], single[name], atol=1e-4, rtol=1e-3)


def _initial(model_dir, task, method) -> dict[str, torch.Tensor]:
    from tunelab import methods
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.prepared import PreparedTask

    backbone = load_backbone(str(model_dir))
    prep = PreparedTask.load(load_task(task), backbone.tokenizer)
    tuned = methods.get(method).build(backbone, methods.CONFIGS[method](), prep.verbalizer, 42)
    return {k: v.clone() for k, v in tuned.trainable_state().items()}


@needs_torchrun
@pytest.mark.parametrize(
    "method, artifact, settings",
    [
        ("prompt-tuning", "adapter_model.safetensors", ["lr=0.05"]),
        # FSDP: validation, checkpoints, the resume and the best weights go through shards
        ("full", "trainable.safetensors", ["lr=1e-3", "fsdp=true"]),
        # (FSDP prompt tuning, whose zero-shot score takes the soft prompt away from the root,
        # aborted one rank once in 4 runs after its resume: std::terminate while evaluating.
        # Left out until understood; its training is checked in test_two_ranks_agree_...)
    ],
)
def test_tunelab_train_under_torchrun_writes_one_artifact_and_resumes(
    tiny_model_dir, tiny_task, tmp_path, method, artifact, settings
):
    def train_cmd(out: Path, steps: int, *extra: str) -> list[str]:
        return [
            "-m", "tunelab", "train", "--task", str(tiny_task), "--model", str(tiny_model_dir),
            "--method", method, "--out", str(out),
            "--set", f"steps={steps}", "--set", "batch_size=4", "--set", "eval_every=2",
            "--set", "save_every=2", *[a for kv in settings for a in ("--set", kv)], *extra,
            # a constant rate: the 4-step run's schedule is then the 6-step run's first part
            "--set", "schedule=constant", "--set", "warmup=0",
        ]  # fmt: skip

    # torchrun runs a module with -m; the single-process run is the same command
    one = launch(train_cmd(tmp_path / "one", 6), 1)
    # a distributed run stopped at step 4 (its checkpoint says so), then resumed to step 6
    launch(train_cmd(tmp_path / "two", 4), 2)
    resumed = launch(train_cmd(tmp_path / "two", 6, "--resume"), 2)
    assert resumed.stdout.count("resumed from") == 1, "only rank 0 prints"
    assert resumed.stdout.count("artifact:") == 1

    meta_one = json.loads((tmp_path / "one" / "tunelab.json").read_text())
    meta_two = json.loads((tmp_path / "two" / "tunelab.json").read_text())
    assert meta_two["metrics"]["world_size"] == 2 and meta_one["metrics"]["world_size"] == 1
    assert meta_two["metrics"]["steps"] == 6
    assert meta_two["metrics"]["best_step"] == meta_one["metrics"]["best_step"]
    # the start and the zero-shot backbone, validated once (the resume did not redo step 0)
    assert [h["step"] for h in meta_two["history"]].count(0) == 1
    start_one, start_two = meta_one["history"][0], meta_two["history"][0]
    assert start_two.keys() == {"step", "validation", "zero_shot"} == start_one.keys()
    for key in ("validation", "zero_shot"):
        assert abs(start_two[key] - start_one[key]) < 1e-6
    a, _ = load_tensors(tmp_path / "one" / artifact)
    b, _ = load_tensors(tmp_path / "two" / artifact)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)
    assert one.stdout.count("artifact:") == 1


@pytest.mark.skipif(ACCELERATE is None, reason="accelerate is not installed")
def test_tunelab_train_under_accelerate_launch_matches_one_process(
    tiny_model_dir, tiny_task, tmp_path
):
    cmd = [
        "-m", "tunelab", "train", "--task", str(tiny_task), "--model", str(tiny_model_dir),
        "--method", "lora", "--out", "OUT", "--set", "steps=4", "--set", "batch_size=4",
        "--set", "eval_every=2", "--set", "dropout=0", "--set", "lr=0.01",
    ]  # fmt: skip
    one = launch([a.replace("OUT", str(tmp_path / "one")) for a in cmd], 1)
    two = launch([a.replace("OUT", str(tmp_path / "two")) for a in cmd], 2, "accelerate")
    assert two.stdout.count("artifact:") == 1 and one.stdout.count("artifact:") == 1
    meta = json.loads((tmp_path / "two" / "tunelab.json").read_text())
    assert meta["metrics"]["world_size"] == 2
    a, _ = load_tensors(tmp_path / "one" / "adapter_model.safetensors")
    b, _ = load_tensors(tmp_path / "two" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


GENERATION_TASK = """\
name: tiny-sql
data:
  train: train.jsonl
input_fields: [question]
template: "Question: {question}\\nSQL:"
target: " {query}"
generation:
  max_new_tokens: 12
  stop: ["\\n"]
validation:
  size: 2
"""


@needs_torchrun
def test_fsdp_validates_a_generation_task_by_decoding_on_every_rank(tiny_model_dir, tmp_path):
    """Greedy decoding (validation and the final report) runs the sharded model on both ranks;
    the artifact and the exact match equal one process's."""
    rows = [
        {"question": f"How many {t} rows are there?", "query": f"SELECT count(*) FROM {t}"}
        for t in ("singer", "concert", "stadium", "song", "album", "band")
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    task = tmp_path / "task.yaml"
    task.write_text(GENERATION_TASK)
    cmd = [
        "-m", "tunelab", "train", "--task", str(task), "--model", str(tiny_model_dir),
        "--method", "full", "--out", "OUT", "--eval-split", "train", "--set", "steps=4",
        "--set", "batch_size=4", "--set", "eval_every=2", "--set", "lr=1e-3", "--set", "fsdp=true",
    ]  # fmt: skip
    launch([a.replace("OUT", str(tmp_path / "one")) for a in cmd], 1)
    two = launch([a.replace("OUT", str(tmp_path / "two")) for a in cmd], 2)
    assert two.stdout.count("artifact:") == 1
    meta_one = json.loads((tmp_path / "one" / "tunelab.json").read_text())
    meta_two = json.loads((tmp_path / "two" / "tunelab.json").read_text())
    assert [h["step"] for h in meta_two["history"] if "validation" in h] == [0, 2, 4]
    assert [h.get("validation") for h in meta_two["history"]] == [
        h.get("validation") for h in meta_one["history"]
    ]
    for m in (meta_one["metrics"]["train"], meta_two["metrics"]["train"]):
        m.pop("seconds")
    assert meta_two["metrics"]["train"] == meta_one["metrics"]["train"]
    a, _ = load_tensors(tmp_path / "one" / "trainable.safetensors")
    b, _ = load_tensors(tmp_path / "two" / "trainable.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=1e-4)


@needs_torchrun
def test_two_stage_hybrid_under_torchrun_trains_its_core_then_the_prompt(
    tiny_model_dir, tiny_task, tmp_path
):
    """Both stages run in one process group, left once at the end; the other ranks wait for
    the core rank 0 writes, and read it."""
    out = tmp_path / "hybrid"
    cmd = [
        "-m", "tunelab", "train", "--task", str(tiny_task), "--model", str(tiny_model_dir),
        "--method", "hybrid", "--out", str(out),
        "--set", "steps=2", "--set", "batch_size=4", "--set", "eval_every=2",
    ]  # fmt: skip
    run = launch(cmd, 2)
    # rank 0 alone speaks: each stage once, one artifact
    assert run.stdout.count("hybrid stage 1 of 2") == run.stdout.count("hybrid stage 2 of 2") == 1
    assert run.stdout.count("artifact:") == 1
    core = json.loads((out / "core" / "tunelab.json").read_text())
    meta = json.loads((out / "tunelab.json").read_text())
    assert core["method"] == "lora" and meta["method"] == "hybrid"
    assert meta["metrics"]["world_size"] == 2
