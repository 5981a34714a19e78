"""SQLite store: migrations, tasks, executions."""
