"""Training settings, and `--set key=value` applied to typed dataclasses."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import yaml

from tunelab.errors import SettingError, TunelabError

SCHEDULES = ("linear", "cosine", "constant")
FLOAT32_MAX = 3.4028234663852886e38


@dataclass
class TrainConfig:
    steps: int = 200  # optimizer steps
    batch_size: int = 8
    group_by_length: bool = True  # batches of rows of similar length: less padding
    reuse_head: bool = True  # run the prompt's shared head (BOS, soft prompt) once per batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float | None = None  # None: the method's default
    weight_decay: float | None = None  # None: the method's default
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    warmup: float = 0.06  # a fraction of steps (< 1) or a number of steps
    schedule: str = "linear"  # decay after warmup: linear | cosine | constant
    max_grad_norm: float = 1.0
    # bfloat16 autocast, frozen weights in bf16: true | false | auto (true where it runs natively:
    # CUDA, or a CPU with avx512_bf16 or AMX)
    bf16: bool | str = False
    eval_every: int = 50  # steps between validation runs
    patience: int = 0  # validation runs without improvement before stopping; 0 = never stop early
    save_every: int = 50  # steps between checkpoints
    seed: int = 42
    eval_batch_size: int = 32
    max_length: int = 512  # prompt tokens; longer prompts keep their end
    padding_side: str = "left"
    device: str = "auto"  # auto | cpu | cuda
    fsdp: bool = False  # under torchrun: split the weights across ranks (FSDP2), not copy them

    def __post_init__(self):
        for name in (
            "steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "save_every",
            "eval_batch_size",
            "max_length",
        ):
            if getattr(self, name) < 1:
                raise TunelabError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise TunelabError(
                f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"
            )
        if self.padding_side not in ("left", "right"):
            raise TunelabError(f"padding_side must be left or right, got {self.padding_side!r}")
        for name in ("lr", "weight_decay", "warmup", "max_grad_norm"):
            value = getattr(self, name)
            # beyond float32's range an update overflows in the optimizer
            if value is not None and not abs(value) <= FLOAT32_MAX:
                raise TunelabError(f"{name} must be a finite number (float32), got {value}")
        if self.lr is not None and self.lr <= 0:
            raise TunelabError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise TunelabError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup < 0:
            raise TunelabError(f"warmup must be >= 0 (a fraction, or steps), got {self.warmup}")
        if self.max_grad_norm <= 0:
            raise TunelabError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.patience < 0:
            raise TunelabError(f"patience must be >= 0, got {self.patience}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TunelabError(
                f"device must be auto, cpu or cuda (each rank takes its own GPU), "
                f"got {self.device!r}"
            )
        if self.device == "cuda":
            from tunelab.device import resolve_device

            resolve_device(self.device)  # refused on a machine without CUDA
        if isinstance(self.bf16, str):
            if self.bf16 != "auto":
                raise TunelabError(f"bf16 must be true, false or auto, got {self.bf16!r}")
            from tunelab.device import native_bf16, resolve_device

            self.bf16 = native_bf16(resolve_device(self.device))

    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps) if self.warmup < 1 else int(self.warmup)


def _coerce(cls, name: str, raw: str, value):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", "")
    if value is None and "None" in kind:
        return None
    if "bool" in kind:
        if isinstance(value, bool) or ("str" in kind and isinstance(value, str)):
            return value
    elif "int" in kind and "float" not in kind:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif "float" in kind:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        else:
            try:  # YAML 1.1 reads 3e-3 (no dot) as a string; people write it that way
                number = float(raw)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .nan, .inf, 1e400
                raise SettingError(name, f"{name}={raw}: expected a finite number")
            return number
    elif "str" in kind:
        return raw
    else:
        return value
    expected = kind.replace(" | None", "")
    raise SettingError(name, f"{name}={raw}: expected {expected}, got {raw!r}")


def apply_overrides(pairs: list[str], *configs):
    """Apply `key=value` strings (`--set`) to whichever of the dataclass instances has that
    field."""
    try:
        return apply_settings(parse_pairs(pairs), *configs)
    except SettingError as e:
        raise TunelabError(f"--set {e}") from None


def parse_pairs(pairs: list[str]) -> list[tuple[str, str]]:
    """`--set key=value` strings as (key, text) pairs, in order."""
    out = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            raise TunelabError(f"--set {pair!r}: expected key=value")
        out.append((key, raw))
    return out


def apply_settings(settings, *configs):
    """Apply settings, a mapping or (key, value) pairs, to whichever of the dataclass instances
    has that field; each value is a Python value, or text as written after `--set key=` (read as
    YAML). Unknown keys and values of the wrong type raise SettingError naming the key."""
    out = list(configs)
    changes: list[dict] = [{} for _ in out]  # applied at once: checks see every setting given
    items = settings.items() if isinstance(settings, dict) else settings
    for key, value in items:
        raw = value if isinstance(value, str) else str(value)
        if isinstance(value, str):
            try:
                parsed = yaml.safe_load(raw) if raw else ""
            except yaml.YAMLError:  # e.g. a regular expression `modules=[`: text
                parsed = raw
        else:
            parsed = value
        for i, cfg in enumerate(out):
            if key in {f.name for f in dataclasses.fields(cfg)}:
                changes[i][key] = _coerce(type(cfg), key, raw, parsed)
                break
        else:
            known = sorted({f.name for cfg in out for f in dataclasses.fields(cfg)})
            raise SettingError(key, f"{key}: unknown setting (known: {', '.join(known)})")
    # (replace re-runs __post_init__ checks, once each, whatever order the settings came in)
    return [dataclasses.replace(cfg, **ch) if ch else cfg for cfg, ch in zip(out, changes)]


def setting_text(value) -> str:
    """A Python setting as `--set` text that reads back as the same value (children of
    `tunelab compare` get their settings on the command line)."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # true, false, null, numbers and lists: YAML reads them back
