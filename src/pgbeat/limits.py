"""The limits every task obeys (README "Limits"), checked by the API before it calls
the database, which checks them again for psql users (sql/: parse_timestamp,
parse_duration, check_params)."""

from __future__ import annotations

from datetime import UTC, datetime

# Times accepted anywhere (at, start, until, query filters): far enough inside
# PostgreSQL's and Python's ranges that no time-zone shift or interval added to a
# stored time leaves them (Python's datetime ends at 9999-12-31).
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(9000, 1, 1, tzinfo=UTC)
MIN_INTERVAL_SECONDS = 1.0  # default of PGBEAT_MIN_INTERVAL
MIN_INTERVAL_FLOOR = 0.1  # the lowest it may be set to (the tasks_every_floor constraint)
MAX_PARAMS_DEPTH = 32  # nesting of objects and arrays in params
MAX_PARAMS_BYTES = 16 * 1024  # params as JSON
MAX_BODY_BYTES = 64 * 1024  # a request body


def time_problem(moment: datetime) -> str | None:
    """Why moment is outside the accepted range, or None."""
    try:
        if EARLIEST <= moment.astimezone(UTC) < LATEST:
            return None
    except (OverflowError, ValueError):
        pass
    return f"must be from {EARLIEST:%Y-%m-%d} up to (not including) {LATEST:%Y-%m-%d} (UTC)"


def json_depth(value: object) -> int:
    """How deeply objects and arrays nest in value (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def nul_field(value: object, path: str) -> str | None:
    """The path of the first string (or key) in value holding a NUL character, which
    PostgreSQL cannot store; None if there is none."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return where
        elif isinstance(item, dict):
            for key, child in item.items():
                child_path = f"{where}.{key}" if where else str(key)
                if isinstance(key, str) and "\x00" in key:
                    return where or "body"
                stack.append((child, child_path))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(item))
    return None
