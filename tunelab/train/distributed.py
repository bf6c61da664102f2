"""Data-parallel training under `torchrun` or `accelerate launch`: the launcher's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) decides; without it, one process.

Each optimizer step takes the same global micro-batch a single process would take and gives
rank r the rows r, r + N, r + 2N, ...; DistributedDataParallel averages the gradients, and the
loss is weighted so that the average equals the single-process mean over the whole batch. Only
rank 0 validates, writes checkpoints and the artifact; the others receive its decisions."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The process that validates, prints progress and writes files."""
        return self.rank == 0


def world() -> World:
    """The launcher's view of this process (one process when no launcher set the variables)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def init(device_name: str) -> tuple[World, torch.device]:
    """Join the process group (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    w = world()
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    device = torch.device(f"cuda:{w.local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if w.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=w.rank, world_size=w.size)
    return w, device


def shard(rows: list[int], w: World) -> list[int]:
    """This rank's rows of a global micro-batch (every rank gets at most one row more)."""
    return rows[w.rank :: w.size]


def wrap(module: nn.Module, w: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (frozen ones are not synchronised:
    DDP skips parameters that need no gradient)."""
    if not w.distributed:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def all_sum(value: float, device: torch.device, w: World) -> float:
    if not w.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def from_main(obj, w: World):
    """Rank 0's value of a small picklable Python object (a validation decision), on every rank."""
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_trainable(tuned: nn.Module, w: World) -> None:
    """Copy rank 0's trainable tensors to every rank (after it restored the best checkpoint)."""
    if not w.distributed:
        return
    with torch.no_grad():
        for p in tuned.parameters():
            if p.requires_grad:
                dist.broadcast(p.data, src=0)


def finish() -> None:
    """Leave the process group (a no-op for one process)."""
    if dist.is_initialized():
        dist.destroy_process_group()
