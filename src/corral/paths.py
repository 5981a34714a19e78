"""Default locations, standard library only (the CLI's client side reads these without pydantic).

``tempfile`` and ``tomllib`` are imported where they are used: together they were a sixth of a
client command's start-up, and most commands need neither.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_socket_path() -> Path:
    """``$XDG_RUNTIME_DIR/corral/corral.sock``, else a per-user folder under the temp dir."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "corral" / "corral.sock"
    import tempfile

    return Path(tempfile.gettempdir()) / f"corral-{os.getuid()}" / "corral.sock"


def default_data_dir() -> Path:
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "corral"


def default_config_path() -> Path:
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "corral" / "config.toml"


def client_socket_path(explicit: str | None, config: str | None) -> Path:
    """Where the CLI looks for the daemon: flag, environment, config file, default."""
    for value in (explicit, os.environ.get("CORRAL_SOCKET"),
                  os.environ.get("CORRAL_DAEMON__SOCKET_PATH")):
        if value:
            return Path(value)
    path = Path(config) if config else default_config_path()
    configured = None
    if path.is_file():
        import tomllib

        try:
            with path.open("rb") as fh:
                configured = tomllib.load(fh).get("daemon", {}).get("socket_path")
        except (OSError, tomllib.TOMLDecodeError, AttributeError):
            configured = None
    return Path(configured) if isinstance(configured, str) and configured else default_socket_path()
