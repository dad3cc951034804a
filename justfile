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

# The tests that start no pgbeat process (lint first), on every core: about a minute, while you work.
test-fast *ARGS: lint
    {{bin}}/pytest -m "not slow" -n auto {{ARGS}}

# Check formatting and lint with ruff.
lint:
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .

# Format the code and apply ruff's safe fixes.
fmt:
    {{bin}}/ruff format .
    {{bin}}/ruff check --fix .

# Apply the SQL migrations to PGBEAT_DATABASE_URL.
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

# Run a benchmark scenario (`pgbeat bench --help` lists them): burst, steady, latency, scale, idle, api, history, ui.
bench *ARGS:
    {{bin}}/pgbeat bench {{ARGS}}

# --- Deployment (docker compose, kind, minikube) ------------------------------

# Pin the dependencies the image installs (requirements.lock, with hashes) to what pyproject.toml allows.
lock:
    {{bin}}/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --no-header --quiet -o requirements.lock.new
    (head -2 requirements.lock; cat requirements.lock.new) > requirements.lock.tmp && rm requirements.lock.new && mv requirements.lock.tmp requirements.lock

# Write .env (compose) and k8s/base/secrets/*.env (kustomize) with random secrets, where missing.
secrets:
    #!/usr/bin/env bash
    set -euo pipefail
    rand() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
    if [ ! -f .env ]; then
        printf 'PGBEAT_API_KEYS=%s\nPGBEAT_DB_PASSWORD=%s\nPOSTGRES_PASSWORD=%s\n' "$(rand)" "$(rand)" "$(rand)" > .env
        echo "wrote .env (API key: PGBEAT_API_KEYS in it)"
    fi
    dir=k8s/base/secrets
    [ -f $dir/db.env ] || printf 'username=pgbeat\npassword=%s\n' "$(rand)" > $dir/db.env
    [ -f $dir/api.env ] || printf 'PGBEAT_API_KEYS=%s\n' "$(rand)" > $dir/api.env
    [ -f $dir/postgres.env ] || printf 'POSTGRES_PASSWORD=%s\n' "$(rand)" > $dir/postgres.env

# docker compose: PostgreSQL, migrations, API on 127.0.0.1:8000, 2 schedulers, 3 workers (secrets from .env).
up: secrets
    docker compose up --build --detach
    @echo "pgbeat API on http://127.0.0.1:8000 (key: PGBEAT_API_KEYS in .env)"

# Stop the compose stack (the database volume stays; `docker compose down -v` drops it).
down:
    docker compose down

# Follow the compose stack's logs (all services, or the ones named: just logs worker).
logs *SERVICES:
    docker compose logs --follow --tail=100 {{SERVICES}}

# Roll the pgbeat Deployments of a cluster that already ran, and wait for everything.
[private]
k8s-wait CONTEXT:
    kubectl --context "{{CONTEXT}}" -n pgbeat rollout status statefulset/postgres --timeout=300s
    for d in api scheduler worker; do kubectl --context "{{CONTEXT}}" -n pgbeat rollout status "deployment/$d" --timeout=300s; done

# kind: create the cluster, build and load the image, apply k8s/, wait, port-forward the API to :8000.
kind-up: secrets
    #!/usr/bin/env bash
    set -euo pipefail
    ctx=kind-pgbeat
    existed=false
    if kind get clusters | grep -qx pgbeat; then existed=true; else kind create cluster --config k8s/kind-cluster.yaml; fi
    docker build -t pgbeat:dev .
    # An archive loads under every Docker image store (`kind load docker-image`
    # fails under the containerd one).
    archive="$(mktemp -d)/pgbeat.tar"
    docker save pgbeat:dev -o "$archive"
    kind load image-archive "$archive" --name pgbeat
    rm -rf "$(dirname "$archive")"
    kubectl --context "$ctx" apply -k k8s
    if $existed; then kubectl --context "$ctx" -n pgbeat rollout restart deployment/api deployment/scheduler deployment/worker; fi
    {{just_executable()}} k8s-wait "$ctx"
    echo "pgbeat API on http://localhost:8000 (Ctrl-C stops the port-forward; the cluster keeps running)"
    kubectl --context "$ctx" -n pgbeat port-forward service/api 8000:8000

# Delete the kind cluster and everything in it.
kind-down:
    kind delete cluster --name pgbeat

# minikube: start a profile, build the image inside it, apply k8s/, wait, port-forward the API to :8000.
minikube-up: secrets
    #!/usr/bin/env bash
    set -euo pipefail
    minikube start --profile pgbeat --nodes 3 --kubernetes-version v1.31.2
    minikube --profile pgbeat image build --all -t pgbeat:dev .
    kubectl --context pgbeat apply -k k8s
    kubectl --context pgbeat -n pgbeat rollout restart deployment/api deployment/scheduler deployment/worker
    {{just_executable()}} k8s-wait pgbeat
    echo "pgbeat API on http://localhost:8000 (Ctrl-C stops the port-forward; the cluster keeps running)"
    kubectl --context pgbeat -n pgbeat port-forward service/api 8000:8000

# Delete the minikube profile and everything in it.
minikube-down:
    minikube delete --profile pgbeat

# The soak-and-chaos run: faults for DURATION seconds, then the invariant checker (exit 1 on a violation).
chaos DURATION="600":
    {{bin}}/pgbeat chaos --duration {{DURATION}}

# Plant each known bug in a scratch copy; its tests and a DURATION-second chaos run must each catch it.
mutants DURATION="15" *ARGS:
    {{bin}}/python -m pgbeat_lab.mutants --duration {{DURATION}} {{ARGS}}
