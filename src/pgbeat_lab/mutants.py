"""Planted bugs that the tests and the chaos run must each catch (`just mutants`).

Each mutant breaks one rule of RULES.md with a small textual patch (exact
search/replace on a file; the text must occur exactly once, so a mutant that no
longer applies fails loudly instead of testing nothing). One at a time, the
harness copies the repository's src/, tests/ and pyproject.toml to a scratch
directory, applies the patch there, and runs with the scratch copy first on the
import path (PYTHONPATH, inherited by every process the tests and the chaos run
start):

* the mutant's own tests (a few named ones, so it stays fast): caught when pytest
  reports a failure;
* a short chaos run: caught when an invariant reports a violation.

It prints a table (mutant / rule / caught by tests / caught by chaos) and exits
1 unless every mutant was caught by both. CONTRIBUTING.md says how to add one.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COPIED = ("src", "tests", "pyproject.toml")
SCHEMA = "src/pgbeat/sql/schema"
CLAIMS_TESTS = "tests/test_sql_claims.py"
SCHEDULING_TESTS = "tests/test_sql_scheduling.py"
WORKER_TESTS = "tests/test_worker.py"
API_TESTS = "tests/test_api.py"


@dataclass(frozen=True)
class Edit:
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str


@dataclass(frozen=True)
class Mutant:
    name: str
    rule: int  # the RULES.md rule it breaks
    bug: str
    edits: tuple[Edit, ...]
    tests: tuple[str, ...]  # pytest node ids that must catch it


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "claim_ignores_the_lock",
        2,
        "claim_runs takes a run whatever pg_try_advisory_lock answers",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "CONTINUE WHEN NOT pg_try_advisory_lock(pgbeat.task_lock_ns(), c.task_id);",
                "PERFORM pg_try_advisory_lock(pgbeat.task_lock_ns(), c.task_id);",
            ),
        ),
        (
            f"{CLAIMS_TESTS}::test_a_claim_of_a_task_locked_elsewhere_gets_nothing_for_it_and_takes_no_lock",
            f"{CLAIMS_TESTS}::test_a_run_whose_lock_is_held_is_never_reaped_however_old",
        ),
    ),
    Mutant(
        "counter_moves_whatever_the_outcome",
        4,
        "finish_runs increments the counter of a failed, timed-out or cancelled run too",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "k.counts AND u.state = 'succeeded' AS counts",
                "k.counts AS counts",
            ),
        ),
        (f"{CLAIMS_TESTS}::test_a_counter_run_that_does_not_succeed_moves_no_counter",),
    ),
    Mutant(
        "counter_moves_at_claim",
        4,
        "the counter is incremented when its run is claimed, not when it succeeds",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "    RETURN QUERY\n    WITH started AS (",
                "    INSERT INTO pgbeat.counters AS k (name, value)\n"
                "    SELECT coalesce(t.params->>'counter', 'task:' || t.id),\n"
                "           coalesce((t.params->>'step')::bigint, 1)\n"
                "      FROM pgbeat.runs r JOIN pgbeat.tasks t ON t.id = r.task_id\n"
                "     WHERE r.id = ANY (run_ids) AND r.kind = 'counter'\n"
                "    ON CONFLICT (name) DO UPDATE SET value = k.value + excluded.value;\n"
                "    RETURN QUERY\n    WITH started AS (",
            ),
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "SELECT m.counter_name, sum(m.step)::bigint FROM mine m",
                "SELECT m.counter_name, 0::bigint FROM mine m",
            ),
        ),
        (
            f"{CLAIMS_TESTS}::test_a_counter_run_that_does_not_succeed_moves_no_counter",
            f"{CLAIMS_TESTS}::test_a_killed_session_holding_a_counter_run_moves_no_counter",
        ),
    ),
    Mutant(
        "reaper_abandons_old_runs",
        5,
        "reap_abandoned_runs abandons runs older than 2 s although their lock is held",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "         WHERE r.state = 'running'\n           AND NOT EXISTS",
                "         WHERE r.state = 'running' AND r.started_at < now() - interval '2 s'\n"
                "            OR r.state = 'running' AND NOT EXISTS",
            ),
        ),
        (f"{CLAIMS_TESTS}::test_a_run_whose_lock_is_held_is_never_reaped_however_old",),
    ),
    Mutant(
        "no_unique_slot",
        1,
        "the unique (task, slot, attempt) constraint is dropped",
        (
            Edit(
                "src/pgbeat/sql/migrations/0007_runs_by_day.sql",
                "ADD CONSTRAINT runs_one_per_slot UNIQUE (task_id, scheduled_for, attempt),",
                "ADD CONSTRAINT runs_one_per_slot CHECK (true),",
            ),
        ),
        (f"{SCHEDULING_TESTS}::test_racing_schedulers_on_a_duplicate_slot_insert_nothing",),
    ),
    Mutant(
        "grid_from_now",
        7,
        "the next interval slot is computed from now() instead of the anchor's grid",
        (
            Edit(
                f"{SCHEMA}/30_scheduling.sql",
                "pgbeat.grid_slot_after(tk.anchor, tk.every, horizon)",
                "horizon + tk.every",
            ),
            Edit(
                f"{SCHEMA}/30_scheduling.sql",
                "nxt := pgbeat.grid_slot_after(t.anchor, t.every, now());",
                "nxt := now() + t.every;",
            ),
        ),
        (f"{SCHEDULING_TESTS}::test_interval_slots_stay_on_the_grid_when_materialised_late",),
    ),
    Mutant(
        "skip_policy_queues",
        8,
        "a skip-policy task's slot that falls due while its run is running is queued, not skipped",
        (
            Edit(
                f"{SCHEMA}/30_scheduling.sql",
                "ELSIF pending_id IS NOT NULL OR (is_running AND t.overlap_policy = 'skip') THEN",
                "ELSIF pending_id IS NOT NULL THEN",
            ),
        ),
        (f"{SCHEDULING_TESTS}::test_skip_policy_records_a_skipped_run_for_each_overlapping_slot",),
    ),
    Mutant(
        "claim_before_due",
        9,
        "claim_runs takes pending runs up to a second before they are due",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "WHERE r.state = 'pending' AND r.due_at <= now()\n",
                "WHERE r.state = 'pending' AND r.due_at <= now() + interval '1 s'\n",
            ),
        ),
        (
            f"{SCHEDULING_TESTS}::test_a_plain_slot_is_materialised_ahead_and_claimable_only_at_its_slot",
            f"{CLAIMS_TESTS}::test_failed_runs_are_retried_with_backoff",
        ),
    ),
    Mutant(
        "refused_change_writes_its_name",
        10,
        "a change's new name is written, in its own transaction, before the rest of the change is checked",
        (
            Edit(
                "src/pgbeat/api/routes.py",
                "    doc, first_slot = spec_for_sql(changes, given)\n",
                "    if isinstance(changes.name, str):  # the name first, the rest checked after\n"
                '        await pool.execute("UPDATE pgbeat.tasks SET name = $1 WHERE id = $2",\n'
                "                           changes.name, task_id)\n"
                "    doc, first_slot = spec_for_sql(changes, given)\n",
            ),
        ),
        (f"{API_TESTS}::test_a_refused_change_writes_none_of_its_valid_fields",),
    ),
    Mutant(
        "prune_keeps_everything",
        13,
        "the daemons pass their retention in ms: only what is 1000 retentions old goes",
        (
            Edit(
                "src/pgbeat/maintenance.py",
                "        retention = self.retention_days * 86400\n",
                "        retention = self.retention_days * 86400 * 1000\n",
            ),
        ),
        ("tests/test_maintenance.py::test_maintenance_heartbeats_reaps_and_prunes_at_its_first_turn",),
    ),
    Mutant(
        "finish_sets_nothing_aside",
        17,
        "a counter run whose params cannot count fails, but its task is not set aside: it keeps firing",
        (
            Edit(
                f"{SCHEMA}/40_claims.sql",
                "PERFORM pgbeat.set_task_aside(aside_ids[i], 'finishing a run failed: ' || aside_errors[i]);",
                "NULL;  -- the task keeps firing",
            ),
        ),
        (f"{CLAIMS_TESTS}::test_a_counter_run_whose_params_cannot_count_fails_and_sets_only_its_task_aside",),
    ),
    Mutant(
        "fired_overflows",
        18,
        "fired counts on past 2^31 - 1 instead of saturating: the overflow sets the task aside",
        (
            Edit(
                f"{SCHEMA}/30_scheduling.sql",
                "SET fired = least(fired::bigint + 1, 2147483647)::integer,",
                "SET fired = fired + 1,",
            ),
            Edit(
                f"{SCHEMA}/30_scheduling.sql",
                "SET fired = least(tk.fired::bigint + 1, 2147483647)::integer,",
                "SET fired = tk.fired + 1,",
            ),
        ),
        (f"{SCHEDULING_TESTS}::test_fired_saturates_at_its_cap_and_the_task_keeps_firing",),
    ),
    Mutant(
        "sigterm_drops_runs",
        15,
        "a SIGTERMed worker leaves at once, dropping the runs in flight",
        (
            Edit(
                "src/pgbeat/worker.py",
                "                    if not self.in_flight:\n                        return\n",
                "                    return  # leave at once, whatever is in flight\n",
            ),
        ),
        (f"{WORKER_TESTS}::test_sigterm_drains_the_run_in_flight_and_exits_0",),
    ),
    Mutant(
        "no_shutdown_grace",
        15,
        "the shutdown grace is 0, whatever PGBEAT_SHUTDOWN_GRACE says",
        (
            Edit(
                "src/pgbeat/config.py",
                'shutdown_grace=_float("PGBEAT_SHUTDOWN_GRACE", 30.0),',
                "shutdown_grace=0.0,",
            ),
        ),
        (f"{WORKER_TESTS}::test_sigterm_drains_the_run_in_flight_and_exits_0",),
    ),
)


@dataclass
class Verdict:
    mutant: Mutant
    tests: str  # "caught (N failed)", "MISSED", or what went wrong
    chaos: str  # "caught: rule_2 x12, ..." or "MISSED"
    tests_caught: bool
    chaos_caught: bool
    seconds: float


def scratch_copy(mutant: Mutant, into: Path) -> Path:
    """A copy of the repository's code and tests with the mutant's edits applied."""
    root = into / mutant.name
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            root.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / name)
    for edit in mutant.edits:
        path = root / edit.path
        text = path.read_text(encoding="utf-8")
        if text.count(edit.old) != 1:
            raise SystemExit(
                f"mutant {mutant.name}: {edit.path} contains its text {text.count(edit.old)} times, "
                f"not once; update the mutant to the code:\n{edit.old}"
            )
        path.write_text(text.replace(edit.old, edit.new), encoding="utf-8")
    return root


def scratch_env(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONDONTWRITEBYTECODE": "1"}


def run_tests(mutant: Mutant, root: Path, log: Path) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout", "300", *mutant.tests]
    with log.open("w") as out:
        code = subprocess.call(cmd, cwd=root, env=scratch_env(root), stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    if code == 1:
        failed = re.search(r"(\d+) failed", text)
        return True, f"caught ({failed.group(1) if failed else '?'} failed)"
    if code == 0:
        return False, "MISSED"
    return False, f"ERROR (pytest exit {code}, see {log})"


def run_chaos(root: Path, duration: float, tasks: int, seed: int, log: Path) -> tuple[bool, str]:
    cmd = [
        sys.executable, "-m", "pgbeat_lab.chaos",
        "--duration", str(duration), "--tasks", str(tasks), "--seed", str(seed),
        "--workdir", str(root / "chaos"),
    ]  # fmt: skip
    env = scratch_env(root)
    env.pop("PGBEAT_DATABASE_URL", None)  # a private server, which the run may restart
    with log.open("w") as out:
        subprocess.call(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    fired = re.findall(r"^  (rule_\d+)\S*\s+(\d+) violations", text, re.MULTILINE)
    caught = [f"{name} x{count}" for name, count in fired if int(count) > 0]
    if caught:
        return True, "caught: " + ", ".join(caught)
    if "result: PASS" in text:
        return False, "MISSED"
    return False, f"ERROR (no invariant fired; see {log})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgbeat_lab.mutants", description=__doc__)
    parser.add_argument("--duration", type=float, default=15, help="seconds of chaos load per mutant (15)")
    parser.add_argument("--tasks", type=int, default=100, help="tasks per chaos run (100)")
    parser.add_argument("--seed", type=int, default=1, help="the chaos runs' seed (1)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--no-chaos", action="store_true", help="run the tests only")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run side by side (2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies and logs")
    args = parser.parse_args(argv)
    if args.list:
        for m in MUTANTS:
            print(f"{m.name:<36} rule {m.rule:<3} {m.bug}")
        return 0
    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        parser.error(f"unknown mutant in {args.only}; --list names them")
    workdir = Path(tempfile.mkdtemp(prefix="pgbeat-mutants-"))
    workdir.chmod(0o755)  # the chaos run's embedded server runs as its own user
    for mutant in chosen:  # every patch applies before anything runs
        scratch_copy(mutant, workdir)

    def judge(mutant: Mutant) -> Verdict:
        started, root = time.monotonic(), workdir / mutant.name
        tests_caught, tests = run_tests(mutant, root, workdir / f"{mutant.name}.tests.log")
        chaos_caught, chaos = False, "not run"
        if not args.no_chaos:
            log = workdir / f"{mutant.name}.chaos.log"
            chaos_caught, chaos = run_chaos(root, args.duration, args.tasks, args.seed, log)
            if chaos.startswith("ERROR"):  # it could not run (a fleet that did not start): once more
                shutil.rmtree(root / "chaos", ignore_errors=True)
                chaos_caught, chaos = run_chaos(root, args.duration, args.tasks, args.seed, log)
        if not args.keep:
            shutil.rmtree(root / "chaos", ignore_errors=True)
        print(f"{mutant.name}: tests {tests}; chaos {chaos}", flush=True)
        return Verdict(mutant, tests, chaos, tests_caught, chaos_caught, time.monotonic() - started)

    began = time.monotonic()
    verdicts: list[Verdict] = []
    try:
        # Mutants run side by side: a chaos run mostly waits (its load, drains, graces).
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            verdicts = list(pool.map(judge, chosen))
    finally:
        print(table(verdicts, time.monotonic() - began))
        if args.keep:
            print(f"scratch copies and logs: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    wanted = (lambda v: v.tests_caught) if args.no_chaos else (lambda v: v.tests_caught and v.chaos_caught)
    return 0 if len(verdicts) == len(chosen) and all(wanted(v) for v in verdicts) else 1


def table(verdicts: list[Verdict], total: float) -> str:
    rows = [("mutant", "rule", "caught by tests", "caught by chaos", "s")]
    rows += [(v.mutant.name, str(v.mutant.rule), v.tests, v.chaos, f"{v.seconds:.0f}") for v in verdicts]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)), r[4]]) for r in rows]
    twice = sum(v.tests_caught and v.chaos_caught for v in verdicts)
    lines.append(f"{twice} of {len(verdicts)} mutants caught by both, in {total:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
