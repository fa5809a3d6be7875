"""A private coturn (TURN and STUN) on 127.0.0.1 for the tests.

It relays only between loopback addresses: it listens and relays on 127.0.0.1, and refuses
peers anywhere else (denied-peer-ip for every IPv4 address outside 127.0.0.0/8 and every
IPv6 address), so a client that asks it to relay to the machine's other addresses gets an
error instead of traffic.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

TURNSERVER = "turnserver"
REALM = "dashsos.test"
RELAY_PORTS = 40  # each server relays on its own window of this many ports
_MAGIC = 0x2112A442


def _udp_tcp_free(port: int) -> bool:
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (coturn listens on both)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if _udp_tcp_free(port):
            return port
    raise RuntimeError("no free UDP+TCP port on 127.0.0.1")


def _relay_window() -> tuple[int, int]:
    """A window of relay ports below Linux's ephemeral range (32768-60999), so that no
    client socket takes them meanwhile, and chosen at random so that two servers (tests
    running in parallel) rarely share one; coturn skips a busy port anyway."""
    for _ in range(50):
        low = random.randrange(20000, 32700 - RELAY_PORTS, RELAY_PORTS)
        if all(_udp_tcp_free(p) for p in range(low, low + RELAY_PORTS)):
            return low, low + RELAY_PORTS - 1
    raise RuntimeError("no free relay port window")


def stun_binding(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> tuple[str, int]:
    """One STUN Binding request over UDP; returns the XOR-MAPPED-ADDRESS."""
    tid = secrets.token_bytes(12)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(struct.pack("!HHI", 0x0001, 0, _MAGIC) + tid, (host, port))
        data = s.recv(2048)
    if data[:2] != b"\x01\x01" or data[8:20] != tid:
        raise OSError(f"not a STUN Binding success: {data[:20].hex()}")
    pos, end = 20, 20 + struct.unpack("!H", data[2:4])[0]
    while pos + 4 <= end:
        kind, length = struct.unpack("!HH", data[pos:pos + 4])
        if kind == 0x0020:
            xport, xip = struct.unpack("!HI", data[pos + 6:pos + 12])
            return socket.inet_ntoa(struct.pack("!I", xip ^ _MAGIC)), xport ^ (_MAGIC >> 16)
        pos += 4 + (length + 3) // 4 * 4
    raise OSError("STUN Binding success without XOR-MAPPED-ADDRESS")


class TurnServer:
    """`turnserver -c <conf>` with long-term credentials for one user, on 127.0.0.1."""

    def __init__(self, workdir: Path, *, user: str = "dashsos",
                 password: str = "dashsos-turn-secret", start_timeout: float = 10) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.user = user
        self.password = password
        self.port = _free_port()
        self.min_port, self.max_port = _relay_window()
        self.log_path = self.workdir / "turn.log"
        self.pid_path = self.workdir / "turn.pid"
        self.conf_path = self.workdir / "turnserver.conf"
        self.log_path.unlink(missing_ok=True)  # coturn appends to it
        self.conf_path.write_text("\n".join([
            f"listening-port={self.port}",
            "listening-ip=127.0.0.1",
            "relay-ip=127.0.0.1",
            f"min-port={self.min_port}",
            f"max-port={self.max_port}",
            "lt-cred-mech",
            f"user={user}:{password}",
            f"realm={REALM}",
            "fingerprint",
            "allow-loopback-peers",
            "no-multicast-peers",
            # Only loopback peers: everything else is refused.
            "denied-peer-ip=0.0.0.0-126.255.255.255",
            "denied-peer-ip=128.0.0.0-255.255.255.255",
            "denied-peer-ip=::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "allowed-peer-ip=127.0.0.0-127.255.255.255",
            "no-tls",
            "no-dtls",
            "no-cli",
            "no-rfc5780",  # one address: no NAT behaviour discovery (and no port+1)
            f"userdb={self.workdir / 'turndb'}",
            f"log-file={self.log_path}",
            "simple-log",
            "verbose",  # session lines: ALLOCATE processed, peer usage
            "no-stdout-log",
            f"pidfile={self.pid_path}",
            "",
        ]))
        self._output = open(self.workdir / "turnserver.out", "wb")  # noqa: SIM115
        started = time.monotonic()
        self.process = subprocess.Popen([TURNSERVER, "-c", str(self.conf_path)],
                                        stdout=self._output, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"turnserver exited {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                stun_binding(self.port, timeout=0.1)
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"turnserver not answering on {self.port}:\n{self.log()}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    @property
    def tcp_url(self) -> str:
        return f"turn:127.0.0.1:{self.port}?transport=tcp"

    @property
    def stun_url(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def ice_server(self) -> dict[str, str]:
        """As a browser's RTCIceServer dictionary."""
        return {"urls": self.url, "username": self.user, "credential": self.password}

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def allocations_seen(self) -> int:
        """Successful allocations so far (each relayed candidate of a client is one)."""
        return len(re.findall(r"ALLOCATE processed, success", self.log()))

    def relayed_sessions(self) -> int:
        """Allocations that carried data to a peer, counted when the session ends
        (`peer usage: ... rp=<packets received from peers>, sp=<packets sent to peers>`)."""
        return sum(1 for rp, sp in re.findall(r"peer usage: .*?rp=(\d+), .*?sp=(\d+)", self.log())
                   if int(rp) and int(sp))

    def stop(self, timeout: float = 5) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait()
        self._output.close()

    def __enter__(self) -> TurnServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
