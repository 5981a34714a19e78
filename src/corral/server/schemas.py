"""What the socket API accepts: request bodies and query strings, as pydantic models.

The handlers validate with these models and the OpenAPI description is generated from them, so
the two cannot drift apart. Bodies are strict (a number is not a string); query strings arrive
as text and are converted (``"5"`` is the integer 5, ``"1"`` is true).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from corral.errors import BadRequest
from corral.models import Task, TaskState

MAX_WAIT_S = 60


class TaskCreate(BaseModel):
    """A task to queue: the body of ``POST /tasks``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, description="What the agent is asked to do.")
    agent: str | None = Field(
        default=None, description="claude, gemini, codex, local, an agent of [agents], or auto"
        " (the classifier decides).")
    model: str | None = Field(default=None, max_length=200)
    workdir: str | None = Field(default=None, description="Absolute path of a directory.")
    priority: int = Field(default=0, ge=-1000, le=1000)
    timeout_s: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)
    max_retries: int | None = Field(default=None, ge=0, le=100)
    isolate: bool | None = Field(
        default=None, description="Run in a worktree of its own when workdir is in a git"
        " repository (default: [workspace] isolate).")
    base: str | None = Field(default=None, min_length=1, max_length=200,
                             description="The commit or branch the workspace starts from.")
    after: list[int] = Field(default_factory=list, max_length=100,
                             description="Tasks that must succeed first (the task is blocked).")
    max_cost_usd: float | None = Field(default=None, gt=0, le=100_000,
                                       description="Stop the run once it has cost this much.")
    node: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$",
        description="The node that may run it on a shared queue, or any (default: the node"
        " it is submitted on when workdir is given, since paths are host-local; else any).")

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _prompt_text(value)

    @field_validator("timeout_s", "max_cost_usd", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value)
        if not path.is_absolute():
            raise ValueError("workdir must be an absolute path")
        if not path.exists():
            raise ValueError(f"workdir {value} does not exist")
        if not path.is_dir():
            raise ValueError(f"workdir {value} is not a directory")
        return str(path)


class ScheduleCreate(TaskCreate):
    """A schedule: the body of ``POST /schedules`` — a cron expression and a task to submit."""

    cron: str = Field(min_length=1, max_length=200,
                      description="Five fields: minute hour day-of-month month day-of-week.")

    @field_validator("after")
    @classmethod
    def _no_after(cls, value: list[int]) -> list[int]:
        if value:
            raise ValueError("a schedule's tasks cannot wait for other tasks")
        return value

    def task_options(self) -> dict[str, Any]:
        """What each firing passes to submit (the pool's names)."""
        fields = self.model_dump(exclude={"cron", "prompt", "after"}, exclude_none=True)
        if "base" in fields:
            fields["base_ref"] = fields.pop("base")
        return fields


def _prompt_text(value: str) -> str:
    if not value.strip():
        raise ValueError("prompt is empty")
    if "\x00" in value:
        raise ValueError("prompt contains NUL characters")
    return value


class ReplyCreate(BaseModel):
    """A follow-up in the same conversation: the body of ``POST /tasks/{task_id}/reply``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return _prompt_text(value)


class MergeRequest(BaseModel):
    """The body of ``POST /tasks/{task_id}/merge``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    squash: bool = False


class PruneRequest(BaseModel):
    """The body of ``POST /prune``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    older_than_days: float | None = Field(default=None, gt=0, description="Finished tasks"
                                          " last changed longer ago go; default [daemon]"
                                          " keep_days.")
    dry_run: bool = Field(default=False, description="Count them, remove nothing.")


class _Query(BaseModel):
    model_config = ConfigDict(extra="ignore")


Q = TypeVar("Q", bound=_Query)


class ListQuery(_Query):
    """``GET /tasks``: newest first, a page at a time."""

    state: TaskState | None = None
    agent: str | None = Field(default=None, max_length=100)
    since: str | None = Field(default=None, description="Created at or after: an ISO 8601 date"
                              " or time (without a zone: the daemon's local time).")
    until: str | None = Field(default=None, description="Created before; as since.")
    before: int | None = Field(default=None, ge=1, description="The cursor: the tasks listed"
                               " after this one (the previous page's next).")
    limit: int = Field(default=50, ge=1, le=1000)

    @field_validator("since", "until")
    @classmethod
    def _moment(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                datetime.datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an ISO 8601 date or time") from None
        return value

    @staticmethod
    def timestamp(value: str | None) -> float | None:
        """A validated ``since``/``until`` as a Unix time."""
        return None if value is None else datetime.datetime.fromisoformat(value).timestamp()


class WaitQuery(_Query):
    """``GET /tasks/{task_id}/wait``: block until the task is final or the time is up."""

    timeout_s: int = Field(default=30, ge=0, le=MAX_WAIT_S)


class StatsQuery(_Query):
    """``GET /stats``: totals, or (with ``by``) executions, cost and tokens per group."""

    by: Literal["day", "agent", "model"] | None = None
    since: str | None = Field(default=None, pattern=r"^\d{4}-\d{2}-\d{2}$",
                              description="A day, YYYY-MM-DD, of the daemon's calendar.")


class DiffQuery(_Query):
    """``GET /tasks/{task_id}/diff``: the task's branch against its base."""

    stat: bool = False


class LogQuery(_Query):
    """``GET /tasks/{task_id}/log``: an execution's envelope (the latest by default)."""

    execution: int | None = Field(default=None, ge=1, le=2**62)
    follow: bool = False
    stream: Literal["stdout", "stderr"] = "stdout"


@dataclass
class TaskList:
    """The answer of ``GET /tasks``."""

    tasks: list[Task]
    next: int | None  # pass as ``before`` for the next page; null on the last


def validation_message(exc: ValidationError) -> str:
    """Every problem in one line, each naming the field."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "body"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{key}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts)


def parse_query(model: type[Q], query: Mapping[str, str]) -> Q:
    """The query string as ``model``, or a 400 naming what was wrong."""
    try:
        return model.model_validate(query)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc), code="bad_query") from None
