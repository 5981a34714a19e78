-- How often a task went back to the queue because its agent was rate limited (capped).
ALTER TABLE tasks ADD COLUMN rate_limit_requeues INTEGER NOT NULL DEFAULT 0;
-- The execution's folder (it holds stdout.log and stderr.log), named for what it is.
ALTER TABLE executions RENAME COLUMN log_path TO log_dir;
-- Enough to recognise the agent's process group leader after a crash, and nothing else:
-- its start time in clock ticks since boot (/proc/<pid>/stat field 22) and the boot's id.
ALTER TABLE executions ADD COLUMN proc_started INTEGER;
ALTER TABLE executions ADD COLUMN boot_id TEXT;
-- When the next delayed retry becomes ready is an index read. Partial, so that the claim
-- (which must walk tasks_queue in priority order) can never choose it.
CREATE INDEX tasks_delayed ON tasks (run_after) WHERE state = 'queued' AND run_after > 0;
