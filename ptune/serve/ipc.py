"""How ``ptune serve``'s two processes talk: ZeroMQ push/pull sockets over Unix-domain (``ipc://``) paths in a
private folder, one each way, and every message one MessagePack map (no pickle: a message is data, never code).

The HTTP process binds both sockets and the engine process connects to them (``ptune.serve.engine``), so the
folder, made with mode 0700 by ``tempfile.mkdtemp``, is the only way in: nothing listens on the network.
Requests go ``{"op": "submit" | "cancel" | "shutdown", ...}``; the engine sends back
``{"events": [...]}`` (a turn's events at once, ``ptune.serve.scheduler``), and once at start ``{"ready": ...}``
or ``{"failed": ...}``. Neither side imports torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import zmq

REQUESTS, EVENTS = "requests", "events"


def address(folder: Path, name: str) -> str:
    return f"ipc://{Path(folder) / name}"


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(data, raw=False)


def socket(context: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    """A socket that drops unsent messages when closed (a dead peer must not hang the exit)."""
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock
