"""How well the generated databases judge Spider queries (issue 6).

    .venv/bin/python benchmarks/spider_judge.py        # ~10 s on 2 cores; reads ../shared/data

On Spider's dev set (1,034 questions, 20 databases) it prints, as Markdown table rows:
- the gold queries judged against themselves (must be 1.0, with no gold query failing);
- how many gold queries return no rows on every generated database (such a query cannot tell
  an empty wrong answer from the right one);
- another question's gold query about the same database (shifted by two rows, since Spider asks
  each question twice) as the prediction: the share judged correct;
- small mutations of the gold query (`>` to `>=`, DESC to ASC, ...): the share judged wrong.
  Some mutants are equivalent to the gold query (LEFT JOIN where every key matches), so 1.0 is
  not the ceiling; Zhong et al. 2020 report their distilled suites catch nearly all.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tunelab.evaluate.sql import ExecutionJudge, sql_metrics  # noqa: E402
from tunelab.evaluate.sql.execute import run_query  # noqa: E402
from tunelab.models.load import tunelab_home  # noqa: E402
from tunelab.tasks.sql import load_tables  # noqa: E402

SPIDER = ROOT.parent / "shared" / "data" / "spider"
MUTATIONS = {
    "`>` to `>=`": (r"(?<![<>!])>(?!=)", ">="),
    "`<` to `<=`": (r"(?<![<>!])<(?![=>])", "<="),
    "DESC to ASC": (r"\bDESC\b", "ASC"),
    "drop DISTINCT": (r"\bDISTINCT\s+", ""),
    "LIMIT 1 to LIMIT 2": (r"\bLIMIT\s+1\b", "LIMIT 2"),
    "AND to OR": (r"\bAND\b", "OR"),
    "JOIN to LEFT JOIN": (r"\bJOIN\b", "LEFT JOIN"),
    "max( to min(": (r"\bmax\(", "min("),
}


def main() -> None:
    schemas = load_tables(SPIDER / "tables.json")
    dev = [json.loads(x) for x in (SPIDER / "dev.jsonl").read_text().splitlines()]
    db_ids, golds = [r["db_id"] for r in dev], [r["query"] for r in dev]
    cache = tunelab_home() / "sql"
    same, verdicts = sql_metrics(schemas, db_ids, golds, golds, cache)
    failed = sum(v.reason == "gold failed" for v in verdicts)
    print(
        f"| gold against itself | {len(dev)} | {same['execution_accuracy']:.3f} correct, "
        f"{failed} gold queries failing |"
    )
    queries: dict[str, list[str]] = {}
    for db, q in zip(db_ids, golds):
        queries.setdefault(db, []).append(q)
    judge = ExecutionJudge(schemas, queries, cache)
    empty = sum(
        all(run_query(p, q).rows == [] for p in judge.paths(db)) for db, q in zip(db_ids, golds)
    )
    print(f"| gold returns no rows on every database | {len(dev)} | {empty / len(dev):.3f} |")
    shifted = golds[2:] + golds[:2]
    other, _ = sql_metrics(schemas, db_ids, golds, shifted, cache)
    print(
        f"| another question's query | {len(dev)} | "
        f"{other['execution_accuracy']:.3f} judged correct |"
    )
    for name, (pattern, repl) in MUTATIONS.items():
        rows = [i for i, q in enumerate(golds) if re.search(pattern, q, re.I)]
        preds = [re.sub(pattern, repl, golds[i], count=1, flags=re.I) for i in rows]
        m, _ = sql_metrics(
            schemas, [db_ids[i] for i in rows], [golds[i] for i in rows], preds, cache
        )
        print(
            f"| mutation: {name} | {len(rows)} | {1 - m['execution_accuracy']:.3f} judged wrong |"
        )


if __name__ == "__main__":
    main()
