"""The incident state machine and the panic button, with gpiozero's own MockFactory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from dashsos.config import ButtonConfig
from dashsos.incident import Incident, IncidentMachine, Phase
from dashsos.triggers.button import PanicButton


class FakeEvidence:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def open(self, incident: Incident) -> None:
        self.events.append(("open", incident.id))

    def extend(self, incident: Incident) -> None:
        self.events.append(("extend", incident.id))

    async def close(self, incident: Incident) -> bool:
        self.events.append(("close", incident.id))
        return True


def _machine(**kwargs: Any) -> tuple[IncidentMachine, FakeEvidence, list[tuple[str, str]]]:
    evidence = FakeEvidence()
    options = {"pre_seconds": 2, "post_seconds": 0.3, "grace_seconds": 0.2,
               "cooldown_seconds": 0.0, **kwargs}
    machine = IncidentMachine(evidence, **options)
    events: list[tuple[str, str]] = []
    machine.listeners.append(lambda i, e, d: events.append((i.id if i else "-", e)))
    return machine, evidence, events


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_trigger_extend_and_phases() -> None:
    async def scenario() -> None:
        machine, evidence, events = _machine()
        first, outcome = machine.trigger("local", "test")
        assert outcome == "opened" and first is not None
        assert machine.state == "triggered"
        await asyncio.sleep(0.25)  # grace over, no call holding it: the post window
        assert first.phase == Phase.ENDING
        same, outcome = machine.trigger("local", "again")
        assert outcome == "extended" and same is first and len(first.triggers) == 2
        await asyncio.sleep(0.2)  # past the first deadline, inside the extended one
        assert first.phase == Phase.ENDING
        await asyncio.sleep(0.25)
        assert first.phase == Phase.SAVED and machine.current is None
        assert machine.state == "idle"
        assert [e for _, e in events] == ["triggered", "ending", "extended", "evidence_saved"]
        assert evidence.events == [("open", first.id), ("extend", first.id),
                                   ("close", first.id)]

    run(scenario)


def test_cancel_inside_and_outside_grace() -> None:
    async def scenario() -> None:
        machine, _, events = _machine(grace_seconds=0.2, post_seconds=0.4)
        assert machine.cancel("nobody") == (False, "no open incident")
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        ok, reason = machine.cancel("button long press")
        assert ok and incident.cancelled is not None and incident.phase == Phase.ENDING
        assert machine.cancel("again") == (False, "already cancelled")
        await asyncio.sleep(0.5)
        assert incident.phase == Phase.SAVED  # a cancelled incident keeps its evidence
        late, _ = machine.trigger("local", "b")
        await asyncio.sleep(0.25)
        ok, reason = machine.cancel("too late")
        assert not ok and "grace window" in reason and late is not None and not late.cancelled
        names = [e for _, e in events]
        assert names[:4] == ["cancel_refused", "triggered", "cancelled", "cancel_refused"]
        assert names.count("cancel_refused") == 3  # every cancel is reported

    run(scenario)


def test_trigger_after_cancel_uncancels_and_real_beats_test() -> None:
    async def scenario() -> None:
        machine, _, events = _machine(post_seconds=0.5)
        incident, _ = machine.trigger("mqtt", "fleet", test=True)
        assert incident is not None and incident.test
        machine.cancel("driver")
        machine.trigger("panic_button", "button")
        assert not incident.test and incident.cancelled is None
        await machine.shutdown()

    run(scenario)


def test_hold_keeps_incident_open_until_release() -> None:
    async def scenario() -> None:
        machine, _, events = _machine(post_seconds=0.2, grace_seconds=0.05)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        machine.hold("call")
        await asyncio.sleep(0.4)
        assert incident.phase == Phase.ACTIVE and machine.current is incident
        machine.release("call")
        assert incident.phase == Phase.ENDING
        await asyncio.sleep(0.3)
        assert incident.phase == Phase.SAVED

    run(scenario)


def test_cooldown_ignores_automatic_triggers_only() -> None:
    async def scenario() -> None:
        machine, _, events = _machine(post_seconds=0.05, cooldown_seconds=0.5)
        machine.trigger("local", "a")
        await asyncio.sleep(0.15)
        assert machine.state == "cooldown"
        assert machine.trigger("gps_crash", "stop", automatic=True) == (None, "ignored")
        incident, outcome = machine.trigger("panic_button", "button")
        assert outcome == "opened"  # a person always gets an incident
        await machine.shutdown()

    run(scenario)


# --- the panic button through gpiozero's MockFactory ---


@pytest.fixture
def factory() -> MockFactory:
    return MockFactory()


def _button_scenario(factory: MockFactory, body: Callable[[Any, IncidentMachine,
                                                           list[tuple[str, str]]],
                                                          Awaitable[None]],
                     **machine_options: Any) -> None:
    async def scenario() -> None:
        machine, _, events = _machine(**machine_options)
        config = ButtonConfig(backend="mock", pin="GPIO17", bounce_seconds=0.05,
                              long_press_seconds=0.3)
        button = PanicButton(config, asyncio.get_running_loop(),
                             lambda: machine.trigger("panic_button", "button GPIO17") and None,
                             lambda: machine.cancel("button GPIO17 long press") and None,
                             pin_factory=factory)
        assert button.health.state == "simulated"
        try:
            await body(factory.pin(17), machine, events)
        finally:
            button.close()
            await machine.shutdown()

    asyncio.run(scenario())


def test_press_triggers(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, events: list[tuple[str, str]]) -> None:
        pin.drive_low()  # pull-up: pressed connects the pin to ground
        await asyncio.sleep(0.05)
        pin.drive_high()
        await asyncio.sleep(0.05)
        assert [e for _, e in events] == ["triggered"]
        assert machine.current is not None and machine.current.trigger.kind == "panic_button"

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_bounce_is_one_press(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, events: list[tuple[str, str]]) -> None:
        for _ in range(5):  # a bouncing contact: five edges within 10 ms
            pin.drive_low()
            pin.drive_high()
        pin.drive_low()
        await asyncio.sleep(0.1)
        pin.drive_high()
        await asyncio.sleep(0.1)
        assert [e for _, e in events] == ["triggered"]

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_long_press_cancels_inside_grace(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, events: list[tuple[str, str]]) -> None:
        pin.drive_low()
        await asyncio.sleep(0.05)
        pin.drive_high()
        await asyncio.sleep(0.1)
        pin.drive_low()  # the cancel gesture: hold
        await asyncio.sleep(0.45)
        pin.drive_high()
        await asyncio.sleep(0.05)
        assert [e for _, e in events] == ["triggered", "extended", "cancelled"]
        assert machine.current is not None and machine.current.cancelled is not None

    _button_scenario(factory, body, post_seconds=5, grace_seconds=2)


def test_long_press_outside_grace_is_refused_and_reported(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, events: list[tuple[str, str]]) -> None:
        pin.drive_low()
        await asyncio.sleep(0.05)
        pin.drive_high()
        await asyncio.sleep(0.3)  # grace (0.2 s) is over
        pin.drive_low()
        await asyncio.sleep(0.45)
        pin.drive_high()
        await asyncio.sleep(0.05)
        assert [e for _, e in events] == ["triggered", "ending", "extended", "cancel_refused"]
        assert machine.current is not None and machine.current.cancelled is None

    _button_scenario(factory, body, post_seconds=5, grace_seconds=0.2)
