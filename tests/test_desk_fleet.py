"""The desk subscribes to the fleet's MQTT topics: an incident is at the desk from MQTT even
when the car's call cannot get through, with its MSD and position; calls are matched to
incidents by id; anything malformed from the broker is counted and dropped, never fatal
(issue "The desk at scale": telemetry and fleet state over MQTT).

Real mosquitto, a real `dashsos dispatch`, a real car (`dashsos run`), on 127.0.0.1."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Daemon, free_port, toml, wait_for
from dashsos.config import MqttConfig
from dashsos.dispatch import fleet
from dashsos.dispatch.events import EventHub
from dispatcher import CAR_TOKEN, CONSOLE_TOKEN, Dispatcher
from mqttbroker import Broker, Subscriber

VIN = "WVWZZZ1JZXW000001"


class FleetDesk(Dispatcher):
    """The test suite's dispatcher with an [mqtt] section: the fleet's broker."""

    def __init__(self, workdir: Path, broker_port: int, mqtt: dict[str, Any] | None = None,
                 **kw: Any) -> None:
        self.mqtt = {"enabled": True, "host": "127.0.0.1", "port": broker_port,
                     "client_id": f"desk-{workdir.parent.name}"[:60], **(mqtt or {})}
        super().__init__(workdir, **kw)

    def start(self) -> None:
        text = self.config.read_text()
        if "[mqtt]" not in text:
            self.config.write_text(text + "\n" + toml({"mqtt": self.mqtt}))
        super().start()

    def incidents(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("/api/incidents")["incidents"]
        return found

    def incident(self, incident_id: str) -> dict[str, Any] | None:
        return next((i for i in self.incidents() if i["id"] == incident_id), None)

    def link(self) -> dict[str, Any]:
        link: dict[str, Any] = self.api("/api/incidents")["link"]
        return link

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def car_config(tmp_path: Path, broker_port: int, endpoint: str | None = None,
               **sections: dict[str, Any]) -> dict[str, Any]:
    """A car on the broker whose call goes to `endpoint`, by default a closed local port:
    the call fails every time, MQTT is all the desk gets."""
    token = tmp_path / "call.token"
    token.write_text(CAR_TOKEN + "\n")
    config: dict[str, Any] = {
        "vehicle": {"vin": VIN},
        "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker_port},
        "call": {"endpoints": [endpoint or f"http://127.0.0.1:{free_port()}/whip"],
                 "token_file": str(token), "speaker": "none", "redial_max_seconds": 1.0},
        "ice": {"interfaces": ["127.0.0.1"]},
        "prompts": {"enabled": False},
        "incident": {"post_seconds": 5},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return config


class Events:
    """The desk's Server-Sent Events, as a console reads them."""

    def __init__(self, url: str) -> None:
        request = urllib.request.Request(f"{url}/api/events",
                                         headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
        self.response = urllib.request.urlopen(request, timeout=10)

    def next(self, kind: str, predicate: Any, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        event = None
        while time.monotonic() < deadline:
            text = self.response.readline().decode().rstrip("\n")
            if text.startswith("event: "):
                event = text[7:]
            elif text.startswith("data: ") and event == kind:
                data: dict[str, Any] = json.loads(text[6:])
                if predicate(data):
                    return data
        raise AssertionError(f"no {kind} event in {timeout} s")

    def close(self) -> None:
        self.response.close()


def _publish(port: int, messages: list[tuple[str, bytes | str]]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-publisher")
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages:
            client.publish(topic, payload, qos=1).wait_for_publish(5)
    finally:
        client.loop_stop()
        client.disconnect()


# --- the pure checks and the registry, in process ---


def test_checks_keep_what_is_usable() -> None:
    assert fleet.parse_topic("dashsos", "dashsos/car-1/incident") == ("car-1", "incident")
    assert fleet.parse_topic("dashsos", "dashsos/car-1/cmd/trigger") is None
    assert fleet.parse_topic("dashsos", "other/car-1/status") is None
    fix = fleet.check_fix({"lat": 52.5, "lon": 13.4, "epx": 3.0, "speed": "fast",
                           "heading": None, "alt": True})
    assert fix == {"lat": 52.5, "lon": 13.4, "epx": 3.0}  # absent heading stays absent
    assert fleet.check_fix({"lat": 91, "lon": 0}) is None
    assert fleet.check_fix({"lat": float("nan"), "lon": 0}) is None
    assert fleet.check_fix({"lat": True, "lon": 0}) is None
    message, dropped = fleet.check_incident({"id": "i-1", "event": "triggered", "test": "no",
                                             "position": {"lat": 200, "lon": 1},
                                             "msd": "garbage", "trigger": {"kind": 3}})
    assert message == {"id": "i-1", "event": "triggered"}
    assert sorted(dropped) == ["msd", "position", "test", "trigger"]
    for bad in ({"id": 5, "event": "x"}, {"id": "a/b", "event": "x"}, {"id": "", "event": "x"},
                {"id": "i", "event": None}, {"id": "x" * 65, "event": "x"}):
        with pytest.raises(fleet.Rejected):
            fleet.check_incident(bad)
    for payload in (b"not json", b"[1]", b"\xff\xfe", b"{" * 10 + b"}" * 10,
                    b'"' + b"x" * fleet.MAX_PAYLOAD + b'"'):
        with pytest.raises(fleet.Rejected):
            fleet.load_object(payload)
    with pytest.raises(fleet.Rejected):
        fleet.check_status({"state": 3})
    assert fleet.desk_client_id(MqttConfig()).startswith("dashsos-dispatch-")
    assert fleet.desk_client_id(MqttConfig(client_id="mine")) == "mine"


def test_registry_dedups_bounds_and_takes_incidents_from_calls(
        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = EventHub()
    sent: list[tuple[str, dict[str, Any]]] = []
    hub.taps.append(lambda event, data: sent.append((event, data)))
    desk = fleet.Fleet(MqttConfig(), hub, lambda v: v == "car-1", lambda v, i: None)
    assert desk.link()["enabled"] is False and desk.link()["state"] == "off"
    triggered = {"id": "i-1", "event": "triggered", "phase": "triggered", "time": "t1",
                 "position": {"lat": 1.0, "lon": 2.0}, "duress": None}
    desk.call_changed("car-1", triggered)  # the call came first (MQTT is off)
    desk.call_changed("car-1", triggered)  # the same again: no new facts, still published
    (incident,) = desk.incidents_json()
    assert incident["sources"] == ["call"] and incident["position"]["lat"] == 1.0
    assert incident["known_vehicle"] is True and incident["open"] is True
    desk._incident("car-1", dict(triggered), [], "mqtt")  # the same message over MQTT
    assert len(desk.incidents_json()[0]["events"]) == 1
    assert desk.incidents_json()[0]["sources"] == ["call", "mqtt"]
    desk._incident("car-1", {"id": "i-1", "event": "duress", "time": "t2",
                             "duress": {"kind": "pin"}}, [], "mqtt")
    desk._incident("car-1", {"id": "i-1", "event": "evidence_saved", "phase": "saved",
                             "time": "t3"}, [], "mqtt")
    incident = desk.incidents_json()[0]
    assert incident["duress"] == {"kind": "pin"} and incident["open"] is False
    assert [e["event"] for e in incident["events"]] == ["triggered", "duress", "evidence_saved"]
    assert sum(1 for e, _ in sent if e == "incident") == 5
    # A flood of made-up ids: the oldest closed incident goes first, memory stays bounded.
    monkeypatch.setattr(fleet, "INCIDENTS_MAX", 3)
    for n in range(5):
        desk._incident("car-9", {"id": f"f-{n}", "event": "triggered"}, [], "mqtt")
    ids = [i["id"] for i in desk.incidents_json()]
    assert ids == ["f-4", "f-3", "f-2"], ids
    assert desk.incidents_json()[0]["known_vehicle"] is False


# --- end to end ---


@pytest.fixture
def broker(tmp_path: Path) -> Any:
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


@pytest.fixture
def desk(tmp_path: Path, broker: Broker) -> Any:
    d = FleetDesk(tmp_path / "dispatcher", broker.port)
    yield d
    d.stop()


def test_incident_without_a_call_reaches_the_desk(daemon: Any, broker: Broker,
                                                  desk: FleetDesk, tmp_path: Path) -> None:
    wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
    watcher = Subscriber(broker.port, "dashsos/+/incident")
    events = Events(desk.url)
    try:
        car: Daemon = daemon(car_config(tmp_path, broker.port))
        vehicle = wait_for(lambda: next((v for v in desk.api("/api/vehicles")["vehicles"]
                                         if v["vehicle_id"] == "car-1" and v["status"]
                                         and v["online"] and v["location"]), None), 20,
                           "the car's status and location")
        assert vehicle["known"] is True and vehicle["status"]["state"] == "idle"
        assert vehicle["location"]["epx"] == 3.0 and "heading" in vehicle["location"]
        reply = car.trigger()
        sse = events.next("incident", lambda d: d["id"] == reply["incident"])
        assert sse["vehicle_id"] == "car-1" and sse["call"] is None
        incident = desk.incident(reply["incident"])
        assert incident is not None
        assert incident["trigger"]["kind"] == "local" and incident["open"] is True
        assert incident["msd_summary"]["vin"] == VIN
        assert incident["msd_summary"]["test_call"] is False
        assert incident["msd"]["msdStructure"]["vehicleIdentificationNumber"]["isowmi"] == "WVW"
        position = incident["position"]
        assert -90 <= position["lat"] <= 90 and position["epx"] == 3.0
        assert incident["known_vehicle"] is True and incident["sources"] == ["mqtt"]
        # The car keeps trying a dead endpoint: the desk sees it, and no call.
        failed = wait_for(lambda: (i := desk.incident(reply["incident"])) and any(
            e["event"] == "call_failed" for e in i["events"]) and i, 20, "call_failed")
        assert failed["call"] is None
        # Where the car is now: the 1 Hz fixes during the incident.
        wait_for(lambda: desk.incident(reply["incident"])["last_fix"] != position, 10,
                 "a newer fix")
        sent = watcher.json("/incident")
        assert sent and all(m["id"] == reply["incident"] for m in sent if m["id"])
        link = desk.link()
        assert link["rejected"] == 0 and link["received"] > len(sent), link
    finally:
        events.close()
        watcher.close()


def test_malformed_payloads_are_counted_never_fatal(broker: Broker, desk: FleetDesk) -> None:
    wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
    good = {"id": "20260101T000000Z-abcdef", "event": "triggered", "phase": "triggered",
            "time": "2026-01-01T00:00:00.000Z", "test": True,
            "position": {"lat": 52.5, "lon": 13.4, "epx": 4.0}}
    bad: list[tuple[str, bytes | str]] = [
        ("dashsos/car-1/incident", b"not json"),
        ("dashsos/car-1/incident", b"\xff\xfe\x00"),
        ("dashsos/car-1/incident", "[1, 2, 3]"),
        ("dashsos/car-1/incident", json.dumps({"id": 42, "event": "triggered"})),
        ("dashsos/car-1/incident", json.dumps({"id": "../../etc", "event": "triggered"})),
        ("dashsos/car-1/incident", json.dumps({"id": "x", "event": "e", "pad": "y" * 70000})),
        ("dashsos/car-1/location", json.dumps({"lat": "52.5", "lon": 13.4})),
        ("dashsos/car-1/location", json.dumps({"lat": 52.5, "lon": 1e308 * 10})),
        ("dashsos/car-1/status", json.dumps({"sources": {}})),
        ("dashsos/car-1/availability", "maybe"),
        ("dashsos/" + "v" * 80 + "/incident", json.dumps(good)),
    ]
    _publish(broker.port, bad)
    link = wait_for(lambda: (k := desk.link())["rejected"] == len(bad) and k, 10,
                    "every bad message counted")
    assert link["state"] == "ok" and desk.process is not None and desk.process.poll() is None
    assert "rejected a message" in desk.logs()
    assert desk.incidents() == []
    # A message with some fields of the wrong type is kept, without them; a car that is
    # not in car_tokens_file is shown, flagged; a duplicate (QoS 1 redelivery) is ignored.
    partly = {**good, "id": "20260101T000001Z-123456", "msd": "garbage", "trigger": []}
    _publish(broker.port, [("dashsos/car-1/incident", json.dumps(good)),
                           ("dashsos/car-1/incident", json.dumps(good)),
                           ("dashsos/car-1/incident", json.dumps(partly)),
                           ("dashsos/stranger/incident", json.dumps(good))])
    found = wait_for(lambda: len(i := desk.incidents()) == 3 and i, 10, "the good messages")
    by = {(i["vehicle_id"], i["id"]): i for i in found}
    first = by[("car-1", good["id"])]
    assert len(first["events"]) == 1 and first["test"] is True
    assert first["position"] == {"lat": 52.5, "lon": 13.4, "epx": 4.0}
    assert by[("car-1", partly["id"])]["msd"] is None
    assert by[("car-1", partly["id"])]["trigger"] is None
    assert by[("stranger", good["id"])]["known_vehicle"] is False
    assert by[("car-1", good["id"])]["known_vehicle"] is True
    link = desk.link()
    assert link["rejected"] == len(bad) and link["dropped_fields"] == 2, link


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_an_incident_sent_while_the_desk_was_down_reaches_it(
        daemon: Any, broker: Broker, tmp_path: Path, protocol: str) -> None:
    """The desk's session on the broker outlives the desk: what a car sent while the desk
    was stopped (QoS 1, not retained) is delivered when it comes back. Over MQTT 5 that
    takes a session expiry interval (0 by default: the session ends with the connection);
    the car speaks the same protocol."""
    desk = FleetDesk(tmp_path / "dispatcher", broker.port, mqtt={"protocol": protocol})
    watcher = Subscriber(broker.port, "dashsos/+/incident")
    try:
        wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
        desk.stop()
        car: Daemon = daemon(car_config(tmp_path, broker.port, mqtt={"protocol": protocol}))
        wait_for(lambda: car.status()["links"]["mqtt"]["state"] == "ok", 20, "the car online")
        reply = car.trigger()
        watcher.wait_json("/incident", lambda m: m.get("id") == reply["incident"],
                          what="the car's incident on the broker")
        desk.start()
        incident = wait_for(lambda: desk.incident(reply["incident"]), 10,
                            "the incident queued for the desk's session")
        assert incident["vehicle_id"] == "car-1" and incident["trigger"]["kind"] == "local"
        assert incident["msd_summary"]["vin"] == VIN
        # From its first message on, not only what the car sent after the desk was back.
        assert incident["events"][0]["event"] == "triggered", incident["events"]
    finally:
        watcher.close()
        desk.stop()


def test_link_state_follows_the_broker(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.stop()  # the port is known; nothing listens on it yet
    desk = FleetDesk(tmp_path / "dispatcher", broker.port)
    try:
        link = wait_for(lambda: (k := desk.link())["detail"].startswith("cannot connect")
                        and k, 10, "the failed connection reported")
        assert link["state"] == "down" and link["enabled"] is True
        broker.start()
        wait_for(lambda: desk.link()["state"] == "ok", 15, "paho to reconnect by itself")
        broker.stop()
        wait_for(lambda: desk.link()["state"] == "down", 10, "the lost broker reported")
    finally:
        desk.stop()
        broker.stop()


def test_call_is_matched_to_its_incident(daemon: Any, broker: Broker, desk: FleetDesk,
                                         tmp_path: Path) -> None:
    car: Daemon = daemon(car_config(tmp_path, broker.port, desk.whip))
    wait_for(lambda: desk.link()["state"] == "ok", 10, "the desk on the broker")
    car.wait_buffered(2)
    reply = car.trigger()
    call = wait_for(desk.connected, 15, "the call at the desk")
    incident = wait_for(lambda: (i := desk.incident(reply["incident"])) and i["call"]
                        and i["call"]["state"] == "connected" and i, 15, "the match")
    assert incident["call"]["id"] == call["id"]
    assert sorted(incident["sources"]) == ["call", "mqtt"]
    desk.api(f"/api/calls/{call['id']}/hangup", method="POST")
    wait_for(lambda: desk.incident(reply["incident"])["call"]["state"] == "ended", 10,
             "the ended call on the incident")
