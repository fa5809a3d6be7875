"""A private mosquitto per test or session, on a loopback port, and a subscriber."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from conftest import free_port, listening, wait_for


class Broker:
    def __init__(self, workdir: Path, *, tls: dict[str, Path] | None = None,
                 password_file: Path | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        lines = [f"listener {self.port} 127.0.0.1", "persistence true",
                 f"persistence_location {workdir}/", "log_dest stderr",
                 f"allow_anonymous {'false' if password_file else 'true'}"]
        if password_file:
            lines.append(f"password_file {password_file}")
        if tls:
            lines += [f"cafile {tls['ca']}", f"certfile {tls['cert']}",
                      f"keyfile {tls['key']}", "require_certificate true",
                      "tls_version tlsv1.2"]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto` and cannot write its db
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log,
                                            stderr=subprocess.STDOUT)
        wait_for(self._listening, 10, "mosquitto to listen")

    def _listening(self) -> bool:
        return listening(self.port)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # saves its persistence file
            self.process.wait(timeout=10)


class Subscriber:
    """A paho client in the test, collecting what it receives."""

    def __init__(self, port: int, topics: str | list[str], *, client_id: str = "",
                 persistent: bool = False, tls: dict[str, Path] | None = None) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.received: list[tuple[str, bytes, bool, float]] = []
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             clean_session=not persistent)
        if tls:
            client.tls_set(ca_certs=str(tls["ca"]), certfile=str(tls["client_cert"]),
                           keyfile=str(tls["client_key"]))
        self._topics = [topics] if isinstance(topics, str) else topics
        client.on_connect = lambda c, u, f, rc, p: [c.subscribe(t, qos=1) for t in self._topics]
        client.on_message = self._on_message
        client.reconnect_delay_set(0.2, 1)
        client.connect_async("127.0.0.1", port, keepalive=10)
        client.loop_start()
        self.client = client
        wait_for(client.is_connected, 10, "the test subscriber to connect")
        time.sleep(0.2)  # the subscription is acknowledged

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.received.append((message.topic, bytes(message.payload), bool(message.retain),
                              time.monotonic()))
        self.messages.put(message)

    def json(self, topic_suffix: str) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p, _, _ in list(self.received) if t.endswith(topic_suffix)]

    def wait_json(self, topic_suffix: str, predicate: Any, timeout: float = 20,
                  what: str = "") -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((m for m in self.json(topic_suffix) if predicate(m)), None)

        result: dict[str, Any] = wait_for(find, timeout, what or f"a message on {topic_suffix}")
        return result

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    def issue(name: str, subject: str, ca: str, extensions: str) -> None:
        run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", subject)
        (directory / f"{name}.ext").write_text(extensions)
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")

    for ca in ("ca", "other_ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key", "-out",
            f"{ca}.crt", "-days", "2", "-subj", f"/CN=dashsos test {ca}")
    issue("server", "/CN=localhost", "ca",
          "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    issue("client", "/CN=car-1", "ca", "extendedKeyUsage=clientAuth\n")
    return {"ca": directory / "ca.crt", "other_ca": directory / "other_ca.crt",
            "cert": directory / "server.crt", "key": directory / "server.key",
            "client_cert": directory / "client.crt", "client_key": directory / "client.key"}
