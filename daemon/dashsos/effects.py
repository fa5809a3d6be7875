"""What the incident machine asks the rest of the daemon to do.

The machine decides; each effect is carried out by the one part that owns the I/O
(evidence recorder, dialer, fleet reporter) and that part reports back to the machine
as an event. Handlers `match` on the effects they own and ignore the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dashsos.incident import Incident


@dataclass(frozen=True)
class OpenEvidence:
    """Start the clip: the buffer from `incident.start_ns`, then live packets. `streams`
    are the sources to wait for (every configured one that has not failed)."""

    incident: Incident
    streams: tuple[str, ...]


@dataclass(frozen=True)
class UpdateEvidence:
    """The incident changed (extended, cancelled, un-cancelled): the record says so now."""

    incident: Incident


@dataclass(frozen=True)
class CloseEvidence:
    """Finish clip, sidecars, record and signature; call `done(ok, reason)` when finished."""

    incident: Incident
    done: Callable[[bool, str], None] = field(compare=False)


@dataclass(frozen=True)
class Dial:
    """Call the dispatcher (one round through the endpoints) and report back."""

    incident: Incident


@dataclass(frozen=True)
class HangUp:
    incident: Incident
    reason: str


@dataclass(frozen=True)
class Publish:
    """An incident event for the fleet (MQTT, durable), the dispatcher (data channel) and
    the log: triggered, extended, cancelled, calling, connected, evidence_saved, ..."""

    incident: Incident | None
    event: str
    details: dict[str, Any]


@dataclass(frozen=True)
class ReportLocation:
    """How often the fleet hears where the car is: `None` is the idle period from config."""

    every_seconds: float | None


@dataclass(frozen=True)
class Indicate:
    """What the car's indicator light shows now: off, heartbeat, slow_blink, steady,
    fast_blink, double_blink or fault (feedback/indicator.py draws them). Never emitted
    in covert mode."""

    pattern: str


@dataclass(frozen=True)
class Prompt:
    """Say a prompt on the car's speaker: calling, connected, cancelled, no_connection,
    test (feedback/prompts.py). Never emitted in covert mode."""

    name: str


@dataclass(frozen=True)
class MuteSpeaker:
    """The call's audio to the car off (a duress cancel) or back on (the incident ended)."""

    muted: bool


Effect = (OpenEvidence | UpdateEvidence | CloseEvidence | Dial | HangUp | Publish
          | ReportLocation | Indicate | Prompt | MuteSpeaker)
EffectHandler = Callable[[Effect], None]
