r"""Signed fleet commands: verify what arrives on ``dashsos/<vehicle_id>/cmd/<name>``.

A remote ``trigger`` turns on the camera and a live call, so every command is authenticated
with a per-vehicle secret key (HMAC-SHA256); stale, replayed and malformed commands are
refused with a reason, never with a crash. This module is pure logic: the MQTT client calls
:meth:`CommandVerifier.verify` for each message and publishes :func:`reply_payload` to
``dashsos/<vehicle_id>/cmd/<name>/reply``.

Wire format
-----------
The payload (at most 4096 bytes) is a UTF-8 JSON object with exactly these keys::

    {"ts": <unix time, number>, "nonce": "<8-64 chars of A-Z a-z 0-9 _ ->",
     "args": {<object, may be empty>}, "sig": "<64 lowercase hex digits>"}

Unknown, missing or duplicated keys are refused, and so are NaN, Infinity and floats that
overflow (``1e400``) anywhere in the payload. ``sig`` is the HMAC-SHA256, keyed with the
vehicle's key, of this UTF-8 string (lines joined by a single ``\n``, no trailing newline)::

    dashsos-cmd-v1
    <vehicle_id>
    <command name>
    <json.dumps(ts)>
    <nonce>
    <json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)>

The vehicle id and command name are signed so that a command can't be replayed to another
car or as another command. ``ts`` is signed as the car re-serializes the parsed value:
``1700000000`` stays ``1700000000`` but ``1.7e9`` becomes ``1700000000.0``, so compute the
signed string from the same value you put in the payload, with ``json.dumps``.

The car accepts a command when ``|car clock - ts| <= max_skew`` (30 s by default) and the
nonce has not been seen; use a fresh random nonce for every command. The car remembers up to
``max_nonces`` nonces; under a flood beyond that it forgets the oldest, and then refuses as
stale any command whose ts is not newer than the ones forgotten.

Worked example: vehicle ``car-0042``, key ``000102...1f`` (the 32 bytes 0..31, hex in the
key file), command ``trigger``, ``ts`` 1700000000, nonce ``a1b2c3d4e5f60718``, args
``{"source": "fleet-console"}``:

>>> import hashlib, hmac, json
>>> key = bytes(range(32))
>>> args = {"source": "fleet-console"}
>>> signed = "\n".join(["dashsos-cmd-v1", "car-0042", "trigger", json.dumps(1700000000),
...                     "a1b2c3d4e5f60718",
...                     json.dumps(args, sort_keys=True, separators=(",", ":"),
...                                ensure_ascii=False)])
>>> signed
'dashsos-cmd-v1\ncar-0042\ntrigger\n1700000000\na1b2c3d4e5f60718\n{"source":"fleet-console"}'
>>> hmac.new(key, signed.encode("utf-8"), hashlib.sha256).hexdigest()
'9fd07d61043026caaf3877dc5b98a4baa1d7237afc95abf7bf99c0a3a35d64f8'

so the message published to ``dashsos/car-0042/cmd/trigger`` is::

    {"ts":1700000000,"nonce":"a1b2c3d4e5f60718","args":{"source":"fleet-console"},
     "sig":"9fd07d61043026caaf3877dc5b98a4baa1d7237afc95abf7bf99c0a3a35d64f8"}

(one line; whitespace and key order in the payload don't matter). :func:`sign` builds it.

The reply, on ``.../cmd/trigger/reply``, is ``{"nonce": "a1b2c3d4e5f60718", "ok": true,
"result": {...}}`` or ``{"nonce": ..., "ok": false, "error": {"code": ..., "message": ...}}``
with ``nonce`` null when the command's nonce could not be read. Error codes: ``too_large``,
``malformed``, ``unknown_command``, ``bad_signature``, ``stale``, ``replayed``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMANDS: tuple[str, ...] = ("trigger", "cancel", "test_call", "status")
MAX_PAYLOAD = 4096
MIN_KEY_BYTES = 32

_DOMAIN = "dashsos-cmd-v1"
_KEYS = frozenset({"ts", "nonce", "args", "sig"})
_NONCE = re.compile(r"[A-Za-z0-9_-]{8,64}")
_SIG = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class CommandRefused(Exception):
    """A command the car will not run; ``code`` is machine-readable, ``message`` is for people.

    ``nonce`` is the command's nonce when it could be read (for the reply), else None.
    """

    def __init__(self, code: str, message: str, *, nonce: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.nonce = nonce


@dataclass(frozen=True)
class Command:
    """A verified command: authentic, fresh and not seen before."""

    name: str
    args: dict[str, Any]
    nonce: str
    ts: float


class CommandVerifier:
    """Verifies the commands for one vehicle. Keeps state (seen nonces): use one per car,
    from one thread or event loop."""

    def __init__(self, vehicle_id: str, key: bytes, max_skew: float = 30.0,
                 clock: Callable[[], float] = time.time, max_nonces: int = 10_000,
                 *, allowed: Iterable[str] = COMMANDS) -> None:
        _check_vehicle_id(vehicle_id)
        _check_key(key)
        if not (math.isfinite(max_skew) and max_skew > 0):
            raise ValueError(f"max_skew must be a positive number of seconds, got {max_skew!r}")
        if max_nonces < 1:
            raise ValueError(f"max_nonces must be at least 1, got {max_nonces!r}")
        accepted = tuple(allowed)
        if unknown := [name for name in accepted if name not in COMMANDS]:
            raise ValueError(f"unknown command(s) in allowed: {unknown}; known: {COMMANDS}")
        self.vehicle_id = vehicle_id
        self.max_skew = float(max_skew)
        self.max_nonces = max_nonces
        self.allowed = accepted
        self._key = key
        self._clock = clock
        # nonce -> ts, plus a heap of (ts, nonce) so the oldest is found cheaply.
        self._seen: dict[str, float] = {}
        self._by_age: list[tuple[float, str]] = []
        # Highest ts of any nonce forgotten so far: commands at or before it are refused as
        # stale, so a forgotten nonce can never be replayed, whatever the clock does.
        self._floor = -math.inf
        self._store: Path | None = None

    def persist_to(self, path: Path) -> None:
        """Remember nonces across restarts: every accepted one is appended to `path` and
        fsynced before the command runs; those still inside the skew window are loaded
        now, so a captured command cannot be replayed after a restart. A storage that
        cannot be written leaves them in memory (and says so in the storage's state)."""
        from dashsos.evidence.diskstate import STATE

        now = self._clock()
        kept: list[str] = []
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        except OSError as exc:
            STATE.failed(exc, f"reading {path}")
            lines = []
        for line in lines:
            parts = line.split()
            try:
                if len(parts) == 2 and parts[0] == "F":
                    self._floor = max(self._floor, float(parts[1]))
                    kept.append(line)
                elif len(parts) == 2 and _NONCE.fullmatch(parts[1]):
                    ts = float(parts[0])
                    if ts >= now - 2 * self.max_skew and parts[1] not in self._seen:
                        self._remember(parts[1], ts)
                        kept.append(line)
            except ValueError:
                continue  # a line a power cut left short
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in kept))
            os.replace(tmp, path)
        except OSError as exc:
            STATE.failed(exc, f"writing {path}")
        self._store = path

    def _persist(self, line: str) -> None:
        if self._store is None:
            return
        from dashsos.evidence.diskstate import STATE

        try:
            fd = os.open(self._store, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # kept in memory: this run still refuses the replay
            STATE.failed(exc, f"storing a command nonce in {self._store}")

    def __repr__(self) -> str:
        # Spelled out so the key can never end up in a log line.
        return (f"CommandVerifier(vehicle_id={self.vehicle_id!r}, max_skew={self.max_skew!r}, "
                f"max_nonces={self.max_nonces!r}, remembered={len(self._seen)})")

    def verify(self, name: str, payload: bytes) -> Command:
        """Return the command if it is authentic, fresh and new; else raise CommandRefused."""
        if len(payload) > MAX_PAYLOAD:
            raise CommandRefused("too_large",
                                 f"payload is {len(payload)} bytes, the limit is {MAX_PAYLOAD}")
        obj = _parse(payload)
        ts, nonce, args, sig = _fields(obj)
        if name not in self.allowed:
            why = "is disabled on this car" if name in COMMANDS else "is not a known command"
            raise CommandRefused("unknown_command", f"{_short(name)} {why}", nonce=nonce)
        try:
            message = _signed_message(self.vehicle_id, name, ts, nonce, args)
        except (ValueError, RecursionError) as e:
            # Lone surrogates can't be encoded; absurd nesting can't be re-serialized.
            raise CommandRefused("malformed", "args can't be canonicalized", nonce=nonce) from e
        expected = hmac.new(self._key, message, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, sig):
            raise CommandRefused("bad_signature",
                                 "signature does not match (wrong key, vehicle or command?)",
                                 nonce=nonce)
        now = self._clock()
        when = float(ts)
        if not abs(now - when) <= self.max_skew:  # written so a NaN clock refuses too
            raise CommandRefused("stale", f"ts is {when - now:+.1f} s from the car's clock, "
                                 f"allowed is ±{self.max_skew:g} s", nonce=nonce)
        if when <= self._floor:
            raise CommandRefused("stale", "ts is older than commands the car no longer "
                                 "remembers; send it again with the current time", nonce=nonce)
        self._forget_expired(now)
        if nonce in self._seen:
            raise CommandRefused("replayed", "this nonce was already used", nonce=nonce)
        self._remember(nonce, when)
        self._persist(f"{when!r} {nonce}")
        return Command(name=name, args=args, nonce=nonce, ts=when)

    def _forget_expired(self, now: float) -> None:
        # A nonce is kept 2*max_skew past its ts; by then a replay is stale anyway.
        while self._by_age and self._by_age[0][0] < now - 2 * self.max_skew:
            self._forget_oldest()

    def _remember(self, nonce: str, ts: float) -> None:
        self._seen[nonce] = ts
        heapq.heappush(self._by_age, (ts, nonce))
        while len(self._seen) > self.max_nonces:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        ts, nonce = heapq.heappop(self._by_age)
        del self._seen[nonce]
        if ts > self._floor:
            self._floor = ts
            self._persist(f"F {ts!r}")


def sign(vehicle_id: str, key: bytes, name: str, args: dict[str, Any] | None = None,
         ts: float | None = None, nonce: str | None = None) -> bytes:
    """Build a complete signed payload (fleet side, tools, tests).

    ``ts`` defaults to now and ``nonce`` to a fresh random one. Raises ValueError for input
    the car would refuse as malformed (bad nonce, non-finite ts, payload over the limit).
    ``name`` is not restricted to :data:`COMMANDS`, so a newer fleet can address any car.
    """
    _check_vehicle_id(vehicle_id)
    _check_key(key)
    if not name or "\n" in name:
        raise ValueError(f"bad command name {name!r}")
    ts = time.time() if ts is None else ts
    nonce = secrets.token_hex(12) if nonce is None else nonce
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not _finite(ts):
        raise ValueError(f"ts must be a finite number, got {ts!r}")
    if not _NONCE.fullmatch(nonce):
        raise ValueError(f"nonce must be 8-64 characters of A-Z a-z 0-9 _ -, got {nonce!r}")
    # Round-trip through JSON so the signature covers exactly what the car will parse
    # (tuples become lists, int keys become strings, duplicates are caught).
    try:
        wire_args = _loads(json.dumps({} if args is None else args, allow_nan=False))
        if not isinstance(wire_args, dict):
            raise ValueError("args must be a JSON object")
        message = _signed_message(vehicle_id, name, ts, nonce, wire_args)
    except RecursionError:
        raise ValueError("args are nested too deeply") from None
    sig = hmac.new(key, message, hashlib.sha256).hexdigest()
    payload = json.dumps({"ts": ts, "nonce": nonce, "args": wire_args, "sig": sig},
                         separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    data = payload.encode("utf-8")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"payload would be {len(data)} bytes, the limit is {MAX_PAYLOAD}")
    return data


def reply_payload(command_nonce: str | None, ok: bool, *, result: dict[str, Any] | None = None,
                  error: CommandRefused | str | None = None) -> bytes:
    """The reply to publish on ``.../cmd/<name>/reply``.

    ``error`` is required when not ok: a CommandRefused keeps its code, a plain string is
    reported with code ``failed``. For a refused command pass ``exc.nonce``.
    """
    body: dict[str, Any] = {"nonce": command_nonce, "ok": ok}
    if ok:
        if error is not None:
            raise ValueError("a successful reply carries no error")
        body["result"] = {} if result is None else result
    else:
        if error is None or result is not None:
            raise ValueError("a failed reply needs an error and carries no result")
        if isinstance(error, CommandRefused):
            body["error"] = {"code": error.code, "message": error.message}
        else:
            body["error"] = {"code": "failed", "message": error}
    # ASCII and no NaN: any MQTT consumer's strict JSON parser can read it.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("ascii")


def load_key(path: Path) -> bytes:
    """Read a command key file: hex or base64 text, or raw bytes; at least 32 bytes of key.

    Whitespace (a trailing newline, base64 line wrapping) is ignored in text files. A binary
    file is used byte for byte, since stripping would change the key.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"command key file {path}: can't read it ({e.strerror or e})") from e
    text = data.strip()
    if text and all(32 <= b < 127 or b in b" \t\r\n" for b in text):
        compact = "".join(text.decode("ascii").split())
        if _HEX.fullmatch(compact):
            key = bytes.fromhex(compact)
        else:
            try:
                # Standard or URL-safe alphabet, padding required.
                key = base64.b64decode(compact.replace("-", "+").replace("_", "/"),
                                       validate=True)
            except (binascii.Error, ValueError):
                # Never echo the content: it may be a key with a typo.
                raise ValueError(f"command key file {path}: text that is neither hex nor "
                                 "base64") from None
    else:
        key = data
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"command key file {path}: key is {len(key)} bytes, "
                         f"at least {MIN_KEY_BYTES} are needed")
    return key


def _check_vehicle_id(vehicle_id: str) -> None:
    # It is a topic level and a line of the signed string.
    if not vehicle_id or any(c in "/+#" or not c.isprintable() for c in vehicle_id):
        raise ValueError(f"vehicle id must be non-empty, printable, without / + #; "
                         f"got {vehicle_id!r}")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"command key must be at least {MIN_KEY_BYTES} bytes")


def _parse(payload: bytes) -> dict[str, Any]:
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CommandRefused("malformed", "payload is not UTF-8") from None
    try:
        obj = _loads(text)
    except ValueError as e:
        raise CommandRefused("malformed", f"payload is not valid JSON ({_short(e)})") from None
    except RecursionError:
        raise CommandRefused("malformed", "payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise CommandRefused("malformed", "payload must be a JSON object")
    return obj


def _fields(obj: dict[str, Any]) -> tuple[int | float, str, dict[str, Any], str]:
    nonce = obj.get("nonce")
    # Only a well-formed nonce is echoed in the reply.
    readable = nonce if isinstance(nonce, str) and _NONCE.fullmatch(nonce) else None

    def refuse(message: str) -> CommandRefused:
        return CommandRefused("malformed", message, nonce=readable)

    if extra := obj.keys() - _KEYS:
        raise refuse(f"unknown key(s): {_short(sorted(extra))}")
    if missing := _KEYS - obj.keys():
        raise refuse(f"missing key(s): {sorted(missing)}")
    ts, args, sig = obj["ts"], obj["args"], obj["sig"]
    if isinstance(ts, bool) or not isinstance(ts, int | float):
        raise refuse("ts must be a number (unix time)")
    if not _finite(ts):
        raise refuse("ts must be a finite number")
    if readable is None:
        raise refuse("nonce must be a string of 8-64 characters A-Z a-z 0-9 _ -")
    if not isinstance(args, dict):
        raise refuse("args must be a JSON object")
    if not (isinstance(sig, str) and _SIG.fullmatch(sig)):
        raise refuse("sig must be 64 lowercase hex digits")
    return ts, readable, args, sig


def _finite(ts: int | float) -> bool:
    try:
        return math.isfinite(ts)
    except OverflowError:  # an int beyond float range
        return False


def _signed_message(vehicle_id: str, name: str, ts: int | float, nonce: str,
                    args: dict[str, Any]) -> bytes:
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "\n".join([_DOMAIN, vehicle_id, name, json.dumps(ts), nonce, canonical]).encode(
        "utf-8")


def _loads(text: str) -> Any:
    """Strict JSON: no NaN/Infinity, no float overflow, no duplicate keys."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                      object_pairs_hook=_unique_keys)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("number out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _short(value: object, limit: int = 80) -> str:
    # Refusal messages are published; don't echo a whole hostile payload back.
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
