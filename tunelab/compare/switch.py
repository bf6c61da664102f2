"""Task-switch time: in a process whose backbone is already loaded, how long it takes to make
one artifact active and to answer one request with it, both the way users run them (`load`,
then `predict`: the artifact's demonstrations, prompt length and calibration included).

    python -m tunelab.compare.switch ARTIFACT_DIR     # prints one JSON object
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def example_input(task) -> dict:
    """A request for the task: every input field filled (and, for text-to-SQL, a database
    the task knows, whose schema the prompt then holds)."""
    fields = {f: "an example input" for f in task.input_fields}
    if task.sql is not None:
        from tunelab.tasks.sql import tables_of

        fields[task.sql.db_field] = next(iter(tables_of(task.sql.tables)))
    return fields


def measure(artifact: Path, repeats: int = 5) -> dict:
    from tunelab.artifact import read_meta
    from tunelab.device import resolve_device
    from tunelab.evaluate.loaded import load
    from tunelab.models import load_backbone

    meta = read_meta(artifact)
    device = resolve_device("auto")
    backbone = load_backbone(meta["base_model"]["name"])  # not timed: already in memory
    backbone.model.to(device)
    torch.set_grad_enabled(False)
    # a fresh backbone per repeat would cost a model load each; one activation is measured, as
    # the first switch is the one a server pays (later ones hit warm file caches)
    start = time.perf_counter()
    model = load(artifact, backbone=backbone, device=device)
    activate_ms = (time.perf_counter() - start) * 1000
    request = [example_input(model.task)]
    request_ms = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.predict(request)
        request_ms.append((time.perf_counter() - start) * 1000)
    return {"activate_ms": round(activate_ms, 3), "request_ms": round(min(request_ms), 3)}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]))))
