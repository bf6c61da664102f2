"""Run SQL on SQLite under a time limit and compare results the way execution accuracy does."""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

MAX_ROWS = 100_000  # a result this large is an accident (a cross join), not an answer


@dataclass
class Outcome:
    rows: list[tuple] | None  # None when the query failed
    error: str | None = None  # "syntax", "runtime" or "timeout", with the message


def run_query(path: Path, sql: str, timeout: float = 2.0) -> Outcome:
    """Execute one statement read-only; invalid SQL, runtime errors and queries running past
    `timeout` seconds come back as an Outcome with an error, never as an exception."""
    if not sql.strip():
        return Outcome(None, "syntax: empty query")
    # read-only: a predicted DROP or UPDATE cannot change the database the next query sees
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    deadline = time.perf_counter() + timeout
    # called every 1,000 SQLite VM instructions; a true return interrupts the query
    con.set_progress_handler(lambda: time.perf_counter() > deadline, 1000)
    con.text_factory = lambda b: b.decode(errors="replace")
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(MAX_ROWS + 1)
        if len(rows) > MAX_ROWS:
            return Outcome(None, f"runtime: more than {MAX_ROWS} rows")
        return Outcome(rows)
    except sqlite3.OperationalError as e:
        if time.perf_counter() > deadline or "interrupted" in str(e):
            return Outcome(None, f"timeout: over {timeout}s")
        kind = "syntax" if "syntax error" in str(e) or "incomplete input" in str(e) else "runtime"
        return Outcome(None, f"{kind}: {e}")
    except (sqlite3.Error, ValueError, OverflowError, sqlite3.Warning) as e:
        # Warning: several statements; ValueError: NUL characters in the text
        return Outcome(None, f"runtime: {e}")
    finally:
        con.close()


_ORDER_BY = re.compile(r"\border\s+by\b", re.IGNORECASE)


def orders(sql: str) -> bool:
    """Whether the outermost query sorts its result (ORDER BY outside any parentheses)."""
    depth, text = 0, []
    for ch in re.sub(r"'(?:[^']|'')*'|\"[^\"]*\"", "''", sql):
        depth += ch == "("
        depth -= ch == ")"
        text.append(ch if depth == 0 else " ")
    return bool(_ORDER_BY.search("".join(text)))


def _key(v: object) -> object:
    # 3 and 3.0 are the same answer; text is compared as it is
    return round(v, 6) if isinstance(v, float) else v


def same_result(gold: list[tuple], pred: list[tuple], ordered: bool) -> bool:
    """Equal as lists when the gold query orders, else as multisets of rows."""
    g = [tuple(map(_key, r)) for r in gold]
    p = [tuple(map(_key, r)) for r in pred]
    return g == p if ordered else Counter(g) == Counter(p)
