"""Task kinds: one module per kind, and this package is the one list of them.

A kind's module declares everything about it, next to its code:

* `async def run(params, ctx) -> dict`: the work. It returns the run's result (a
  JSON object) or raises RunFailed(error, result) for a run that failed. The worker
  enforces the task's timeout and records the outcome.
* `PARAMS`: the params it accepts, each a Param (type, bounds, default). The
  database validates them (check_params, for the API and psql alike, Rule 10) and
  fills in the defaults; `pgbeat migrate` writes them to pgbeat.kinds.
* `COUNTS` (optional, default False): its finish behaviour. A counting kind's
  succeeded run adds params.step to the counter params.counter in the transaction
  that records it (finish_runs, Rule 4).

The module's name is the kind's name: a new kind is one new file here, then
`pgbeat migrate`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

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


@dataclass(frozen=True)
class Param:
    """One param a kind accepts, as the database checks it (sql/schema/20_tasks.sql, check_param):

    number   a JSON number within [minimum, maximum], kept as given
    integer  a whole number within [minimum, maximum], stored as an integer (2.0 -> 2)
    text     a string of 1 to max_length characters
    url      an http:// or https:// URL of at most max_length characters
    choice   one of choices, any case, stored upper-case
    boolean  true or false

    `default` is filled in when the param is absent (None: it stays absent)."""

    type: Literal["number", "integer", "text", "url", "choice", "boolean"]
    minimum: float | None = None
    maximum: float | None = None
    max_length: int | None = None
    choices: tuple[str, ...] = ()
    default: Any = None


@dataclass(frozen=True)
class KindSpec:
    name: str
    run: Kind
    params: dict[str, Param]
    counts: bool = False

    def declaration(self) -> dict[str, Any]:
        """The row pgbeat migrate writes to pgbeat.kinds (params in declaration order)."""
        params = [{"name": name, **_present(asdict(param))} for name, param in self.params.items()]
        return {"name": self.name, "params": params, "counts": self.counts}


def _present(values: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items() if v not in (None, ())}


def _discover() -> dict[str, KindSpec]:
    specs: dict[str, KindSpec] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        specs[info.name] = KindSpec(info.name, module.run, module.PARAMS, getattr(module, "COUNTS", False))
    return specs


SPECS: dict[str, KindSpec] = _discover()
KINDS: dict[str, Kind] = {name: spec.run for name, spec in SPECS.items()}


def names() -> list[str]:
    """Every kind's name, sorted."""
    return list(SPECS)


def declarations() -> list[dict[str, Any]]:
    """What pgbeat.kinds must hold: one row per kind."""
    return [spec.declaration() for spec in SPECS.values()]


def get(name: str) -> Kind:
    """The kind called name; RunFailed if this worker does not know it."""
    try:
        return KINDS[name]
    except KeyError:
        raise RunFailed(f"unknown kind {name!r} (this worker knows {', '.join(sorted(KINDS))})") from None
