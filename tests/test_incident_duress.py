"""The machine after a duress cancel and while shutting down: a second cancel changes
nothing, the light ends as it would for a cancel, and nothing new opens during SIGTERM."""

from __future__ import annotations

import asyncio

from dashsos.effects import Dial, HangUp, Indicate
from test_incident import _machine, run

PIN = "2468"


def test_a_cancel_after_a_duress_cancel_changes_nothing() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=5, post_seconds=5,
                                    duress_pin=PIN)
        incident, _ = machine.trigger("panic_button", "button")
        assert incident is not None
        machine.call_connected(incident, {}, holds=True)
        assert machine.cancel("forced", pin=PIN) == (True, "cancelled")
        # Forced again, the driver cancels the way the attacker saw: the answer is a real
        # second cancel's, and the call and the incident go on.
        assert machine.cancel("button long press") == (False, "already cancelled")
        assert machine.cancel("forced again", pin=PIN) == (False, "already cancelled")
        assert incident.cancelled is None and incident.duress is not None
        assert not effects.of(HangUp) and machine.call_state == "connected"
        await machine.shutdown()

    run(scenario)


def test_the_light_ends_after_a_refused_duress_pin() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, grace_seconds=0.05, post_seconds=0.3,
                                    duress_pin=PIN)
        incident, _ = machine.trigger("panic_button", "button")
        await asyncio.sleep(0.1)  # past the grace window: the PIN's cancel is refused
        assert machine.cancel("forced", pin=PIN)[0] is False
        assert incident is not None and incident.duress is not None
        machine.call_round_failed(incident)
        await asyncio.sleep(0.5)
        assert machine.current is None
        assert effects.of(Indicate)[-1].pattern == "off"  # not left blinking

    run(scenario)


def test_nothing_new_opens_while_shutting_down() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, post_seconds=60)
        machine.trigger("local", "a")
        stopping = asyncio.create_task(machine.shutdown())
        await asyncio.sleep(0)  # SIGTERM: the evidence is being finished
        assert machine.trigger("mqtt", "fleet") == (None, "ignored")
        await stopping
        assert len(effects.of(Dial)) == 1 and machine.current is None

    run(scenario)
