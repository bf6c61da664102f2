"""One run of a comparison, each in its own process (so one method's memory never counts against
another's, and a failure is recorded, not fatal): a baseline scored by `tunelab eval`, or a method
trained and scored by `tunelab train`; each becomes a record of results.json (SCHEMA.md)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

from tunelab import methods
from tunelab.errors import TunelabError

# compared beside the methods, but not methods (nothing trains): the stock model scored by
# `tunelab eval` without and with demonstrations
BASELINES = ("zero-shot", "in-context")
LABEL_WORDS = "label-words"  # the folder of --label-words auto's search
HEADLINE_KEYS = (
    "accuracy", "macro_f1", "accuracy_calibrated", "macro_f1_calibrated", "execution_accuracy",
    "exact_set_match", "exact_match", "token_f1", "n",
)  # fmt: skip


def run_child(args: list[str], log: Path, echo: bool = True) -> tuple[int, float, str]:
    """Run `python -m tunelab ARGS`; stream its stderr (progress bars) to ours (unless not
    `echo`), stdout to `log`. Returns (exit code, peak RSS in MB of that process alone, its last
    stderr line)."""
    cmd = [sys.executable, "-m", "tunelab", *args]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        tail = bytearray()

        def tee() -> None:
            for chunk in iter(lambda: proc.stderr.read1(4096), b""):
                if echo:
                    sys.stderr.buffer.write(chunk)
                    sys.stderr.flush()
                tail.extend(chunk)
                del tail[:-4096]

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        proc.returncode = os.waitstatus_to_exitcode(status)
        reader.join()
    lines = [x for x in tail.decode(errors="replace").replace("\r", "\n").splitlines() if x.strip()]
    return proc.returncode, usage.ru_maxrss / 1024, lines[-1] if lines else ""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def settings_for(method: str, pairs: list[str]) -> list[str]:
    """The --set pairs that apply to this method: training settings and its own."""
    from dataclasses import fields

    from tunelab.train.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)} | {
        f.name for f in fields(methods.get(method).config)
    }
    return [kv for kv in pairs if kv.partition("=")[0] in known]


def common_args(task: str, model: str | None, limit: int | None) -> list[str]:
    """The arguments every child of one comparison shares."""
    return [
        "--task",
        str(task),
        *(["--model", model] if model else []),
        *(["--limit", str(limit)] if limit else []),
    ]


def artifact_bytes(out: Path) -> int:
    return sum(
        p.stat().st_size
        for p in out.rglob("*")
        if p.is_file()
        # a two-stage hybrid's core (OUT/core) is a by-product: the artifact holds its weights
        and not {"checkpoints", "core"} & set(p.relative_to(out).parts)
        and not p.name.startswith(("predictions", "run.log", "record", "metrics.json"))
    )


def run_baseline(
    method: str,
    common: list[str],
    split: str | None,
    demos: int,
    run_dir: Path,
    calibrate: bool = False,
    echo: bool = True,
):
    """zero-shot or in-context (`demos` per class): the untrained model, scored (calibrated
    too, beside the plain scores, with `calibrate` or where the task says so)."""
    metrics_file = run_dir / "metrics.json"
    cli = ["eval", *common, "--metrics", str(metrics_file)]
    cli += ["--demos", str(demos if method == "in-context" else 0)]
    cli += ["--calibrate"] if calibrate else []
    cli += ["--split", split] if split else []
    code, rss, last = run_child(cli, run_dir / "run.log", echo)
    if code != 0:
        return {"status": "failed", "error": last}
    m = json.loads(metrics_file.read_text())
    return {
        "status": "ok",
        "split": m["split"],
        "metrics": headline_metrics(m),
        "per_row": m.get("per_row"),
        "per_row_calibrated": m.get("per_row_calibrated"),
        "trainable_parameters": 0,
        "peak_memory_mb": round(rss, 1),
        "train_seconds": 0.0,
        "train_examples_per_second": 0.0,
        "eval_examples_per_second": rate(m),
        "artifact_bytes": 0,
        "task_switch_ms": None,  # nothing to switch
        "history": [],
    }


def run_label_words(
    task: str, model: str | None, out: Path, resume: bool, log=None, echo: bool = True
) -> dict:
    """`--label-words auto`: `tunelab label-words` on the task's training rows, in its own
    process; it writes the task with the proposal (`label-words/task.yaml`), which every method
    then reads. Returns what results.json records as `verbalizer`."""
    folder = out / LABEL_WORDS
    task_file, found_file = folder / "task.yaml", folder / "search.json"
    if not (resume and task_file.is_file() and found_file.is_file()):
        folder.mkdir(parents=True, exist_ok=True)
        (log or _stderr)("label words: searching the training rows")
        cli = ["label-words", "--task", str(task), "--out", str(task_file)]
        cli += ["--json", str(found_file), *(["--model", model] if model else [])]
        code, _, last = run_child(cli, folder / "run.log", echo)
        if code != 0:
            raise TunelabError(f"--label-words auto: the search failed: {last}")
    found = json.loads(found_file.read_text())
    return {
        "source": "auto",
        "words": {label: [word] for label, word in found["words"].items()},
        "searched_on": found["split"],
        "rows": found["rows"],
        "training_accuracy": found["accuracy"],
        "task_words": found["task_words"],
        "task_training_accuracy": found["task_accuracy"],
        "task_file": str(task_file),
    }


def run_trained(
    method: str,
    seed: int,
    common: list[str],
    settings: list[str],
    split: str | None,
    run_dir: Path,
    resume: bool,
    calibrate: bool = False,
    echo: bool = True,
) -> dict:
    """Train `method` with `settings` (--set pairs, later ones win) and score it on `split`
    (calibrated too, with `calibrate` or where the task says so)."""
    sets = [*settings_for(method, settings), f"seed={seed}"]
    cli = ["train", *common, "--method", method, "--out", str(run_dir)]
    cli += ["--calibrate"] if calibrate else []
    cli += [x for kv in sets for x in ("--set", kv)]
    cli += ["--eval-split", split] if split else []
    finished = (run_dir / "tunelab.json").is_file()  # the artifact is written last
    if not (resume and finished):
        if resume and (run_dir / "checkpoints" / "last.safetensors").is_file():
            cli.append("--resume")
        code, _, last = run_child(cli, run_dir / "run.log", echo)
        if code != 0:
            return {"status": "failed", "error": last}
    meta = json.loads((run_dir / "tunelab.json").read_text())
    s, tc = meta["metrics"], meta["train_config"]
    split = s.get("split") or split or "test"  # runs from before 0.1 lack it
    switch = measure_switch(run_dir)
    seen = s["steps"] * tc["batch_size"] * tc["grad_accum"]
    return {
        "status": "ok",
        "split": split,
        "metrics": headline_metrics(s[split]),
        "per_row": s[split].get("per_row"),
        "per_row_calibrated": s[split].get("per_row_calibrated"),
        "best_validation": s.get("best_validation"),
        "best_step": s.get("best_step"),
        "validation_start": s.get("validation_start"),  # step 0: the method's initialisation
        "validation_zero_shot": s.get("validation_zero_shot"),  # the backbone alone
        "trainable_parameters": s["trainable_parameters"],
        "total_parameters": s["total_parameters"],
        "peak_memory_mb": s["peak_memory_mb"],
        "train_seconds": s["train_seconds"],
        "train_examples_per_second": round(seen / max(s["train_seconds"], 1e-9), 2),
        "eval_examples_per_second": rate(s[split]),
        "artifact_bytes": artifact_bytes(run_dir),
        "task_switch_ms": switch.get("activate_ms"),
        "request_ms": switch.get("request_ms"),
        "history": [
            {k: h[k] for k in ("step", "loss", "validation") if k in h} for h in meta["history"]
        ],
    }


def measure_switch(run_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.compare.switch", str(run_dir)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def headline_metrics(m: dict) -> dict:
    return {k: m[k] for k in HEADLINE_KEYS if k in m}


def rate(m: dict) -> float:
    return round(m["n"] / m["seconds"], 2) if m.get("seconds") else 0.0


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem, 1), "gpu": gpu}
