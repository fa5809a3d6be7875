"""Turns an incident into files: the buffered past plus the live post window.

Carries out the incident machine's evidence effects (open, update, close) and reports
the close back through the effect's `done`. Layout per incident:
incidents/<id>/clip.mp4, track.gpx, track.vtt, incident.json.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dashsos import __version__, clock
from dashsos.clock import NS
from dashsos.effects import CloseEvidence, Effect, OpenEvidence, UpdateEvidence
from dashsos.evidence import sidecars
from dashsos.evidence.clip import ClipWriter
from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import make_dirs, write_atomic
from dashsos.evidence.signing import DeviceKey, write_manifest
from dashsos.incident import Incident
from dashsos.location.fix import Fix
from dashsos.location.track import Track
from dashsos.media.bus import PacketBus
from dashsos.media.packet import AudioFormat, VideoFormat
from dashsos.media.ringbuffer import RingBuffer

log = logging.getLogger(__name__)

# Packets reach the writer a little after capture: the clip closes once every stream has
# passed the window's end, or this long after it (a stream that stopped must not hold it).
CLOSE_GRACE_S = 0.5
CLOSE_POLL_S = 0.01
CLOSE_TIMEOUT_S = 30.0
# A writer with packets queued and no progress for this long is stuck (a dead SD card).
STUCK_NS = 10 * NS


SIDECAR_EVERY = 5  # fixes between rewrites of the GPX/VTT while recording


@dataclass
class _Open:
    incident: Incident
    writer: ClipWriter
    unsubscribe: Callable[[], None]
    fixes: list[Fix] = field(default_factory=list)


class EvidenceRecorder:
    def __init__(self, root: Path, vehicle_id: str, bus: PacketBus,
                 buffers: dict[str, RingBuffer], track: Track,
                 formats: dict[str, VideoFormat | AudioFormat],
                 describe_sources: Callable[[], dict[str, Any]],
                 key: DeviceKey | None = None) -> None:
        self.root = root / "incidents"
        self._vehicle_id = vehicle_id
        self._bus = bus
        self._buffers = buffers
        self._track = track
        self._formats = formats
        self._key = key
        self.on_saved: list[Callable[[], None]] = []  # retention, upload
        self._describe_sources = describe_sources
        self._open: dict[str, _Open] = {}
        self._hung: list[str] = []  # incidents whose disk work never finished
        self._closing: set[asyncio.Task[None]] = set()
        # Records, tracks and signatures are written by one thread in order, off the loop.
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "evidence-disk")

    def handle(self, effect: Effect) -> None:
        match effect:
            case OpenEvidence(incident, streams):
                self.open(incident, streams)
            case UpdateEvidence(incident):
                self.extend(incident)
            case CloseEvidence(incident, done):
                task = asyncio.get_running_loop().create_task(self._close_and_report(
                    incident, done))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)

    async def _close_and_report(self, incident: Incident,
                                done: Callable[[bool, str], None]) -> None:
        try:
            ok, reason = await self.close(incident)
        except Exception as exc:  # the incident must still end, and say why
            log.exception("incident %s: saving failed", incident.id)
            ok, reason = False, f"{type(exc).__name__}: {exc}"
        done(ok, reason)

    def stuck(self) -> list[str]:
        """Incidents whose clip writer has work queued and has made no progress lately."""
        now = clock.now_ns()
        return [*self._hung, *(i for i, state in self._open.items()
                               if state.writer.backlog
                               and now - state.writer.progress_ns > STUCK_NS)]

    def directory(self, incident: Incident) -> Path:
        return self.root / incident.id

    async def durable(self, incident: Incident, timeout: float = 2.0) -> None:
        """Until the incident's pre-window is on the medium (at most `timeout`): an
        answered trigger must survive a power cut that follows the answer."""
        state = self._open.get(incident.id)
        if state is not None and not state.writer.spooled.is_set():
            await asyncio.to_thread(state.writer.spooled.wait, timeout)

    def open(self, incident: Incident, streams: tuple[str, ...]) -> None:
        directory = self.directory(incident)
        failed = self._disk(f"incident {incident.id}: creating {directory}",
                            lambda: make_dirs(directory))
        video_snap = self._buffers["video"].snapshot(incident.start_ns) \
            if "video" in self._buffers else []
        first_key = next((p.capture_ns for p in video_snap if p.keyframe), incident.start_ns)
        audio_snap = self._buffers["audio"].snapshot(first_key) \
            if "audio" in self._buffers else []
        # Every stream whose source has not failed, even one still starting (a press at
        # power-on): the writer waits for it rather than leave it out of the clip.
        video = self._formats.get("video") if "video" in streams else None
        audio = self._formats.get("audio") if "audio" in streams else None
        assert video is None or isinstance(video, VideoFormat)
        assert audio is None or isinstance(audio, AudioFormat)
        prewindow = sorted(video_snap + audio_snap, key=lambda p: p.capture_ns)
        # The writer's thread spools the pre-window durably (one fsync), then muxes it.
        writer = ClipWriter(directory / "clip.mp4", video, audio, incident.recording_end_ns(),
                            [] if failed else prewindow)
        if failed:  # no directory: the incident goes on, its evidence fails with the reason
            writer.error = failed
        state = _Open(incident, writer, self._bus.subscribe(writer.put),
                      fixes=self._track.since(first_key - NS))
        self._open[incident.id] = state
        if not failed:
            self._later("writing the record", _write_files,
                        [self._record(incident, state, "recording")])

    def on_fix(self, fix: Fix) -> None:
        for state in self._open.values():
            state.fixes.append(fix)
            if len(state.fixes) % SIDECAR_EVERY == 0:  # a power cut keeps the track so far
                self._later("writing the track", _write_files,
                            self._sidecars(state.incident, state))

    def extend(self, incident: Incident) -> None:
        state = self._open.get(incident.id)
        if state:
            state.writer.end_ns = incident.recording_end_ns()
            self._later("writing the record", _write_files,
                        [self._record(incident, state, "recording")])

    async def close(self, incident: Incident) -> tuple[bool, str]:
        state = self._open.get(incident.id)
        if state is None:
            return False, "no evidence was opened"
        writer = state.writer
        writer.end_ns = min(writer.end_ns, incident.end_ns)
        deadline_ns = incident.end_ns + int(CLOSE_GRACE_S * NS)
        while not writer.passed_end() and clock.now_ns() < deadline_ns:
            await asyncio.sleep(CLOSE_POLL_S)
        state.unsubscribe()
        writer.finish()
        done = await asyncio.to_thread(writer.join, CLOSE_TIMEOUT_S)
        del self._open[incident.id]
        if not done:
            self._hung.append(incident.id)  # the watchdog keeps seeing it: a hung card
        ok = done and writer.error is None and writer.path.exists()
        reason = ""
        if not ok:
            reason = writer.error or ("clip writer timed out" if not done else "no media")
            log.error("incident %s: clip not finished: %s", incident.id, reason)
        files = [*self._sidecars(incident, state),
                 self._record(incident, state, "saved" if ok else "failed")]
        failed = await self._in_pool(incident.id, "writing the record", _write_files, files)
        if self._key is not None and not failed:  # hashing the clip: off the loop too
            failed = await self._in_pool(incident.id, "signing", sign,
                                         self.directory(incident), self._key, self._vehicle_id)
        if failed and ok:
            ok, reason = False, failed
            log.error("incident %s: evidence not saved: %s", incident.id, reason)
        for callback in self.on_saved:
            self._disk("after saving", callback)
        if ok:
            log.warning("incident %s saved in %s", incident.id, self.directory(incident))
        return ok, reason

    async def _in_pool(self, incident_id: str, what: str, fn: Callable[..., Any],
                       *args: Any) -> str:
        """Disk work on the evidence thread, bounded: a card that hangs fails the save
        (with the reason) and is reported to the watchdog instead of waiting forever."""
        work = asyncio.get_running_loop().run_in_executor(self._pool, self._disk, what, fn,
                                                          *args)
        try:
            return await asyncio.wait_for(asyncio.shield(work), CLOSE_TIMEOUT_S)
        except TimeoutError:
            self._hung.append(incident_id)
            return f"{what}: the storage did not answer within {CLOSE_TIMEOUT_S:g} s"

    @staticmethod
    def _disk(what: str, fn: Callable[..., Any], *args: Any) -> str:
        """Run one piece of disk work; a failure is noted as the storage's state and
        returned as the reason ("" when it worked), never raised."""
        try:
            fn(*args)
        except OSError as exc:
            return STATE.failed(exc, what)
        return ""

    def _later(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        self._pool.submit(self._disk, what, fn, *args)

    def _clip_span(self, state: _Open, incident: Incident) -> tuple[int, int]:
        start = state.writer.start_ns or incident.start_ns
        end = state.writer.last_ns or incident.end_ns
        return start, end

    def _sidecars(self, incident: Incident, state: _Open) -> list[tuple[Path, bytes]]:
        start, end = self._clip_span(state, incident)
        fixes = [f for f in state.fixes if f.capture_ns <= end]
        directory = self.directory(incident)
        return [(directory / "track.gpx", sidecars.gpx(fixes, incident.id).encode()),
                (directory / "track.vtt", sidecars.vtt(fixes, start, end).encode())]

    def _record(self, incident: Incident, state: _Open, status: str) -> tuple[Path, bytes]:
        writer = state.writer
        first = next((f for f in state.fixes if f.capture_ns >= incident.trigger.at_ns), None)
        before = [f for f in state.fixes if f.capture_ns < incident.trigger.at_ns]
        position = (before[-1] if before else first)
        record: dict[str, Any] = {
            "id": incident.id,
            "vehicle_id": self._vehicle_id,
            "status": status,
            "test": incident.test,
            "trigger": incident.trigger.as_dict(),
            "triggers": [t.as_dict() for t in incident.triggers],
            "cancelled": incident.cancelled.as_dict() if incident.cancelled else None,
            "duress": incident.duress.as_dict() if incident.duress else None,
            "msd": incident.msd,
            "window": {"from": clock.iso(incident.start_ns), "to": clock.iso(incident.end_ns)},
            "clock": clock.record(incident.trigger.at_ns),
            "first_position": position.as_dict() if position else None,
            "sources": self._describe_sources(),
            "software": f"dashsos {__version__}",
        }
        if writer.start_ns is not None:
            start, end = self._clip_span(state, incident)
            record["clip"] = {
                "file": "clip.mp4", "start": clock.iso(start), "end": clock.iso(end),
                "duration_seconds": round((end - start) / NS, 3),
                "video_frames": writer.video_frames,
                "audio_seconds": round(writer.audio_seconds, 3),
            }
        if writer.error:
            record["clip_error"] = writer.error
        return (self.directory(incident) / "incident.json",
                (json.dumps(record, indent=2, sort_keys=False) + "\n").encode())


def _write_files(files: list[tuple[Path, bytes]]) -> None:
    for path, data in files:
        write_atomic(path, data)




def sign(directory: Path, key: DeviceKey, vehicle_id: str) -> None:
    """manifest.json + manifest.sig over every file of the incident, as it is now."""
    try:
        record = json.loads((directory / "incident.json").read_text())
    except (OSError, ValueError):
        record = {}
    write_manifest(directory, key, {"vehicle_id": vehicle_id, "incident": directory.name,
                                    "status": record.get("status"),
                                    "trigger": record.get("trigger")})
