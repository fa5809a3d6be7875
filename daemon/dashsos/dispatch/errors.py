"""What the desk refuses, as HTTP: one mapping from its errors to status codes, for the
consoles' API (api.py, owners.py) and the cars' (whip.py). The text says why."""

from __future__ import annotations

from aiohttp import web

from dashsos.dispatch import peer
from dashsos.dispatch.desk import Conflict, NotFound
from dashsos.dispatch.janus_call import MediaServerError

# The first that fits: no call, watcher or incident of that id; not the operator's to do
# (owners.NotOwner); not in the call's state (owners.Taken too); Janus cannot take it;
# an offer or answer that cannot be used.
STATUSES: tuple[tuple[type[Exception], type[web.HTTPException]], ...] = (
    (NotFound, web.HTTPNotFound),
    (PermissionError, web.HTTPForbidden),
    (Conflict, web.HTTPConflict),
    (MediaServerError, web.HTTPServiceUnavailable),
    (peer.OfferError, web.HTTPBadRequest),
)


def http_error(exc: Exception) -> web.HTTPException:
    """The HTTP error to raise for `exc` (400 for any other), its message as the text."""
    error = next((http for kind, http in STATUSES if isinstance(exc, kind)),
                 web.HTTPBadRequest)
    return error(text=f"{exc}\n")
