"""Classification metrics: accuracy, macro-F1, confusion matrix."""

from __future__ import annotations


def confusion(gold: list[int], pred: list[int], n: int) -> list[list[int]]:
    """m[g][p]: rows are gold labels, columns predictions."""
    m = [[0] * n for _ in range(n)]
    for g, p in zip(gold, pred):
        m[g][p] += 1
    return m


def classification_metrics(gold: list[int], pred: list[int], labels: list[str]) -> dict:
    n = len(labels)
    m = confusion(gold, pred, n)
    f1s = []
    for c in range(n):
        tp = m[c][c]
        fp = sum(m[g][c] for g in range(n)) - tp
        fn = sum(m[c]) - tp
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1),
        "macro_f1": sum(f1s) / n,
        "n": len(gold),
        "confusion": m,
        "labels": labels,
    }


def format_confusion(metrics: dict) -> str:
    labels, m = metrics["labels"], metrics["confusion"]
    w = max(8, *(len(x) for x in labels)) + 1
    head = "gold \\ pred".ljust(w) + "".join(x.rjust(w) for x in labels)
    rows = [labels[i].ljust(w) + "".join(str(v).rjust(w) for v in m[i]) for i in range(len(labels))]
    return "\n".join([head, *rows])
