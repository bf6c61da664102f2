"""Which method to pick (`tunelab advise`, `tunelab.advise`) for a model, a number of tasks,
a memory budget and a priority, from estimated (or, with results.json, measured) cost and
accuracy."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tunelab import methods
from tunelab.compare.evidence import certainty, prior_gaps
from tunelab.errors import TunelabError
from tunelab.evaluate.metrics import headline

GB = 2**30
# Python, torch and transformers themselves: 0.37 GB peak RSS on the AMD EPYC dev machine
# (benchmarks/RESULTS.md, "`tunelab advise`: memory estimate against measured peaks")
RUNTIME_BYTES = 0.45 * GB
PRIORITIES = ("accuracy", "cost", "flexibility")


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


def trainable_parameters(s: Shape, method: str) -> int:
    """What `method` trains on this model with its default config (its record says)."""
    return methods.get(method).default_size(s)


def training_memory(s: Shape, method: str, batch: int, length: int) -> dict[str, float]:
    """Bytes for weights, gradients, AdamW state and stored activations (fp32)."""
    record = methods.get(method)
    cfg = record.config()  # the method's defaults
    n = record.trainable_size(s, cfg)
    # `length` is a row's own tokens: a soft prompt runs once per batch (the shared head)
    tokens = batch * length + record.prompt_tokens(cfg)
    # activations kept for backward, per token and layer: the inputs of the two norms, of the
    # attention projections and of o_proj, queries, keys and values, and the MLP's gate and up
    # outputs and down input (lm/lean.py keeps no third tensor), plus attention
    # probabilities where eager attention stores them
    kv = s.kv_dim or s.hidden
    per_token = 6 * s.hidden + 2 * kv + 3 * s.intermediate
    per_layer = tokens * per_token + batch * s.heads * length**2
    through = record.backprop_layers(s, cfg)  # layers gradients pass through
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
    if methods.get(method).every_weight:  # each task is a whole model: nothing is shared
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
    for m in methods.METHODS:
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


@dataclass
class Advice:
    """A recommendation: the method, a runner-up, the reasons, and every method's row in
    ranked order (train_gb, serve_gb, fits, accuracy or prior_gap, note)."""

    recommended: str
    runner_up: str | None
    reasons: list[str]
    table: list[dict]
    shape: Shape  # the model's, read from its config
    measured: bool  # ranked by a comparison's measured accuracy (else the shipped evidence)


def advise(
    model: str | None = None,
    *,
    memory_gb: float,
    tasks: int = 1,
    priority: str = "accuracy",
    results: Path | None = None,
    batch_size: int = 8,
    seq_len: int = 128,
) -> Advice:
    """Recommend a method for a model (its config is read), a number of tasks to serve, a
    memory budget for training and a priority; with `results` (a compare folder or its
    results.json), by the accuracy measured there."""
    from transformers import AutoConfig

    from tunelab.models.load import resolve

    if tasks < 1:
        raise TunelabError(f"--tasks must be >= 1, got {tasks}")
    _, where = resolve(model)
    shape = Shape.from_config(AutoConfig.from_pretrained(where))
    measured = _read_measured(Path(results)) if results else None
    found = recommend(shape, tasks, memory_gb, priority, batch_size, seq_len, measured)
    return Advice(**found, shape=shape, measured=bool(measured))


def _read_measured(path: Path) -> dict[str, dict]:
    """Per trained method, its row of the comparison's report (tuned runs where it searched)."""
    from tunelab.compare.summary import summarise

    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise TunelabError(f"{file}: cannot read results: {e}") from None
    rows = summarise(results)
    return {r["method"]: r for r in rows if r["seeds"] and r["method"] in methods.METHODS}
