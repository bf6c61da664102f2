"""`tunelab advise`: which method to pick for a model, a number of tasks, a memory budget and a
priority, from estimated (or, with results.json, measured) cost and accuracy."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tunelab.compare.evidence import certainty, prior_gaps
from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import headline

GB = 2**30
# Python, torch and transformers themselves: 0.37 GB peak RSS on the AMD EPYC dev machine
# (benchmarks/RESULTS.md, "`tunelab advise`: memory estimate against measured peaks")
RUNTIME_BYTES = 0.45 * GB
PRIORITIES = ("accuracy", "cost", "flexibility")
METHODS = ("prompt-tuning", "prefix", "lora", "freeze", "head", "full", "hybrid")


@dataclass
class Shape:
    """What memory depends on, read from the model's config."""

    parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    kv_dim: int = 0  # key (and value) width per token: kv heads x head size; 0: hidden

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
        return cls(params, hidden, inter, layers, c.num_attention_heads, vocab, kv * head_dim)


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
    # `length` is a row's own tokens: a soft prompt runs once per batch (the shared head)
    tokens = batch * length + (20 if method in ("prompt-tuning", "hybrid") else 0)
    # activations kept for backward, per token and layer: the inputs of the two norms, of the
    # attention projections and of o_proj, queries, keys and values, and the MLP's gate and up
    # outputs and down input (lm/lean.py keeps no third tensor), plus attention
    # probabilities where eager attention stores them
    kv = s.kv_dim or s.hidden
    per_token = 6 * s.hidden + 2 * kv + 3 * s.intermediate
    per_layer = tokens * per_token + batch * s.heads * length**2
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


def _measured_score(rec: dict) -> dict:
    """{"accuracy", "low", "high", "verdict"} from a report row (intervals and paired tests) or
    a bare results.json record."""
    if "metrics" in rec and "metric" not in rec:
        return {"accuracy": headline(rec["metrics"])[1], "low": None, "high": None,
                "verdict": None}  # fmt: skip
    ci = rec.get("interval")
    return {
        "accuracy": rec.get("metric"),
        "low": ci.low if ci else None,
        "high": ci.high if ci else None,
        "verdict": rec.get("verdict"),
    }


