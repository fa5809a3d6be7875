"""The incident state machine, driven by its inputs alone: its effects are the output.
The panic button through gpiozero's own MockFactory."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from dashsos.config import ButtonConfig
from dashsos.effects import (
    CloseEvidence,
    Dial,
    Effect,
    HangUp,
    OpenEvidence,
    Publish,
    ReportLocation,
    UpdateEvidence,
)
from dashsos.incident import IncidentMachine, Phase, Policy
from dashsos.triggers.button import PanicButton


class Effects:
    """Records every effect; closes evidence at once, as a recorder would report."""

    def __init__(self, save_ok: bool = True) -> None:
        self.all: list[Effect] = []
        self.save_ok = save_ok

    def __call__(self, effect: Effect) -> None:
        self.all.append(effect)
        if isinstance(effect, CloseEvidence):
            asyncio.get_running_loop().call_soon(effect.done, self.save_ok,
                                                 "" if self.save_ok else "disk full")

    def events(self) -> list[str]:
        return [e.event for e in self.all if isinstance(e, Publish)]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.all if isinstance(e, kind)]

    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.all]


def _machine(**kwargs: Any) -> tuple[IncidentMachine, Effects]:
    options: dict[str, Any] = {"pre_seconds": 2, "post_seconds": 0.3, "grace_seconds": 0.2,
                               "cooldown_seconds": 0.0, **kwargs}
    machine = IncidentMachine(Policy(**options), streams=lambda: ("video", "audio"),
                              msd=lambda incident, n: {"messageIdentifier": n})
    effects = Effects()
    machine.handlers.append(effects)
    return machine, effects


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def test_trigger_extend_and_phases() -> None:
    async def scenario() -> None:
        machine, effects = _machine()
        first, outcome = machine.trigger("local", "test")
        assert outcome == "opened" and first is not None
        assert machine.state == "triggered" and first.msd == {"messageIdentifier": 1}
        # The fleet hears first; the clip opens with every stream not failed; 1 Hz location.
        assert effects.names()[:3] == ["Publish", "OpenEvidence", "ReportLocation"]
        assert effects.of(OpenEvidence)[0].streams == ("video", "audio")
        assert effects.of(ReportLocation)[0].every_seconds == 1.0
        await asyncio.sleep(0.25)  # grace over, no call holding it: the post window
        assert first.phase == Phase.ENDING
        same, outcome = machine.trigger("local", "again")
        assert outcome == "extended" and same is first and len(first.triggers) == 2
        await asyncio.sleep(0.2)  # past the first deadline, inside the extended one
        assert first.phase == Phase.ENDING
        await asyncio.sleep(0.25)
        assert first.phase == Phase.SAVED and machine.current is None
        assert machine.state == "idle"
        assert effects.events() == ["triggered", "ending", "extended", "evidence_saved"]
        assert [type(e).__name__ for e in effects.all
                if isinstance(e, OpenEvidence | UpdateEvidence | CloseEvidence)] == \
            ["OpenEvidence", "UpdateEvidence", "CloseEvidence"]
        assert effects.of(ReportLocation)[-1].every_seconds is None
        assert not effects.of(Dial)  # no call configured

    run(scenario)


def test_failed_save_is_reported_with_its_reason() -> None:
    async def scenario() -> None:
        machine, effects = _machine(post_seconds=0.05)
        effects.save_ok = False
        incident, _ = machine.trigger("local", "a")
        await asyncio.sleep(0.2)
        assert incident is not None and incident.phase == Phase.FAILED
        failed = effects.of(Publish)[-1]
        assert failed.event == "evidence_failed" and failed.details == {"reason": "disk full"}

    run(scenario)


def test_cancel_inside_and_outside_grace() -> None:
    async def scenario() -> None:
        machine, effects = _machine(grace_seconds=0.2, post_seconds=0.4)
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
        names = effects.events()
        assert names[:4] == ["cancel_refused", "triggered", "cancelled", "cancel_refused"]
        assert names.count("cancel_refused") == 3  # every cancel is reported
        await machine.shutdown()

    run(scenario)


# --- the call: dial, hold, re-dial, hang up ---


def test_coerced_cancel_then_press_dials_again_at_once() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5, post_seconds=5)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None and len(effects.of(Dial)) == 1
        machine.call_connected(incident, {}, holds=True)
        machine.cancel("driver, forced")
        assert effects.of(HangUp)[-1].reason == "incident cancelled"
        machine.call_ended(incident, {"reason": "the car hung up"}, by_dispatcher=False)
        await asyncio.sleep(0.1)
        assert len(effects.of(Dial)) == 1  # cancelled: no call back on its own
        machine.trigger("panic_button", "button")  # pressed again: it is real
        assert incident.cancelled is None and len(effects.of(Dial)) == 2  # at once
        assert effects.events()[-1] == "extended"
        assert effects.of(Publish)[-1].details["uncancelled"] is True
        await machine.shutdown()

    run(scenario)


def test_connected_call_holds_and_lost_call_redials_at_once() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=0.05, post_seconds=0.2)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        machine.call_connected(incident, {"endpoint": "x"}, holds=True)
        await asyncio.sleep(0.4)  # past grace and post: the call holds it open
        assert incident.phase == Phase.ACTIVE and machine.current is incident
        machine.call_ended(incident, {"reason": "ICE failed"}, by_dispatcher=False)
        assert incident.phase == Phase.ENDING
        await asyncio.sleep(0.01)
        assert len(effects.of(Dial)) == 2  # lost after connecting: re-dialed at once
        machine.call_connected(incident, {}, holds=True)
        machine.call_ended(incident, {"reason": "hung up"}, by_dispatcher=True)
        await asyncio.sleep(0.05)
        assert len(effects.of(Dial)) == 2  # the dispatcher decided
        machine.trigger("panic_button", "button")  # but a person asking again is called
        assert len(effects.of(Dial)) == 3
        await machine.shutdown()
        assert "connected" in effects.events() and "ended" in effects.events()

    run(scenario)


def test_failed_rounds_redial_with_backoff_until_the_incident_ends() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=0.05, post_seconds=10,
                                    redial_max_seconds=1.0)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        dials = [asyncio.get_running_loop().time()]
        for _ in range(4):
            count = len(effects.of(Dial))
            machine.call_round_failed(incident)
            while len(effects.of(Dial)) == count:
                await asyncio.sleep(0.01)
            dials.append(asyncio.get_running_loop().time())
        gaps = [round(b - a, 1) for a, b in zip(dials, dials[1:], strict=False)]
        assert gaps == [0.5, 1.0, 1.0, 1.0], gaps  # 0.5 s doubling, capped
        await machine.shutdown()
        machine.call_round_failed(incident)  # a late report about an ended incident
        await asyncio.sleep(0.6)
        assert len(effects.of(Dial)) == 5

    run(scenario)


def test_no_dial_while_a_call_is_up_and_hang_up_at_the_end() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=0.05, post_seconds=0.1)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        machine.trigger("local", "b")  # dialing already: no second call
        assert len(effects.of(Dial)) == 1
        machine.call_connected(incident, {}, holds=False)  # a WHIP ingest does not hold
        machine.trigger("local", "c")
        assert len(effects.of(Dial)) == 1
        await asyncio.sleep(0.3)
        assert incident.phase == Phase.SAVED
        assert effects.of(HangUp)[-1].reason == "incident ended"

    run(scenario)


def test_trigger_after_cancel_uncancels_and_real_beats_test() -> None:
    async def scenario() -> None:
        machine, effects = _machine(post_seconds=0.5)
        incident, _ = machine.trigger("mqtt", "fleet", test=True)
        assert incident is not None and incident.test
        machine.cancel("driver")
        machine.trigger("panic_button", "button")
        assert not incident.test and incident.cancelled is None
        assert incident.msd == {"messageIdentifier": 2}  # a new MSD: no longer a test
        await machine.shutdown()

    run(scenario)


def test_a_press_pending_when_the_incident_ends_opens_a_new_one() -> None:
    async def scenario() -> None:
        machine, effects = _machine(post_seconds=0.1, grace_seconds=0.05)
        first, _ = machine.trigger("gps_crash", "sudden stop", automatic=True)
        machine.button_pressed("button")  # pressed during the post window ...
        await asyncio.sleep(0.2)  # ... the incident ends while the button is down
        assert machine.current is None
        machine.button_released("button")
        assert machine.current is not None and machine.current is not first
        await machine.shutdown()

    run(scenario)


def test_an_msd_that_cannot_be_built_does_not_stop_the_incident() -> None:
    async def scenario() -> None:
        def broken(incident: Any, message_id: int) -> None:
            raise ValueError("bad vehicle data")

        machine = IncidentMachine(Policy(pre_seconds=1, post_seconds=0.1, call=True),
                                  msd=broken)
        effects = Effects()
        machine.handlers.append(effects)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None and incident.msd is None
        assert effects.names()[:4] == ["Publish", "OpenEvidence", "Dial", "ReportLocation"]
        await asyncio.sleep(0.3)
        assert incident.phase == Phase.SAVED

    run(scenario)


def test_cooldown_ignores_automatic_triggers_only() -> None:
    async def scenario() -> None:
        machine, effects = _machine(post_seconds=0.05, cooldown_seconds=0.5)
        machine.trigger("local", "a")
        await asyncio.sleep(0.15)
        assert machine.state == "cooldown"
        assert machine.trigger("gps_crash", "stop", automatic=True) == (None, "ignored")
        incident, outcome = machine.trigger("panic_button", "button")
        assert outcome == "opened"  # a person always gets an incident
        await machine.shutdown()

    run(scenario)


def test_shutdown_finishes_the_open_incident_now() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, post_seconds=60)
        incident, _ = machine.trigger("local", "a")
        assert incident is not None
        machine.call_connected(incident, {}, holds=True)
        await machine.shutdown()
        assert incident.phase == Phase.SAVED
        assert effects.of(HangUp) and effects.of(CloseEvidence)

    run(scenario)


# --- the panic button through gpiozero's MockFactory ---


@pytest.fixture
def factory() -> MockFactory:
    return MockFactory()


def _button_scenario(factory: MockFactory,
                     body: Callable[[Any, IncidentMachine, Effects], Awaitable[None]],
                     **machine_options: Any) -> None:
    async def scenario() -> None:
        machine, effects = _machine(**machine_options)
        config = ButtonConfig(backend="mock", pin="GPIO17", bounce_seconds=0.05,
                              long_press_seconds=0.3)
        button = PanicButton(config, asyncio.get_running_loop(), machine,
                             pin_factory=factory)
        assert button.health.state == "simulated"
        try:
            await body(factory.pin(17), machine, effects)
        finally:
            button.close()
            await machine.shutdown()

    asyncio.run(scenario())


async def press(pin: Any, seconds: float, after: float = 0.1) -> None:
    pin.drive_low()  # pull-up: pressed connects the pin to ground
    await asyncio.sleep(seconds)
    pin.drive_high()
    await asyncio.sleep(after)


def test_press_triggers_on_the_way_down(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        pin.drive_low()
        await asyncio.sleep(0.02)  # no waiting for the release: a panic press opens now
        assert effects.events() == ["triggered"]
        assert machine.current is not None and machine.current.trigger.kind == "panic_button"
        pin.drive_high()
        await asyncio.sleep(0.1)
        assert effects.events() == ["triggered"]

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_bounce_is_one_press(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        for _ in range(5):  # a bouncing contact: five edges within 10 ms
            pin.drive_low()
            pin.drive_high()
        await press(pin, 0.1)
        assert effects.events() == ["triggered"]

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_holding_the_panic_press_does_not_cancel_it(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        await press(pin, 0.5)  # someone holds the button down in panic
        assert effects.events() == ["triggered"]
        assert machine.current is not None and machine.current.cancelled is None

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_second_press_extends_on_release(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        await press(pin, 0.05)
        await press(pin, 0.1)
        assert effects.events() == ["triggered", "extended"]

    _button_scenario(factory, body, post_seconds=5, grace_seconds=5)


def test_long_press_cancels_inside_grace_without_extending(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        await press(pin, 0.05)
        await press(pin, 0.45)  # the cancel gesture: hold
        assert effects.events() == ["triggered", "cancelled"]
        assert machine.current is not None and machine.current.cancelled is not None
        assert len(machine.current.triggers) == 1

    _button_scenario(factory, body, post_seconds=5, grace_seconds=2)


def test_long_press_on_a_test_incident_leaves_it_a_test(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        incident, _ = machine.trigger("local", "installer", test=True)
        assert incident is not None
        await press(pin, 0.45)
        assert incident.test and incident.cancelled is not None
        assert effects.events() == ["triggered", "cancelled"]
        assert incident.msd == {"messageIdentifier": 1}

    _button_scenario(factory, body, post_seconds=5, grace_seconds=2)


def test_long_press_outside_grace_is_refused_and_reported(factory: MockFactory) -> None:
    async def body(pin: Any, machine: IncidentMachine, effects: Effects) -> None:
        await press(pin, 0.05, after=0.3)  # grace (0.2 s) is over
        await press(pin, 0.45)
        assert effects.events() == ["triggered", "ending", "cancel_refused"]
        assert machine.current is not None and machine.current.cancelled is None

    _button_scenario(factory, body, post_seconds=5, grace_seconds=0.2)
