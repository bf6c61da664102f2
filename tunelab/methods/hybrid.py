"""Hybrid: a LoRA core and a soft prompt in one model and one artifact (PEFT refuses this
combination). A fine-tuned LoRA core (`core=DIR`, a `lora` artifact) stays frozen and a task is
prompt-tuned on top of it. Without `core`, `stages=two` (the default) trains the core on the
task first, into OUT/core (tunelab/pipeline.py), then the prompt on it; `stages=joint` trains
both at once, which measured less accurate and far less stable (benchmarks/RESULTS.md).

The artifact keeps each part in PEFT's format: the LoRA core at the top level (so
`PeftModel.from_pretrained` loads the core) and the soft prompt under `prompt/`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.io import read_meta
from tunelab.methods import lora, prompt_tuning
from tunelab.methods.base import TunedLM, set_trainable

PROMPT_DIR = "prompt"
CORE_DIR = "core"  # the two-stage hybrid's stage 1: a LoRA artifact of its own, inside OUT
STAGES = ("two", "joint")


_PROMPT = prompt_tuning.PromptTuningConfig()  # the defaults each part takes from its method
_LORA = lora.LoraSettings()


@dataclass
class HybridConfig:
    # the soft prompt (see prompt_tuning.PromptTuningConfig)
    num_virtual_tokens: int = _PROMPT.num_virtual_tokens
    init: str = "vocab"  # its own choice: on a trained core it disturbs the core least (RESULTS.md)
    init_text: str = _PROMPT.init_text
    insert: str = _PROMPT.insert
    prompt_lr: float = _PROMPT.lr
    reparameterize: str = _PROMPT.reparameterize  # residual: an MLP over the prompt, then folded
    bottleneck: int = _PROMPT.bottleneck
    # the LoRA core (see lora.LoraSettings)
    r: int = _LORA.r
    alpha: int = _LORA.alpha
    dropout: float = _LORA.dropout
    target_modules: str = _LORA.target_modules
    lr: float = _LORA.lr  # the core's
    weight_decay: float = _LORA.weight_decay
    core: str = ""  # a trained `lora` artifact to freeze and build on; empty: train a new core
    # two: a new core trains first (OUT/core), then the prompt on it, frozen; joint: both at once
    stages: str = "two"

    def __post_init__(self):
        self.prompt_config()
        self.lora_settings()
        if self.stages not in STAGES:
            raise TunelabError(f"stages must be one of {', '.join(STAGES)}, got {self.stages!r}")
        if self.prompt_lr <= 0:
            raise TunelabError(f"prompt_lr must be > 0, got {self.prompt_lr}")
        if self.core and not (Path(self.core) / lora.ADAPTER_WEIGHTS).is_file():
            raise TunelabError(f"core={self.core}: not a LoRA artifact (no {lora.ADAPTER_WEIGHTS})")

    def prompt_config(self) -> prompt_tuning.PromptTuningConfig:
        return prompt_tuning.PromptTuningConfig(
            self.num_virtual_tokens,
            self.init,
            self.init_text,
            self.insert,
            self.prompt_lr,
            reparameterize=self.reparameterize,
            bottleneck=self.bottleneck,
        )

    def lora_settings(self) -> lora.LoraSettings:
        return lora.LoraSettings(
            self.r, self.alpha, self.dropout, self.target_modules, self.lr, self.weight_decay
        )


def _core_settings(core: Path) -> lora.LoraSettings:
    """The LoRA settings a core artifact was trained with."""
    from tunelab import methods

    meta = read_meta(core)
    record = methods.find(meta["method"])
    if record is None or not record.routes_rows:  # the methods with LoRA adapter layers
        raise TunelabError(f"core={core}: a {meta['method']!r} artifact; the core must be LoRA")
    fields = {k: meta["method_config"][k] for k in ("r", "alpha", "dropout", "target_modules")}
    return lora.LoraSettings(**fields)


def build(backbone, cfg: HybridConfig, verbalizer, seed: int = 0) -> TunedLM:
    import torch

    if cfg.core:
        base = read_meta(Path(cfg.core))["base_model"]
        if base["fingerprint"] != backbone.fingerprint:
            raise TunelabError(
                f"core={cfg.core}: trained on another base model "
                f"({base['name']!r}, fingerprint {base['fingerprint']})"
            )
        lora.load_lora(backbone.model, _core_settings(Path(cfg.core)), Path(cfg.core))
    else:
        torch.manual_seed(seed)
        lora.inject(backbone.model, cfg.lora_settings())
    prompt = prompt_tuning.new_prompt(backbone, cfg.prompt_config(), verbalizer, seed)
    tuned = TunedLM(backbone.model, prompt, backbone.tokenizer.bos_token_id)
    tuned.group_lr = {"prompt.": cfg.prompt_lr}
    return tuned


def save_files(tuned: TunedLM, cfg: HybridConfig, out: Path, base_path: str) -> None:
    settings = _core_settings(Path(cfg.core)) if cfg.core else cfg.lora_settings()
    lora.save_lora(tuned.model, settings, out, base_path)
    prompt_tuning.save_prompt(
        tuned.prompt, tuned.model, cfg.prompt_config(), out / PROMPT_DIR, base_path
    )


def restore(backbone, cfg: HybridConfig, out: Path, adapter_name: str = "default") -> TunedLM:
    settings = _core_settings(Path(cfg.core)) if cfg.core else cfg.lora_settings()
    lora.load_lora(backbone.model, settings, out, adapter_name)
    prompt = prompt_tuning.load_prompt(backbone, cfg.prompt_config(), out / PROMPT_DIR)
    set_trainable(backbone.model, False)
    return TunedLM(backbone.model, prompt, backbone.tokenizer.bos_token_id)
