"""Runs mini-swe-agent for one scripted task and prints its timings as JSON (bench.agent).

Run inside mini-swe-agent's own venv (``scripts/bench-peers.sh`` makes it); it imports nothing
of corral. Usage: ``python msa_driver.py ENDPOINT TURNS WORKDIR``.
"""

from __future__ import annotations

import json
import sys
import time

from minisweagent.agents.default import DefaultAgent
from minisweagent.environments.local import LocalEnvironment
from minisweagent.models.litellm_model import LitellmModel

endpoint, turns, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
command_s = 0.0


class TimedEnvironment(LocalEnvironment):
    """The local environment, with the time spent running commands counted apart."""

    def execute(self, action: dict, cwd: str = "", *, timeout: int | None = None) -> dict:  # type: ignore[type-arg]
        global command_s
        started = time.perf_counter()
        try:
            return super().execute(action, cwd, timeout=timeout)
        finally:
            command_s += time.perf_counter() - started


model = LitellmModel(model_name=f"openai/agent-{turns}", cost_tracking="ignore_errors",
                     model_kwargs={"api_base": endpoint, "api_key": "bench"})
agent = DefaultAgent(model, TimedEnvironment(cwd=workdir), system_template="You are an agent.",
                     instance_template="{{task}}", step_limit=turns + 1, cost_limit=0)
warm = DefaultAgent(model, TimedEnvironment(cwd=workdir), system_template="You are an agent.",
                    instance_template="{{task}}", step_limit=turns + 1, cost_limit=0)
warm.run("warm up")
command_s = 0.0
started = time.perf_counter()
result = agent.run("run true a few times")
elapsed = time.perf_counter() - started
print(json.dumps({"seconds": elapsed, "command_seconds": command_s, "steps": agent.n_calls,
                  "exit_status": result.get("exit_status")}))
