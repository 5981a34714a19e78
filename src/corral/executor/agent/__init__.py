"""The local model as a coding agent: its tools and its loop."""
