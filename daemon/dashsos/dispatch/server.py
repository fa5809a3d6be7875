"""`dashsos dispatch`: the reference dispatcher, an aiohttp server for cars and consoles."""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from dashsos.call.ice import confine_host_addresses
from dashsos.config import Config
from dashsos.dispatch import api, evidence, history, whip
from dashsos.dispatch.desk import DESK, Desk

log = logging.getLogger(__name__)


class AccessLog(AbstractAccessLogger):
    """Method, path, status, time: never the query string (no secret belongs there, but a
    client may put one there all the same)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %d %.3fs', request.remote, request.method, request.path,
                         response.status, time)


def make_app(config: Config) -> web.Application:
    if config.ice.interfaces:
        # Process-wide (aioice has one gatherer): every peer of this desk is confined.
        confine_host_addresses(config.ice.interfaces)
    # Bodies are SDP offers or a line of JSON: anything near 64 KiB is not one (413).
    app = web.Application(client_max_size=whip.MAX_OFFER)
    desk = Desk(config)
    app[DESK] = desk
    whip.add_routes(app)
    api.add_routes(app)
    evidence.add_routes(app)  # cars upload incidents; GET /api/evidence for the console
    history.add_routes(app)  # past calls' recordings and evidence played; the audit log

    async def start(_: web.Application) -> None:
        await desk.load()
        desk.fleet.start(asyncio.get_running_loop())

    async def stop(_: web.Application) -> None:
        # Before aiohttp waits for open requests: the event streams end here.
        await desk.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)
    return app


def tls_context(config: Config) -> ssl.SSLContext | None:
    cert, key = config.dispatch.tls_cert, config.dispatch.tls_key
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("dispatch.tls_cert and dispatch.tls_key: give both or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve(config: Config) -> None:
    """Serve until cancelled; every open call is ended and saved on the way out."""
    context = tls_context(config)
    runner = web.AppRunner(make_app(config), access_log=log, access_log_class=AccessLog)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.dispatch.listen, config.dispatch.port,
                           ssl_context=context)
        await site.start()
        scheme = "https" if context else "http"
        log.info("dispatcher on %s://%s:%d/ (cars POST /whip)", scheme,
                 config.dispatch.listen, config.dispatch.port)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
