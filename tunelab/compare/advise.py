"""`tunelab advise`: which method to pick for a model, a number of tasks, a memory budget and a
priority, from estimated (or, with results.json, measured) cost and accuracy."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import headline

GB = 2**30
RUNTIME_BYTES = 0.6 * GB  # Python, torch and transformers themselves, measured on CPU
PRIORITIES = ("accuracy", "cost", "flexibility")
# without measurements: the usual order of accuracy at equal budget on small models
# (Lester et al. 2021 and Liu et al. 2022 find prompt tuning lags below ~1B parameters)
ACCURACY_PRIOR = ["full", "lora", "hybrid", "freeze", "prefix", "head", "prompt-tuning"]


@dataclass
class Shape:
    """What memory depends on, read from the model's config."""

    parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int

    @classmethod
    def from_config(cls, c) -> Shape:
        hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
        inter = getattr(c, "intermediate_size", 4 * hidden)
        kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
        attn = hidden * (c.num_attention_heads * head_dim) * 2 + hidden * kv * head_dim * 2
        block = attn + 3 * hidden * inter + 2 * hidden
        tied = getattr(c, "tie_word_embeddings", False)
        params = layers * block + vocab * hidden * (1 if tied else 2) + hidden
        return cls(params, hidden, inter, layers, c.num_attention_heads, vocab)


def trainable_parameters(s: Shape, method: str, r: int = 8, tokens: int = 20, top: int = 2) -> int:
    block = (s.parameters - s.vocab * s.hidden) // s.layers
    return {
        "prompt-tuning": tokens * s.hidden,
        "prefix": 10 * s.layers * 2 * s.hidden,
        # all-linear LoRA: r * (in + out) per projection; 4 attention + 3 MLP per block
        "lora": s.layers * r * (8 * s.hidden + 3 * (s.hidden + s.intermediate)),
        "hybrid": s.layers * r * (8 * s.hidden + 3 * (s.hidden + s.intermediate))
        + tokens * s.hidden,
        "freeze": top * block,
        "head": s.hidden * 8,
        "full": s.parameters,
    }[method]


def training_memory(s: Shape, method: str, batch: int, length: int) -> dict[str, float]:
    """Bytes for weights, gradients, AdamW state and stored activations (fp32)."""
    n = trainable_parameters(s, method)
    tokens = batch * length
    # activations kept for backward, per token and layer: the block's inputs and outputs of
    # each linear, norms, and attention probabilities (eager attention stores them)
    per_layer = tokens * (16 * s.hidden + 4 * s.intermediate) + batch * s.heads * length**2
    through = {"head": 0, "freeze": 2}.get(method, s.layers)  # layers gradients pass through
    return {
        "runtime": RUNTIME_BYTES,
        "weights": 4 * s.parameters,
        "gradients": 4 * n,
        "optimizer": 8 * n,  # AdamW's two moments
        "activations": 4 * per_layer * through,
    }


def serving_memory(s: Shape, method: str, tasks: int) -> float:
    """Bytes to serve `tasks` tasks: one shared backbone plus per-task parts, or a copy each."""
    backbone = 4 * s.parameters
    if method == "full":
        return tasks * backbone
    return backbone + tasks * 4 * trainable_parameters(s, method)


