"""The REST client behind `pgbeat task`, `pgbeat runs` and `pgbeat upcoming` (in progress)."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    return None
