"""Security properties as tests: nothing listens on the car, secrets stay out of logs,
the control socket is private, TLS is verified unless loudly turned off."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from conftest import TCP_LISTEN, Daemon, inet_sockets, wait_for
from mqttbroker import Broker


def test_car_listens_on_no_port_and_keeps_secrets(daemon: Any, tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    secrets = {"mqtt": "mqtt-pa55word-xyz", "call": "call-token-0123456789",
               "turn": "turn-pa55-abcdef"}
    for name, value in secrets.items():
        (tmp_path / f"{name}.secret").write_text(value + "\n")
    try:
        d: Daemon = daemon({
            "mqtt": {"enabled": True, "host": "127.0.0.1", "port": broker.port,
                     "username": "car-1", "password_file": str(tmp_path / "mqtt.secret")},
            "call": {"endpoints": ["http://127.0.0.1:9/whip"],
                     "token_file": str(tmp_path / "call.secret"), "speaker": "none"},
            "ice": {"interfaces": ["127.0.0.1"], "turn_urls": ["turn:127.0.0.1:9"],
                    "turn_username": "car", "turn_password_file": str(tmp_path / "turn.secret")},
        })
        wait_for(lambda: d.status()["links"]["mqtt"]["state"] == "ok", 10, "mqtt up")
        sockets = inet_sockets(d.process.pid)
        listening = [s for s in sockets if s.proto.startswith("tcp") and s.state == TCP_LISTEN]
        udp = [s for s in sockets if s.proto.startswith("udp")]
        assert listening == [] and udp == [], sockets  # only the broker connection
        assert any(s.proto.startswith("tcp") for s in sockets)
        control = os.stat(d.socket)
        assert stat.S_IMODE(control.st_mode) & 0o007 == 0  # not world-accessible
        d.trigger()  # the call fails (nothing at port 9) and is logged with reasons
        wait_for(lambda: d.status()["links"]["call"]["attempts"] >= 2, 15, "call attempts")
        d.stop()
        logs = d.logs()
        assert "call to http://127.0.0.1:9/whip failed" in logs
        for name, value in secrets.items():
            assert value not in logs, f"the {name} secret is in the log"
    finally:
        broker.stop()


def test_turning_tls_verification_off_is_loud(daemon: Any, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t\n")
    d: Daemon = daemon({"call": {"endpoints": ["https://127.0.0.1:9/whip"],
                                 "token_file": str(token), "verify_tls": False}})
    wait_for(lambda: "NOT checked" in d.logs(), 10, "the loud warning")
    line = next(li for li in d.logs().splitlines() if "NOT checked" in li)
    assert "ERROR" in line
