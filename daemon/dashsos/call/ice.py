"""ICE from config only: which servers, which policy, which local addresses.

aiortc given no server list asks a public STUN server, so the list is always explicit.
aioice gathers host candidates on every interface but loopback; a car chooses which of
its links (cellular, Wi-Fi) carry a call, and tests keep calls on 127.0.0.1. That choice
is made here, in one place, by narrowing aioice's address lookup.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import aioice.ice
import ifaddr
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcconfiguration import RTCIceTransportPolicy

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
        return [a for a in wanted if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses
    log.info("calls use only %s", ", ".join(wanted) or "(no address found!)")


def ice_configuration(ice: IceConfig) -> RTCConfiguration:
    servers = [RTCIceServer(urls=url) for url in ice.stun_urls[:1]]
    if ice.turn_urls:
        password = Path(ice.turn_password_file).read_text().strip() \
            if ice.turn_password_file else None
        # aiortc uses only the first STUN and the first TURN URL.
        servers.append(RTCIceServer(urls=ice.turn_urls[0], username=ice.turn_username or None,
                                    credential=password))
    policy = RTCIceTransportPolicy.RELAY if ice.relay_only else RTCIceTransportPolicy.ALL
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)