def recommend(
    s: Shape,
    tasks: int,
    budget_gb: float,
    priority: str,
    batch: int = 8,
    length: int = 128,
    measured: dict[str, dict] | None = None,
) -> dict:
    """{"recommended", "runner_up", "reasons", "table"}: `table` in ranked order, each row with
    its "note" where it stands above a method that measured better (the reason: cost, number
    of tasks, memory). `measured` maps method -> a report row of `tunelab compare` (or a bare
    record); without it accuracy comes from the shipped evidence (compare/evidence.py)."""
    if priority not in PRIORITIES:
        raise TunelabError(f"--priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
    gaps = prior_gaps()
    rows = []
    for m in METHODS:
        train = sum(training_memory(s, m, batch, length).values())
        score = _measured_score(measured[m]) if measured and m in measured else None
        if measured and score is None:
            continue  # not in the user's comparison: nothing to rank it by
        rows.append(
            {
                "method": m,
                "train_gb": train / GB,
                "serve_gb": serving_memory(s, m, tasks) / GB,
                "fits": train <= budget_gb * GB,
                "accuracy": score["accuracy"] if score else None,
                "interval": (score["low"], score["high"])
                if score and score["low"] is not None
                else None,
                "verdict": score["verdict"] if score else None,
                "prior_gap": None if measured else gaps.get(m),
                "note": None,
            }
        )
    if not rows:
        raise TunelabError("--results: no trained method finished in that comparison")
    fitting = [r for r in rows if r["fits"]] or sorted(rows, key=lambda r: r["train_gb"])[:1]

    def accuracy_key(r):  # higher is better; unmeasured last
        value = r["accuracy"] if measured else r["prior_gap"]
        return -value if value is not None else float("inf")

    if priority == "accuracy":
        ranked = sorted(fitting, key=accuracy_key)
        top = [r for r in ranked if r["verdict"] in ("best", "tied")]
        if tasks > 1 and len(top) > 1:  # tied at the top: the one that serves N tasks cheapest
            pick = min(top, key=lambda r: (r["serve_gb"], accuracy_key(r)))
            ranked.remove(pick)
            ranked.insert(0, pick)
    elif priority == "cost":
        ranked = sorted(fitting, key=lambda r: (r["train_gb"], r["serve_gb"]))
    else:
        ranked = sorted(fitting, key=lambda r: (r["serve_gb"], accuracy_key(r)))
    _explain_inversions(ranked, priority, tasks, bool(measured))
    best, runner = ranked[0], ranked[1] if len(ranked) > 1 else None
    reasons = _reasons(best, runner, rows, tasks, budget_gb, priority, bool(measured))
    table = ranked + [r for r in rows if r not in ranked]
    return {
        "recommended": best["method"],
        "runner_up": runner and runner["method"],
        "reasons": reasons,
        "table": table,
    }


def _explain_inversions(ranked: list[dict], priority: str, tasks: int, measured: bool) -> None:
    """Give every method ranked above one that measured better the reason it stands there."""
    for i, r in enumerate(ranked):
        better = [o for o in ranked[i + 1 :] if _score(o, measured) > _score(r, measured) + 1e-12]
        if not better:
            continue
        o = max(better, key=lambda o: _score(o, measured))
        gap = _score(o, measured) - _score(r, measured)
        if priority == "accuracy":
            why = (
                f"tied with {o['method']} within the 95% interval, and serves {tasks} tasks in "
                f"{r['serve_gb']:.2f} GB against {o['serve_gb']:.2f} GB"
            )
        elif priority == "cost":
            why = f"cheaper to train: {r['train_gb']:.1f} GB against {o['train_gb']:.1f} GB"
        else:
            why = (
                f"cheaper to serve {tasks} task(s): {r['serve_gb']:.2f} GB against "
                f"{o['serve_gb']:.2f} GB"
            )
        what = "measured" if measured else "measured, on average over the shipped tasks,"
        r["note"] = f"above {o['method']} (which {what} {gap:.3f} higher): {why}"


def _score(r: dict, measured: bool) -> float:
    value = r["accuracy"] if measured else r["prior_gap"]
    return value if value is not None else float("-inf")


def _reasons(best, runner, rows, tasks, budget_gb, priority, measured) -> list[str]:
    out = [f"priority {priority}, {tasks} task(s), {budget_gb:g} GB for training"]
    score = ""
    if best["accuracy"] is not None:
        score = f", measured accuracy {best['accuracy']:.4f}"
        if best["interval"]:
            score += f" (95% interval {best['interval'][0]:.4f}-{best['interval'][1]:.4f})"
    elif best["prior_gap"] is not None:
        gap = -best["prior_gap"]
        score = (
            f", on average {gap:.3f} below the best method of the shipped tasks"
            if gap > 0
            else ", the most accurate on every shipped task that measured it"
        )
    out.append(
        f"{best['method']}: about {best['train_gb']:.1f} GB to train, "
        f"{best['serve_gb']:.2f} GB to serve {tasks} task(s){score}"
    )
    if best["note"]:
        out.append(f"{best['method']} is {best['note']}")
    too_big = [r["method"] for r in rows if not r["fits"]]
    if too_big:
        out.append(f"over the budget to train: {', '.join(too_big)}")
    if runner:
        out.append(
            f"runner-up {runner['method']}: about {runner['train_gb']:.1f} GB to train, "
            f"{runner['serve_gb']:.2f} GB to serve"
        )
    if not measured:
        out.append(certainty())
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
        help="a `tunelab compare` folder or its results.json: rank by the accuracy measured "
        "there (means, 95%% intervals and ties when it kept per-row scores)",
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
    measured = _read_measured(args.results) if args.results else None
    advice = recommend(
        shape, args.tasks, args.memory_gb, args.priority, args.batch_size, args.seq_len, measured
    )
    print(f"model: {shape.parameters / 1e6:.0f}M parameters, {shape.layers} layers")
    print(f"recommended: {advice['recommended']}")
    print(f"runner-up: {advice['runner_up']}")
    for reason in advice["reasons"]:
        print(f"  - {reason}")
    label = "accuracy" if measured else "vs best"
    print(f"\n{'method':<14}{label:>9}{'train GB':>10}{'serve GB':>10}  fits  why here")
    for r in advice["table"]:
        value = r["accuracy"] if measured else r["prior_gap"]
        shown = "—" if value is None else f"{value:+.3f}" if not measured else f"{value:.4f}"
        print(
            f"{r['method']:<14}{shown:>9}{r['train_gb']:>10.2f}{r['serve_gb']:>10.2f}  "
            f"{'yes ' if r['fits'] else 'no  '}  {r['note'] or ''}"
        )


def _read_measured(path: Path) -> dict[str, dict]:
    """Per trained method, its row of the comparison's report (tuned runs where it searched)."""
    from tunelab.compare.summary import summarise

    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{file}: cannot read results: {e}") from None
    return {r["method"]: r for r in summarise(results) if r["seeds"] and r["method"] in METHODS}
