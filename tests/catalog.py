"""What a database's pgbeat schema is made of, read from PostgreSQL's catalog, for
comparing two databases (tests/test_migrations.py)."""

from __future__ import annotations

import re

import psycopg

from pgbeat import migrations

# Each section: rows that identify one object and every property that matters.
SECTIONS = {
    "functions": """
        SELECT p.oid::regprocedure::text AS signature, p.prokind::text AS kind,
               pg_get_function_result(p.oid) AS returns, l.lanname AS language,
               p.provolatile::text AS volatility, p.proparallel::text AS parallel,
               p.prosecdef AS security_definer, p.proisstrict AS strict, p.proleakproof AS leakproof,
               p.procost AS cost, p.prorows AS rows, coalesce(p.proconfig, '{}') AS settings,
               pg_get_function_arguments(p.oid) AS arguments, p.prosrc AS source
          FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'pgbeat'::regnamespace
    """,
    "relations": """
        SELECT c.relname AS name, c.relkind::text AS kind, c.relpersistence::text AS persistence
          FROM pg_class c WHERE c.relnamespace = 'pgbeat'::regnamespace AND c.relkind <> 'i'
    """,
    "columns": """
        SELECT c.relname AS relation, a.attnum AS position, a.attname AS name,
               format_type(a.atttypid, a.atttypmod) AS type, a.attnotnull AS not_null,
               a.attidentity::text AS identity, a.attgenerated::text AS generated,
               pg_get_expr(d.adbin, d.adrelid) AS default
          FROM pg_attribute a
          JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'pgbeat'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
           AND c.relkind IN ('r', 'v', 'm', 'p', 'c')
    """,
    "constraints": """
        SELECT conrelid::regclass::text AS relation, conname AS name, contype::text AS type,
               pg_get_constraintdef(oid) AS definition
          FROM pg_constraint WHERE connamespace = 'pgbeat'::regnamespace
    """,
    "indexes": """
        SELECT c.relname AS name, pg_get_indexdef(c.oid) AS definition
          FROM pg_class c WHERE c.relnamespace = 'pgbeat'::regnamespace AND c.relkind = 'i'
    """,
    "sequences": """
        SELECT c.relname AS name, s.seqtypid::regtype::text AS type, s.seqstart AS start,
               s.seqincrement AS increment, s.seqmax AS max, s.seqcycle AS cycle
          FROM pg_sequence s JOIN pg_class c ON c.oid = s.seqrelid
         WHERE c.relnamespace = 'pgbeat'::regnamespace
    """,
    "types": """
        SELECT t.typname AS name, t.typtype::text AS type
          FROM pg_type t
         WHERE t.typnamespace = 'pgbeat'::regnamespace
           AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.oid = t.typrelid AND c.relkind <> 'c')
           AND t.typcategory <> 'A'
    """,
    "views": """
        SELECT c.relname AS name, pg_get_viewdef(c.oid) AS definition
          FROM pg_class c WHERE c.relnamespace = 'pgbeat'::regnamespace AND c.relkind IN ('v', 'm')
    """,
    "triggers": """
        SELECT t.tgrelid::regclass::text AS relation, t.tgname AS name,
               pg_get_triggerdef(t.oid) AS definition, t.tgenabled::text AS enabled
          FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'pgbeat'::regnamespace AND NOT t.tgisinternal
    """,
}


def catalog(url: str) -> dict[str, list[tuple]]:
    """Every section's rows, sorted, for one database."""
    with psycopg.connect(url, autocommit=True) as conn:
        return {
            name: sorted(tuple(_hashable(v) for v in row) for row in conn.execute(query))
            for name, query in SECTIONS.items()
        }


def _hashable(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def diff(a: dict[str, list[tuple]], b: dict[str, list[tuple]]) -> list[str]:
    """What differs between two catalogs, one line per row found in only one of them."""
    lines = []
    for section in SECTIONS:
        only_a = sorted(set(a[section]) - set(b[section]))
        only_b = sorted(set(b[section]) - set(a[section]))
        lines += [f"{section}: only in the first: {row[:3]}" for row in only_a]
        lines += [f"{section}: only in the second: {row[:3]}" for row in only_b]
    return lines


# ---------------------------------------------------------------- what the schema files define

_DEFINITION = re.compile(
    r"^CREATE\s+(?:OR\s+REPLACE\s+)?(FUNCTION|PROCEDURE|VIEW|MATERIALIZED\s+VIEW|TRIGGER)\s+"
    r"(?:pgbeat\.)?(\w+)",
    re.IGNORECASE | re.MULTILINE,
)


def defined_in_schema_files() -> list[tuple[str, str, str]]:
    """(kind, name, file) for every CREATE of a function, view or trigger in sql/schema/."""
    found = []
    for path in migrations.schema_files():
        for match in _DEFINITION.finditer(path.read_text()):
            kind = "view" if "VIEW" in match.group(1).upper() else match.group(1).lower()
            kind = "function" if kind == "procedure" else kind
            found.append((kind, match.group(2), path.name))
    return found


def defined_in_database(url: str) -> list[tuple[str, str]]:
    """(kind, name) for every function, view and trigger of pgbeat in the database."""
    with psycopg.connect(url, autocommit=True) as conn:
        return sorted(
            conn.execute(
                """
                SELECT 'function', proname FROM pg_proc WHERE pronamespace = 'pgbeat'::regnamespace
                UNION ALL
                SELECT 'view', relname FROM pg_class
                 WHERE relnamespace = 'pgbeat'::regnamespace AND relkind IN ('v', 'm')
                UNION ALL
                SELECT 'trigger', t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
                 WHERE c.relnamespace = 'pgbeat'::regnamespace AND NOT t.tgisinternal
                """
            ).fetchall()
        )
