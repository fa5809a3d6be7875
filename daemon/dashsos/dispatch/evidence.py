"""Evidence the cars upload, checked against each car's pinned key.

The desk's side of the protocol in dashsos.evidence.upload:
HEAD/PUT /evidence/<incident>/<file>, POST /evidence/<incident>/complete   (car token)
GET /api/evidence                                                          (operator)

Files land in <recordings_dir>/evidence/<vehicle id>/<incident>/, the vehicle being the one
the car's token belongs to, never one named in the URL. Chunks are appended in order, so
the file's size on disk is what the car resumes from; they are fsynced at complete. There
the incident is verified against the keys pinned for its vehicle in
<recordings_dir>/trusted_keys ('<vehicle id> <fingerprint>' lines). A vehicle with no
pinned key has it pinned by its first verified upload (trust on first use); an upload
signed by any other key is then not verified. The result is kept in the incident's
verification.json.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from dashsos.dispatch import login
from dashsos.dispatch.auth import bearer, unauthorized
from dashsos.dispatch.desk import DESK
from dashsos.evidence.files import fsync_dir, write_atomic, write_json
from dashsos.evidence.signing import (
    IN_PROGRESS_SUFFIXES,
    UPLOAD_MARKER,
    normalise_fingerprint,
    verify,
)
from dashsos.evidence.upload import COMPLETE, OFFSET_HEADER, now_iso, safe_name

log = logging.getLogger(__name__)

EVIDENCE_DIR = "evidence"
TRUSTED_KEYS = "trusted_keys"
VERIFICATION = "verification.json"
MAX_FILE_BYTES = 2 << 30  # a clip of the longest incident is well under this
MAX_CHUNK_BYTES = 16 << 20  # one PUT's body is held in memory before it is written
# The desk's own files in an incident folder: a car may not overwrite them.
RESERVED = frozenset({VERIFICATION, UPLOAD_MARKER})

_RANGE = re.compile(r"bytes (\d{1,19})-(\d{1,19})/(\d{1,19})")
_EMPTY_RANGE = re.compile(r"bytes \*/(\d{1,19})")


class OffsetMismatch(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(f"the desk has {size} bytes")
        self.size = size


class EvidenceStore:
    def __init__(self, recordings_dir: Path, *, max_bytes: int = MAX_FILE_BYTES,
                 on_change: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.root = recordings_dir / EVIDENCE_DIR
        self.keys_file = recordings_dir / TRUSTED_KEYS
        self.max_bytes = max_bytes
        self._on_change = on_change
        # A lock lives while someone holds it or waits for it: no table growing forever.
        self._locks: weakref.WeakValueDictionary[tuple[str, ...], asyncio.Lock] = \
            weakref.WeakValueDictionary()

    def _lock(self, *key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def folder(self, vehicle: str, incident: str) -> Path:
        return self.root / vehicle / incident

    def size(self, vehicle: str, incident: str, name: str) -> int | None:
        """Bytes of the file the desk has, or None if it has none."""
        try:
            st = (self.folder(vehicle, incident) / name).stat()
        except FileNotFoundError:
            return None
        return st.st_size

    async def append(self, vehicle: str, incident: str, name: str, start: int,
                     data: bytes) -> int:
        """Write `data` at `start`, which must be the file's size; the new size."""
        async with self._lock(vehicle, incident):
            size = self.size(vehicle, incident, name) or 0
            if start != size:
                raise OffsetMismatch(size)
            created = await asyncio.to_thread(_append, self.folder(vehicle, incident) / name,
                                              data)
        if created:
            self._changed(vehicle, incident)
        return size + len(data)

    async def settle(self, vehicle: str, incident: str, name: str, total: int) -> None:
        """The car says the file is `total` bytes and sends none: true, or a mismatch. An
        empty file is created this way."""
        async with self._lock(vehicle, incident):
            size = self.size(vehicle, incident, name)
            if size is None and total == 0:
                await asyncio.to_thread(_append, self.folder(vehicle, incident) / name, b"")
            elif size != total:
                raise OffsetMismatch(size or 0)

    async def complete(self, vehicle: str, incident: str) -> dict[str, Any]:
        """Verify what the car sent; raises FileNotFoundError if it sent nothing."""
        folder = self.folder(vehicle, incident)
        # One vehicle's uploads are judged one at a time: two first uploads signed by two
        # different keys must not both pin theirs.
        async with self._lock(vehicle), self._lock(vehicle, incident):
            if not folder.is_dir():
                raise FileNotFoundError(f"nothing received for incident {incident}")
            await asyncio.to_thread(_sync, folder)
            # The previous judgement would count as a file outside the manifest.
            (folder / VERIFICATION).unlink(missing_ok=True)
            pinned = await asyncio.to_thread(self.pinned, vehicle)
            result = await asyncio.to_thread(verify, folder, pinned or None)
            claimed = result.manifest.get("incident") if result.manifest else incident
            if claimed != incident:
                result.problems.append(f"manifest.json: for incident {claimed!r}, uploaded "
                                       f"as {incident!r}")
                result.ok = False
            pinning = result.ok and not pinned and result.fingerprint is not None
            if pinning:
                async with self._lock(TRUSTED_KEYS):
                    await asyncio.to_thread(self._pin, vehicle, str(result.fingerprint))
            record = {"vehicle_id": vehicle, "incident": incident, "verified": result.ok,
                      "problems": result.problems, "fingerprint": result.fingerprint,
                      "pinned": pinning, "received": now_iso(), "files": _files(folder)}
            await asyncio.to_thread(write_json, folder / VERIFICATION, record)
        if result.ok:
            log.info("evidence %s/%s verified (%s)", vehicle, incident, result.fingerprint)
        else:
            log.warning("evidence %s/%s NOT verified: %s", vehicle, incident,
                        "; ".join(result.problems))
        self._changed(vehicle, incident)
        return {"incident": incident, "verified": result.ok, "problems": result.problems,
                "fingerprint": result.fingerprint, "pinned": pinning}

    def pinned(self, vehicle: str) -> list[str]:
        """The fingerprints pinned for `vehicle`. An unreadable file raises: it must not
        look like 'nothing pinned' and let any key in."""
        try:
            text = self.keys_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        keys = []
        for raw in text.splitlines():
            parts = raw.split()
            if len(parts) == 2 and not parts[0].startswith("#") and parts[0] == vehicle:
                keys.append(normalise_fingerprint(parts[1]))
        return keys

    def _pin(self, vehicle: str, fingerprint: str) -> None:
        try:
            text = self.keys_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            text = "# <vehicle id> <key fingerprint>: uploads must be signed by these keys\n"
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(self.keys_file, f"{text}{vehicle} {fingerprint}\n".encode())
        log.warning("pinned key %s for vehicle %s (its first verified upload)", fingerprint,
                    vehicle)

    def entries(self) -> list[dict[str, Any]]:
        """Every incident received, newest first (incident ids begin with a UTC stamp)."""
        found = []
        for vehicle in _subdirs(self.root):
            for incident in _subdirs(self.root / vehicle):
                found.append(self.entry(vehicle, incident))
        return sorted(found, key=lambda e: (e["incident"], e["vehicle_id"]), reverse=True)

    def entry(self, vehicle: str, incident: str) -> dict[str, Any]:
        folder = self.folder(vehicle, incident)
        try:
            result = json.loads((folder / VERIFICATION).read_bytes())
        except (OSError, ValueError):
            result = None
        if not isinstance(result, dict):
            result = {}  # still arriving, or never completed: no verdict yet
        return {"vehicle_id": vehicle, "incident": incident,
                "verified": result.get("verified"), "problems": result.get("problems", []),
                "fingerprint": result.get("fingerprint"), "pinned": result.get("pinned"),
                "received": result.get("received"), "files": _files(folder)}

    def _changed(self, vehicle: str, incident: str) -> None:
        if self._on_change is not None:
            self._on_change(self.entry(vehicle, incident))


