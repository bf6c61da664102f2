"""LoRA: trainable low-rank updates beside frozen linear layers, through PEFT's `LoraConfig`.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models". The adapter is injected
into the plain model (so the same scoring code serves every method) and saved in PEFT's format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.io import atomic_save, check_shapes, read_tensors, write_json
from tunelab.methods.base import TunedLM, set_trainable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # how PeftModel names the wrapped model's tensors


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str = "all-linear"  # or names, comma-separated: q_proj,v_proj
    lr: float = 1e-3  # searched: SST-2 6.8e-4, TREC and the demo 1.9e-3 (RESULTS.md)
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.r < 1:
            raise TunelabError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise TunelabError(f"dropout must be in [0, 1), got {self.dropout}")

    def peft_config(self, base_path: str = ""):
        from peft import LoraConfig

        targets = self.target_modules
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            task_type="CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else targets.split(","),
            base_model_name_or_path=base_path or None,
        )


def inject(model, settings: LoraSettings, adapter_name: str = "default") -> None:
    """Add LoRA layers to `model` in place; only they train."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(settings.peft_config(), model, adapter_name=adapter_name)
    except ValueError as e:
        raise TunelabError(f"target_modules={settings.target_modules!r}: {e}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def save_lora(model, settings: LoraSettings, out: Path, base_path: str) -> None:
    from peft import get_peft_model_state_dict

    cfg = settings.peft_config(base_path).to_dict()
    cfg["inference_mode"] = True
    write_json(cfg, out / ADAPTER_CONFIG)
    tensors = {PEFT_PREFIX + k: v for k, v in get_peft_model_state_dict(model).items()}
    atomic_save(tensors, out / ADAPTER_WEIGHTS, {"format": "pt"})


def load_lora(model, settings: LoraSettings, out: Path, adapter_name: str = "default") -> None:
    """Inject LoRA layers into `model` and fill them from a PEFT-format adapter directory (as
    `adapter_name`, beside any adapters the model already holds)."""
    from peft import set_peft_model_state_dict

    path = out / ADAPTER_WEIGHTS
    tensors = read_tensors(path)
    inject(model, settings, adapter_name)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}
    own = {n: p.shape for n, p in model.named_parameters() if "lora_" in n}
    named = {  # the file's names -> this model's, where the adapter's name is part of the name
        k: k.replace(".lora_A.", f".lora_A.{adapter_name}.").replace(
            ".lora_B.", f".lora_B.{adapter_name}."
        )
        for k in state
    }
    check_shapes(state, {k: own[n] for k, n in named.items() if n in own}, path, complete=False)
    set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    set_trainable(model, False)


def build(backbone, cfg: LoraSettings, verbalizer, seed: int = 0) -> TunedLM:
    import torch

    torch.manual_seed(seed)  # LoRA's A matrices start random
    inject(backbone.model, cfg)
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id)


def save_files(tuned: TunedLM, cfg: LoraSettings, out: Path, base_path: str) -> None:
    save_lora(tuned.model, cfg, out, base_path)


def restore(backbone, cfg: LoraSettings, out: Path, adapter_name: str = "default") -> TunedLM:
    load_lora(backbone.model, cfg, out, adapter_name)
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id)
