"""The cars' side of the desk: WHIP-shaped signalling (RFC 9725).

POST /whip                  offer in, answer out (201, Location: /whip/calls/<id>)
DELETE /whip/calls/<id>     the car hangs up
OPTIONS /whip               what the endpoint takes (no CORS: cars are not browsers)
No trickle (PATCH gets 405): the car's offer and our answer carry every candidate.
"""

from __future__ import annotations

import logging

from aiohttp import web

from dashsos.dispatch import peer, record
from dashsos.dispatch.auth import bearer, unauthorized
from dashsos.dispatch.desk import DESK, NotFound
from dashsos.dispatch.errors import http_error
from dashsos.dispatch.janus_call import MediaServerError

log = logging.getLogger(__name__)

SDP = "application/sdp"
MAX_OFFER = 64 * 1024  # an offer is a few KiB; the app refuses bodies over this (413)


async def read_sdp(request: web.Request) -> str:
    """The SDP body of a request: 415 for another type, 413 (by aiohttp) past MAX_OFFER."""
    if request.content_type != SDP:
        raise web.HTTPUnsupportedMediaType(text=f"send the offer as {SDP}\n")
    try:
        return (await request.read()).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise web.HTTPBadRequest(text="the offer is not UTF-8 text\n") from exc


def _car(request: web.Request) -> str:
    vehicle = request.app[DESK].cars.lookup(bearer(request))
    if vehicle is None:
        log.warning("refused a car from %s: missing or unknown token", request.remote)
        raise unauthorized("a car token is needed: Authorization: Bearer <token>")
    return vehicle


async def offer(request: web.Request) -> web.Response:
    vehicle = _car(request)
    body = await read_sdp(request)
    try:
        call, answer = await request.app[DESK].open_call(vehicle, body)
    except peer.OfferError as exc:
        log.warning("refused an offer from %s: %s", vehicle, exc)
        raise http_error(exc) from exc  # 400
    except MediaServerError as exc:  # 503: the car tries its next endpoint, or again
        log.error("cannot take a call from %s: %s", vehicle, exc)
        raise http_error(exc) from exc
    return web.Response(status=201, text=answer, content_type=SDP,
                        headers={"Location": f"/whip/calls/{call.id}"})


async def hangup(request: web.Request) -> web.Response:
    vehicle = _car(request)
    try:
        call = request.app[DESK].car_call(request.match_info["id"], vehicle)
    except NotFound as exc:
        raise http_error(exc) from exc
    await call.close(record.CAR_HUNG_UP)
    return web.Response(text="call ended\n")


async def options(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Accept-Post": SDP})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/whip", offer)
    app.router.add_route("OPTIONS", "/whip", options)
    app.router.add_delete("/whip/calls/{id}", hangup)
