-- Local models are free: what a run used is counted in tokens.
ALTER TABLE executions ADD COLUMN tokens_in INTEGER;
ALTER TABLE executions ADD COLUMN tokens_out INTEGER;
