"""One smoke test per real peer: the harness installs and runs each of them for real."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from tests import peers
from tests.fakes.anthropic import FakeAnthropic
from tests.fakes.gemini import FakeGemini

pytestmark = pytest.mark.real


async def run(argv: list[str], env: dict[str, str], stdin: bytes = b"") -> list[dict[str, object]]:
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=env["HOME"])
    out, err = await asyncio.wait_for(proc.communicate(stdin), 90)
    assert proc.returncode == 0, err.decode()[-2000:]
    return [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]


async def test_real_claude_cli_prints_result(
    claude_env: dict[str, str], fake_anthropic: FakeAnthropic
) -> None:
    events = await run([str(peers.claude_bin()), "-p", "--output-format", "stream-json",
                        "--verbose", "--model", "claude-sonnet-4-5"], claude_env, b"hi")
    result = events[-1]
    assert result["type"] == "result" and result["is_error"] is False
    assert result["result"] == "Hello from the fake server."
    assert isinstance(result["total_cost_usd"], float)
    assert fake_anthropic.requests and fake_anthropic.requests[0]["stream"] is True


async def test_real_gemini_cli_prints_result(
    gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    events = await run([str(peers.gemini_bin()), "-p", "hi", "--skip-trust", "--output-format",
                        "stream-json", "-m", "gemini-2.5-flash"], gemini_env)
    assert events[-1]["type"] == "result" and events[-1]["status"] == "success"
    assert fake_gemini.requests[0]["call"] == "gemini-2.5-flash:streamGenerateContent"


async def test_real_llama_server_streams_from_smollm2(llama_server: str) -> None:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16,
            "stream": True}
    deltas = []
    async with aiohttp.ClientSession() as session, session.post(
        f"{llama_server}/chat/completions", json=body
    ) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        deltas.append(choice["delta"]["content"])
    assert len(deltas) > 1
    assert "SmolLM2" in (await _model_id(llama_server))


async def _model_id(endpoint: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{endpoint}/models") as resp:
        return json.dumps(await resp.json())


async def test_real_llama_server_takes_the_flags_it_is_given(llama_server: str) -> None:
    """Started as the binary itself, not the wrapper that drops --parallel and --threads."""
    async with aiohttp.ClientSession() as session, session.get(
        llama_server.removesuffix("/v1") + "/props"
    ) as resp:
        props = await resp.json()
    assert props["total_slots"] == 4
