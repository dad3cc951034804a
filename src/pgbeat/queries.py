"""Every statement pgbeat sends, by name (sql/queries.sql).

The file is a list of entries, each headed by its name and a one-line description:

    -- name: claim_runs
    -- Release the locks of recorded runs, claim due runs, and say when the next falls due.
    WITH ...

Python holds no SQL text: it calls `get(name)`, and reads rows by column name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

QUERIES_FILE = Path(__file__).parent / "sql" / "queries.sql"

_ENTRY = re.compile(r"^-- name: ([a-z0-9_]+)\n-- (.+)\n", re.MULTILINE)


@dataclass(frozen=True)
class Query:
    name: str
    description: str
    sql: str


def parse(text: str) -> dict[str, Query]:
    """The entries of a queries file, by name; a repeated or empty entry is an error."""
    parts = _ENTRY.split(text)
    queries: dict[str, Query] = {}
    for name, description, sql in zip(parts[1::3], parts[2::3], parts[3::3], strict=True):
        if name in queries:
            raise ValueError(f"{QUERIES_FILE.name}: query {name!r} is defined twice")
        lines = sql.strip().splitlines()
        while lines and lines[-1].startswith("--"):  # a section heading before the next entry
            lines.pop()
        if not lines:
            raise ValueError(f"{QUERIES_FILE.name}: query {name!r} has no statement")
        queries[name] = Query(name, description.strip(), "\n".join(lines).strip().removesuffix(";"))
    return queries


QUERIES: dict[str, Query] = parse(QUERIES_FILE.read_text(encoding="utf-8"))


def get(name: str) -> str:
    """The statement called name in sql/queries.sql."""
    try:
        return QUERIES[name].sql
    except KeyError:
        raise KeyError(f"no query {name!r} in {QUERIES_FILE}") from None
