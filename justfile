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

# --- Deployment (docker compose, kind) -------------------------------------

# docker compose: PostgreSQL, migrations, API on :8000, 2 schedulers, 3 workers (secrets from .env).
up:
    docker compose up --build --detach
    @echo "pgbeat API on http://localhost:8000 (key: PGBEAT_API_KEYS from .env, default pgbeat-dev-key)"

# Stop the compose stack (the database volume stays; `docker compose down -v` drops it).
down:
    docker compose down

# Follow the compose stack's logs (all services, or the ones named: just logs worker).
logs *SERVICES:
    docker compose logs --follow --tail=100 {{SERVICES}}

# kind: create the cluster, build and load the image, apply k8s/, wait, port-forward the API to :8000.
kind-up:
    #!/usr/bin/env bash
    set -euo pipefail
    ctx=kind-pgbeat
    existed=false
    if kind get clusters | grep -qx pgbeat; then existed=true; else kind create cluster --config k8s/kind-cluster.yaml; fi
    docker build -t pgbeat:dev .
    kind load docker-image pgbeat:dev --name pgbeat
    kubectl --context "$ctx" apply -k k8s
    if $existed; then kubectl --context "$ctx" -n pgbeat rollout restart deployment/api deployment/scheduler deployment/worker; fi
    kubectl --context "$ctx" -n pgbeat rollout status statefulset/postgres --timeout=300s
    for d in api scheduler worker; do kubectl --context "$ctx" -n pgbeat rollout status "deployment/$d" --timeout=300s; done
    echo "pgbeat API on http://localhost:8000 (Ctrl-C stops the port-forward; the cluster keeps running)"
    kubectl --context "$ctx" -n pgbeat port-forward service/api 8000:8000

# Delete the kind cluster and everything in it.
kind-down:
    kind delete cluster --name pgbeat

# The soak-and-chaos run: faults for DURATION seconds, then the invariant checker (exit 1 on a violation).
chaos DURATION="600":
    {{bin}}/pgbeat chaos --duration {{DURATION}}
