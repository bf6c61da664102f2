"""`tunelab compare`: every method on the same data, budget and seeds, each in its own process
(one method's memory never counts against another's, and a failure is recorded, not fatal)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from tunelab import methods
from tunelab.errors import TunelabError
from tunelab.models import DEFAULT_MODEL
from tunelab.train.checkpoint import write_json

BASELINES = ("zero-shot", "in-context")
DEFAULT_METHODS = "zero-shot,in-context,prompt-tuning,prefix,lora,freeze,head,full,hybrid"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task YAML file, or a built-in task: demo")
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        help=f"comma-separated, run in this order (default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="folder for the runs, results.json, report.md and report.html",
    )
    p.add_argument("--model", default=None, help="as for `tunelab train`")
    p.add_argument("--seeds", default="42", help="comma-separated seeds; 2+ give mean and spread")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training settings for every trained method (steps, batch_size, bf16, ...)",
    )
    p.add_argument(
        "--eval-split",
        default=None,
        help="the split every method is scored on (default: test, else validation)",
    )
    p.add_argument("--demos", type=int, default=1, help="demonstrations per class for in-context")
    p.add_argument("--limit", type=int, default=None, help="score on the first N rows only")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep methods already recorded or trained; continue interrupted ones",
    )


def _run_child(args: list[str], log: Path) -> tuple[int, float, str]:
    """Run `python -m tunelab ARGS`; stream its stderr (progress bars) to ours, stdout to `log`.
    Returns (exit code, peak RSS in MB of that process alone, its last stderr line)."""
    cmd = [sys.executable, "-m", "tunelab", *args]
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE)
        tail = bytearray()

        def tee() -> None:
            for chunk in iter(lambda: proc.stderr.read1(4096), b""):
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


def _settings_for(method: str, pairs: list[str]) -> list[str]:
    """The --set pairs that apply to this method: training settings and its own."""
    from dataclasses import fields

    from tunelab.train.config import TrainConfig

    known = {f.name for f in fields(TrainConfig)} | {
        f.name for f in fields(methods.CONFIGS[method])
    }
    return [kv for kv in pairs if kv.partition("=")[0] in known]


def _artifact_bytes(out: Path) -> int:
    return sum(
        p.stat().st_size
        for p in out.rglob("*")
        if p.is_file()
        and "checkpoints" not in p.relative_to(out).parts
        and not p.name.startswith(("predictions", "run.log", "record", "metrics.json"))
    )


def _common(args) -> list[str]:
    common = ["--task", str(args.task)]
    if args.model:
        common += ["--model", args.model]
    if args.limit:
        common += ["--limit", str(args.limit)]
    return common


def run_baseline(method: str, args, run_dir: Path) -> dict:
    metrics_file = run_dir / "metrics.json"
    cli = [
        "eval",
        *_common(args),
        "--metrics",
        str(metrics_file),
        "--demos",
        str(args.demos if method == "in-context" else 0),
    ]
    if args.eval_split:
        cli += ["--split", args.eval_split]
    code, rss, last = _run_child(cli, run_dir / "run.log")
    if code != 0:
        return {"status": "failed", "error": last}
    m = json.loads(metrics_file.read_text())
    return {
        "status": "ok",
        "split": m["split"],
        "metrics": _headline_metrics(m),
        "trainable_parameters": 0,
        "peak_memory_mb": round(rss, 1),
        "train_seconds": 0.0,
        "train_examples_per_second": 0.0,
        "eval_examples_per_second": _rate(m),
        "artifact_bytes": 0,
        "task_switch_ms": None,  # nothing to switch
        "history": [],
    }


def run_trained(method: str, seed: int, args, run_dir: Path) -> dict:
    cli = [
        "train",
        *_common(args),
        "--method",
        method,
        "--out",
        str(run_dir),
        "--set",
        f"seed={seed}",
        *[x for kv in _settings_for(method, args.set) for x in ("--set", kv)],
    ]
    if args.eval_split:
        cli += ["--eval-split", args.eval_split]
    finished = (run_dir / "tunelab.json").is_file()  # the artifact is written last
    if not (args.resume and finished):
        if args.resume and (run_dir / "checkpoints" / "last.safetensors").is_file():
            cli.append("--resume")
        code, _, last = _run_child(cli, run_dir / "run.log")
        if code != 0:
            return {"status": "failed", "error": last}
    meta = json.loads((run_dir / "tunelab.json").read_text())
    s, tc = meta["metrics"], meta["train_config"]
    split = s.get("split") or args.eval_split or "test"  # runs from before 0.1 lack it
    switch = _measure_switch(run_dir)
    seen = s["steps"] * tc["batch_size"] * tc["grad_accum"]
    return {
        "status": "ok",
        "split": split,
        "metrics": _headline_metrics(s[split]),
        "trainable_parameters": s["trainable_parameters"],
        "total_parameters": s["total_parameters"],
        "peak_memory_mb": s["peak_memory_mb"],
        "train_seconds": s["train_seconds"],
        "train_examples_per_second": round(seen / max(s["train_seconds"], 1e-9), 2),
        "eval_examples_per_second": _rate(s[split]),
        "artifact_bytes": _artifact_bytes(run_dir),
        "task_switch_ms": switch.get("activate_ms"),
        "request_ms": switch.get("request_ms"),
        "history": [
            {k: h[k] for k in ("step", "loss", "validation") if k in h} for h in meta["history"]
        ],
    }


def _measure_switch(run_dir: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab.compare.switch", str(run_dir)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def headline_metric(task) -> str:
    """What a task's methods are ranked by."""
    if task.sql is not None:
        return "execution_accuracy"  # runs the SQL: exact match undercounts right queries
    return "exact_match" if task.is_generation else "accuracy"


