"""counter {"counter"?: name, "step"?: 1, "seconds"?: 0}: the increment is the database's.

pgbeat.finish_runs adds `step` to the counter in the same transaction that records
the run as succeeded (Rule 4), and fills the result with the new value, so the
counter always equals the sum of its succeeded runs' steps. Here there is nothing
to do but take `seconds` (work whose completion is counted) and succeed: a run
that times out, is cancelled or loses its worker meanwhile moves no counter, and
an increment made here could commit without its run, or twice.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pgbeat.kinds import Param, RunContext

# Without "counter", the counter is named "task:<id>".
PARAMS = {
    "counter": Param("text", max_length=200),
    "step": Param("integer", minimum=-1e9, maximum=1e9, default=1),
    "seconds": Param("number", minimum=0, maximum=86400),  # how long the counted work takes
}
COUNTS = True


async def run(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    seconds = float(params.get("seconds", 0))
    if seconds > 0:
        await asyncio.sleep(seconds)
    return {}
