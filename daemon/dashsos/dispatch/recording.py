"""The desk's own copy of each call: `<recordings_dir>/<call id>/`.

media.mp4        what the car sent, its H.264 and Opus as they arrived (never decoded or
                 encoded again), as fragmented MP4 so that a file cut off by a crash of
                 the desk still plays up to the cut
telemetry.jsonl  every data channel message, one JSON object a line, with receive time
call.json        the call record, replaced atomically on every change; written last when
                 the call ends, saying "ended" once the other two are finished
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dashsos.dispatch.encoded import Feed
from dashsos.dispatch.muxer import CopyMuxer
from dashsos.dispatch.record import ENDED, CallRecord, now_iso
from dashsos.evidence.files import write_json

log = logging.getLogger(__name__)

MEDIA = "media.mp4"
TELEMETRY = "telemetry.jsonl"
RECORD = "call.json"


class Recording:
    """The files of one call. Create it before answering: nothing the car sends is lost."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=False)
        self._feeds: list[Feed] = []
        self._muxer: CopyMuxer | None = None
        self._unsubscribe: list[Callable[[], None]] = []
        self._telemetry: IO[str] | None = open(folder / TELEMETRY, "a", encoding="utf-8")  # noqa: SIM115
        self._latest: dict[str, Any] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    def add_feed(self, feed: Feed) -> None:
        """Record `feed` (one per kind); call before `start`."""
        if any(f.kind == feed.kind for f in self._feeds):
            log.warning("%s: a second %s track is not recorded", self.folder.name, feed.kind)
            return
        self._feeds.append(feed)

    async def start(self, on_error: Callable[[str], None]) -> None:
        """Record the feeds added; `on_error` (on the event loop) if media.mp4 fails."""
        if self._feeds and self._muxer is None:
            loop = asyncio.get_running_loop()

            def failed(error: str) -> None:
                loop.call_soon_threadsafe(on_error, error)

            self._muxer = CopyMuxer(self.folder / MEDIA, [f.kind for f in self._feeds],
                                    failed)
            self._unsubscribe = [f.subscribe(self._muxer.put) for f in self._feeds]
            log.info("%s: recording %s", self.folder.name,
                     " and ".join(f.kind for f in self._feeds))

    def telemetry(self, message: dict[str, Any] | str) -> None:
        """Append one data channel message, parsed or (if it was not JSON) as text."""
        if self._telemetry is None:
            return
        line = {"received": now_iso(), "message": message}
        self._telemetry.write(json.dumps(line, separators=(",", ":")) + "\n")
        # To the kernel at once: a crash of the desk must not take buffered lines along.
        self._telemetry.flush()

    def save(self, record: CallRecord) -> None:
        """Replace call.json with `record`, off the event loop; writes coalesce. Once the
        files are being finished (`close`), only the final record is written."""
        if not self._closing:
            self._save(record.as_file())

    def _save(self, data: dict[str, Any]) -> None:
        self._latest = data
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
        """Finish every file, call.json last (saying the call ended and how); then mark
        `final` ended: whoever the desk tells that the call ended finds its files whole."""
        self._closing = True
        if self._muxer is not None:
            for undo in self._unsubscribe:
                undo()
            await asyncio.to_thread(self._muxer.close)
            final.recording_error = final.recording_error or self._muxer.error
            self._muxer = None
        if self._telemetry is not None:
            self._telemetry.close()
            self._telemetry = None
        self._save({**final.as_file(), "state": ENDED})
        if self._writer is not None:
            await self._writer
        final.saved()


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
