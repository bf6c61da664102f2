"""Prompt tuning: n trainable input vectors, every backbone weight frozen.

Lester, Al-Rfou and Constant 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning".
Initialising the prompt from the class label words' embeddings worked best there.

With `reparameterize=residual` (Razdaibiedina et al. 2023, "Residual Prompt Tuning") the
vectors pass through a shallow MLP with a skip connection while training; the artifact holds the
vectors the model saw, so it is a plain prompt-tuning artifact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tunelab.errors import TunelabError
from tunelab.io import atomic_save, check_shapes, read_tensors, write_json
from tunelab.methods.base import TunedLM, set_trainable

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

INITS = ("random", "vocab", "text", "labels")
INSERTS = ("after_bos", "start")
REPARAMETERIZATIONS = ("none", "residual")


@dataclass
class PromptTuningConfig:
    num_virtual_tokens: int = 20
    init: str = "vocab"  # vocab (sampled token embeddings) | random | text | labels
    init_text: str = ""
    insert: str = "after_bos"  # after_bos (or at the start when there is no BOS) | start
    lr: float = 3e-2  # soft prompts want a far larger step than weights
    weight_decay: float = 0.0
    # residual: P' = P + LayerNorm(W2 relu(W1 P)) while training, folded into P' when saved
    reparameterize: str = "none"  # none | residual
    bottleneck: int = 256  # W1's width (the paper used 400 on wider models than 576)

    def __post_init__(self):
        if self.num_virtual_tokens < 1:
            raise TunelabError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        if self.init not in INITS:
            raise TunelabError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.init == "text" and not self.init_text:
            raise TunelabError("init=text needs init_text=<some text>")
        if self.insert not in INSERTS:
            raise TunelabError(f"insert must be one of {', '.join(INSERTS)}, got {self.insert!r}")
        if self.reparameterize not in REPARAMETERIZATIONS:
            raise TunelabError(
                f"reparameterize must be one of {', '.join(REPARAMETERIZATIONS)}, "
                f"got {self.reparameterize!r}"
            )
        if self.bottleneck < 1:
            raise TunelabError(f"bottleneck must be >= 1, got {self.bottleneck}")


class ResidualReparam(nn.Module):
    """P' = P + LayerNorm(W2 relu(W1 P)), one MLP shared by the n vectors (Razdaibiedina et
    al. 2023): a step on W1, W2 moves every vector together, which made prompt tuning more
    accurate and less sensitive to learning rate and initialisation there.

    The LayerNorm's gain starts at 0 (not the usual 1), so P' = P exactly at step 0 and the
    model starts where plain prompt tuning starts (the label words' embeddings by default):
    a unit-variance LayerNorm output, far larger than typical token embeddings, would otherwise
    throw the start away. Zeroing W2 instead would not do: LayerNorm of a zero vector has a gradient
    of 1/sqrt(eps), so the first step would jump to a unit-variance shift. The gain still gets
    a gradient at 0 and grows from the first step (as in zero-gamma residual blocks, Goyal et
    al. 2017); W1 and W2 follow once it is non-zero."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        self.norm = nn.LayerNorm(width)
        nn.init.zeros_(self.norm.weight)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """(n, D) → (n, D), in float32 even under bf16 autocast: the folded artifact then holds
        exactly the vectors the model saw."""
        with torch.autocast(p.device.type, enabled=False):
            p = p.float()
            return p + self.norm(self.up(torch.relu(self.down(p))))


class SoftPrompt(nn.Module):
    """n virtual token embeddings placed after the BOS token (or first) of every row;
    with `reparam` (training only) the model sees `reparam(embedding)` instead."""

    def __init__(
        self, weight: torch.Tensor, insert: str = "after_bos", reparam: nn.Module | None = None
    ):
        super().__init__()
        self.embedding = nn.Parameter(weight.clone())  # (n, D)
        self.insert_at = insert
        self.reparam = reparam

    @property
    def n(self) -> int:
        return self.embedding.shape[0]

    def vectors(self) -> torch.Tensor:
        """(n, D): the vectors the model sees."""
        return self.embedding if self.reparam is None else self.reparam(self.embedding)

    def insert(self, embeds, mask, input_ids, bos_id):
        """(B, T, D), (B, T) → (B, T+n, D), (B, T+n), for left- or right-padded rows.

        Each row gets the prompt at its own position p_b (first real token, +1 past a BOS):
        output slot j takes input token j before p_b, prompt vector j-p_b inside, token j-n after.
        """
        B, T, D = embeds.shape
        n = self.n
        first = (mask.cumsum(1) == 0).sum(1)  # (B,) leading pads: 0 under right padding
        p = first
        if self.insert_at == "after_bos" and bos_id is not None:
            starts_bos = input_ids.gather(1, first.clamp(max=T - 1)[:, None]).squeeze(1) == bos_id
            p = first + starts_bos.long()
        j = torch.arange(T + n, device=embeds.device)[None, :]  # (1, T+n)
        p = p[:, None]  # (B, 1)
        in_prompt = (j >= p) & (j < p + n)  # (B, T+n)
        src = torch.where(j < p, j, j - n).clamp(0, T - 1)  # (B, T+n) source token index
        tokens = embeds.gather(1, src[..., None].expand(B, T + n, D))
        prompt = self.vectors()[(j - p).clamp(0, n - 1)].to(embeds.dtype)  # (B, T+n, D)
        out = torch.where(in_prompt[..., None], prompt, tokens)
        new_mask = torch.where(in_prompt, torch.ones_like(src), mask.gather(1, src))
        return out, new_mask


def initial_prompt(
    cfg: PromptTuningConfig,
    model,
    tokenizer,
    label_word_ids: list[list[int]],
    generator: torch.Generator,
) -> torch.Tensor:
    """(n, D) starting vectors for the soft prompt."""
    table = model.get_input_embeddings().weight.detach()  # (V, D)
    n = cfg.num_virtual_tokens
    if cfg.init == "random":
        # normal, with the spread of the vocabulary's embeddings
        std = table.float().std().item()
        return torch.randn(n, table.shape[1], generator=generator) * std
    if cfg.init == "vocab" or (cfg.init == "labels" and not label_word_ids):
        # (a generation task has no label words: sampled vocabulary instead)
        # sample from the 5,000 most common tokens (BPE ids are roughly frequency-ordered)
        top = min(5000, table.shape[0])
        ids = torch.randint(0, top, (n,), generator=generator)
    else:
        if cfg.init == "text":
            seq = tokenizer(cfg.init_text, add_special_tokens=False)["input_ids"]
        else:
            seq = [t for word in label_word_ids for t in word]
        if not seq:
            raise TunelabError(f"init={cfg.init}: nothing to initialise from")
        ids = torch.tensor([seq[i % len(seq)] for i in range(n)])  # repeat to fill n
    return table[ids].float().clone()


def new_prompt(backbone, cfg: PromptTuningConfig, verbalizer, seed: int = 0) -> SoftPrompt:
    g = torch.Generator().manual_seed(seed)
    words = verbalizer.words if verbalizer is not None else []
    weight = initial_prompt(cfg, backbone.model, backbone.tokenizer, words, g)
    reparam = None
    if cfg.reparameterize == "residual":
        with torch.random.fork_rng(devices=[]):  # W1, W2's init draws from the global generator
            torch.manual_seed(seed)
            reparam = ResidualReparam(weight.shape[1], cfg.bottleneck)
    table = backbone.model.get_input_embeddings().weight
    return SoftPrompt(weight.to(table.dtype), cfg.insert, reparam).to(table.device)


def build(backbone, cfg: PromptTuningConfig, verbalizer, seed: int = 0) -> TunedLM:
    """Freeze the backbone and add a soft prompt: the only trainable tensor (with
    `reparameterize=residual`, its MLP trains too)."""
    set_trainable(backbone.model, False)
    prompt = new_prompt(backbone, cfg, verbalizer, seed)
    return TunedLM(backbone.model, prompt, backbone.tokenizer.bos_token_id)


def restore_prompt(backbone, cfg: PromptTuningConfig, tensors: dict, source: str) -> SoftPrompt:
    """A trained prompt from PEFT-format tensors, its shape checked against model and config."""
    want = (cfg.num_virtual_tokens, backbone.model.get_input_embeddings().weight.shape[1])
    check_shapes(tensors, {"prompt_embeddings": want}, source)  # virtual tokens x hidden size
    weight = tensors["prompt_embeddings"]
    prompt = SoftPrompt(weight.to(backbone.model.get_input_embeddings().weight.dtype), cfg.insert)
    prompt.requires_grad_(False)
    return prompt


def save_prompt(
    prompt: SoftPrompt, model, cfg: PromptTuningConfig, out: Path, base_path: str
) -> None:
    """adapter_config.json and adapter_model.safetensors in PEFT's prompt-tuning format: the
    vectors the model sees, so a reparameterised prompt is folded into plain vectors."""
    mc = model.config
    write_json(
        {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_path,
            "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": mc.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": mc.num_attention_heads,
            "num_layers": mc.num_hidden_layers,
            "prompt_tuning_init": "RANDOM",
            "inference_mode": True,
        },
        out / ADAPTER_CONFIG,
    )
    was_training = prompt.training
    prompt.eval()
    with torch.no_grad():
        vectors = prompt.vectors().float()  # (n, D)
    prompt.train(was_training)
    atomic_save(
        {"prompt_embeddings": vectors},
        out / ADAPTER_WEIGHTS,
        {"format": "pt"},
    )


def load_prompt(backbone, cfg: PromptTuningConfig, out: Path) -> SoftPrompt:
    path = out / ADAPTER_WEIGHTS
    return restore_prompt(backbone, cfg, read_tensors(path), str(path))


def save_files(tuned: TunedLM, cfg: PromptTuningConfig, out: Path, base_path: str) -> None:
    save_prompt(tuned.prompt, tuned.model, cfg, out, base_path)


def restore(backbone, cfg: PromptTuningConfig, out: Path, adapter_name: str = "default") -> TunedLM:
    set_trainable(backbone.model, False)
    return TunedLM(backbone.model, load_prompt(backbone, cfg, out), backbone.tokenizer.bos_token_id)
