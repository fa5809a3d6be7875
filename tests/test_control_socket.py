"""The control socket exists only while the daemon accepts on it (issue 9): a client that
connects the instant the path appears is never refused, and a stale socket left by a
killed daemon is replaced."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dashsos.triggers import control_socket
from dashsos.triggers.control_socket import ControlServer

STARTS = 200


def _ping(request: dict[str, Any], peer: str) -> dict[str, Any]:
    return {"ok": True, "cmd": request["cmd"]}


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads often, so the poller gets to run between bind and listen."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


def test_a_client_that_sees_the_path_is_never_refused(tmp_path: Path,
                                                      fast_switching: None) -> None:
    path = tmp_path / "control.sock"
    refused: list[str] = []

    def connect_when_it_appears(armed: threading.Event) -> None:
        armed.set()
        while not os.path.exists(path):
            pass
        try:
            reply = control_socket.request(path, {"cmd": "ping"}, timeout=5)
            assert reply == {"ok": True, "cmd": "ping"}, reply
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            refused.append(repr(exc))

    async def main() -> None:
        for _ in range(STARTS):
            armed = threading.Event()
            client = threading.Thread(target=connect_when_it_appears, args=(armed,))
            client.start()
            armed.wait()
            server = ControlServer(path, _ping)
            await server.start()
            await asyncio.to_thread(client.join)
            await server.stop()
            assert not path.exists()

    asyncio.run(main())
    assert refused == [], f"{len(refused)} of {STARTS} connects refused: {refused[:3]}"


def test_stale_socket_is_replaced_with_mode_0660(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # a killed daemon's: the file stays, nobody listens
    with pytest.raises(ConnectionRefusedError):
        control_socket.request(path, {"cmd": "ping"})

    async def main() -> None:
        server = ControlServer(path, _ping)
        await server.start()
        try:
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
            reply = await asyncio.to_thread(control_socket.request, path, {"cmd": "ping"})
            assert reply["ok"]
            assert sorted(p.name for p in tmp_path.iterdir()) == ["control.sock"]
        finally:
            await server.stop()

    asyncio.run(main())
    assert not path.exists()


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        asyncio.run(ControlServer(path, _ping).start())
    assert path.read_text() == "not a socket"


def test_failed_start_leaves_no_temporary_socket(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def rename(src: Any, dst: Any) -> None:
        raise OSError("rename refused")

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        asyncio.run(ControlServer(tmp_path / "control.sock", _ping).start())
    assert list(tmp_path.iterdir()) == []


def test_stop_leaves_a_successors_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"

    async def main() -> None:
        first, second = ControlServer(path, _ping), ControlServer(path, _ping)
        await first.start()
        await second.start()  # replaces the first's file
        await first.stop()
        assert path.is_socket()
        reply = await asyncio.to_thread(control_socket.request, path, {"cmd": "ping"})
        assert reply["ok"]
        await second.stop()
        assert not path.exists()

    asyncio.run(main())


# --- bounded (issue 12): 2,000 idle clients, deep nesting ---


def test_two_thousand_idle_clients_do_not_delay_a_trigger(daemon: Any) -> None:
    d = daemon()  # with this process's limit (1,024 here), below 2,000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2300:  # the test's own side of 2,000 connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    idle = []
    try:
        for _ in range(2000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.socket))  # blocking: waits while the backlog is full
            idle.append(s)
        time.sleep(0.5)
        start = time.monotonic()
        reply = d.request("trigger")
        took = time.monotonic() - start
        assert reply["ok"], reply
        print(f"trigger answered in {took * 1000:.1f} ms with 2,000 idle clients")
        assert took < 0.1, took
        fds = len(os.listdir(f"/proc/{d.process.pid}/fd"))
        assert fds < 400, fds  # the daemon did not keep them all
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_deeply_nested_request_gets_a_reply(daemon: Any) -> None:
    d = daemon()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(d.socket))
        s.sendall(b'{"cmd": "status", "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n")
        reply = json.loads(s.makefile().readline())
    assert reply["ok"] is False and "nested" in reply["error"], reply
    assert d.request("status")["ok"]
