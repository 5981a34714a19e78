"""The local agent's own overhead per tool turn, beside mini-swe-agent's per step.

Both talk to the same loopback model server (``bench.loopback``), which answers at once with a
call of the agent's bash tool running ``true``, for N turns. Per turn: a model call, the call's
parsing, running the command, sending its result back. What each spends outside the command
(timed apart on both sides) is the agent's overhead. corral runs its loop in this process
(with its envelope written to a file, as in a real run); mini-swe-agent runs in its own venv
(``bash scripts/bench-peers.sh`` makes it). Not a pass/fail test.

    .venv/bin/python -m bench.agent [--turns 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.loopback import start_server
from corral.executor.agent.loop import AgentLoop
from corral.executor.agent.tools import Toolbox, ToolOutcome
from corral.executor.streamjson import EnvelopeWriter, new_session_id
from corral.llm.client import Client

ROOT = Path(__file__).resolve().parent.parent
MSA_PYTHON = ROOT / ".peers" / "venvs" / "mini-swe-agent" / "bin" / "python"


class TimedToolbox(Toolbox):
    """The real tools, with the time spent in them counted apart."""

    def __init__(self, workspace: Path) -> None:
        super().__init__(workspace)
        self.seconds = 0.0

    async def run(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        started = time.perf_counter()
        try:
            return await super().run(name, arguments)
        finally:
            self.seconds += time.perf_counter() - started


async def corral_run(endpoint: str, turns: int, workdir: Path) -> tuple[float, float, int]:
    async with Client(endpoint, f"agent-{turns}", max_attempts=1) as client:
        async def once() -> tuple[float, float, int]:
            toolbox = TimedToolbox(workdir)
            with EnvelopeWriter(workdir.parent / f"stdout-{time.monotonic_ns()}.log") as writer:
                loop = AgentLoop(
                    lambda chat, on_delta: client.chat_stream(chat, on_delta),
                    toolbox, writer, session_id=new_session_id(), model=None,
                    max_turns=turns + 1, actions="tools")
                started = time.perf_counter()
                outcome = await loop.run("run true a few times", [])
                elapsed = time.perf_counter() - started
            assert outcome.error is None, outcome.error
            return elapsed, toolbox.seconds, outcome.turns

        await once()  # warm: the connection, the first imports
        return await once()


def msa_run(endpoint: str, turns: int, workdir: Path) -> tuple[float, float, int]:
    out = subprocess.run([str(MSA_PYTHON), str(ROOT / "bench" / "msa_driver.py"), endpoint,
                          str(turns), str(workdir)], check=True, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["exit_status"] == "Submitted", data
    return data["seconds"], data["command_seconds"], data["steps"]


def per_turn(run: tuple[float, float, int]) -> tuple[float, float]:
    seconds, command_s, turns = run
    return seconds / turns * 1000, (seconds - command_s) / turns * 1000


async def main(turns: int, rounds: int) -> None:
    if not MSA_PYTHON.exists():
        raise SystemExit("mini-swe-agent is not installed: run `bash scripts/bench-peers.sh`")
    server, endpoint = start_server()
    workdir = Path(tempfile.mkdtemp(prefix="corral-agentbench-")) / "ws"
    workdir.mkdir()
    ours, theirs = [], []
    try:
        for n in range(rounds):
            ours.append(per_turn(await corral_run(endpoint, turns, workdir)))
            theirs.append(per_turn(await asyncio.to_thread(msa_run, endpoint, turns, workdir)))
            print(f"  round {n + 1}: corral {ours[-1][0]:.2f} ms per turn"
                  f" ({ours[-1][1]:.2f} ms outside the command); mini-swe-agent"
                  f" {theirs[-1][0]:.2f} ms per step ({theirs[-1][1]:.2f} ms outside it)")
    finally:
        server.terminate()
    overhead = statistics.median(o[1] for o in ours)
    peer = statistics.median(t[1] for t in theirs)
    print(f"{turns} turns x {rounds} rounds: overhead per turn outside the command, median:"
          f" corral {overhead:.2f} ms, mini-swe-agent {peer:.2f} ms;"
          f" ratio corral / mini-swe-agent {overhead / peer:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.turns, args.rounds))
