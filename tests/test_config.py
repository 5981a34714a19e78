"""Settings: TOML + environment, unknown keys rejected with the key named, secrets redacted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from corral.config import Settings, load_settings
from corral.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.local_model.endpoint == ""
    assert settings.pool.max_concurrent.claude == 2
    assert settings.pool.max_concurrent.local == 4


def test_file_and_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[local_model]\nendpoint = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
                           "[pool]\nmax_workers = 3\n")
    monkeypatch.setenv("CORRAL_POOL__MAX_WORKERS", "5")
    settings = load_settings(path)
    assert settings.local_model.endpoint == "http://127.0.0.1:9/v1"
    assert settings.pool.max_workers == 5


@pytest.mark.parametrize("text, needle", [
    ("[pool]\nmax_wrokers = 3\n", "pool.max_wrokers: unknown key"),
    ("[nonsense]\nx = 1\n", "nonsense: unknown key"),
    ("[local_model]\ntimeout_seconds = \"soon\"\n", "local_model.timeout_seconds"),
    ("[local_model]\nendpoint = \"ftp://x\"\n", "local_model.endpoint"),
    ("[classifier]\ndefault_agent = \"robot\"\n", "classifier.default_agent"),
    ("[pool\n", "not valid TOML"),
    ("[daemon]\nevent_loop = \"tokio\"\n", "daemon.event_loop"),
    ("[agents.claude]\ncommand = [\"x\"]\n", "agents.claude: the name of a built-in agent"),
    ("[agents.x]\ncommand = []\n", "agents.x.command"),
    ("[agents.x]\ncommand = \"aider --yes\"\n", "agents.x.command"),
    ("[agents.x]\ncommand = [\"aider\", 3]\n", "agents.x.command.1"),
    ("[agents.x]\ncomand = [\"aider\"]\n", "agents.x.comand: unknown key"),
    ("[agents.x]\ncommand = [\"a\"]\noutput = \"json\"\n", "agents.x.output"),
    ("[agents.x]\ncommand = [\"a\"]\nresume = [\"a\", \"-r\"]\n", "agents.x.resume"),
    ("[agents.x]\ncommand = [\"a\"]\nresume = [\"a\", \"{session_id}\"]\n",
     "resume: needs output = \"claude-stream-json\""),
    ("[agents.\"a b\"]\ncommand = [\"a\"]\n", "agents.a b: a name is letters"),
    ("[pool.max_concurrent]\naider = 2\n", "pool.max_concurrent.aider: no such agent"),
    ("[agents.aider]\ncommand = [\"a\"]\n[pool.max_concurrent]\naider = -1\n",
     "aider: a limit is a whole number"),
])
def test_bad_config_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write(tmp_path, text))
    assert needle in caught.value.message
    assert "\n" not in caught.value.message


def test_event_loop_choice() -> None:
    import uvloop

    from corral.cli import _loop_factory

    assert _loop_factory("asyncio") is None
    assert _loop_factory("auto") is uvloop.new_event_loop  # installed with the package
    assert _loop_factory("uvloop") is uvloop.new_event_loop


def test_unknown_environment_key_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CORRAL_POOL__BOGUS", "1")
    with pytest.raises(ConfigError, match=r"pool\.bogus: unknown key"):
        load_settings(write(tmp_path, ""))


def test_api_key_redacted() -> None:
    settings = Settings(local_model={"endpoint": "http://x/v1", "api_key": "sk-planted-123"},
                        claude={"env": {"ANTHROPIC_API_KEY": "sk-ant-planted"}})
    dumped = json.dumps(settings.redacted())
    assert "sk-planted-123" not in dumped and "sk-ant-planted" not in dumped
    assert "sk-planted-123" not in repr(settings)


def test_example_config_is_valid_and_complete() -> None:
    import tomllib

    example = ROOT / "config.example.toml"
    data = tomllib.loads(example.read_text())
    defaults = Settings().model_dump(mode="json", by_alias=True)
    # Every key the example names exists, and every setting is documented in the example.
    for section, values in defaults.items():
        assert section in data, f"[{section}] missing from config.example.toml"
        for key in values:
            if key in ("max_concurrent",):
                continue
            assert key in data[section] or f"# {key}" in example.read_text(), key
    load_settings(example)


def test_corral_config_command_redacts(tmp_path: Path) -> None:
    path = write(tmp_path, '[local_model]\nendpoint = "http://x/v1"\napi_key = "sk-cli-planted"\n')
    out = subprocess.run([sys.executable, "-m", "corral.cli", "config", "--config", str(path)],
                         capture_output=True, text=True, check=True)
    assert "sk-cli-planted" not in out.stdout + out.stderr
    assert json.loads(out.stdout)["local_model"]["api_key"] == "***"


def test_configured_agents_and_their_limits_load(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, (
        "[agents.aider]\ncommand = [\"aider\", \"--message\", \"{prompt}\"]\n"
        "[pool.max_concurrent]\naider = 3\n[classifier]\ndefault_agent = \"aider\"\n")))
    assert settings.agent_names()[-1] == "aider"
    assert settings.pool.max_concurrent.for_agent("aider") == 3
    assert settings.agents["aider"].success_exit_codes == [0]


def test_corral_serve_bad_agent_table_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "[agents.aider]\ncommand = []\n")
    out = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "agents.aider.command" in out.stderr


def test_corral_serve_bad_key_one_line_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[daemon]\nsocket = \"/tmp/x\"\n")
    out = subprocess.run([sys.executable, "-m", "corral.cli", "serve", "--config", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "daemon.socket: unknown key" in out.stderr
