"""The desk's view of the fleet over MQTT: every car's `incident`, `location`, `status` and
`availability` topics, so an incident is on the console the moment the car publishes it,
even when its call never gets through. Calls are matched to incidents by incident id (a
call's MSD is the car's incident message).

paho runs its own network thread and reconnects by itself; that thread only parses and
checks what arrives (the pure functions below) and hands the result to the event loop
with call_soon_threadsafe. The registry is touched on the loop only.

Nothing from the broker is trusted: a message that is not a JSON object with a usable id
is rejected (counted, logged, dropped); a field of the wrong type is dropped and the rest
kept, because an incident with a broken MSD is still an emergency. A vehicle that is not
in car_tokens_file is shown, flagged: the broker's ACL decides who publishes, the tokens
file only who may call this desk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from dashsos.config import MqttConfig
from dashsos.dispatch.events import EventHub
from dashsos.dispatch.record import now_iso
from dashsos.fleet.mqtt import RECONNECT_MAX_S, tls_context
from dashsos.fleet.mqtt import _Client as ReportingClient  # keeps why a connect failed
from dashsos.health import Health, State

log = logging.getLogger(__name__)

KINDS = ("incident", "location", "status", "availability")
MAX_PAYLOAD = 64 * 1024  # a triggered message with its MSD is about 2 KiB
MAX_NAME = 64  # vehicle and incident ids
INCIDENTS_MAX = 1000  # a flood of made-up ids must not grow the desk without bound
VEHICLES_MAX = 5000
EVENTS_KEPT = 50  # per incident, for the console's history line
CLOSED_PHASES = ("saved", "failed")  # any other phase, known or not, is shown as open
WARN_EVERY = 5.0  # seconds between warnings about bad payloads (all are counted)

CallFor = Callable[[str, str], dict[str, Any] | None]  # (vehicle, incident id) -> call


class Rejected(ValueError):
    """A message the desk cannot use at all; the text says why."""


# --- checking what arrives (pure; paho's thread) ---


def parse_topic(base: str, topic: str) -> tuple[str, str] | None:
    """(vehicle id, kind) of `<base>/<vehicle>/<kind>`, or None for any other topic."""
    prefix = base.rstrip("/") + "/"
    if not topic.startswith(prefix):
        return None
    vehicle, _, kind = topic[len(prefix):].partition("/")
    if kind not in KINDS:
        return None
    return vehicle, kind


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME \
            or not value.isprintable() or any(c in value for c in "/+#"):
        raise Rejected(f"{what}: not a usable id: {str(value)[:MAX_NAME]!r}")
    return value


def load_object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD:
        raise Rejected(f"payload of {len(payload)} bytes (at most {MAX_PAYLOAD})")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Rejected(f"not a JSON object but {type(data).__name__}")
    return data


def _number(value: Any, low: float, high: float) -> float | None:
    # bool is an int in Python: true is not a latitude.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) and low <= number <= high else None


FIX_RANGES = {"alt": (-1000.0, 100_000.0), "speed": (0.0, 1000.0), "heading": (0.0, 360.0),
              "climb": (-1000.0, 1000.0), "epx": (0.0, 1e6), "epy": (0.0, 1e6),
              "epv": (0.0, 1e6), "eps": (0.0, 1e6), "mode": (0.0, 3.0)}


def check_fix(value: Any) -> dict[str, Any] | None:
    """A position as the car sends it, with only the fields that make sense; None without
    a usable lat/lon. Absent fields stay absent (an absent heading is unknown, not 0)."""
    if not isinstance(value, dict):
        return None
    lat, lon = _number(value.get("lat"), -90, 90), _number(value.get("lon"), -180, 180)
    if lat is None or lon is None:
        return None
    fix: dict[str, Any] = {"lat": lat, "lon": lon}
    for key, (low, high) in FIX_RANGES.items():
        number = _number(value.get(key), low, high)
        if number is not None:
            fix[key] = int(number) if key == "mode" else number
    for key in ("time", "received"):
        if isinstance(value.get(key), str) and len(value[key]) <= 40:
            fix[key] = value[key]
    return fix


def msd_summary(msd: Any) -> dict[str, Any] | None:
    """The MSD's essentials, type-checked, for the console's list."""
    if not isinstance(msd, dict):
        return None
    structure = msd.get("msdStructure")
    structure = structure if isinstance(structure, dict) else {}
    control = structure.get("control")
    control = control if isinstance(control, dict) else {}
    vin_parts = structure.get("vehicleIdentificationNumber")
    vin = None
    if isinstance(vin_parts, dict):
        parts = [vin_parts.get(k) for k in ("isowmi", "isovds", "isovisModelyear",
                                            "isovisSeqPlant")]
        if all(isinstance(p, str) for p in parts):
            vin = "".join(str(p) for p in parts)[:40]
    decoded = msd.get("decoded")
    decoded = decoded if isinstance(decoded, dict) else {}

    def flag(name: str) -> bool | None:
        return control[name] if isinstance(control.get(name), bool) else None

    direction = _number(decoded.get("direction_degrees"), 0, 360)
    return {"vin": vin, "test_call": flag("testCall"),
            "automatic": flag("automaticActivation"),
            "position_trusted": flag("positionCanBeTrusted"),
            "lat": _number(decoded.get("latitude"), -90, 90),
            "lon": _number(decoded.get("longitude"), -180, 180),
            "direction": direction}


def check_trigger(value: Any) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not isinstance(value.get("kind"), str):
        return None
    out: dict[str, Any] = {"kind": value["kind"][:MAX_NAME]}
    for key in ("source", "time"):
        if isinstance(value.get(key), str):
            out[key] = value[key][:200]
    if isinstance(value.get("automatic"), bool):
        out["automatic"] = value["automatic"]
    return out


def check_incident(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The usable part of an incident message and the fields dropped from it."""
    incident_id = check_name(data.get("id"), "id")
    event = data.get("event")
    if not isinstance(event, str) or not 0 < len(event) <= MAX_NAME:
        raise Rejected(f"event: not a string: {str(event)[:MAX_NAME]!r}")
    out: dict[str, Any] = {"id": incident_id, "event": event}
    dropped: list[str] = []

    def keep(key: str, ok: bool, value: Any) -> None:
        if key not in data or data[key] is None:
            return
        if ok:
            out[key] = value
        else:
            dropped.append(key)

    raw = data.get
    phase, stamp = raw("phase"), raw("time")
    keep("phase", isinstance(phase, str) and len(phase) <= MAX_NAME, phase)
    keep("time", isinstance(stamp, str) and len(stamp) <= 40, stamp)
    keep("clock_source", isinstance(raw("clock_source"), str), str(raw("clock_source"))[:20])
    trigger = check_trigger(raw("trigger"))
    keep("trigger", trigger is not None, trigger)
    keep("test", isinstance(raw("test"), bool), raw("test"))
    keep("covert", isinstance(raw("covert"), bool), raw("covert"))
    keep("duress", isinstance(raw("duress"), dict), raw("duress"))
    fix = check_fix(raw("position"))
    keep("position", fix is not None, fix)
    summary = msd_summary(raw("msd"))
    keep("msd", summary is not None, raw("msd"))
    if summary is not None:
        out["msd_summary"] = summary
    keep("details", isinstance(raw("details"), dict), raw("details"))
    return out, dropped


