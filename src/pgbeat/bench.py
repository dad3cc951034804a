"""`pgbeat bench`: benchmarks that print their figures (filled in by the benchmarks work)."""

from __future__ import annotations

import argparse


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="run a benchmark scenario and print its figures")
    p.add_argument("scenario", nargs="?", help="burst, steady, latency, scale, idle or api")
    p.set_defaults(func=lambda args, config: print("no benchmark scenarios yet") or 1)
