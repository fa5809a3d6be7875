"""What the daemon says about itself: `dashsos status`, the MQTT status topic, systemd's
STATUS= line and the sources section of every incident record. Read-only: it looks at
the parts, it never changes them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashsos import __version__, clock
from dashsos.call.dialer import Dialer
from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import free_space
from dashsos.evidence.retention import Retention
from dashsos.evidence.upload import Uploader
from dashsos.fleet.mqtt import FleetLink
from dashsos.fleet.outbox import Outbox
from dashsos.health import State
from dashsos.incident import IncidentMachine
from dashsos.location.track import Track
from dashsos.media.ringbuffer import RingBuffer
from dashsos.media.source import Source
from dashsos.triggers.button import PanicButton

SOURCES = ("video", "audio", "gps")


@dataclass
class Status:
    machine: IncidentMachine
    sources: dict[str, Source[Any]]
    buffers: dict[str, RingBuffer]
    track: Track
    storage: Path
    max_buffer_bytes: int
    key_fingerprint: str
    retention: Retention
    link: FleetLink | None = None
    outbox: Outbox | None = None
    dialer: Dialer | None = None
    button: PanicButton | None = None
    uploader: Uploader | None = None
    feedback: Any = None  # dashsos.feedback.Feedback: the indicator and the prompts
    extra: dict[str, Any] = field(default_factory=dict)

    def describe_sources(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in SOURCES:
            source = self.sources.get(name)
            if source is None:
                out[name] = {"backend": "none", "state": str(State.DOWN),
                             "detail": "not configured or not found"}
                continue
            out[name] = {**source.health.as_dict(), "device": source.describe(),
                         "restarts": getattr(source, "restarts", 0)}
            buffer = self.buffers.get(name)
            if buffer is not None:
                out[name]["buffered_seconds"] = round(buffer.seconds, 2)
                out[name]["buffered_bytes"] = buffer.bytes
        if self.button is not None:
            out["button"] = self.button.health.as_dict()
        speaker = self.dialer.speaker if self.dialer is not None else None
        if speaker is not None:
            out["speaker"] = speaker.health.as_dict()
        if self.feedback is not None:
            for name, health in self.feedback.describe().items():
                out.setdefault(name, health)  # the call's own speaker health comes first
        return out

    def __call__(self) -> dict[str, Any]:
        machine = self.machine
        current = machine.current
        sources = self.describe_sources()
        sources["gps"]["last_known"] = self.track.last_known()
        links: dict[str, Any] = {}
        if self.link is not None and self.outbox is not None:
            links["mqtt"] = {**self.link.health.as_dict(), "outbox": self.outbox.counts(),
                             "outbox_dropped": self.outbox.dropped,
                             "outbox_in_memory": self.outbox.in_memory}
        if self.dialer is not None:
            links["call"] = self.dialer.describe()
        return {
            "state": machine.state,
            "covert": machine.covert,
            "links": links,
            "incident": current.as_dict() if current else None,
            "last_incident": machine.last.as_dict() if machine.last else None,
            "sources": sources,
            "buffer": {"seconds": min((b.seconds for b in self.buffers.values()), default=0.0),
                       "bytes": sum(b.bytes for b in self.buffers.values()),
                       "max_bytes": self.max_buffer_bytes},
            "storage": {"dir": str(self.storage), **STATE.as_dict(), **self._space(),
                        "retention": self.retention.report.as_dict()
                        if self.retention.report else None,
                        "upload": self.uploader.state if self.uploader else None},
            "evidence": {"key_fingerprint": self.key_fingerprint},
            "version": __version__,
            "time": clock.iso(clock.now_ns()),
            "clock_source": clock.source(),
            **self.extra,
        }

    def _space(self) -> dict[str, int | None]:
        try:
            return {**free_space(self.storage)}
        except OSError:  # not even there (read-only storage at start): unknown, not 0
            return {"free_bytes": None, "total_bytes": None}

    def summary(self) -> str:
        """One line for systemd's STATUS= and people."""
        parts = []
        for name in SOURCES:
            source = self.sources.get(name)
            if source is None:
                parts.append(f"{name} none")
                continue
            health = source.health
            problem = health.state in (State.DEGRADED, State.DOWN)
            parts.append(f"{name} {health.state}" + (f" ({health.detail})" if problem else ""))
        if self.link is not None:
            parts.append(f"mqtt {self.link.health.state}")
        if STATE.state != "ok":
            parts.append(f"storage {STATE.state}")
        state = self.machine.state
        current = self.machine.current
        incident = f"incident {current.id} {state}" if current else state
        return f"{incident}; " + ", ".join(parts)
