"""The machine's dense matrix-multiply rate at the model's shapes: the denominator of model
FLOPs utilisation (issue 16).

    .venv/bin/python benchmarks/machine_peak.py --out runs/peak.json
    .venv/bin/python benchmarks/machine_peak.py --seconds 0.05 --rows 8   # a smoke run

Every projection of the model (q, k, v, o; gate, up, down; the LM head) is timed as the model
runs it, `x @ w.T` with x of (rows, in) for each token count in `--rows` (8 sequences of 64
tokens = 512 rows; 8 rows = a decode step of 8), in float32 and, where it runs natively
(CUDA, or a CPU with avx512_bf16 or AMX: tunelab/device.py), in bfloat16; each after warm-up,
repeated for `--seconds`. One JSON object: GFLOP/s per shape (median and best of the repeats),
`layer_gflops` (one layer's seven projections at that token count: the FLOPs over the summed
median times, what a forward's projections could reach), and `peak_gflops`, the best median
over every shape: the figure `serve_load.py --peak-json` and `vs_peft.py --peak-json` divide
model FLOPs per second by. PyTorch's threads as used (`--threads`, else its default; the
benchmarks run with the same), the CPU model from lscpu, or the GPU's name.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# SmolLM2-135M, the built-in default model
DEFAULT_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
)


def model_shape(model: str | None):
    """The Shape of `--model` (a folder's config.json), else the default model's."""
    from tunelab.lm.flops import Shape

    if model is None:
        return Shape.of(DEFAULT_SHAPE)
    from transformers import AutoConfig

    from tunelab.models.load import resolve

    return Shape.of(AutoConfig.from_pretrained(resolve(model)[1]))


def matmuls(shape) -> list[tuple[str, int, int]]:
    """(name, in features, out features) of every product a forward runs per token."""
    out = [(name, i, o) for name, (i, o) in shape.projections().items()]
    return out + [("lm_head", shape.hidden, shape.vocab)]


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in text.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_matmul(
    rows: int, n_in: int, n_out: int, dtype, device, seconds: float, warmup: int = 3
) -> list[float]:
    """Seconds per `x @ w.T`, x (rows, n_in), w (n_out, n_in), over repeats filling `seconds`
    (at least 3)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, n_in, generator=g).to(device, dtype)
    w = torch.randn(n_out, n_in, generator=g).to(device, dtype)
    with torch.no_grad():
        for _ in range(warmup):
            x @ w.T
        _sync(device)
        times: list[float] = []
        end = time.perf_counter() + seconds
        while len(times) < 3 or time.perf_counter() < end:
            start = time.perf_counter()
            x @ w.T
            _sync(device)
            times.append(time.perf_counter() - start)
    return times


def measure(shape, rows_list: list[int], dtype, device, seconds: float) -> dict:
    """Rates of every product at every token count in one dtype."""
    results, layer = [], {}
    for rows in rows_list:
        layer_flops = layer_time = 0.0
        for name, n_in, n_out in matmuls(shape):
            times = time_matmul(rows, n_in, n_out, dtype, device, seconds)
            flops = 2 * rows * n_in * n_out
            med = statistics.median(times)
            results.append(
                {
                    "matmul": name,
                    "rows": rows,
                    "in": n_in,
                    "out": n_out,
                    "ms_median": round(med * 1e3, 4),
                    "gflops_median": round(flops / med / 1e9, 2),
                    "gflops_best": round(flops / min(times) / 1e9, 2),
                }
            )
            if name != "lm_head":
                layer_flops += flops
                layer_time += med
        layer[str(rows)] = round(layer_flops / layer_time / 1e9, 2)
    return {
        "shapes": results,
        "layer_gflops": layer,
        "peak_gflops": max(r["gflops_median"] for r in results),
        "best_gflops": max(r["gflops_best"] for r in results),
    }


def machine_peak(
    rows_list: list[int] = (512,),
    seconds: float = 0.5,
    device: str = "auto",
    model: str | None = None,
    bf16: bool | None = None,
) -> dict:
    """The whole report (see the module docstring). `bf16`: None measures bfloat16 where it
    runs natively only."""
    from tunelab.device import native_bf16, resolve_device

    dev = resolve_device(device)
    shape = model_shape(model)
    native = native_bf16(dev)
    report = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native_bf16": native,
        "tf32": dev.type == "cuda" and torch.backends.cuda.matmul.allow_tf32,
        "rows": list(rows_list),
        "seconds_per_shape": seconds,
        "float32": measure(shape, list(rows_list), torch.float32, dev, seconds),
    }
    if native if bf16 is None else bf16:
        report["bfloat16"] = measure(shape, list(rows_list), torch.bfloat16, dev, seconds)
    report["peak_gflops"] = report["float32"]["peak_gflops"]
    if "bfloat16" in report:
        report["peak_gflops_bf16"] = report["bfloat16"]["peak_gflops"]
    return report


def peak_for(path: Path | None, bf16: bool, device: str = "auto", seconds: float = 0.2) -> dict:
    """{"gflops", "source", "dtype"}: the peak a benchmark divides by, read from a
    machine_peak.py JSON file, else measured now (a quick run at 512 rows)."""
    dtype = "bfloat16" if bf16 else "float32"
    if path is not None:
        report = json.loads(Path(path).read_text())
        if dtype not in report:
            sys.exit(f"{path}: no {dtype} figures (measure with --bf16 there)")
        return {"gflops": report[dtype]["peak_gflops"], "source": str(path), "dtype": dtype}
    report = machine_peak([512], seconds, device, bf16=bf16)
    return {"gflops": report[dtype]["peak_gflops"], "source": "measured inline", "dtype": dtype}


def utilisation(flops: float, seconds: float, peak: dict) -> dict:
    """Model FLOPs per second and its share of the peak."""
    rate = flops / seconds / 1e9
    return {
        "model_gflops_per_second": round(rate, 2),
        "peak_gflops": peak["gflops"],
        "peak_source": peak["source"],
        "mfu": round(rate / peak["gflops"], 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="8,64,512", help="token counts (rows of x), comma-separated")
    p.add_argument("--seconds", type=float, default=0.5, help="timed repeats per shape")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: its own)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default=None, help="a model folder (default: the built-in model)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure bfloat16 too (default: where it runs natively)",
    )
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    report = machine_peak(rows, args.seconds, args.device, args.model, args.bf16)
    report["command"] = " ".join(sys.argv)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
