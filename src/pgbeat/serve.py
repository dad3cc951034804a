"""`pgbeat serve`: the api, the scheduler and a worker in one process and one asyncio
loop, for a laptop or a small installation. It migrates first. Without
PGBEAT_DATABASE_URL it runs on an embedded PostgreSQL in PGBEAT_DATA_DIR (default
./.pgbeat), whose data persists across restarts, and stops that server on exit.
SIGTERM or SIGINT stops every role cleanly (the worker drains), then it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from pgbeat import daemon, db, migrations
from pgbeat.config import Config

log = logging.getLogger("pgbeat.serve")


async def run_roles(url: str, config: Config, args: argparse.Namespace, stop: asyncio.Event) -> None:
    """Run api, scheduler and worker until stop; if one of them fails, stop the others
    and raise its error."""
    from pgbeat import scheduler, worker
    from pgbeat.api import app

    roles = {
        "api": app.run_api(url, config, args.host, args.port, stop),
        "scheduler": scheduler.run_scheduler(url, config, stop),
        "worker": worker.run_worker(url, config, stop, concurrency=args.concurrency),
    }
    tasks = [asyncio.create_task(coro, name=name) for name, coro in roles.items()]
    log.info(
        "serving",
        extra={"event": "serving", "api": f"http://{args.host}:{args.port}", "concurrency": args.concurrency},
    )
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        log.error("a role stopped on its own; stopping the others", extra={"event": "role_ended"})
        stop.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException):
            log.error(
                "%s failed",
                task.get_name(),
                extra={"event": "role_failed", "role": task.get_name(), "error": repr(result)},
            )
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        raise failures[0]


def main(args: argparse.Namespace, config: Config) -> int:
    # Until the event loop takes SIGTERM over, let it interrupt startup like ^C does,
    # so the embedded server started below is still stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    embedded = config.database_url is None
    if embedded:
        # One server per data directory: a second one must not touch the first one's
        # PostgreSQL (not even to stop it on its way out).
        try:
            data_dir_lock = db.claim_data_dir(config.data_dir)
        except db.DataDirInUse as exc:
            log.error("pgbeat serve: %s", exc, extra={"event": "data_dir_in_use"})
            print(f"pgbeat serve: {exc}", file=sys.stderr, flush=True)
            return 2
    try:
        url = db.resolve_url(config)
        if embedded:
            print(f"pgbeat: embedded PostgreSQL at {url}", flush=True)
        applied = migrations.apply(url)
        log.info("schema current", extra={"event": "migrated", "applied": applied})
        return daemon.run_until_signalled(lambda stop: run_roles(url, config, args, stop))
    except Exception:
        log.exception("pgbeat serve failed", extra={"event": "serve_failed"})
        return 1
    finally:
        if embedded:
            db.stop_embedded(config.data_dir)
            data_dir_lock.close()
