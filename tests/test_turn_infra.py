"""The coturn helper works here: two aiortc peers in one process, both relay-only through
a private TURN server on 127.0.0.1, open a data channel and exchange messages; the pair in
use is relay/relay and the server's log shows the allocations and the relayed packets."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aioice import stun
from aioice.turn import TurnClientUdpProtocol
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcconfiguration import RTCIceTransportPolicy

from conftest import wait_for
from turn import TurnServer, stun_binding


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Like conftest's _require: a missing tool fails (a skip would pass CI unseen).
    if shutil.which("turnserver") is None:
        pytest.fail("needs coturn (apt)")


@pytest.fixture
def turn(tmp_path: Path) -> Iterator[TurnServer]:
    server = TurnServer(tmp_path / "turn")
    yield server
    server.stop()


def test_turn_server_starts_answers_and_stops(tmp_path: Path) -> None:
    server = TurnServer(tmp_path)
    try:
        assert server.start_seconds < 3
        assert server.url == f"turn:127.0.0.1:{server.port}?transport=udp"
        assert stun_binding(server.port)[0] == "127.0.0.1"
        assert server.pid_path.read_text().strip() == str(server.process.pid)
        assert server.allocations_seen() == 0
    finally:
        server.stop()
    assert server.process.returncode is not None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", server.port))  # released


def relay_only(turn: TurnServer) -> RTCConfiguration:
    return RTCConfiguration(
        iceServers=[RTCIceServer(urls=turn.url, username=turn.user, credential=turn.password)],
        iceTransportPolicy=RTCIceTransportPolicy.RELAY)


async def _call(turn: TurnServer) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    a = RTCPeerConnection(relay_only(turn))
    b = RTCPeerConnection(relay_only(turn))
    received: asyncio.Queue[str] = asyncio.Queue()
    opened = loop.create_future()
    try:
        channel = a.createDataChannel("sos")
        channel.on("open", lambda: opened.done() or opened.set_result(None))

        @b.on("datachannel")
        def on_datachannel(incoming: Any) -> None:
            @incoming.on("message")
            def on_message(message: str) -> None:
                received.put_nowait(message)
                incoming.send(f"ack {message}")

        @channel.on("message")
        def on_ack(message: str) -> None:
            received.put_nowait(message)

        started = time.monotonic()
        await a.setLocalDescription(await a.createOffer())
        await b.setRemoteDescription(a.localDescription)
        await b.setLocalDescription(await b.createAnswer())
        await a.setRemoteDescription(b.localDescription)
        await asyncio.wait_for(opened, 10)
        connect_seconds = time.monotonic() - started
        channel.send("hello dispatcher")
        messages = [await asyncio.wait_for(received.get(), 5) for _ in range(2)]

        ice = [pc.sctp.transport.transport for pc in (a, b)]  # RTCIceTransport
        # aiortc has no getStats for ICE: the selected pair is aioice's nominated pair.
        nominated = [t._connection._nominated[1] for t in ice]
        return {
            "connect_seconds": connect_seconds,
            "messages": messages,
            "sdp": [a.localDescription.sdp, b.localDescription.sdp],
            "local": [[(c.type, c.ip) for c in t.iceGatherer.getLocalCandidates()] for t in ice],
            "remote": [[(c.type, c.ip) for c in t.getRemoteCandidates()] for t in ice],
            "pairs": [((p.local_candidate.type, p.local_candidate.host),
                       (p.remote_candidate.type, p.remote_candidate.host)) for p in nominated],
        }
    finally:
        await a.close()
        await b.close()


def test_aiortc_relay_only_data_channel(turn: TurnServer) -> None:
    result = asyncio.run(_call(turn))
    print(f"TURN start {turn.start_seconds:.3f} s, relay-only connect "
          f"{result['connect_seconds']:.3f} s")

    assert sorted(result["messages"]) == ["ack hello dispatcher", "hello dispatcher"]
    assert result["connect_seconds"] < 5
    # Relay-only: no host or server-reflexive candidate offered on either side.
    for sdp in result["sdp"]:
        candidates = [line for line in sdp.splitlines() if line.startswith("a=candidate:")]
        assert candidates and all(" typ relay " in c for c in candidates), candidates
    for side in result["local"] + result["remote"]:
        assert side and all(c == ("relay", "127.0.0.1") for c in side), result
    for local, remote in result["pairs"]:
        assert local == ("relay", "127.0.0.1") and remote == ("relay", "127.0.0.1"), result

    # The server allocated a relay for each peer and, once the peers closed, reports
    # packets both to and from the peer on each allocation.
    assert turn.allocations_seen() >= 2, turn.log()
    wait_for(lambda: turn.relayed_sessions() >= 2, 5, "coturn's peer usage lines")


async def _channel_bind(turn: TurnServer, peer: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_datagram_endpoint(
        lambda: TurnClientUdpProtocol(("127.0.0.1", turn.port), username=turn.user,
                                      password=turn.password, lifetime=60,
                                      channel_refresh_time=50),
        remote_addr=("127.0.0.1", turn.port))
    try:
        await client.connect()
        await client.channel_bind(0x4000, peer)
    finally:
        if client.refresh_task:
            client.refresh_task.cancel()
        transport.close()


def test_relay_refuses_peers_off_loopback(turn: TurnServer) -> None:
    """A permission for a peer off loopback is refused (no packet is sent to it: a
    ChannelBind only asks the server)."""
    asyncio.run(_channel_bind(turn, ("127.0.0.1", 9)))
    with pytest.raises(stun.TransactionFailed) as refused:
        asyncio.run(_channel_bind(turn, ("192.0.2.2", 9)))
    assert refused.value.response.attributes["ERROR-CODE"][0] == 403
