"""The training loop, written out: schedule, accumulate, clip, step, evaluate, checkpoint."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from tunelab.device import autocast, emulated_bf16_warning
from tunelab.errors import TunelabError
from tunelab.io import atomic_save, load_tensors
from tunelab.lm.head_cache import after_head, head_ids
from tunelab.lm.lean import lean_swiglu
from tunelab.lm.predict import predict_logprobs
from tunelab.lm.scoring import make_batch
from tunelab.methods.base import backbone_alone
from tunelab.tasks.encode import Epochs
from tunelab.train import distributed
from tunelab.train.checkpoint import load_training_state, restore_trainable, training_state
from tunelab.train.config import TrainConfig


@dataclass
class TrainResult:
    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validation runs since the last improvement
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to 1, then linear or cosine decay to 0 (or constant)."""
    warm = cfg.warmup_steps()
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "constant":
        return 1.0
    done = (step - warm) / max(1, cfg.steps - warm)
    return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))


def epoch_batches(lengths: list[int], cfg: TrainConfig, epoch: int) -> list[list[int]]:
    """The micro-batches (row indices) of one epoch, from a seeded permutation, so that a resumed
    run sees exactly the batches an uninterrupted one would.

    With `group_by_length`, rows are sorted by length within windows of 50 batches and the
    batches shuffled again: rows of one batch have similar lengths, so little compute goes to
    padding, while every batch still comes from a random part of the data."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    B = cfg.batch_size
    if not cfg.group_by_length:
        return [perm[i : i + B] for i in range(0, len(perm), B)]
    window = 50 * B
    batches = []
    for w in range(0, len(perm), window):
        rows = sorted(perm[w : w + window], key=lambda i: -lengths[i])
        batches += [rows[i : i + B] for i in range(0, len(rows), B)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in order]


def micro_batch(lengths: list[int], cfg: TrainConfig, m: int, _cache: dict | None = None):
    """Row indices of the m-th micro-batch of the whole run (epochs follow one another)."""
    per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    epoch, i = divmod(m, per_epoch)
    cache = _cache if _cache is not None else {}
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(lengths, cfg, epoch)
    return cache[epoch][i]


def epoch_of(n_rows: int, cfg: TrainConfig, m: int) -> int:
    """The epoch the m-th micro-batch of the run belongs to."""
    return m // math.ceil(n_rows / cfg.batch_size)


def epochs_in_run(n_rows: int, cfg: TrainConfig) -> int:
    """How many epochs (whole or begun) `cfg.steps` steps read."""
    return epoch_of(n_rows, cfg, cfg.steps * cfg.grad_accum - 1) + 1


class Objective(nn.Module):
    """The training loss as a module's forward, so that DistributedDataParallel can wrap it
    (FSDP wraps `tuned`, whose forward this calls).

    Returns the batch's summed loss times `scale`: 1 / (rows in the global batch) for labels,
    1 / (target tokens in the global batch) for generation, so one process gets the mean."""

    def __init__(self, tuned, verbalizer, head_ids: list[int] | None = None):
        super().__init__()
        self.tuned = tuned
        self.verbalizer = verbalizer
        # the token ids every row starts with (see `shared_head_ids`); rows come without them
        self.head_ids = head_ids

    def forward(self, batch: dict, scale: float) -> torch.Tensor:
        if self.verbalizer is None:  # generation: negative log-likelihood of the target tokens
            return -self.tuned(batch).sum() * scale
        # with head ids, the shared head runs once for the whole batch; every row's gradient
        # reaches it
        logp = self.tuned(batch, self.verbalizer, self.head_ids)  # (B, C)
        return F.nll_loss(logp.float(), batch["labels"], reduction="sum") * scale


def shared_head_ids(tuned, train_ex, verbalizer, cfg: TrainConfig) -> list[int] | None:
    """The token ids every training prompt starts with, when running that head once per batch
    pays (`reuse_head`, classification, no gradient checkpointing: recomputing a layer would
    append the rows' keys to the shared cache twice; no FSDP: the rows' backward reaches the
    head's keys and values through the cache, which FSDP's hooks do not see, after the block
    that made them has let go of its whole weights); else None."""
    if not cfg.reuse_head or verbalizer is None or (cfg.fsdp and distributed.world().distributed):
        return None
    if any(getattr(m, "gradient_checkpointing", False) for m in tuned.model.modules()):
        return None
    return head_ids(tuned, [ex.ids for ex in train_ex])


def all_finite(params: list[torch.Tensor], device: torch.device, world) -> bool:
    """Whether every parameter (each rank's shard under FSDP) holds only finite values."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
    bad = 0.0 if not local else float(not torch.stack([t.isfinite().all() for t in local]).all())
    return distributed.all_sum(bad, device, world) == 0


def validation_accuracy(tuned, examples, verbalizer, pad_id, cfg: TrainConfig) -> float:
    logp = predict_logprobs(
        tuned, examples, verbalizer, pad_id, cfg.eval_batch_size, cfg.padding_side, cfg.bf16
    )
    gold = torch.tensor([ex.label for ex in examples])
    return (logp.argmax(-1) == gold).float().mean().item()


def train(
    tuned,
    train_ex,
    val_ex,
    verbalizer,
    cfg: TrainConfig,
    lr: float,
    out_dir: Path,
    pad_id: int,
    resume: bool = False,
    weight_decay: float = 0.0,
    validate=None,
    on_validation=None,
    run: dict | None = None,
    zero_shot: bool = False,
    say=print,
    bars: bool = True,
) -> TrainResult:
    """Train `tuned`'s trainable parameters; leave it holding the best validation weights.

    `lr` and `weight_decay` are the method's (or the user's); parts that a method trains at
    their own rate (`tuned.group_lr`) keep it. Without a verbalizer the task is generation:
    the loss is the target tokens' mean negative log-likelihood. `validate(tuned) -> score`
    replaces the default validation (label accuracy on `val_ex`). `on_validation(record)` sees
    each validation result as it comes (rank 0), e.g. to follow a trial's curve from outside.
    Validation runs at step 0 too, before any update (history's step-0 record, no loss), and
    the best-checkpoint choice includes it; with `zero_shot`, that record also holds the score
    of the backbone alone (`zero_shot`: no soft prompt, prefix or head, adapters off).
    `run` (task, method and its config) is kept in the checkpoint, so that --resume can refuse
    another run's. `train_ex` is a list of examples, or `Epochs`: the rows encoded per epoch.
    Lines ("resumed from", "early stop") go to `say`; `bars=False` hides the progress bar.
    """
    world, device = distributed.init(cfg.device)
    prepare_model(tuned, cfg, world, device)
    # rows re-encoded each epoch (demonstrations drawn afresh): the head is what all of them
    # share; batching follows the first epoch's lengths
    epochs = train_ex if isinstance(train_ex, Epochs) else Epochs([train_ex])
    head = shared_head_ids(tuned, epochs.every_row(), verbalizer, cfg)
    # (before the optimizer: FSDP replaces the parameters with sharded ones)
    objective = distributed.wrap(Objective(tuned, verbalizer, head), world, device, cfg.fsdp)
    loop = _Loop(
        tuned, cfg, world, device, objective, epochs, head, verbalizer, pad_id,
        sharded=distributed.sharded(tuned),  # then every rank gathers what rank 0 writes
        opt=torch.optim.AdamW(tuned.param_groups(lr, weight_decay)),
        ckpt_dir=out_dir / "checkpoints", run=run or {},
        val_ex=val_ex, validate=validate, on_validation=on_validation, zero_shot=zero_shot,
        say=say, bars=bars,
    )  # fmt: skip
    if resume:
        loop.resume()
    res = loop.res
    loop.open_bar()
    if res.step == 0 and (val_ex or validate):
        # the start (the method's initialisation) competes for best: a run whose training only
        # makes things worse ends holding it. A resumed run has this record in its checkpoint
        start_record = {"step": 0}
        loop.validate_now(start_record)
        res.history.append(start_record)
    tuned.train()
    ema = None
    while res.step < cfg.steps and not res.stopped_early:
        total = loop.step()
        validating = (val_ex or validate) and (
            res.step % cfg.eval_every == 0 or res.step == cfg.steps
        )
        writing = validating or res.step % cfg.save_every == 0 or res.step == cfg.steps
        if writing:
            loop.check_weights()
        ema = total if ema is None else 0.9 * ema + 0.1 * total
        record = {"step": res.step, "loss": round(total, 5), "lr": loop.opt.param_groups[0]["lr"]}
        if validating:
            loop.validate_now(record, loss=f"{ema:.4f}")
        elif res.step % 5 == 0:
            loop.bar.set_postfix(loss=f"{ema:.4f}")
        res.history.append(record)
        loop.bar.update(1)
        if res.step % cfg.save_every == 0 or res.step == cfg.steps or res.stopped_early:
            loop.save_last()
    loop.bar.close()
    if res.stopped_early and world.main:
        say(f"early stop at step {res.step}: no improvement in {cfg.patience} validation runs")
    if res.best_step is not None:
        loop.restore_best()
    tuned.eval()
    return res


def prepare_model(tuned, cfg: TrainConfig, world, device: torch.device) -> None:
    """Put `tuned` on its device, in the precision it trains in, warning where that is slow."""
    if not (cfg.fsdp and world.distributed):  # FSDP moves each block as it shards it
        tuned.to(device)
    lean_swiglu(tuned.model)  # fewer saved activations, the same gradients
    warning = emulated_bf16_warning(device, cfg.bf16)
    if warning and world.main:
        print(warning, file=sys.stderr)
    if cfg.fsdp and not world.distributed and world.main:
        print("warning: fsdp=true in one process: nothing to shard across", file=sys.stderr)
    if cfg.bf16 and not (cfg.fsdp and world.distributed):
        # (FSDP keeps a group's weights in one dtype: under it they stay float32)
        # a frozen weight needs no float32 master copy: in bfloat16 it takes half the memory,
        # and autocast no longer makes (and keeps for backward) a bf16 copy of it every step
        for p in tuned.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)


