"""Every method tunelab trains, one `Method` record each, in `METHODS`: the one place that says
what a method is and what the rest of tunelab may assume about it (serving, comparing, the
search, `advise`). Code asks a record, never a tuple of method names.

Each method's module gives its typed config and three functions, one signature for all:

- build(backbone, config, verbalizer, seed) -> TunedLM with exactly its trainable part trainable
- save_files(tuned, config, out_dir, base_model_path) writes the method's tensors
- restore(backbone, config, out_dir, adapter_name) -> TunedLM, tensors checked by name and shape
  (`adapter_name`: where a LoRA adapter joins the backbone's others; the rest ignore it)

The zero-shot and in-context baselines of `tunelab compare` are not here: nothing of theirs
trains or is saved, they are the stock model scored by `tunelab eval` (compare/runs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.errors import TunelabError
from tunelab.methods import freeze, full, head, hybrid, lora, prefix, prompt_tuning

ADVISE_LABELS = 8  # `advise` knows no task: it sizes a head for 8 labels


@dataclass(frozen=True)
class Method:
    """What tunelab knows about one method. `shape` below is a model's shape as `advise` reads
    it from the model's config (compare/advise.Shape: parameters, hidden, intermediate, layers,
    vocab); `c` is the method's config."""

    name: str  # as --method and tunelab.json's "method" spell it
    config: type  # the typed config (--set keys); its defaults are the method's defaults
    build: Callable
    save_files: Callable
    restore: Callable
    # given the saved method_config (a dict): the backbone's weights stay as they are, so
    # `serve` runs the task on its one shared backbone (else on a copy of its own)
    shares_backbone: Callable[[dict], bool]
    # its LoRA layers join the shared backbone under their own adapter name, and a mixed batch
    # routes each row to its task's adapter
    routes_rows: bool
    # parts beside the backbone's weights (soft prompt, prefix, head, adapters) that
    # `backbone_alone` takes away to score the zero-shot model; False: the backbone itself trains
    adds_parts: bool
    # every weight trains: a task is a whole model of its own
    every_weight: bool
    # (--set key, low, high): the learning rates the search draws, log-uniform
    search_lr: tuple[tuple[str, float, float], ...]
    # the extra knobs `--search` may vary for it (compare/search.EXTRA_KNOBS)
    search_knobs: tuple[str, ...]
    # for `advise`: the parameters it trains on a model of `shape`
    trainable_size: Callable[[Any, Any], int]
    # for `advise`: input positions it adds once per batch (a soft prompt runs in the shared head)
    prompt_tokens: Callable[[Any], int] = lambda c: 0
    # for `advise`: the blocks gradients pass through (activations kept for backward)
    backprop_layers: Callable[[Any, Any], int] = lambda shape, c: shape.layers

    def default_size(self, shape) -> int:
        """Parameters it trains on a model of `shape` with its default config (`advise`)."""
        return self.trainable_size(shape, self.config())


def _shared(method_config: dict) -> bool:
    return True


def _own(method_config: dict) -> bool:
    return False


def _lora_size(shape, c) -> int:
    # all-linear LoRA: r * (in + out) per projection; 4 attention + 3 MLP projections per block
    return shape.layers * c.r * (8 * shape.hidden + 3 * (shape.hidden + shape.intermediate))


def _block_size(shape) -> int:
    return (shape.parameters - shape.vocab * shape.hidden) // shape.layers


WEIGHT_DECAY = ("weight_decay",)

