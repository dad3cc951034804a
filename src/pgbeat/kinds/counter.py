"""counter {"counter"?: name, "step"?: 1}: the increment is the database's.

pgbeat.finish_runs adds `step` to the counter in the same transaction that records
the run as succeeded (Rule 4), and fills the result with the new value, so
the counter always equals succeeded runs times step. Here there is nothing to do
but succeed: an increment made here could commit without its run, or twice.
"""

from __future__ import annotations

from typing import Any

from pgbeat.kinds import Param, RunContext

# Without "counter", the counter is named "task:<id>".
PARAMS = {
    "counter": Param("text", max_length=200),
    "step": Param("integer", minimum=-1e9, maximum=1e9, default=1),
}
COUNTS = True


async def run(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    return {}
