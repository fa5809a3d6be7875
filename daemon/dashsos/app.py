"""Wires the parts together, owns their lifetimes, and answers status."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from dashsos import __version__, clock, devices
from dashsos.clock import NS
from dashsos.config import Config
from dashsos.evidence.files import free_space
from dashsos.evidence.recorder import EvidenceRecorder
from dashsos.health import State
from dashsos.incident import IncidentMachine
from dashsos.location.fix import Fix
from dashsos.location.track import Track
from dashsos.media.bus import PacketBus
from dashsos.media.packet import AudioFormat, Packet, VideoFormat
from dashsos.media.ringbuffer import RingBuffer
from dashsos.media.source import Source
from dashsos.triggers.control_socket import ControlServer

log = logging.getLogger(__name__)

# A source that says it is recording but has delivered nothing for this long is stalled.
STALL_NS = 3 * NS
VIDEO_SHARE = 0.9  # of buffer.max_bytes; audio gets the rest


class App:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.video = devices.video_source(config)
        self.audio = devices.audio_source(config)
        self.gps = devices.gps_source(config)
        self.track = Track(config.gps.track_seconds)
        self.buffers: dict[str, RingBuffer] = {}
        kfi = config.video.keyframe_interval
        if self.video:
            self.buffers["video"] = RingBuffer(config.buffer.pre_seconds,
                                               int(config.buffer.max_bytes * VIDEO_SHARE), kfi)
        if self.audio:
            self.buffers["audio"] = RingBuffer(config.buffer.pre_seconds,
                                               int(config.buffer.max_bytes * (1 - VIDEO_SHARE)))
        self.storage = Path(config.storage.dir)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _sources(self) -> dict[str, Source[Any]]:
        found: dict[str, Source[Any] | None] = {"video": self.video, "audio": self.audio,
                                                "gps": self.gps}
        return {name: s for name, s in found.items() if s is not None}

    async def run(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.storage / "incidents").mkdir(exist_ok=True)
        self.bus = PacketBus(loop)
        self.bus.subscribe(self._buffer)
        self.evidence = EvidenceRecorder(
            self.storage, self.config.vehicle.id, self.bus, self.buffers, self.track,
            self.recording_formats, self.describe_sources)
        self.incidents = IncidentMachine(self.evidence, self.config.buffer.pre_seconds,
                                         self.config.incident.post_seconds)
        self.control = ControlServer(Path(self.config.control.socket), self.handle)
        await self.control.start()
        for name, source in self._sources().items():
            if name == "gps":
                source.start(self._on_fix_threadsafe)
            else:
                source.start(self.bus.publish_threadsafe)
            log.info("%s: %s", name, source.describe())
        for name in ("video", "audio", "gps"):
            if name not in self._sources():
                log.warning("%s: none configured or found; recording without it", name)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        self._tasks.append(loop.create_task(self._watch_stalls()))
        log.info("dashsos %s running; vehicle %s; evidence in %s", __version__,
                 self.config.vehicle.id, self.storage)
        await self._stopping.wait()
        await self.shutdown()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    async def shutdown(self) -> None:
        log.info("shutting down")
        for task in self._tasks:
            task.cancel()
        await self.incidents.shutdown()
        for source in self._sources().values():
            await asyncio.to_thread(source.stop)
        await self.control.stop()
        log.info("stopped")

    def recording_formats(self) -> tuple[VideoFormat | None, AudioFormat | None]:
        """The formats of the streams that have data now: what a new clip will hold."""
        video = self.video.format if self.video and ("video" in self.bus.last_ns) else None
        audio = self.audio.format if self.audio and self.audio.health.recording and \
            len(self.buffers["audio"]) else None
        return video, audio

    def _buffer(self, packet: Packet) -> None:
        buffer = self.buffers.get(packet.stream)
        if buffer is not None:
            buffer.push(packet)

    def _on_fix_threadsafe(self, fix: Fix) -> None:
        try:
            self._loop.call_soon_threadsafe(self._on_fix, fix)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _on_fix(self, fix: Fix) -> None:
        self.track.add(fix)
        self.evidence.on_fix(fix)

    async def _watch_stalls(self) -> None:
        """A device can stop delivering without an error (a frozen camera): say so."""
        while True:
            await asyncio.sleep(1.0)
            now = clock.now_ns()
            for name in ("video", "audio"):
                source = self._sources().get(name)
                last = self.bus.last_ns.get(name)
                stalled = bool(source and source.health.recording and last
                               and now - last > STALL_NS)
                if stalled and source and source.health.set(
                        State.DEGRADED, f"stalled: no data for over {STALL_NS // NS} s"):
                    log.warning("%s stalled", name)

    # --- control ---

    def handle(self, request: dict[str, Any], peer: str) -> dict[str, Any]:
        cmd = request["cmd"]
        if cmd == "trigger":
            incident, opened = self.incidents.trigger("local", peer)
            return {"ok": True, "incident": incident.id, "opened": opened,
                    "directory": str(self.evidence.directory(incident)),
                    "ends": clock.iso(incident.end_ns)}
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        return {"ok": False, "error": f"unknown command {cmd!r} (known: trigger, status)"}

    def describe_sources(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("video", "audio", "gps"):
            source = self._sources().get(name)
            if source is None:
                out[name] = {"backend": "none", "state": str(State.DOWN),
                             "detail": "not configured or not found"}
                continue
            out[name] = {**source.health.as_dict(), "device": source.describe()}
            buffer = self.buffers.get(name)
            if buffer is not None:
                out[name]["buffered_seconds"] = round(buffer.seconds, 2)
                out[name]["buffered_bytes"] = buffer.bytes
        return out

    def status(self) -> dict[str, Any]:
        current = self.incidents.current
        sources = self.describe_sources()
        sources["gps"]["last_known"] = self.track.last_known()
        return {
            "state": str(current.phase) if current else "idle",
            "incident": current.as_dict() if current else None,
            "last_incident": self.incidents.last.as_dict() if self.incidents.last else None,
            "sources": sources,
            "buffer": {"seconds": min((b.seconds for b in self.buffers.values()), default=0.0),
                       "bytes": sum(b.bytes for b in self.buffers.values()),
                       "max_bytes": self.config.buffer.max_bytes},
            "storage": {"dir": str(self.storage), **free_space(self.storage)},
            "version": __version__,
            "time": clock.iso(clock.now_ns()),
        }