# The learning-rate ranges hold the values the literature uses: prompt tuning up to 0.3 (Lester
# et al. 2021), prefix 1e-3..1e-1 (Li and Liang 2021, P-tuning v2), LoRA 1e-5..3e-3 (Hu et al.
# 2021 and PEFT's examples), full fine-tuning 3e-6..1e-4 (LM-BFF's grid 1e-5..5e-5 inside it).
# The order is the one every listing uses: frozen backbone first, every weight last, then hybrid.
_RECORDS = (
    Method(
        "prompt-tuning",
        prompt_tuning.PromptTuningConfig,
        prompt_tuning.build,
        prompt_tuning.save_files,
        prompt_tuning.restore,
        shares_backbone=_shared,
        routes_rows=False,
        adds_parts=True,
        every_weight=False,
        search_lr=(("lr", 1e-3, 0.3),),
        search_knobs=("num_virtual_tokens", "init", "reparameterize", *WEIGHT_DECAY),
        trainable_size=lambda shape, c: c.num_virtual_tokens * shape.hidden,
        prompt_tokens=lambda c: c.num_virtual_tokens,
    ),
    Method(
        "prefix",
        prefix.PrefixConfig,
        prefix.build,
        prefix.save_files,
        prefix.restore,
        shares_backbone=_shared,
        routes_rows=False,
        adds_parts=True,
        every_weight=False,
        search_lr=(("lr", 1e-3, 1e-1),),
        search_knobs=("num_virtual_tokens", *WEIGHT_DECAY),
        trainable_size=lambda shape, c: c.num_virtual_tokens * shape.layers * 2 * shape.hidden,
    ),
    Method(
        "lora",
        lora.LoraSettings,
        lora.build,
        lora.save_files,
        lora.restore,
        shares_backbone=_shared,
        routes_rows=True,
        adds_parts=True,
        every_weight=False,
        search_lr=(("lr", 1e-5, 3e-3),),
        search_knobs=("r", *WEIGHT_DECAY),
        trainable_size=_lora_size,
    ),
    Method(
        "freeze",
        freeze.FreezeConfig,
        freeze.build,
        freeze.save_files,
        freeze.restore,
        shares_backbone=_own,
        routes_rows=False,
        adds_parts=False,
        every_weight=False,
        search_lr=(("lr", 1e-5, 1e-3),),
        search_knobs=WEIGHT_DECAY,
        trainable_size=lambda shape, c: c.train_top * _block_size(shape),
        backprop_layers=lambda shape, c: c.train_top,
    ),
    Method(
        "head",
        head.HeadConfig,
        head.build,
        head.save_files,
        head.restore,
        shares_backbone=lambda method_config: not method_config.get("train_backbone", False),
        routes_rows=False,
        adds_parts=True,
        every_weight=False,
        search_lr=(("lr", 1e-4, 3e-2),),
        search_knobs=WEIGHT_DECAY,
        trainable_size=lambda shape, c: shape.hidden * ADVISE_LABELS,
        backprop_layers=lambda shape, c: shape.layers if c.train_backbone else 0,
    ),
    Method(
        "full",
        full.FullConfig,
        full.build,
        full.save_files,
        full.restore,
        shares_backbone=_own,
        routes_rows=False,
        adds_parts=False,
        every_weight=True,
        search_lr=(("lr", 3e-6, 1e-4),),
        search_knobs=WEIGHT_DECAY,
        trainable_size=lambda shape, c: shape.parameters,
    ),
    Method(
        "hybrid",
        hybrid.HybridConfig,
        hybrid.build,
        hybrid.save_files,
        hybrid.restore,
        shares_backbone=_shared,
        routes_rows=True,
        adds_parts=True,
        every_weight=False,
        search_lr=(("lr", 1e-5, 3e-3), ("prompt_lr", 1e-3, 0.3)),
        search_knobs=("num_virtual_tokens", "init", "reparameterize", "r", *WEIGHT_DECAY),
        trainable_size=lambda shape, c: _lora_size(shape, c) + c.num_virtual_tokens * shape.hidden,
        prompt_tokens=lambda c: c.num_virtual_tokens,
    ),
)
METHODS: dict[str, Method] = {m.name: m for m in _RECORDS}
# each method's config class by name (a view of METHODS, for the callers that want only that)
CONFIGS: dict[str, type] = {name: m.config for name, m in METHODS.items()}


def get(name: str) -> Method:
    if name not in METHODS:
        raise TunelabError(f"--method {name}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[name]


def find(name) -> Method | None:
    """The record of `name` (as read from a file: any value), or None for no method's."""
    return METHODS.get(name) if isinstance(name, str) else None
