"""Migrations: apply, roll back, apply again; the schema comes back identical."""

import psycopg

from pgbeat import migrations

# Every migration, by file name (the rollbacks sit beside them).
NAMES = [p.stem for p in migrations.MIGRATIONS_DIR.glob("*.sql") if not p.stem.endswith(".rollback")]


def _schema(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """
            SELECT 'rel', c.relname, c.relkind::text, pg_get_viewdef(c.oid)
              FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pgbeat'
            UNION ALL
            SELECT 'con', conname, contype::text, pg_get_constraintdef(oid)
              FROM pg_constraint WHERE connamespace = 'pgbeat'::regnamespace
            UNION ALL
            SELECT 'fn', p.proname, pg_get_function_identity_arguments(p.oid), md5(p.prosrc)
              FROM pg_proc p WHERE p.pronamespace = 'pgbeat'::regnamespace
            UNION ALL
            SELECT 'trg', tgname, tgrelid::regclass::text, pg_get_triggerdef(oid)
              FROM pg_trigger WHERE NOT tgisinternal
            ORDER BY 1, 2, 3
            """
        ).fetchall()


def test_apply_is_idempotent_and_rollback_round_trips(db_url):
    before = _schema(db_url)
    assert any(row[1] == "claim_runs" for row in before)
    assert migrations.apply(db_url) == []  # already applied: a no-op
    assert migrations.pending(db_url) == []

    rolled_back = migrations.rollback(db_url)
    assert rolled_back == sorted(NAMES, reverse=True) and rolled_back[-1] == "0001_schema"
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT to_regnamespace('pgbeat')").fetchone() == (None,)
    assert migrations.pending(db_url)

    migrations.apply(db_url)
    assert _schema(db_url) == before
