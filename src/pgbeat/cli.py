"""The `pgbeat` command: daemons (serve, api, scheduler, worker), migrate, bench, and the REST client."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Awaitable

from pgbeat import __version__, logs
from pgbeat.config import Config

# The tooling beside the product: `pgbeat bench` and `pgbeat chaos` hand their arguments
# to a module of pgbeat_lab, imported only when one of them runs, so that the daemons
# and the api never load it.
LAB_COMMANDS = {
    "bench": ("run a benchmark scenario and print its figures", "pgbeat_lab.bench"),
    "chaos": ("the soak-and-chaos run and its invariant checker", "pgbeat_lab.chaos"),
}


def require_database_url(config: Config, role: str) -> str:
    """The roles meant to run beside others (api, scheduler, worker, migrate) share one
    database, so each needs it named: an embedded server of their own would be a silent
    island (healthy, never migrated, or migrated where nobody reads). Only `serve`, which
    runs every role in one process, may start one."""
    if config.database_url:
        return config.database_url
    raise SystemExit(
        f"pgbeat {role}: PGBEAT_DATABASE_URL is not set. Set it to the shared database, e.g.\n"
        "  PGBEAT_DATABASE_URL=postgresql://pgbeat@db.example:5432/pgbeat  (password in PGPASSWORD)\n"
        "or run `pgbeat serve`, which starts an embedded PostgreSQL when no URL is set."
    )


def cmd_migrate(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import db, migrations

    url = require_database_url(config, "migrate")
    # PID 1 in a container ignores a signal it has no handler for: make SIGTERM
    # interrupt like ^C, so psycopg cancels the statement in flight, the transaction
    # rolls back, and the session (and its migration lock) ends with the process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.wait:
        db.wait_for_database(url, args.wait)
    if args.rollback:
        done = migrations.rollback(url, count=args.count)
        print("rolled back: " + (", ".join(done) or "nothing"))
    else:
        done = migrations.apply(url, reapply_schema=args.reapply_schema)
        print("applied: " + (", ".join(done) or "nothing (schema is current)"))
    return 0


def cmd_scheduler(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import daemon, scheduler

    url = require_database_url(config, "scheduler")
    return daemon.run_until_signalled(
        lambda stop: with_metrics_endpoint(args, config, scheduler.run_scheduler(url, config, stop))
    )


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import daemon, worker

    url = require_database_url(config, "worker")
    return daemon.run_until_signalled(
        lambda stop: with_metrics_endpoint(
            args, config, worker.run_worker(url, config, stop, concurrency=args.concurrency)
        )
    )


async def with_metrics_endpoint(args: argparse.Namespace, config: Config, main: Awaitable[None]) -> None:
    """Run a daemon with /health and /metrics on --metrics-port (PGBEAT_METRICS_PORT)."""
    from pgbeat import metrics

    port = config.metrics_port if args.metrics_port is None else args.metrics_port
    async with metrics.endpoint(port):
        await main


def cmd_api(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import daemon
    from pgbeat.api import app

    url = require_database_url(config, "api")
    return daemon.run_until_signalled(lambda stop: app.run_api(url, config, args.host, args.port, stop))


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from pgbeat import serve

    return serve.main(args, config)


def cmd_lab(args: argparse.Namespace, config: Config) -> int:
    _, module = LAB_COMMANDS[args.command]
    return importlib.import_module(module).main(args.lab_argv, config)


SYNOPSIS = """\
pgbeat runs tasks on schedules (every N seconds, once, or cron) and keeps every
coordination rule in PostgreSQL: run any number of schedulers and workers.

daemons:
  pgbeat serve [--host H] [--port P]     api + scheduler + worker in one process
  pgbeat api | scheduler | worker        one role per process, for production
  pgbeat migrate [--rollback]            bring the database's schema up to date

client (talks to the API at PGBEAT_URL):
  pgbeat task add KIND --every|--at|--in|--cron WHEN [options]
  pgbeat task ls | show ID | update ID | pause ID | resume ID | trigger ID | rm ID
  pgbeat runs [--task ID] [--state S] [--since T] [--follow] | runs show ID
  pgbeat upcoming [--task ID] [--watch]
  pgbeat status [--watch]
  pgbeat completion bash|zsh
