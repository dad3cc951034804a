"""Apply and roll back the SQL migrations in sql/migrations with yoyo."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from yoyo import get_backend, read_migrations

MIGRATIONS_DIR = Path(__file__).parent / "sql" / "migrations"


def yoyo_url(url: str) -> str:
    """yoyo picks its driver from the URL scheme: use psycopg 3."""
    parts = urlsplit(url)
    if parts.scheme in ("postgres", "postgresql"):
        parts = parts._replace(scheme="postgresql+psycopg")
    return urlunsplit(parts)


def apply(url: str) -> list[str]:
    """Apply pending migrations under yoyo's lock (safe when replicas start together).
    Returns the ids applied; applying twice is a no-op."""
    backend = get_backend(yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        todo = backend.to_apply(migrations)
        backend.apply_migrations(todo)
    return [m.id for m in todo]


def rollback(url: str, count: int | None = None) -> list[str]:
    """Roll back applied migrations, newest first (all of them unless count is given)."""
    backend = get_backend(yoyo_url(url))
    migrations = read_migrations(str(MIGRATIONS_DIR))
    with backend.lock():
        todo = backend.to_rollback(migrations)
        if count is not None:
            todo = todo[:count]
        backend.rollback_migrations(todo)
    return [m.id for m in todo]


def pending(url: str) -> list[str]:
    """Migrations not yet applied (readiness: the schema is current when empty)."""
    backend = get_backend(yoyo_url(url))
    return [m.id for m in backend.to_apply(read_migrations(str(MIGRATIONS_DIR)))]
