-- Where a task may run and which daemon ran an execution (issue 18: several hosts, one queue).
-- One SQLite file has one node; the columns keep both backends' rows the same shape.
ALTER TABLE tasks ADD COLUMN node TEXT;
ALTER TABLE executions ADD COLUMN node_id TEXT;
