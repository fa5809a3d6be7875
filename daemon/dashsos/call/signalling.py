"""WHIP-shaped signalling (RFC 9725): POST the offer, get 201 + answer + Location,
DELETE the Location to hang up. Every way a server can answer badly becomes a
SignallingError whose text says what happened."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp

R = TypeVar("R")
MAX_ANSWER = 64 * 1024
MAX_REDIRECTS = 3
MAX_QUOTED = 120  # characters of a server's error body quoted in status and logs
DELETE_TIMEOUT_S = 3.0  # a hang-up on a dead link fails fast and is retried later
# A TCP connect that has not completed in this long is on a dead path: fail and let the
# re-dial try a new one (a lost SYN is otherwise retried only after 1, 3, 7 s...). One
# lost SYN (resent after 1 s) on a slow mobile path still connects.
CONNECT_TIMEOUT_S = 2.5
# A kept DELETE retried in the background probes for the link's return: tries start
# every PROBE_EVERY_S and overlap (each waits up to PROBE_CONNECT_S for its connection),
# so the link's return is noticed within a round trip or so, not after a SYN backoff.
PROBE_CONNECT_S = 1.2
PROBE_EVERY_S = 0.25
PROBE_BURST_S = 2.0  # one retry of a kept DELETE: this long of overlapping tries
# The connection a DELETE succeeded on carries the POST that follows it (one round trip
# saved, and a SYN that could be lost): kept this long, never across idle time, where a
# dead path would hold a request until its timeout.
WARM_S = 1.0


class SignallingError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        # unreachable, timeout, unauthorized (401), rejected (403, other 4xx, refused
        # redirects), server, malformed
        self.kind = kind
        self.status = status


@dataclass(frozen=True)
class IceServer:
    url: str
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class Answer:
    sdp: str
    location: str  # absolute URL of the session, for DELETE
    ice_servers: tuple[IceServer, ...] = field(default=())  # from Link rel="ice-server"


def origin(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return f"{parts.scheme}://{(parts.hostname or '').lower()}:{port}"


def sanitise(text: str) -> str:
    """A server's words, safe for status, logs and MQTT: no markup, no control
    characters, one line, short."""
    text = re.sub(r"<[^>]*>", " ", text)
    text = "".join(c if c.isprintable() else " " for c in text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_QUOTED else text[:MAX_QUOTED - 3] + "..."


def redirect_refusal(current: str, target: str, allowed_origins: tuple[str, ...]) -> str | None:
    """Why a redirect from current to target must not be followed (None: follow it).
    Same scheme or an upgrade to https; the token goes to another origin only if the
    configuration names that origin."""
    old, new = urlsplit(current).scheme, urlsplit(target).scheme
    if new not in ("http", "https"):
        return f"redirect to {new or 'a relative'} scheme {target!r} refused"
    if old == "https" and new == "http":
        return f"redirect from https to http ({target}) refused: the token and SDP " \
               "would travel in clear text"
    if origin(target) != origin(current) and \
            origin(target) not in {origin(o) for o in allowed_origins}:
        return f"redirect to another origin ({origin(target)}) refused: the token is " \
               "never sent there unless call.redirect_origins names it"
    return None


def parse_ice_links(values: list[str]) -> tuple[IceServer, ...]:
    """Link: <turn:turn.example.net?transport=udp>; rel="ice-server";
    username="user"; credential="pass"; credential-type="password" (RFC 9725 4.6)."""
    servers = []
    for value in values:
        for link in re.finditer(r'<([^>]*)>((?:\s*;\s*[\w-]+\s*=\s*(?:"[^"]*"|[^;,]*))*)',
                                value):
            params = {k.lower(): v.strip('"') for k, v in
                      re.findall(r';\s*([\w-]+)\s*=\s*("[^"]*"|[^;,]*)', link.group(2))}
            url = link.group(1).strip()
            if params.get("rel", "").lower() != "ice-server" or \
                    url.split(":")[0] not in ("stun", "stuns", "turn", "turns"):
                continue
            servers.append(IceServer(url, params.get("username"), params.get("credential")))
    return tuple(servers)


def _describe(exc: aiohttp.ClientError) -> str:
    """A connection error without aiohttp's object reprs (ssl:<ssl.SSLContext ...>)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or type(exc.os_error).__name__
        return f"cannot connect to {exc.host}:{exc.port}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return sanitise(str(exc)) or type(exc).__name__


