"""The classifier: JSON-schema answers, fallbacks, timeouts; real SmolLM2 and real gemini CLI."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from corral.executor.classifier import Classifier
from corral.llm.client import Client
from tests import peers
from tests.fakes.base import Hang, Reply, Status
from tests.fakes.gemini import FakeGemini
from tests.fakes.openai import FakeOpenAI

MakeFake = Callable[[], Awaitable[FakeOpenAI]]
AGENTS = ["claude", "gemini", "local"]


def answer(agent: str, model: str = "", reason: str = "because") -> Reply:
    return Reply(text=json.dumps({"agent_type": agent, "model": model, "reason": reason}))


async def test_valid_answer_is_used_with_schema_enum(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(answer("claude", "claude-sonnet-4-5", "multi-file refactor"))
    async with Client(fake.endpoint, "m") as client:
        decision = await Classifier(registered=AGENTS, default_agent="local",
                                    client=client).classify("refactor the parser")
    assert (decision.agent, decision.model) == ("claude", "claude-sonnet-4-5")
    assert "multi-file refactor" in decision.reason
    fmt = fake.requests[0]["body"]["response_format"]
    assert fmt["type"] == "json_schema"
    assert fmt["json_schema"]["schema"]["properties"]["agent_type"]["enum"] == AGENTS


@pytest.mark.parametrize("reply, needle", [
    (Reply(text="I think claude would be best!"), "not JSON"),
    (answer("robot"), "'robot', which is not a registered agent"),
    (answer("claude-code"), "not a registered agent"),
])
async def test_bad_answers_fall_back_to_default(
    fake_openai: MakeFake, reply: Reply, needle: str
) -> None:
    fake = await fake_openai()
    fake.push(reply)
    async with Client(fake.endpoint, "m") as client:
        decision = await Classifier(registered=AGENTS, default_agent="gemini",
                                    client=client).classify("x")
    assert decision.agent == "gemini"
    assert needle in decision.reason


async def test_unregistered_choice_falls_back(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(answer("claude"))
    async with Client(fake.endpoint, "m") as client:
        decision = await Classifier(registered=["gemini", "local"], default_agent="local",
                                    client=client).classify("x")
    assert decision.agent == "local" and "not a registered agent" in decision.reason


async def test_schema_rejected_falls_back_to_json_object(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Status(400, body={"error": {"message": "json_schema not supported"}}),
              answer("gemini"))
    async with Client(fake.endpoint, "m") as client:
        decision = await Classifier(registered=AGENTS, default_agent="local",
                                    client=client).classify("x")
    assert decision.agent == "gemini"
    assert fake.requests[1]["body"]["response_format"] == {"type": "json_object"}


async def test_timeout_falls_back_quickly(fake_openai: MakeFake) -> None:
    fake = await fake_openai()
    fake.push(Hang())
    started = time.monotonic()
    async with Client(fake.endpoint, "m") as client:
        decision = await Classifier(registered=AGENTS, default_agent="local", client=client,
                                    timeout_s=0.3).classify("x")
    assert decision.agent == "local" and "timed out" in decision.reason
    assert time.monotonic() - started < 3


async def test_disabled_and_no_model() -> None:
    off = await Classifier(registered=AGENTS, default_agent="claude", enabled=False).classify("x")
    assert off.agent == "claude" and "disabled" in off.reason
    none = await Classifier(registered=AGENTS, default_agent="claude").classify("x")
    assert none.agent == "claude" and "no classifier model" in none.reason


@pytest.mark.real
async def test_real_smollm2_classifies_with_schema(llama_server: str) -> None:
    async with Client(llama_server, "smollm2") as client:
        classifier = Classifier(registered=AGENTS, default_agent="local", client=client,
                                timeout_s=60)
        decision = await classifier.classify("Refactor the storage layer across ten files.")
    assert decision.agent in AGENTS
    assert decision.reason.startswith("local model:")  # a real, schema-valid answer


@pytest.mark.real
async def test_gemini_cli_fallback_classifier(
    gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.push(answer("claude", reason="needs code edits"))
    classifier = Classifier(registered=AGENTS, default_agent="local",
                            gemini_binary=str(peers.gemini_bin()),
                            gemini_model="gemini-2.5-flash", gemini_env=gemini_env, timeout_s=60)
    decision = await classifier.classify("fix the failing test")
    assert decision.agent == "claude"
    assert decision.reason == "gemini CLI: needs code edits"


async def test_gemini_cli_missing_falls_back() -> None:
    classifier = Classifier(registered=AGENTS, default_agent="local",
                            gemini_binary="/nonexistent/gemini", gemini_env={"PATH": "/x"})
    decision = await classifier.classify("x")
    assert decision.agent == "local" and "not found" in decision.reason


@pytest.mark.real
async def test_gemini_fallback_sends_the_question_on_stdin_not_argv(
    tmp_path: Path, gemini_env: dict[str, str], fake_gemini: FakeGemini
) -> None:
    fake_gemini.push(answer("claude", reason="code"))
    argv_file = tmp_path / "argv.json"
    wrapper = tmp_path / "gemini"  # records what the CLI was started with, then is it
    wrapper.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({str(argv_file)!r}, 'w').write(json.dumps(sys.argv))\n"
        f"os.execv({str(peers.gemini_bin())!r}, [{str(peers.gemini_bin())!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    classifier = Classifier(registered=AGENTS, default_agent="local", gemini_binary=str(wrapper),
                            gemini_model="gemini-2.5-flash", gemini_env=gemini_env, timeout_s=60)
    decision = await classifier.classify("rename the frobnicator across the repo")
    assert decision.agent == "claude", decision.reason
    assert "frobnicator" not in argv_file.read_text()
    assert "frobnicator" in json.dumps(fake_gemini.requests[-1]["contents"])
