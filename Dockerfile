# syntax=docker/dockerfile:1
# One image for every pgbeat role: `serve` (the default: API, scheduler and worker
# in one process, on an embedded PostgreSQL in the /var/lib/pgbeat volume when
# PGBEAT_DATABASE_URL is unset), `api`, `scheduler`, `worker` and `migrate`
# (these need PGBEAT_DATABASE_URL). Pick the role with the container's command:
#   docker run -p 127.0.0.1:8000:8000 -v pgbeat-data:/var/lib/pgbeat pgbeat:dev
#   docker run -e PGBEAT_DATABASE_URL=... -e PGPASSWORD=... pgbeat:dev worker --concurrency 32

# An exact Python release, so a rebuild gets the same interpreter.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# Stage 1: a virtualenv with the locked dependencies (their own layer, rebuilt only
# when requirements.lock changes), then pgbeat itself (SQL files included, under pgbeat/sql).
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/pgbeat
WORKDIR /src
COPY requirements.lock ./
# Every dependency pinned to an exact version and verified against its hashes.
RUN /opt/pgbeat/bin/pip install --require-hashes --only-binary=:all: -r requirements.lock
COPY pyproject.toml README.md ./
COPY src ./src
# The dependencies are installed above: pgbeat alone, from this source tree.
# hadolint ignore=DL3013
RUN /opt/pgbeat/bin/pip install --no-deps .

# Stage 2: the runtime, with the virtualenv and no build tools.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/pgbeat/bin:$PATH \
    PGBEAT_LOG_FORMAT=json PGBEAT_DATA_DIR=/var/lib/pgbeat
RUN groupadd --system --gid 10001 pgbeat \
    && useradd --system --uid 10001 --gid pgbeat --home-dir /var/lib/pgbeat --create-home \
       --shell /usr/sbin/nologin pgbeat
COPY --from=build /opt/pgbeat /opt/pgbeat
USER 10001:10001
WORKDIR /var/lib/pgbeat
# `serve`'s embedded PostgreSQL keeps its data here; mount a volume to keep it.
VOLUME ["/var/lib/pgbeat"]
# 8000: the API. 9100: a scheduler's or worker's /health and /metrics (PGBEAT_METRICS_PORT).
EXPOSE 8000 9100
# Slim images have no curl: ask the API's liveness endpoint with the standard library.
# Roles without the API (scheduler, worker) set their own healthcheck on port 9100.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4); sys.exit(r.status != 200)"]
# Exec form: pgbeat is PID 1 and gets SIGTERM itself, so workers drain before they exit.
ENTRYPOINT ["pgbeat"]
# Listen on every interface of the container: `-p 127.0.0.1:8000:8000` decides who reaches it.
CMD ["serve", "--host", "0.0.0.0"]
