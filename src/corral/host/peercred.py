"""Who is at the other end of a Unix socket (Linux: ``SO_PEERCRED``).

Standard library only: both the daemon (checking its clients) and the CLI (checking the daemon
before it sends a prompt) use it. On another system this is ``getpeereid`` or
``LOCAL_PEERCRED``; where none is available :func:`peer_uid` returns None.
"""

from __future__ import annotations

import socket
import struct

_UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process on the other end of a connected Unix socket, if known."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)
