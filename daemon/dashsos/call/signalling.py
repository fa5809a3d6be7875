"""WHIP-shaped signalling (RFC 9725): POST the offer, get 201 + answer + Location,
DELETE the Location to hang up. Every way a server can answer badly becomes a
SignallingError whose text says what happened."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import urljoin

import aiohttp

MAX_ANSWER = 64 * 1024
MAX_REDIRECTS = 3


class SignallingError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # unreachable, timeout, unauthorized, rejected, server, malformed


@dataclass(frozen=True)
class Answer:
    sdp: str
    location: str  # absolute URL of the session, for DELETE


class WhipClient:
    def __init__(self, token: str, *, timeout: float, ssl_context: ssl.SSLContext | bool) -> None:
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._ssl = ssl_context

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def offer(self, endpoint: str, sdp: str) -> Answer:
        url = endpoint
        try:
            async with aiohttp.ClientSession(timeout=self._timeout) as session:
                for _ in range(MAX_REDIRECTS + 1):
                    async with session.post(url, data=sdp.encode(), ssl=self._ssl,
                                            headers=self._headers("application/sdp"),
                                            allow_redirects=False) as response:
                        if response.status in (307, 308):  # RFC 9725 allows these
                            url = urljoin(url, response.headers.get("Location", ""))
                            continue
                        return await self._answer(url, response)
                raise SignallingError("rejected", f"{endpoint}: more than {MAX_REDIRECTS} "
                                                  "redirects")
        except TimeoutError as exc:
            raise SignallingError("timeout", f"{endpoint}: no answer within "
                                             f"{self._timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            raise SignallingError("unreachable", f"{endpoint}: {exc}") from exc
        except ValueError as exc:  # a Location header that is not a URL
            raise SignallingError("malformed", f"{endpoint}: unusable URL in the answer: "
                                               f"{exc}") from exc

    async def _answer(self, url: str, response: aiohttp.ClientResponse) -> Answer:
        status = response.status
        if status in (401, 403):
            raise SignallingError("unauthorized", f"{url}: {status} {response.reason}: the "
                                                  "dispatcher refused our token")
        if 300 <= status < 400:
            raise SignallingError("rejected", f"{url}: redirect {status} is not allowed "
                                              "(only 307/308)")
        if 400 <= status < 500:
            raise SignallingError("rejected", f"{url}: {status} {response.reason}: "
                                              f"{(await _body(response))[:200]!r}")
        if status >= 500:
            raise SignallingError("server", f"{url}: {status} {response.reason}")
        if status != 201:
            raise SignallingError("malformed", f"{url}: expected 201 Created, got {status}")
        content_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/sdp":
            raise SignallingError("malformed", f"{url}: answer is {content_type or 'untyped'}, "
                                               "not application/sdp")
        location = response.headers.get("Location")
        if not location:
            raise SignallingError("malformed", f"{url}: 201 without a Location")
        sdp = await _body(response)
        if not sdp.startswith("v=0") or "\nm=" not in sdp:
            raise SignallingError("malformed", f"{url}: the answer is not an SDP")
        return Answer(sdp, urljoin(url, location))

    async def hang_up(self, location: str) -> None:
        """DELETE the session; the peer is closing anyway, so failures only get logged."""
        async with aiohttp.ClientSession(timeout=self._timeout) as session, \
                session.delete(location, headers=self._headers(), ssl=self._ssl) as response:
            if response.status >= 400 and response.status != 404:
                raise SignallingError("server", f"DELETE {location}: {response.status}")


async def _body(response: aiohttp.ClientResponse) -> str:
    data = await response.content.read(MAX_ANSWER + 1)
    if len(data) > MAX_ANSWER:
        raise SignallingError("malformed", f"{response.url}: answer larger than "
                                           f"{MAX_ANSWER // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignallingError("malformed", f"{response.url}: answer is not UTF-8") from exc
