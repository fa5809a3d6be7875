"""Wires the parts together, owns their lifetimes, and answers status."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from dashsos import __version__, clock, devices
from dashsos.call.dialer import Dialer, ssl_context
from dashsos.clock import NS
from dashsos.config import Config
from dashsos.evidence.files import free_space
from dashsos.evidence.recorder import EvidenceRecorder, sign
from dashsos.evidence.recovery import recover
from dashsos.evidence.retention import PruneReport, Quota, prune
from dashsos.evidence.signing import DeviceKey
from dashsos.evidence.upload import Uploader
from dashsos.fleet.commands import CommandVerifier, load_key
from dashsos.fleet.mqtt import FleetLink
from dashsos.fleet.outbox import Outbox
from dashsos.fleet.reporter import FleetReporter
from dashsos.fleet.topics import Topics
from dashsos.health import State
from dashsos.incident import Incident, IncidentMachine
from dashsos.location.fix import Fix
from dashsos.location.motion import SuddenStopDetector
from dashsos.location.track import Track
from dashsos.media.bus import PacketBus
from dashsos.media.packet import AudioFormat, Packet, VideoFormat
from dashsos.media.ringbuffer import RingBuffer
from dashsos.media.source import Source
from dashsos.msd import Vehicle, build_msd
from dashsos.service import Notifier
from dashsos.triggers import button
from dashsos.triggers.control_socket import ControlServer
from dashsos.triggers.mqtt_command import CommandHandler

log = logging.getLogger(__name__)

# A source that says it is recording but has delivered nothing for this long is stalled.
STALL_NS = 3 * NS
READY_TIMEOUT_S = 15.0  # READY=1 by then even if a source is still down: say so in STATUS
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
        self.crash = SuddenStopDetector(config.auto_trigger) \
            if config.auto_trigger.gps_crash else None
        self.vehicle = Vehicle(config.vehicle.vin, config.vehicle.type,
                               config.vehicle.propulsion)
        self.link: FleetLink | None = None
        self.reporter: FleetReporter | None = None
        self.button: button.PanicButton | None = None
        self.dialer: Dialer | None = None
        self.notifier = Notifier()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def _sources(self) -> dict[str, Source[Any]]:
        found: dict[str, Source[Any] | None] = {"video": self.video, "audio": self.audio,
                                                "gps": self.gps}
        return {name: s for name, s in found.items() if s is not None}

    async def run(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # first: a stop while starting is clean
            loop.add_signal_handler(sig, self._stopping.set)
        self.storage.mkdir(parents=True, exist_ok=True)
        (self.storage / "incidents").mkdir(exist_ok=True)
        # The device key signs every incident; a desk pins its fingerprint.
        self.key = DeviceKey.load_or_create(self.storage / "device.key")
        # Before anything records: finish what a power cut left open.
        self.recovered = recover(self.storage / "incidents")
        # Recovered incidents, and any a power cut caught between saving and signing.
        for directory in sorted((self.storage / "incidents").iterdir()):
            if directory.is_dir() and not directory.name.startswith(".") \
                    and not (directory / "manifest.sig").exists():
                sign(directory, self.key, self.config.vehicle.id)
        self.quota = Quota(self.config.storage.max_bytes, self.config.storage.max_percent,
                           self.config.storage.min_free_bytes)
        self.prune_report: PruneReport | None = None
        self._prune()
        self.uploader: Uploader | None = None
        c = self.config
        if c.upload.enabled and c.upload.endpoint:
            token_file = c.upload.token_file or c.call.token_file
            token = Path(token_file).read_text().strip() if token_file else ""
            self.uploader = Uploader(self.storage / "incidents", c.upload.endpoint, token,
                                     ssl=ssl_context(c.call), interval=c.upload.interval,
                                     chunk_bytes=c.upload.chunk_bytes, timeout=c.upload.timeout)
            self._tasks.append(loop.create_task(self.uploader.run()))
        self.bus = PacketBus(loop)
        self.bus.subscribe(self._buffer)
        self.evidence = EvidenceRecorder(
            self.storage, self.config.vehicle.id, self.bus, self.buffers, self.track,
            self.recording_formats, self.describe_sources, key=self.key,
            on_saved=lambda incident: self._on_saved())
        c = self.config
        self.incidents = IncidentMachine(
            self.evidence, pre_seconds=c.buffer.pre_seconds,
            post_seconds=c.incident.post_seconds, grace_seconds=c.incident.cancel_grace_seconds,
            cooldown_seconds=c.incident.cooldown_seconds, covert=c.incident.covert)
        # The MSD first: every listener after it (MQTT, the record) sends it along.
        self.incidents.listeners.append(self._attach_msd)
        if c.call.endpoints:
            self._start_call()
        if c.mqtt.enabled:
            self._start_fleet(loop)
        self.control = ControlServer(Path(self.config.control.socket), self.handle)
        await self.control.start()
        self.button = button.make(c.button, loop, self._pressed, self._long_pressed)
        for name, source in self._sources().items():
            if name == "gps":
                source.start(self._on_fix_threadsafe)
            else:
                source.start(self.bus.publish_threadsafe)
            log.info("%s: %s", name, source.describe())
        for name in ("video", "audio", "gps"):
            if name not in self._sources():
                log.warning("%s: none configured or found; recording without it", name)
        self._tasks.append(loop.create_task(self._watch_stalls()))
        self._tasks.append(loop.create_task(self._supervise()))
        log.info("dashsos %s running; vehicle %s; evidence in %s", __version__,
                 self.config.vehicle.id, self.storage)
        await self._stopping.wait()
        await self.shutdown()
        return 0

    def stop(self) -> None:
        self._stopping.set()

    def _start_fleet(self, loop: asyncio.AbstractEventLoop) -> None:
        c = self.config
        topics = Topics.for_vehicle(c.mqtt.base_topic, c.vehicle.id)
        self.outbox = Outbox(self.storage / "state.db", c.mqtt.outbox_max)
        handler = None
        if c.commands.enabled:
            verifier = CommandVerifier(c.vehicle.id, load_key(Path(c.commands.key_file)),
                                       max_skew=c.commands.max_skew_seconds)
            handler = CommandHandler(verifier, c.commands.allowed, self.incidents, self.status)
        self.link = FleetLink(c.mqtt, c.mqtt.client_id or f"dashsos-{c.vehicle.id}", topics,
                              self.outbox, handler)
        if handler is not None:
            handler.link = self.link
        self.reporter = FleetReporter(
            self.link, self.track, self.status, status_interval=c.mqtt.status_interval,
            location_interval=c.mqtt.location_interval,
            discovery_prefix=c.homeassistant.prefix if c.homeassistant.discovery else None,
            key_fingerprint=self.key.fingerprint, reported_dir=self.storage / "reported")
        self.incidents.listeners.append(self.reporter.on_incident)
        # Recovered incidents, and final events a power cut kept from the outbox.
        self.reporter.report_unreported(self.storage / "incidents")
        if self.dialer is not None:
            self.dialer.listeners.append(self.reporter.on_incident)
        self.link.start(loop)
        self._tasks.append(loop.create_task(self.reporter.run()))

    def _on_saved(self) -> None:
        self._prune()
        if self.uploader is not None:
            self.uploader.poke()

    def _prune(self) -> None:
        """Keep the disk from filling: uploaded incidents go, oldest first."""
        current = self.incidents.current if hasattr(self, "incidents") else None
        self.prune_report = prune(self.storage / "incidents", self.quota,
                                  open_ids={current.id} if current else set())
        if self.prune_report.over_quota:
            log.warning("storage over quota with incidents not yet uploaded: %s",
                        ", ".join(self.prune_report.kept_unsafe))

    def _start_call(self) -> None:
        video = self.video
        self.dialer = Dialer(
            self.config.call, self.config.ice, self.bus, self.incidents,
            has_video=video is not None, has_audio=self.audio is not None,
            request_keyframe=video.request_keyframe if video else lambda: None,
            last_fix=lambda: self.track.last, covert=self.config.incident.covert)
        self.incidents.listeners.append(self.dialer.on_incident)

    def _attach_msd(self, incident: Incident | None, event: str, details: dict[str, Any]) -> None:
        if incident is None or event not in ("triggered", "extended"):
            return
        if event == "extended" and not details.get("no_longer_test"):
            return
        fix = self.track.last
        fresh = fix if fix and clock.now_ns() - fix.capture_ns < 10 * NS else None
        incident.msd = build_msd(
            message_id=1 if event == "triggered" else 2, automatic=incident.trigger.automatic,
            test_call=incident.test, vehicle=self.vehicle,
            triggered_ns=incident.trigger.at_ns, position=fresh,
            previous=self.track.previous(2) if fresh else [])

    def _pressed(self) -> None:
        self.incidents.trigger("panic_button", f"button {self.config.button.pin}")

    def _long_pressed(self) -> None:
        self.incidents.cancel(f"button {self.config.button.pin} long press")

    async def shutdown(self) -> None:
        log.info("shutting down")
        self.notifier.stopping()
        for task in self._tasks:
            task.cancel()
        if self.button is not None:
            self.button.close()
        if self.dialer is not None:
            await self.dialer.shutdown()  # hang up properly before the incident closes
        await self.incidents.shutdown()
        for source in self._sources().values():
            await asyncio.to_thread(source.stop)
        await self.control.stop()
        if self.link is not None:
            if self.reporter is not None:
                self.reporter.publish_status()
            await asyncio.to_thread(self.link.stop)
            self.outbox.close()
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
        if self.dialer is not None:
            self.dialer.on_fix(fix)
        if self.crash is not None:
            stop = self.crash.feed(fix)
            if stop:
                self.incidents.trigger("gps_crash", f"sudden stop: {stop}", automatic=True)

    def stalled(self) -> list[str]:
        return [name for name, s in self._sources().items()
                if s.health.detail.startswith("stalled")]

    def summary(self) -> str:
        """One line for systemd's STATUS= and people."""
        parts = []
        for name, source in self._sources().items():
            health = source.health
            problem = health.state in (State.DEGRADED, State.DOWN)
            parts.append(f"{name} {health.state}" + (f" ({health.detail})" if problem else ""))
        for name in ("video", "audio", "gps"):
            if name not in self._sources():
                parts.append(f"{name} none")
        if self.link is not None:
            parts.append(f"mqtt {self.link.health.state}")
        state = self.incidents.state
        current = self.incidents.current
        incident = f"incident {current.id} {state}" if current else state
        return f"{incident}; " + ", ".join(parts)

    async def _supervise(self) -> None:
        """READY once the sources are up (or after READY_TIMEOUT_S, degraded); then
        STATUS on change and WATCHDOG while the loop and every pipeline make progress."""
        started = asyncio.get_running_loop().time()
        while True:
            sources = self._sources()
            up = all(s.health.recording for s in sources.values())
            if up or asyncio.get_running_loop().time() - started > READY_TIMEOUT_S:
                break
            await asyncio.sleep(0.2)
        self.notifier.ready(self.summary())
        log.info("ready: %s", self.summary())
        loop = asyncio.get_running_loop()
        interval = self.notifier.watchdog_seconds / 2 if self.notifier.watchdog_seconds else 1.0
        last_ping = 0.0
        was_stalled: list[str] = []
        while True:
            self.notifier.status(self.summary())
            stalled = self.stalled()
            if stalled != was_stalled and stalled:
                log.error("not pinging the watchdog: %s stalled", ", ".join(stalled))
            was_stalled = stalled
            if not stalled and loop.time() - last_ping >= interval - 0.05:
                self.notifier.watchdog()
                last_ping = loop.time()
            await asyncio.sleep(min(interval, 0.5))

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
        if cmd in ("trigger", "test"):
            incident, outcome = self.incidents.trigger("local", peer, test=cmd == "test")
            assert incident is not None  # only automatic triggers are ignored
            return {"ok": True, "incident": incident.id, "opened": outcome == "opened",
                    "directory": str(self.evidence.directory(incident)),
                    "ends": clock.iso(incident.end_ns)}
        if cmd == "cancel":
            ok, reason = self.incidents.cancel(peer)
            return {"ok": ok, "result": reason} if ok else {"ok": False, "error": reason}
        if cmd == "status":
            return {"ok": True, "status": self.status()}
        return {"ok": False, "error": f"unknown command {cmd!r} "
                                      "(known: trigger, test, cancel, status)"}

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
        links: dict[str, Any] = {}
        if self.link is not None:
            links["mqtt"] = {**self.link.health.as_dict(), "outbox": self.outbox.counts(),
                             "outbox_dropped": self.outbox.dropped}
        if self.button is not None:
            sources["button"] = self.button.health.as_dict()
        if self.dialer is not None:
            links["call"] = self.dialer.describe()
        return {
            "state": self.incidents.state,
            "covert": self.incidents.covert,
            "links": links,
            "incident": current.as_dict() if current else None,
            "last_incident": self.incidents.last.as_dict() if self.incidents.last else None,
            "sources": sources,
            "buffer": {"seconds": min((b.seconds for b in self.buffers.values()), default=0.0),
                       "bytes": sum(b.bytes for b in self.buffers.values()),
                       "max_bytes": self.config.buffer.max_bytes},
            "storage": {"dir": str(self.storage), **free_space(self.storage),
                        "retention": self.prune_report.as_dict() if self.prune_report else None,
                        "upload": self.uploader.state if self.uploader else None},
            "evidence": {"key_fingerprint": self.key.fingerprint},
            "version": __version__,
            "time": clock.iso(clock.now_ns()),
        }
