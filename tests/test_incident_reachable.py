"""The incident machine's one change for issue 11: a server that answers again (the link
is back) cuts a pending re-dial's backoff short, so a call re-dials within moments of a
coverage gap's end however long the gap was."""

from __future__ import annotations

import asyncio

from dashsos.effects import Dial
from test_incident import _machine, run


def test_reachable_again_redials_at_once() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, redial_max_seconds=30.0, post_seconds=60)
        incident, _ = machine.trigger("local", "press")
        assert incident is not None and len(effects.of(Dial)) == 1
        for _ in range(6):  # rounds fail through a long gap: the backoff grows
            machine.call_round_failed(incident)
            machine._dial(incident)
        machine.call_round_failed(incident)
        dials = len(effects.of(Dial))
        await asyncio.sleep(0.1)
        assert len(effects.of(Dial)) == dials  # waiting out a backoff of seconds
        machine.call_reachable(incident)  # a kept DELETE got through: the link is back
        assert len(effects.of(Dial)) == dials + 1
        machine.call_round_failed(incident)  # and the backoff starts over
        await asyncio.sleep(0.6)
        assert len(effects.of(Dial)) == dials + 2

    run(scenario)


def test_reachable_does_nothing_while_dialing_connected_or_cancelled() -> None:
    async def scenario() -> None:
        machine, effects = _machine(call=True, post_seconds=60, grace_seconds=5)
        incident, _ = machine.trigger("local", "press")
        assert incident is not None
        machine.call_reachable(incident)  # dialing: no second Dial
        assert len(effects.of(Dial)) == 1
        machine.call_connected(incident, {}, holds=False)
        machine.call_reachable(incident)
        assert len(effects.of(Dial)) == 1
        machine.call_round_failed(incident)
        machine.cancel("driver")
        machine.call_reachable(incident)
        assert len(effects.of(Dial)) == 1

    run(scenario)
