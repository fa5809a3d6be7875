"""Local control over a Unix socket: one JSON request per line, one JSON reply.

No TCP port: only processes on the car with access to the socket (mode 0660, the
dashsos group) can trigger or read status. The peer's uid is recorded as the source.

Bounded: at most MAX_CONNECTIONS clients wait for their request line; one more closes the
one that has waited longest, so idle clients cannot use up descriptors nor keep a trigger
waiting. A request nested deeper than MAX_DEPTH is refused with a reply, unparsed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A reply, or one to await (a trigger is answered once its evidence is durable).
Handler = Callable[[dict[str, Any], str], dict[str, Any] | Awaitable[dict[str, Any]]]
MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 64
MAX_DEPTH = 32


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.AbstractServer | None = None
        self._inode = 0  # of our socket file, so stop() never removes a successor's
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # oldest first
        self.evicted = 0

    async def start(self) -> None:
        """Listen, then appear: the path exists only while someone accepts on it.

        The socket is bound and listening under a temporary name in the same directory,
        then renamed into place in one step. A client that sees the path can connect, and a
        stale socket left by a killed daemon is replaced by the rename."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and not self.path.is_socket():
            raise FileExistsError(f"{self.path} exists and is not a socket")
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()  # a killed daemon's that had our pid
            old = os.umask(0o117)  # created 0660 with no window of wider access
            try:
                sock.bind(str(temp))
            finally:
                os.umask(old)
            os.chmod(temp, 0o660)
            sock.listen(512)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock,
                                                           limit=MAX_REQUEST)
            self._inode = temp.stat().st_ino
            os.rename(temp, self.path)
        except BaseException:
            if self._server is not None:
                self._server.close()
                self._server = None
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        log.info("control socket at %s", self.path)

    async def stop(self) -> None:
        # Gone from the path first, so no client finds a socket that refuses it.
        with contextlib.suppress(FileNotFoundError):
            if self._inode and self.path.stat().st_ino == self._inode:
                self.path.unlink()
        if self._server:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._waiting[writer] = None
        if len(self._waiting) > MAX_CONNECTIONS:
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.close()  # its task sees EOF and ends
            self.evicted += 1
            if self.evicted in (1, 10, 100, 1000) or self.evicted % 10_000 == 0:
                log.warning("control socket: more than %d clients waiting; closed the "
                            "longest-waiting (%d so far)", MAX_CONNECTIONS, self.evicted)
        peer = _peer(writer)
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=10)
            if self._waiting.pop(writer, True) is True or not line:
                return  # evicted, or gone without a request
            try:
                if _depth(line) > MAX_DEPTH:
                    raise ValueError(f"nested deeper than {MAX_DEPTH}")
                request = json.loads(line)
                if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                    raise ValueError("expected a JSON object with a string 'cmd'")
                answer = self._handler(request, peer)
                reply = await answer if inspect.isawaitable(answer) else answer
            except ValueError as exc:
                reply = {"ok": False, "error": f"bad request: {exc}"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.info("control socket client %s dropped: %s", peer, exc)
        finally:
            self._waiting.pop(writer, None)
            writer.close()


def _depth(line: bytes) -> int:
    """How deep the JSON's arrays and objects nest (brackets inside strings not counted)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _peer(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return f"control socket uid {uid} pid {pid}"
    except (OSError, AttributeError):
        return "control socket"


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to a running daemon (the CLI's side)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply
