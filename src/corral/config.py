"""Typed settings: one TOML file plus ``CORRAL_<SECTION>__<KEY>`` environment overrides.

Unknown keys are rejected; :func:`load_settings` turns any validation failure into a one-line
:class:`~corral.errors.ConfigError` that names the key. Tests build :class:`Settings` directly.
"""

from __future__ import annotations

import hashlib
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from corral.errors import ConfigError
from corral.models import AUTO, KNOWN_AGENTS
from corral.paths import default_config_path, default_data_dir, default_socket_path


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, populate_by_name=True)


class DaemonSettings(_Section):
    socket_path: Path = Field(default_factory=default_socket_path)
    data_dir: Path = Field(default_factory=default_data_dir)
    log_level: str = "INFO"
    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # NORMAL in WAL mode survives a killed daemon; FULL also survives power loss.
    sqlite_synchronous: str = "NORMAL"
    # "auto": uvloop when it is installed, else asyncio's own loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    # Finished tasks older than this many days go, with their executions and logs (0: never).
    keep_days: float = Field(default=0.0, ge=0)
    # This daemon's name on a shared queue ([store] url); empty: the host's name and a short
    # hash of the data dir, so two daemons on one host with their own dirs differ.
    node_id: str = ""

    @field_validator("node_id")
    @classmethod
    def _node(cls, value: str) -> str:
        if value and (len(value) > 64 or not all(ch.isalnum() or ch in "-_.@" for ch in value)):
            raise ValueError("a node id is up to 64 letters, digits, '-', '_', '.' or '@'")
        return value

    def node(self) -> str:
        """The node id in force."""
        if self.node_id:
            return self.node_id
        digest = hashlib.sha256(str(self.data_dir.resolve()).encode()).hexdigest()[:6]
        return f"{socket.gethostname()}-{digest}"

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return upper

    @field_validator("sqlite_synchronous")
    @classmethod
    def _sync(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError("must be one of OFF, NORMAL, FULL, EXTRA")
        return upper


class StoreSettings(_Section):
    """Where the queue lives: the embedded SQLite file, or PostgreSQL shared by several hosts."""

    # postgresql://user:password@host:port/db; empty: the SQLite file in the data dir.
    url: str = ""
    heartbeat_seconds: float = Field(default=5.0, gt=0)
    # A node whose heartbeat is older than this is presumed dead and its tasks are requeued.
    node_timeout_seconds: float = Field(default=30.0, gt=0)
    # How long a write waits for a lost server to come back before it fails.
    reconnect_seconds: float = Field(default=300.0, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql:// (or be empty for the SQLite file)")
        return value

    @model_validator(mode="after")
    def _timeout(self) -> Self:
        if self.node_timeout_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("node_timeout_seconds must be at least twice heartbeat_seconds")
        return self


DEFAULT_MAX_CONCURRENT = 2


class MaxConcurrent(_Section):
    """Per-agent limits; an agent configured under [agents.NAME] may have one too."""

    model_config = ConfigDict(extra="allow", validate_default=True)

    claude: int = Field(default=2, ge=0)
    gemini: int = Field(default=2, ge=0)
    codex: int = Field(default=2, ge=0)
    local: int = Field(default=4, ge=0)

    @model_validator(mode="after")
    def _extra_limits(self) -> Self:
        for name, value in (self.model_extra or {}).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: a limit is a whole number, 0 or more")
        return self

    def for_agent(self, agent: str) -> int:
        value = getattr(self, agent, None)
        return DEFAULT_MAX_CONCURRENT if value is None else int(value)

    def configured(self) -> set[str]:
        """The names of the limits given beyond the built-in agents'."""
        return set(self.model_extra or {})


class PoolSettings(_Section):
    max_workers: int = Field(default=8, ge=1)
    max_concurrent: MaxConcurrent = Field(default_factory=MaxConcurrent)
    default_max_retries: int = Field(default=2, ge=0, le=100)
    retry_base_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=60.0, ge=0)
    cooldown_default_seconds: float = Field(default=30.0, ge=0)
    # A task sent back to the queue by rate limits more often than this fails instead.
    max_rate_limit_requeues: int = Field(default=10, ge=0)
    kill_grace_seconds: float = Field(default=5.0, ge=0)
    # Per agent across every node of a shared queue ([store] url), enforced in the claim.
    global_max_concurrent: dict[str, int] = Field(default_factory=dict)

    @field_validator("global_max_concurrent")
    @classmethod
    def _caps(cls, value: dict[str, int]) -> dict[str, int]:
        for name, cap in value.items():
            if cap < 0:
                raise ValueError(f"{name}: a limit is a whole number, 0 or more")
        return value


class _CliAgentSettings(_Section):
    enabled: bool = True
    model: str = ""
    extra_args: list[str] = Field(default_factory=list)
    timeout_seconds: float = Field(default=1800.0, gt=0)
    env: dict[str, str] = Field(default_factory=dict)


class ClaudeSettings(_CliAgentSettings):
    binary: str = "claude"
    # The CLI retries 429s for minutes, announcing each retry; after this many corral stops
    # the run and cools the agent down instead of holding a worker.
    max_rate_limit_retries: int = Field(default=2, ge=0)
    permission_mode: str = "acceptEdits"
    strip_api_key: bool = False


class GeminiSettings(_CliAgentSettings):
    binary: str = "gemini"
    approval_mode: str = "auto_edit"
    model: str = "gemini-2.5-flash"
    # While the CLI retries a per-minute 429 by itself, corral stops it after this many
    # failed attempts it logged, and cools the agent down instead of holding a worker.
    max_rate_limit_retries: int = Field(default=2, ge=0)


class CodexSettings(_CliAgentSettings):
    binary: str = "codex"
    sandbox: Literal["read-only", "workspace-write", "danger-full-access"] = "workspace-write"
    # Top-level `error` events (codex reconnecting) waited out before corral stops the run.
    max_rate_limit_retries: int = Field(default=5, ge=0)

    @field_validator("extra_args")
    @classmethod
    def _only_config(cls, value: list[str]) -> list[str]:
        pairs = iter(value)
        for flag in pairs:
            setting = next(pairs, None)
            if flag not in ("-c", "--config") or setting is None or "=" not in setting:
                raise ValueError("only -c key=value pairs: codex refuses a flag given twice,"
                                 " and corral sets every other flag")
        return value


class LocalModelSettings(_Section):
    endpoint: str = ""
    model: str = ""
    timeout_seconds: float = Field(default=600.0, gt=0)
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    idle_timeout_seconds: float = Field(default=120.0, gt=0)
    default_temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, gt=0)
    api_key: SecretStr | None = None

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, or be empty for none")
        return value


