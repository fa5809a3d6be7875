"""The real incident machine and the real dialer, with a stand-in for the peer session:
whatever a call attempt raises and however slowly a call ends, the machine is never left
waiting for a report that does not come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from dashsos.call import dialer as dialer_module
from dashsos.config import CallConfig, IceConfig
from dashsos.effects import CloseEvidence, Dial, Effect, Publish
from dashsos.incident import IncidentMachine, Policy


class StandInSession:
    """Shaped like CallSession; `behaviour` says how connect and close go."""

    made: list[StandInSession] = []
    behaviour: dict[str, Any] = {}

    def __init__(self, endpoint: str, client: Any, rtc: Any, *, mode: str, **_: Any) -> None:
        self.endpoint, self.mode = endpoint, mode
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.ended_by_dispatcher = False
        self.connected_at: float | None = None
        self.closed = False
        self.answer = None  # what a server answered (none here: no Location to DELETE)
        self.rejected: list[str] = []
        self.carried = ["audio", "video"]
        StandInSession.made.append(self)

    async def connect(self, timeout: float) -> None:
        failure = self.behaviour.get("connect")
        if failure is not None:
            raise failure
        self.connected_at = 0.0

    async def channel_ready(self) -> bool:
        return False

    def send(self, message: dict[str, Any]) -> bool:
        return False

    async def close(self, reason: str, *, hang_up: bool = True) -> str | None:
        self.end_reason = self.end_reason or reason
        self.ended.set()
        await asyncio.sleep(self.behaviour.get("close_seconds", 0.0))  # a slow DELETE
        self.closed = True
        return None


@pytest.fixture
def build(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[IncidentMachine, list[Effect]]]:
    async def no_ice(*args: Any) -> None:
        return None

    StandInSession.made = []
    StandInSession.behaviour = {}
    monkeypatch.setattr(dialer_module, "CallSession", StandInSession)
    monkeypatch.setattr(dialer_module, "usable_configuration", no_ice)

    def make(mode: str = "call", **policy: Any) -> tuple[IncidentMachine, list[Effect]]:
        machine = IncidentMachine(Policy(**{"pre_seconds": 1, "post_seconds": 5,
                                            "grace_seconds": 5, "call": True,
                                            "redial_max_seconds": 1.0, **policy}))
        dialer = dialer_module.Dialer(
            CallConfig(endpoints=("https://desk.example/whip",), mode=mode), IceConfig(),
            _Bus(), machine, has_video=False, has_audio=False, request_keyframe=lambda: None,
            last_fix=lambda: None, speaker=None)
        effects: list[Effect] = []

        def record(effect: Effect) -> None:
            effects.append(effect)
            if isinstance(effect, CloseEvidence):
                asyncio.get_running_loop().call_soon(effect.done, True, "")

        machine.handlers += [record, dialer.handle]
        return machine, effects

    return make


class _Bus:
    def subscribe(self, subscriber: Any) -> Callable[[], None]:
        return lambda: None


def _dials(effects: list[Effect]) -> int:
    return sum(isinstance(e, Dial) for e in effects)


async def _until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_an_unexpected_error_while_connecting_is_a_failed_attempt(build: Any) -> None:
    async def scenario() -> None:
        machine, effects = build()
        StandInSession.behaviour["connect"] = OSError("Network is unreachable")
        machine.trigger("local", "press")
        await _until(lambda: _dials(effects) >= 2, 2)  # re-dialed after the backoff
        StandInSession.behaviour.pop("connect")
        await _until(lambda: machine.call_state == "connected", 3)
        await machine.shutdown()

    asyncio.run(scenario())


def test_a_press_while_the_cancelled_call_hangs_up_still_calls(build: Any) -> None:
    async def scenario() -> None:
        machine, effects = build()
        StandInSession.behaviour["close_seconds"] = 1.0
        incident, _ = machine.trigger("local", "press")
        await _until(lambda: machine.call_state == "connected", 2)
        machine.cancel("coerced")
        await asyncio.sleep(0.1)
        machine.trigger("local", "pressed again")  # the DELETE is still under way
        await _until(lambda: len(StandInSession.made) == 2, 3)
        await _until(lambda: machine.call_state == "connected", 2)
        assert incident is not None and incident.cancelled is None
        await machine.shutdown()

    asyncio.run(scenario())


def test_a_new_incident_during_the_last_call_s_hang_up_gets_its_call(build: Any) -> None:
    async def scenario() -> None:
        # A WHIP ingest does not hold the incident open: it ends with the call up.
        machine, effects = build(mode="whip", post_seconds=2, grace_seconds=0.1)
        StandInSession.behaviour["close_seconds"] = 0.5
        first, _ = machine.trigger("local", "first")
        await _until(lambda: machine.call_state == "connected", 2)
        await _until(lambda: machine.current is None, 4)
        second, _ = machine.trigger("local", "second")  # the first call is still hanging up
        await _until(lambda: any(isinstance(e, Publish) and e.event == "connected"
                                 and e.incident is second for e in effects), 3)
        assert second is not first and len(StandInSession.made) == 2
        await machine.shutdown()

    asyncio.run(scenario())
