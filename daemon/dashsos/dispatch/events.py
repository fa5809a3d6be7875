"""Fan-out of desk events to the consoles' Server-Sent Event streams."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Events waiting for one console; a console this far behind is cut off (it reconnects
# and reloads /api/calls) rather than making the desk hold memory for it.
QUEUE_MAX = 1000


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(QUEUE_MAX)


class EventHub:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        # Called with every event before it goes out: the desk matches calls to the
        # fleet's incidents by watching "call" events, whoever publishes them.
        self.taps: list[Callable[[str, dict[str, Any]], None]] = []

    def subscribe(self) -> Subscription:
        sub = Subscription()
        self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def publish(self, event: str, data: dict[str, Any]) -> None:
        """Send one event to every console, framed for text/event-stream."""
        for tap in self.taps:
            try:
                tap(event, data)
            except Exception:  # a tap's fault must not stop the event
                log.exception("event tap failed on %s", event)
        frame = f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
        for sub in list(self._subscribers):
            try:
                sub.queue.put_nowait(frame)
            except asyncio.QueueFull:
                log.warning("a console fell %d events behind; closing its stream", QUEUE_MAX)
                self._subscribers.discard(sub)
                # Make room for the end marker so its reader wakes up and leaves.
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)

    def close(self) -> None:
        """End every stream (the desk is stopping)."""
        for sub in list(self._subscribers):
            self.unsubscribe(sub)
            try:
                sub.queue.put_nowait(None)
            except asyncio.QueueFull:
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)
