"""Small aiortc peers that stand in for a car and for an operator's browser.

FakeCar offers like a dashsos car: a test-pattern video (H.264 preferred), a tone as
cabin audio, and in "call" mode the telemetry data channel with the MSD and fixes.
FakeConsole offers like the console page: receive video and audio, send a microphone.
Both confine ICE to loopback through dashsos.call.ice, like the desk does.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import math
import time
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import (
    AudioStreamTrack,
    MediaStreamError,
    MediaStreamTrack,
    VideoStreamTrack,
)

from dashsos.call.ice import confine_host_addresses, ice_configuration
from dashsos.config import IceConfig

LOOPBACK = ("127.0.0.1",)


class TestPattern(VideoStreamTrack):
    """lavfi testsrc2 (a moving pattern with a frame counter), paced at 30 fps."""

    def __init__(self, width: int = 320, height: int = 240) -> None:
        super().__init__()
        self._source = av.open(f"testsrc2=size={width}x{height}:rate=30", format="lavfi")
        self._frames = self._source.decode(video=0)
        self.sent = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = next(self._frames).reformat(format="yuv420p")
        frame.pts, frame.time_base = pts, time_base
        self.sent += 1
        return frame

    def stop(self) -> None:
        super().stop()
        self._source.close()


class EncodedLoop(MediaStreamTrack):
    """Encoded frames (H.264 access units from a keyframe on, or Opus packets) sent in a
    loop at their own pace, as a camera in copy mode: aiortc packetizes them and encodes
    nothing, so a bench can run many such cars in one process."""

    def __init__(self, kind: str, frames: list[bytes], interval: float,
                 clock_rate: int) -> None:
        super().__init__()
        self.kind = kind
        self._frames = frames
        self._interval = interval
        self._clock_rate = clock_rate
        self._sent = 0
        self._start: float | None = None

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._sent * self._interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        packet = av.Packet(self._frames[self._sent % len(self._frames)])
        packet.pts = round(self._sent * self._interval * self._clock_rate)
        packet.time_base = fractions.Fraction(1, self._clock_rate)
        self._sent += 1
        return packet


class Tone(AudioStreamTrack):
    """A sine, s16 mono 48 kHz in 20 ms frames, paced in real time."""

    RATE = 48000
    SAMPLES = 960

    def __init__(self, hz: float, amplitude: float = 0.3) -> None:
        super().__init__()
        self.hz, self.amplitude = hz, amplitude
        self._n = 0
        self._began: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._began is None:
            self._began = time.monotonic()
        else:
            await asyncio.sleep(self._began + self._n / self.RATE - time.monotonic())
        t = (np.arange(self.SAMPLES) + self._n) / self.RATE
        samples = (self.amplitude * 32767 * np.sin(2 * math.pi * self.hz * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.RATE
        frame.pts = self._n
        frame.time_base = fractions.Fraction(1, self.RATE)
        self._n += self.SAMPLES
        return frame


class Meter:
    """Reads a received track to its end: frame count, first frame time, audio level."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.track = track
        self.frames = 0
        self.first_at: float | None = None
        self.levels: list[float] = []  # RMS of each audio frame, 0..1
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            try:
                frame = await self.track.recv()
            except MediaStreamError:
                return
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.frames += 1
            if isinstance(frame, av.AudioFrame):
                pcm = frame.to_ndarray().astype(np.float64) / 32768
                self.levels.append(float(np.sqrt(np.mean(pcm ** 2))))

    def level(self, last: int = 25) -> float:
        """Loudest frame among the last `last` (half a second of 20 ms frames)."""
        return max(self.levels[-last:], default=0.0)


def prefer(pc: RTCPeerConnection, kind: str, mime_type: str) -> None:
    for transceiver in pc.getTransceivers():
        if transceiver.kind == kind:
            codecs = RTCRtpSender.getCapabilities(kind).codecs
            first = [c for c in codecs if c.mimeType == mime_type]
            transceiver.setCodecPreferences(first + [c for c in codecs if c not in first])


def new_peer(addresses: tuple[str, ...] = LOOPBACK) -> RTCPeerConnection:
    """`addresses`: where ICE may gather (loopback; () is every address but loopback, for
    a peer in a test's own network namespace)."""
    confine_host_addresses(addresses)  # this peer too: never a check off loopback
    return RTCPeerConnection(ice_configuration(IceConfig(interfaces=addresses)))


