"""`tunelab serve` under load against the PEFT way of serving the same 8 soft prompts.

    python benchmarks/serve_load.py --requests 480 --clients 32

Both sides are real HTTP servers on loopback (uvicorn, the same FastAPI app and the same
gathering window), fed the same requests (one input each, a random task of 8 and a random row
of the built-in demo task's test split) by the same concurrent clients:

- tunelab: rows of all 8 tasks in one forward pass, each with its own soft prompt, the prompt
  and the template's fixed leading text cached per task (tunelab/serve/forward.py);
- PEFT: one PeftModel holding the 8 prompt-tuning adapters (loaded from the same artifact
  directories), one active adapter at a time: each gathered batch is split by task and every
  group runs as its own forward pass after `set_adapter` (right padding, which PEFT's
  prepended prompt needs for exact positions).

It prints one JSON object: requests per second, p50/p99 latency and errors per side, the
ratio, whether both sides gave every request the same label, their accuracy, and task-switch
times (tunelab: extra cost of a batch of 8 different tasks over one of a single task, per
row; hot-loading a soft prompt; PEFT: `set_adapter`). Untrained prompts (vocabulary-sampled
initialisations, 8 seeds) are enough: both sides serve the same artifacts.

    python benchmarks/serve_load.py --generation-mix --requests 96 --clients 16

`--generation-mix` measures generation instead: one tunelab server batching continuously and
one batching statically (`--static-batching`, each gathered batch decodes to its end), fed the
same mix of short (`--short-tokens`, 4) and long (`--long-tokens`, 64) /v1/generate requests
over 8 prompt-tuned rewriting tasks built on the demo corpus (no stop strings, so a long
request runs to its limit unless the model ends it). It prints p50/p99 latency of short and
long requests for each side and whether both sides returned the same text for every request.
`flop_utilisation`: the model FLOPs of the requests served (tunelab/lm/flops.py: each input's
own tokens after its task's cached head, which is not recomputed, and the label words' logits;
the same count for both sides, so the head cache shows as a gain) per second of serving, and
their share of the machine's matmul peak (`--peak-json` from benchmarks/machine_peak.py, else
a quick peak measured here first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = 8


def make_artifacts(root: Path) -> list[tuple[str, Path]]:
    from tunelab import methods
    from tunelab.artifact import save_artifact
    from tunelab.models import load_backbone
    from tunelab.tasks import load_task
    from tunelab.tasks.verbalizer import Verbalizer

    backbone = load_backbone(None)
    task = load_task("demo")
    verbalizer = Verbalizer.build(task, backbone.tokenizer)
    out = []
    for i in range(TASKS):
        cfg = methods.CONFIGS["prompt-tuning"](num_virtual_tokens=20, init="vocab")
        tuned = methods.get("prompt-tuning").build(backbone, cfg, verbalizer, seed=i)
        save_artifact(root / f"t{i}", "prompt-tuning", cfg, tuned, task, backbone)
        out.append((f"t{i}", root / f"t{i}"))
    return out


def peft_compute(peft_model, pad_id: int):
    """The PEFT way: per task group, `set_adapter`, then one forward pass of that group."""
    from tunelab.lm.scoring import label_logprobs_at
    from tunelab.tasks.batch import _pad

    scorer = SimpleNamespace(head=None, model=peft_model.get_base_model())

    @torch.no_grad()
    def compute(jobs, pad):
        out = [None] * len(jobs)
        groups: dict[str, list[int]] = {}
        for j, (entry, _) in enumerate(jobs):
            groups.setdefault(entry.name, []).append(j)
        for name, idx in groups.items():
            peft_model.set_adapter(name)
            rows = [ex.ids for j in idx for ex in jobs[j][1]]
            # right padding: PEFT prepends the prompt and numbers positions from 0 (no mask)
            ids, mask = _pad(rows, pad_id, "right")
            h = peft_model(
                input_ids=ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1
            ).hidden_states[-1]  # (B, n + T, D), after the final norm
            n = h.size(1) - ids.size(1)
            last = n + mask.sum(1) - 1
            entry = jobs[idx[0]][0]
            logp = label_logprobs_at(scorer, h, last, {}, entry.prep.verbalizer).float()
            start = 0
            for j in idx:
                k = len(jobs[j][1])
                out[j] = logp[start : start + k]
                start += k
        return out

    return compute


class Server:
    def __init__(self, app, port: int):
        import uvicorn

        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


async def drive(url: str, path: str, requests: list[tuple], clients: int, answer) -> dict:
    """POST (index, kind, body) requests to `path` from `clients` concurrent clients (after one
    warm-up request); latencies by kind, `answer(reply JSON)` by index, errors, wall time."""
    import httpx

    latencies: dict[str, list[float]] = {}
    answers, errors = {}, 0
    queue = list(requests)

    async def client(http):
        nonlocal errors
        while queue:
            i, kind, body = queue.pop()
            start = time.perf_counter()
            try:
                r = await http.post(path, json=body)
                r.raise_for_status()
                answers[i] = answer(r.json())
            except Exception:
                errors += 1
            latencies.setdefault(kind, []).append(time.perf_counter() - start)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await http.post(path, json=requests[0][2])  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    return {"latencies": latencies, "answers": answers, "errors": errors, "seconds": wall}


def label_of(reply: dict) -> str:
    return reply["results"][0]["label"]


def output_of(reply: dict) -> str:
    return reply["outputs"][0]


def summarise(parts: list[dict], n: int) -> dict:
    latencies = [x for p in parts for xs in p["latencies"].values() for x in xs]
    wall = sum(p["seconds"] for p in parts)
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": n,
        "seconds": round(wall, 2),
        "requests_per_second": round(n / wall, 2),
        "p50_ms": round(q[49] * 1000, 1),
        "p99_ms": round(q[98] * 1000, 1),
        "errors": sum(p["errors"] for p in parts),
        "labels": {k: v for p in parts for k, v in p["answers"].items()},
    }


def accuracy(labels: dict[int, str], gold: list[str]) -> float:
    return round(sum(labels.get(i) == g for i, g in enumerate(gold)) / len(gold), 4)


def switch_times(store, names: list[str], text: str, repeats: int = 3) -> dict:
    """What switching task costs a row: copying its task's cached head into the batch's cache
    (`stack_heads`, the only per-task work in a mixed batch), and end to end, a batch of 8
    rows of 8 tasks against 8 rows of one task."""
    from tunelab.lm.head_cache import stack_heads
    from tunelab.serve.batcher import encode_inputs
    from tunelab.serve.forward import classify_mixed, head_of

    heads = [head_of(store.get(n)) for n in names]
    like = heads[0].keys
    copies = []
    for _ in range(200):
        start = time.perf_counter()
        stack_heads(heads, [h.slots for h in heads], like)
        copies.append((time.perf_counter() - start) / len(heads))
    pad = store.backbone.tokenizer.pad_token_id
    same = [(store.get(names[0]), encode_inputs(store.get(names[0]), [text])) for _ in names]
    mixed = [(store.get(n), encode_inputs(store.get(n), [text])) for n in names]
    timings = {"same": [], "mixed": []}
    for _ in range(repeats):
        for kind, jobs in (("same", same), ("mixed", mixed)):
            start = time.perf_counter()
            classify_mixed(jobs, pad)
            timings[kind].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in timings.items()}
    return {
        "head_copy_per_row_ms": round(statistics.median(copies) * 1000, 4),
        "head_copy_per_row_ms_min": round(min(copies) * 1000, 4),
        "batch_of_8_one_task_ms": round(med["same"] * 1000, 1),
        "batch_of_8_tasks_ms": round(med["mixed"] * 1000, 1),
    }


REWRITE_TEMPLATE = "Tweet: {text}\nThe same tweet in formal English:"


def rewrite_task():
    """A generation task on the demo corpus: each tweet, rewritten (the target is the tweet
    itself; untrained prompts do not learn it, the load is what matters)."""
    from tunelab.tasks import load_task
    from tunelab.tasks.spec import TaskSpec

    d = load_task("demo").to_dict()
    d.update(
        name="demo-rewrite",
        label_field=None,
        verbalizer={},
        few_shot=None,
        template=REWRITE_TEMPLATE,
        target=" {text}",
        generation={"max_new_tokens": 64, "stop": []},
    )
    return TaskSpec.from_dict(d)


def _quantile_ms(xs: list[float], q: int) -> float | None:
    if not xs:
        return None
    if len(xs) == 1:
        return round(xs[0] * 1000, 1)
    return round(statistics.quantiles(xs, n=100, method="inclusive")[q - 1] * 1000, 1)


def generation_mix(args) -> dict:
    """Short and long generation requests, static against continuous batching."""
    from tunelab import methods
    from tunelab.artifact import save_artifact
    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.forward import head_of
    from tunelab.serve.store import AdapterStore
    from tunelab.tasks.data import load_splits

    torch.set_grad_enabled(False)
    task = rewrite_task()
    backbone = load_backbone(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-gen-"))
    store = AdapterStore(backbone, torch.device("cpu"))
    for i in range(TASKS):
        cfg = methods.CONFIGS["prompt-tuning"](num_virtual_tokens=20, init="vocab")
        tuned = methods.get("prompt-tuning").build(backbone, cfg, None, seed=i)
        save_artifact(tmp / f"g{i}", "prompt-tuning", cfg, tuned, task, backbone)
        del tuned
        head_of(store.load(f"g{i}", tmp / f"g{i}"))

    rows = load_splits(task)["test"]
    rng = random.Random(0)
    requests = []
    for i in range(args.requests):
        kind = "long" if rng.random() < args.long_share else "short"
        body = {
            "task": f"g{rng.randrange(TASKS)}",
            "inputs": [rng.choice(rows).fields["text"]],
            "max_tokens": args.long_tokens if kind == "long" else args.short_tokens,
        }
        requests.append((i, kind, body))
    rng.shuffle(requests)

    common = {"window_ms": args.window_ms, "max_batch": args.max_batch}
    apps = {
        "continuous": create_app(store, ServeConfig(**common)),
        "static": create_app(store, ServeConfig(**common, static_batching=True)),
    }
    parts: dict[str, list[dict]] = {side: [] for side in apps}
    step = -(-len(requests) // args.rounds)
    with Server(apps["continuous"], args.port) as s1, Server(apps["static"], args.port + 1) as s2:
        servers = (("continuous", s1), ("static", s2))
        for r in range(args.rounds):  # alternating rounds, as for classification
            chunk = requests[r * step : (r + 1) * step]
            for side, server in servers[:: 1 if r % 2 == 0 else -1]:
                parts[side].append(
                    asyncio.run(drive(server.url, "/v1/generate", chunk, args.clients, output_of))
                )
    summary = {
        "mode": "generation-mix",
        "machine_threads": torch.get_num_threads(),
        "tasks": TASKS,
        "requests": len(requests),
        "short_requests": sum(k == "short" for _, k, _ in requests),
        "short_tokens": args.short_tokens,
        "long_tokens": args.long_tokens,
        "clients": args.clients,
        "window_ms": args.window_ms,
        "max_batch": args.max_batch,
    }
    outputs = {}
    for side, ps in parts.items():
        wall = sum(p["seconds"] for p in ps)
        lat = {k: [x for p in ps for x in p["latencies"].get(k, [])] for k in ("short", "long")}
        outputs[side] = {i: o for p in ps for i, o in p["answers"].items()}
        summary[side] = {
            "seconds": round(wall, 2),
            "requests_per_second": round(len(requests) / wall, 2),
            **{
                f"{k}_p{q}_ms": _quantile_ms(lat[k], q) for k in ("short", "long") for q in (50, 99)
            },
            "errors": sum(p["errors"] for p in ps),
        }
    a, b = outputs["continuous"], outputs["static"]
    summary["same_outputs"] = sum(i in a and a.get(i) == b.get(i) for i, _, _ in requests)
    summary["identical_outputs"] = summary["same_outputs"] == len(requests)
    c, s = summary["continuous"]["short_p50_ms"], summary["static"]["short_p50_ms"]
    summary["short_p50_ratio"] = round(c / s, 3) if c and s else None
    summary["flop_utilisation"] = generation_utilisation(args, store, requests, parts, outputs)
    return summary


def generation_utilisation(args, store, requests, parts, outputs) -> dict:
    """Per side: model FLOPs of the generations it returned (each prompt after its task's
    cached head, then one decode step per token; the tokens counted by encoding the returned
    text again, EOS not counted) per second of its rounds, and their share of the peak."""
    from machine_peak import peak_for, utilisation

    from tunelab.serve.batcher import encode_inputs

    peak = peak_for(args.peak_json, bf16=False, device="cpu")
    out = {"peak_gflops": peak["gflops"], "peak_source": peak["source"]}
    for side, ps in parts.items():
        done = 0.0
        for i, _, body in requests:
            if i not in outputs[side]:
                continue
            entry = store.get(body["task"])
            example = encode_inputs(entry, body["inputs"])[0]
            n = len(entry.backbone.tokenizer(outputs[side][i], add_special_tokens=False).input_ids)
            done += generate_flops(entry, example, max(n, 1))
        u = utilisation(done, sum(p["seconds"] for p in ps), peak)
        out[side] = {k: u[k] for k in ("model_gflops_per_second", "mfu")}
    return out


def classify_flops(entry, examples) -> float:
    """Model FLOPs of classifying these examples as the server must: each row's own tokens after
    the part of its task's head it reuses, then the logits its label scores read (the label
    words' rows of the LM head, the whole vocabulary for multi-token words, or the head)."""
    from tunelab.lm.flops import Shape, forward_flops
    from tunelab.lm.head_cache import label_rows
    from tunelab.serve.forward import head_of

    shape = Shape.of(entry.tuned.model.config)
    head = head_of(entry)
    verbalizer = entry.prep.verbalizer
    total = 0.0
    for ex in examples:
        used = head.slots_for(ex.ids)
        m, used = (0, 0) if used is None else (head.skipped_tokens(used), used)
        for ids, word in label_rows(entry.tuned, verbalizer, ex):
            if entry.tuned.head is not None:
                rows, cols = 1, len(verbalizer.labels)
            elif word is None:
                rows, cols = 1, len(verbalizer.words)
            else:
                rows, cols = len(word), None  # the whole vocabulary at each target position
            total += forward_flops(
                shape, [len(ids) - m], used, logit_rows=rows, logit_cols=cols
            ).total
    return total


