# pgbeat tasks. `just --list` shows them all.

set dotenv-load := false

venv := ".venv"
bin := venv + "/bin"

# Show the recipes.
default:
    @just --list

# Create the virtualenv and install pgbeat with its dev tools.
install:
    test -x {{bin}}/python || python3 -m venv {{venv}}
    {{bin}}/pip install -q -e '.[dev]'

# Run the whole test suite (lint first), as CI does.
test *ARGS: lint
    {{bin}}/pytest {{ARGS}}

# Check formatting and lint with ruff.
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .

# Format the code and apply ruff's safe fixes.
fmt:
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# Apply the SQL migrations to PGBEAT_DATABASE_URL (or the embedded server).
migrate *ARGS:
    {{bin}}/pgbeat migrate {{ARGS}}

# api + scheduler + worker in one process (embedded PostgreSQL without PGBEAT_DATABASE_URL).
serve *ARGS:
    {{bin}}/pgbeat serve {{ARGS}}

# Open psql on the configured database (PGBEAT_DATABASE_URL, else the embedded server).
psql:
    #!/usr/bin/env bash
    set -euo pipefail
    url="${PGBEAT_DATABASE_URL:-$({{bin}}/python -c 'from pgbeat import db; from pgbeat.config import Config; print(db.resolve_url(Config.from_env()))' | tail -1)}"
    exec psql "$url"

# Run a benchmark scenario: burst, steady, latency, scale, idle or api.
bench *ARGS:
    {{bin}}/pgbeat bench {{ARGS}}
