"""One console watching a call carried by Janus: a VideoRoom subscriber of the car's feed.

Janus offers to its subscribers, so the flow runs the other way round from the embedded
desk's: the desk joins the room as a subscriber and hands the browser Janus's offer; the
browser's answer goes back through the desk (`start`). Media flows Janus -> browser, as
the car encoded it; the desk carries none of it. No talk-back: the car's publisher
connection receives nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from dashsos.dispatch import peer
from dashsos.dispatch.janus import JanusError, JanusSession
from dashsos.dispatch.janus_call import JanusCall, MediaServerError

log = logging.getLogger(__name__)


class JanusWatcher:
    def __init__(self, watcher_id: str, call: JanusCall, operator: str,
                 on_close: Callable[[JanusWatcher], None]) -> None:
        self.id = watcher_id
        self.call = call
        self.operator = operator
        self.mic = False
        self._on_close = on_close
        self._closed = False
        self.janus = JanusSession(call.janus_url)

    async def offer(self) -> str:
        """Subscribe to the car's feed: Janus's offer for the browser."""
        feed = self.call.janus.publisher_id
        if feed is None:
            raise peer.OfferError("the car is not publishing (yet)")
        try:
            await self.janus.start()
            return await self.janus.subscribe(self.call.room, feed)
        except JanusError as exc:
            raise peer.OfferError(f"the media server refused the subscription: {exc}") \
                from exc
        except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
            raise MediaServerError(f"the media server ({self.call.janus_url}) cannot be "
                                   f"reached: {type(exc).__name__}: {exc}") from exc

    async def answer(self, sdp: str) -> None:
        """The browser's complete answer to Janus's offer."""
        try:
            await self.janus.start_subscription(sdp)
        except JanusError as exc:
            raise peer.OfferError(f"the media server refused the answer: {exc}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise MediaServerError(f"the media server ({self.call.janus_url}) cannot be "
                                   f"reached: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.janus.close()
        self._on_close(self)
