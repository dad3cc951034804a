"""Task kinds: one module per kind, each with `async def run(params, ctx) -> dict`.

A kind returns the run's result (a JSON object) or raises RunFailed(error, result)
for a run that failed. The worker enforces the task's timeout and records the
outcome; a kind does nothing but its own work. The module's name is the kind's
name: a new kind is one new file here (plus the kind in the database's checks).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp

from pgbeat.egress import HttpPolicy


class RunFailed(Exception):
    """The run failed: `error` says why, `result` is what it recorded anyway."""

    def __init__(self, error: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.result = result or {}


@dataclass(frozen=True)
class RunContext:
    """What a kind may know about the run it executes, and the worker's shared resources."""

    run_id: int
    task_id: int
    attempt: int
    scheduled_for: datetime
    timeout: float
    http: aiohttp.ClientSession
    http_policy: HttpPolicy | None = None  # None: the defaults (pgbeat.egress)


Kind = Callable[[dict[str, Any], RunContext], Awaitable[dict[str, Any]]]


def _discover() -> dict[str, Kind]:
    kinds: dict[str, Kind] = {}
    for module in pkgutil.iter_modules(__path__):
        kinds[module.name] = importlib.import_module(f"{__name__}.{module.name}").run
    return kinds


KINDS: dict[str, Kind] = _discover()


def get(name: str) -> Kind:
    """The kind called name; RunFailed if this worker does not know it."""
    try:
        return KINDS[name]
    except KeyError:
        raise RunFailed(f"unknown kind {name!r} (this worker knows {', '.join(sorted(KINDS))})") from None
