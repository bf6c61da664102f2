"""Methods by name. Each module gives a typed config and `build`, `save_files`, `restore`:

- build(backbone, config, verbalizer, seed) -> TunedLM with exactly its trainable part trainable
- save_files(tuned, config, out_dir, base_model_path) writes the method's tensors
- restore(backbone, config, out_dir) -> TunedLM, tensors checked by name and shape
"""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.methods import freeze, full, head, hybrid, lora, prefix, prompt_tuning

METHODS = {
    "prompt-tuning": prompt_tuning,
    "prefix": prefix,
    "lora": lora,
    "full": full,
    "freeze": freeze,
    "head": head,
    "hybrid": hybrid,
}
CONFIGS = {
    "prompt-tuning": prompt_tuning.PromptTuningConfig,
    "prefix": prefix.PrefixConfig,
    "lora": lora.LoraSettings,
    "full": full.FullConfig,
    "freeze": freeze.FreezeConfig,
    "head": head.HeadConfig,
    "hybrid": hybrid.HybridConfig,
}


def get(name: str):
    if name not in METHODS:
        raise TunelabError(f"--method {name}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[name]