class LocalAgentSettings(_Section):
    """The local model as a coding agent in a task's working dir."""

    # auto: an agent when the task has a working dir, a text answer without one.
    mode: Literal["auto", "agent", "text"] = "auto"
    # tools: the server's native tool calls; schema: one JSON action per turn, grammar-bound;
    # auto: tools, falling back to schema when the server or the model will not do tools.
    actions: Literal["auto", "tools", "schema"] = "auto"
    max_turns: int = Field(default=30, ge=1, le=1000)
    bash_timeout_seconds: float = Field(default=120.0, gt=0)
    max_bash_timeout_seconds: float = Field(default=600.0, gt=0)
    output_limit_chars: int = Field(default=10_000, ge=100)
    # auto: Bash inside bubblewrap when it works here; required: fail the task when it does not.
    sandbox: Literal["auto", "none", "required"] = "auto"


class UiSettings(_Section):
    """The dashboard, on TCP (the Unix socket serves the CLI)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # anything but loopback is logged as a warning
    port: int = Field(default=8765, ge=0, le=65535)  # 0: a free one


class ClassifierSettings(_Section):
    enabled: bool = True
    default_agent: str = "local"  # a built-in agent or one of [agents]
    timeout_seconds: float = Field(default=30.0, gt=0)


class AgentCliSettings(_Section):
    """An agent CLI defined in the config file: ``[agents.NAME]``."""

    enabled: bool = True
    # The argv; "{prompt}" is replaced by the prompt as one argument (without it the prompt goes
    # on stdin), "{model}" by the task's model (dropped with the flag before it when none).
    command: list[str] = Field(min_length=1)
    output: Literal["text", "claude-stream-json"] = "text"
    env: dict[str, str] = Field(default_factory=dict)
    timeout_seconds: float = Field(default=1800.0, gt=0)
    success_exit_codes: list[int] = Field(default_factory=lambda: [0], min_length=1)
    description: str = ""  # what the classifier is told about it
    # A follow-up's argv, with "{session_id}" (and "{prompt}"); without it, earlier turns go
    # in the prompt.
    resume: list[str] | None = None

    @field_validator("command")
    @classmethod
    def _command(cls, value: list[str]) -> list[str]:
        if not value[0].strip():
            raise ValueError("the first element must name the program")
        return value

    @field_validator("resume")
    @classmethod
    def _resume(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not any("{session_id}" in part for part in value):
            raise ValueError('needs a "{session_id}" element')
        return value

    @model_validator(mode="after")
    def _resume_needs_sessions(self) -> Self:
        # Only Claude's envelope tells corral the CLI's session id.
        if self.resume is not None and self.output != "claude-stream-json":
            raise ValueError('resume: needs output = "claude-stream-json", which names the session')
        return self


class WorkspaceSettings(_Section):
    """Each task in a git repository runs in a worktree and branch of its own."""

    isolate: bool = True
    root: Path | None = None  # default: <data_dir>/worktrees
    branch_prefix: str = "corral/"
    # Untracked files the agent needs, copied into each worktree by glob (inside the repo only).
    # The key is `copy`; the attribute is named apart from pydantic's own BaseModel.copy.
    copy_globs: list[str] = Field(default_factory=lambda: [".env", ".env.*"], alias="copy")
    delete_merged: bool = True
    keep_days: float = Field(default=14.0, ge=0)

    @field_validator("branch_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or value.startswith(("-", "/")) or ".." in value or " " in value:
            raise ValueError("must be a plain branch-name prefix such as corral/")
        return value


class Price(_Section):
    """USD per million tokens, for an agent whose CLI reports no cost."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)  # default: the input price

    def cost_usd(self, tokens_in: int, tokens_out: int, cached: int = 0) -> float:
        """``tokens_in`` counts the cached ones too, as the OpenAI and codex usage does."""
        cached = min(cached, tokens_in)
        cached_price = self.input if self.cached_input is None else self.cached_input
        return ((tokens_in - cached) * self.input + cached * cached_price
                + tokens_out * self.output) / 1_000_000


