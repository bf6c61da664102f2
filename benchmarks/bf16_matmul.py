"""Is bfloat16 faster than float32 on this CPU? One linear layer of the default model's MLP
shape (480 tokens x 576 -> 1536), timed both ways, plain and under autocast.

    .venv/bin/python benchmarks/bf16_matmul.py

Without avx512_bf16 or AMX, PyTorch emulates bfloat16 and it is slower than float32: that is
why `vs_peft.py` turns bf16 on only where it runs in hardware, and why training warns.
"""

from __future__ import annotations

import time

import torch

from tunelab.device import native_bf16


def timed(fn, repeats: int = 50) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(8 * 60, 576)
    lin = torch.nn.Linear(576, 1536)
    w = lin.weight.detach()
    fp32 = timed(lambda: x @ w.T)
    xb, wb = x.bfloat16(), w.bfloat16()
    bf16 = timed(lambda: xb @ wb.T)
    with torch.no_grad():
        plain = timed(lambda: lin(x))
        with torch.autocast("cpu", torch.bfloat16):
            auto = timed(lambda: lin(x))
    print(f"native bf16 on this CPU: {native_bf16(torch.device('cpu'))}")
    print(f"matmul float32 {fp32:.2f} ms, bfloat16 {bf16:.2f} ms ({bf16 / fp32:.2f}x)")
    print(f"linear float32 {plain:.2f} ms, bf16 autocast {auto:.2f} ms ({auto / plain:.2f}x)")


if __name__ == "__main__":
    main()
