-- Workspaces: a task whose dir is in a git repository runs in a worktree and branch of its own.
ALTER TABLE tasks ADD COLUMN isolate INTEGER NOT NULL DEFAULT 1;  -- the submitter's choice
ALTER TABLE tasks ADD COLUMN base_ref TEXT;                       -- --base, as given
ALTER TABLE tasks ADD COLUMN ws_repo TEXT;                        -- the repository's top folder
ALTER TABLE tasks ADD COLUMN ws_path TEXT;                        -- the worktree
ALTER TABLE tasks ADD COLUMN ws_branch TEXT;
ALTER TABLE tasks ADD COLUMN ws_base_commit TEXT;
ALTER TABLE tasks ADD COLUMN ws_subdir TEXT;                      -- the task's dir inside the repo
ALTER TABLE tasks ADD COLUMN ws_state TEXT;      -- planned, active, removed, merged, discarded
-- Follow-ups: what the next execution is asked (null: the task's prompt), and replies that
-- wait for the running one to end.
ALTER TABLE tasks ADD COLUMN current_prompt TEXT;
CREATE TABLE replies (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id     INTEGER NOT NULL REFERENCES tasks (id),
    prompt      TEXT    NOT NULL,
    created_at  REAL    NOT NULL,
    taken_at    REAL
);
CREATE INDEX replies_waiting ON replies (task_id, id) WHERE taken_at IS NULL;
ALTER TABLE executions ADD COLUMN prompt TEXT;
ALTER TABLE executions ADD COLUMN commit_sha TEXT;
ALTER TABLE executions ADD COLUMN resumed_session TEXT;
CREATE TABLE execution_files (
    execution_id INTEGER NOT NULL REFERENCES executions (id),
    path         TEXT    NOT NULL,
    insertions   INTEGER NOT NULL,
    deletions    INTEGER NOT NULL,
    PRIMARY KEY (execution_id, path)
);
CREATE INDEX tasks_workspaces ON tasks (ws_state) WHERE ws_state IS NOT NULL;
