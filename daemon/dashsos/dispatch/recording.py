"""The desk's own copy of each call: `<recordings_dir>/<call id>/`.

media.mp4        what the car sent, through aiortc's MediaRecorder, as fragmented MP4 so
                 that a file cut off by a crash of the desk still plays up to the cut
telemetry.jsonl  every data channel message, one JSON object a line, with receive time
call.json        the call record, replaced atomically on every change
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import IO, Any

from aiortc.contrib.media import MediaRecorder
from aiortc.mediastreams import MediaStreamTrack

from dashsos.dispatch.record import CallRecord, now_iso
from dashsos.evidence.files import write_json

log = logging.getLogger(__name__)

MEDIA = "media.mp4"
TELEMETRY = "telemetry.jsonl"
RECORD = "call.json"
RECORDER_FPS = 30  # aiortc's MediaRecorder encodes video at this rate
# A fragment at least every second (and at each keyframe): a crash loses one second.
MP4_OPTIONS = {"movflags": "empty_moov+default_base_moof+frag_keyframe",
               "frag_duration": "1000000"}


class Recording:
    """The files of one call. Create it before answering: nothing the car sends is lost."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=False)
        self._media: MediaRecorder | None = None
        self._media_kinds: list[str] = []
        self._telemetry: IO[str] | None = open(folder / TELEMETRY, "a", encoding="utf-8")  # noqa: SIM115
        self._latest: dict[str, Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        # MediaRecorder writes the MP4 header at its first packet; if audio came first the
        # video track would be declared before its encoder exists and be unplayable.
        self._video_encoding = asyncio.Event()

    def add_track(self, track: MediaStreamTrack) -> None:
        """Record `track` (one per kind); call before `start`."""
        if track.kind in self._media_kinds:
            log.warning("%s: a second %s track is not recorded", self.folder.name, track.kind)
            return
        if self._media is None:
            self._media = MediaRecorder(str(self.folder / MEDIA), format="mp4",
                                        options=MP4_OPTIONS)
        if track.kind == "video":
            track = _VideoFirst(track, self._video_encoding)
        else:
            track = _AfterVideo(track, self._video_encoding)
        self._media.addTrack(track)
        self._media_kinds.append(track.kind)

    async def start(self) -> None:
        if "video" not in self._media_kinds:
            self._video_encoding.set()  # nothing to wait for
        if self._media is not None:
            await self._media.start()
            log.info("%s: recording %s", self.folder.name, " and ".join(self._media_kinds))

    def telemetry(self, message: dict[str, Any] | str) -> None:
        """Append one data channel message, parsed or (if it was not JSON) as text."""
        if self._telemetry is None:
            return
        line = {"received": now_iso(), "message": message}
        self._telemetry.write(json.dumps(line, separators=(",", ":")) + "\n")
        # To the kernel at once: a crash of the desk must not take buffered lines along.
        self._telemetry.flush()

    def save(self, record: CallRecord) -> None:
        """Replace call.json with `record`, off the event loop; writes coalesce."""
        self._latest = record.as_file()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        while self._latest is not None:
            data, self._latest = self._latest, None
            try:
                await asyncio.to_thread(write_json, self.folder / RECORD, data)
            except OSError as exc:
                log.error("%s: cannot write %s: %s", self.folder.name, RECORD, exc)

    async def close(self, final: CallRecord) -> None:
        """Finish every file; the call record last, so that it tells how the call ended."""
        if self._media is not None:
            try:
                await self._media.stop()
            except Exception:  # a broken recorder must not stop the rest being saved
                log.exception("%s: finishing %s failed", self.folder.name, MEDIA)
            self._media = None
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
        self.save(final)
        if self._writer is not None:
            await self._writer


def save_record(folder: Path, record: CallRecord) -> None:
    """Write call.json now (at start-up, before the event loop serves anyone)."""
    write_json(folder / RECORD, record.as_file())


def load_past(root: Path) -> list[CallRecord]:
    """The calls recorded under `root`, newest first, with their trails."""
    records = []
    for path in sorted(root.glob(f"*/{RECORD}"), reverse=True):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            records.append(CallRecord.from_file(data, read_trail(path.parent / TELEMETRY)))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: not loaded: %s", path, exc)
    return records


def read_trail(path: Path) -> list[dict[str, Any]]:
    trail: list[dict[str, Any]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return trail
    for line in lines:
        try:
            message = json.loads(line)["message"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a crash
        if isinstance(message, dict) and message.get("type") == "fix":
            fix = message.get("fix")
            if isinstance(fix, dict):
                trail.append(fix)
    return trail


class _VideoFirst(MediaStreamTrack):
    """Video for the recorder; says when the encoder has seen its first frame."""

    kind = "video"

    def __init__(self, source: MediaStreamTrack, encoding: asyncio.Event) -> None:
        super().__init__()
        self._source = source
        self._encoding = encoding
        self._frames = 0
        self._last: int | None = None  # the last frame's slot on the recorder's grid

    async def recv(self) -> Any:
        if self._frames == 1:  # asked again: the first frame went through the encoder
            self._encoding.set()
        self._frames += 1
        while True:
            frame = await self._source.recv()
            # A burst (a camera catching up after a freeze, a re-dial) can bring frames
            # closer together than the recorder's frame rate: the encoder would give
            # them one timestamp and the muxer would stop recording. Keep one per slot.
            at = getattr(frame, "time", None)  # a decoded frame's seconds
            slot = None if at is None else round(at * RECORDER_FPS)
            if slot is None or self._last is None or slot > self._last:
                self._last = slot
                return frame

    def stop(self) -> None:
        super().stop()
        self._encoding.set()


class _AfterVideo(MediaStreamTrack):
    """Audio for the recorder, held back until the video encoder exists (or forever, for
    a call without video: then the event is set when the video track is absent)."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, encoding: asyncio.Event) -> None:
        super().__init__()
        self._source = source
        self._encoding = encoding

    async def recv(self) -> Any:
        while not self._encoding.is_set():
            await self._source.recv()  # drop what comes before the first picture
            await asyncio.sleep(0)
        return await self._source.recv()
