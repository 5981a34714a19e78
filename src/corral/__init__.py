"""corral: a daemon that queues work for AI coding agents and runs it."""

__version__ = "0.1.0"