@dataclass
class _Loop:
    """What the steps of one `train` call share: the model, its optimizer, where it writes, the
    validation it runs, and the result so far."""

    tuned: nn.Module
    cfg: TrainConfig
    world: object  # distributed.World
    device: torch.device
    objective: nn.Module
    epochs: Epochs
    head: list[int] | None  # the token ids the objective runs once per batch, or None
    verbalizer: object
    pad_id: int
    sharded: bool
    opt: torch.optim.Optimizer
    ckpt_dir: Path
    run: dict
    val_ex: list
    validate: object = None
    on_validation: object = None
    zero_shot: bool = False
    say: Callable = print
    bars: bool = True
    res: TrainResult = field(default_factory=TrainResult)
    bar: object = None

    def __post_init__(self):
        self.params = [p for p in self.tuned.parameters() if p.requires_grad]
        self.last_path = self.ckpt_dir / "last.safetensors"
        self.best_path = self.ckpt_dir / "best.safetensors"
        self.lengths = [len(ex.ids) + len(ex.target or ()) for ex in self.epochs.of(0)]
        self.batches: dict[int, list[list[int]]] = {}  # this epoch's micro-batches

    def resume(self) -> None:
        if self.last_path.is_file():
            meta = load_training_state(self.last_path, self.tuned, self.opt)
            self.res = TrainResult(**{k: v for k, v in meta["result"].items()})
            if self.world.main:
                self.say(f"resumed from {self.last_path} at step {self.res.step}")

    def open_bar(self) -> None:
        self.bar = tqdm(
            total=self.cfg.steps,
            initial=self.res.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            disable=not (self.bars and self.world.main),
        )

    def step(self) -> float:
        """One optimizer step: schedule, accumulate the micro-batches, clip, update. Returns the
        step's loss (the global batch's mean)."""
        cfg, res, world = self.cfg, self.res, self.world
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, res.step)
        torch.manual_seed(cfg.seed * 7919 + res.step)  # dropout masks repeat after a resume
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            total += self.micro_step(micro) / world.size
        total = distributed.all_sum(total, self.device, world)
        if not math.isfinite(total):
            self.bar.close()
            raise TunelabError(
                f"loss became {total} at step {res.step + 1}; stopped. The last good checkpoint is "
                f"{self.last_good()}; try a lower lr (--set lr=...) or bf16=false"
            )
        torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
        self.opt.step()
        res.step += 1
        return total

    def micro_step(self, micro: int) -> float:
        """Forward and backward of one micro-batch; its loss."""
        cfg, world, device = self.cfg, self.world, self.device
        m = self.res.step * cfg.grad_accum + micro
        rows = micro_batch(self.lengths, cfg, m, self.batches)
        idx = distributed.shard(rows, world)
        # a rank left without rows still runs one, weighted 0: DDP needs every rank's backward
        weight = 1.0 if idx else 0.0
        part = [self.epochs.of(epoch_of(len(self.lengths), cfg, m))[i] for i in idx or rows[:1]]
        if self.head is not None:  # the objective runs the head once and attends to it
            part = after_head(part, len(self.head))
        batch = make_batch(self.tuned, part, self.verbalizer, self.pad_id, cfg.padding_side, device)
        if self.verbalizer is None:  # the mean is over the global batch's target tokens
            denom = distributed.all_sum(weight * batch["target_mask"].sum().item(), device, world)
        else:
            denom = len(rows)
        # DDP averages gradients over ranks, so each rank's sum is scaled up by their number;
        # dividing by the accumulation steps makes the summed gradient the big batch's mean
        scale = weight * world.size / (denom * cfg.grad_accum)
        sync = micro == cfg.grad_accum - 1 or not world.distributed
        with distributed.grad_sync(self.objective, sync):  # sync grads once per step
            with autocast(device, cfg.bf16):
                loss = self.objective(batch, scale)
            loss.backward()
        return loss.item()

    def check_weights(self) -> None:
        """A finite loss can still leave NaN weights (lr=nan, an overflowing update): stop before
        they reach a checkpoint or the artifact. Run where a step may write (scanning every
        weight each step costs a full fine-tuning step ~1 s on 2 CPU cores); a NaN between
        writes shows in the next step's loss, checked every step."""
        if not all_finite(self.params, self.device, self.world):
            self.bar.close()
            raise TunelabError(
                f"the trainable tensors became non-finite (NaN or infinity) at step "
                f"{self.res.step}; stopped before writing anything of this step. The last good "
                f"checkpoint is {self.last_good()}; try a lower lr (--set lr=...) or max_grad_norm"
            )

    def last_good(self) -> str:
        return str(self.last_path) if self.last_path.is_file() else "not written yet"

    def save(self, tensors: dict, path: Path, meta: dict) -> None:
        """Rank 0 writes (without FSDP every rank holds the same weights)."""
        if self.world.main or self.sharded:
            tensors = distributed.gather(tensors, self.world)
        if self.world.main:
            atomic_save(tensors, path, meta)

    def save_last(self) -> None:
        meta = {"result": asdict(self.res), "config": asdict(self.cfg), "run": self.run}
        self.save(training_state(self.tuned, self.opt), self.last_path, meta)

    def score(self, model) -> float:
        if self.validate is not None:
            return self.validate(model)
        return validation_accuracy(model, self.val_ex, self.verbalizer, self.pad_id, self.cfg)

    def validate_now(self, record: dict, **postfix) -> None:
        """Score the weights as they are now into `record`; keep them as the best when they beat
        the best so far, or tie the start (step 0: on a tie the trained weights win)."""
        res, world = self.res, self.world
        acc = zero = None
        start = record["step"] == 0 and self.zero_shot
        if world.main or self.sharded:  # under FSDP every rank runs the model
            with distributed.full_weights(self.tuned):
                acc = self.score(self.tuned)
                if start:
                    with backbone_alone(self.tuned) as bare:  # None: the start is the backbone
                        zero = acc if bare is None else self.score(bare)
        acc, zero = distributed.from_main((acc, zero), world)  # every rank decides the same
        record["validation"] = acc
        if start:
            record["zero_shot"] = zero
        if (
            res.best_metric is None
            or acc > res.best_metric
            or (res.best_step == 0 and acc == res.best_metric)
        ):
            res.best_metric, res.best_step, res.bad_evals = acc, res.step, 0
            meta = {"step": res.step, "validation": acc}
            self.save(self.tuned.trainable_state(), self.best_path, meta)
        else:
            res.bad_evals += 1
            if self.cfg.patience and res.bad_evals >= self.cfg.patience:
                res.stopped_early = True
        self.bar.set_postfix(**postfix, val=f"{acc:.3f}", best=f"{res.best_metric:.3f}")
        if self.on_validation is not None and world.main:
            self.on_validation(record)

    def restore_best(self) -> None:
        """Every rank takes the best validation weights rank 0 wrote."""
        if self.sharded:  # every rank reads its part of the best weights, once rank 0 wrote them
            distributed.barrier(self.world)
        if (self.world.main or self.sharded) and self.best_path.is_file():
            restore_trainable(self.tuned, load_tensors(self.best_path)[0])
        if not self.sharded:  # rank 0 restored the best weights; the others take them
            distributed.broadcast_trainable(self.tuned, self.world)
