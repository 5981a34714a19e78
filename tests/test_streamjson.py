"""The envelope reader, summary extraction, changestat parsing, and git measurement."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from corral.executor.changes import git_base, git_changestat
from corral.executor.runner import RunRequest, open_envelope
from corral.executor.streamjson import (
    ChangeStat,
    EnvelopeWriter,
    extract_summary,
    new_message_id,
    new_session_id,
    parse_changestat,
    read_events,
    summarize,
)
from tests.conftest import until


def test_writer_round_trips_through_reader(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    with EnvelopeWriter(path) as w:
        w.init(session_id="s1", model="m", cwd="/x")
        w.text_delta("Hel")
        w.text_delta("lo")
        w.assistant(message_id="msg1", model="m", content=[{"type": "text", "text": "Hello"}])
        w.result(is_error=False, result="Hello", session_id="s1", duration_ms=5,
                 usage={"input_tokens": 3, "output_tokens": 2}, total_cost_usd=0.0)
    events = read_events(path)
    assert [e["type"] for e in events] == [
        "system", "stream_event", "stream_event", "assistant", "result"]
    s = summarize(events)
    assert (s.session_id, s.tokens_in, s.tokens_out, s.cost_usd, s.is_error) == (
        "s1", 3, 2, 0.0, False)
    assert extract_summary(events) == "Hello"


def test_reader_tolerates_truncation_unknown_events_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    lines = [
        json.dumps({"type": "system", "subtype": "init", "session_id": "s"}),
        "",
        json.dumps({"type": "brand_new_event", "x": 1}),
        json.dumps({"type": "assistant", "message": {"content": [
            {"type": "text", "text": "  the last words\n of the agent  "}]}}),
        '{"type":"result","subtype":"succ',  # the daemon died mid-line
    ]
    path.write_text("\n".join(lines))
    events = read_events(path)
    assert len(events) == 3
    s = summarize(events)
    assert not s.has_result
    assert extract_summary(events) == "the last words of the agent"


def test_summary_prefers_result_and_trims() -> None:
    events: list[dict[str, Any]] = [
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "draft"}]}},
        {"type": "result", "result": "x" * 1000, "total_cost_usd": 0.5, "usage": {}},
    ]
    summary = extract_summary(events, limit=50)
    assert summary is not None and len(summary) == 50 and summary.endswith("…")


def test_cost_falls_back_to_old_field_name() -> None:
    assert summarize([{"type": "result", "cost_usd": 0.25}]).cost_usd == 0.25


@pytest.mark.parametrize("text, expected", [
    (" 3 files changed, 10 insertions(+), 2 deletions(-)", ChangeStat(3, 10, 2)),
    (" 1 file changed, 1 insertion(+), 1 deletion(-)", ChangeStat(1, 1, 1)),
    (" 2 files changed, 5 insertions(+)", ChangeStat(2, 5, 0)),
    (" 1 file changed, 4 deletions(-)", ChangeStat(1, 0, 4)),
    (" 1 file changed, 0 insertions(+), 0 deletions(-)", ChangeStat(1, 0, 0)),
    ("first 1 file changed, 1 insertion(+)\nthen 4 files changed, 8 deletions(-)",
     ChangeStat(4, 0, 8)),
    ("nothing changed here", None),
])
def test_parse_changestat(text: str, expected: ChangeStat | None) -> None:
    assert parse_changestat(text) == expected


def _git(repo: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, env=env)


async def test_git_measures_added_changed_and_deleted(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "keep.txt").write_text("one\ntwo\nthree\n")
    (repo / "gone.txt").write_text("a\nb\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "start")
    base = await git_base(repo)
    assert base is not None
    (repo / "keep.txt").write_text("one\nTWO\nthree\nfour\n")  # 2 insertions, 1 deletion
    (repo / "gone.txt").unlink()  # 2 deletions
    (repo / "new.txt").write_text("x\ny\nz\n")  # untracked: 3 insertions
    stat = await git_changestat(repo, base)
    assert stat == ChangeStat(files_changed=3, insertions=5, deletions=3)
    status = await asyncio.create_subprocess_exec(
        "git", "status", "--porcelain", cwd=repo, stdout=asyncio.subprocess.PIPE)
    index = (await status.communicate())[0].decode()
    assert "?? new.txt" in index  # the user's index was not touched


async def test_git_base_outside_a_repo(tmp_path: Path) -> None:
    assert await git_base(tmp_path) is None
    assert await git_base(None) is None


async def test_the_envelope_makes_its_folder_and_appends(tmp_path: Path) -> None:
    exec_dir = tmp_path / "exec" / "1"
    blocked = tmp_path / "file" / "3"
    (tmp_path / "file").write_text("not a folder")
    for _ in range(2):  # opened twice (a resumed execution): nothing is truncated
        with await open_envelope(RunRequest(prompt="p", exec_dir=exec_dir)) as writer:
            writer.init(session_id=new_session_id(), model="m", cwd=None)
    assert [e["type"] for e in read_events(exec_dir / "stdout.log")] == ["system", "system"]
    with pytest.raises(NotADirectoryError):
        await open_envelope(RunRequest(prompt="p", exec_dir=blocked))


def test_ids_look_like_their_kinds() -> None:
    session_ids = {new_session_id() for _ in range(100)}
    assert len(session_ids) == 100
    assert all(uuid.UUID(s).version == 4 for s in session_ids)
    assert all(len(m) == 28 and m.startswith("msg_") for m in (new_message_id(),))


async def test_lines_are_batched_briefly_then_flushed(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    writer = EnvelopeWriter(path, flush_interval_s=0.05)
    writer.init(session_id="s", model="m", cwd=None)
    writer.text_delta("a")
    assert path.read_bytes() == b""  # held for a moment, to share one write

    async def written() -> bool:
        return bool(path.read_bytes())

    await until(written, timeout_s=5)
    assert [e["type"] for e in read_events(path)] == ["system", "stream_event"]
    writer.text_delta("b" * 300_000)  # over the batch size: written at once
    assert len(read_events(path)) == 3
    writer.text_delta("c")
    writer.close()  # closing flushes what is pending
    assert writer.text == "a" + "b" * 300_000 + "c" and len(read_events(path)) == 4


def test_without_an_event_loop_lines_are_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "stdout.log"
    writer = EnvelopeWriter(path)
    writer.text_delta("now")
    assert read_events(path)[0]["event"]["delta"]["text"] == "now"
    writer.close()


@pytest.mark.parametrize("text", [
    "ok", "", 'quote " and \\ slash', "naïve ✓ 日本", "\n\t\x00\u2028", "lone \ud800 surrogate",
])
def test_a_delta_line_is_exactly_the_generic_event_encoding(tmp_path: Path, text: str) -> None:
    with EnvelopeWriter(tmp_path / "a.log") as fast, EnvelopeWriter(tmp_path / "b.log") as slow:
        fast.text_delta(text)
        slow.event({"type": "stream_event", "event": {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": text}}})
    assert (tmp_path / "a.log").read_bytes() == (tmp_path / "b.log").read_bytes()
    assert read_events(tmp_path / "a.log")[0]["event"]["delta"]["text"] == text