def _headline_metrics(m: dict) -> dict:
    keys = (
        "accuracy",
        "macro_f1",
        "execution_accuracy",
        "exact_set_match",
        "exact_match",
        "token_f1",
        "n",
    )
    return {k: m[k] for k in keys if k in m}


def _rate(m: dict) -> float:
    return round(m["n"] / m["seconds"], 2) if m.get("seconds") else 0.0


def _machine() -> dict:
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


def run(args: argparse.Namespace) -> None:
    """Train and score every method on the same data, budget and seeds; write results.json,
    report.md and report.html."""
    from tunelab.artifact import versions
    from tunelab.compare.report import write_reports
    from tunelab.tasks import load_task
    from tunelab.train.config import TrainConfig, apply_overrides

    task = load_task(args.task)  # bad task files fail here, once, not in every child
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in names:
        if name not in BASELINES and name not in methods.METHODS:
            known = ", ".join([*BASELINES, *methods.METHODS])
            raise TunelabError(f"--methods {name}: unknown method (known: {known})")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise TunelabError(f"--seeds {args.seeds}: expected integers, e.g. 1,2,3") from None
    # reject unknown keys and bad values up front; each method gets the keys it understands
    train_cfg, *_ = apply_overrides(
        args.set, TrainConfig(), *(c() for c in methods.CONFIGS.values())
    )
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(m, s) for m in names for s in ([seeds[0]] if m in BASELINES else seeds)]
    records = []
    for i, (method, seed) in enumerate(jobs, start=1):
        run_dir = args.out / f"{method}-seed{seed}"
        record_file = run_dir / "record.json"
        if args.resume and record_file.is_file():
            print(f"[{i}/{len(jobs)}] {method} seed {seed}: done before, kept", file=sys.stderr)
            records.append(json.loads(record_file.read_text()))
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[{i}/{len(jobs)}] {method} seed {seed}", file=sys.stderr)
        start = time.perf_counter()
        try:
            if method in BASELINES:
                record = run_baseline(method, args, run_dir)
            else:
                record = run_trained(method, seed, args, run_dir)
        except (OSError, KeyError, ValueError) as e:  # a run that left unreadable results
            record = {"status": "failed", "error": f"{run_dir}: unreadable results: {e!r}"}
        record = {
            "method": method,
            "seed": seed,
            "error": None,
            **record,
            "artifact": str(run_dir),
            "wall_seconds": round(time.perf_counter() - start, 1),
        }
        print(
            f"[{i}/{len(jobs)}] {method} seed {seed}: {record['status']}"
            + (f" ({record['error']})" if record["error"] else ""),
            file=sys.stderr,
        )
        write_json(record, record_file)
        records.append(record)

    ok = [r for r in records if r["status"] == "ok"]
    fingerprint = next(
        (
            json.loads((Path(r["artifact"]) / "tunelab.json").read_text())["base_model"][
                "fingerprint"
            ]
            for r in ok
            if (Path(r["artifact"]) / "tunelab.json").is_file()
        ),
        None,
    )
    # the backbone alone: methods that add parameters count them in their total
    base = next(
        (
            r["total_parameters"]
            - (0 if r["method"] in ("full", "freeze") else r["trainable_parameters"])
            for r in ok
            if r.get("total_parameters")
        ),
        None,
    )
    for r in records:
        r.setdefault("total_parameters", base)  # the baselines run the backbone as it is
    results = {
        "format": 1,
        "task": task.name,
        "task_kind": "generation" if task.is_generation else "classification",
        "split": next((r["split"] for r in ok), args.eval_split),
        "metric": headline_metric(task),
        "model": {
            "name": args.model or DEFAULT_MODEL,
            "fingerprint": fingerprint,
            "parameters": base,
        },
        "budget": {
            "steps": train_cfg.steps,
            "batch_size": train_cfg.batch_size,
            "grad_accum": train_cfg.grad_accum,
            "seeds": seeds,
            "settings": args.set,
        },
        "command": "tunelab " + shlex.join(args.argv),
        "machine": _machine(),
        "versions": versions(),
        "records": records,
    }
    write_json(results, args.out / "results.json")
    md, html = write_reports(results, args.out)
    print(summary_table(results))
    print(f"results: {args.out / 'results.json'}\nreport: {md}\nreport: {html}")


def summary_table(results: dict) -> str:
    """A few columns of the report, for the terminal."""
    from tunelab.compare.report import summarise

    name = results["metric"].replace("_", " ")
    lines = [f"{'method':<15}{name:>12}{'trainable':>14}{'peak MB':>10}{'train s':>9}"]
    for r in summarise(results):
        if not r["seeds"]:
            lines.append(f"{r['method']:<15}  failed: {r['failed'][0]}")
            continue
        spread = f"±{r['metric_std']:.3f}" if r["metric_std"] is not None else ""
        lines.append(
            f"{r['method']:<15}{r['metric']:>12.4f}{r['trainable_parameters']:>14,.0f}"
            f"{r['peak_memory_mb']:>10,.0f}{r['train_seconds'] or 0:>9.0f} {spread}"
        )
    return "\n".join(lines)
