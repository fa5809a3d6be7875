"""ICE from config only: which servers, which policy, which local addresses.

aiortc given no server list asks a public STUN server, so the list is always explicit.
aioice gathers host candidates on every interface but loopback; a car chooses which of
its links (cellular, Wi-Fi) carry a call, and tests keep calls on 127.0.0.1. That choice
is made here, in one place, by narrowing aioice's address lookup.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import struct
from pathlib import Path
from typing import Any

import aioice.ice
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCBundlePolicy, RTCIceTransportPolicy

from dashsos.call.signalling import IceServer
from dashsos.config import IceConfig

log = logging.getLogger(__name__)

_original_get_host_addresses = aioice.ice.get_host_addresses


def resolve_interfaces(interfaces: tuple[str, ...]) -> list[str]:
    """Addresses for a mix of IP addresses and interface names (wwan0, lo)."""
    addresses: list[str] = []
    adapters = {a.nice_name: a for a in ifaddr.get_adapters()}
    for item in interfaces:
        try:
            addresses.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        adapter = adapters.get(item)
        if adapter is None:
            log.warning("ice.interfaces: no interface or address %r; ignored", item)
            continue
        for ip in adapter.ips:
            if isinstance(ip.ip, str):
                addresses.append(ip.ip)
            elif ip.ip[2] == 0:  # IPv6 without a scope id (not link-local)
                addresses.append(ip.ip[0])
    return addresses


def confine_host_addresses(interfaces: tuple[str, ...]) -> None:
    """Gather host candidates only on these addresses/interfaces (all but loopback if
    empty). Process-wide, like the network itself."""
    if not interfaces:
        aioice.ice.get_host_addresses = _original_get_host_addresses
        return
    wanted = resolve_interfaces(interfaces)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        # Resolved at every call: wwan0 comes back from a coverage gap with a new address.
        now = resolve_interfaces(interfaces)
        return [a for a in now if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
    log.info("calls use only %s", ", ".join(wanted) or "(no address found now)")


def ice_configuration(ice: IceConfig, *, stun_urls: tuple[str, ...] | None = None,
                      turn_urls: tuple[str, ...] | None = None,
                      offered: tuple[IceServer, ...] = ()) -> RTCConfiguration:
    """Max-bundle (RFC 9725 4.2: one transport for every m-line). Servers the endpoint
    offered (Link headers, only when ice.from_server) fill in a kind config lacks."""
    stun_urls = ice.stun_urls if stun_urls is None else stun_urls
    turn_urls = ice.turn_urls if turn_urls is None else turn_urls
    servers = [RTCIceServer(urls=url) for url in stun_urls[:1]]
    if turn_urls:
        password = Path(ice.turn_password_file).read_text().strip() \
            if ice.turn_password_file else None
        # aiortc uses only the first STUN and the first TURN URL.
        servers.append(RTCIceServer(urls=turn_urls[0], username=ice.turn_username or None,
                                    credential=password))
    if ice.from_server:
        stun = next((s for s in offered if s.url.startswith("stun:")), None)
        turn = next((s for s in offered if s.url.startswith(("turn:", "turns:"))), None)
        if stun is not None and not stun_urls:
            servers.append(RTCIceServer(urls=stun.url))
        if turn is not None and not turn_urls:
            servers.append(RTCIceServer(urls=turn.url, username=turn.username,
                                        credential=turn.credential))
    policy = RTCIceTransportPolicy.RELAY if ice.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy,
                            bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


def _server_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a stun:/turn: URL over UDP; None for TCP/TLS (not probed)."""
    scheme, _, rest = url.partition(":")
    rest, _, query = rest.partition("?")
    if scheme not in ("stun", "turn") or "transport=tcp" in query:
        return None
    host, _, port = rest.rpartition(":") if rest.count(":") == 1 else (rest, "", "")
    return (host or rest).strip("[]"), int(port) if port.isdigit() else 3478


class _Probe(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answered = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        if not self.answered.done():
            self.answered.set_result(True)


async def answers_stun(url: str, timeout: float = 1.0) -> bool:
    """Does the server answer a STUN Binding request? TURN servers answer them too."""
    address = _server_address(url)
    if address is None:
        return True
    request = struct.pack("!HHI12s", 0x0001, 0, 0x2112A442, os.urandom(12))
    loop = asyncio.get_running_loop()
    try:
        transport, probe = await loop.create_datagram_endpoint(_Probe, remote_addr=address)
    except OSError:
        return False
    try:
        for _ in range(2):
            transport.sendto(request)
            try:
                await asyncio.wait_for(asyncio.shield(probe.answered), timeout / 2)
                return True
            except TimeoutError:
                continue
        return False
    finally:
        transport.close()


async def usable_configuration(ice: IceConfig,
                               offered: tuple[IceServer, ...] = ()) -> RTCConfiguration:
    """The configuration without servers that do not answer: aioice would wait ~40 s for
    an unreachable TURN server before the call could even be offered."""
    async def keep(urls: tuple[str, ...], kind: str) -> tuple[str, ...]:
        if not urls:
            return urls
        if await answers_stun(urls[0]):
            return urls
        if kind == "TURN" and ice.relay_only:
            return urls  # nothing else may carry the call: let it fail with a reason
        log.warning("%s server %s does not answer; calling without it", kind, urls[0])
        return ()

    stun, turn = await asyncio.gather(keep(ice.stun_urls, "STUN"), keep(ice.turn_urls, "TURN"))
    return ice_configuration(ice, stun_urls=stun, turn_urls=turn, offered=offered)
