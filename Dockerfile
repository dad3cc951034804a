# syntax=docker/dockerfile:1
# One image for every pgbeat role: `api` (the default), `scheduler`, `worker`,
# `migrate` and `serve`. Pick the role with the container's command/args:
#   docker run pgbeat:dev worker --concurrency 32

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Stage 1: build the pgbeat wheel (SQL migrations included, under pgbeat/sql)
# and collect the wheels of every dependency declared in pyproject.toml.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip wheel --wheel-dir /wheels .

# Stage 2: the runtime, with only the installed wheels and no build tools.
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PGBEAT_LOG_FORMAT=json PGBEAT_DATA_DIR=/var/lib/pgbeat
RUN groupadd --system --gid 10001 pgbeat \
    && useradd --system --uid 10001 --gid pgbeat --home-dir /var/lib/pgbeat --create-home \
       --shell /usr/sbin/nologin pgbeat
# The wheel directory holds exactly one pgbeat build and its pinned dependencies.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels pgbeat
USER 10001:10001
WORKDIR /var/lib/pgbeat
EXPOSE 8000
# Slim images have no curl: ask the API's liveness endpoint with the standard library.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4); sys.exit(r.status != 200)"]
# Exec form: pgbeat is PID 1 and gets SIGTERM itself, so workers drain before they exit.
ENTRYPOINT ["pgbeat"]
CMD ["api", "--host", "0.0.0.0"]
