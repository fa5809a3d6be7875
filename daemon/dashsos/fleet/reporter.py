"""What the fleet hears: incident events (durably, with the MSD), status and location.

Carries out the incident machine's Publish and ReportLocation effects, plus one periodic
task; the message shapes live here and nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashsos import __version__, clock
from dashsos.clock import NS
from dashsos.effects import Effect, Publish, ReportLocation
from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import fsync_dir
from dashsos.fleet import discovery
from dashsos.fleet.mqtt import FleetLink
from dashsos.incident import Incident
from dashsos.incident import message as incident_message
from dashsos.location.track import Track

log = logging.getLogger(__name__)

# Events whose order and delivery matter: through the durable outbox.
INCIDENT_QOS = 1
FINAL_EVENTS = ("evidence_saved", "evidence_failed")


class FleetReporter:
    def __init__(self, link: FleetLink, track: Track, status: Callable[[], dict[str, Any]],
                 *, status_interval: float, location_interval: float,
                 discovery_prefix: str | None = None, key_fingerprint: str = "",
                 reported_dir: Path | None = None) -> None:
        self.link = link
        self._track = track
        self._status = status
        self._status_interval_ns = int(status_interval * NS)
        self._location_interval_ns = int(location_interval * NS)
        self._discovery_prefix = discovery_prefix
        self._key_fingerprint = key_fingerprint
        self._reported_dir = reported_dir
        self._last_status_key: tuple[Any, ...] | None = None
        self._last_status_ns = 0
        self._last_location_ns = 0
        self._last_fix_sent: int | None = None
        self._incident_every_ns: int | None = None  # the machine's rate during an incident
        link.on_connected = self._connected

    def _connected(self) -> None:
        # Retained messages are re-published on every connect: the broker may have lost them.
        self._last_status_key = None
        self.publish_status()
        if self._discovery_prefix:
            for topic, payload in discovery.discovery_messages(
                    self.link.topics.base.rsplit("/", 1)[-1], self.link.topics.base,
                    __version__, self._discovery_prefix):
                self.link.publish(topic, payload, qos=1, retain=True)

    # --- the incident machine's effects ---

    def handle(self, effect: Effect) -> None:
        match effect:
            case Publish(incident, event, details):
                self.on_incident(incident, event, details)
            case ReportLocation(every_seconds):
                self._incident_every_ns = None if every_seconds is None \
                    else int(every_seconds * NS)

    def on_incident(self, incident: Incident | None, event: str, details: dict[str, Any]) -> None:
        fix = self._track.last
        message = incident_message(incident, event, details, fix.as_dict() if fix else None)
        if self._key_fingerprint:
            message["signing_key"] = self._key_fingerprint  # so a desk can pin it
        self.link.publish_durable(self.link.topics.incident, message, kind="incident",
                                  qos=INCIDENT_QOS)
        if incident is not None and event in FINAL_EVENTS:
            self.mark_reported(incident.id)
        self.publish_status()

    # --- final events that must survive a power cut between saving and queueing ---

    def mark_reported(self, incident_id: str) -> None:
        """The final event is in the outbox: a restart need not send it again. Kept
        outside the incident's directory, whose files are signed."""
        if self._reported_dir is None:
            return
        try:
            self._reported_dir.mkdir(parents=True, exist_ok=True)
            marker = self._reported_dir / incident_id
            marker.touch()
            fsync_dir(self._reported_dir)
        except OSError as exc:  # sent anyway; at worst reported again after a restart
            STATE.failed(exc, "marking the final event sent")

    def report_unreported(self, incidents: Path) -> int:
        """At start: every finished incident whose final event was never queued (the car
        died in between, or recovery just finished it) is reported now, in order."""
        if self._reported_dir is None or not incidents.is_dir():
            return 0
        sent = 0
        for directory in sorted(p for p in incidents.iterdir()
                                if p.is_dir() and not p.name.startswith(".")):
            if (self._reported_dir / directory.name).exists():
                continue
            try:
                record = json.loads((directory / "incident.json").read_text())
            except (OSError, ValueError):
                continue
            event = {"saved": "evidence_saved", "failed": "evidence_failed",
                     "recovered": "evidence_recovered"}.get(record.get("status"))
            if event is None:
                continue
            self.link.publish_durable(self.link.topics.incident, {
                "id": record.get("id", directory.name), "event": event, "phase": "saved",
                "time": clock.iso(clock.now_ns()), "trigger": record.get("trigger"),
                "test": bool(record.get("test")), "position": record.get("first_position"),
                "details": {"recovery": record.get("recovery")} if event ==
                "evidence_recovered" else {"late": True},
                "msd": record.get("msd"), "signing_key": self._key_fingerprint})
            self.mark_reported(directory.name)
            sent += 1
        return sent

    # --- status and location ---

    def publish_status(self) -> None:
        status = self._status()
        key = (status["state"], tuple(sorted((name, s["state"]) for name, s in
                                             status["sources"].items())),
               (status.get("incident") or {}).get("id"),
               (status.get("storage") or {}).get("state"))
        now = clock.now_ns()
        if key == self._last_status_key and now - self._last_status_ns < self._status_interval_ns:
            return
        self._last_status_key, self._last_status_ns = key, now
        self.link.publish(self.link.topics.status, status, qos=1, retain=True)

    def publish_location(self) -> None:
        fix = self._track.last
        if fix is None or fix.capture_ns == self._last_fix_sent:
            return
        now = clock.now_ns()
        if self._incident_every_ns is not None:
            if now - self._last_location_ns < self._incident_every_ns - NS // 10:
                return
            # During an incident the track matters: through the outbox.
            self.link.publish_durable(self.link.topics.location, fix.as_dict(),
                                      kind="location", qos=1)
        elif self._location_interval_ns and \
                now - self._last_location_ns >= self._location_interval_ns:
            self.link.publish(self.link.topics.location, fix.as_dict(), qos=0)
        else:
            return
        self._last_location_ns, self._last_fix_sent = now, fix.capture_ns

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if STATE.state != "ok" and self._reported_dir is not None:
                    await asyncio.to_thread(STATE.probe, self._reported_dir.parent)
                if self.link.outbox.in_memory:  # the storage failed: store when it works
                    await asyncio.to_thread(self.link.outbox.flush)
                self.publish_status()
                self.publish_location()
            except Exception:  # a reporting fault must not stop the reports
                log.exception("fleet report failed")
