-- A year of history. Counters are kept by triggers, inside the transaction that changes what
-- they count, so stats, budgets and the dashboard read a few rows instead of scanning history,
-- and nothing that writes a task or an execution can forget them.

-- Tasks per state (pruning old tasks takes them off).
CREATE TABLE task_counts (
    state TEXT    PRIMARY KEY,
    tasks INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO task_counts SELECT state, COUNT(*) FROM tasks GROUP BY state;
CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN
    INSERT OR IGNORE INTO task_counts VALUES (NEW.state, 0);
    UPDATE task_counts SET tasks = tasks + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER task_counts_update AFTER UPDATE OF state ON tasks
WHEN OLD.state IS NOT NEW.state BEGIN
    UPDATE task_counts SET tasks = tasks - 1 WHERE state = OLD.state;
    INSERT OR IGNORE INTO task_counts VALUES (NEW.state, 0);
    UPDATE task_counts SET tasks = tasks + 1 WHERE state = NEW.state;
END;
CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN
    UPDATE task_counts SET tasks = tasks - 1 WHERE state = OLD.state;
END;

-- Executions per day, agent and model, counted once when an execution gets its finish time.
-- Spend is history of its own: pruning old tasks leaves it (budgets and stats --by day keep it).
ALTER TABLE usage_daily ADD COLUMN succeeded INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN failed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN duration_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cost_estimated_usd REAL NOT NULL DEFAULT 0;
DELETE FROM usage_daily;
INSERT INTO usage_daily
    SELECT date(finished_at, 'unixepoch', 'localtime'), agent, COALESCE(model, ''), COUNT(*),
           COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0),
           SUM(status = 'succeeded'), SUM(status = 'failed'), SUM(status = 'rate_limited'),
           CAST(SUM((finished_at - started_at) * 1000) AS INTEGER),
           COALESCE(SUM(CASE WHEN cost_estimated THEN cost_usd END), 0)
    FROM executions WHERE finished_at IS NOT NULL GROUP BY 1, 2, 3;
CREATE TRIGGER usage_count AFTER UPDATE OF finished_at ON executions
WHEN OLD.finished_at IS NULL AND NEW.finished_at IS NOT NULL BEGIN
    INSERT OR IGNORE INTO usage_daily
        VALUES (date(NEW.finished_at, 'unixepoch', 'localtime'), NEW.agent,
                COALESCE(NEW.model, ''), 0, 0, 0, 0, 0, 0, 0, 0, 0);
    UPDATE usage_daily SET
        executions = executions + 1,
        cost_usd = cost_usd + COALESCE(NEW.cost_usd, 0),
        tokens_in = tokens_in + COALESCE(NEW.tokens_in, 0),
        tokens_out = tokens_out + COALESCE(NEW.tokens_out, 0),
        succeeded = succeeded + (NEW.status = 'succeeded'),
        failed = failed + (NEW.status = 'failed'),
        rate_limited = rate_limited + (NEW.status = 'rate_limited'),
        duration_ms = duration_ms + CAST((NEW.finished_at - NEW.started_at) * 1000 AS INTEGER),
        cost_estimated_usd = cost_estimated_usd
            + (CASE WHEN NEW.cost_estimated THEN COALESCE(NEW.cost_usd, 0) ELSE 0 END)
    WHERE day = date(NEW.finished_at, 'unixepoch', 'localtime') AND agent = NEW.agent
      AND model = COALESCE(NEW.model, '');
END;

-- Listing, newest first (by creation, then id), by state, by agent or by time, paged by a
-- cursor: each walks one index from where the last page ended.
CREATE INDEX tasks_created ON tasks (created_at);
CREATE INDEX tasks_state_created ON tasks (state, created_at);
CREATE INDEX tasks_agent_created ON tasks (agent, created_at);
-- Retention: finished tasks by when they finished.
CREATE INDEX tasks_finished ON tasks (updated_at) WHERE state IN ('succeeded', 'failed', 'cancelled');
-- Replies by task, taken or not (pruning deletes them with their task).
DROP INDEX replies_waiting;
CREATE INDEX replies_task ON replies (task_id, id);
-- What waits for a task, in order, without a sort.
DROP INDEX task_deps_dependents;
CREATE INDEX task_deps_dependents ON task_deps (depends_on, task_id);
-- Startup recovery reads only what is running; the status index over all history goes.
DROP INDEX executions_status;
CREATE INDEX executions_running ON executions (id) WHERE status = 'running';