def check_status(data: dict[str, Any]) -> dict[str, Any]:
    """The essentials of a car's (large) status message."""
    state = data.get("state")
    if not isinstance(state, str) or len(state) > MAX_NAME:
        raise Rejected("state: not a string")

    def states(value: Any) -> dict[str, str]:
        if not isinstance(value, dict):
            return {}
        return {str(k)[:MAX_NAME]: v["state"] for k, v in list(value.items())[:20]
                if isinstance(v, dict) and isinstance(v.get("state"), str)}

    incident = data.get("incident")
    return {"state": state,
            "incident": incident.get("id") if isinstance(incident, dict)
            and isinstance(incident.get("id"), str) else None,
            "covert": data.get("covert") if isinstance(data.get("covert"), bool) else None,
            "time": data["time"] if isinstance(data.get("time"), str) else None,
            "version": data["version"] if isinstance(data.get("version"), str) else None,
            "sources": states(data.get("sources")), "links": states(data.get("links"))}


# --- the registry (the event loop) ---


@dataclass
class FleetIncident:
    id: str
    vehicle_id: str
    first_seen: str = field(default_factory=now_iso)
    updated: str = ""
    phase: str | None = None
    event: str = ""
    event_time: str | None = None
    clock_source: str | None = None
    trigger: dict[str, Any] | None = None
    test: bool = False
    covert: bool = False
    duress: dict[str, Any] | None = None
    position: dict[str, Any] | None = None  # where the car was at the first message
    last_fix: dict[str, Any] | None = None
    msd: dict[str, Any] | None = None
    msd_summary: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # "mqtt", "call"
    seen: set[tuple[str, str | None]] = field(default_factory=set)  # (event, time)
    order: float = field(default_factory=time.monotonic)

    @property
    def open(self) -> bool:
        return self.phase not in CLOSED_PHASES

    def apply(self, message: dict[str, Any], source: str) -> bool:
        """Take one checked message; False for a duplicate (QoS 1 is at least once)."""
        new_source = source not in self.sources
        if new_source:
            self.sources.append(source)
        key = (message["event"], message.get("time"))
        if key in self.seen:
            return new_source
        self.seen.add(key)
        self.updated = now_iso()
        self.event, self.event_time = message["event"], message.get("time")
        self.events = [*self.events, {"event": self.event, "time": self.event_time,
                                      "received": self.updated}][-EVENTS_KEPT:]
        for name in ("phase", "clock_source", "trigger", "msd", "msd_summary"):
            if message.get(name) is not None:
                setattr(self, name, message[name])
        self.test = message.get("test", self.test)
        self.covert = message.get("covert", self.covert)
        if message.get("duress") is not None:
            self.duress = message["duress"]  # sticky: the desk must not miss it
        if message.get("position") is not None:
            self.position = self.position or message["position"]
            self.last_fix = message["position"]
        return True

    def as_json(self, call: dict[str, Any] | None, known: bool) -> dict[str, Any]:
        return {"id": self.id, "vehicle_id": self.vehicle_id, "known_vehicle": known,
                "open": self.open, "phase": self.phase, "event": self.event,
                "event_time": self.event_time, "clock_source": self.clock_source,
                "trigger": self.trigger, "test": self.test, "covert": self.covert,
                "duress": self.duress, "position": self.position, "last_fix": self.last_fix,
                "msd": self.msd, "msd_summary": self.msd_summary, "events": self.events,
                "first_seen": self.first_seen, "updated": self.updated,
                "sources": self.sources, "call": call}


