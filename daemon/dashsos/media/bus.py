"""Hands packets from capture threads to the asyncio loop and fans them out.

Capture threads (the encoder, the PortAudio callback) call `publish_threadsafe`; every
subscriber then runs on the loop, so ring buffer, clip writer and call see packets in
one order and never block a capture thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dashsos.media.packet import Packet

log = logging.getLogger(__name__)

Subscriber = Callable[[Packet], None]


class PacketBus:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscribers: list[Subscriber] = []
        self.last_ns: dict[str, int] = {}

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber) if subscriber in \
            self._subscribers else None

    def publish_threadsafe(self, packet: Packet) -> None:
        try:
            self._loop.call_soon_threadsafe(self.publish, packet)
        except RuntimeError:  # loop closed during shutdown
            pass

    def publish(self, packet: Packet) -> None:
        self.last_ns[packet.stream] = packet.capture_ns
        for subscriber in list(self._subscribers):
            try:
                subscriber(packet)
            except Exception:  # one faulty consumer must not stop the recording
                log.exception("packet subscriber %r failed", subscriber)