class WhipClient:
    def __init__(self, token: str, *, timeout: float, ssl_context: ssl.SSLContext | bool,
                 redirect_origins: tuple[str, ...] = ()) -> None:
        self._token = token
        connect = min(timeout, CONNECT_TIMEOUT_S)
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect)
        self._delete_timeout = aiohttp.ClientTimeout(total=min(timeout, DELETE_TIMEOUT_S),
                                                     sock_connect=connect)
        self._probe_timeout = aiohttp.ClientTimeout(total=min(timeout, DELETE_TIMEOUT_S),
                                                    sock_connect=min(connect, PROBE_CONNECT_S))
        self._ssl = ssl_context
        self._redirect_origins = redirect_origins
        self._warm: tuple[str, float, aiohttp.ClientSession] | None = None  # origin, since

    async def _session(self, url: str) -> aiohttp.ClientSession:
        """The warm session if a DELETE to this origin just succeeded, else a new one."""
        warm, self._warm = self._warm, None
        if warm is not None:
            at, since, session = warm
            if at == origin(url) and time.monotonic() - since < WARM_S:
                return session
            await session.close()
        return aiohttp.ClientSession()

    async def _keep_warm(self, url: str, session: aiohttp.ClientSession) -> None:
        if self._warm is not None:
            await self._warm[2].close()
        self._warm = (origin(url), time.monotonic(), session)

    async def close(self) -> None:
        if self._warm is not None:
            await self._warm[2].close()
            self._warm = None

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self._token}"}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def offer(self, endpoint: str, sdp: str) -> Answer:
        url = endpoint
        try:
            async with await self._session(endpoint) as session:
                for _ in range(MAX_REDIRECTS + 1):
                    async with session.post(url, data=sdp.encode(), ssl=self._ssl,
                                            headers=self._headers("application/sdp"),
                                            timeout=self._timeout,
                                            allow_redirects=False) as response:
                        if response.status in (307, 308):  # RFC 9725 allows these
                            target = urljoin(url, response.headers.get("Location", ""))
                            refusal = redirect_refusal(url, target, self._redirect_origins)
                            if refusal:
                                raise SignallingError("rejected", f"{url}: {refusal}",
                                                      response.status)
                            url = target
                            continue
                        return await self._answer(url, response)
                raise SignallingError("rejected", f"{endpoint}: more than {MAX_REDIRECTS} "
                                                  "redirects")
        except aiohttp.ConnectionTimeoutError as exc:
            raise SignallingError("unreachable", f"{endpoint}: no connection within "
                                  f"{self._timeout.sock_connect:g} s") from exc
        except TimeoutError as exc:
            raise SignallingError("timeout", f"{endpoint}: no answer within "
                                             f"{self._timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            raise SignallingError("unreachable", f"{endpoint}: {_describe(exc)}") from exc
        except ValueError as exc:  # a Location header that is not a URL
            raise SignallingError("malformed", f"{endpoint}: unusable URL in the answer: "
                                               f"{exc}") from exc

    async def _answer(self, url: str, response: aiohttp.ClientResponse) -> Answer:
        status = response.status
        if status >= 300:
            said = await _said(response)
            if status == 401:
                raise SignallingError("unauthorized", f"{url}: 401 {response.reason}: the "
                                      f"dispatcher refused our token{said}", status)
            if status == 403:  # often "Endpoint ID already in use", not the token
                raise SignallingError("rejected", f"{url}: 403 {response.reason}{said}",
                                      status)
            if status < 400:
                raise SignallingError("rejected", f"{url}: redirect {status} is not allowed "
                                      f"(only 307/308){said}", status)
            kind = "rejected" if status < 500 else "server"
            raise SignallingError(kind, f"{url}: {status} {response.reason}{said}", status)
        if status != 201:
            raise SignallingError("malformed", f"{url}: expected 201 Created, got {status}",
                                  status)
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
        return Answer(sdp, urljoin(url, location),
                      parse_ice_links(response.headers.getall("Link", [])))

    async def reachable(self, url: str, within: float) -> str | None:
        """How the host of `url` answers a TCP connection within `within` s: "accepted",
        "refused" (the host is up, its server is not), or None: nothing came back (the
        path is down, or the host is gone)."""
        parts = urlsplit(url)
        host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https"
                                                          else 80)
        return await _race(lambda: _connects(host, port), bool, within)

    async def hang_up(self, location: str, *, probe: bool = False) -> None:
        """DELETE the session. 404 means it is gone already (success). Raises
        SignallingError when the server could not be told: the caller keeps the URL.
        `probe`: a background retry, which races overlapping tries for PROBE_BURST_S."""
        if not probe:
            await self._delete(location, self._delete_timeout)
            return
        failures: list[SignallingError] = []

        async def attempt() -> SignallingError | bool:
            try:
                await self._delete(location, self._probe_timeout)
            except SignallingError as exc:
                failures.append(exc)
                return exc
            return True

        def settles(result: SignallingError | bool) -> bool:
            # Done, or the server answered (no point racing on): either way, stop.
            return result is True or (isinstance(result, SignallingError)
                                      and result.kind not in ("unreachable", "timeout"))

        settled = await _race(attempt, settles, PROBE_BURST_S)
        if settled is True:
            return
        raise settled if isinstance(settled, SignallingError) else failures[-1]

    async def _delete(self, location: str, timeout: aiohttp.ClientTimeout) -> None:
        session = aiohttp.ClientSession()
        kept = False
        try:
            async with session.delete(location, headers=self._headers(), ssl=self._ssl,
                                      timeout=timeout, allow_redirects=False) as response:
                if response.status >= 300 and response.status != 404:
                    raise SignallingError(
                        "server", f"DELETE {location}: {response.status} {response.reason}"
                                  f"{await _said(response)}", response.status)
                await response.read()  # to the end, so the connection can carry the POST
            await self._keep_warm(location, session)
            kept = True
        except aiohttp.ConnectionTimeoutError as exc:
            raise SignallingError("unreachable", f"DELETE {location}: no connection within "
                                  f"{timeout.sock_connect:g} s") from exc
        except TimeoutError as exc:
            raise SignallingError("timeout", f"DELETE {location}: no answer within "
                                             f"{timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            raise SignallingError("unreachable", f"DELETE {location}: "
                                                 f"{_describe(exc)}") from exc
        finally:
            if not kept:
                await session.close()


