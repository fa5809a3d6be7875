"""A userspace netem: joins two network namespaces with a TUN device in each and carries
IP packets between them with delay, random loss and outages (this machine's kernel has
no sch_netem; the bandwidth cap is real tc, a tbf qdisc on each TUN device).

    python netrelay.py CAR_NS CAR_DEV DESK_NS DESK_DEV CONTROL_JSON

CONTROL_JSON holds {"delay_ms": 150, "loss": 0.05, "down": false, "block_udp": false},
read again whenever it changes ("block_udp": a network that carries TCP but drops UDP,
as some carriers' firewalls do). Each direction gets the delay and the loss once
(RTT = 2 x delay_ms). The devices exist while this process runs; the caller gives them
addresses.
"""

from __future__ import annotations

import ctypes
import fcntl
import heapq
import json
import os
import random
import struct
import sys
import threading
import time
from pathlib import Path

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
UDP = 17  # the IPv4 header's protocol field (byte 9); IPv6 is off in the namespaces
_libc = ctypes.CDLL("libc.so.6", use_errno=True)


def enter(namespace: str) -> None:
    """Move the calling thread into the network namespace at path `namespace` (sockets
    and devices it opens afterwards belong there; other threads stay where they are)."""
    fd = os.open(namespace, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {namespace}")
    finally:
        os.close(fd)


def tun_in(ns: str, name: str) -> int:
    """Open a TUN device `name` inside namespace `ns` (this thread visits it)."""
    home = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    home_fd = os.open(home, os.O_RDONLY)
    try:
        enter(f"/var/run/netns/{ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        return fd
    finally:
        _libc.setns(home_fd, CLONE_NEWNET)
        os.close(home_fd)


class Settings:
    def __init__(self, path: str) -> None:
        self.path = path
        self.delay = 0.0
        self.loss = 0.0
        self.down = False
        self.block_udp = False
        self._mtime = 0

    def refresh(self) -> None:
        try:
            mtime = os.stat(self.path).st_mtime_ns
            if mtime == self._mtime:
                return
            data = json.loads(Path(self.path).read_text())
        except (OSError, ValueError):
            return
        self._mtime = mtime
        self.delay = float(data.get("delay_ms", 0)) / 1000
        self.loss = float(data.get("loss", 0))
        self.down = bool(data.get("down", False))
        self.block_udp = bool(data.get("block_udp", False))


def carry(src: int, dst: int, settings: Settings) -> None:
    queue: list[tuple[float, int, bytes]] = []
    ready = threading.Condition()
    counter = 0

    def send() -> None:
        while True:
            with ready:
                while not queue or queue[0][0] > time.monotonic():
                    ready.wait(queue[0][0] - time.monotonic() if queue else None)
                _, _, packet = heapq.heappop(queue)
            try:
                os.write(dst, packet)
            except OSError:
                pass  # the device is down: the packet is lost, as on a dead link

    threading.Thread(target=send, daemon=True).start()
    while True:
        try:
            packet = os.read(src, 65536)
        except OSError:
            time.sleep(0.05)
            continue
        if settings.down or random.random() < settings.loss:
            continue
        if settings.block_udp and len(packet) > 9 and packet[9] == UDP:
            continue
        with ready:
            counter += 1
            heapq.heappush(queue, (time.monotonic() + settings.delay, counter, packet))
            ready.notify()


def main() -> None:
    car_ns, car_dev, desk_ns, desk_dev, control = sys.argv[1:6]
    settings = Settings(control)
    settings.refresh()
    car, desk = tun_in(car_ns, car_dev), tun_in(desk_ns, desk_dev)
    for src, dst in ((car, desk), (desk, car)):
        threading.Thread(target=carry, args=(src, dst, settings), daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(0.05)
        settings.refresh()


if __name__ == "__main__":
    main()
