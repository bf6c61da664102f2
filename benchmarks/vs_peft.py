"""tunelab against Hugging Face PEFT + `Trainer`, side by side on SST-2 (issue 7).

    .venv/bin/python benchmarks/vs_peft.py                      # ~14 minutes on 2 cores
    .venv/bin/python benchmarks/vs_peft.py --steps 4 --train-rows 32 --eval-rows 16   # a smoke run

Both sides get the same default model, train rows, template ("{text} It was"), label words
(" terrible" / " great"), batch size, prompt length, LoRA rank, learning rate, warmup, steps and
seed. Each run is its own child process, tunelab and PEFT alternating, so that peak memory is
the run's own; the ratios are tunelab / PEFT (memory: lower is better).

The PEFT side is written the way that library's documentation writes it: `get_peft_model`, a
causal-LM loss on the label word (every other position masked with -100) computed by the model
from full logits, `Trainer`; evaluation takes the full logits and reads the last position.

FLOP utilisation (`flops` in each run, `--peak-json` from benchmarks/machine_peak.py, else a
quick peak measured first): the model FLOPs one training step of the method must do at this
batch size and these rows' lengths (tunelab/lm/flops.py: the backward through the frozen
backbone for prompt tuning, with dW of the adapters for LoRA; the shared head of BOS and soft
prompt once per batch, as tunelab trains; the label words' logits), counted once from
tunelab's encoding of the rows and divided by each side's own training time, so the ratio of
the two sides' utilisation is their speed ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
TEMPLATE = "{text} It was"
WORDS = {"negative": " terrible", "positive": " great"}
INIT_TEXT = "Is this movie review great or terrible?"


# ---------------------------------------------------------------------------------- the parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", default="prompt-tuning,lora")
    p.add_argument("--train-rows", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=872, help="rows of SST-2 dev (872 = all)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--prompt-lr", type=float, default=3e-2)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast on both sides (default: where it runs in hardware: CUDA, or a "
        "CPU with avx512_bf16 or AMX; emulated it is slower than float32)",
    )
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--peak-json",
        type=Path,
        default=None,
        help="benchmarks/machine_peak.py's JSON (default: measure a quick peak first)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "vs-peft" / "results.json")
    p.add_argument("--child", nargs=2, metavar=("SIDE", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bf16 is None:
        import torch

        from tunelab.device import native_bf16

        args.bf16 = native_bf16(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if args.child:
        side, method = args.child
        run = run_tunelab if side == "tunelab" else run_peft
        print("RESULT " + json.dumps(run(args, method)))
        return
    if not SST2.is_dir():
        sys.exit(f"{SST2}: SST-2 is absent (the benchmark reads ../shared/data)")

    from machine_peak import peak_for

    peak = peak_for(args.peak_json, args.bf16)  # on the idle machine, before any run
    runs = []
    for method in args.methods.split(","):
        for side in ("tunelab", "peft"):
            print(f"== {method}: {side}", flush=True)
            runs.append(child(args, side, method))
    add_utilisation(runs, peak)
    print_table(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "out")}
    report = {"command": " ".join(sys.argv), "settings": settings, "runs": runs}
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # paths as text
    print(f"results: {args.out}")


def child(args, side: str, method: str) -> dict:
    """One run in its own process; its peak resident memory comes from the kernel (wait4)."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", side, method]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        sys.exit(f"{side} {method} failed:\n{out[-3000:]}")
    result = json.loads(next(x for x in out.splitlines() if x.startswith("RESULT "))[7:])
    result.update(side=side, method=method, peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
    print(json.dumps(result), flush=True)
    return result


def add_utilisation(runs: list[dict], peak: dict) -> None:
    """Each run's model FLOPs per second of training and share of the peak, from the training
    FLOPs per step its method's tunelab run counted (the same work for both sides)."""
    from machine_peak import utilisation

    per_step = {r["method"]: r["model_flops_per_step"] for r in runs if r["side"] == "tunelab"}
    for r in runs:
        flops = per_step[r["method"]] * r["steps"]
        r["flops"] = utilisation(flops, r["train_seconds"], peak)


def print_table(runs: list[dict]) -> None:
    by = {(r["method"], r["side"]): r for r in runs}
    rows = [
        ("training examples/s", "train_examples_per_second", True),
        ("peak RSS while training, MB", "train_peak_rss_mb", False),
        ("  of which above the loaded model", "train_extra_rss_mb", False),
        ("evaluation examples/s", "eval_examples_per_second", True),
        ("dev accuracy", "accuracy", True),
        ("model FLOPs utilisation, training", "mfu", True),
    ]
    for method in dict.fromkeys(r["method"] for r in runs):
        t, q = by[(method, "tunelab")], by[(method, "peft")]
        print(f"\n{method}: {'':34} {'tunelab':>10} {'PEFT':>10} {'ratio':>7}")
        for label, key, _ in rows:
            if key == "mfu":
                t[key], q[key] = t["flops"]["mfu"], q["flops"]["mfu"]
            ratio = t[key] / q[key] if q[key] else float("nan")
            print(f"  {label:42} {t[key]:>10.4g} {q[key]:>10.4g} {ratio:>6.2f}x")


# ------------------------------------------------------------------------------ shared pieces


def rows(split: str, n: int, seed: int) -> list[dict]:
    data = [json.loads(x) for x in (SST2 / f"{split}.jsonl").read_text().splitlines() if x]
    if split == "train":
        random.Random(seed).shuffle(data)
    return data[:n]


class PeakRSS:
    """The process's resident memory sampled every 5 ms while the block runs: a phase's peak,
    which the kernel's lifetime maximum cannot give."""

    def __enter__(self):
        self.peak = self.start = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def model_dir() -> str:
    from tunelab.models.load import resolve

    return str(resolve(None)[1])  # the default model, as plain safetensors (both sides)


def summary(args, train_s: float, mem: PeakRSS, eval_s: float, correct: int, n_eval: int):
    return {
        "steps": args.steps,
        "train_seconds": round(train_s, 2),
        "train_examples_per_second": round(args.steps * args.batch_size / train_s, 3),
        "train_peak_rss_mb": round(mem.peak, 1),
        "train_extra_rss_mb": round(mem.peak - mem.start, 1),
        "eval_seconds": round(eval_s, 2),
        "eval_examples_per_second": round(n_eval / eval_s, 3),
        "accuracy": round(correct / n_eval, 4),
    }


# ------------------------------------------------------------------------------- tunelab side


def run_tunelab(args, method: str) -> dict:
    import tempfile

    import torch

    from tunelab import methods
    from tunelab.lm.predict import predict_logprobs
    from tunelab.models import load_backbone
    from tunelab.tasks.prepared import PreparedTask
    from tunelab.tasks.spec import TaskSpec
    from tunelab.train.config import TrainConfig
    from tunelab.train.loop import train

    tmp = Path(tempfile.mkdtemp())
    for split, data in (
        ("train", rows("train", args.train_rows, args.seed)),
        ("dev", rows("dev", args.eval_rows, args.seed)),
    ):
        (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    task = TaskSpec.from_dict(
        {
            "name": "sst2",
            "data": {"train": str(tmp / "train.jsonl"), "dev": str(tmp / "dev.jsonl")},
            "input_fields": ["text"],
            "label_field": "label",
            "template": TEMPLATE,
            "verbalizer": {k: v.strip() for k, v in WORDS.items()},
            "validation": {"split": "dev"},  # not carved from train: both sides see every row
        }
    )
    torch.manual_seed(args.seed)
    backbone = load_backbone(model_dir())
    prep = PreparedTask.load(task, backbone.tokenizer)
    if method == "prompt-tuning":
        cfg = methods.CONFIGS[method](
            num_virtual_tokens=args.virtual_tokens, init="text", init_text=INIT_TEXT
        )
        lr = args.prompt_lr
    else:
        cfg = methods.CONFIGS[method](r=args.rank, alpha=2 * args.rank)
        lr = args.lora_lr
    tuned = methods.get(method).build(backbone, cfg, prep.verbalizer, args.seed)
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        bf16=args.bf16,
        seed=args.seed,
        save_every=10**9,  # no checkpoints mid-run (the PEFT side writes none either)
        eval_every=10**9,
        eval_batch_size=args.eval_batch_size,
    )
    train_ex = prep.examples("train")
    pad = backbone.tokenizer.pad_token_id
    with PeakRSS() as mem:
        start = time.perf_counter()
        train(tuned, train_ex, [], prep.verbalizer, train_cfg, lr, tmp / "run", pad)
        train_s = time.perf_counter() - start
    dev = prep.examples("dev")
    start = time.perf_counter()
    with torch.no_grad():
        logp = predict_logprobs(
            tuned, dev, prep.verbalizer, pad, args.eval_batch_size, "left", args.bf16
        )
    eval_s = time.perf_counter() - start
    correct = int((logp.argmax(-1) == torch.tensor([e.label for e in dev])).sum())
    result = summary(args, train_s, mem, eval_s, correct, len(dev))
    result["model_flops_per_step"] = step_flops(
        tuned, method, train_ex, prep.verbalizer, train_cfg, args
    )
    return result


def step_flops(tuned, method: str, train_ex, verbalizer, train_cfg, args) -> float:
    """Model FLOPs of one training step, averaged over the training rows: the rows' own
    tokens after the shared head (run once per batch where tunelab's training shares it), the
    method's backward (tunelab/lm/flops.py), the label words' logits at the answer position."""
    from tunelab.lm.flops import Lora, Shape, training_flops
    from tunelab.train.loop import shared_head_ids

    shape = Shape.of(tuned.model.config)
    ids = shared_head_ids(tuned, train_ex, verbalizer, train_cfg)  # None: no shared head
    n_prompt = tuned.prompt.n if tuned.prompt is not None else 0
    if ids is not None:  # the head (ids, soft prompt) runs once per batch, rows without it
        head, lengths = len(ids) + n_prompt, [len(ex.ids) - len(ids) for ex in train_ex]
    else:
        head, lengths = 0, [len(ex.ids) + n_prompt for ex in train_ex]
    extra = {"lora": Lora.parse(args.rank)} if method == "lora" else {}
    cols = len(verbalizer.words)

    def count(rows):
        return training_flops(shape, rows, method, head=head, logit_cols=cols, **extra).total

    head_only = count([])
    rows_mean = (count(lengths) - head_only) / len(lengths)
    return head_only + args.batch_size * rows_mean


# ---------------------------------------------------------------------------------- PEFT side


def run_peft(args, method: str) -> dict:
    import torch
    from peft import LoraConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    torch.manual_seed(args.seed)
    path = model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if method == "prompt-tuning":
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=args.virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=INIT_TEXT,
            tokenizer_name_or_path=path,
        )
        lr = args.prompt_lr
    else:
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules="all-linear",
        )
        lr = args.lora_lr
    model = get_peft_model(model, config)

    def encode(row: dict, with_answer: bool) -> dict:
        prompt = tok(TEMPLATE.format(**row))["input_ids"]
        answer = tok(WORDS[row["label"]], add_special_tokens=False)["input_ids"]
        if not with_answer:
            return {"input_ids": prompt}
        # the loss falls on the label word only: every prompt position is masked
        return {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def collate(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for b in batch:
            fill = width - len(b["input_ids"])  # right padding, as the Trainer examples do
            out["input_ids"].append(b["input_ids"] + [pad] * fill)
            out["attention_mask"].append([1] * len(b["input_ids"]) + [0] * fill)
            if "labels" in b:
                out["labels"].append(b["labels"] + [-100] * fill)
        return {k: torch.tensor(v) for k, v in out.items() if v}

    train_set = [encode(r, True) for r in rows("train", args.train_rows, args.seed)]
    targs = TrainingArguments(
        output_dir=str(ROOT / "runs" / "vs-peft" / "trainer"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=lr,
        warmup_steps=int(0.06 * args.steps),  # tunelab's default warmup fraction
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.bf16,
        seed=args.seed,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collate)
    with PeakRSS() as mem:
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start

    dev = rows("dev", args.eval_rows, args.seed)
    word_ids = [tok(WORDS[k], add_special_tokens=False)["input_ids"][0] for k in WORDS]
    labels = list(WORDS)
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.bf16):
        for i in range(0, len(dev), args.eval_batch_size):
            chunk = dev[i : i + args.eval_batch_size]
            batch = collate([encode(r, False) for r in chunk])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(**batch).logits  # (B, n_virtual + T, V): every position, every word
            last = batch["attention_mask"].sum(1) - 1 + logits.size(1) - batch["input_ids"].size(1)
            scores = logits[torch.arange(len(chunk)), last][:, word_ids]  # (B, 2)
            pred = scores.argmax(-1).tolist()
            correct += sum(labels[p] == r["label"] for p, r in zip(pred, chunk))
    eval_s = time.perf_counter() - start
    return summary(args, train_s, mem, eval_s, correct, len(dev))


if __name__ == "__main__":
    main()
