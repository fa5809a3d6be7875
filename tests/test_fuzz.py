"""Fuzzing what reaches the car from outside: config files, fleet commands over MQTT, the
dispatcher's signalling answers, and NMEA through gpsd. No crash; every refusal is a clear,
typed error.

Counts go to artifacts/fuzz-summary.json (and are printed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import hmac
import json
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nmea
from conftest import REPO, free_port, toml, wait_for
from dashsos import config as dashsos_config
from dashsos.call.ice import confine_host_addresses
from dashsos.call.session import CallSession
from dashsos.call.signalling import MAX_ANSWER, SignallingError, WhipClient
from dashsos.call.tracks import MicrophoneTrack, PassthroughVideoTrack
from dashsos.config import SECTIONS, Config, ConfigError
from dashsos.fleet.commands import (
    COMMANDS,
    MAX_PAYLOAD,
    Command,
    CommandRefused,
    CommandVerifier,
)
from dashsos.triggers import control_socket

SUMMARY = REPO / "artifacts" / "fuzz-summary.json"
FUZZ = settings(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])


def write_summary(section: str, data: dict[str, Any]) -> None:
    SUMMARY.parent.mkdir(exist_ok=True)
    try:
        summary = json.loads(SUMMARY.read_text())
    except (OSError, ValueError):
        summary = {}
    summary[section] = data
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfuzz summary [{section}]: {json.dumps(data)}")


# --- 1. config files ---


FIELDS = {name: {f.name: f for f in dataclasses.fields(cls)}
          for name, cls in SECTIONS.items()}
# Text that TOML can carry. Excluded, each pinned by an xfail test below: NUL (a path with
# one crashes the file checks) and line breaks in key names (they split the error lines).
SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
                    max_size=12)
KEY_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                   max_size=10)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") \
            if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(value)


def document(tables: list[tuple[list[str], dict[str, Any]]]) -> str:
    """TOML text: one [a.b.c] header per table (repeated headers make it invalid, also
    worth trying)."""
    lines = []
    for path, values in tables:
        if path:
            lines.append("[" + ".".join(toml_key(p) for p in path) + "]")
        lines += [f"{toml_key(k)} = {toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


scalars = (st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | SAFE_TEXT
           | st.datetimes(timezones=st.just(UTC)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEY_TEXT, inner, max_size=3), max_leaves=8)


@st.composite
def plausible_value(draw: st.DrawFn, section: str, key: str) -> Any:
    """Mostly the right type, often in range: valid configs come out too."""
    f = FIELDS[section][key]
    meta = f.metadata
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    if draw(st.integers(0, 5)) == 0:
        return draw(values)
    if meta["choices"]:
        choice = st.sampled_from(meta["choices"])
        return draw(st.lists(choice, max_size=3)) if isinstance(default, tuple) \
            else draw(choice)
    low = meta["minimum"] if meta["minimum"] is not None else -1e6
    high = meta["maximum"] if meta["maximum"] is not None else 1e9
    if isinstance(default, bool):
        return draw(st.booleans())
    if isinstance(default, int):
        return draw(st.integers(int(low) - 2, int(high) + 2))
    if isinstance(default, float):
        return draw(st.floats(low - 1, high + 1) | st.sampled_from([math.nan, math.inf]))
    if isinstance(default, tuple):
        return draw(st.lists(SAFE_TEXT, max_size=3))
    if isinstance(default, dict):
        return draw(st.dictionaries(KEY_TEXT, SAFE_TEXT, max_size=3))
    return draw(SAFE_TEXT)


@st.composite
def config_documents(draw: st.DrawFn) -> bytes:
    tables: list[tuple[list[str], dict[str, Any]]] = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.integers(0, 9))
        if kind <= 6:  # a known section with known (and a few unknown) keys
            section = draw(st.sampled_from(sorted(FIELDS)))
            keys = draw(st.lists(st.sampled_from(sorted(FIELDS[section])), max_size=4,
                                 unique=True))
            table = {k: draw(plausible_value(section, k)) for k in keys}
            if draw(st.integers(0, 7)) == 0:
                table[draw(KEY_TEXT)] = draw(values)
            tables.append(([section], table))
        elif kind == 7:  # an unknown section
            tables.append(([draw(KEY_TEXT)], draw(st.dictionaries(KEY_TEXT, values,
                                                                  max_size=3))))
        elif kind == 8:  # a deep table under a known or unknown name
            head = draw(st.sampled_from(sorted(FIELDS)) | KEY_TEXT)
            depth = draw(st.integers(1, 60))
            tables.append(([head, *["t"] * depth], draw(st.dictionaries(KEY_TEXT, values,
                                                                       max_size=2))))
        else:  # top-level keys
            tables.insert(0, ([], draw(st.dictionaries(KEY_TEXT, values, max_size=2))))
    text = document(tables).encode()
    damage = draw(st.integers(0, 9))
    if damage == 0 and text:  # a byte changed, inserted or cut
        i = draw(st.integers(0, len(text) - 1))
        text = text[:i] + draw(st.binary(max_size=4)) + text[i + draw(st.integers(0, 3)):]
    elif damage == 1:
        text = draw(st.binary(max_size=200))
    elif damage == 2:
        text = draw(st.text(max_size=200)).encode("utf-8", "surrogatepass")
    return text


def check_config(path: Path) -> str:
    """Either a Config or a ConfigError whose every line names the file."""
    try:
        loaded = dashsos_config.load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message
        for line in message.split("\n"):
            assert line.startswith(f"{path}: "), message
        return "error"
    assert isinstance(loaded, Config)
    return "ok"


def test_generated_config_files_load_or_give_clear_errors(tmp_path: Path) -> None:
    path = tmp_path / "dashsos.toml"
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=500)
    @given(text=config_documents())
    def run(text: bytes) -> None:
        path.write_bytes(text)
        outcomes[check_config(path)] += 1

    started = time.monotonic()
    run()
    write_summary("config_in_process", {**outcomes,
                                        "seconds": round(time.monotonic() - started, 1)})
    assert outcomes["ok"] >= 10 and outcomes["error"] >= 100, outcomes


def test_generated_config_files_through_the_cli(tmp_path: Path) -> None:
    """`dashsos check-config` on 20 of them: exit 0 with the effective config, or exit 2
    with the errors; never a traceback."""
    path = tmp_path / "dashsos.toml"
    outcomes: Counter[int] = Counter()

    @settings(FUZZ, max_examples=20)
    @given(text=config_documents())
    def run(text: bytes) -> None:
        path.write_bytes(text)
        expected = check_config(path)
        result = subprocess.run(
            [sys.executable, "-m", "dashsos", "--config", str(path), "check-config"],
            capture_output=True, text=True, timeout=60)
        outcomes[result.returncode] += 1
        assert "Traceback" not in result.stderr, result.stderr
        if expected == "ok":
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith(f"# effective config from {path}")
        else:
            assert result.returncode == 2, (result.returncode, result.stderr)
            lines = result.stderr.rstrip("\n").split("\n")
            assert lines[0] == "dashsos: config error:"
            assert lines[1:] and all(line.startswith(f"{path}: ") for line in lines[1:])

    run()
    write_summary("config_cli", {str(k): v for k, v in outcomes.items()})


def _float_keys() -> list[str]:
    return [f"{s}.{k}" for s, fields in FIELDS.items() for k, f in fields.items()
            if isinstance(f.default, float)]


def test_nan_is_refused_for_every_float_key(tmp_path: Path) -> None:
    path = tmp_path / "nan.toml"
    accepted = []
    for key in _float_keys():
        section, name = key.split(".")
        path.write_text(f"[{section}]\n{name} = nan\n")
        try:
            dashsos_config.load(path)
            accepted.append(key)
        except ConfigError:
            pass
    assert not accepted, f"nan accepted for {accepted}"


def test_nul_in_a_file_name_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nul.toml"

    @settings(FUZZ, max_examples=20)
    @given(key=st.sampled_from(["call.ca_file", "ice.turn_password_file",
                                "upload.token_file"]), before=SAFE_TEXT, after=SAFE_TEXT)
    def run(key: str, before: str, after: str) -> None:
        section, name = key.split(".")
        path.write_text(f"[{section}]\n{name} = {toml_string(before + chr(0) + after)}\n")
        check_config(path)

    run()


def test_line_break_in_a_key_name_keeps_errors_one_per_line(tmp_path: Path) -> None:
    path = tmp_path / "key.toml"

    @settings(FUZZ, max_examples=20)
    @given(section=st.sampled_from(["vehicle", "mqtt", "nosuchsection"]),
           before=st.text("abc", max_size=3), after=st.text("xyz: ", min_size=1, max_size=8),
           brk=st.sampled_from(["\n", "\r\n"]))
    def run(section: str, before: str, after: str, brk: str) -> None:
        path.write_text(f"[{section}]\n{toml_string(before + brk + after)} = 1\n")
        check_config(path)

    run()


@pytest.mark.parametrize("text", [
    "[vehicle]\nvin = " + "[" * 600 + "]" * 600 + "\n",
    "[vehicle]\nvin = " + "{a = " * 600 + "1" + "}" * 600 + "\n",
    "[vehicle.vin" + ".a" * 3000 + "]\nx = 1\n",
], ids=["array", "inline-table", "table-headers"])
def test_deep_nesting_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "deep.toml"
    path.write_text(text)
    check_config(path)


# --- 2. MQTT command payloads ---


VEHICLE = "car-0042"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
SKEW = 30.0
CODES = {"too_large", "malformed", "unknown_command", "bad_signature", "stale", "replayed"}
NONCE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
TEXT = 'aZ0 _-"\\/\n\t\x00\x7f\u00e9\u2028\ufeff\U0001f600'
ODD: list[Any] = [None, True, 0, -0.0, 1e308, 10**400, "", "x" * 65, "bad nonce!", [], {},
                  [NOW], str(NOW), {"a": [1, None]}, NOW, "0" * 64, "A" * 64]
PAYLOADS_PER_EXAMPLE = 8
COMMAND_EXAMPLES = 1250  # x 8 = 10,000 payloads


def spec_sign(name: str, ts: Any, nonce: str, args: Any, *, key: bytes = KEY,
              vehicle: str = VEHICLE) -> str:
    """The signature as the wire format in commands.py's docstring defines it."""
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    text = "\n".join(["dashsos-cmd-v1", vehicle, name, json.dumps(ts), nonce, canonical])
    return hmac.new(key, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def reference_accepts(name: str, payload: bytes, seen: set[str]) -> bool:
    """The docstring's rules, with the standard library only."""
    if len(payload) > MAX_PAYLOAD or name not in COMMANDS:
        return False

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        if len({k for k, _ in items}) != len(items):
            raise ValueError("duplicate")
        return dict(items)

    def constant(_: str) -> Any:
        raise ValueError("constant")

    def finite(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ValueError("overflow")
        return value

    try:
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=pairs,
                         parse_constant=constant, parse_float=finite)
        if not isinstance(obj, dict) or set(obj) != {"ts", "nonce", "args", "sig"}:
            return False
        ts, nonce, args, sig = obj["ts"], obj["nonce"], obj["args"], obj["sig"]
        if type(ts) not in (int, float) or not math.isfinite(ts):
            return False
        if not (isinstance(nonce, str) and re.fullmatch(r"[A-Za-z0-9_-]{8,64}", nonce)):
            return False
        if not isinstance(args, dict) or not isinstance(sig, str):
            return False
        canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        text = "\n".join(["dashsos-cmd-v1", VEHICLE, name, json.dumps(ts), nonce, canonical])
        expected = hmac.new(KEY, text.encode("utf-8"), hashlib.sha256).hexdigest()
    except (ValueError, RecursionError, OverflowError):
        return False
    return sig == expected and abs(NOW - ts) <= SKEW and nonce not in seen


def random_json(rnd: random.Random, depth: int) -> Any:
    kind = rnd.randrange(7 if depth else 5)
    if kind == 0:
        return rnd.choice([None, True, False])
    if kind == 1:
        return rnd.randint(-(2**70), 2**70)
    if kind == 2:
        return rnd.uniform(-1e300, 1e300)
    if kind in (3, 4):
        return "".join(rnd.choices(TEXT, k=rnd.randrange(6)))
    if kind == 5:
        return [random_json(rnd, depth - 1) for _ in range(rnd.randrange(4))]
    return {"".join(rnd.choices(TEXT, k=rnd.randrange(4))): random_json(rnd, depth - 1)
            for _ in range(rnd.randrange(4))}


def signed(rnd: random.Random, name: str, ts: Any) -> tuple[bytes, dict[str, Any]]:
    args = random_json(rnd, 3)
    args = args if isinstance(args, dict) else {"value": args}
    nonce = "".join(rnd.choices(NONCE_CHARS, k=rnd.randint(8, 64)))
    obj = {"ts": ts, "nonce": nonce, "args": args, "sig": spec_sign(name, ts, nonce, args)}
    return json.dumps(obj, ensure_ascii=rnd.random() < 0.5).encode(), obj


def damaged(rnd: random.Random, payload: bytes, obj: dict[str, Any],
            name: str) -> tuple[str, bytes]:
    """One hostile variant of a signed payload, and the command name it is sent as."""
    i = rnd.randrange(len(payload))
    choice = rnd.randrange(16)
    if choice == 0:
        return name, payload[:i] + bytes([payload[i] ^ rnd.randrange(1, 256)]) + payload[i + 1:]
    if choice == 1:
        return name, payload[:i] + rnd.randbytes(rnd.randrange(1, 9)) + payload[i:]
    if choice == 2:
        return name, payload[:i]
    if choice == 3:
        field = dict(obj)
        field[rnd.choice(["ts", "nonce", "args", "sig", "extra"])] = rnd.choice(ODD)
        return name, json.dumps(field).encode()
    if choice == 4:
        return rnd.choice(["reboot", "", "TRIGGER", "trigger\n", "trigger/reply",
                           *COMMANDS]), payload
    if choice == 5:  # another car's key, or another car
        other = dict(obj, sig=spec_sign(name, obj["ts"], obj["nonce"], obj["args"],
                                        key=OTHER_KEY))
        if rnd.random() < 0.5:
            other["sig"] = spec_sign(name, obj["ts"], obj["nonce"], obj["args"],
                                     vehicle="car-0043")
        return name, json.dumps(other).encode()
    if choice == 6:  # stale or from the future, correctly signed
        ts = NOW + rnd.choice([-1, 1]) * rnd.uniform(SKEW + 0.001, 1e6)
        stale = dict(obj, ts=ts, sig=spec_sign(name, ts, obj["nonce"], obj["args"]))
        return name, json.dumps(stale).encode()
    if choice == 7:
        return name, payload.replace(b'"ts": ', rnd.choice(
            [b'"ts": NaN, "x": ', b'"ts": Infinity, "x": ', b'"ts": 1e400, "x": ']), 1)
    if choice == 8:  # a key twice
        text = payload.decode()
        return name, (text[:-1] + f', "nonce": "{obj["nonce"]}"}}').encode()
    if choice == 9:
        depth = rnd.choice([50, 900, 3000])
        return name, json.dumps({**{k: v for k, v in obj.items() if k != "args"}})[:-1] \
            .encode() + b', "args": ' + b'{"a": ' * depth + b"1" + b"}" * depth + b"}"
    if choice == 10:
        return name, payload + b" " * (MAX_PAYLOAD + 1 - len(payload)) + rnd.randbytes(4)
    if choice == 11:
        return name, payload[:i] + b"\xff\xfe" + payload[i:]
    if choice == 12:
        return name, rnd.randbytes(rnd.randrange(64))
    if choice == 13:
        return name, json.dumps(rnd.choice([[obj], obj["args"], obj["sig"], None])).encode()
    if choice == 14:  # a lone surrogate in args, escaped in the JSON
        return name, payload.replace(b'"args": {', b'"args": {"s": "\\ud800", ', 1)
    return name, json.dumps(dict(obj, sig=obj["sig"].upper())).encode()


def test_10000_command_payloads(tmp_path: Path) -> None:
    """CommandVerifier.verify on 10,000 payloads: signed ones, replays and every kind of
    damage. A Command exactly when the docstring's rules (recomputed here with hmac and
    json) accept it, else CommandRefused with a known code and a message."""
    outcomes: Counter[str] = Counter()

    @settings(FUZZ, max_examples=COMMAND_EXAMPLES)
    @given(seed=st.integers(0, 2**64 - 1), name=st.sampled_from(COMMANDS),
           ts=st.floats(-2 * SKEW, 2 * SKEW).map(lambda d: NOW + d)
           | st.integers(-100, 100).map(lambda d: int(NOW) + d))
    def run(seed: int, name: str, ts: float) -> None:
        rnd = random.Random(seed)
        verifier = CommandVerifier(VEHICLE, KEY, max_skew=SKEW, clock=lambda: NOW)
        seen: set[str] = set()
        payload, obj = signed(rnd, name, ts)
        batch = [(name, payload), (name, payload)]  # the second is a replay
        batch += [damaged(rnd, payload, obj, name) for _ in range(PAYLOADS_PER_EXAMPLE - 2)]
        for command, data in batch:
            accept = reference_accepts(command, data, seen)
            try:
                result = verifier.verify(command, data)
            except CommandRefused as refused:
                assert not accept, f"refused a valid command {command!r} {data!r}: {refused}"
                assert refused.code in CODES and refused.message
                outcomes[refused.code] += 1
                continue
            assert accept, f"accepted {command!r} {data!r}"
            assert isinstance(result, Command) and result.name == command
            seen.add(result.nonce)
            outcomes["accepted"] += 1

    started = time.monotonic()
    run()
    seconds = time.monotonic() - started
    total = sum(outcomes.values())
    write_summary("mqtt_commands", {"payloads": total, **outcomes,
                                    "seconds": round(seconds, 1)})
    assert total == COMMAND_EXAMPLES * PAYLOADS_PER_EXAMPLE
    assert outcomes["accepted"] >= COMMAND_EXAMPLES // 3 and outcomes["replayed"] > 0
    assert set(outcomes) - {"accepted"} == CODES, outcomes


# --- 3. the dispatcher's answers to the car's offer ---


CLIENT_TIMEOUT = 0.5
SLOW = CLIENT_TIMEOUT + 0.3
KINDS = {"unreachable", "timeout", "unauthorized", "rejected", "server", "malformed"}


@dataclass(frozen=True)
class Reply:
    """How the fake dispatcher answers one POST."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    delivery: str  # normal, slow-head, slow-body, truncated, close-delimited, reset, garbage


class SignallingLab:
    """A raw HTTP server on 127.0.0.1 whose answer the test sets, and the car's side of the
    call, on one event loop in a thread. Raw, so the answer can be anything: any status,
    a Content-Length that lies, a connection closed mid-body."""

    def __init__(self) -> None:
        confine_host_addresses(("127.0.0.1",))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/whip"
        self.reply = Reply(201, (), b"", "normal")
        self.posts = 0
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: asyncio.AbstractServer = self.run(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.client = WhipClient("car-token", timeout=CLIENT_TIMEOUT, ssl_context=False)
        self.answer: str = self.run(self._real_answer())

    def run(self, coro: Any, timeout: float = 30) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def session(self) -> CallSession:
        return CallSession(self.url, self.client, RTCConfiguration(iceServers=[]),
                           mode="call", video=PassthroughVideoTrack(lambda: None),
                           audio=MicrophoneTrack(), speaker=None,
                           on_message=lambda message: None, request_keyframe=lambda: None)

    async def _real_answer(self) -> str:
        """What aiortc answers to the car's offer: the base of the mutations."""
        car = self.session()
        pc = car._pc
        pc.addTransceiver("audio", direction="sendrecv")
        pc.addTransceiver("video", direction="sendonly")
        pc.createDataChannel("telemetry")
        await pc.setLocalDescription(await pc.createOffer())
        desk = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        await desk.setRemoteDescription(RTCSessionDescription(pc.localDescription.sdp, "offer"))
        await desk.setLocalDescription(await desk.createAnswer())
        answer: str = desk.localDescription.sdp
        await desk.close()
        await pc.close()
        return answer

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        reply = self.reply
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length:\s*(\d+)", head)
            await reader.readexactly(int(length[1]) if length else 0)
            self.posts += 1
            if reply.delivery == "reset":
                return
            if reply.delivery == "garbage":
                writer.write(reply.body)
                return
            if reply.delivery == "slow-head":
                await asyncio.sleep(SLOW)
            declared = len(reply.body) + (1000 if reply.delivery == "truncated" else 0)
            lines = [f"HTTP/1.1 {reply.status} Whatever".encode()]
            lines += [f"{k}: {v}".encode("latin-1") for k, v in reply.headers]
            if reply.delivery != "close-delimited":
                lines.append(f"Content-Length: {declared}".encode())
            lines.append(b"Connection: close")
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n")
            if reply.delivery == "slow-body":
                await writer.drain()
                await asyncio.sleep(SLOW)
            writer.write(reply.body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        self.server.close()
        self.run(asyncio.sleep(0.2))  # the last peers' tasks end
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        gc.collect()  # now, not inside pytest's ast.parse of a later traceback


@pytest.fixture(scope="module")
def lab() -> Iterator[SignallingLab]:
    lab = SignallingLab()
    yield lab
    lab.stop()


def keep_candidates_local(line: str) -> str:
    """ICE checks of a mutated answer must still go to 127.0.0.1 only."""
    if not line.startswith("a=candidate"):
        return line
    parts = line.split(" ")
    if len(parts) > 4:
        parts[4] = "127.0.0.1"
    return " ".join(parts)


SDP_NOISE = st.sampled_from([
    "", "v=1", "m=", "m=audio", "m=audio x UDP/TLS/RTP/SAVPF 111", "m=video 9 FOO 96",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "a=rtpmap:111", "a=rtpmap:abc x/y",
    "a=rtpmap:999999999999 opus/48000/2", "a=fmtp:96 profile-level-id=zz",
    "a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:sha-256 ZZ", "a=fingerprint:md5 00",
    "a=setup:sideways", "a=setup:active", "a=mid:", "a=mid:7", "a=group:BUNDLE 9 8",
    "a=sctp-port:notaport", "a=max-message-size:-1", "a=ssrc:x cname:y", "a=rtcp-fb:*",
    "a=candidate:1 1 udp 1 127.0.0.1 1 typ host", "a=candidate:x", "a=candidate:1 1 udp",
    "a=extmap:99999 urn:x", "a=msid:", "c=IN IP4", "o=- x x IN IP4", "t=", "\x00", "\ufeff",
    "a=" + "x" * 5000,
])


@st.composite
def mutated_sdp(draw: st.DrawFn, base: str) -> str:
    lines = base.split("\r\n")
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.integers(0, 6))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        if op == 0 and lines:
            del lines[i]
        elif op == 1:
            lines.insert(i, draw(SDP_NOISE | st.text(max_size=30)))
        elif op == 2 and lines:
            lines.insert(i, lines[i])
        elif op == 3 and lines:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 4 and lines and ":" in lines[i]:
            head = lines[i].split(":", 1)[0]
            lines[i] = f"{head}:{draw(SDP_NOISE | st.text(max_size=20))}"
        elif op == 5 and lines and " " in lines[i]:
            words = lines[i].split(" ")
            k = draw(st.integers(0, len(words) - 1))
            words[k] = draw(st.sampled_from(["", "-1", "0", "99999999999", "x", "\u00e9"])
                            | st.text(max_size=6))
            lines[i] = " ".join(words)
        elif op == 6:
            text = "\r\n".join(lines)
            lines = text[:draw(st.integers(0, len(text)))].split("\r\n")
    separator = draw(st.sampled_from(["\r\n", "\r\n", "\n"]))
    return separator.join(keep_candidates_local(line) for line in lines)


LOCATION_SAFE = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                      exclude_characters="/:[]\\%"), max_size=12)


