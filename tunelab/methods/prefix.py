"""Prefix tuning / P-tuning v2: trainable key/value prefixes at every layer, the model frozen.

Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; Liu et al.
2022, "P-Tuning v2". The prefix is optionally reparameterised by an MLP while training
(`projection=true`). The artifact holds PEFT's tensor (the final keys and values) and, unlike
PEFT, the encoder itself, so training can continue from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.io import atomic_save, check_shapes, read_tensors, write_json
from tunelab.lm.scoring import cache_of, expanded_cache
from tunelab.methods.base import TunedLM, set_trainable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ENCODER_WEIGHTS = "prefix_encoder.safetensors"


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = 10
    projection: bool = False  # reparameterise by an MLP while training (Li and Liang 2021)
    projection_hidden: int = 512
    lr: float = 1e-2
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise TunelabError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.projection_hidden < 1:
            raise TunelabError(f"projection_hidden must be >= 1, got {self.projection_hidden}")


def kv_shape(model) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder."""
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


class Prefix(nn.Module):
    """n key/value vectors per layer, laid out as PEFT lays them: (n, layers * 2 * kv_dim)."""

    def __init__(self, model, cfg: PrefixConfig, values: torch.Tensor | None = None):
        super().__init__()
        self.layers, self.heads, self.head_dim = kv_shape(model)
        self.n = cfg.num_virtual_tokens
        width = self.layers * 2 * self.heads * self.head_dim
        if cfg.projection:
            hidden = model.get_input_embeddings().weight.shape[1]
            self.embedding = nn.Parameter(torch.zeros(self.n, hidden))
            self.mlp = nn.Sequential(
                nn.Linear(hidden, cfg.projection_hidden),
                nn.Tanh(),
                nn.Linear(cfg.projection_hidden, width),
            )
        else:
            self.embedding = nn.Parameter(torch.zeros(self.n, width) if values is None else values)
            self.mlp = None

    def values(self) -> torch.Tensor:
        """(n, layers * 2 * kv_dim): the keys and values the model attends to."""
        return self.embedding if self.mlp is None else self.mlp(self.embedding)

    def cache(self, batch_size: int, dtype: torch.dtype):
        """A fresh DynamicCache holding the prefix for every row (the model appends to it)."""
        kv = self.values().to(dtype)
        kv = kv.view(self.n, self.layers * 2, self.heads, self.head_dim)  # (n, 2L, H, Dh)
        kv = kv.permute(1, 2, 0, 3)  # (2L, H, n, Dh): keys at even rows, values at odd
        return expanded_cache(kv[0::2], kv[1::2], batch_size)


@torch.no_grad()
def _real_token_kv(backbone, verbalizer, n: int) -> torch.Tensor:
    """Keys and values of real tokens (the label words, repeated to n): a prefix that starts as
    ordinary text rather than noise (Li and Liang found real-word initialisation helps)."""
    words = [t for w in (verbalizer.words if verbalizer else []) for t in w] or [
        backbone.tokenizer.eos_token_id
    ]
    ids = torch.tensor([[words[i % len(words)] for i in range(n)]])
    device = next(backbone.model.parameters()).device
    out = backbone.model(input_ids=ids.to(device), use_cache=True)
    layers = cache_of(out).layers
    kv = torch.stack([t for layer in layers for t in (layer.keys[0], layer.values[0])])
    # (2L, H, n, Dh) -> (n, 2L * H * Dh)
    return kv.permute(2, 0, 1, 3).reshape(n, -1).float().cpu()


def build(backbone, cfg: PrefixConfig, verbalizer, seed: int = 0) -> TunedLM:
    set_trainable(backbone.model, False)
    torch.manual_seed(seed)
    if cfg.projection:
        prefix = Prefix(backbone.model, cfg)
        words = [t for w in (verbalizer.words if verbalizer else []) for t in w] or [0]
        table = backbone.model.get_input_embeddings().weight.detach().float()
        with torch.no_grad():
            ids = [words[i % len(words)] for i in range(cfg.num_virtual_tokens)]
            prefix.embedding.copy_(table[ids])
    else:
        prefix = Prefix(
            backbone.model, cfg, _real_token_kv(backbone, verbalizer, cfg.num_virtual_tokens)
        )
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id, prefix=prefix)


def save_files(tuned: TunedLM, cfg: PrefixConfig, out: Path, base_path: str) -> None:
    prefix = tuned.prefix
    write_json(
        {
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_path,
            "num_virtual_tokens": prefix.n,
            "token_dim": prefix.heads * prefix.head_dim,
            "num_transformer_submodules": 1,
            "num_attention_heads": prefix.heads,
            "num_layers": prefix.layers,
            "encoder_hidden_size": cfg.projection_hidden,
            "prefix_projection": cfg.projection,
            "inference_mode": True,
        },
        out / ADAPTER_CONFIG,
    )
    with torch.no_grad():
        values = prefix.values().float()
    atomic_save({"prompt_embeddings": values}, out / ADAPTER_WEIGHTS, {"format": "pt"})
    # PEFT keeps only the final values; keep the encoder too, so training can go on from here
    atomic_save(
        {k: v for k, v in prefix.state_dict().items()}, out / ENCODER_WEIGHTS, {"format": "pt"}
    )


def restore(backbone, cfg: PrefixConfig, out: Path, adapter_name: str = "default") -> TunedLM:
    set_trainable(backbone.model, False)
    prefix = Prefix(backbone.model, cfg)
    path = out / ENCODER_WEIGHTS if (out / ENCODER_WEIGHTS).is_file() else out / ADAPTER_WEIGHTS
    tensors = read_tensors(path)
    if path.name == ADAPTER_WEIGHTS:  # PEFT's file: the values themselves
        tensors = {("embedding" if k == "prompt_embeddings" else k): v for k, v in tensors.items()}
    own = prefix.state_dict()
    check_shapes(tensors, {k: v.shape for k, v in own.items()}, path)
    prefix.load_state_dict(tensors)
    prefix.requires_grad_(False)
    return TunedLM(backbone.model, bos_id=backbone.tokenizer.bos_token_id, prefix=prefix)