class BudgetSettings(_Section):
    """Spend caps per agent (or ``total``), per day and per month of the local calendar."""

    daily_usd: dict[str, float] = Field(default_factory=dict)
    monthly_usd: dict[str, float] = Field(default_factory=dict)
    warn_at: float = Field(default=0.8, gt=0, le=1)  # a log line at this share of a cap

    @field_validator("daily_usd", "monthly_usd")
    @classmethod
    def _caps(cls, value: dict[str, float]) -> dict[str, float]:
        for name, cap in value.items():
            if cap < 0:
                raise ValueError(f"{name}: a cap cannot be negative")
        return value


class NotifySettings(_Section):
    """Word when a task reaches a final state."""

    webhook_url: str = ""  # a POST of the finished task's JSON
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_attempts: int = Field(default=4, ge=1, le=20)
    command: list[str] = Field(default_factory=list)  # argv; the one-line summary is appended
    command_timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://, or be empty for none")
        return value


class Settings(BaseSettings):
    """Everything the daemon reads at startup. Build it directly in tests."""

    model_config = SettingsConfigDict(
        env_prefix="CORRAL_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    pool: PoolSettings = Field(default_factory=PoolSettings)
    claude: ClaudeSettings = Field(default_factory=ClaudeSettings)
    gemini: GeminiSettings = Field(default_factory=GeminiSettings)
    codex: CodexSettings = Field(default_factory=CodexSettings)
    local_model: LocalModelSettings = Field(default_factory=LocalModelSettings)
    local_agent: LocalAgentSettings = Field(default_factory=LocalAgentSettings)
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    workspace: WorkspaceSettings = Field(default_factory=WorkspaceSettings)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    prices: dict[str, Price] = Field(default_factory=dict)  # by model name
    agents: dict[str, AgentCliSettings] = Field(default_factory=dict)  # CLIs by configuration

    @model_validator(mode="after")
    def _agent_names(self) -> Self:
        for name in self.agents:
            if name in KNOWN_AGENTS or name == AUTO:
                raise ValueError(f"agents.{name}: the name of a built-in agent")
            if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 40:
                raise ValueError(f"agents.{name}: a name is letters, digits, - and _")
        names = set(KNOWN_AGENTS) | set(self.agents)
        for name in self.pool.max_concurrent.configured() - names:
            raise ValueError(f"pool.max_concurrent.{name}: no such agent")
        for name in set(self.pool.global_max_concurrent) - names:
            raise ValueError(f"pool.global_max_concurrent.{name}: no such agent")
        if self.classifier.default_agent not in names:
            raise ValueError(f"classifier.default_agent: must be one of {', '.join(sorted(names))}")
        return self

    def agent_names(self) -> tuple[str, ...]:
        """Every agent corral knows: the built-in ones, then those of [agents]."""
        return (*KNOWN_AGENTS, *self.agents)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: explicit arguments, then CORRAL_* variables, then the TOML file.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, with every secret replaced."""
        data = self.model_dump(mode="json", by_alias=True)
        if self.local_model.api_key is not None:
            data["local_model"]["api_key"] = "***"
        data["store"]["url"] = redact_url(self.store.url)
        for section in ("claude", "gemini", "codex"):
            env = data[section]["env"]
            for key in env:
                if looks_secret(key):
                    env[key] = "***"
        return data


def redact_url(url: str) -> str:
    """A database URL with its password replaced."""
    scheme, sep, rest = url.partition("://")
    credentials, at, where = rest.rpartition("@")
    if not (sep and at and ":" in credentials):
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{where}"


def looks_secret(name: str) -> bool:
    """Whether an environment variable's name says its value is a secret."""
    upper = name.upper()
    return any(word in upper for word in ("KEY", "TOKEN", "SECRET", "PASSWORD"))


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from ``path`` (or the default file if it exists) plus the environment."""
    explicit = path is not None
    toml_path = path if path is not None else default_config_path()
    if explicit and not toml_path.is_file():
        raise ConfigError(f"config file {toml_path} does not exist")
    if toml_path.is_file():
        try:
            with toml_path.open("rb") as fh:
                tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {toml_path} is not valid TOML: {exc}") from None

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=toml_path if toml_path.is_file() else None)

    try:
        return _FromFile()
    except ValidationError as exc:
        raise ConfigError(_describe(exc, toml_path)) from None


def _describe(exc: ValidationError, path: Path) -> str:
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}" if key else msg)
    return f"invalid config ({path}): " + "; ".join(parts)