def recommend(
    s: Shape,
    tasks: int,
    budget_gb: float,
    priority: str,
    batch: int = 8,
    length: int = 128,
    measured: dict[str, dict] | None = None,
) -> dict:
    """{"recommended", "runner_up", "reasons", "table"}; `measured` maps method -> record."""
    if priority not in PRIORITIES:
        raise TunelabError(f"--priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    rows = []
    for m in ACCURACY_PRIOR:
        train = sum(training_memory(s, m, batch, length).values())
        rec = (measured or {}).get(m)
        rows.append(
            {
                "method": m,
                "train_gb": train / GB,
                "serve_gb": serving_memory(s, m, tasks) / GB,
                "fits": train <= budget_gb * GB,
                "accuracy": headline(rec["metrics"])[1] if rec else None,
                "prior_rank": ACCURACY_PRIOR.index(m),
            }
        )
    fitting = [r for r in rows if r["fits"]] or sorted(rows, key=lambda r: r["train_gb"])[:1]

    def accuracy_key(r):  # measured accuracy first, the prior where nothing was measured
        return (-(r["accuracy"] if r["accuracy"] is not None else -1), r["prior_rank"])

    if priority == "accuracy":
        ranked = sorted(fitting, key=accuracy_key)
    elif priority == "cost":
        ranked = sorted(fitting, key=lambda r: (r["train_gb"], r["serve_gb"]))
    else:
        ranked = sorted(fitting, key=lambda r: (r["serve_gb"], accuracy_key(r)))
    best, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
    if (
        priority == "accuracy"
        and tasks > 1
        and best["method"] in ("full", "lora")
        and any(r["method"] == "hybrid" for r in fitting)
    ):
        # many tasks and high accuracy: one shared LoRA core, a soft prompt per task
        hybrid = next(r for r in fitting if r["method"] == "hybrid")
        best, runner = hybrid, best
    reasons = _reasons(best, runner, rows, tasks, budget_gb, priority, bool(measured))
    return {
        "recommended": best["method"],
        "runner_up": runner and runner["method"],
        "reasons": reasons,
        "table": rows,
    }


def _reasons(best, runner, rows, tasks, budget_gb, priority, measured) -> list[str]:
    out = [f"priority {priority}, {tasks} task(s), {budget_gb:g} GB for training"]
    out.append(
        f"{best['method']}: about {best['train_gb']:.1f} GB to train, "
        f"{best['serve_gb']:.2f} GB to serve {tasks} task(s)"
        + (f", measured accuracy {best['accuracy']:.4f}" if best["accuracy"] is not None else "")
    )
    if best["method"] == "hybrid":
        out.append(
            "many tasks and accuracy both matter: one LoRA core shared by every task, "
            "a soft prompt per task (tasks switch without reloading weights)"
        )
    too_big = [r["method"] for r in rows if not r["fits"]]
    if too_big:
        out.append(f"over the budget to train: {', '.join(too_big)}")
    if runner:
        out.append(
            f"runner-up {runner['method']}: about {runner['train_gb']:.1f} GB to train, "
            f"{runner['serve_gb']:.2f} GB to serve"
        )
    if not measured:
        out.append(
            "accuracy order is the usual one for small models; pass --results from "
            "`tunelab compare` to rank by what your data measured"
        )
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="as for `tunelab train` (its config is read)")
    p.add_argument("--tasks", type=int, default=1, help="how many tasks will be served")
    p.add_argument("--memory-gb", type=float, required=True, help="memory for training, GB")
    p.add_argument("--priority", default="accuracy", choices=PRIORITIES)
    p.add_argument(
        "--results",
        type=Path,
        default=None,
        help="results.json from `tunelab compare`: rank by measured accuracy",
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training row")


def run(args: argparse.Namespace) -> None:
    """Recommend a method (and a runner-up, with reasons) for your resources and tasks."""
    from transformers import AutoConfig

    from tunelab.models.load import resolve

    if args.tasks < 1:
        raise TunelabError(f"--tasks must be >= 1, got {args.tasks}")
    _, where = resolve(args.model)
    shape = Shape.from_config(AutoConfig.from_pretrained(where))
    measured = None
    if args.results:
        try:
            results = json.loads(args.results.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TunelabError(f"{args.results}: cannot read results: {e}") from None
        measured = {r["method"]: r for r in results.get("records", []) if r["status"] == "ok"}
    advice = recommend(
        shape, args.tasks, args.memory_gb, args.priority, args.batch_size, args.seq_len, measured
    )
    print(f"model: {shape.parameters / 1e6:.0f}M parameters, {shape.layers} layers")
    print(f"recommended: {advice['recommended']}")
    print(f"runner-up: {advice['runner_up']}")
    for reason in advice["reasons"]:
        print(f"  - {reason}")
    print(f"\n{'method':<14}{'train GB':>10}{'serve GB':>10}  fits")
    for r in advice["table"]:
        print(
            f"{r['method']:<14}{r['train_gb']:>10.2f}{r['serve_gb']:>10.2f}  "
            f"{'yes' if r['fits'] else 'no'}"
        )
