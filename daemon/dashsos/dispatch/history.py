"""Past calls and evidence, played in the console; and the audit log, read.

GET /api/calls/<id>/media                          the desk's recording (media.mp4), once
                                                   the call has ended (409 before)
GET /api/evidence/<vehicle>/<incident>/<file>      a file the car uploaded
GET /api/audit?limit=N                             the latest audit entries

Media is served with range support (aiohttp's FileResponse), so a <video> element seeks
without fetching the whole file. Each playback is audited once, not once per range
request: a browser fetches a video in many pieces.
"""

from __future__ import annotations

import time
from pathlib import Path

from aiohttp import web

from dashsos.dispatch import login, record
from dashsos.dispatch.desk import DESK
from dashsos.dispatch.evidence import STORE
from dashsos.dispatch.recording import MEDIA
from dashsos.evidence.signing import IN_PROGRESS_SUFFIXES
from dashsos.evidence.upload import safe_name

# A second playback of the same file by the same operator within this is the same one.
PLAYBACK_DEDUP_SECONDS = 300.0
TYPES = {".mp4": "video/mp4", ".m4a": "audio/mp4", ".webm": "video/webm",
         ".gpx": "application/gpx+xml", ".vtt": "text/vtt", ".json": "application/json"}
HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_played: dict[tuple[str, str], float] = {}


def _audit_playback(request: web.Request, operator: str, what: str, **ids: str) -> None:
    now = time.monotonic()
    key = (operator, request.path)
    if now - _played.get(key, -PLAYBACK_DEDUP_SECONDS) < PLAYBACK_DEDUP_SECONDS:
        return
    if len(_played) > 10_000:
        _played.clear()
    _played[key] = now
    request.app[DESK].audit.add("playback", operator, request.remote, what=what, **ids)


def _file(path: Path) -> web.FileResponse:
    kind = TYPES.get(path.suffix.lower(), "application/octet-stream")
    return web.FileResponse(path, headers={**HEADERS, "Content-Type": kind})


async def call_media(request: web.Request) -> web.FileResponse:
    operator = login.require(request)
    desk = request.app[DESK]
    call_id = request.match_info["id"]
    rec = desk.past.get(call_id) or (desk.live[call_id].record if call_id in desk.live
                                     else None)
    if rec is None or not safe_name(rec.id):
        raise web.HTTPNotFound(text=f"no call {call_id}\n")
    if rec.state == record.SAVING:  # media.mp4 is whole once the call has ended
        raise web.HTTPConflict(text=f"the recording of call {call_id} is being saved: ask "
                               "again once the call has ended\n")
    if rec.state != record.ENDED:
        raise web.HTTPConflict(text=f"call {call_id} is {rec.state}: its recording plays "
                               "once the call has ended\n")
    # The folder the desk made for the call, never a path from elsewhere.
    path = desk.root / rec.id / MEDIA
    if not path.is_file():
        raise web.HTTPNotFound(text=f"call {call_id} has no recording\n")
    _audit_playback(request, operator, "recording", call=call_id)
    return _file(path)


async def evidence_file(request: web.Request) -> web.FileResponse:
    operator = login.require(request)
    vehicle, incident, name = (request.match_info[k] for k in ("vehicle", "incident", "file"))
    if not all(safe_name(part) for part in (vehicle, incident, name)) \
            or name.endswith(IN_PROGRESS_SUFFIXES):
        raise web.HTTPNotFound(text="no such evidence\n")
    path = request.app[STORE].folder(vehicle, incident) / name
    if not path.is_file() or path.is_symlink():
        raise web.HTTPNotFound(text="no such evidence\n")
    _audit_playback(request, operator, "evidence", incident=incident, vehicle_id=vehicle,
                    file=name)
    return _file(path)


async def audit(request: web.Request) -> web.Response:
    login.require(request)
    try:
        limit = int(request.query.get("limit", "200"))
    except ValueError as exc:
        raise web.HTTPBadRequest(text="limit: a number\n") from exc
    return web.json_response({"audit": request.app[DESK].audit.recent(limit)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/calls/{id}/media", call_media)
    app.router.add_get("/api/evidence/{vehicle}/{incident}/{file}", evidence_file)
    app.router.add_get("/api/audit", audit)
