"""Methods by name. Each module gives a typed config, `build`, `restore` and `peft_files`."""

from __future__ import annotations

from tunelab.errors import TunelabError
from tunelab.methods import prompt_tuning

METHODS = {
    "prompt-tuning": prompt_tuning,
}
CONFIGS = {
    "prompt-tuning": prompt_tuning.PromptTuningConfig,
}


def get(name: str):
    if name not in METHODS:
        raise TunelabError(f"--method {name}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[name]
