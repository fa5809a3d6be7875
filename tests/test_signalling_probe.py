"""The car's signalling client probing a server (issue 11): how a host answers tells a
dead far end from a path that is down; a kept DELETE races overlapping tries and stops
at the first answer; the connection a DELETE succeeded on carries the next POST."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiohttp import web

from conftest import free_port
from dashsos.call import signalling
from dashsos.call.signalling import SignallingError, WhipClient

ANSWER = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


class Server:
    """A WHIP-shaped server on loopback that notes which connection each request used."""

    def __init__(self, delete_status: int = 200) -> None:
        self.delete_status = delete_status
        self.connections: list[Any] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/whip"
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> Server:
        app = web.Application()
        app.router.add_post("/whip", self._post)
        app.router.add_delete("/whip/{id}", self._delete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.connections.append(request.transport.get_extra_info("peername"))

    async def _post(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=201, text=ANSWER, content_type="application/sdp",
                            headers={"Location": "/whip/1"})

    async def _delete(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(status=self.delete_status, text="gone wrong")


def _client() -> WhipClient:
    return WhipClient("token", timeout=5.0, ssl_context=False)


def test_a_host_accepting_or_refusing_is_an_answer() -> None:
    async def run() -> tuple[str | None, str | None]:
        client = _client()
        async with Server() as server:
            accepted = await client.reachable(server.url, 1.0)
        refused = await client.reachable(f"http://127.0.0.1:{free_port()}/whip", 1.0)
        return accepted, refused

    assert asyncio.run(run()) == ("accepted", "refused")


def test_the_delete_s_connection_carries_the_next_post() -> None:
    async def run() -> list[Any]:
        client = _client()
        async with Server() as server:
            await client.hang_up(f"{server.url}/1", probe=True)
            await client.offer(server.url, "v=0\r\n")  # at once: the same connection
            await client.hang_up(f"{server.url}/1", probe=True)
            await asyncio.sleep(signalling.WARM_S + 0.2)
            await client.offer(server.url, "v=0\r\n")  # after idle time: a new one
            await client.close()
            return server.connections

    first, post, second, late = asyncio.run(run())
    assert post == first and late != second


@pytest.mark.parametrize("status", [500, 503])
def test_a_probe_stops_racing_at_the_server_s_answer(status: int) -> None:
    async def run() -> tuple[SignallingError, float, int]:
        client = _client()
        async with Server(delete_status=status) as server:
            started = time.monotonic()
            with pytest.raises(SignallingError) as caught:
                await client.hang_up(f"{server.url}/1", probe=True)
            return caught.value, time.monotonic() - started, len(server.connections)

    error, took, tries = asyncio.run(run())
    assert error.kind == "server" and error.status == status and "gone wrong" in str(error)
    assert took < 1.0 and tries == 1, (took, tries)


def test_a_probe_of_a_closed_port_fails_after_its_burst() -> None:
    async def run() -> tuple[SignallingError, float]:
        client = _client()
        started = time.monotonic()
        with pytest.raises(SignallingError) as caught:
            await client.hang_up(f"http://127.0.0.1:{free_port()}/whip/1", probe=True)
        return caught.value, time.monotonic() - started

    error, took = asyncio.run(run())
    assert error.kind == "unreachable"
    # Refused at once, try after try, each 0.25 s apart, for the burst: no busy loop.
    assert signalling.PROBE_BURST_S - 0.1 < took < signalling.PROBE_BURST_S + 1.0, took
