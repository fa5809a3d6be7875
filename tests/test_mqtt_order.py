"""MQTT order across a slow or hung broker (issue 12): a broker that answers CONNECT 4 s
late (a TCP proxy in front of mosquitto holds the broker's first bytes) and one hung
with SIGSTOP for 20 s. Every incident message and every incident-time location reaches
the desk in the order the car made it; nothing new overtakes the backlog."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from mqttbroker import Broker, Subscriber


class SlowConnackProxy:
    """127.0.0.1 TCP proxy; with `delay` set, the broker's bytes on a new connection
    (its CONNACK first) reach the client only `delay` seconds after it connected."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.delay = 0.0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            try:
                broker = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            broker.settimeout(None)
            with self._lock:
                self._conns += [client, broker]
            start = time.monotonic()
            threading.Thread(target=self._pump, args=(client, broker, 0.0, 0.0),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(broker, client, start, self.delay),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, start: float,
              delay: float) -> None:
        try:
            while data := src.recv(65536):
                wait = start + delay - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def sever(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self._closed = True
        self._server.close()
        self.sever()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker")
    yield b
    if b.process is not None and b.process.poll() is None:
        b.process.send_signal(signal.SIGCONT)
    b.stop()


def _in_order(desk: Subscriber) -> tuple[list[dict[str, Any]], list[str]]:
    """Messages as first received (a QoS 1 re-delivery is not a new message), and
    every place where one arrived before an older one on its topic."""
    seen: set[bytes] = set()
    firsts: list[dict[str, Any]] = []
    for topic, payload, _, _ in list(desk.received):
        if payload in seen:
            continue
        seen.add(payload)
        message = json.loads(payload)
        message["_topic"] = topic.rsplit("/", 1)[-1]
        firsts.append(message)
    problems = []
    for topic, key in (("incident", "time"), ("location", "received")):
        mine = [m for m in firsts if m["_topic"] == topic]
        for earlier, later in zip(mine, mine[1:], strict=False):
            if later[key] < earlier[key]:
                problems.append(f"{topic} {later.get('event')} {later[key]} after "
                                f"{earlier.get('event')} {earlier[key]}")
    return firsts, problems


def test_order_kept_through_slow_connack_and_hung_broker(tmp_path: Path, daemon: Any,
                                                         broker: Broker) -> None:
    proxy = SlowConnackProxy(broker.port)
    desk = Subscriber(broker.port, ["dashsos/+/incident", "dashsos/+/location"],
                      client_id="desk", persistent=True)
    try:
        d: Daemon = daemon({
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": proxy.port,
                     "keepalive": 5, "location_interval": 0},
            "incident": {"post_seconds": 8, "cancel_grace_seconds": 0},
            "log": {"level": "info"}})
        wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 15, "mqtt up")
        d.wait_buffered(2)
        incident = d.trigger()["incident"]
        desk.wait_json("/incident", lambda m: m["id"] == incident and
                       m["event"] == "triggered")

        # 1. The broker answers CONNECT 4 s late; the car keeps producing meanwhile.
        proxy.delay = 4.0
        proxy.sever()
        for _ in range(10):
            d.trigger()
            time.sleep(0.5)
        proxy.delay = 0.0
        wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 15, "mqtt back")

        # 2. The broker hangs for 20 s (SIGSTOP); the car keeps producing.
        assert broker.process is not None
        broker.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 20:
            d.trigger()
            time.sleep(1.0)
        broker.process.send_signal(signal.SIGCONT)

        desk.wait_json("/incident", lambda m: m["id"] == incident and m["event"] in (
            "evidence_saved", "evidence_failed"), 60, "the incident's end")
        wait_for(lambda: sum(d.status()["links"]["mqtt"]["outbox"].values()) == 0, 30,
                 "the outbox to drain")
        messages, problems = _in_order(desk)
        events = [m["event"] for m in messages if m["_topic"] == "incident"
                  and m["id"] == incident]
        assert events[0] == "triggered", events
        assert events[-1] in ("evidence_saved", "evidence_failed"), events
        assert events.count("extended") >= 25, events
        assert not problems, problems
        print(f"{len(messages)} messages in order, {events.count('extended')} extended")
    finally:
        desk.close()
        proxy.close()
