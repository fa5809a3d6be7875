"""What the desk knows about one call: the facts the console shows and call.json keeps."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

RINGING = "ringing"  # offer answered, ICE/DTLS not up yet
CONNECTED = "connected"
SAVING = "saving"  # the call is over; its files (media.mp4 above all) are being finished
ENDED = "ended"  # and finished: media.mp4, telemetry.jsonl, call.json (written last)

# End reasons, as the console shows them.
CAR_HUNG_UP = "car hung up"
OPERATOR_HUNG_UP = "operator hung up"
CONNECTION_FAILED = "connection failed"
CONNECTION_CLOSED = "connection closed"
NEVER_CONNECTED = "never connected"
OFFER_REFUSED = "offer refused"
REPLACED = "replaced by a new call from the car"
DESK_STOPPED = "dispatcher stopped"
DESK_RESTARTED = "dispatcher restarted during the call"
RESTARTED_SAVING = "dispatcher restarted while saving the recording"

# A fix a second is 3,600 an hour; past this the oldest go (telemetry.jsonl keeps all).
TRAIL_MAX = 36_000


def now_iso(at: datetime | None = None) -> str:
    stamp = at or datetime.now(UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def new_call_id(at: datetime | None = None) -> str:
    """`<UTC yyyymmddThhmmssZ>-<6 hex>`: sorts by time, unique enough to name a folder."""
    stamp = at or datetime.now(UTC)
    return f"{stamp:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def _received(saved: Any) -> dict[str, list[float]]:
    """The counts call.json kept, back as counted (what cannot be read is dropped)."""
    out: dict[str, list[float]] = {}
    for kind, counts in (saved.items() if isinstance(saved, dict) else ()):
        try:
            out[kind] = [int(counts["frames"]),
                         datetime.fromisoformat(counts["last"].replace("Z", "+00:00"))
                         .timestamp()]
        except (TypeError, KeyError, ValueError, AttributeError):
            continue
    return out


@dataclass
class CallRecord:
    id: str
    vehicle_id: str
    mode: str  # "call" (two-way, telemetry) or "whip" (ingest only)
    started: str = field(default_factory=now_iso)
    state: str = RINGING
    connected: str | None = None
    ended: str | None = None
    end_reason: str | None = None
    msd: dict[str, Any] | None = None  # the car's incident message
    trail: list[dict[str, Any]] = field(default_factory=list)
    recording: str = ""  # the call's folder
    media: str = "embedded"  # who carries the media: "embedded" (this desk) or "janus"
    # Per kind ("video", "audio"): frames received from the car and when the last came (Unix
    # seconds: counted 80 times a second, formatted only when asked), so a console can
    # tell a live call from one whose media stopped.
    received: dict[str, list[float]] = field(default_factory=dict)
    owner: str | None = None  # the operator who took the call: only they talk or hang up
    taken: str | None = None  # when
    recording_error: str | None = None  # media.mp4 is missing or incomplete: why
    # Through Janus: {"url", "session", "room"}, so that a desk restarted mid-call can end
    # them. Kept in call.json only (a session id is a handle on Janus's API).
    janus: dict[str, Any] | None = None

    @property
    def last_fix(self) -> dict[str, Any] | None:
        return self.trail[-1] if self.trail else None

    @property
    def active(self) -> bool:
        """Ringing or connected: the call is on (a saving one is over)."""
        return self.state in (RINGING, CONNECTED)

    def add_fix(self, fix: dict[str, Any]) -> None:
        self.trail.append(fix)
        if len(self.trail) > TRAIL_MAX:
            del self.trail[: len(self.trail) - TRAIL_MAX]

    def count_frame(self, kind: str) -> None:
        counts = self.received.setdefault(kind, [0, 0.0])
        counts[0] += 1
        counts[1] = time.time()

    def end(self, reason: str) -> bool:
        """The call is over: its files are being saved (`saved` says when they are).
        False if it was over already (the first reason stands)."""
        if not self.active:
            return False
        self.state, self.ended, self.end_reason = SAVING, now_iso(), reason
        return True

    def saved(self) -> None:
        """Its files are finished: the call has ended."""
        self.state = ENDED

    def interrupted(self) -> bool:
        """Found on disk not ended at the desk's start: the desk stopped during the call,
        or while saving it (its recording may be cut short). False if it had ended."""
        if self.state == ENDED:
            return False
        if self.state == SAVING:
            self.end_reason = f"{self.end_reason}; {RESTARTED_SAVING}" if self.end_reason \
                else RESTARTED_SAVING
        else:
            self.end_reason = DESK_RESTARTED
        self.state, self.ended = ENDED, self.ended or now_iso()
        return True

    def as_json(self) -> dict[str, Any]:
        """The call as the console API gives it."""
        return {"id": self.id, "vehicle_id": self.vehicle_id, "mode": self.mode,
                "state": self.state, "started": self.started, "connected": self.connected,
                "ended": self.ended, "end_reason": self.end_reason, "msd": self.msd,
                "trail": self.trail, "last_fix": self.last_fix, "recording": self.recording,
                "media": self.media, "owner": self.owner, "taken": self.taken,
                "recording_error": self.recording_error,
                "received": {kind: {"frames": int(frames),
                                     "last": now_iso(datetime.fromtimestamp(last, UTC))}
                             for kind, (frames, last) in self.received.items()}}

    def as_file(self) -> dict[str, Any]:
        """The call as call.json keeps it: the trail lives in telemetry.jsonl."""
        data = self.as_json()
        del data["trail"]
        data["last_position"] = data.pop("last_fix")
        if self.janus is not None:
            data["janus"] = self.janus
        return data

    @classmethod
    def from_file(cls, data: dict[str, Any], trail: list[dict[str, Any]]) -> CallRecord:
        record = cls(id=str(data["id"]), vehicle_id=str(data.get("vehicle_id", "")),
                     mode=str(data.get("mode", "call")), started=str(data.get("started", "")),
                     state=str(data.get("state", ENDED)), connected=data.get("connected"),
                     ended=data.get("ended"), end_reason=data.get("end_reason"),
                     msd=data.get("msd"), trail=trail,
                     recording=str(data.get("recording", "")),
                     media=str(data.get("media", "embedded")),
                     received=_received(data.get("received")),
                     owner=_text(data.get("owner")), taken=_text(data.get("taken")),
                     recording_error=_text(data.get("recording_error")),
                     janus=data["janus"] if isinstance(data.get("janus"), dict) else None)
        if not record.trail and isinstance(data.get("last_position"), dict):
            record.trail = [data["last_position"]]
        return record


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
