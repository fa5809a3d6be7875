"""Hands fixes from the receiver's thread to the loop and fans them out (track, evidence,
call, motion trigger), like media.bus does for packets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from dashsos.location.fix import Fix

log = logging.getLogger(__name__)


class FixFeed:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.subscribers: list[Callable[[Fix], None]] = []

    def publish_threadsafe(self, fix: Fix) -> None:
        try:
            self._loop.call_soon_threadsafe(self.publish, fix)
        except RuntimeError:  # loop closed during shutdown
            pass

    def publish(self, fix: Fix) -> None:
        for subscriber in list(self.subscribers):
            try:
                subscriber(fix)
            except Exception:  # one faulty consumer must not stop the others
                log.exception("fix subscriber %r failed", subscriber)
