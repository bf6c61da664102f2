"""Text-to-SQL tasks: database schemas from a Spider `tables.json`, their text forms for
prompts, and the `{schema}` field every row gets from its database id.

Each entry holds `table_names_original`, `column_names_original` (`[table index, name]`, with
`[-1, "*"]` first), `column_types`, `primary_keys` and `foreign_keys` (`[column, referenced
column]`), all by column index. Names are the original ones: the gold SQL uses them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.tasks.readers import Record

# Spider's column types -> SQLite declared types (NUMERIC keeps 3 as 3 and 1.5 as 1.5)
SQLITE_TYPES = {"number": "NUMERIC", "text": "TEXT", "time": "TEXT", "boolean": "INTEGER"}


@dataclass
class Column:
    table: int
    name: str
    type: str  # Spider's: number, text, time, boolean, others


@dataclass
class Schema:
    db_id: str
    tables: list[str]
    columns: list[Column]  # Spider's column list without the leading "*"
    primary_keys: list[int]  # indices into `columns`
    foreign_keys: list[tuple[int, int]] = field(default_factory=list)  # (column, referenced)

    def table_columns(self, t: int) -> list[int]:
        return [i for i, c in enumerate(self.columns) if c.table == t]

    def user_tables(self) -> list[int]:
        """Tables to create and show: SQLite reserves `sqlite_*` (Spider lists sqlite_sequence)."""
        return [t for t, name in enumerate(self.tables) if not name.lower().startswith("sqlite_")]

    def fingerprint(self) -> str:
        """A short hash of everything that shapes a generated database."""
        blob = json.dumps(
            [self.tables, [vars(c) for c in self.columns], self.primary_keys, self.foreign_keys]
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def create_statements(self) -> list[str]:
        """One CREATE TABLE per table, with declared types, primary and foreign keys."""
        out = []
        for t in self.user_tables():
            name, cols = self.tables[t], self.table_columns(t)
            lines = [
                f"  {q(self.columns[i].name)} {SQLITE_TYPES.get(self.columns[i].type, 'TEXT')}"
                for i in cols
            ]
            pk = [i for i in self.primary_keys if i in cols]
            if pk:
                lines.append(f"  PRIMARY KEY ({', '.join(q(self.columns[i].name) for i in pk)})")
            for a, b in self.foreign_keys:
                if a in cols:
                    ref = self.columns[b]
                    lines.append(
                        f"  FOREIGN KEY ({q(self.columns[a].name)}) REFERENCES "
                        f"{q(self.tables[ref.table])}({q(ref.name)})"
                    )
            out.append(f"CREATE TABLE {q(name)} (\n" + ",\n".join(lines) + "\n)")
        return out

    def render(self, form: str = "compact") -> str:
        """The schema as prompt text: `create` (CREATE TABLE statements) or `compact`
        (`table(col, ...)` per line, then the foreign keys as `a.x = b.y`)."""
        if form == "create":
            return ";\n".join(self.create_statements()) + ";"
        lines = [
            f"{name}({', '.join(self.columns[i].name for i in self.table_columns(t))})"
            for t, name in enumerate(self.tables)
            if t in self.user_tables()
        ]
        for a, b in self.foreign_keys:
            ca, cb = self.columns[a], self.columns[b]
            lines.append(f"{self.tables[ca.table]}.{ca.name} = {self.tables[cb.table]}.{cb.name}")
        return "\n".join(lines)


def q(name: str) -> str:
    """An SQLite identifier, quoted (Spider has names with spaces)."""
    return '"' + name.replace('"', '""') + '"'


def parse_schema(entry: dict, where: str) -> Schema:
    try:
        cols = entry["column_names_original"]
        types = entry["column_types"]
        tables = list(entry["table_names_original"])
        # Spider's indices count the leading "*"; ours do not
        columns = [Column(int(t), str(n), str(ty)) for (t, n), ty in zip(cols[1:], types[1:])]
        pks: list[int] = []
        for p in entry.get("primary_keys", []):
            pks += [i - 1 for i in (p if isinstance(p, list) else [p])]  # composite keys nest
        fks = [(int(a) - 1, int(b) - 1) for a, b in entry.get("foreign_keys", [])]
        schema = Schema(str(entry["db_id"]), tables, columns, pks, fks)
    except (KeyError, TypeError, ValueError) as e:
        raise TunelabError(f"{where}: not a Spider schema entry ({e!r})") from None
    n = len(columns)
    for i in [*pks, *(x for fk in fks for x in fk)]:
        if not 0 <= i < n:
            raise TunelabError(f"{where}: db {schema.db_id!r}: key column {i + 1} out of range")
    return schema


def load_tables(path: str | Path) -> dict[str, Schema]:
    """db_id -> Schema for every entry of a Spider `tables.json`."""
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise TunelabError(f"{path}: cannot read tables file ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise TunelabError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(entries, list):
        raise TunelabError(f"{path}: expected a JSON list of schemas")
    out = {}
    for i, entry in enumerate(entries):
        s = parse_schema(entry, f"{path}: entry {i}")
        out[s.db_id] = s
    return out


_LOADED: dict[str, dict[str, Schema]] = {}


def tables_of(path: str) -> dict[str, Schema]:
    """load_tables, once per file and process."""
    if path not in _LOADED:
        _LOADED[path] = load_tables(path)
    return _LOADED[path]


def attach_schemas(task, rows: list[Record]) -> None:
    """Give every row a `schema` field: its database's schema as prompt text."""
    cfg = task.sql
    schemas = tables_of(cfg.tables)
    rendered: dict[str, str] = {}
    for r in rows:
        db = r.fields.get(cfg.db_field)
        if db is None:
            raise TunelabError(f"{r.where}: missing field {cfg.db_field!r} (the database id)")
        if str(db) not in schemas:
            raise TunelabError(f"{r.where}: database {db!r} is not in {cfg.tables}")
        if db not in rendered:
            rendered[db] = schemas[str(db)].render(cfg.schema_format)
        r.fields["schema"] = rendered[db]
