"""The panic button, through gpiozero: it reports edges, the incident machine decides.

Written once against gpiozero's Button; the pin factory underneath is the Pi's GPIO or
gpiozero's own MockFactory (the simulated button, reported as such). gpiozero calls
back on its own thread; the callbacks hand over to the asyncio loop. Whether a press
is a panic press, a press again or the cancel gesture is not decided here.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from dashsos.config import ButtonConfig
from dashsos.health import Health, State

log = logging.getLogger(__name__)


def gpio_available() -> bool:
    """True when gpiozero finds a real pin factory (on a Pi)."""
    try:
        gpiozero = importlib.import_module("gpiozero")
        gpiozero.Device.ensure_pin_factory()
        return "Mock" not in type(gpiozero.Device.pin_factory).__name__
    except Exception:  # no gpiozero, no GPIO chip, no lgpio: no button
        return False


class ButtonEvents(Protocol):
    """What the button reports (the incident machine implements it)."""

    def button_pressed(self, source: str) -> None: ...
    def button_released(self, source: str) -> None: ...
    def button_held(self, source: str) -> None: ...


class PanicButton:
    def __init__(self, config: ButtonConfig, loop: asyncio.AbstractEventLoop,
                 events: ButtonEvents, pin_factory: Any = None) -> None:
        gpiozero = importlib.import_module("gpiozero")
        self.simulated = pin_factory is not None and "Mock" in type(pin_factory).__name__
        self.health = Health("mock" if self.simulated else "gpio")
        self._loop = loop
        self._events = events
        self.source = f"button {config.pin}"
        self.pin_factory = pin_factory
        self._bounce = config.bounce_seconds
        self._last_press = -1e9
        self.button = gpiozero.Button(
            config.pin, pull_up=config.pull_up,
            bounce_time=config.bounce_seconds or None, hold_time=config.long_press_seconds,
            pin_factory=pin_factory)
        self.button.when_pressed = self._pressed
        self.button.when_released = self._released
        self.button.when_held = self._held
        state = State.SIMULATED if self.simulated else State.OK
        self.health.set(state, f"pin {config.pin}, long press {config.long_press_seconds:g} s")
        log.info("panic button on %s (%s)", config.pin, self.health.backend)

    # gpiozero's thread: debounce here too (not every pin factory honours bounce_time,
    # MockFactory does not) and hand over to the loop.

    def _pressed(self) -> None:
        now = time.monotonic()
        if now - self._last_press < self._bounce:
            return
        self._last_press = now
        self._call(self._events.button_pressed)

    def _released(self) -> None:
        self._call(self._release_when_settled)

    def _held(self) -> None:
        self._call(self._events.button_held)

    def _call(self, fn: Callable[[str], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, self.source)
        except RuntimeError:  # loop closed during shutdown
            pass

    # the loop

    def _release_when_settled(self, source: str) -> None:
        """A bouncing contact opens for a moment: a release counts once the pin stays up
        for the bounce time."""
        def settled() -> None:
            if not self.button.closed and not self.button.is_pressed:
                self._events.button_released(source)

        self._loop.call_later(self._bounce, settled)

    def close(self) -> None:
        self.button.close()


def make(config: ButtonConfig, loop: asyncio.AbstractEventLoop,
         events: ButtonEvents) -> PanicButton | None:
    backend = config.backend
    if backend == "auto":
        backend = "gpio" if gpio_available() else "none"
        if backend == "none":
            log.warning("button: auto found no GPIO; no panic button")
    if backend == "none":
        return None
    factory = None
    if backend == "mock":
        factory = importlib.import_module("gpiozero.pins.mock").MockFactory()
    return PanicButton(config, loop, events, pin_factory=factory)
