"""Incidents reach the fleet over a real mosquitto (issue 3, items 1, 2, 5, 6)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from mqttbroker import Broker, Subscriber, make_certs

BASE = "dashsos/car-1"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "broker").mkdir()
    b = Broker(tmp_path / "broker")
    yield b
    b.stop()


def _mqtt(broker: Broker, **extra: Any) -> dict[str, Any]:
    return {"mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                     "status_interval": 2.0, "keepalive": 5, **extra}}


def _config(broker: Broker, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = {**_mqtt(broker), **sections}
    return config


def test_availability_status_and_last_will(daemon: Any, broker: Broker) -> None:
    d: Daemon = daemon(_config(broker))
    sub = Subscriber(broker.port, f"{BASE}/#")
    wait_for(lambda: (f"{BASE}/availability", b"online") in
             [(t, p) for t, p, _, _ in sub.received], 10, "availability online")
    # Published again on every change: the sources come up after the connection.
    status = sub.wait_json("/status", lambda m: m["sources"]["video"]["state"] == "simulated")
    assert status["state"] == "idle" and status["links"]["mqtt"]["state"] == "ok"
    # Retained: a subscriber arriving later still gets both.
    late = Subscriber(broker.port, [f"{BASE}/availability", f"{BASE}/status"])
    wait_for(lambda: {t for t, _, retained, _ in late.received if retained} ==
             {f"{BASE}/availability", f"{BASE}/status"}, 10, "retained availability+status")
    d.stop(signal.SIGKILL)  # the car loses power: the broker publishes the last will
    killed = time.monotonic()
    wait_for(lambda: (f"{BASE}/availability", b"offline") in
             [(t, p) for t, p, _, _ in sub.received], 10, "offline by last will")
    offline_at = next(at for t, p, _, at in sub.received if p == b"offline")
    assert offline_at - killed < 2.0
    sub.close()
    late.close()


def test_clean_stop_publishes_offline(daemon: Any, broker: Broker) -> None:
    d: Daemon = daemon(_config(broker))
    sub = Subscriber(broker.port, f"{BASE}/availability")
    wait_for(lambda: any(p == b"online" for _, p, _, _ in sub.received), 10, "online")
    assert d.stop(signal.SIGTERM) == 0
    wait_for(lambda: any(p == b"offline" for _, p, _, _ in sub.received), 10, "offline")
    sub.close()


def test_incident_phases_in_order_with_msd(daemon: Any, broker: Broker) -> None:
    d: Daemon = daemon(_config(broker, vehicle={"vin": "WVWZZZ1JZXW000001"},
                               incident={"post_seconds": 2, "cancel_grace_seconds": 1}))
    sub = Subscriber(broker.port, f"{BASE}/incident")
    wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 10, "mqtt connected")
    d.wait_buffered(2)
    reply = d.trigger()
    sub.wait_json("/incident", lambda m: m["event"] == "evidence_saved", 30)
    events = [m for m in sub.json("/incident") if m["id"] == reply["incident"]]
    assert [m["event"] for m in events] == ["triggered", "ending", "evidence_saved"]
    msd = events[0]["msd"]["msdStructure"]
    assert msd["control"]["testCall"] is False
    assert msd["control"]["automaticActivation"] is False
    assert msd["vehicleIdentificationNumber"]["isowmi"] == "WVW"
    assert msd["vehicleLocation"]["positionLatitude"] != 2147483647  # a real position
    assert "recentVehicleLocationN1" in msd
    assert events[0]["position"]["lat"] > 52
    assert events[0]["trigger"]["kind"] == "local"
    assert events[0]["signing_key"] == d.status()["evidence"]["key_fingerprint"]
    sub.close()


def test_location_cadence_idle_and_during_incident(daemon: Any, broker: Broker) -> None:
    d: Daemon = daemon(_config(broker, incident={"post_seconds": 5}) | {
        "mqtt": {**_mqtt(broker)["mqtt"], "location_interval": 3.0}})
    sub = Subscriber(broker.port, f"{BASE}/location")
    wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 10, "mqtt connected")
    time.sleep(7.5)
    idle = [at for t, _, _, at in sub.received]
    assert 2 <= len(idle) <= 4, idle  # every 3 s
    gaps = [b - a for a, b in zip(idle, idle[1:], strict=False)]
    assert all(2.0 <= g <= 4.2 for g in gaps), gaps
    d.trigger()
    start = time.monotonic()
    time.sleep(4.2)
    during = [at for t, _, _, at in sub.received if at > start]
    assert 3 <= len(during) <= 6, during  # 1 Hz during the incident
    sub.close()


def test_broker_outage_and_restart_lose_nothing(daemon: Any, broker: Broker) -> None:
    watcher = Subscriber(broker.port, f"{BASE}/incident", client_id="fleet-desk",
                         persistent=True)
    config = _config(broker, incident={"post_seconds": 2, "cancel_grace_seconds": 0.5})
    first: Daemon = daemon(config)
    wait_for(lambda: first.status()["links"]["mqtt"]["state"] == "ok", 10, "connected")
    one = first.trigger()["incident"]
    watcher.wait_json("/incident", lambda m: m["event"] == "triggered")
    broker.stop()  # the broker goes away during the incident
    time.sleep(3.5)  # ending and evidence_saved happen while it is away
    assert first.status()["links"]["mqtt"]["outbox"]["incident"] >= 2
    assert first.stop(signal.SIGTERM) == 0  # and the car restarts while it is away
    second: Daemon = daemon(config | {"storage": {"dir": str(first.state)}})
    two = second.trigger()["incident"]
    time.sleep(3)
    assert second.status()["links"]["mqtt"]["state"] == "down"
    broker.start()
    want = [(one, "triggered"), (one, "ending"), (one, "evidence_saved"),
            (two, "triggered"), (two, "ending"), (two, "evidence_saved")]

    def arrived() -> bool:
        got = [(m["id"], m["event"]) for m in watcher.json("/incident")]
        return len(got) >= len(want)

    wait_for(arrived, 30, "every incident message")
    time.sleep(1.0)  # anything duplicated would arrive now
    got = [(m["id"], m["event"]) for m in watcher.json("/incident")]
    assert got == want  # each exactly once, in order
    wait_for(lambda: second.status()["links"]["mqtt"]["outbox"]["incident"] == 0, 10,
             "the outbox to empty")
    watcher.close()


def test_tls_with_client_certificate_and_password(daemon: Any, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    passwords = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwords), "car-1", "s3cret-Pa55"],
                   check=True)
    (tmp_path / "tlsbroker").mkdir()
    broker = Broker(tmp_path / "tlsbroker", tls=certs, password_file=passwords)
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("s3cret-Pa55\n")
    try:
        tls = {"tls": True, "ca_file": str(certs["ca"]), "cert_file": str(certs["client_cert"]),
               "key_file": str(certs["client_key"]), "username": "car-1",
               "password_file": str(password_file)}
        good: Daemon = daemon(_mqtt(broker, **tls))
        wait_for(lambda: good.status()["links"]["mqtt"]["state"] == "ok", 15, "TLS connect")
        good.stop()
        assert "s3cret-Pa55" not in good.logs()

        bad: Daemon = daemon(_mqtt(broker, **{**tls, "ca_file": str(certs["other_ca"])}))
        link = wait_for(lambda: (m := bad.status()["links"]["mqtt"])["state"] == "down"
                        and "TLS certificate not trusted" in m["detail"] and m, 15,
                        "a clear TLS status")
        assert "self-signed certificate in certificate chain" in link["detail"]
        wait_for(lambda: "TLS certificate not trusted" in bad.logs(), 5, "the log line")
        assert "s3cret-Pa55" not in bad.logs()
    finally:
        broker.stop()


def test_home_assistant_discovery_is_retained(daemon: Any, broker: Broker) -> None:
    daemon(_config(broker, homeassistant={"discovery": True}))
    sub = Subscriber(broker.port, "homeassistant/#")
    wait_for(lambda: len(sub.received) >= 7, 10, "discovery messages")
    time.sleep(0.3)
    late = Subscriber(broker.port, "homeassistant/#")
    wait_for(lambda: len(late.received) >= 7, 10, "retained discovery messages")
    for topic, payload, retained, _ in late.received:
        assert retained and topic.endswith("/config")
        config = json.loads(payload)
        assert config["availability_topic"] == f"{BASE}/availability"
        assert config["unique_id"].startswith("dashsos_car-1")
    sub.close()
    late.close()
