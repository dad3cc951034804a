DROP FUNCTION pgbeat.prune_history, pgbeat.reap_dead_daemons, pgbeat.stop_daemon,
    pgbeat.heartbeat_daemon, pgbeat.register_daemon, pgbeat.next_pending_due_at,
    pgbeat.reap_abandoned_runs, pgbeat.release_stray_task_locks, pgbeat.release_task_locks,
    pgbeat.finish_run, pgbeat.finish_runs, pgbeat.claim_runs, pgbeat.abandon_runs,
    pgbeat.schedule_retry, pgbeat.held_task_locks;
