"""The car's MQTT client: availability with a last will, retained status, location,
incident messages through the durable outbox, and commands in.

paho-mqtt runs its own network thread and reconnects by itself (connect_async +
loop_start + reconnect_delay_set, backoff capped at RECONNECT_MAX_S); its callbacks hand
over to the asyncio loop. Incident messages are stored in the outbox before paho sees
them and removed on PUBACK. Order: paho gets outbox messages only while connected, at
most WINDOW unacknowledged at a time (its queue stays bounded); after a reconnect paho
re-sends what it holds, and nothing new is handed to it before all of that is
acknowledged. A restarted daemon hands the outbox's remainder first, in id order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from dashsos.config import MqttConfig
from dashsos.fleet.outbox import Outbox, OutboxMessage
from dashsos.fleet.topics import Topics
from dashsos.health import Health, State

log = logging.getLogger(__name__)

CommandHandler = Callable[[str, bytes], None]

# Outbox messages handed to paho and not yet acknowledged, at most.
WINDOW = 100
# Reconnect backoff: 1 s doubling to this, so a broker that returns is found within it.
RECONNECT_MAX_S = 5


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed: paho swallows
    the exception (a TLS verification failure, a refused port) and only retries."""

    last_error = ""

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_error = _describe(exc)
            raise


def _describe(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """Verifies the broker against ca_file (or the system's CAs) and its host name."""
    context = ssl.create_default_context(cafile=config.ca_file or None)
    if config.cert_file:
        context.load_cert_chain(config.cert_file, config.key_file)
    return context


class FleetLink:
    def __init__(self, config: MqttConfig, client_id: str, topics: Topics, outbox: Outbox,
                 on_command: CommandHandler | None = None) -> None:
        self.config = config
        self.topics = topics
        self.outbox = outbox
        self.health = Health("mqtt")
        self._client_id = client_id
        self._on_command = on_command
        self.on_connected: Callable[[], None] | None = None  # runs on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _Client | None = None
        self._outbox_ids: dict[int, int] = {}  # paho message id -> outbox id
        self._handed_to_paho = 0  # highest outbox id paho has been given in this process
        # New messages go to paho only while connected and once what it held across the
        # last disconnect is acknowledged: a slow CONNACK must not let them overtake.
        self._accepting = False
        self.delivered = 0

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.config
        self._loop = loop
        protocol = mqtt.MQTTv5 if c.protocol == "5" else mqtt.MQTTv311
        client = _Client(CallbackAPIVersion.VERSION2, client_id=self._client_id,
                         protocol=protocol)
        client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        if c.tls:
            client.tls_set_context(tls_context(c))
        if c.username:
            password = Path(c.password_file).read_text().strip() if c.password_file else None
            client.username_pw_set(c.username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_S)
        client.max_inflight_messages_set(20)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        self._client = client
        self.health.set(State.DOWN, f"connecting to {c.host}:{c.port}")
        client.connect_async(c.host, c.port, keepalive=c.keepalive)
        client.loop_start()
        # What a previous run left in the outbox goes first, in order, once connected.

    def stop(self) -> None:
        """Publish offline (a clean stop does not fire the will) and disconnect."""
        client = self._client
        if client is None:
            return
        if client.is_connected():
            info = client.publish(self.topics.availability, "offline", qos=1, retain=True)
            try:
                info.wait_for_publish(timeout=2)
            except (RuntimeError, ValueError):
                pass
        client.disconnect()
        client.loop_stop()
        self._client = None

    # --- publishing (loop thread) ---

    def publish_durable(self, topic: str, payload: dict[str, Any], kind: str = "incident",
                        qos: int = 1) -> int:
        """Store, then publish: survives broker outages and restarts."""
        data = json.dumps(payload, separators=(",", ":")).encode()
        message_id = self.outbox.add(topic, data, qos=qos, kind=kind)
        if message_id >= 0:
            self._hand_over_outbox()
        return message_id

    def publish(self, topic: str, payload: dict[str, Any] | str | bytes, *, qos: int = 0,
                retain: bool = False) -> None:
        """Fire and forget (status, idle location, replies): the latest value matters."""
        if self._client is None:
            return
        data = payload if isinstance(payload, str | bytes) else json.dumps(
            payload, separators=(",", ":"))
        if qos == 0 and not self._client.is_connected():
            return  # paho would drop it anyway
        self._client.publish(topic, data, qos=qos, retain=retain)

    def _hand_over_outbox(self) -> None:
        if self._client is None or not self._accepting:
            return
        while (room := WINDOW - len(self._outbox_ids)) > 0 and (
                batch := self.outbox.pending(after_id=self._handed_to_paho, limit=room)):
            for message in batch:
                self._hand_one(message)

    def _hand_one(self, message: OutboxMessage) -> None:
        assert self._client is not None
        info = self._client.publish(message.topic, message.payload, qos=message.qos,
                                    retain=message.retain)
        self._outbox_ids[info.mid] = message.id
        self._handed_to_paho = message.id

    def _acked(self, mid: int) -> None:
        message_id = self._outbox_ids.pop(mid, None)
        if message_id is not None:
            self.outbox.remove(message_id)
            self.delivered += 1
        self._maybe_accept()
        self._hand_over_outbox()

    def _link_up(self) -> None:
        """Connected (on the loop): paho re-sends what it held; new ones wait for that."""
        self._maybe_accept()
        self._hand_over_outbox()
        if self.on_connected is not None:
            self.on_connected()

    def _link_down(self) -> None:
        self._accepting = False

    def _maybe_accept(self) -> None:
        if not self._accepting and not self._outbox_ids and self.connected:
            self._accepting = True

    # --- paho callbacks (paho's thread) ---

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed during shutdown
                pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        if reason_code.is_failure:
            self._set(State.DOWN, f"broker refused the connection: {reason_code}")
            return
        client.publish(self.topics.availability, "online", qos=1, retain=True)
        if self._on_command is not None:
            client.subscribe(self.topics.commands, qos=1)
        self._set(State.OK, f"connected to {self.config.host}:{self.config.port}")
        self._call(self._link_up)

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        reason = getattr(client, "last_error", "") or "connection failed"
        self._set(State.DOWN, f"cannot connect to {self.config.host}:{self.config.port}: "
                              f"{reason}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        self._call(self._link_down)
        self._set(State.DOWN, f"disconnected ({reason_code}); reconnecting")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Any) -> None:
        self._call(self._acked, mid)

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        name = self.topics.command_name(message.topic)
        if name is not None and self._on_command is not None:
            self._call(self._on_command, name, bytes(message.payload))

    def _set(self, state: State, detail: str) -> None:
        if self.health.set(state, detail):
            log.log(logging.INFO if state == State.OK else logging.WARNING, "mqtt %s: %s",
                    state, detail)
