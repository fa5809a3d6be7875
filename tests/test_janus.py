"""The desk's Janus building blocks against a real Janus (Debian's janus 1.1.2, the REST
API and the VideoRoom): a car in the car namespace publishes pre-encoded H.264 and Opus
through dashsos.dispatch.janus into a recorded room; Janus lists it as a publisher; its
recording, converted with janus-pp-rec, holds the frames that were sent, bit for bit;
Janus's errors arrive as JanusError with Janus's code. Prints the offer-to-answer time,
the time to a connected call and Janus's CPU and memory while it receives."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc import (
    MediaStreamTrack,
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpSender,
    RTCSessionDescription,
)

import clipcheck
from dashsos.call.ice import confine_host_addresses
from dashsos.call.tracks import opus_encoder
from dashsos.dispatch.janus import NO_SUCH_ROOM, JanusError, JanusSession, recording_files
from dashsos.media.encoder import H264Encoder
from dashsos.media.h264 import annexb
from janus import JanusPath, available, convert
from netns import DESK_IP

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

ROOM = 4242
DISPLAY = "car-1"
RECORDING = "call-0001"
SECONDS = 6
WIDTH, HEIGHT, FPS, BITRATE = 1280, 720, 30, 2_000_000
RATE, OPUS_FRAME = 48_000, 960  # Opus at 48 kHz, 20 ms frames
VIDEO_TB, AUDIO_TB = Fraction(1, 90_000), Fraction(1, RATE)
# Every NAL unit must reach the recording but access unit delimiters and filler data, which
# a WebRTC path may drop (x264 writes neither; a camera's encoder may).
SKIPPED_NALS = {9, 12}


def encode_video() -> list[bytes]:
    """SECONDS of testsrc2 as the car's encoder makes it: Constrained Baseline, Annex-B,
    SPS/PPS on every keyframe, one a second."""
    encoder = H264Encoder(WIDTH, HEIGHT, FPS, BITRATE, keyframe_interval=1.0)
    source = av.open(f"testsrc2=size={WIDTH}x{HEIGHT}:rate={FPS}", format="lavfi")
    units: list[bytes] = []
    try:
        for i, frame in enumerate(source.decode(video=0)):
            if i == SECONDS * FPS:
                break
            units += [p.data for p in encoder.encode(frame, i)]
    finally:
        source.close()
    return units + [p.data for p in encoder.flush()]


def encode_audio() -> list[bytes]:
    """SECONDS of a 440 Hz tone as Opus packets, 20 ms each."""
    encoder = opus_encoder(RATE)
    t = np.arange(SECONDS * RATE) / RATE
    pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
    packets: list[bytes] = []
    for start in range(0, len(pcm), OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(pcm[None, start:start + OPUS_FRAME], format="s16",
                                           layout="mono")
        frame.sample_rate = RATE
        frame.pts = start
        packets += [bytes(p) for p in encoder.encode(frame)]
    return packets + [bytes(p) for p in encoder.encode(None)]


class Replay(MediaStreamTrack):
    """Pre-encoded packets paced in real time: aiortc packetizes them without encoding."""

    def __init__(self, kind: str, packets: list[bytes], step: int, time_base: Fraction) -> None:
        super().__init__()
        self.kind = kind
        self._packets, self._step, self._time_base = packets, step, time_base
        self._start: float | None = None
        self.sent = 0
        self.done = asyncio.Event()

    async def recv(self) -> av.Packet[Any]:
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        if self.sent == len(self._packets):
            self.done.set()
            await asyncio.Event().wait()  # nothing more: until the sender stops
        pts = self.sent * self._step
        await asyncio.sleep(max(0.0, self._start + float(pts * self._time_base) - loop.time()))
        packet = av.Packet(self._packets[self.sent])
        packet.pts = packet.dts = pts
        packet.time_base = self._time_base
        self.sent += 1
        return packet


def _prefer(pc: RTCPeerConnection, track: MediaStreamTrack, mime_type: str) -> None:
    transceiver = pc.addTransceiver(track, direction="sendonly")
    codecs = RTCRtpSender.getCapabilities(track.kind).codecs
    transceiver.setCodecPreferences([c for c in codecs if c.mimeType == mime_type])


@dataclass
class Published:
    state: str
    participants: list[dict[str, Any]]
    events: list[dict[str, Any]]
    files: dict[str, Path]
    answer: str
    numbers: dict[str, float] = field(default_factory=dict)


async def publish_call(path: JanusPath, video: list[bytes], audio: list[bytes]) -> Published:
    """The car's side and the desk's side of one call, as the desk will run it: offer
    through JanusSession.publish, answer back, media for SECONDS, hang up."""
    numbers: dict[str, float] = {}
    # aioice's host addresses are process-wide: an earlier test (tests/fakecar.py) may have
    # confined them to loopback, where Janus never answers. The car's namespace has one.
    confine_host_addresses(())
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[],
                                            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    tracks = [Replay("audio", audio, OPUS_FRAME, AUDIO_TB),
              Replay("video", video, VIDEO_TB.denominator // FPS, VIDEO_TB)]
    _prefer(pc, tracks[0], "audio/opus")
    _prefer(pc, tracks[1], "video/H264")
    connected = asyncio.Event()
    times: dict[str, float] = {}

    @pc.on("iceconnectionstatechange")
    def ice_state() -> None:
        times.setdefault(f"ice_{pc.iceConnectionState}", time.monotonic())

    @pc.on("connectionstatechange")
    def state() -> None:
        times.setdefault(pc.connectionState, time.monotonic())
        if pc.connectionState in ("connected", "failed"):
            connected.set()

    events: list[dict[str, Any]] = []
    async with JanusSession(path.url) as janus:
        try:
            await janus.ensure_room(ROOM, path.rec_dir, "dashsos test")
            await pc.setLocalDescription(await pc.createOffer())
            posted = time.monotonic()
            answer = await janus.publish(ROOM, DISPLAY, pc.localDescription.sdp, RECORDING)
            numbers["offer_to_answer_ms"] = (time.monotonic() - posted) * 1000
            answered = time.monotonic()
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
            await asyncio.wait_for(connected.wait(), 10)
            assert "connected" in times, f"the call failed: {pc.connectionState}"
            numbers["answer_to_ice_connected_ms"] = (times["ice_completed"] - answered) * 1000
            numbers["answer_to_connected_ms"] = (times["connected"] - answered) * 1000
            await asyncio.wait_for(janus.webrtcup.wait(), 5)
            numbers["answer_to_janus_webrtcup_ms"] = (time.monotonic() - answered) * 1000
            # Janus's load while it receives: from a second into the media to near its end.
            await asyncio.sleep(1)
            cpu0, _ = path.usage()
            wall0 = time.monotonic()
            await asyncio.sleep(SECONDS - 2)
            cpu1, rss = path.usage()
            numbers["janus_cpu_percent"] = (cpu1 - cpu0) / (time.monotonic() - wall0) * 100
            numbers["janus_rss_mib"] = rss / 1024
            participants = await janus.participants(ROOM)
            for track in tracks:
                await asyncio.wait_for(track.done.wait(), 10)
            await asyncio.sleep(0.5)  # the last packets on their way
        finally:
            while not janus.events.empty():
                events.append(janus.events.get_nowait())
            await janus.close()  # leave, detach (Janus closes the .mjr files), destroy
            await pc.close()
    return Published("connected" if "connected" in times else pc.connectionState,
                     participants, events, recording_files(path.rec_dir, RECORDING), answer,
                     numbers)


@dataclass
class Sent:
    video: list[bytes]
    audio: list[bytes]


@pytest.fixture(scope="module")
def janus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JanusPath]:
    path = JanusPath(tmp_path_factory.mktemp("janus"))
    try:
        yield path
    finally:
        path.close()


@pytest.fixture(scope="module")
def sent() -> Sent:
    return Sent(encode_video(), encode_audio())


@pytest.fixture(scope="module")
def published(janus: JanusPath, sent: Sent) -> Published:
    result = janus.in_car(lambda: publish_call(janus, sent.video, sent.audio))
    print("\njanus:", ", ".join(f"{k} {v:.1f}" for k, v in result.numbers.items()))
    return result


def test_car_publishes_h264_and_opus_into_a_room(published: Published) -> None:
    assert published.state == "connected"
    # Janus answers with its own candidates (on the desk's interface only) and H.264.
    candidates = [line for line in published.answer.split("\r\n")
                  if line.startswith("a=candidate:")]
    assert candidates and all(f" {DESK_IP} " in c for c in candidates), candidates
    assert "H264/90000" in published.answer
    assert [(p["display"], p["publisher"]) for p in published.participants] == [(DISPLAY, True)]
    media = {(e.get("type"), e.get("receiving")) for e in published.events
             if e.get("janus") == "media"}
    assert {("audio", True), ("video", True)} <= media, published.events


def _frames(units: list[bytes]) -> list[str | None]:
    """Per Annex-B access unit, a hash of its NAL units (but SKIPPED_NALS)."""
    return [clipcheck.picture_hash(unit, keep=lambda t: t not in SKIPPED_NALS)
            for unit in units]


def test_recording_holds_the_sent_frames_bit_for_bit(published: Published, sent: Sent,
                                                     janus: JanusPath) -> None:
    assert set(published.files) == {"audio", "video"}, published.files
    video = convert(published.files["video"], janus.workdir / "video.mp4")
    audio = convert(published.files["audio"], janus.workdir / "audio.opus")
    recorded = _frames([annexb(p) for p in clipcheck.packets(video)])
    expected = _frames(sent.video)
    opus = clipcheck.packets(audio, "audio")
    print(f"\nvideo: {len(expected)} access units sent, {len(recorded)} recorded; "
          f"audio: {len(sent.audio)} Opus packets sent, {len(opus)} recorded")
    assert recorded == expected
    assert opus == sent.audio


def test_janus_errors_carry_their_code(janus: JanusPath) -> None:
    async def errors() -> list[JanusError]:
        found = []
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.addTransceiver("video", direction="sendonly")
        await pc.setLocalDescription(await pc.createOffer())
        async with JanusSession(janus.url) as session:
            for attempt in (session.participants(999_999),
                            session.publish(999_999, DISPLAY, pc.localDescription.sdp)):
                with pytest.raises(JanusError) as caught:
                    await attempt
                found.append(caught.value)
        await pc.close()
        return found

    for error in janus.in_car(errors):
        print(f"\n{error}")
        assert error.code == NO_SUCH_ROOM
        assert f"Janus error {NO_SUCH_ROOM}" in str(error)
