"""The CLI's client for the socket API: standard library only, so commands start fast.

This module must not import the daemon's layers (aiohttp, the store, the pool). Before it sends
anything it checks that the socket, its folder and the process answering on it belong to this
user (or root): a socket someone else put there could read every prompt.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from corral.host.peercred import peer_uid


class DaemonUnreachable(Exception):
    """No daemon answers on the socket."""


class UntrustedSocket(DaemonUnreachable):
    """The socket, its folder or the server on it belongs to another user."""


def _trusted(uid: int) -> bool:
    return uid in (os.getuid(), 0)


def check_socket_owner(socket_path: str) -> None:
    """Refuse a socket (or its folder) owned by another user, before connecting to it."""
    for path in (Path(socket_path).parent, Path(socket_path)):
        try:
            owner = path.lstat().st_uid
        except FileNotFoundError:
            return  # connecting will say there is no daemon
        if not _trusted(owner):
            raise UntrustedSocket(
                f"{path} belongs to uid {owner}, not to you; refusing to send anything there")


class ApiError(Exception):
    """The daemon answered with an error: ``status``, ``code`` and a readable ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, socket_path: str, timeout_s: float | None) -> None:
        super().__init__("localhost", timeout=timeout_s)
        self.socket_path = socket_path

    def connect(self) -> None:
        check_socket_owner(self.socket_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
            uid = peer_uid(sock)
        except OSError:
            sock.close()
            raise
        if uid is not None and not _trusted(uid):
            sock.close()
            raise UntrustedSocket(
                f"the server on {self.socket_path} runs as uid {uid}, not as you;"
                " refusing to send anything there")
        self.sock = sock


class CorralClient:
    """Talks HTTP/JSON to the daemon on ``socket_path``."""

    def __init__(self, socket_path: str, timeout_s: float | None = 90.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s

    def _open(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        if query:
            path = f"{path}?{urlencode({k: v for k, v in query.items() if v is not None})}"
        conn = _UnixConnection(self.socket_path, self.timeout_s)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
        except UntrustedSocket:
            conn.close()
            raise
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            conn.close()
            raise DaemonUnreachable(
                f"no corral daemon on {self.socket_path} ({exc.strerror}); start one with"
                " `corral serve`"
            ) from None
        except OSError as exc:
            conn.close()
            raise DaemonUnreachable(f"cannot talk to {self.socket_path}: {exc}") from None
        if response.status >= 400:
            raw = response.read()
            conn.close()
            raise _api_error(response.status, raw)
        return conn, response

    def request(
        self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None
    ) -> Any:
        conn, response = self._open(method, path, body, query)
        try:
            raw = response.read()
        finally:
            conn.close()
        return json.loads(raw) if raw else None

    def stream(self, path: str, query: dict[str, Any] | None = None) -> Iterator[bytes]:
        """The response body line by line, as the daemon sends it."""
        conn, response = self._open("GET", path, None, query)
        try:
            while line := response.readline():
                yield line
        finally:
            conn.close()


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        err = json.loads(raw)["error"]
        return ApiError(status, str(err["code"]), str(err["message"]))
    except (ValueError, KeyError, TypeError):
        return ApiError(status, "http_error", raw.decode("utf-8", "replace")[:500])
