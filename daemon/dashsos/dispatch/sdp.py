"""Remote ICE candidates we are willing to send checks to.

aioice sends connectivity checks to every remote candidate it is given. A browser offers
all its LAN addresses; when the desk is confined to some interfaces (loopback in tests,
one uplink in a control room) we drop the candidates outside them before aiortc sees them.
"""

from __future__ import annotations

import ipaddress

import ifaddr

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_networks(interfaces: tuple[str, ...]) -> tuple[str, ...]:
    """The networks behind `interfaces` (addresses or interface names), as CIDR strings.

    An address stands for itself alone; an interface name for the networks it is on, so a
    console on the same LAN as the desk stays reachable.
    """
    out: list[str] = []
    adapters = None
    for entry in interfaces:
        try:
            out.append(str(ipaddress.ip_network(entry, strict=False)))
            continue
        except ValueError:
            pass
        if adapters is None:
            adapters = ifaddr.get_adapters()
        for adapter in adapters:
            if adapter.nice_name != entry:
                continue
            for ip in adapter.ips:
                address = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                out.append(str(ipaddress.ip_network(f"{address}/{ip.network_prefix}",
                                                    strict=False)))
    return tuple(out)


def filter_candidates(sdp: str, allowed: tuple[str, ...], *, complete: bool = False) -> str:
    """`sdp` with only the `a=candidate` lines whose address lies in `allowed`.

    `allowed` holds addresses or CIDR networks; empty keeps every candidate. Hostname
    (mDNS) candidates are dropped when filtering: we cannot tell where they lead.
    With `complete`, every media section ends with `a=end-of-candidates`: a WHIP offer
    is not trickled, and without the marker aioice would wait for more candidates forever
    instead of reporting a failed connection.
    """
    networks = [ipaddress.ip_network(a, strict=False) for a in allowed]
    newline = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    in_media = False
    ended = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            if in_media and complete and not ended:
                out.append("a=end-of-candidates")
            in_media, ended = True, False
        elif line == "a=end-of-candidates":
            ended = True
        elif line.startswith("a=candidate:") and networks and not _inside(line, networks):
            continue
        out.append(line)
    if in_media and complete and not ended:
        out.append("a=end-of-candidates")
    return newline.join(out) + newline if out else ""


def _inside(candidate: str, networks: list[Network]) -> bool:
    # a=candidate:<foundation> <component> <transport> <priority> <address> <port> typ ...
    fields = candidate.split()
    if len(fields) < 6:
        return False
    try:
        address = ipaddress.ip_address(fields[4])
    except ValueError:
        return False
    return any(address.version == n.version and address in n for n in networks)