@st.composite
def replies(draw: st.DrawFn, base: str, port: int) -> Reply:
    if draw(st.booleans()):  # a proper 201: the answer itself is what is wrong
        body = draw(st.sampled_from(["mutated"] * 4 + ["real"]))
        return Reply(201, (("Content-Type", "application/sdp"), ("Location", "/whip/s1")),
                     (draw(mutated_sdp(base)) if body == "mutated" else base).encode(
                         "utf-8", "surrogatepass"), "normal")
    status = draw(st.sampled_from([201] * 12 + [200, 202, 204, 301, 302, 303, 307, 308, 400,
                                                401, 403, 404, 415, 422, 429, 500, 502, 503,
                                                599, 999]))
    content_type = draw(st.sampled_from(
        ["application/sdp"] * 6 + ["application/sdp; charset=utf-8", "APPLICATION/SDP",
                                   "text/html", "application/json", "", "application/sdp\x7f",
                                   "application/\u00e9", None]))
    location = draw(st.sampled_from(
        ["/whip/s1"] * 4 + [None, "", "   ", "s1", "?x=1", "#f", "ftp://127.0.0.1/x",
                            f"http://127.0.0.1:{port}/whip/s2", "http://127.0.0.1:1/x",
                            "http://127.0.0.1:99999/x", "http://127.0.0.1:abc/x",
                            "/" + "x" * 3000, "/whip/\u00e9\u00ff"])
        | LOCATION_SAFE.map(lambda s: "/whip/" + s))
    body_kind = draw(st.sampled_from(["mutated"] * 5 + ["real", "real", "bytes", "huge",
                                                        "empty", "text", "latin1"]))
    body = {
        "mutated": lambda: draw(mutated_sdp(base)).encode("utf-8", "surrogatepass"),
        "real": lambda: base.encode(),
        "bytes": lambda: draw(st.binary(max_size=2000)),
        "huge": lambda: base.encode() + b"a=x:" + b"y" * draw(st.integers(MAX_ANSWER,
                                                                          4 * MAX_ANSWER)),
        "empty": lambda: b"",
        "text": lambda: draw(st.text(max_size=300)).encode("utf-8", "surrogatepass"),
        "latin1": lambda: base.replace("s=-", "s=\u00e9").encode("latin-1"),
    }[body_kind]()
    delivery = draw(st.sampled_from(["normal"] * 4 + ["slow-head", "slow-body", "truncated",
                                                      "close-delimited", "reset", "garbage"]))
    headers = []
    if content_type is not None:
        headers.append(("Content-Type", content_type))
    if location is not None:
        headers.append(("Location", location))
    if delivery == "garbage":
        body = draw(st.sampled_from([b"HTTP/1.1 abc\r\n\r\n", b"\x00\x01\x02",
                                     b"HTTP/9.9 201\r\nContent-Length: x\r\n\r\n",
                                     b"HTTP/1.1 201 Created\r\nLocation\r\n\r\nv=0"]))
    return Reply(status, tuple(headers), body, delivery)


