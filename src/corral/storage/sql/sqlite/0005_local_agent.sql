-- How the local model was asked for actions in an execution: text, tools or schema.
ALTER TABLE executions ADD COLUMN actions TEXT;