class Peer:
    """What FakeCar and FakeConsole share: a connection, its state, its received tracks."""

    def __init__(self, addresses: tuple[str, ...] = LOOPBACK) -> None:
        self.pc = new_peer(addresses)
        self.meters: dict[str, Meter] = {}
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.location = ""
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    def _on_track(self, track: MediaStreamTrack) -> None:
        self.meters[track.kind] = Meter(track)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()
        elif self.pc.connectionState in ("closed", "failed"):
            self.closed.set()

    async def post_offer(self, session: aiohttp.ClientSession, url: str,
                         token: str) -> aiohttp.ClientResponse:
        """POST our offer; on 201 apply the answer. Returns the response (body read)."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await session.post(url, data=self.pc.localDescription.sdp,
                                      headers={"Content-Type": "application/sdp",
                                               "Authorization": f"Bearer {token}"})
        answer = await response.text()
        if response.status == 201:
            self.location = response.headers["Location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        return response

    async def close(self) -> None:
        await self.pc.close()
        for meter in self.meters.values():
            meter.task.cancel()


class FakeCar(Peer):
    def __init__(self, mode: str = "call", fix_interval: float = 0.2,
                 media: tuple[MediaStreamTrack, MediaStreamTrack] | None = None,
                 addresses: tuple[str, ...] = LOOPBACK) -> None:
        """`media`: (video, audio) to send instead of an encoded test pattern and tone."""
        super().__init__(addresses)
        self.mode = mode
        self.fix_interval = fix_interval
        self.video, self.audio = media or (TestPattern(), Tone(440))
        self.received: list[dict[str, Any]] = []
        self.got_hangup = asyncio.Event()
        self.got_position_request = asyncio.Event()
        self.fixes_sent = 0
        audio_direction = "sendrecv" if mode == "call" else "sendonly"
        self.pc.addTransceiver(self.audio, direction=audio_direction)
        self.pc.addTransceiver(self.video, direction="sendonly")
        prefer(self.pc, "video", "video/H264")
        self._sender: asyncio.Task[None] | None = None
        if mode == "call":
            self.channel = self.pc.createDataChannel("telemetry")
            self.channel.on("open", self._on_open)
            self.channel.on("message", self._on_message)

    def _on_open(self) -> None:
        self._sender = asyncio.ensure_future(self._send_telemetry())

    def _on_message(self, data: str | bytes) -> None:
        message = json.loads(data)
        self.received.append(message)
        if message.get("type") == "hangup":
            self.got_hangup.set()
            # A real car hangs up when told to.
            asyncio.ensure_future(self.pc.close())
        elif message.get("type") == "position_request":
            self.got_position_request.set()

    async def _send_telemetry(self) -> None:
        self.channel.send(json.dumps({"type": "msd", "incident": incident()}))
        while self.channel.readyState == "open":
            self.channel.send(json.dumps({"type": "fix", "fix": fix(self.fixes_sent)}))
            self.fixes_sent += 1
            await asyncio.sleep(self.fix_interval)

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
        await super().close()
        self.video.stop()


class FakeConsole(Peer):
    """An operator's browser: video and audio in, a microphone (a tone) out."""

    def __init__(self, mic_hz: float = 1000) -> None:
        super().__init__()
        self.mic = Tone(mic_hz, amplitude=0.5)
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.addTransceiver(self.mic, direction="sendrecv")


START_LAT, START_LON = 52.5163, 13.3777


def fix(n: int) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {"time": now, "lat": START_LAT + n * 0.0001, "lon": START_LON + n * 0.00015,
            "mode": 3, "speed": 12.5, "heading": 56.0, "alt": 34.0, "epx": 4.0,
            "received": now}


def incident() -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    return {
        "id": "20250101T120000Z-abcdef", "event": "triggered", "phase": "triggered",
        "time": now, "test": True, "covert": False,
        "trigger": {"kind": "panic_button", "source": "GPIO17", "time": now,
                    "automatic": False},
        "position": fix(0),
        "msd": {"msdVersion": 2,
                "msdStructure": {
                    "messageIdentifier": 1,
                    "control": {"automaticActivation": False, "testCall": True,
                                "positionCanBeTrusted": True, "vehicleType": 1},
                    "vehicleIdentificationNumber": {"isowmi": "WVW", "isovds": "ZZZ1JZ",
                                                    "isovisModelyear": "3",
                                                    "isovisSeqPlant": "W000001"},
                    "timestamp": int(time.time()),
                    "vehicleLocation": {"positionLatitude": round(START_LAT * 3_600_000),
                                        "positionLongitude": round(START_LON * 3_600_000)},
                    "vehicleDirection": 28},
                "decoded": {"latitude": START_LAT, "longitude": START_LON,
                            "direction_degrees": 56, "time": now}},
    }
