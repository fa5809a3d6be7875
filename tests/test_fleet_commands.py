"""Commands over a real broker: signed ones work; anything else is refused with a reply
and the daemon keeps running (issue 3, item 4)."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Daemon, wait_for
from dashsos.fleet.commands import sign
from mqttbroker import Broker, Subscriber

BASE = "dashsos/car-1"
KEY = bytes(range(32))


class Fleet:
    """The fleet's side: publishes commands, reads replies in order."""

    def __init__(self, broker: Broker) -> None:
        self.replies: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self.sub = Subscriber(broker.port, f"{BASE}/cmd/+/reply")
        self.sub.client.on_message = lambda c, u, m: self.replies.put(
            (m.topic, json.loads(m.payload)))
        self.pub = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.pub.connect("127.0.0.1", broker.port)
        self.pub.loop_start()

    def send(self, name: str, payload: bytes, timeout: float = 5) -> tuple[str, dict[str, Any]]:
        self.pub.publish(f"{BASE}/cmd/{name}", payload, qos=1).wait_for_publish(5)
        return self.replies.get(timeout=timeout)

    def close(self) -> None:
        self.pub.loop_stop()
        self.pub.disconnect()
        self.sub.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Fleet]]:
    root = tmp_path_factory.mktemp("commands")
    (root / "broker").mkdir()
    (root / "car").mkdir()
    broker = Broker(root / "broker")
    key_file = root / "command.key"
    key_file.write_text(KEY.hex() + "\n")
    d = Daemon(root / "car", {
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port},
        "commands": {"enabled": True, "key_file": str(key_file)},
        "incident": {"post_seconds": 2, "cancel_grace_seconds": 30}})
    wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 15, "mqtt connected")
    fleet = Fleet(broker)
    yield d, fleet
    fleet.close()
    d.stop()
    broker.stop()
    assert KEY.hex() not in d.logs()  # the key is never logged


def test_signed_commands_work(setup: tuple[Daemon, Fleet]) -> None:
    d, fleet = setup
    topic, reply = fleet.send("status", sign("car-1", KEY, "status"))
    assert topic == f"{BASE}/cmd/status/reply" and reply["ok"], reply
    assert reply["result"]["status"]["state"] in ("idle", "cooldown")
    payload = sign("car-1", KEY, "trigger", {"reason": "driver not answering"})
    _, reply = fleet.send("trigger", payload)
    assert reply["ok"] and reply["result"]["outcome"] == "opened", reply
    assert reply["nonce"] == json.loads(payload)["nonce"]
    incident = reply["result"]["incident"]
    assert d.status()["incident"]["trigger"]["kind"] == "mqtt"
    _, reply = fleet.send("cancel", sign("car-1", KEY, "cancel"))
    assert reply["ok"], reply
    assert d.status()["incident"]["cancelled"]["source"].startswith("mqtt command")
    record = d.wait_saved(incident)
    assert record["cancelled"] is not None  # a cancelled incident keeps its evidence
    _, reply = fleet.send("test_call", sign("car-1", KEY, "test_call"))
    assert reply["ok"] and d.status()["incident"]["test"] is True
    assert reply["result"]["incident"] != incident


@pytest.mark.parametrize(("name", "make", "code"), [
    ("trigger", lambda: json.dumps({"ts": time.time(), "nonce": "abcdefgh1234",
                                    "args": {}}).encode(), "malformed"),  # unsigned
    ("trigger", lambda: sign("car-1", bytes(32), "trigger"), "bad_signature"),  # wrong key
    ("trigger", lambda: sign("car-2", KEY, "trigger"), "bad_signature"),  # another car's
    ("trigger", lambda: sign("car-1", KEY, "cancel"), "bad_signature"),  # another command's
    ("trigger", lambda: sign("car-1", KEY, "trigger", ts=time.time() - 120), "stale"),
    ("trigger", lambda: sign("car-1", KEY, "trigger", ts=time.time() + 120), "stale"),
    ("trigger", lambda: b"\xff\xfe not json", "malformed"),
    ("trigger", lambda: b"{" * 5000, "too_large"),
    ("reboot", lambda: sign("car-1", KEY, "reboot"), "unknown_command"),
])
def test_bad_commands_refused_with_reason(setup: tuple[Daemon, Fleet], name: str,
                                          make: Any, code: str) -> None:
    d, fleet = setup
    before = d.status()["incident"]
    _, reply = fleet.send(name, make())
    assert reply["ok"] is False and reply["error"]["code"] == code, reply
    assert d.status()["incident"] == before  # nothing happened


def test_replayed_command_refused(setup: tuple[Daemon, Fleet]) -> None:
    d, fleet = setup
    payload = sign("car-1", KEY, "status")
    assert fleet.send("status", payload)[1]["ok"]
    _, reply = fleet.send("status", payload)
    assert reply["ok"] is False and reply["error"]["code"] == "replayed"


_valid = st.builds(lambda name, args: sign("car-1", KEY, name, args),
                   st.sampled_from(["trigger", "cancel", "test_call", "status"]),
                   st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _mutate(payload: bytes, data: st.DataObject) -> bytes:
    obj = json.loads(payload)
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(st.one_of(st.none(), st.integers(), st.text(max_size=70),
                                   st.floats(), st.lists(st.integers(), max_size=2)))
    return json.dumps(obj).encode()


@settings(max_examples=1100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_generated_garbage_is_refused_and_never_crashes(setup: tuple[Daemon, Fleet],
                                                         data: st.DataObject) -> None:
    d, fleet = setup
    kind = data.draw(st.sampled_from(["bytes", "json", "mutated"]))
    if kind == "bytes":
        payload = data.draw(st.binary(max_size=300))
    elif kind == "json":
        payload = json.dumps(data.draw(st.dictionaries(
            st.sampled_from(["ts", "nonce", "args", "sig", "x"]),
            st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=30)),
            max_size=5))).encode()
    else:
        payload = _mutate(data.draw(_valid), data)
    name = data.draw(st.sampled_from(["trigger", "cancel", "test_call", "status", "x"]))
    _, reply = fleet.send(name, payload)
    assert reply["ok"] is False
    assert reply["error"]["code"] in ("malformed", "bad_signature", "stale", "replayed",
                                      "too_large", "unknown_command")
    assert d.process.poll() is None


def test_daemon_still_healthy_after_the_fuzz(setup: tuple[Daemon, Fleet]) -> None:
    d, fleet = setup
    assert d.process.poll() is None
    _, reply = fleet.send("status", sign("car-1", KEY, "status"))
    assert reply["ok"] and reply["result"]["status"]["links"]["mqtt"]["state"] == "ok"
