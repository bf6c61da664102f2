"""Where and in what precision the model runs: the device a flag names, and bfloat16 autocast
where the hardware has it."""

from __future__ import annotations

import contextlib

import torch

from tunelab.errors import TunelabError


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is one), `cpu`, `cuda` or `cuda:N`; anything else, or CUDA on a
    machine without it, is refused before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if name == "cpu" or (kind == "cuda" and (not index or index.isdigit())):
        if kind == "cuda" and not torch.cuda.is_available():
            raise TunelabError(f"device {name!r}: this machine has no CUDA device (use cpu)")
        if index and int(index) >= torch.cuda.device_count():
            raise TunelabError(
                f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices"
            )
        return torch.device(name)
    raise TunelabError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 math runs in hardware here (CUDA, or a CPU with avx512_bf16 or AMX);
    elsewhere PyTorch emulates it, slower than float32."""
    if device.type != "cpu":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def resolve_bf16(value: bool | str, device: torch.device) -> bool:
    """`auto` (bfloat16 where it runs natively), `true` or `false` (also as booleans)."""
    if isinstance(value, bool):
        return value
    choice = str(value).lower()
    if choice == "auto":
        return native_bf16(device)
    if choice in ("true", "false"):
        return choice == "true"
    raise TunelabError(f"bf16 must be auto, true or false, got {value!r}")


def emulated_bf16_warning(device: torch.device, bf16: bool) -> str | None:
    """What to tell a user who asked for bfloat16 where PyTorch only emulates it."""
    if bf16 and not native_bf16(device):
        return (
            "warning: bf16=true on a CPU without avx512_bf16 or AMX: PyTorch emulates bfloat16 "
            "here, slower than float32"
        )
    return None


def precision_name(bf16: bool) -> str:
    """How /health and the logs name the precision the model runs in."""
    return "bfloat16" if bf16 else "float32"
