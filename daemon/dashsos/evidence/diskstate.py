"""Storage failure is a state, not an exception: a full, read-only or failing disk is
noted here (`ok`, `full`, `read-only`, `error`) by whoever touched it, logged once per
change and shown in status and on MQTT. The incident goes on (call, messages); its
evidence ends in `evidence_failed` with the reason when it cannot be written."""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_STATES = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EROFS: "read-only",
           errno.EACCES: "read-only", errno.EPERM: "read-only"}


def classify(exc: BaseException) -> str:
    """`full`, `read-only` or `error` for an exception raised by disk work."""
    if isinstance(exc, OSError) and exc.errno in _STATES:
        return _STATES[exc.errno]
    if isinstance(exc, sqlite3.Error):
        text = str(exc).lower()
        if "full" in text:
            return "full"
        if "readonly" in text or "read-only" in text:
            return "read-only"
    return "error"


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}" + (
            f" ({exc.filename})" if exc.filename else "")
    return f"{type(exc).__name__}: {exc}"


class StorageState:
    """The storage's condition, set by whoever touches the disk (any thread)."""

    def __init__(self) -> None:
        self.state = "ok"
        self.detail = ""
        self.since_ns = 0
        self._lock = threading.Lock()

    def failed(self, exc: BaseException, what: str) -> str:
        """Note a failure; the reason to report (`storage full: ENOSPC ...`)."""
        state, detail = classify(exc), f"{what}: {describe(exc)}"
        with self._lock:
            if state == "error" and self.state in ("full", "read-only"):
                state = self.state  # an unclear error during a known fault is that fault
            changed = state != self.state
            self.state, self.detail = state, detail
        if changed:
            log.error("storage %s: %s", state, detail)
        return f"storage {state}: {detail}"

    def worked(self, what: str) -> None:
        """A write went through: the storage is usable again."""
        if self.state == "ok":
            return
        with self._lock:
            changed, self.state, self.detail = self.state != "ok", "ok", ""
        if changed:
            log.warning("storage ok again (%s)", what)

    def probe(self, directory: Path) -> None:
        """While failed: does a small durable write work again? (Off the event loop.)"""
        if self.state == "ok":
            return
        probe = directory / ".storage-probe"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, b"x" * 4096)
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as exc:
            self.failed(exc, f"probing {directory}")
            return
        self.worked(f"probed {directory}")

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "detail": self.detail}


STATE = StorageState()
