"""The indicator light: draws the pattern the incident machine chose (an `Indicate`
effect) on a LED through gpiozero, the Pi's GPIO or gpiozero's MockFactory in tests.

Patterns are on/off durations repeated on the event loop (one short task; gpiozero's
`on()`/`off()` only set a pin). The documented patterns are in PATTERNS; README's
"What the driver sees and hears" shows the same table.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from dashsos.effects import Effect, Indicate
from dashsos.health import Health, State

log = logging.getLogger(__name__)

# seconds on, off, on, off ... repeated; () is off and (0,) is steady
PATTERNS: dict[str, tuple[float, ...]] = {
    "off": (),  # idle
    "heartbeat": (0.05, 2.95),  # idle, when an installer enables it
    "slow_blink": (0.5, 0.5),  # triggered, calling, a call lost: 1 Hz
    "steady": (0.0,),  # the dispatcher is on the line
    "fast_blink": (0.1, 0.1),  # cancelled (a press now un-cancels): 5 Hz
    "double_blink": (0.15, 0.15, 0.15, 0.55),  # no one reached, still recording
    "fault": (1.0, 0.25, 0.25, 0.25, 0.25, 1.0),  # idle with a device down: long, short, short
}


class Indicator:
    """One LED. `handle` takes the machine's effects; everything runs on the loop."""

    def __init__(self, pin: str, *, active_high: bool = True, pin_factory: Any = None) -> None:
        gpiozero = importlib.import_module("gpiozero")
        self.simulated = pin_factory is not None and "Mock" in type(pin_factory).__name__
        self.health = Health("mock" if self.simulated else "gpio")
        self.led = gpiozero.LED(pin, active_high=active_high, initial_value=False,
                                pin_factory=pin_factory)
        self.pin = pin
        self.pattern = "off"
        self.history: list[str] = []  # patterns shown, for status and tests
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._healthy(f"pin {pin}, off")

    def _healthy(self, detail: str) -> None:
        self.health.set(State.SIMULATED if self.simulated else State.OK, detail)

    def handle(self, effect: Effect) -> None:
        match effect:
            case Indicate(pattern):
                self.show(pattern)

    def show(self, pattern: str) -> None:
        if self._closed:
            return  # the daemon is stopping: the light stays off
        steps = PATTERNS.get(pattern)
        if steps is None:
            log.error("indicator: unknown pattern %r", pattern)
            return
        self.pattern = pattern
        self.history.append(pattern)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            if steps == (0.0,):
                self.led.on()
            else:
                self.led.off()
                if steps:
                    self._task = asyncio.get_running_loop().create_task(self._blink(steps))
            self._healthy(f"pin {self.pin}, {pattern}")
        except Exception as exc:  # a light that fails never stops an incident
            self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")
            log.warning("indicator failed: %s", exc)

    async def _blink(self, steps: tuple[float, ...]) -> None:
        try:
            while True:
                for i, seconds in enumerate(steps):
                    self.led.on() if i % 2 == 0 else self.led.off()
                    await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        try:
            self.led.off()
            self.led.close()
        except Exception:
            pass  # closing at shutdown: the pin is released either way
