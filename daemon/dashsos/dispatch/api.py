"""The operators' side of the desk: the console page and its JSON/SSE/SDP API.

Every route needs an operator: a session cookie from POST /login (see login.py;
SameSite=Strict, so another site cannot ride on it) or `Authorization: Bearer <token>`.
Every operator action is written to the audit log (audit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from dashsos.dispatch import login, owners, peer, streetmap
from dashsos.dispatch.car import CarCall
from dashsos.dispatch.desk import DESK, Conflict, NotFound
from dashsos.dispatch.errors import http_error
from dashsos.dispatch.janus_call import JanusCall, MediaServerError
from dashsos.dispatch.whip import SDP, read_sdp

log = logging.getLogger(__name__)

HEARTBEAT = 15.0  # seconds between SSE comments: proxies close idle streams
# The page and its code are public (they hold no data, and the page is the login form
# too); everything under /api/ needs an operator.
STATIC = {"index.html": "text/html", "console.js": "text/javascript",
          "operators.js": "text/javascript", "history.js": "text/javascript",
          "streetmap.js": "text/javascript", "console.css": "text/css"}


def page_headers(map_tiles: str) -> dict[str, str]:
    """The page loads nothing from elsewhere but the map's tiles (their server only); say
    so, so a browser enforces it."""
    tiles = streetmap.tile_origin(map_tiles)
    images = "'self' data:" + (f" {tiles}" if tiles else "")
    return {"Content-Security-Policy": f"default-src 'self'; img-src {images}; "
            "media-src 'self' blob:; object-src 'none'; base-uri 'none'; "
            "frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store"}


def _operator(request: web.Request) -> str:
    return login.require(request)


def _audit(request: web.Request, action: str, operator: str, **detail: Any) -> None:
    request.app[DESK].audit.add(action, operator, request.remote, **detail)


def _owned(request: web.Request, operator: str, what: str) -> CarCall | JanusCall:
    """The call for its owner to act on; acting on a call nobody took takes it (and the
    audit log says so)."""
    desk = request.app[DESK]
    call_id = request.match_info["id"]
    unowned = desk.live_call(call_id).record.owner is None
    call = owners.owned_call(desk, call_id, operator, what)
    if unowned:
        _audit(request, "take", operator, call=call_id, vehicle_id=call.record.vehicle_id,
               by=what)
    return call


def _static(request: web.Request, name: str) -> web.Response:
    body = importlib.resources.files("dashsos.dispatch").joinpath("console", name).read_bytes()
    headers = page_headers(request.app[DESK].config.dispatch.map_tiles)
    return web.Response(body=body, content_type=STATIC[name], charset="utf-8",
                        headers=headers)


async def index(request: web.Request) -> web.Response:
    """The console; without a session it shows its login form (GET /api/me says 401)."""
    return _static(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    return _static(request, request.path.lstrip("/"))


async def calls(request: web.Request) -> web.Response:
    _operator(request)
    return web.json_response({"calls": request.app[DESK].calls()})


async def incidents(request: web.Request) -> web.Response:
    """The fleet's incidents (MQTT, and calls' MSDs), newest first, and the MQTT link."""
    _operator(request)
    desk = request.app[DESK]
    found = desk.fleet.incidents_json()
    for incident in found:
        incident.update(desk.incident_owner(str(incident.get("vehicle_id", "")),
                                            str(incident.get("id", ""))))
    return web.json_response({"incidents": found, "link": desk.fleet.link()})


async def vehicles(request: web.Request) -> web.Response:
    _operator(request)
    fleet = request.app[DESK].fleet
    return web.json_response({"vehicles": fleet.vehicles_json(), "link": fleet.link()})


async def ice(request: web.Request) -> web.Response:
    """The browser's ICE servers: the desk's own [ice] config, so consoles behind NAT (and
    browsers that gather no host candidates) reach the desk through STUN or TURN."""
    _operator(request)
    config = request.app[DESK].config.ice
    servers: list[dict[str, Any]] = [{"urls": url} for url in config.stun_urls]
    if config.turn_urls:
        password = ""
        if config.turn_password_file:
            password = Path(config.turn_password_file).read_text().strip()
        servers.append({"urls": list(config.turn_urls), "username": config.turn_username,
                        "credential": password})
    policy = "relay" if config.relay_only else "all"
    return web.json_response({"iceServers": servers, "iceTransportPolicy": policy})


async def events(request: web.Request) -> web.StreamResponse:
    _operator(request)
    hub = request.app[DESK].hub
    sub = hub.subscribe()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    try:
        await response.prepare(request)
        await response.write(b"retry: 2000\n: dashsos dispatch\n\n")
        while True:
            try:
                frame = await asyncio.wait_for(sub.queue.get(), HEARTBEAT)
            except TimeoutError:
                if login.operator(request, touch=False) is None:
                    break  # logged out, expired or revoked: this stream ends too
                await response.write(b": heartbeat\n\n")
                continue
            if frame is None:
                break
            await response.write(frame.encode())
    except ConnectionResetError:
        pass  # the console went away
    finally:
        hub.unsubscribe(sub)
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()
    return response


async def watch(request: web.Request) -> web.Response:
    operator = _operator(request)
    offer = await read_sdp(request)
    try:
        watcher, answer = await request.app[DESK].watch(request.match_info["id"], operator,
                                                        offer)
    except (NotFound, Conflict, peer.OfferError) as exc:
        raise http_error(exc) from exc
    _audit(request, "watch", operator, call=request.match_info["id"], watcher=watcher.id)
    return web.Response(status=201, text=answer, content_type=SDP,
                        headers={"Location": f"/api/watchers/{watcher.id}"})


async def subscribe(request: web.Request) -> web.Response:
    """A call carried by Janus: Janus's offer for the browser (201, Location: the
    watcher, which takes the browser's answer as a PATCH)."""
    operator = _operator(request)
    try:
        watcher, offer = await request.app[DESK].subscribe(request.match_info["id"],
                                                           operator)
    except (NotFound, Conflict, peer.OfferError, MediaServerError) as exc:
        raise http_error(exc) from exc
    _audit(request, "subscribe", operator, call=request.match_info["id"], watcher=watcher.id)
    return web.Response(status=201, text=offer, content_type=SDP,
                        headers={"Location": f"/api/watchers/{watcher.id}"})


