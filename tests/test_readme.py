"""Every `tunelab` command in the README runs as written, with a tiny budget where it trains
(the `torchrun` ones too, on 2 CPU processes).

Integration: these use the real default model (SmolLM2-135M-Instruct) and the demo corpus.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED_DATA, free_port, needs_default_model

ROOT = Path(__file__).resolve().parents[1]
BUDGET = {
    "train": ["--set", "steps=2", "--set", "eval_every=2", "--set", "batch_size=4", "--limit", "8"],
    "eval": ["--limit", "8"],
    "predict": [],
    "label-words": ["--limit", "48"],
    "advise": [],
    "tune": ["--trials", "2", "--set", "steps=2", "--set", "eval_every=2", "--set", "batch_size=4"],
    "compare": [
        "--set",
        "steps=2",
        "--set",
        "eval_every=2",
        "--set",
        "batch_size=4",
        "--limit",
        "8",
    ],
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)
    return [
        line.strip()
        for b in blocks
        for line in b.splitlines()
        if line.strip().startswith(("tunelab ", "torchrun "))
    ]


def readme_python() -> str:
    """The ```python block of the README's "Python API" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_python_example_calls_every_function_of_the_api():
    code = readme_python()
    compile(code, "README.md", "exec")
    for call in ("load_task(", "train(", "load(", "predict(", "evaluate(", "compare(", "advise("):
        assert f".{call}" in code, call


@pytest.mark.integration
@needs_default_model
def test_readme_python_example_runs(tmp_path):
    code = readme_python().replace('"runs/', f'"{tmp_path}/runs/')
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "prompt-tuning" in proc.stdout  # the comparison's table


def test_readme_has_the_two_setup_commands_first():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S).group(1)
    assert first_block.split() == ["make", "demo", "make", "test"]
    assert len(readme_commands()) >= 4


@pytest.mark.integration
@needs_default_model
def test_readme_commands_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # in order: later commands read what earlier ones wrote (runs/demo)
    for line in readme_commands():
        if "examples/tasks/" in line and not SHARED_DATA.is_dir():
            continue  # the example tasks read ../shared/data
        args = shlex.split(line.replace("runs/", f"{tmp_path}/runs/"))
        sub = args.index("tunelab") + 1 if args[0] == "torchrun" else 1
        args += BUDGET[args[sub]]
        if args[sub] == "compare" and "--methods" not in args:  # all 9: one of each kind is enough
            args += ["--methods", "zero-shot,in-context,prompt-tuning,lora"]
        if "--tune" in args:  # a search of two trials, one trained method, one seed
            args += ["--tune", "2", "--seeds", "1", "--methods", "zero-shot,prompt-tuning"]
        if args[0] == "torchrun":  # torchrun is `python -m torch.distributed.run`
            port = f"--master_port={free_port()}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--master_addr=127.0.0.1", port]
            cmd += args[1:]
        else:
            cmd = [sys.executable, "-m", "tunelab", *args[1:]]
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**env, "OMP_NUM_THREADS": "1"} if args[0] == "torchrun" else env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, f"{line}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr


@pytest.mark.integration
@needs_default_model
def test_make_demo_runs_with_a_tiny_budget(tmp_path):
    if not (ROOT / ".venv" / ".installed").is_file():
        pytest.skip("make demo is run here only inside the Makefile's own .venv")
    budget = (
        f"--out {tmp_path}/demo --methods zero-shot,prompt-tuning --set steps=2 "
        "--set eval_every=2 --set batch_size=4 --limit 8"
    )
    proc = subprocess.run(
        ["make", "-s", "demo", f"DEMO_ARGS={budget}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"zero-shot\s+\d\.\d{4}", proc.stdout)
    # score, its 95% interval, trainable parameters
    assert re.search(r"prompt-tuning\s+\d\.\d{4}\s+\d\.\d{3}-\d\.\d{3}\s+11,520", proc.stdout)
    assert f"report: {tmp_path}/demo/report.html" in proc.stdout
