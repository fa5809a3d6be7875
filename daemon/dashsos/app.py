"""The composition root: builds the parts, connects them, runs until SIGTERM.

It decides nothing. Devices come from a factory chosen once (config or mock); the
incident machine decides; the recorder, the dialer and the fleet reporter carry out its
effects and report back to it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from dashsos import __version__
from dashsos.call.dialer import Dialer, ssl_context
from dashsos.config import Config
from dashsos.devices import ConfigDevices, DeviceFactory
from dashsos.evidence import storage
from dashsos.evidence.recorder import EvidenceRecorder
from dashsos.evidence.retention import Quota, Retention
from dashsos.evidence.upload import Uploader
from dashsos.feedback import Feedback
from dashsos.fleet.commands import CommandVerifier, load_key
from dashsos.fleet.mqtt import FleetLink
from dashsos.fleet.outbox import Outbox
from dashsos.fleet.reporter import FleetReporter
from dashsos.fleet.topics import Topics
from dashsos.incident import IncidentMachine, Policy
from dashsos.location.feed import FixFeed
from dashsos.location.motion import SuddenStopDetector
from dashsos.location.track import Track
from dashsos.media.bus import PacketBus
from dashsos.media.ringbuffer import RingBuffer, buffers_for
from dashsos.media.source import Source
from dashsos.msd import IncidentMsd, Vehicle
from dashsos.service import Notifier, supervise
from dashsos.status import Status
from dashsos.triggers.control_socket import ControlServer
from dashsos.triggers.local import LocalCommands
from dashsos.triggers.mqtt_command import CommandHandler

log = logging.getLogger(__name__)


def clip_streams(sources: dict[str, Source[Any]],
                 buffers: dict[str, RingBuffer]) -> tuple[str, ...]:
    """Media streams a new clip holds: every one with buffered seconds, and every source
    that has not failed even if it has delivered nothing yet (a press at power-on)."""
    return tuple(name for name, s in sources.items() if name in buffers and (
        len(buffers[name]) or s.health.recording or s.health.detail == "starting"))


class App:
    def __init__(self, config: Config, devices: DeviceFactory | None = None) -> None:
        self.config = config
        self.devices = devices or ConfigDevices(config)
        self.notifier = Notifier()
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():  # not when embedded
            for sig in (signal.SIGTERM, signal.SIGINT):  # first: a stop while starting is clean
                loop.add_signal_handler(sig, self._stopping.set)
        c = self.config
        root = Path(c.storage.dir)
        key, _ = storage.prepare(root, c.vehicle.id)
        camera, microphone, gps = (self.devices.camera(), self.devices.microphone(),
                                   self.devices.gps())
        found = {"video": camera, "audio": microphone, "gps": gps}
        self.sources = sources = {name: s for name, s in found.items() if s is not None}
        formats = {n: s.format for n, s in (("video", camera), ("audio", microphone)) if s}
        buffers = buffers_for(c.buffer, c.video.keyframe_interval, sources)
        track = Track(c.gps.track_seconds)
        bus, fixes = PacketBus(loop), FixFeed(loop)
        bus.subscribe(lambda p: buffers[p.stream].push(p) if p.stream in buffers else None)
        fixes.subscribers.append(track.add)

        self.machine = machine = IncidentMachine(
            Policy.from_config(c), streams=lambda: clip_streams(sources, buffers),
            msd=IncidentMsd(Vehicle(c.vehicle.vin, c.vehicle.type, c.vehicle.propulsion),
                            track))
        self.feedback = feedback = Feedback(c, self.devices, machine)
        retention = Retention(root / "incidents", Quota(
            c.storage.max_bytes, c.storage.max_percent, c.storage.min_free_bytes),
            lambda: {machine.current.id} if machine.current else set())
        retention.prune()
        self.status = status = Status(machine, sources, buffers, track, root,
                                      c.buffer.max_bytes, key.fingerprint, retention)
        recorder = EvidenceRecorder(root, c.vehicle.id, bus, buffers, track,
                                    formats,
                                    status.describe_sources, key=key)
        recorder.on_saved.append(retention.prune)
        machine.handlers.append(recorder.handle)
        fixes.subscribers.append(recorder.on_fix)
        if c.upload.enabled and c.upload.endpoint:
            token_file = c.upload.token_file or c.call.token_file
            status.uploader = Uploader(
                root / "incidents", c.upload.endpoint,
                Path(token_file).read_text().strip() if token_file else "",
                ssl=ssl_context(c.call), interval=c.upload.interval,
                chunk_bytes=c.upload.chunk_bytes, timeout=c.upload.timeout)
            recorder.on_saved.append(status.uploader.poke)
        if c.call.endpoints:
            status.dialer = dialer = Dialer(
                c.call, c.ice, bus, machine, has_video="video" in sources,
                has_audio="audio" in sources,
                request_keyframe=camera.request_keyframe if camera else lambda: None,
                last_fix=lambda: track.last,
                speaker=feedback.gate.factory())
            machine.handlers.append(dialer.handle)
            fixes.subscribers.append(dialer.on_fix)
        if c.mqtt.enabled:
            reporter = self._fleet(root, machine, track, status, key.fingerprint)
            machine.handlers.append(reporter.handle)
        if c.auto_trigger.gps_crash:
            fixes.subscribers.append(SuddenStopDetector(c.auto_trigger).triggering(
                lambda what: machine.trigger("gps_crash", f"sudden stop: {what}",
                                             automatic=True)))

        control = ControlServer(Path(c.control.socket),
                                LocalCommands(machine, status, recorder.directory,
                                              recorder.durable))
        await control.start()
        status.button = button = self.devices.button(loop, machine)
        status.feedback = feedback
        feedback.start(sources)
        for media in (camera, microphone):
            if media is not None:
                media.start(bus.publish_threadsafe)
        if gps is not None:
            gps.start(fixes.publish_threadsafe)
        for name, source in sources.items():
            log.info("%s: %s", name, source.describe())
        for name in ("video", "audio", "gps"):
            if name not in sources:
                log.warning("%s: none configured or found; recording without it", name)
        tasks = [loop.create_task(t) for t in (
            supervise(self.notifier, summary=status.summary, stuck=recorder.stuck,
                      ready=lambda: all(s.health.recording for s in sources.values())),
            *([status.uploader.run()] if status.uploader else []),
            *([self.reporter.run()] if c.mqtt.enabled else []))]
        log.info("dashsos %s running; vehicle %s; evidence in %s", __version__,
                 c.vehicle.id, root)
        await self._stopping.wait()

        log.info("shutting down")
        self.notifier.stopping()
        for task in tasks:
            task.cancel()
        if button is not None:
            button.close()
        feedback.close()
        await control.stop()  # no new incident while the last one is being finished
        # Evidence first, the hang-up alongside with a short bound: TimeoutStopSec is 20 s.
        await asyncio.gather(machine.shutdown(), *([status.dialer.shutdown()]
                                                   if status.dialer else []))
        for source in sources.values():
            await asyncio.to_thread(source.stop)
        if c.mqtt.enabled:
            try:
                self.reporter.publish_status()
            except Exception:  # a failing card must not keep `offline` from the broker
                log.exception("final status not published")
            await asyncio.to_thread(self.link.stop)
            self.outbox.close()
        log.info("stopped")
        return 0

    def _fleet(self, root: Path, machine: IncidentMachine, track: Track, status: Status,
               fingerprint: str) -> FleetReporter:
        c = self.config
        topics = Topics.for_vehicle(c.mqtt.base_topic, c.vehicle.id)
        self.outbox = status.outbox = Outbox(root / "state.db", c.mqtt.outbox_max)
        handler = None
        if c.commands.enabled:
            verifier = CommandVerifier(c.vehicle.id, load_key(Path(c.commands.key_file)),
                                       max_skew=c.commands.max_skew_seconds)
            handler = CommandHandler(verifier, c.commands.allowed, machine, status)
        self.link = status.link = FleetLink(c.mqtt, c.mqtt.client_id or f"dashsos-{c.vehicle.id}",
                                            topics, self.outbox, handler)
        if handler is not None:
            handler.link = self.link
        self.reporter = FleetReporter(
            self.link, track, status, status_interval=c.mqtt.status_interval,
            location_interval=c.mqtt.location_interval,
            discovery_prefix=c.homeassistant.prefix if c.homeassistant.discovery else None,
            key_fingerprint=fingerprint, reported_dir=root / "reported")
        # Recovered incidents, and final events a power cut kept from the outbox.
        self.reporter.report_unreported(root / "incidents")
        self.link.start(asyncio.get_running_loop())
        return self.reporter
