"""sleep {"seconds": 2}: sleep, and record how long the sleep really took."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from pgbeat.kinds import Param, RunContext

PARAMS = {"seconds": Param("number", minimum=0, maximum=86400, default=1)}


async def run(params: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    seconds = float(params.get("seconds", PARAMS["seconds"].default))
    started = time.monotonic()
    await asyncio.sleep(seconds)
    return {"seconds": seconds, "slept_s": round(time.monotonic() - started, 6)}
