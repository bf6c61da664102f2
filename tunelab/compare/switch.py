"""Task-switch time: in a process whose backbone is already loaded, how long it takes to make
one artifact active and to answer one request with it.

    python -m tunelab.compare.switch ARTIFACT_DIR     # prints one JSON object
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def measure(artifact: Path, repeats: int = 5) -> dict:
    from tunelab.artifact import load_artifact, read_meta
    from tunelab.lm.generate import greedy_generate
    from tunelab.lm.predict import predict_logprobs
    from tunelab.models import load_backbone
    from tunelab.tasks.encode import encode
    from tunelab.tasks.readers import Record
    from tunelab.tasks.template import placeholders
    from tunelab.tasks.verbalizer import Verbalizer

    meta = read_meta(artifact)
    backbone = load_backbone(meta["base_model"]["name"])  # not timed: already in memory
    torch.set_grad_enabled(False)
    # a fresh backbone per repeat would cost a model load each; one activation is measured, as
    # the first switch is the one a server pays (later ones hit warm file caches)
    start = time.perf_counter()
    tuned, task, _, _ = load_artifact(artifact, backbone)
    activate_ms = (time.perf_counter() - start) * 1000
    # every placeholder, derived ones too (a text-to-SQL task's {schema})
    fields = {f: "an example input" for f in [*task.input_fields, *placeholders(task.template)]}
    examples = encode(task, [Record(fields, "switch", 1)], backbone.tokenizer)
    request_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        if task.is_generation:
            greedy_generate(tuned, examples, backbone.tokenizer, 8, task.generation.stop)
        else:
            predict_logprobs(
                tuned,
                examples,
                Verbalizer.build(task, backbone.tokenizer),
                backbone.tokenizer.pad_token_id,
            )
        request_ms.append((time.perf_counter() - start) * 1000)
    return {"activate_ms": round(activate_ms, 3), "request_ms": round(min(request_ms), 3)}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
