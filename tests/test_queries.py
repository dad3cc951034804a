"""sql/queries.sql, the named seam between Python and the database: every statement the
product sends is an entry there, every entry is used, and every one prepares against a
migrated database (so a renamed function or column fails here, not in production)."""

from __future__ import annotations

import re
from pathlib import Path

import asyncpg
import pytest

from pgbeat import queries

SRC = Path(queries.__file__).parent  # the product (the tooling, pgbeat_lab, is not)
# Entries pgbeat migrate runs with psycopg: a DO block, a utility statement composed
# with psycopg.sql, and a statement with psycopg's %s.
MIGRATE_ONLY = {"schema_drop_objects", "schema_record_digest", "register_kinds"}
SQL_TEXT = re.compile(r"""["']\s*(?:SELECT|INSERT INTO|UPDATE|DELETE FROM|WITH|CALL|DO)\s""")


def product_sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(SRC.rglob("*.py"))}


def test_every_entry_has_a_name_a_description_and_one_statement():
    assert queries.QUERIES
    for query in queries.QUERIES.values():
        assert query.description and not query.description.startswith("-")
        assert query.sql and not query.sql.endswith(";")


def test_a_repeated_name_is_refused():
    text = "-- name: a\n-- first\nSELECT 1;\n\n-- name: a\n-- again\nSELECT 2;\n"
    with pytest.raises(ValueError, match="defined twice"):
        queries.parse(text)


def test_python_names_its_statements_and_holds_no_sql():
    used: set[str] = set()
    for path, text in product_sources().items():
        assert not SQL_TEXT.search(text), (
            f"{path.relative_to(SRC)} holds SQL text: move it to sql/queries.sql"
        )
        used |= set(re.findall(r"""queries\.get\(["']([a-z0-9_]+)["']\)""", text))
    assert used - set(queries.QUERIES) == set(), "names not in sql/queries.sql"
    assert set(queries.QUERIES) - used == set(), "entries nothing uses: delete them"


async def test_every_statement_prepares(db_url):
    conn = await asyncpg.connect(db_url)
    try:
        for query in queries.QUERIES.values():
            if query.name not in MIGRATE_ONLY:
                await conn.prepare(query.sql)
    finally:
        await conn.close()
