"""Peers measured beside pgbeat in one bench run (`pgbeat bench burst|latency --peer pgqueuer`).

Each peer runs in a process of its own, on a fresh database of the same server, so
that it pays for its own process as pgbeat's worker does. PgQueuer comes with the
`bench` extra (`pip install -e '.[bench]'`); it is never a runtime dependency.

* burst: N no-op jobs enqueued in bulk, then one PgQueuer worker (`batch_size` 100)
  drains them: jobs/s from the worker's start to its last job done.
* latency: one worker runs continuously; the bench enqueues a job every 10 ms from its
  own process: enqueue -> start is the job's `created` (the database's clock at
  enqueue) to the moment its entrypoint starts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from typing import Any

PEERS = ("pgqueuer",)


def installed(peer: str) -> bool:
    try:
        __import__(peer)
    except ImportError:
        return False
    return True


def require(peer: str) -> None:
    if peer not in PEERS:
        raise SystemExit(f"pgbeat bench: unknown peer {peer!r} (known: {', '.join(PEERS)})")
    if not installed(peer):
        raise SystemExit(f"pgbeat bench: --peer {peer} needs the bench extra: pip install -e '.[bench]'")


async def _install(url: str) -> None:
    import asyncpg
    from pgqueuer import Queries

    conn = await asyncpg.connect(url)
    try:
        await Queries.from_asyncpg_connection(conn).install()
    finally:
        await conn.close()


async def _enqueue_bulk(url: str, jobs: int) -> None:
    import asyncpg
    from pgqueuer import Queries

    conn = await asyncpg.connect(url)
    try:
        queries = Queries.from_asyncpg_connection(conn)
        for start in range(0, jobs, 5_000):
            count = min(5_000, jobs - start)
            await queries.enqueue(["noop"] * count, [None] * count, [0] * count)
    finally:
        await conn.close()


async def _drain(url: str, batch_size: int) -> dict[str, Any]:
    """The worker side of burst: drain the queue; the seconds from start to empty."""
    import asyncpg
    from pgqueuer import Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    done = 0

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        nonlocal done
        done += 1

    started = time.perf_counter()
    await qm.run(batch_size=batch_size, mode=QueueExecutionMode.drain)
    seconds = time.perf_counter() - started
    await conn.close()
    return {"jobs": done, "seconds": seconds}


async def _serve(url: str, jobs: int, batch_size: int) -> dict[str, Any]:
    """The worker side of latency: run until `jobs` jobs started; enqueue -> start of each."""
    import asyncpg
    from pgqueuer import Queries, QueueManager

    conn = await asyncpg.connect(url)
    qm = QueueManager(Queries.from_asyncpg_connection(conn))
    latencies: list[float] = []

    @qm.entrypoint("noop")
    async def noop(job: Any) -> None:
        latencies.append((datetime.now(UTC) - job.created).total_seconds() * 1000)
        if len(latencies) >= jobs:
            qm.shutdown.set()

    print("ready", flush=True)
    await qm.run(batch_size=batch_size)
    await conn.close()
    return {"jobs": len(latencies), "latencies_ms": latencies}


def pgqueuer_burst(url: str, jobs: int, batch_size: int = 100) -> dict[str, Any]:
    """Enqueue `jobs` no-op jobs, drain them with a PgQueuer worker process; jobs/s."""
    asyncio.run(_install(url))
    asyncio.run(_enqueue_bulk(url, jobs))
    cmd = [sys.executable, "-m", "pgbeat_lab.peers", "drain", url, "--batch-size", str(batch_size)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    result = json.loads(out.splitlines()[-1])
    result["jobs_per_s"] = result["jobs"] / result["seconds"] if result["seconds"] else None
    return result


def pgqueuer_latency(url: str, seconds: float, every: float = 0.010, batch_size: int = 100) -> list[float]:
    """A PgQueuer worker process runs while this process enqueues a job every `every` s."""
    import asyncpg
    from pgqueuer import Queries

    asyncio.run(_install(url))
    jobs = max(1, round(seconds / every))
    cmd = [sys.executable, "-m", "pgbeat_lab.peers", "serve", url, "--jobs", str(jobs)]
    cmd += ["--batch-size", str(batch_size)]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None
        if worker.stdout.readline().strip() != "ready":
            raise RuntimeError("the PgQueuer worker did not start")
        time.sleep(1.0)  # its LISTEN is set up once run() starts

        async def produce() -> None:
            conn = await asyncpg.connect(url)
            queries = Queries.from_asyncpg_connection(conn)
            began = time.monotonic()
            for i in range(jobs):
                await asyncio.sleep(max(0.0, began + i * every - time.monotonic()))
                await queries.enqueue("noop", None)
            await conn.close()

        asyncio.run(produce())
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    return json.loads(out.splitlines()[-1])["latencies_ms"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pgbeat_lab.peers", description="A PgQueuer worker process.")
    p.add_argument("mode", choices=["drain", "serve"])
    p.add_argument("url")
    p.add_argument("--jobs", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    args = p.parse_args(argv)
    import uvloop  # the event loop pgbeat's daemons run on: neither side gets a faster one

    if args.mode == "drain":
        result = uvloop.run(_drain(args.url, args.batch_size))
    else:
        result = uvloop.run(_serve(args.url, args.jobs, args.batch_size))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
