"""Writes an incident's clip: fragmented MP4, H.264 copied as captured, audio to AAC.

A fragment ends at every keyframe (at least once a second) and is fsynced, so a power
cut loses at most the fragment being written; the file keeps its `.partial` name until
it is finished. Timestamps come from capture times, so audio and video line up however
their devices jittered. The writer runs on its own thread: muxing 30 s of buffer must
not stall the event loop.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

import av
import numpy as np

from dashsos import clock
from dashsos.clock import NS
from dashsos.evidence import spool as spool_file
from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import commit, fsync_dir
from dashsos.media import h264
from dashsos.media.packet import AudioFormat, Packet, VideoFormat

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = Fraction(1, 90000)
# Without video, wait this long for a keyframe before writing an audio-only clip.
VIDEO_WAIT_NS = 2 * NS
# A jump in audio capture times larger than this is a gap (device lost), not jitter.
AUDIO_GAP_NS = NS // 10
# A fragment at every keyframe, and at least every second (an audio-only clip has none).
MP4_OPTIONS = {"movflags": "frag_keyframe+empty_moov+default_base_moof", "flush_packets": "1",
               "frag_duration": "1000000"}
# Packets queued for the writer thread at most (about 2 min of 30 fps video and audio):
# more means the disk stalls, and the clip fails rather than the daemon's memory.
MAX_BACKLOG = 12_000


class ClipWriter:
    def __init__(self, path: Path, video: VideoFormat | None, audio: AudioFormat | None,
                 end_ns: int, prewindow: list[Packet] | None = None, *,
                 spool: bool = True) -> None:
        """`prewindow`: the buffered packets, spooled durably first (see spool.py)."""
        self.path = path
        self.spool = path.with_name(spool_file.NAME) if spool and prewindow else None
        self.spooled_ns: int | None = None  # when the spool was durable
        # Set once the pre-window is on the medium, or never will be: a trigger is
        # answered after it (see EvidenceRecorder.durable).
        self.spooled = threading.Event()
        if self.spool is None:
            self.spooled.set()
        self._prewindow = prewindow or []
        self._created_ns = clock.now_ns()
        self.partial = path.with_name(path.name + ".partial")
        self.end_ns = end_ns  # the incident may move it later
        self.start_ns: int | None = None
        self.last_ns: int | None = None
        self.error: str | None = None
        self.video_frames = 0
        self.audio_samples = 0
        self._video_format = video
        self._audio_format = audio
        self._queue: queue.SimpleQueue[Packet | None] = queue.SimpleQueue()
        self._pending: list[Packet] = []
        self._seen_ns: dict[str, int] = {}  # newest capture_ns put, by stream
        self._file: BinaryIO | None = None
        self._container: Any = None
        self._vstream: Any = None
        self._astream: Any = None
        self._last_vpts = -1
        self._next_sample: int | None = None
        self._expected_audio_ns = 0
        self.progress_ns = clock.now_ns()  # the watchdog asks whether the writer moves
        self._thread = threading.Thread(target=self._run, name=f"clip {path.parent.name}",
                                        daemon=True)
        self._thread.start()

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / self._audio_format.sample_rate if self._audio_format else 0.0

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    def put(self, packet: Packet) -> None:
        if self.error is not None:
            return  # a failed writer takes nothing more: its queue must not grow
        if self._queue.qsize() >= MAX_BACKLOG:
            self.error = f"clip writer fell {MAX_BACKLOG} packets behind"
            log.error("clip %s: %s", self.path.parent.name, self.error)
            return
        self._seen_ns[packet.stream] = max(self._seen_ns.get(packet.stream, 0),
                                           packet.capture_ns)
        self._queue.put(packet)

    def passed_end(self) -> bool:
        """Every stream of the clip has delivered a packet captured after the end: the
        window is complete (each stream arrives in capture order)."""
        wanted = [name for name, fmt in (("video", self._video_format),
                                         ("audio", self._audio_format)) if fmt is not None]
        return all(self._seen_ns.get(name, 0) > self.end_ns for name in wanted)

    def finish(self) -> None:
        """Write what is queued, close the file and give it its final name."""
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- writer thread ---

    def _run(self) -> None:
        try:
            if self.spool is not None:
                size = spool_file.write(self.spool, self._video_format, self._audio_format,
                                        self.end_ns, self._prewindow)
                self.spooled_ns = clock.now_ns()
                self.spooled.set()
                log.info("clip %s: pre-window spooled (%d packets, %d bytes) in %d ms",
                         self.path.parent.name, len(self._prewindow), size,
                         (self.spooled_ns - self._created_ns) // 1_000_000)
            prewindow, self._prewindow = self._prewindow, []
            for early in prewindow:
                if early.capture_ns <= self.end_ns:
                    self._write(early)
            self.progress_ns = clock.now_ns()
            while (packet := self._queue.get()) is not None:
                if packet.capture_ns <= self.end_ns:
                    self._write(packet)
                self.progress_ns = clock.now_ns()
            self._close()
        except OSError as exc:  # the disk: a state, reported as the reason
            self.error = STATE.failed(exc, f"clip {self.path.parent.name}")
        except Exception as exc:  # report, keep the daemon alive; .partial stays for recovery
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("clip %s failed", self.path)
        finally:
            self.spooled.set()  # failed or done: nobody waits for it any longer
            while not self._queue.empty():  # nothing more will be written: free it
                self._queue.get_nowait()

    def _write(self, packet: Packet) -> None:
        if self._container is None:
            self._pending.append(packet)
            if not self._ready():
                return
            self._open()
            pending, self._pending = self._pending, []
            for p in pending:
                self._mux(p)
            return
        self._mux(packet)

    def _ready(self) -> bool:
        if self._video_format is None:
            return True
        if any(p.stream == "video" and p.keyframe for p in self._pending):
            return True
        span = self._pending[-1].capture_ns - self._pending[0].capture_ns
        if span > VIDEO_WAIT_NS:
            log.warning("clip %s: no video keyframe; writing audio only", self.path.parent.name)
            self._video_format = None
            return True
        return False

    def _open(self) -> None:
        keyframe = next((p for p in self._pending if p.stream == "video" and p.keyframe), None)
        if keyframe is not None:
            self.start_ns = keyframe.capture_ns
        else:
            self.start_ns = min(p.capture_ns for p in self._pending)
        self._file = open(self.partial, "wb")  # noqa: SIM115 - closed in _close
        # Its name too: fsyncing the fragments keeps nothing a power cut can't find.
        fsync_dir(self.partial.parent)
        self._container = av.open(self._file, "w", format="mp4", options=MP4_OPTIONS)
        if keyframe is not None and self._video_format is not None:
            vf = self._video_format
            self._vstream = self._container.add_stream("h264", rate=vf.fps)
            self._vstream.width, self._vstream.height = vf.width, vf.height
            self._vstream.time_base = VIDEO_TIME_BASE
            # Annex-B SPS/PPS as extradata: the muxer builds avcC from it and converts
            # every packet to length-prefixed NAL units itself.
            self._vstream.codec_context.extradata = h264.parameter_sets(keyframe.data)
        if self._audio_format is not None:
            af = self._audio_format
            self._astream = self._container.add_stream("aac", rate=af.sample_rate,
                                                       layout="mono")
            self._astream.bit_rate = 64000

    def _mux(self, packet: Packet) -> None:
        assert self.start_ns is not None
        if packet.stream == "video" and self._vstream is not None:
            self._mux_video(packet)
        elif packet.stream == "audio" and self._astream is not None:
            self._mux_audio(packet)

    def _mux_video(self, packet: Packet) -> None:
        assert self.start_ns is not None
        if packet.capture_ns < self.start_ns or (self._last_vpts < 0 and not packet.keyframe):
            return
        pts = round((packet.capture_ns - self.start_ns) * 90000 / NS)
        pts = max(pts, self._last_vpts + 1)
        out = av.Packet(packet.data)
        out.pts = out.dts = pts
        out.time_base = VIDEO_TIME_BASE
        out.duration = round(packet.duration_ns * 90000 / NS)
        out.is_keyframe = packet.keyframe
        out.stream = self._vstream
        self._container.mux(out)
        self._last_vpts = pts
        self.video_frames += 1
        self.last_ns = max(self.last_ns or 0, packet.end_ns)
        if packet.keyframe:
            self._sync()  # the previous fragment is on disk now: make it durable

    def _mux_audio(self, packet: Packet) -> None:
        assert self.start_ns is not None and self._audio_format is not None
        rate = self._audio_format.sample_rate
        samples = np.frombuffer(packet.data, dtype="<i2")
        start_ns = packet.capture_ns
        if start_ns < self.start_ns:  # trim the chunk that straddles the clip start
            skip = int((self.start_ns - start_ns) * rate // NS)
            samples, start_ns = samples[skip:], self.start_ns
        if not len(samples):
            return
        if self._next_sample is None or abs(start_ns - self._expected_audio_ns) > AUDIO_GAP_NS:
            candidate = int((start_ns - self.start_ns) * rate // NS)
            self._next_sample = max(candidate, self._next_sample or 0)
        frame = av.AudioFrame.from_ndarray(
            (samples.astype(np.float32) / 32768.0).reshape(1, -1), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = self._next_sample
        frame.time_base = Fraction(1, rate)
        for out in self._astream.encode(frame):
            self._container.mux(out)
        self._next_sample += len(samples)
        self.audio_samples += len(samples)
        if self._vstream is None and self.audio_samples // rate != \
                (self.audio_samples - len(samples)) // rate:
            self._sync()  # no keyframes to sync on: once a second of audio
        self._expected_audio_ns = start_ns + len(samples) * NS // rate
        self.last_ns = max(self.last_ns or 0, self._expected_audio_ns)

    def _sync(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _close(self) -> None:
        if self._container is None:
            if self._pending:  # ended before a keyframe came: write what there is
                self._video_format = None
                self._open()
                pending, self._pending = self._pending, []
                for p in pending:
                    self._mux(p)
            else:
                log.warning("clip %s: no media at all", self.path.parent.name)
                return
        if self._astream is not None:
            for out in self._astream.encode(None):
                self._container.mux(out)
        self._container.close()
        assert self._file is not None
        self._file.close()
        commit(self.partial, self.path)
        if self.spool is not None:  # the clip holds the pre-window now
            self.spool.unlink(missing_ok=True)
        STATE.worked(f"saved {self.path}")