async def _race(attempt: Callable[[], Awaitable[R]], good: Callable[[R], bool],
                within: float) -> R | None:
    """Start `attempt` every PROBE_EVERY_S for `within` s, the tries overlapping (a lost
    SYN is resent by the kernel only after a second); the first result that is `good`,
    or None when every try has ended without one."""
    tries: set[asyncio.Task[R]] = set()
    deadline = time.monotonic() + within
    next_start = time.monotonic()
    try:
        while True:
            now = time.monotonic()
            if now < deadline and now >= next_start:
                tries.add(asyncio.ensure_future(attempt()))
                next_start = now + PROBE_EVERY_S
            if not tries and now >= deadline:
                return None
            pause = max(0.0, min(next_start, deadline) - now) if now < deadline else None
            if not tries:
                await asyncio.sleep(pause or 0.0)
                continue
            done, tries = await asyncio.wait(tries, timeout=pause,
                                             return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                result = task.result()
                if good(result):
                    return result
    finally:
        for task in tries:
            task.cancel()


async def _connects(host: str, port: int) -> str | None:
    """A TCP handshake with host:port: "accepted", "refused", or None (no answer)."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                           PROBE_CONNECT_S)
    except ConnectionRefusedError:
        return "refused"
    except (OSError, TimeoutError):
        return None
    writer.close()
    return "accepted"


async def _said(response: aiohttp.ClientResponse) -> str:
    """': <short sanitised body>' or '' (a body that cannot be read says nothing)."""
    try:
        text = sanitise(await _body(response))
    except (SignallingError, aiohttp.ClientError, TimeoutError):
        return ""
    return f": {text!r}" if text else ""


async def _body(response: aiohttp.ClientResponse) -> str:
    # read(n) returns what has arrived so far: on a lossy link the answer comes in
    # several segments, so read to the end (or past the limit).
    data = b""
    while len(data) <= MAX_ANSWER:
        chunk = await response.content.read(MAX_ANSWER + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > MAX_ANSWER:
        raise SignallingError("malformed", f"{response.url}: answer larger than "
                                           f"{MAX_ANSWER // 1024} KiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignallingError("malformed", f"{response.url}: answer is not UTF-8") from exc
