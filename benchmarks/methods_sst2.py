"""Every method on SST-2 (LM-BFF few-shot: 16 per class) with the same data, steps and seed.

    python benchmarks/methods_sst2.py --steps 100 --out runs/bench-methods

Each method trains in its own `tunelab train` process, so one method's memory does not count
against another's. Prints a Markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "examples" / "tasks" / "sst2.yaml"
METHODS = ["prompt-tuning", "prefix", "lora", "freeze", "head", "full", "hybrid"]


def artifact_bytes(out: Path) -> int:
    return sum(
        p.stat().st_size
        for p in out.rglob("*")
        if p.is_file() and "checkpoints" not in p.parts and not p.name.startswith("predictions")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-methods")
    ap.add_argument("--extra", nargs="*", default=["--set", "bf16=true"])
    args = ap.parse_args()
    rows = []
    for method in args.methods.split(","):
        out = args.out / method
        if not (out / "tunelab.json").is_file():
            cmd = [
                sys.executable,
                "-m",
                "tunelab",
                "train",
                "--task",
                str(TASK),
                "--method",
                method,
                "--out",
                str(out),
                "--eval-split",
                "dev",
                "--set",
                f"steps={args.steps}",
                "--set",
                "eval_every=25",
                *args.extra,
            ]
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append(f"| {method} | failed: {proc.stderr.strip().splitlines()[-1]} |")
                continue
            print(f"{method}: {time.perf_counter() - start:.0f}s", file=sys.stderr)
        m = json.loads((out / "tunelab.json").read_text())["metrics"]
        share = 100 * m["trainable_parameters"] / m["total_parameters"]
        rows.append(
            f"| {method} | {m['dev']['accuracy']:.4f} | {m['dev']['macro_f1']:.4f} | "
            f"{m['trainable_parameters']:,} | {share:.4f}% | "
            f"{m['peak_memory_mb']:,.0f} | {m['train_seconds']:.0f} | "
            f"{artifact_bytes(out) / 2**20:,.2f} |"
        )
    print(
        "| method | dev accuracy | dev macro-F1 | trainable parameters | % of model | "
        "peak RSS (MB) | train s | artifact (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