async def call_once(lab: SignallingLab) -> str:
    """CallSession.connect as the Dialer calls it: WhipClient.offer, then
    setRemoteDescription with ValueError/KeyError/IndexError mapped to SignallingError; ICE
    given 0.1 s (nobody is there). Returns how it ended."""
    session = lab.session()
    try:
        await session.connect(0.1)
        return "connected"
    except SignallingError as exc:
        assert str(exc).strip() and exc.kind in KINDS, (exc.kind, str(exc))
        if "unusable SDP answer" in str(exc):
            return "answer refused by aiortc"
        if "no media path" in str(exc):
            return "answer accepted, ICE timed out"
        return exc.kind
    finally:
        await session.close("fuzz", hang_up=False)


SIGNALLING_EXAMPLES = 300


def test_signalling_answers(lab: SignallingLab) -> None:
    """300 answers to the car's offer: statuses, headers, mutated/huge/empty/binary bodies,
    slow, truncated and reset responses. Always an Answer (then SDP accepted or refused by
    aiortc with a clear SignallingError), or a SignallingError with a message; nothing
    else, and no hang beyond the client's timeout."""
    outcomes: Counter[str] = Counter()
    slowest = 0.0

    @settings(FUZZ, max_examples=SIGNALLING_EXAMPLES)
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        nonlocal slowest
        lab.reply = data.draw(replies(lab.answer, lab.port))
        started = time.monotonic()
        outcome = lab.run(call_once(lab), timeout=10)
        slowest = max(slowest, time.monotonic() - started)
        outcomes[outcome] += 1

    started = time.monotonic()
    run()
    write_summary("signalling", {"answers": sum(outcomes.values()), **outcomes,
                                 "slowest_attempt_s": round(slowest, 2),
                                 "seconds": round(time.monotonic() - started, 1)})
    assert outcomes["answer accepted, ICE timed out"] > 0
    assert outcomes["answer refused by aiortc"] > 0 and outcomes["malformed"] > 0
    assert outcomes["timeout"] > 0  # the slow answers
    assert slowest < 4 * CLIENT_TIMEOUT + 2, slowest


