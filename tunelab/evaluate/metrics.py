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


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def token_f1(gold: str, pred: str) -> float:
    """SQuAD-style F1 over whitespace tokens (lower-cased)."""
    from collections import Counter

    g, p = _normalise(gold).split(), _normalise(pred).split()
    common = sum((Counter(g) & Counter(p)).values())
    if not g or not p:
        return float(g == p)
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def exact_match(gold: str, pred: str) -> bool:
    """Equal after lower-casing and collapsing whitespace."""
    return _normalise(gold) == _normalise(pred)


def generation_metrics(golds: list[str], preds: list[str]) -> dict:
    """Exact match (after lower-casing and collapsing whitespace) and mean token F1."""
    n = max(len(golds), 1)
    return {
        "exact_match": sum(exact_match(g, p) for g, p in zip(golds, preds)) / n,
        "token_f1": sum(token_f1(g, p) for g, p in zip(golds, preds)) / n,
        "n": len(golds),
    }


def headline_key(task) -> str:
    """The one metric a task's runs are judged and ranked by: accuracy, execution accuracy for
    SQL (it runs the query: exact match undercounts right queries), else exact match."""
    if task.sql is not None:
        return "execution_accuracy"
    return "exact_match" if task.is_generation else "accuracy"


def headline(metrics: dict) -> tuple[str, float]:
    """(name, value) of the headline metric (`headline_key`) among a run's metrics."""
    key = next(k for k in ("accuracy", "execution_accuracy", "exact_match") if k in metrics)
    return key.replace("_", " "), metrics[key]
