"""Bearer tokens for cars and operators, read from files of '<token> <name>' lines.

The files are read again when they change, so a car or an operator can be added or
revoked without restarting the desk (and without dropping the calls in progress).
"""

from __future__ import annotations

import hmac
import logging
import os
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)



class TokenFile:
    """Who a token belongs to, per a file of '<token> <name>' lines ('#' comments)."""

    def __init__(self, path: str, what: str) -> None:
        self.path = Path(path) if path else None
        self.what = what
        self._stamp: tuple[int, int] | None = None
        self._names: dict[str, str] = {}

    def lookup(self, token: str) -> str | None:
        """The name of whoever holds `token`, or None."""
        if not token:
            return None
        found = None
        # Compare against every token in constant time: no early exit tells a prober
        # how much of a guess was right.
        for known, name in self._tokens().items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = name
        return found

    def _tokens(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            st = os.stat(self.path)
        except OSError as exc:
            log.error("%s tokens: cannot read %s: %s", self.what, self.path, exc)
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._names = self._parse(self.path.read_text(encoding="utf-8"))
            self._stamp = stamp
            log.info("%s tokens: %d loaded from %s", self.what, len(self._names), self.path)
        return self._names

    def _parse(self, text: str) -> dict[str, str]:
        names: dict[str, str] = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            token, _, name = line.partition(" ")
            if not name.strip():
                log.warning("%s:%d: expected '<token> <name>', line ignored", self.path, number)
                continue
            names[token] = name.strip()
        return names


def bearer(request: web.Request) -> str:
    """The token of an `Authorization: Bearer` header, or ''."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def unauthorized(text: str) -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(text=text + "\n", headers={"WWW-Authenticate": "Bearer"})