@pytest.mark.parametrize("status", [201, 307])
@pytest.mark.parametrize("location", ["http://[", "http://[::1", "//[x"])
def test_unparsable_location_is_a_signalling_error(lab: SignallingLab, status: int,
                                                   location: str) -> None:
    lab.reply = Reply(status, (("Content-Type", "application/sdp"), ("Location", location)),
                      lab.answer.encode(), "normal")
    assert lab.run(call_once(lab), timeout=10) != "connected"


def answer_without_setup(sdp: str) -> str:
    return "\r\n".join(line for line in sdp.split("\r\n") if not line.startswith("a=setup:"))


def answer_with_unknown_codecs(sdp: str) -> str:
    return re.sub(r"a=rtpmap:(\d+) [^/\r\n]+/", r"a=rtpmap:\1 nosuchcodec/", sdp)


def answer_with_fmtp_for_unknown_payload(sdp: str) -> str:
    return sdp.replace("a=mid:0\r\n", "a=mid:0\r\na=fmtp:77 x=1\r\n", 1)


def answer_with_bad_m_line(sdp: str) -> str:
    return re.sub(r"m=audio \d+ ", "m=audio x ", sdp, count=1)


BAD_ANSWERS = {
    "no a=setup (AttributeError)": answer_without_setup,
    "no common codec (OperationError)": answer_with_unknown_codecs,
    "a=fmtp for an unknown payload type (StopIteration)": answer_with_fmtp_for_unknown_payload,
    "m= line with a non-numeric port (AssertionError)": answer_with_bad_m_line,
}
@pytest.mark.parametrize("mutation", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
def test_aiortc_errors_on_a_bad_answer_are_signalling_errors(lab: SignallingLab,
                                                              mutation: Any) -> None:
    """Found by test_signalling_answers (fixed in 59a8315): aiortc raises these from
    setRemoteDescription, and connect() mapped only ValueError/KeyError/IndexError; the
    rest escaped the Dialer and killed the incident's dialing task."""
    answer = mutation(lab.answer)
    assert answer != lab.answer
    lab.reply = Reply(201, (("Content-Type", "application/sdp"), ("Location", "/whip/s1")),
                      answer.encode(), "normal")
    assert lab.run(call_once(lab), timeout=10) == "answer refused by aiortc"


def test_car_keeps_redialing_after_a_bad_answer(lab: SignallingLab, tmp_path: Path) -> None:
    """The same, seen from the car: an answer without a=setup once stopped it calling."""
    lab.reply = Reply(201, (("Content-Type", "application/sdp"), ("Location", "/whip/s1")),
                      answer_without_setup(lab.answer).encode(), "normal")
    token = tmp_path / "token"
    token.write_text("car-token\n")
    car, sock, log = start_car(tmp_path, {
        "call": {"endpoints": [lab.url], "token_file": str(token), "speaker": "none",
                 "redial_max_seconds": 1.0, "connect_timeout": 2.0},
        "ice": {"interfaces": ["127.0.0.1"]}})
    try:
        before = lab.posts
        assert _request(sock, "trigger")["ok"]
        time.sleep(6)  # re-dials at 0.5, 1 and 1 s intervals: at least 3 more POSTs
        posts = lab.posts - before
        assert car.poll() is None, log.read_text()[-3000:]
    finally:
        car.send_signal(signal.SIGKILL)
        car.wait()
    assert posts >= 3, f"{posts} call attempt(s) in 6 s; the log: {log.read_text()[-1500:]}"


# --- 4. garbage NMEA through a real gpsd ---


def _sentence(body: str, checksum: int | None = None) -> bytes:
    value = reduce(lambda a, c: a ^ ord(c), body, 0) if checksum is None else checksum
    return f"${body}*{value:02X}\r\n".encode()


def garbage_nmea(rnd: random.Random, start: datetime, seconds: int) -> bytes:
    """The generated drive (tests/nmea.py) with junk between and inside its epochs."""
    out = [nmea.epoch(start + timedelta(seconds=i), 0, fix=False).encode() for i in range(2)]
    kinds: Counter[str] = Counter()
    for i in range(seconds):
        t = start + timedelta(seconds=2 + i)
        epoch = nmea.epoch(t, i).encode()
        hms, date = t.strftime("%H%M%S") + ".00", t.strftime("%d%m%y")
        junk = rnd.choice(["none", "none", "bytes", "checksum", "truncated", "absurd",
                           "absurd", "binary", "long", "fields"])
        kinds[junk] += 1
        if junk == "bytes":
            out.append(rnd.randbytes(rnd.randrange(1, 80)))
        elif junk == "checksum":
            out.append(_sentence(f"GPRMC,{hms},A,0100.0000,N,00100.0000,E,1.0,1.0,{date},,,A",
                                 checksum=rnd.randrange(256)))
        elif junk == "truncated":
            cut = epoch[: rnd.randrange(1, len(epoch))]
            out.append(cut)
            epoch = b"\r\n" + epoch
        elif junk == "absurd":  # lat 99 deg 99 min, lon 999 deg, speed and course absurd
            out.append(_sentence(rnd.choice([
                f"GPRMC,{hms},A,9999.9999,N,99999.9999,E,99999.0,999.0,{date},,,A",
                f"GPGGA,{hms},9999.9999,S,18100.0000,W,1,99,-1.0,-99999.0,M,0.0,M,,",
                f"GPRMC,{hms},A,4808.2440,X,01134.5300,Y,-5.0,-45.0,{date},,,A",
                "GPRMC,999999.99,A,4808.2440,N,01134.5300,E,25.0,45.0,999999,,,A",
                f"GPGGA,{hms},nan,N,inf,E,1,08,0.9,1e309,M,47.0,M,,",
            ])))
        elif junk == "binary":
            out.append(b"\xb5\x62\x01\x07" + rnd.randbytes(rnd.randrange(4, 100)))
        elif junk == "long":
            out.append(_sentence("GPGSV," + ",".join(["99"] * 200)))
        elif junk == "fields":
            out.append(_sentence(f"GPRMC,{hms},A,,,,,,,{date},,,A"))
            out.append(_sentence("GPGGA," + ",".join("x" * 14)))
        out.append(epoch)
    return b"".join(out)


def test_garbage_nmea_through_gpsd(tmp_path: Path) -> None:
    """gpsfake replays a drive salted with junk (random bytes, bad checksums, cut
    sentences, absurd positions, u-blox binary, overlong and empty fields) into a real gpsd;
    the car reads it for 12 s: it stays up, GPS status is ok/degraded/down with a detail,
    every fix it reports (status and the incident's track) is a real position, and video
    records throughout."""
    rnd = random.Random(7)
    start = datetime.now(UTC).replace(microsecond=0)
    log = tmp_path / "garbage.nmea"
    log.write_bytes(garbage_nmea(rnd, start, 120))
    port = free_port()
    with open(tmp_path / "gpsfake.log", "wb") as output:
        fake = subprocess.Popen(["gpsfake", "-q", "-c", "0.333", "-P", str(port), str(log)],
                                stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    state = tmp_path / "state"
    car: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _listening(port), 10, "gpsfake's gpsd")
        car, sock, car_log = start_car(tmp_path, {"gps": {
            "backend": "gpsd", "port": port, "timeout": 1.0, "poll_interval": 0.2}})
        incident = _request(sock, "trigger")["incident"]
        states: Counter[str] = Counter()
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert car.poll() is None, car_log.read_text()[-3000:]
            status = _request(sock, "status")["status"]
            gps = status["sources"]["gps"]
            assert gps["state"] in ("ok", "degraded", "down") and gps["detail"], gps
            states[gps["state"]] += 1
            if gps.get("last_known"):
                seen.append(gps["last_known"])
            assert status["sources"]["video"]["state"] == "simulated"
            time.sleep(0.25)
        car.send_signal(signal.SIGTERM)
        assert car.wait(timeout=30) == 0, car_log.read_text()[-3000:]
    finally:
        if car is not None and car.poll() is None:
            car.kill()
            car.wait()
        try:
            os.killpg(fake.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fake.wait()
    gpx = (state / "incidents" / incident / "track.gpx").read_text()
    points = [(float(a), float(b)) for a, b in
              re.findall(r'<trkpt lat="([^"]+)" lon="([^"]+)"', gpx)]
    positions = points + [(f["lat"], f["lon"]) for f in seen]
    insane = [p for p in positions if not (-90 <= p[0] <= 90 and -180 <= p[1] <= 180)]
    off_track = [p for p in positions if abs(p[0] - nmea.LAT0) > 0.1
                 or abs(p[1] - nmea.LON0) > 0.1]  # (0, 0) among them
    write_summary("garbage_nmea", {"status_polls": dict(states), "track_points": len(points),
                                   "positions_checked": len(positions),
                                   "insane": len(insane), "off_track": len(off_track),
                                   "nmea_bytes": log.stat().st_size})
    assert states["ok"] > 0, states  # the valid sentences still give fixes
    assert not insane, insane[:5]
    assert not off_track, off_track[:5]


def test_fix_without_a_position_is_not_null_island(tmp_path: Path) -> None:
    """Found by test_garbage_nmea_through_gpsd (fixed in 59a8315): an RMC that says 'A'
    with an impossible position makes gpsd send a 2D TPV without lat/lon, which gpsd-py3
    turns into 0.0, 0.0; the car reported that as its position (status, track, MSD)."""
    start = datetime.now(UTC).replace(microsecond=0)
    lines = [nmea.epoch(start + timedelta(seconds=i), 0, fix=False).encode() for i in range(2)]
    for i in range(60):
        t = start + timedelta(seconds=2 + i)
        lines.append(_sentence(f"GPRMC,{t:%H%M%S}.00,A,9999.9999,N,99999.9999,E,1.0,1.0,"
                               f"{t:%d%m%y},,,A"))
    log = tmp_path / "absurd.nmea"
    log.write_bytes(b"".join(lines))
    port = free_port()
    with open(tmp_path / "gpsfake.log", "wb") as output:
        fake = subprocess.Popen(["gpsfake", "-q", "-c", "0.333", "-P", str(port), str(log)],
                                stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)
    car: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: _listening(port), 10, "gpsfake's gpsd")
        car, sock, _ = start_car(tmp_path, {"gps": {"backend": "gpsd", "port": port,
                                                    "timeout": 1.0, "poll_interval": 0.2}})
        reported = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            gps = _request(sock, "status")["status"]["sources"]["gps"]
            if gps.get("last_known"):
                reported.append((gps["state"], gps["last_known"]["lat"],
                                 gps["last_known"]["lon"]))
            time.sleep(0.25)
    finally:
        if car is not None:
            car.kill()
            car.wait()
        os.killpg(fake.pid, signal.SIGKILL)
        fake.wait()
    assert not reported, f"positions reported from a receiver without one: {reported[:3]}"


def start_car(workdir: Path, sections: dict[str, dict[str, Any]]
              ) -> tuple[subprocess.Popen[bytes], Path, Path]:
    """`dashsos run` with a test camera and microphone; returns it, its control socket and
    its log."""
    sock = workdir / "control.sock"
    config: dict[str, dict[str, Any]] = {
        "storage": {"dir": str(workdir / "state")}, "control": {"socket": str(sock)},
        "buffer": {"pre_seconds": 2}, "incident": {"post_seconds": 30},
        "video": {"backend": "test", "width": 320, "height": 240, "fps": 30,
                  "bitrate": 400_000},
        "audio": {"backend": "test"}, "gps": {"backend": "simulated"},
        "button": {"backend": "none"}, "log": {"level": "info"}}
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    (workdir / "car.toml").write_text(toml(config))
    log = workdir / "car.log"
    with open(log, "wb") as output:
        car = subprocess.Popen([sys.executable, "-m", "dashsos", "--config",
                                str(workdir / "car.toml"), "run"],
                               stdout=output, stderr=subprocess.STDOUT)
    wait_for(lambda: sock.exists() or car.poll() is not None, 20, "the control socket")
    assert car.poll() is None, log.read_text()[-3000:]
    return car, sock, log


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _request(sock: Path, cmd: str) -> dict[str, Any]:
    return control_socket.request(sock, {"cmd": cmd})
