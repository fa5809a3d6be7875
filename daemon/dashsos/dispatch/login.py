"""Operator login: the token typed once into a form, then an opaque session cookie.

POST /login takes the operator token (form field or JSON "token") and sets the session
cookie; POST /logout ends the session. Tokens never travel in URLs (they would land in
access logs, browser history and Referer headers). API clients may still send
`Authorization: Bearer <token>` on every request instead of logging in.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from dashsos.dispatch.auth import bearer, unauthorized
from dashsos.dispatch.desk import DESK

log = logging.getLogger(__name__)

SESSION_COOKIE = "dashsos_session"
MAX_TOKEN = 512  # longer is not a token: refused before any comparison


def operator(request: web.Request, touch: bool = True) -> str | None:
    """The operator behind this request (Bearer token or session cookie), or None.
    `touch`: the request is the operator's doing, so the session's idle clock restarts
    (an event stream's heartbeat is not)."""
    desk = request.app[DESK]
    token = bearer(request)
    if token:
        return desk.operators.lookup(token)
    session = desk.sessions.get(request.cookies.get(SESSION_COOKIE, ""), touch)
    if session is None:
        return None
    # The token may have been revoked (or given to someone else) since the login.
    if desk.operators.lookup(session.token) != session.operator:
        desk.sessions.close(session.id)
        return None
    return session.operator


def require(request: web.Request) -> str:
    name = operator(request)
    if name is None:
        raise unauthorized("log in at /login (or send Authorization: Bearer <token>)")
    return name


async def _token(request: web.Request) -> str:
    if request.content_type == "application/json":
        try:
            body: Any = await request.json()
        except ValueError:
            body = None
        token = body.get("token") if isinstance(body, dict) else None
    else:
        token = (await request.post()).get("token")
    return token.strip() if isinstance(token, str) and len(token) <= MAX_TOKEN else ""


async def login(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    address = request.remote or "?"
    wants_json = request.content_type == "application/json"
    if not desk.fail_limit.allowed(address):
        wait = desk.fail_limit.retry_after(address)
        log.warning("login from %s refused: too many failed logins", address)
        raise web.HTTPTooManyRequests(text="too many failed logins: wait a moment\n",
                                      headers={"Retry-After": str(max(1, round(wait)))})
    token = await _token(request)
    name = desk.operators.lookup(token)
    if name is None:
        desk.fail_limit.failed(address)
        desk.audit.add("login_failed", None, address)
        log.warning("failed console login from %s", address)
        raise web.HTTPUnauthorized(text="unknown operator token\n")
    old = desk.sessions.close(request.cookies.get(SESSION_COOKIE, ""))
    if old is not None:
        desk.audit.add("logout", old.operator, address, reason="new login")
    session = desk.sessions.open(name, token, address)
    desk.audit.add("login", name, address)
    log.info("console login by %s from %s", name, address)
    response: web.Response
    if wants_json:
        response = web.json_response({"operator": name})
    else:  # a plain form post: on to the console (no script needed to log in)
        response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(SESSION_COOKIE, session.id, path="/", httponly=True,
                        samesite="Strict", secure=request.secure)
    response.headers["Cache-Control"] = "no-store"
    return response


async def logout(request: web.Request) -> web.Response:
    desk = request.app[DESK]
    session = desk.sessions.close(request.cookies.get(SESSION_COOKIE, ""))
    if session is not None:
        desk.audit.add("logout", session.operator, request.remote)
        log.info("console logout by %s", session.operator)
    response = web.json_response({"logged_out": session is not None})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def whoami(request: web.Request) -> web.Response:
    """Who this session is: {"operator": null} when logged out (the page's question on
    loading, answered without a 401 for the browser to report as an error)."""
    return web.json_response({"operator": operator(request)},
                             headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/api/me", whoami)
