"""Who may use the dashboard: whoever has this daemon's token, from the dashboard's own page.

* A random token per daemon run, kept 0600 next to the socket (whose folder is the user's
  alone) and handed out by ``corral ui`` over the socket.
* ``?token=`` once: it becomes an HttpOnly, SameSite=Strict cookie and the browser is sent to
  the same URL without it (so it stays out of history and logs). ``Authorization: Bearer``
  works too. Anything else: 401. Tokens are compared in constant time.
* The ``Host`` must be the dashboard's own address and an ``Origin``, when sent, its own
  origin: a page elsewhere (DNS rebinding, CSRF) gets 403.
* A request that changes anything must carry the token in its ``Authorization`` header; the
  cookie alone, which a browser attaches to any request, is not enough.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

COOKIE = "corral_ui"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_token(path: Path, token: str) -> None:
    """The token, readable by the daemon's user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with open(fd, "w", encoding="ascii") as fh:
        fh.write(token + "\n")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


def _denied(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"code": "forbidden" if status == 403 else
                                        "unauthorized", "message": message}}, status=status)


def guard(token: str, allowed_hosts: Callable[[], set[str]]) -> Callable[..., Awaitable[
        web.StreamResponse]]:
    """The middleware; ``allowed_hosts`` gives the ``host:port`` forms of the dashboard."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        hosts = allowed_hosts()
        if request.host not in hosts:
            return _denied(403, f"this dashboard answers on {sorted(hosts)[0]} only")
        origin = request.headers.get("Origin")
        if origin is not None and origin not in {f"http://{h}" for h in hosts}:
            return _denied(403, "a request from another site")
        from_query = request.query.get("token")
        if from_query is not None:
            if not _same(from_query, token):
                return _denied(401, "wrong token; `corral ui` prints the right URL")
            clean = request.rel_url.with_query(
                {k: v for k, v in request.query.items() if k != "token"})
            response = web.HTTPFound(str(clean))
            response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/")
            raise response
        header = _bearer(request)
        if request.method not in SAFE_METHODS:
            if not _same(header, token):
                return _denied(403, "a change needs the token in the Authorization header")
        elif not (_same(header, token) or _same(request.cookies.get(COOKIE), token)):
            return _denied(401, "no token; open the URL that `corral ui` prints")
        return await handler(request)

    return middleware
