"""The `pgbeat` command: daemons (serve, api, scheduler, worker), migrate, bench, and the REST client."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable

import uvloop

from pgbeat import logs
from pgbeat.config import Config


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[None]]) -> int:
    """Run main(stop) on a fresh uvloop loop (its transports and callbacks cost a fraction
    of asyncio's: the api's request rate, the worker's runs per second); SIGTERM/SIGINT
    set `stop` so the daemon drains and exits 0."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
        loop_runner.run(runner())
    return 0


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import db, migrations

    url = db.resolve_url(config)
    if args.rollback:
        done = migrations.rollback(url, count=args.count)
        print("rolled back: " + (", ".join(done) or "nothing"))
    else:
        done = migrations.apply(url)
        print("applied: " + (", ".join(done) or "nothing (schema is current)"))
    return 0


def cmd_scheduler(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import db, scheduler

    url = db.resolve_url(config)
    return run_until_signalled(lambda stop: scheduler.run_scheduler(url, config, stop))


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import db, worker

    url = db.resolve_url(config)
    return run_until_signalled(
        lambda stop: worker.run_worker(url, config, stop, concurrency=args.concurrency)
    )


def cmd_api(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import db
    from pgbeat.api import app

    url = db.resolve_url(config)
    return run_until_signalled(lambda stop: app.run_api(url, config, args.host, args.port, stop))


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import serve

    return serve.main(args, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgbeat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="api + scheduler + worker in one process (migrates first)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--concurrency", type=int, default=16, help="runs executed at once")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("api", help="the REST API")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("scheduler", help="turn due slots into runs")
    p.set_defaults(func=cmd_scheduler)

    p = sub.add_parser("worker", help="claim and execute runs")
    p.add_argument("--concurrency", type=int, default=16, help="runs executed at once")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("migrate", help="apply (or roll back) the SQL migrations")
    p.add_argument("--rollback", action="store_true", help="roll back instead of applying")
    p.add_argument("--count", type=int, default=None, help="with --rollback: how many (default all)")
    p.set_defaults(func=cmd_migrate)

    from pgbeat import bench, chaos, client

    bench.add_command(sub)
    chaos.add_command(sub)
    client.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = Config.from_env()
    logs.setup(config.log_format)
    try:
        return args.func(args, config)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