"""

ENVIRONMENT = """\
environment:
  PGBEAT_DATABASE_URL   the database (default: an embedded PostgreSQL in PGBEAT_DATA_DIR)
  PGBEAT_DATA_DIR       the embedded PostgreSQL's directory (default: ./.pgbeat)
  PGBEAT_URL            the API, for the client commands (default: http://127.0.0.1:8000)
  PGBEAT_API_KEY        the client's key; PGBEAT_API_KEYS: the keys the API accepts
  PGBEAT_LOG_FORMAT     text or json (default: text on a terminal, else json)
  NO_COLOR              set: the client prints no colour

exit status: 0 done, 1 the request failed (the reason on stderr), 2 a usage error.

examples:
  pgbeat serve
  pgbeat task add sleep --every 30s --param seconds=2
  pgbeat runs --follow
  pgbeat task ls --json | jq .name

`pgbeat COMMAND --help` describes a command; README.md describes everything."""


def build_parser() -> argparse.ArgumentParser:
    from pgbeat import argv, client

    parser = argv.Parser(prog="pgbeat", description=SYNOPSIS, epilog=ENVIRONMENT)
    parser.add_argument("--version", action="version", version=f"pgbeat {__version__}")
    client.global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def daemon(name: str, help_text: str, *example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
            epilog=client.examples(*example),
        )  # fmt: skip

    p = daemon(
        "serve",
        "api + scheduler + worker in one process; migrates first, and without PGBEAT_DATABASE_URL"
        " starts an embedded PostgreSQL in PGBEAT_DATA_DIR (default ./.pgbeat)",
        "pgbeat serve",
        "pgbeat serve --host 0.0.0.0 --port 9000 --concurrency 32",
        "PGBEAT_DATA_DIR=~/pgbeat-data pgbeat serve",
    )
    p.add_argument("--host", default="127.0.0.1", help="the API's address")
    p.add_argument("--port", type=int, default=8000, help="the API's port")
    p.add_argument("--concurrency", type=int, default=16, help="runs the worker executes at once")
    p.set_defaults(func=cmd_serve)

    p = daemon("api", "the REST API (any number of replicas)", "pgbeat api --host 0.0.0.0 --port 8000")
    p.add_argument("--host", default="0.0.0.0", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.set_defaults(func=cmd_api)

    metrics_help = "port of /health and /metrics (default PGBEAT_METRICS_PORT, else 9100; 0: none)"
    p = daemon("scheduler", "turn due slots into runs (any number of replicas)", "pgbeat scheduler")
    p.add_argument("--metrics-port", type=int, default=None, help=metrics_help)
    p.set_defaults(func=cmd_scheduler)

    p = daemon("worker", "claim and execute runs (any number of replicas)", "pgbeat worker --concurrency 32")
    p.add_argument("--concurrency", type=int, default=16, help="runs executed at once")
    p.add_argument("--metrics-port", type=int, default=None, help=metrics_help)
    p.set_defaults(func=cmd_worker)

    p = daemon(
        "migrate",
        "apply (or roll back) the SQL migrations",
        "pgbeat migrate",
        "pgbeat migrate --rollback --count 1",
    )
    p.add_argument("--rollback", action="store_true", help="roll back instead of applying (default: apply)")
    p.add_argument("--count", type=int, default=None, help="with --rollback: how many (default: all)")
    p.add_argument(
        "--reapply-schema",
        action="store_true",
        help="run the schema files even if the database holds them (undoes changes made by hand)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="wait up to SECONDS for the database to accept connections, retrying with backoff",
    )
    p.set_defaults(func=cmd_migrate)

    for name, (help_text, _) in LAB_COMMANDS.items():
        # No options of its own (prefix_chars matches none): every argument is left for the lab's parser.
        p = sub.add_parser(name, help=help_text, add_help=False, prefix_chars="\0")
        p.set_defaults(func=cmd_lab)

    client.add_commands(sub)
    parser.set_defaults(root_parser=parser)  # `pgbeat completion` walks every command
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in LAB_COMMANDS:
        parser.error("unrecognized arguments: " + " ".join(rest))
    args.lab_argv = rest
    args.argv_shown = list(sys.argv[1:] if argv is None else argv)
    config = Config.from_env()
    logs.setup(config.log_format)
    try:
        return args.func(args, config)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