async def subscribed(request: web.Request) -> web.Response:
    _operator(request)
    answer = await read_sdp(request)
    try:
        await request.app[DESK].subscribed(request.match_info["id"], answer)
    except (NotFound, peer.OfferError, MediaServerError) as exc:
        raise http_error(exc) from exc
    return web.Response(status=204)


async def talk(request: web.Request) -> web.Response:
    operator = _operator(request)
    try:
        body: Any = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text='send JSON: {"watcher": "<id>"}\n') from exc
    watcher = body.get("watcher") if isinstance(body, dict) else None
    if watcher is not None and not isinstance(watcher, str):
        raise web.HTTPBadRequest(text="watcher: a watcher id or null\n")
    desk = request.app[DESK]
    try:
        _owned(request, operator, "talk")
        desk.talk(request.match_info["id"], watcher)
    except (NotFound, Conflict, owners.NotOwner) as exc:
        raise http_error(exc) from exc
    _audit(request, "talk", operator, call=request.match_info["id"], watcher=watcher)
    log.info("%s: talk-back on call %s now from %s", operator, request.match_info["id"],
             watcher)
    return web.json_response({"talker": watcher})


async def hangup(request: web.Request) -> web.Response:
    operator = _operator(request)
    try:
        call = _owned(request, operator, "hang up")
    except (NotFound, Conflict, owners.NotOwner) as exc:
        raise http_error(exc) from exc
    _audit(request, "hangup", operator, call=call.id)
    log.info("%s hangs up call %s", operator, call.id)
    await call.hangup()
    return web.json_response(call.record.as_json())


async def position(request: web.Request) -> web.Response:
    operator = _operator(request)
    try:
        call = request.app[DESK].live_call(request.match_info["id"])
    except (NotFound, Conflict) as exc:
        raise http_error(exc) from exc
    if not call.send({"type": "position_request"}):
        raise web.HTTPConflict(text="the car has no open telemetry channel (a whip-mode "
                               "call, or not connected yet)\n")
    _audit(request, "position", operator, call=call.id)
    log.info("%s requests the position of call %s", operator, call.id)
    return web.json_response({"sent": True})


async def unwatch(request: web.Request) -> web.Response:
    operator = _operator(request)
    desk = request.app[DESK]
    watcher = desk.watchers.get(request.match_info["id"])
    try:
        await desk.unwatch(request.match_info["id"])
    except NotFound as exc:
        raise http_error(exc) from exc
    _audit(request, "unwatch", operator, call=watcher.call.id if watcher else None,
           watcher=request.match_info["id"])
    return web.json_response({"closed": True})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/", index)
    for name in STATIC:
        if name != "index.html":
            app.router.add_get(f"/{name}", asset)
    login.add_routes(app)
    owners.add_routes(app)
    streetmap.add_routes(app)
    app.router.add_get("/api/calls", calls)
    app.router.add_get("/api/events", events)
    app.router.add_get("/api/incidents", incidents)
    app.router.add_get("/api/vehicles", vehicles)
    app.router.add_get("/api/ice", ice)
    app.router.add_post("/api/calls/{id}/watch", watch)
    app.router.add_post("/api/calls/{id}/talk", talk)
    app.router.add_post("/api/calls/{id}/hangup", hangup)
    app.router.add_post("/api/calls/{id}/position", position)
    app.router.add_post("/api/calls/{id}/subscribe", subscribe)
    app.router.add_patch("/api/watchers/{id}", subscribed)
    app.router.add_delete("/api/watchers/{id}", unwatch)
