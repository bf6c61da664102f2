"""Data-parallel training under `torchrun` or `accelerate launch`: the launcher's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) decides; without it, one process.

Each optimizer step takes the same global micro-batch a single process would take and gives
rank r the rows r, r + N, r + 2N, ...; DistributedDataParallel averages the gradients, and the
loss is weighted so that the average equals the single-process mean over the whole batch. Only
rank 0 validates, writes checkpoints and the artifact; the others receive its decisions.

With `fsdp=true` the weights themselves are split across the ranks instead (FSDP2's
`fully_shard`: each decoder block, then the rest of the model as the root group), so a model
too large for one device trains; a block's whole weights exist only while it runs. Every rank
then takes part in validation (`full_weights`) and in gathering whole tensors for rank 0 to
write (`gather`, `unshard_to_main`); checkpoints hold whole tensors either way, so a run
resumes with or without FSDP and on another number of ranks."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tunelab.errors import TunelabError


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


def wrap(objective: nn.Module, w: World, device: torch.device, fsdp: bool = False) -> nn.Module:
    """DistributedDataParallel over the trainable parameters (frozen ones are not synchronised:
    DDP skips parameters that need no gradient); with `fsdp`, shard `objective.tuned` instead
    (its forward is the training step's) and return the objective as it is."""
    if not w.distributed:
        return objective
    if fsdp:
        shard_weights(objective.tuned, w, device)
        return objective
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(objective, device_ids=ids)


def shard_weights(tuned: nn.Module, w: World, device: torch.device) -> None:
    """FSDP2 over the model: one group per decoder block (the classes the model names in
    `_no_split_modules`), then `tuned` itself as the root group (embeddings, final norm, LM
    head, soft prompt, classification head). Gradients are averaged like DDP's."""
    from torch.distributed.device_mesh import init_device_mesh

    names = {n for m in tuned.modules() for n in getattr(m, "_no_split_modules", None) or ()}
    blocks = [m for m in tuned.modules() if type(m).__name__ in names]
    if not blocks:
        raise TunelabError(
            f"fsdp: cannot find the decoder blocks of {type(tuned.model).__name__} (its "
            "_no_split_modules is empty); train it without fsdp"
        )
    mesh = init_device_mesh(device.type, (w.size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(tuned, mesh=mesh)


def sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


@contextmanager
def full_weights(tuned: nn.Module):
    """Run `tuned` outside its forward (validation, evaluation, decoding): the root group's
    weights gathered for the duration; the blocks gather their own as they run. Under FSDP every
    rank must run the same calls; otherwise a no-op."""
    if not sharded(tuned):
        yield
        return
    # FSDP takes the first module to run forward as the root; validation at step 0 comes before
    # any training step and runs the blocks outside `tuned`'s forward, so make `tuned` the root
    # now (a no-op once it is; no public call does this in torch 2.13)
    tuned._get_fsdp_state()._lazy_init()
    tuned.unshard()
    try:
        yield
    finally:
        tuned.reshard()


@contextmanager
def grad_sync(objective: nn.Module, on: bool):
    """Leave gradients unsynchronised across ranks inside unless `on` (accumulation steps)."""
    if on:
        yield
        return
    if isinstance(objective, nn.parallel.DistributedDataParallel):
        with objective.no_sync():
            yield
        return
    root = next((m for m in objective.modules() if isinstance(m, FSDPModule)), None)
    if root is None:  # one process
        yield
        return
    root.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        root.set_requires_gradient_sync(True)


def gather(tensors: dict[str, torch.Tensor], w: World) -> dict[str, torch.Tensor] | None:
    """Whole tensors on rank 0's CPU, None on the other ranks. Sharded tensors are gathered one
    at a time (a collective: under FSDP every rank calls this, in the same order)."""
    out = {}
    for name, t in tensors.items():
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if w.main:
            out[name] = t.detach().cpu()
    return out if w.main else None


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a checkpoint, split like `param` when FSDP shards it (every
    rank read the same file, so each takes its own part without communicating)."""
    if not isinstance(param, DTensor):
        return value
    value = value.to(param.device)
    return distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)


def unshard_to_main(tuned: nn.Module, w: World) -> None:
    """Replace every sharded parameter with its whole tensor on rank 0's CPU (for writing the
    artifact); the other ranks keep theirs. Tied parameters stay tied. A collective."""
    whole: dict[int, nn.Parameter | None] = {}
    for module in list(tuned.modules()):
        for name, p in list(module._parameters.items()):
            if not isinstance(p, DTensor):
                continue
            if id(p) not in whole:
                full = p.full_tensor().detach().cpu()
                whole[id(p)] = nn.Parameter(full, p.requires_grad) if w.main else None
            if w.main:
                module._parameters[name] = whole[id(p)]


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


def barrier(w: World) -> None:
    """Wait until every rank is here (after rank 0 wrote a file the others read)."""
    if w.distributed:
        dist.barrier()


def finish() -> None:
    """Leave the process group (a no-op for one process), once every rank is here: a rank
    that tears gloo down while its peer still has work in flight can abort (SIGABRT)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