@dataclass
class Vehicle:
    id: str
    online: bool | None = None
    location: dict[str, Any] | None = None
    location_received: str | None = None
    status: dict[str, Any] | None = None
    status_received: str | None = None
    updated: str = field(default_factory=now_iso)

    def as_json(self, known: bool) -> dict[str, Any]:
        return {"vehicle_id": self.id, "known": known, "online": self.online,
                "location": self.location, "location_received": self.location_received,
                "status": self.status, "status_received": self.status_received,
                "updated": self.updated}


def desk_client_id(config: MqttConfig) -> str:
    """Never the car's default (dashsos-<vehicle>): the broker would cut one of the two."""
    return config.client_id or f"dashsos-dispatch-{socket.gethostname()}"


class Fleet:
    def __init__(self, config: MqttConfig, hub: EventHub, known: Callable[[str], bool],
                 call_for: CallFor) -> None:
        self.config = config
        self.hub = hub
        self._known = known
        self._call_for = call_for
        self.health = Health("mqtt")
        if not config.enabled:
            self.health.set(State.DOWN, "off (mqtt.enabled is false)")
        self.incidents: dict[tuple[str, str], FleetIncident] = {}
        self.vehicles: dict[str, Vehicle] = {}
        self.received = 0
        self.rejected = 0
        self.dropped_fields = 0
        self.last_rejected: dict[str, Any] | None = None
        self._warned = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: ReportingClient | None = None

    # --- the link ---

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.config
        if not c.enabled:
            return
        self._loop = loop
        v5 = c.protocol == "5"
        # A persistent session: the broker keeps QoS 1 incident messages for a desk that
        # restarts (the client id is stable per host).
        client = ReportingClient(CallbackAPIVersion.VERSION2, client_id=desk_client_id(c),
                                 protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                 clean_session=None if v5 else False)
        if c.tls:
            client.tls_set_context(tls_context(c))
        if c.username:
            password = Path(c.password_file).read_text().strip() if c.password_file else None
            client.username_pw_set(c.username, password)
        client.reconnect_delay_set(min_delay=1, max_delay=RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self._client = client
        self._set(State.DOWN, f"connecting to {c.host}:{c.port}")
        properties = None
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 86400
        client.connect_async(c.host, c.port, keepalive=c.keepalive,
                             clean_start=False if v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                             properties=properties)
        client.loop_start()

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def link(self) -> dict[str, Any]:
        """The MQTT link as the API and the console show it."""
        c = self.config
        health = self.health.as_dict()
        if not c.enabled:
            health["state"] = "off"
        return {"enabled": c.enabled, **health,
                "broker": f"{c.host}:{c.port}" if c.enabled else None,
                "topics": [f"{c.base_topic.rstrip('/')}/+/{k}" for k in KINDS]
                if c.enabled else [],
                "received": self.received, "rejected": self.rejected,
                "dropped_fields": self.dropped_fields, "last_rejected": self.last_rejected}

    # --- paho callbacks (paho's thread) ---

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed during shutdown
                pass

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Any) -> None:
        c = self.config
        if reason_code.is_failure:
            self._call(self._set, State.DOWN, f"broker refused the connection: {reason_code}")
            return
        base = c.base_topic.rstrip("/")
        # Incidents at QoS 1: none lost between broker and desk. The rest is "latest
        # wins" (status is retained, so every car's last one arrives at once).
        client.subscribe([(f"{base}/+/incident", 1), (f"{base}/+/location", 0),
                          (f"{base}/+/status", 0), (f"{base}/+/availability", 1)])
        self._call(self._set, State.OK, f"connected to {c.host}:{c.port}")

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        reason = getattr(client, "last_error", "") or "connection failed"
        self._call(self._set, State.DOWN,
                   f"cannot connect to {self.config.host}:{self.config.port}: {reason}")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Any) -> None:
        if self._client is None:
            return  # stop(): not a lost link
        self._call(self._set, State.DOWN, f"disconnected ({reason_code}); reconnecting")

    def _on_message(self, client: mqtt.Client, userdata: Any,
                    message: mqtt.MQTTMessage) -> None:
        where = parse_topic(self.config.base_topic, message.topic)
        if where is None:
            return  # not ours (a broker may deliver overlapping subscriptions)
        vehicle, kind = where
        try:
            check_name(vehicle, "vehicle id in the topic")
            payload = bytes(message.payload)
            if kind == "availability":
                text = payload.decode("utf-8", "replace")
                if text not in ("online", "offline"):
                    raise Rejected(f"availability: {text[:20]!r}")
                self._call(self._availability, vehicle, text == "online")
                return
            data = load_object(payload)
            if kind == "incident":
                checked, dropped = check_incident(data)
                self._call(self._incident, vehicle, checked, dropped, "mqtt")
            elif kind == "location":
                fix = check_fix(data)
                if fix is None:
                    raise Rejected("location: no usable lat/lon")
                self._call(self._location, vehicle, fix)
            else:
                self._call(self._status, vehicle, check_status(data))
        except Rejected as exc:
            self._call(self._reject, message.topic, str(exc))
        except Exception:  # a bug here must not stop paho's thread: count it and go on
            log.exception("fleet: message on %s", message.topic)
            self._call(self._reject, message.topic, "internal error (see the desk's log)")

    # --- applying (the event loop) ---

    def _set(self, state: State, detail: str) -> None:
        if self.health.set(state, detail):
            log.log(logging.INFO if state == State.OK else logging.WARNING, "fleet mqtt %s: %s",
                    state, detail)
            self.hub.publish("fleet", self.link())

    def _reject(self, topic: str, reason: str) -> None:
        self.received += 1
        self.rejected += 1
        self.last_rejected = {"topic": topic[:200], "reason": reason[:200], "at": now_iso()}
        self._warn("fleet: rejected a message on %s: %s (%d rejected so far)", topic[:200],
                   reason[:200], self.rejected)
        self.hub.publish("fleet", self.link())

    def _warn(self, text: str, *args: Any) -> None:
        # Every bad message is counted; a flood of them is not a flood of log lines.
        now = time.monotonic()
        level = logging.WARNING if now - self._warned >= WARN_EVERY else logging.DEBUG
        if level == logging.WARNING:
            self._warned = now
        log.log(level, text, *args)

    def _vehicle(self, vehicle_id: str) -> Vehicle:
        vehicle = self.vehicles.get(vehicle_id)
        if vehicle is None:
            if len(self.vehicles) >= VEHICLES_MAX:
                oldest = min(self.vehicles.values(), key=lambda v: v.updated)
                del self.vehicles[oldest.id]
            vehicle = self.vehicles[vehicle_id] = Vehicle(vehicle_id)
        vehicle.updated = now_iso()
        return vehicle

    def _publish_vehicle(self, vehicle: Vehicle) -> None:
        self.hub.publish("vehicle", vehicle.as_json(self._known(vehicle.id)))

    def _availability(self, vehicle_id: str, online: bool) -> None:
        self.received += 1
        vehicle = self._vehicle(vehicle_id)
        vehicle.online = online
        self._publish_vehicle(vehicle)

    def _status(self, vehicle_id: str, status: dict[str, Any]) -> None:
        self.received += 1
        vehicle = self._vehicle(vehicle_id)
        vehicle.status, vehicle.status_received = status, now_iso()
        self._publish_vehicle(vehicle)

    def _location(self, vehicle_id: str, fix: dict[str, Any]) -> None:
        self.received += 1
        vehicle = self._vehicle(vehicle_id)
        vehicle.location, vehicle.location_received = fix, now_iso()
        self._publish_vehicle(vehicle)
        incident = self._open_incident(vehicle_id)
        if incident is not None:
            incident.last_fix, incident.updated = fix, now_iso()
            self._publish_incident(incident)

    def _incident(self, vehicle_id: str, message: dict[str, Any], dropped: list[str],
                  source: str) -> bool:
        """Apply a checked message; True when the consoles were told."""
        if source == "mqtt":
            self.received += 1
            self._vehicle(vehicle_id)
        if dropped:
            self.dropped_fields += len(dropped)
            self.last_rejected = {"topic": f"{vehicle_id}/incident",
                                  "reason": f"fields dropped: {', '.join(dropped)}",
                                  "at": now_iso()}
            self._warn("fleet: incident %s of %s: dropped fields of the wrong type: %s",
                       message["id"], vehicle_id, ", ".join(dropped))
        key = (vehicle_id, message["id"])
        incident = self.incidents.get(key)
        if incident is None:
            self._make_room()
            incident = self.incidents[key] = FleetIncident(message["id"], vehicle_id)
            log.info("incident %s of %s (%s, from %s)", message["id"], vehicle_id,
                     message["event"], source)
        if not incident.apply(message, source):
            return False
        self._publish_incident(incident)
        return True

    def _make_room(self) -> None:
        if len(self.incidents) < INCIDENTS_MAX:
            return
        # The oldest closed incident goes first; only a flood evicts open ones.
        victims = sorted(self.incidents.values(), key=lambda i: (i.open, i.order))
        del self.incidents[(victims[0].vehicle_id, victims[0].id)]

    def _open_incident(self, vehicle_id: str) -> FleetIncident | None:
        mine = [i for i in self.incidents.values() if i.vehicle_id == vehicle_id and i.open]
        return max(mine, key=lambda i: i.order) if mine else None

    def _publish_incident(self, incident: FleetIncident) -> None:
        self.hub.publish("incident", self.incident_json(incident))

    # --- for the desk ---

    def incident_json(self, incident: FleetIncident) -> dict[str, Any]:
        return incident.as_json(self._call_for(incident.vehicle_id, incident.id),
                                self._known(incident.vehicle_id))

    def call_changed(self, vehicle_id: str, msd: Any) -> None:
        """A call's record changed: its MSD (the car's incident message) names the
        incident; a call that arrived before (or without) MQTT creates it."""
        if not isinstance(msd, dict):
            return
        try:
            check_name(vehicle_id, "vehicle id")
            message, dropped = check_incident(msd)
        except Rejected as exc:
            log.debug("call of %s: MSD not usable as an incident: %s", vehicle_id, exc)
            return
        if not self._incident(vehicle_id, message, dropped, "call"):
            incident = self.incidents.get((vehicle_id, message["id"]))
            if incident is not None:
                self._publish_incident(incident)  # the call's own state changed

    def incidents_json(self) -> list[dict[str, Any]]:
        """Every incident the desk holds, newest first."""
        return [self.incident_json(i) for i in sorted(self.incidents.values(),
                                                      key=lambda i: i.order, reverse=True)]

    def vehicles_json(self) -> list[dict[str, Any]]:
        return [v.as_json(self._known(v.id)) for v in sorted(self.vehicles.values(),
                                                              key=lambda v: v.id)]
