"""Exact-set match: two queries are equal when their clauses hold the same parts as sets.

A small normaliser in the spirit of Spider's official one (Yu et al. 2018), with no parser
dependency: keywords and names lower-cased, quotes dropped, literal values ignored (as Spider's
default exact match does), table aliases replaced by their tables (and qualifiers dropped when
the FROM clause names one table), `AS` column aliases dropped; then SELECT items, FROM tables and
join conditions, WHERE/HAVING conditions and GROUP BY items compare as sets, ORDER BY as a list
(ASC made explicit), LIMIT by presence, UNION/INTERSECT/EXCEPT and subqueries recursively.
Anything it cannot tokenise matches nothing.
"""

from __future__ import annotations

import re

VALUE = "\x00value"
_TOKEN = re.compile(
    r"""\s*(?:
    (?P<str>'(?:[^']|'')*'|"[^"]*")
  | (?P<num>\d+(?:\.\d+)?(?:e[-+]?\d+)?)
  | (?P<name>(?:`[^`]*`|\[[^\]]*\]|[A-Za-z_][\w$]*)(?:\.(?:`[^`]*`|\*|[A-Za-z_][\w$]*))?)
  | (?P<op>!=|<>|<=|>=|==|\|\||[-+*/%=<>(),;])
    )""",
    re.VERBOSE,
)
CLAUSES = ("select", "from", "where", "group", "having", "order", "limit")
SET_OPS = ("union", "intersect", "except")
KEYWORDS = {
    *CLAUSES,
    *SET_OPS,
    "join",
    "on",
    "as",
    "by",
    "and",
    "or",
    "not",
    "inner",
    "left",
    "right",
    "outer",
    "cross",
    "natural",
    "asc",
    "desc",
    "distinct",
    "in",
    "like",
    "between",
    "is",
    "null",
    "exists",
}


def _tokens(sql: str) -> list[str] | None:
    out, pos, sql = [], 0, sql.strip().rstrip(";")
    while pos < len(sql):
        m = _TOKEN.match(sql, pos)
        if not m or m.end() == pos:
            if sql[pos:].strip():
                return None
            break
        pos = m.end()
        if m.group("str") is not None or m.group("num") is not None:
            out.append(VALUE)
        elif m.group("name") is not None:
            out.append(re.sub(r"[`\[\]]", "", m.group("name")).lower())
        else:
            out.append(m.group("op"))
    return out


def _nest(tokens: list[str]) -> list | None:
    """Parenthesised groups become tuples: ("sub", query) for a subquery, else ("(", atoms)."""
    stack: list[list] = [[]]
    for t in tokens:
        if t == "(":
            stack.append([])
        elif t == ")":
            if len(stack) == 1:
                return None
            inner = stack.pop()
            is_query = bool(inner) and inner[0] == "select"
            stack[-1].append(("sub", _query(inner)) if is_query else ("(", tuple(inner)))
        else:
            stack[-1].append(t)
    return stack[0] if len(stack) == 1 else None


def _split(atoms: list, seps: set[str]) -> list[list]:
    parts: list[list] = [[]]
    for a in atoms:
        if isinstance(a, str) and a in seps:
            parts.append([])
        else:
            parts[-1].append(a)
    return [p for p in parts if p]


def _canon(x) -> str:
    """Text of a normalised part; sets sorted, since equal sets may iterate in other orders."""
    if isinstance(x, frozenset):
        return "{" + ", ".join(sorted(map(_canon, x))) + "}"
    if isinstance(x, tuple):
        return "(" + ", ".join(map(_canon, x)) + ")"
    return str(x)


def _text(atoms) -> str:
    return " ".join(a if isinstance(a, str) else _canon(a) for a in atoms)


def _conditions(atoms: list) -> tuple:
    """Conditions joined by AND/OR as a set, plus the count of each connector; `x = y` between
    two names is written in one order; BETWEEN's own AND stays inside its condition."""
    parts, ops, current, between = [], [], [], False
    for a in atoms:
        if a in ("and", "or") and not (a == "and" and between):
            parts.append(current)
            ops.append(a)
            current = []
            continue
        between = (between and a != "and") or a == "between"
        current.append(a)
    parts.append(current)
    canon = []
    for p in parts:
        if len(p) == 3 and p[1] == "=" and VALUE not in p:
            p = sorted(p[::2], key=str)
            p = [p[0], "=", p[1]]
        canon.append(_text(p))
    return frozenset(canon), tuple(sorted(ops))


def _select(atoms: list) -> tuple:
    clauses: dict[str, list] = {}
    current = None
    for a in atoms:
        if isinstance(a, str) and a in CLAUSES:
            current = a
            clauses.setdefault(a, [])
        elif current is not None and not (a == "by" and current in ("group", "order")):
            clauses[current].append(a)
    frm = clauses.get("from", [])
    # tables and their aliases: FROM t [AS] a JOIN u [AS] b ON ...
    aliases, tables, joins = {}, [], []
    for part in _split(frm, {"join", ","}):
        body, _, cond = (
            (part[: part.index("on")], "on", part[part.index("on") + 1 :])
            if "on" in part
            else (part, "", [])
        )
        body = [
            b
            for b in body
            if b not in ("as", "inner", "left", "right", "outer", "cross", "natural")
        ]
        if body and isinstance(body[0], str):
            tables.append(body[0])
            if len(body) > 1 and isinstance(body[1], str):
                aliases[body[1]] = body[0]
        elif body:
            tables.append(_text(body))
        joins += cond + ["and"] if cond else []
    single = len(tables) == 1

    def resolve(a):
        if isinstance(a, str) and "." in a and a != VALUE:
            t, col = a.split(".", 1)
            return col if single else f"{aliases.get(t, t)}.{col}"
        if isinstance(a, tuple) and a[0] == "(":
            return ("(", tuple(resolve(x) for x in a[1]))
        return a

    def items(key: str) -> list[list]:
        return [[resolve(a) for a in p] for p in _split(clauses.get(key, []), {","})]

    sel = clauses.get("select", [])
    distinct = bool(sel) and sel[0] == "distinct"
    select = []
    for p in items("select"):
        p = [a for a in p if a != "distinct"]
        if len(p) > 2 and p[-2] == "as":
            p = p[:-2]
        select.append(_text(p))
    order = []
    for p in items("order"):
        order.append(_text(p if p[-1] in ("asc", "desc") else [*p, "asc"]))
    return (
        ("select", distinct, frozenset(select), len(select)),
        ("from", frozenset(tables), _conditions([resolve(a) for a in joins[:-1]])),
        (
            "where",
            _conditions([resolve(a) for a in clauses["where"]]) if "where" in clauses else None,
        ),
        ("group", frozenset(_text(p) for p in items("group"))),
        (
            "having",
            _conditions([resolve(a) for a in clauses["having"]]) if "having" in clauses else None,
        ),
        ("order", tuple(order)),
        ("limit", "limit" in clauses),
    )


def _query(atoms: list) -> tuple:
    for i, a in enumerate(atoms):
        if isinstance(a, str) and a in SET_OPS:
            return (a, _select(atoms[:i]), _query(atoms[i + 1 :]))
    return ("query", _select(atoms))


def normalise(sql: str) -> tuple | None:
    """The comparable form of a query, or None when it cannot be read."""
    tokens = _tokens(sql)
    if not tokens:
        return None
    atoms = _nest(tokens)
    if atoms is None or not atoms or atoms[0] != "select":
        return None
    return _query(atoms)


def exact_set_match(gold: str, pred: str) -> bool:
    g = normalise(gold)
    return g is not None and g == normalise(pred)
