"""Train a method with tunelab's loop and save each rank's trainable tensors; run by
tests/test_distributed.py both as one process and under `torchrun --nproc_per_node=2`.

    python tests/ddp_train.py MODEL_DIR TASK_YAML METHOD OUT_DIR [key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

from tunelab import methods
from tunelab.io import atomic_save
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train import distributed
from tunelab.train.config import TrainConfig, apply_overrides
from tunelab.train.loop import train


def main(model_dir: str, task: str, method: str, out: str, *settings: str) -> None:
    cfg, method_cfg = apply_overrides(list(settings), TrainConfig(), methods.CONFIGS[method]())
    backbone = load_backbone(model_dir)
    prep = PreparedTask.load(load_task(task), backbone.tokenizer)
    tuned = methods.get(method).build(backbone, method_cfg, prep.verbalizer, cfg.seed)
    w = distributed.world()
    train(
        tuned,
        prep.examples("train"),
        [],  # no validation: the ranks must agree through the gradients alone
        prep.verbalizer,
        cfg,
        cfg.lr or method_cfg.lr,
        Path(out) / f"run{w.rank}",
        backbone.tokenizer.pad_token_id,
    )
    # whole tensors on every rank (under fsdp=true each holds a part of each)
    state = {
        k: v.full_tensor() if isinstance(v, DTensor) else v
        for k, v in tuned.trainable_state().items()
    }
    meta = {"sharded": distributed.sharded(tuned)}
    atomic_save(state, Path(out) / f"rank{w.rank}.safetensors", meta)
    distributed.finish()


if __name__ == "__main__":
    main(*sys.argv[1:])
