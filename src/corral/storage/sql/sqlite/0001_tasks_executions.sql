-- Tasks are the queue; executions are the attempts at running them.
CREATE TABLE tasks (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    prompt            TEXT    NOT NULL,
    requested_agent   TEXT,
    requested_model   TEXT,
    agent             TEXT,             -- resolved: by request (pinned) or by the classifier
    model             TEXT,
    pinned            INTEGER NOT NULL DEFAULT 0,
    classifier_reason TEXT,
    workdir           TEXT,
    priority          INTEGER NOT NULL DEFAULT 0,
    state             TEXT    NOT NULL DEFAULT 'queued',
    attempts          INTEGER NOT NULL DEFAULT 0,
    max_retries       INTEGER NOT NULL DEFAULT 0,
    timeout_s         REAL,
    error             TEXT,
    run_after         REAL    NOT NULL DEFAULT 0,
    created_at        REAL    NOT NULL,
    updated_at        REAL    NOT NULL
);
CREATE INDEX tasks_queue ON tasks (state, priority DESC, id);

CREATE TABLE executions (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id       INTEGER NOT NULL REFERENCES tasks (id),
    agent         TEXT    NOT NULL,
    model         TEXT,
    status        TEXT    NOT NULL,
    started_at    REAL    NOT NULL,
    finished_at   REAL,
    exit_code     INTEGER,
    error         TEXT,
    session_id    TEXT,
    summary       TEXT,
    cost_usd      REAL,
    files_changed INTEGER,
    insertions    INTEGER,
    deletions     INTEGER,
    log_path      TEXT,
    pgid          INTEGER
);
CREATE INDEX executions_task ON executions (task_id, id);
CREATE INDEX executions_status ON executions (status);
