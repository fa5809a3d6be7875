"""Saved incidents go to the dispatcher over authenticated, resumable HTTP, until done.

Protocol (the reference desk's side is dashsos.dispatch.evidence). Every request carries
`Authorization: Bearer <token>`; the desk files what it gets under the vehicle that token
belongs to, never one named in the URL. For each incident directory with manifest.sig and
no upload.json saying {"uploaded": true}, oldest first, and for manifest.json, manifest.sig
and each file the manifest lists, in that order:

HEAD {endpoint}/{incident}/{file}
    200 with `Upload-Offset` (and `Content-Length`): the bytes the desk has; 404: none.
PUT  {endpoint}/{incident}/{file}   `Content-Range: bytes <start>-<end>/<total>` + the chunk
    204 (or 200): stored. 409 + `Upload-Offset`: the desk has another size; go on from there.
    An empty file is sent as `Content-Range: bytes */0` with no body.
    400: a bad name or range; 401: a bad token; 413: larger than the desk takes.
POST {endpoint}/{incident}/complete
    200 {"verified": bool, "problems": [...], "fingerprint": str|null, "pinned": bool}

Chunks go from the size the desk reports, so an upload cut by a power cut or a dropped link
goes on where the desk stopped, across restarts: the desk's size is the truth. After
complete, upload.json records the answer with "uploaded": true even if the desk could not
verify the incident (it has the bytes; verification is its judgement), so retention may
prune it. Incident ids and file names are one path component of [A-Za-z0-9._-], not
starting with a dot, checked on both sides.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import ssl
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from dashsos.evidence.files import write_json
from dashsos.evidence.signing import MANIFEST, SIGNATURE, UPLOAD_MARKER

log = logging.getLogger(__name__)

OFFSET_HEADER = "Upload-Offset"
COMPLETE = "complete"
MAX_BACKOFF = 300.0  # seconds: the longest wait between passes after failures
MAX_CONFLICTS = 3  # 409s in a row on one file before the pass gives up on it

# A leading dot is refused: it rules out "." and ".." and hidden (temporary) names.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def safe_name(name: str) -> bool:
    """True if `name` can be one path component on either side of the upload."""
    return _SAFE_NAME.fullmatch(name) is not None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class UploadError(Exception):
    """This incident cannot be sent now; the text says why."""


class Unauthorized(UploadError):
    """The desk refused the token: no other incident will fare better this pass."""


class Uploader:
    def __init__(self, incidents_dir: Path, endpoint: str, token: str, *,
                 ssl: ssl.SSLContext | bool, interval: float = 10.0,
                 chunk_bytes: int = 256 * 1024, timeout: float = 30.0) -> None:
        self.incidents_dir = incidents_dir
        self.endpoint = endpoint.rstrip("/")
        self._token = token
        self._ssl = ssl
        self.interval = interval
        self.chunk_bytes = chunk_bytes
        # Per request, so one chunk must go within it at the worst link the car sees.
        self.timeout = timeout
        self.state: dict[str, Any] = {"pending": 0, "uploaded": 0, "last_error": None,
                                      "last_upload": None}
        self._wake = asyncio.Event()
        self._failures = 0
        self._refused: set[str] = set()

    def poke(self) -> None:
        """An incident was just saved: try now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        """Upload forever; never raises (but can be cancelled)."""
        while True:
            self._wake.clear()  # a poke during the pass means another pass at once
            try:
                await self.upload_once()
            except Exception as exc:  # a bug here must not end uploads for good
                log.exception("upload pass failed")
                self.state["last_error"] = _describe(exc)
                self._failures += 1
            try:
                await asyncio.wait_for(self._wake.wait(), self._delay())
            except TimeoutError:
                pass  # time for the next pass

    def _delay(self) -> float:
        if not self._failures:
            return self.interval
        # Back off while the desk is unreachable: a cellular link is not hammered for nothing.
        return max(self.interval, min(self.interval * 2.0 ** self._failures, MAX_BACKOFF))

    async def upload_once(self) -> list[str]:
        """One pass over the pending incidents; the ids completed in it."""
        pending, uploaded = await asyncio.to_thread(self._scan)
        self.state["pending"], self.state["uploaded"] = len(pending), uploaded
        if not pending:
            self.state["last_error"] = None
            self._failures = 0
            return []
        done: list[str] = []
        errors: list[str] = []
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            headers={"Authorization": f"Bearer {self._token}"},
            connector=aiohttp.TCPConnector(ssl=self._ssl))
        async with session:
            for directory in pending:
                try:
                    await self._upload(session, directory)
                except (Unauthorized, aiohttp.ClientConnectorError) as exc:
                    errors.append(f"{directory.name}: {_describe(exc)}")
                    break  # the next incident would meet the same refusal
                except (UploadError, aiohttp.ClientError, TimeoutError, OSError,
                        ValueError) as exc:
                    errors.append(f"{directory.name}: {_describe(exc)}")
                    continue
                done.append(directory.name)
                self.state["pending"] -= 1
                self.state["uploaded"] += 1
                self.state["last_upload"] = now_iso()
        self.state["last_error"] = "; ".join(errors) if errors else None
        self._failures = self._failures + 1 if errors else 0
        for error in errors:
            log.warning("upload to %s: %s", self.endpoint, error)
        return done

    def _scan(self) -> tuple[list[Path], int]:
        """Signed incidents not yet uploaded, oldest first (ids begin with a UTC stamp),
        and how many are uploaded already."""
        pending: list[Path] = []
        uploaded = 0
        try:
            entries = sorted(os.scandir(self.incidents_dir), key=lambda e: e.name)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            # Hidden names are retention's .<id>.deleting and other temporaries.
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            path = Path(entry.path)
            if not (path / SIGNATURE).is_file():
                continue  # still recording, or never signed
            if _uploaded(path):
                uploaded += 1
            elif safe_name(entry.name):
                pending.append(path)
            elif entry.name not in self._refused:  # said once, not every pass
                self._refused.add(entry.name)
                log.error("incident %r: the name cannot go into a URL; not uploaded", entry.name)
        return pending, uploaded

    async def _upload(self, session: aiohttp.ClientSession, directory: Path) -> None:
        manifest = json.loads(await asyncio.to_thread((directory / MANIFEST).read_bytes))
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict):
            raise UploadError(f"{MANIFEST}: no file list")
        names = [MANIFEST, SIGNATURE, *sorted(files)]
        bad = [name for name in names if not safe_name(name)]
        if bad:
            raise UploadError(f"{MANIFEST}: file names that cannot go into a URL: {bad!r}")
        base = f"{self.endpoint}/{directory.name}"
        for name in names:
            path = directory / name
            if not path.is_file():
                # The desk's verification will name it; the rest is still worth having.
                log.warning("incident %s: %s is missing, uploading the rest", directory.name,
                            name)
                continue
            await self._send_file(session, f"{base}/{name}", path)
        async with session.post(f"{base}/{COMPLETE}") as response:
            await _check(response, f"{COMPLETE}")
            answer = await response.json()
        if not isinstance(answer, dict):
            raise UploadError(f"{COMPLETE}: the desk's answer is not a JSON object")
        verified = answer.get("verified") is True
        await asyncio.to_thread(write_json, directory / UPLOAD_MARKER, {
            "uploaded": True, "at": now_iso(), "verified": verified, "desk": self.endpoint,
            "fingerprint": answer.get("fingerprint"), "problems": answer.get("problems", [])})
        if verified:
            log.info("incident %s uploaded and verified by the desk", directory.name)
        else:
            log.warning("incident %s uploaded but the desk could not verify it: %s",
                        directory.name, "; ".join(map(str, answer.get("problems") or [])))

    async def _send_file(self, session: aiohttp.ClientSession, url: str, path: Path) -> None:
        name = path.name
        size = path.stat().st_size
        have = await self._desk_size(session, url, name)
        if have == size:
            return
        if have is not None and have > size:
            raise UploadError(f"{name}: the desk has {have} bytes, more than the {size} here")
        if size == 0:
            async with session.put(url, headers={"Content-Range": "bytes */0"}) as response:
                await _check(response, name)
            return
        offset, conflicts = have or 0, 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while offset < size:
                chunk = await asyncio.to_thread(os.pread, fd, self.chunk_bytes, offset)
                if not chunk:
                    raise UploadError(f"{name}: shrank while being uploaded")
                end = offset + len(chunk) - 1
                headers = {"Content-Range": f"bytes {offset}-{end}/{size}"}
                async with session.put(url, data=chunk, headers=headers) as response:
                    if response.status == 409:
                        conflicts += 1
                        offset = _offset(response, name, size, conflicts)
                        continue
                    await _check(response, name)
                offset, conflicts = end + 1, 0
        finally:
            os.close(fd)

    async def _desk_size(self, session: aiohttp.ClientSession, url: str,
                         name: str) -> int | None:
        """Bytes of `name` the desk has; None if it has no such file."""
        async with session.head(url) as response:
            if response.status == 404:
                return None
            await _check(response, name)
            value = response.headers.get(OFFSET_HEADER, response.headers.get("Content-Length"))
        try:
            return int(value or "")
        except ValueError:
            raise UploadError(f"{name}: the desk gave no size ({value!r})") from None


def _offset(response: aiohttp.ClientResponse, name: str, size: int, conflicts: int) -> int:
    """Where a 409 says to go on from."""
    try:
        offset = int(response.headers.get(OFFSET_HEADER, ""))
    except ValueError:
        raise UploadError(f"{name}: 409 without {OFFSET_HEADER}") from None
    if not 0 <= offset <= size:
        raise UploadError(f"{name}: the desk has {offset} bytes, the file here {size}")
    if conflicts > MAX_CONFLICTS:
        raise UploadError(f"{name}: the desk's size keeps changing ({offset} now)")
    return offset


async def _check(response: aiohttp.ClientResponse, what: str) -> None:
    if response.status in (200, 204):
        return
    text = (await response.text(errors="replace")).strip()[:200]
    message = f"{response.method} {what}: {response.status} {text}".rstrip()
    if response.status == 401:
        raise Unauthorized(message)
    raise UploadError(message)


def _uploaded(directory: Path) -> bool:
    try:
        data = json.loads((directory / UPLOAD_MARKER).read_bytes())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("uploaded") is True


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