def generate_flops(entry, example, new_tokens: int) -> float:
    """Model FLOPs of one greedy generation of `new_tokens` tokens: the prompt's own tokens
    after its task's cached head, then a decode step per token fed back."""
    from tunelab.lm.flops import Shape, generation_flops
    from tunelab.serve.forward import head_of

    head = head_of(entry)
    used = head.slots_for(example.ids)
    m, used = (0, 0) if used is None else (head.skipped_tokens(used), used)
    shape = Shape.of(entry.tuned.model.config)
    return generation_flops(shape, len(example.ids) - m, new_tokens, used).total


def request_flops(store, requests: list[dict]) -> list[float]:
    """Model FLOPs of each /v1/classify request body."""
    from tunelab.serve.batcher import encode_inputs

    out = []
    for body in requests:
        entry = store.get(body["task"])
        out.append(classify_flops(entry, encode_inputs(entry, body["inputs"])))
    return out


def flop_utilisation(parts: dict[str, list[dict]], flops: list[float], peak: dict) -> dict:
    """Per side: the model FLOPs of the requests it answered per second of its rounds, and
    their share of the peak."""
    from machine_peak import utilisation

    out = {"peak_gflops": peak["gflops"], "peak_source": peak["source"]}
    out["model_gflop_per_request"] = round(statistics.mean(flops) / 1e9, 4)
    for side, ps in parts.items():
        served = sum(flops[i] for p in ps for i in p["answers"])
        u = utilisation(served, sum(p["seconds"] for p in ps), peak)
        out[side] = {k: u[k] for k in ("model_gflops_per_second", "mfu")}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=480)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--window-ms", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds per side")
    p.add_argument(
        "--generation-mix",
        action="store_true",
        help="short and long generation requests: continuous against static batching",
    )
    p.add_argument("--short-tokens", type=int, default=4, help="max_tokens of a short request")
    p.add_argument("--long-tokens", type=int, default=64, help="max_tokens of a long request")
    p.add_argument("--long-share", type=float, default=0.25, help="share of long requests")
    p.add_argument("--model", default=None, help="backbone (default: the built-in model)")
    p.add_argument(
        "--peak-json",
        type=Path,
        default=None,
        help="benchmarks/machine_peak.py's JSON (default: measure a quick peak first)",
    )
    args = p.parse_args()
    if args.generation_mix:
        print(json.dumps(generation_mix(args), indent=2))
        return
    from machine_peak import peak_for

    peak = peak_for(args.peak_json, bf16=False, device="cpu")  # the store serves on the CPU
    from peft import PeftModel

    from tunelab.models import load_backbone
    from tunelab.serve.app import ServeConfig, create_app
    from tunelab.serve.forward import head_of
    from tunelab.serve.store import AdapterStore
    from tunelab.tasks import load_task
    from tunelab.tasks.data import load_splits

    torch.set_grad_enabled(False)
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    artifacts = make_artifacts(tmp)
    store = AdapterStore(load_backbone(None), torch.device("cpu"))
    load_ms, head_ms = [], []
    for name, path in artifacts:
        start = time.perf_counter()
        entry = store.load(name, path)
        load_ms.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        head_of(entry)
        head_ms.append((time.perf_counter() - start) * 1000)

    peft_base = load_backbone(None).model.eval()
    peft_model = PeftModel.from_pretrained(peft_base, str(artifacts[0][1]), adapter_name="t0")
    for name, path in artifacts[1:]:
        peft_model.load_adapter(str(path), adapter_name=name)
    peft_model.eval()
    switch_us = []
    for i in range(200):
        start = time.perf_counter()
        peft_model.set_adapter(artifacts[i % TASKS][0])
        switch_us.append((time.perf_counter() - start) * 1e6)

    task = load_task("demo")
    rows = load_splits(task)["test"]
    rng = random.Random(0)
    picked = [rng.choice(rows) for _ in range(args.requests)]
    requests = [{"task": f"t{rng.randrange(TASKS)}", "inputs": [r.fields["text"]]} for r in picked]
    gold = [str(r.fields[task.label_field]) for r in picked]

    cfg = ServeConfig(window_ms=args.window_ms, max_batch=args.max_batch)
    pad = store.backbone.tokenizer.pad_token_id
    apps = {"tunelab": create_app(store, cfg), "peft": create_app(store, cfg)}
    apps["peft"].state.batcher.compute = peft_compute(peft_model, pad)
    parts: dict[str, list[dict]] = {"tunelab": [], "peft": []}
    indexed = [(i, "classify", body) for i, body in enumerate(requests)]
    step = -(-len(indexed) // args.rounds)
    with Server(apps["tunelab"], args.port) as s1, Server(apps["peft"], args.port + 1) as s2:
        # alternating rounds: a change in the machine's other load hits both sides alike
        for r in range(args.rounds):
            chunk = indexed[r * step : (r + 1) * step]
            for side, server in (("tunelab", s1), ("peft", s2))[:: 1 if r % 2 == 0 else -1]:
                parts[side].append(
                    asyncio.run(drive(server.url, "/v1/classify", chunk, args.clients, label_of))
                )
    results = {side: summarise(p, len(requests)) for side, p in parts.items()}
    a, b = results["tunelab"]["labels"], results["peft"]["labels"]
    a, b = [a.get(i) for i in range(len(requests))], [b.get(i) for i in range(len(requests))]
    summary = {
        "machine_threads": torch.get_num_threads(),
        "tasks": TASKS,
        "clients": args.clients,
        "window_ms": args.window_ms,
        "max_batch": args.max_batch,
        **{
            side: {k: v for k, v in r.items() if k != "labels"}
            | {"accuracy": accuracy(r["labels"], gold)}
            for side, r in results.items()
        },
        "rps_ratio": round(
            results["tunelab"]["requests_per_second"] / results["peft"]["requests_per_second"], 2
        ),
        "same_labels": sum(x == y and x is not None for x, y in zip(a, b)),
        "tunelab_switch": switch_times(store, [n for n, _ in artifacts], picked[0].fields["text"]),
        "tunelab_hot_load_ms_median": round(statistics.median(load_ms), 2),
        "tunelab_head_cache_build_ms_median": round(statistics.median(head_ms), 2),
        "peft_set_adapter_us_median": round(statistics.median(switch_us), 1),
        "flop_utilisation": flop_utilisation(parts, request_flops(store, requests), peak),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
