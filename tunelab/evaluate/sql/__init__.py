"""Text-to-SQL evaluation: execution accuracy on generated SQLite databases, exact-set match."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from tunelab.evaluate.sql.databases import database_paths, query_literals
from tunelab.evaluate.sql.exact import exact_set_match
from tunelab.evaluate.sql.execute import orders, run_query, same_result
from tunelab.tasks.sql import Schema


@dataclass
class Verdict:
    correct: bool
    reason: str  # "match", "wrong result", "syntax: ...", "runtime: ...", "timeout: ...",
    # or "gold failed" (the gold query ran on none of the databases; exact-set match decided)


class ExecutionJudge:
    """Compares predicted with gold SQL on `databases` generated databases per schema.

    The databases of a schema are seeded with the literals of the gold queries judged for it,
    so build one judge per evaluation set (`queries`: db_id -> gold queries)."""

    def __init__(
        self,
        schemas: dict[str, Schema],
        queries: dict[str, list[str]],
        cache: Path,
        databases: int = 3,
        seed: int = 0,
        timeout: float = 2.0,
    ):
        self.schemas, self.queries, self.cache = schemas, queries, cache
        self.n, self.seed, self.timeout = databases, seed, timeout
        self._paths: dict[str, list[Path]] = {}

    def paths(self, db_id: str) -> list[Path]:
        if db_id not in self._paths:
            literals = query_literals(self.queries.get(db_id, []))
            self._paths[db_id] = database_paths(
                self.schemas[db_id], literals, self.n, self.seed, self.cache
            )
        return self._paths[db_id]

    def judge(self, db_id: str, gold: str, pred: str) -> Verdict:
        """Correct when the prediction returns the gold result on every database where the gold
        query runs (as a list when the gold query orders its result, else as a multiset)."""
        ordered, compared = orders(gold), 0
        for path in self.paths(db_id):
            g = run_query(path, gold, self.timeout)
            if g.rows is None:
                continue  # the gold query cannot judge on this database
            p = run_query(path, pred, self.timeout)
            if p.rows is None:
                return Verdict(False, p.error or "error")
            if not same_result(g.rows, p.rows, ordered):
                return Verdict(False, "wrong result")
            compared += 1
        if compared == 0:
            return Verdict(exact_set_match(gold, pred), "gold failed")
        return Verdict(True, "match")


def sql_metrics(
    schemas: dict[str, Schema],
    db_ids: list[str],
    golds: list[str],
    preds: list[str],
    cache: Path,
    databases: int = 3,
    seed: int = 0,
    timeout: float = 2.0,
) -> tuple[dict, list[Verdict]]:
    """Execution accuracy, exact-set match and why predictions failed, over aligned lists."""
    queries: dict[str, list[str]] = defaultdict(list)
    for db, g in zip(db_ids, golds):
        queries[db].append(g)
    judge = ExecutionJudge(schemas, queries, cache, databases, seed, timeout)
    verdicts = [judge.judge(db, g, p) for db, g, p in zip(db_ids, golds, preds)]
    n = max(len(golds), 1)
    reasons = Counter(v.reason.split(":")[0] for v in verdicts)
    return {
        "execution_accuracy": sum(v.correct for v in verdicts) / n,
        "exact_set_match": sum(exact_set_match(g, p) for g, p in zip(golds, preds)) / n,
        "sql_outcomes": dict(sorted(reasons.items())),
    }, verdicts
