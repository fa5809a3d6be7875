"""Hands packets from capture threads to the asyncio loop and fans them out.

Capture threads (the encoder, the PortAudio callback) call `publish_threadsafe`; every
subscriber then runs on the loop, so ring buffer, clip writer and call see packets in
one order and never block a capture thread.

Handing over costs a loop wake-up (a write to asyncio's self-pipe, a read, a pass of the
loop): the packets share one queue and one pending drain, so packets that arrive while
the loop is busy (several sources, a call in progress) are handed over by one wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from dashsos.media.packet import Packet

log = logging.getLogger(__name__)

Subscriber = Callable[[Packet], None]


class PacketBus:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # A tuple, replaced on (un)subscribe: publishing needs no copy of the list.
        self._subscribers: tuple[Subscriber, ...] = ()
        self.last_ns: dict[str, int] = {}
        self._pending: deque[Packet] = deque()  # from capture threads, in arrival order
        self._drain_scheduled = False

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        self._subscribers = (*self._subscribers, subscriber)

        def unsubscribe() -> None:
            self._subscribers = tuple(s for s in self._subscribers if s is not subscriber)

        return unsubscribe

    def publish_threadsafe(self, packet: Packet) -> None:
        # deque.append is atomic. A drain resets the flag before it counts the queue, so
        # a packet appended while the flag is still set is always in the count.
        self._pending.append(packet)
        if self._drain_scheduled:
            return
        self._drain_scheduled = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _drain(self) -> None:
        self._drain_scheduled = False
        pending = self._pending
        for _ in range(len(pending)):  # later arrivals have scheduled a drain of their own
            self.publish(pending.popleft())

    def publish(self, packet: Packet) -> None:
        self.last_ns[packet.stream] = packet.capture_ns
        for subscriber in self._subscribers:
            try:
                subscriber(packet)
            except Exception:  # one faulty consumer must not stop the recording
                log.exception("packet subscriber %r failed", subscriber)
