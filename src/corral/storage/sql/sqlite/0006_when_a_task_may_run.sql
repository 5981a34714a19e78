-- Dependencies: a task is `blocked` until every task it names has succeeded.
CREATE TABLE task_deps (
    task_id    INTEGER NOT NULL REFERENCES tasks (id),
    depends_on INTEGER NOT NULL REFERENCES tasks (id),
    PRIMARY KEY (task_id, depends_on)
);
CREATE INDEX task_deps_dependents ON task_deps (depends_on);
-- A dependent in the same repository starts its workspace from its dependency's branch.
ALTER TABLE tasks ADD COLUMN ws_base_branch TEXT;
-- Spend: a cap per task; what a CLI did not report is estimated from [prices].
ALTER TABLE tasks ADD COLUMN max_cost_usd REAL;
ALTER TABLE executions ADD COLUMN cost_estimated INTEGER NOT NULL DEFAULT 0;
-- Schedules: cron firings that submit a task each.
CREATE TABLE schedules (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    cron          TEXT    NOT NULL,
    prompt        TEXT    NOT NULL,
    options       TEXT    NOT NULL,   -- the submit options, JSON
    created_at    REAL    NOT NULL,
    last_fired_at REAL,
    last_task_id  INTEGER
);
ALTER TABLE tasks ADD COLUMN schedule_id INTEGER;
-- What was spent and used per day (the daemon's local calendar), agent and model, kept up to
-- date by the transaction that records each execution: budgets and stats read it, not history.
CREATE TABLE usage_daily (
    day        TEXT    NOT NULL,
    agent      TEXT    NOT NULL,
    model      TEXT    NOT NULL,
    executions INTEGER NOT NULL,
    cost_usd   REAL    NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    PRIMARY KEY (day, agent, model)
);
INSERT INTO usage_daily
    SELECT date(finished_at, 'unixepoch', 'localtime'), agent, COALESCE(model, ''), COUNT(*),
           COALESCE(SUM(cost_usd), 0), COALESCE(SUM(tokens_in), 0), COALESCE(SUM(tokens_out), 0)
    FROM executions WHERE finished_at IS NOT NULL GROUP BY 1, 2, 3;