def _append(path: Path, data: bytes) -> bool:
    """Append to `path`; True if the incident's folder was new."""
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as f:
        f.write(data)
    return created


def _sync(folder: Path) -> None:
    """Everything received, durably, before it is judged and the car told it can let go."""
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())
    for directory in (folder, folder.parent, folder.parent.parent):
        fsync_dir(directory)


def _files(folder: Path) -> dict[str, int]:
    files = {}
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return {}
    for entry in entries:
        if entry.name in RESERVED or entry.name.endswith(IN_PROGRESS_SUFFIXES):
            continue
        try:
            files[entry.name] = entry.stat(follow_symlinks=False).st_size
        except FileNotFoundError:
            continue
    return dict(sorted(files.items()))


def _subdirs(path: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(path)
                      if safe_name(e.name) and e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


STORE = web.AppKey("evidence", EvidenceStore)


# --- HTTP ---

def _vehicle(request: web.Request) -> str:
    vehicle = request.app[DESK].cars.lookup(bearer(request))
    if vehicle is None:
        log.warning("refused evidence from %s: missing or unknown car token", request.remote)
        raise unauthorized("a car token is needed: Authorization: Bearer <token>")
    if not safe_name(vehicle):
        # It names a folder (and a trusted_keys line): the token file must be fixed.
        log.error("car token for %r: that vehicle id cannot name a folder", vehicle)
        raise web.HTTPForbidden(text="this car's vehicle id cannot be used for evidence\n")
    return vehicle


def _incident(request: web.Request) -> str:
    incident = request.match_info["incident"]
    if not safe_name(incident):
        raise web.HTTPBadRequest(text="incident: [A-Za-z0-9._-], not starting with '.'\n")
    return incident


def _file(request: web.Request) -> str:
    name = request.match_info["file"]
    if not safe_name(name) or name in RESERVED or name.endswith(IN_PROGRESS_SUFFIXES):
        raise web.HTTPBadRequest(text="file: not a name an incident's file can have\n")
    return name


def _total(total: int, store: EvidenceStore) -> None:
    if total > store.max_bytes:
        raise web.HTTPRequestEntityTooLarge(max_size=store.max_bytes, actual_size=total)


def _conflict(exc: OffsetMismatch) -> web.HTTPConflict:
    return web.HTTPConflict(text=f"{exc}; go on from there\n",
                            headers={OFFSET_HEADER: str(exc.size)})


async def _body(request: web.Request, length: int) -> bytes:
    if request.content_length is not None and request.content_length != length:
        raise web.HTTPBadRequest(text="Content-Length differs from the Content-Range\n")
    data = bytearray()
    # Streamed, not request.read(): the app's body limit is sized for SDP offers.
    async for chunk in request.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > length:
            raise web.HTTPBadRequest(text="the body is longer than its Content-Range\n")
    if len(data) != length:
        raise web.HTTPBadRequest(text="the body is shorter than its Content-Range\n")
    return bytes(data)


async def head(request: web.Request) -> web.Response:
    vehicle = _vehicle(request)
    incident, name = _incident(request), _file(request)
    size = request.app[STORE].size(vehicle, incident, name)
    if size is None:
        raise web.HTTPNotFound(headers={OFFSET_HEADER: "0"})
    return web.Response(headers={OFFSET_HEADER: str(size), "Content-Length": str(size)})


async def put(request: web.Request) -> web.Response:
    vehicle = _vehicle(request)
    incident, name = _incident(request), _file(request)
    store = request.app[STORE]
    header = request.headers.get("Content-Range", "")
    if match := _EMPTY_RANGE.fullmatch(header):
        total = int(match[1])
        _total(total, store)
        if request.content_length:
            raise web.HTTPBadRequest(text="Content-Range: bytes */<total> takes no body\n")
        try:
            await store.settle(vehicle, incident, name, total)
        except OffsetMismatch as exc:
            raise _conflict(exc) from None
        return web.Response(status=204, headers={OFFSET_HEADER: str(total)})
    match = _RANGE.fullmatch(header)
    if not match:
        raise web.HTTPBadRequest(text="Content-Range: bytes <start>-<end>/<total> needed\n")
    start, end, total = (int(g) for g in match.groups())
    _total(total, store)
    if not start <= end < total:
        raise web.HTTPBadRequest(text="Content-Range: needs start <= end < total\n")
    length = end - start + 1
    if length > MAX_CHUNK_BYTES:
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_CHUNK_BYTES, actual_size=length)
    # Checked before the body too, so a car out of step does not send a chunk for nothing.
    have = store.size(vehicle, incident, name) or 0
    if start != have:
        raise _conflict(OffsetMismatch(have))
    data = await _body(request, length)
    try:
        size = await store.append(vehicle, incident, name, start, data)
    except OffsetMismatch as exc:
        raise _conflict(exc) from None
    return web.Response(status=204, headers={OFFSET_HEADER: str(size)})


async def complete(request: web.Request) -> web.Response:
    vehicle = _vehicle(request)
    incident = _incident(request)
    try:
        result = await request.app[STORE].complete(vehicle, incident)
    except FileNotFoundError as exc:
        raise web.HTTPNotFound(text=f"{exc}\n") from None
    return web.json_response(result)


async def listing(request: web.Request) -> web.Response:
    login.require(request)
    entries = await asyncio.to_thread(request.app[STORE].entries)
    return web.json_response({"evidence": entries})


def add_routes(app: web.Application, *, max_bytes: int = MAX_FILE_BYTES) -> None:
    """Needs app[DESK]: the recordings folder, the car and operator tokens, the consoles."""
    desk = app[DESK]
    app[STORE] = EvidenceStore(Path(desk.config.dispatch.recordings_dir), max_bytes=max_bytes,
                               on_change=lambda entry: desk.hub.publish("evidence", entry))
    app.router.add_route("HEAD", "/evidence/{incident}/{file}", head)
    app.router.add_put("/evidence/{incident}/{file}", put)
    app.router.add_post(f"/evidence/{{incident}}/{COMPLETE}", complete)
    app.router.add_get("/api/evidence", listing)
