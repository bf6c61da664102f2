"""The training loop, written out: schedule, accumulate, clip, step, evaluate, checkpoint."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tunelab.errors import TunelabError
from tunelab.evaluate.predict import autocast, predict_logprobs
from tunelab.models.scoring import label_logprobs, make_batch, target_nll
from tunelab.train.checkpoint import atomic_save, load, load_training_state, save_training_state
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


def micro_batch(n: int, cfg: TrainConfig, m: int) -> list[int]:
    """Row indices of the m-th micro-batch: epochs of seeded permutations, so that a resumed
    run sees exactly the batches an uninterrupted one would."""
    per_epoch = math.ceil(n / cfg.batch_size)
    epoch, i = divmod(m, per_epoch)
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[i * cfg.batch_size : (i + 1) * cfg.batch_size].tolist()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
) -> TrainResult:
    """Train `tuned`'s trainable parameters; leave it holding the best validation weights.

    `lr` and `weight_decay` are the method's (or the user's); parts that a method trains at
    their own rate (`tuned.group_lr`) keep it. Without a verbalizer the task is generation:
    the loss is the target tokens' mean negative log-likelihood. `validate(tuned) -> score`
    replaces the default validation (label accuracy on `val_ex`).
    """
    device = resolve_device(cfg.device)
    tuned.to(device)
    params = [p for p in tuned.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(tuned.param_groups(lr, weight_decay))
    ckpt_dir = out_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.safetensors", ckpt_dir / "best.safetensors"
    res = TrainResult()
    if resume and last_path.is_file():
        meta = load_training_state(last_path, tuned, opt)
        res = TrainResult(**{k: v for k, v in meta["result"].items()})
        print(f"resumed from {last_path} at step {res.step}")

    def save_last() -> None:
        save_training_state(last_path, tuned, opt, {"result": asdict(res), "config": asdict(cfg)})

    bar = tqdm(
        total=cfg.steps,
        initial=res.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0,
    )
    tuned.train()
    ema = None
    while res.step < cfg.steps and not res.stopped_early:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, res.step)
        torch.manual_seed(cfg.seed * 7919 + res.step)  # dropout masks repeat after a resume
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(cfg.grad_accum):
            idx = micro_batch(len(train_ex), cfg, res.step * cfg.grad_accum + micro)
            batch = make_batch(
                tuned, [train_ex[i] for i in idx], verbalizer, pad_id, cfg.padding_side, device
            )
            with autocast(device, cfg.bf16):
                if verbalizer is None:
                    loss = target_nll(tuned, batch)
                else:
                    logp = label_logprobs(tuned, batch, verbalizer)  # (B, C)
                    loss = F.nll_loss(logp.float(), batch["labels"])
            # divided by the accumulation steps so the summed gradient is the big batch's mean
            loss = loss / cfg.grad_accum
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            bar.close()
            raise TunelabError(
                f"loss became {total} at step {res.step + 1}; stopped. The last good checkpoint is "
                f"{last_path if last_path.is_file() else 'not written yet'}; try a lower lr "
                f"(--set lr=...) or bf16=false"
            )
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        res.step += 1
        ema = total if ema is None else 0.9 * ema + 0.1 * total
        record = {"step": res.step, "loss": round(total, 5), "lr": opt.param_groups[0]["lr"]}
        if (val_ex or validate) and (res.step % cfg.eval_every == 0 or res.step == cfg.steps):
            if validate is not None:
                acc = validate(tuned)
            else:
                acc = validation_accuracy(tuned, val_ex, verbalizer, pad_id, cfg)
            record["validation"] = acc
            if res.best_metric is None or acc > res.best_metric:
                res.best_metric, res.best_step, res.bad_evals = acc, res.step, 0
                atomic_save(
                    tuned.trainable_state(), best_path, {"step": res.step, "validation": acc}
                )
            else:
                res.bad_evals += 1
                if cfg.patience and res.bad_evals >= cfg.patience:
                    res.stopped_early = True
            bar.set_postfix(loss=f"{ema:.4f}", val=f"{acc:.3f}", best=f"{res.best_metric:.3f}")
        elif res.step % 5 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
        res.history.append(record)
        bar.update(1)
        if res.step % cfg.save_every == 0 or res.step == cfg.steps or res.stopped_early:
            save_last()
    bar.close()
    if res.stopped_early:
        print(f"early stop at step {res.step}: no improvement in {cfg.patience} validation runs")
    if best_path.is_file() and res.best_step is not None:
        tensors, _ = load(best_path)
        tuned.load_trainable_state(tensors)
    tuned.eval()
    return res
