"""Who owns a call or an incident: the operator who took it.

A new call (or an open incident from the fleet) rings in every console until an operator
takes it; the owner alone talks to the car and hangs up, the others may still watch. A
call's owner is kept in its record (call.json); an incident's in the desk's memory.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from dashsos.dispatch import login
from dashsos.dispatch.car import CarCall
from dashsos.dispatch.desk import DESK, Conflict, Desk, NotFound
from dashsos.dispatch.errors import http_error
from dashsos.dispatch.janus_call import JanusCall
from dashsos.dispatch.record import now_iso


class Taken(Conflict):
    """Another operator owns it (409, naming them)."""

    def __init__(self, what: str, owner: str) -> None:
        super().__init__(f"{what} is taken by {owner}")
        self.owner = owner


class NotOwner(PermissionError):
    """Only the owner may do this (403, as every PermissionError: errors.py)."""


def take_call(desk: Desk, call_id: str, operator: str) -> CarCall | JanusCall:
    call = desk.live_call(call_id)
    rec = call.record
    if rec.owner not in (None, operator):
        raise Taken(f"call {call_id}", rec.owner)
    if rec.owner is None:
        rec.owner, rec.taken = operator, now_iso()
        # The car hears the owner only: another console's microphone loses the floor.
        talker = desk.watchers.get(call.talker or "")
        if talker is not None and talker.operator != operator:
            call.talker = next((w.id for w in desk.watchers.values()
                                if w.call is call and w.mic and w.operator == operator),
                               None)
        incident = rec.msd.get("id") if rec.msd else None
        if isinstance(incident, str):  # its incident is answered too: it stops ringing
            desk.incident_owners.setdefault((rec.vehicle_id, incident),
                                            {"owner": operator, "taken": rec.taken})
        call.recording.save(rec)  # the owner is on record even if the desk stops now
        desk.hub.publish("call", rec.as_json())
    return call


def owned_call(desk: Desk, call_id: str, operator: str, what: str) -> CarCall | JanusCall:
    """The live call, for its owner to act on. Acting on a call nobody took takes it."""
    call = desk.live_call(call_id)
    owner = call.record.owner
    if owner is None:
        return take_call(desk, call_id, operator)
    if owner != operator:
        raise NotOwner(f"call {call_id} is taken by {owner}: only {owner} may {what}")
    return call


def find_incident(desk: Desk, incident_id: str, vehicle_id: str | None) -> dict[str, Any]:
    found = [i for i in desk.fleet.incidents_json() if i.get("id") == incident_id
             and vehicle_id in (None, i.get("vehicle_id"))]
    if not found:
        raise NotFound(f"no incident {incident_id}")
    if len(found) > 1:
        raise Conflict(f"incident {incident_id} is on several vehicles: name the vehicle_id")
    return found[0]


def take_incident(desk: Desk, incident_id: str, vehicle_id: str | None,
                  operator: str) -> dict[str, Any]:
    incident = find_incident(desk, incident_id, vehicle_id)
    key = (str(incident["vehicle_id"]), incident_id)
    owner = desk.incident_owners.get(key, {}).get("owner")
    if owner not in (None, operator):
        raise Taken(f"incident {incident_id}", str(owner))
    if owner is None:
        desk.incident_owners[key] = {"owner": operator, "taken": now_iso()}
        desk.hub.publish("incident", incident)  # the desk's tap adds the owner
    incident.update(desk.incident_owner(*key))
    return incident


async def take(request: web.Request) -> web.Response:
    operator = login.require(request)
    desk = request.app[DESK]
    call_id = request.match_info["id"]
    try:
        call = take_call(desk, call_id, operator)
    except (NotFound, Conflict) as exc:
        desk.audit.add("take_refused", operator, request.remote, call=call_id,
                       reason=str(exc))
        raise http_error(exc) from exc
    desk.audit.add("take", operator, request.remote, call=call_id,
                   vehicle_id=call.record.vehicle_id)
    return web.json_response(call.record.as_json())


async def take_fleet_incident(request: web.Request) -> web.Response:
    operator = login.require(request)
    desk = request.app[DESK]
    incident_id = request.match_info["id"]
    vehicle = request.query.get("vehicle_id")
    if request.can_read_body and request.content_type == "application/json":
        try:
            body: Any = await request.json()
        except ValueError as exc:
            raise web.HTTPBadRequest(text='send JSON: {"vehicle_id": "<id>"}\n') from exc
        if isinstance(body, dict) and isinstance(body.get("vehicle_id"), str):
            vehicle = body["vehicle_id"]
    try:
        incident = take_incident(desk, incident_id, vehicle, operator)
    except (NotFound, Conflict) as exc:
        desk.audit.add("take_refused", operator, request.remote, incident=incident_id,
                       reason=str(exc))
        raise http_error(exc) from exc
    desk.audit.add("take", operator, request.remote, incident=incident_id,
                   vehicle_id=incident.get("vehicle_id"))
    return web.json_response(incident)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/calls/{id}/take", take)
    app.router.add_post("/api/incidents/{id}/take", take_fleet_incident)
