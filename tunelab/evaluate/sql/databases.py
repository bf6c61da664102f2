"""SQLite databases generated from a schema, filled so that queries discriminate.

Test-suite accuracy (Zhong et al. 2020, "Semantic Evaluation for Text-to-SQL with Distilled Test
Suites") compares a prediction with the gold query on many databases whose contents make wrong
queries return different results. Here each database gets a few rows per table drawn from small
value domains (so WHERE, JOIN and GROUP BY hit, and duplicates occur), plus the literals of the
gold queries and their neighbours (so `age > 56` and `age >= 56` differ); foreign-key columns
mostly take values of the column they reference (joins match) and sometimes not (joins drop
rows). No NULLs. Everything is drawn from one seeded generator, so a seed fixes the database.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
from pathlib import Path

from tunelab.tasks.sql import Schema, q

GENERATOR_VERSION = 2  # part of the cache key: bump when the generated contents change


def rows_range(seed: int) -> tuple[int, int]:
    """Rows per table, drawn per table: later databases of a suite are larger, so that
    conjunctions of conditions (a join and two WHEREs) hold on some row of some database."""
    k = seed % 1000  # the database's place in its suite
    return 2 + 3 * k, 6 + 8 * k


_STRING = re.compile(r"'((?:[^']|'')*)'|\"([^\"]*)\"")
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?![\w.])")


def query_literals(queries: list[str]) -> list[object]:
    """The string and number literals of some SQL, sorted (LIKE patterns lose their `%`)."""
    found: set[object] = set()
    for sql in queries:
        for m in _STRING.finditer(sql):
            text = (m.group(1) if m.group(1) is not None else m.group(2)).replace("''", "'")
            found.add(text.strip("%") if "%" in text else text)
            if "%" in text:  # a value that contains the pattern, not only equals it
                found.add("x" + text.strip("%") + "y")
        for m in _NUMBER.finditer(_STRING.sub("''", sql)):
            x = float(m.group())
            found.add(int(x) if x.is_integer() else x)
    return sorted(found, key=lambda v: (isinstance(v, str), str(v)))


def _domain(rng: random.Random, kind: str, name: str, literals: list[object]) -> list[object]:
    """A small set of values a column draws from (shared by every column of the same kind)."""
    nums = [v for v in literals if not isinstance(v, str)]
    texts = [v for v in literals if isinstance(v, str)]
    if kind == "number":
        near = [x + d for x in nums if isinstance(x, int) for d in (-1, 1)]
        return sorted({*range(1, rng.randint(4, 7)), *nums, *near}, key=float)
    if kind == "boolean":
        return [0, 1]
    if kind == "time":
        return [f"20{rng.randint(0, 2)}{rng.randint(0, 9)}-0{m}-1{m}" for m in range(1, 5)] + texts
    stem = re.sub(r"\W+", "_", name.lower())[:8] or "v"
    return [f"{stem}{i}" for i in range(rng.randint(2, 5))] + texts


def _unique(rng: random.Random, pool: list[object], n: int, kind: str, name: str) -> list[object]:
    """n distinct values: from the pool first, then made up."""
    chosen = rng.sample(pool, min(n, len(pool)))
    extra = 0
    while len(chosen) < n:
        extra += 1
        v = 100 + extra if kind in ("number", "boolean") else f"{name[:6]}_{extra}"
        if v not in chosen:
            chosen.append(v)
    return chosen


def fill_values(schema: Schema, seed: int, literals: list[object]) -> dict[int, list[tuple]]:
    """table index -> rows, deterministic for (schema, seed, literals)."""
    rng = random.Random(f"{schema.fingerprint()}:{seed}:{GENERATOR_VERSION}")
    n_rows = [rng.randint(*rows_range(seed)) for _ in schema.tables]
    refs = dict(schema.foreign_keys)
    pk_alone = {  # single-column primary keys hold distinct values
        i
        for i in schema.primary_keys
        if sum(schema.columns[j].table == schema.columns[i].table for j in schema.primary_keys) == 1
    }
    values: dict[int, list[object]] = {}
    pending = list(range(len(schema.columns)))
    while pending:
        # a foreign key waits for the column it references; a cycle is broken by the domain
        ready = [i for i in pending if refs.get(i) is None or refs[i] in values] or pending[:1]
        for i in ready:
            col, n = schema.columns[i], n_rows[schema.columns[i].table]
            pool = _domain(rng, col.type, col.name, literals)
            target = values.get(refs[i]) if i in refs else None
            if target is not None:
                pool = sorted(set(target), key=str)
                misses = _domain(rng, col.type, col.name, [])
                if i in pk_alone:
                    values[i] = _unique(rng, pool, n, col.type, col.name)
                else:  # mostly matching the referenced rows, now and then dangling
                    values[i] = [
                        rng.choice(pool) if rng.random() < 0.85 else rng.choice(misses)
                        for _ in range(n)
                    ]
            elif i in pk_alone:
                values[i] = _unique(rng, pool, n, col.type, col.name)
            else:
                values[i] = [rng.choice(pool) for _ in range(n)]
            pending.remove(i)
    return {
        t: list(zip(*(values[i] for i in schema.table_columns(t))))
        for t in range(len(schema.tables))
    }


def build_database(schema: Schema, seed: int, literals: list[object], path: Path) -> Path:
    """Write the seeded database to `path` atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    con = sqlite3.connect(tmp)
    try:
        for stmt in schema.create_statements():
            con.execute(stmt)
        for t, rows in fill_values(schema, seed, literals).items():
            cols = schema.table_columns(t)
            if not cols or not rows or t not in schema.user_tables():
                continue
            # composite keys can collide: such a row is dropped, the same way for a seed
            marks = ", ".join("?" * len(cols))
            con.executemany(f"INSERT OR IGNORE INTO {q(schema.tables[t])} VALUES ({marks})", rows)
        con.commit()
    finally:
        con.close()
    os.replace(tmp, path)
    return path


def database_paths(
    schema: Schema, literals: list[object], n: int, seed: int, cache: Path
) -> list[Path]:
    """n databases for a schema, built once and cached under `cache`, keyed by schema, literals
    and seed."""
    key = hashlib.sha256(json.dumps([schema.fingerprint(), literals]).encode()).hexdigest()[:12]
    paths = []
    for k in range(n):
        s = seed * 1000 + k
        path = cache / f"{schema.db_id}-{key}-v{GENERATOR_VERSION}-s{s}.sqlite"
        paths.append(path if path.is_file() else build_database(schema, s, literals, path))
    return paths
