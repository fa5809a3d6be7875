"""The panic button, through gpiozero: a press triggers, a long press cancels.

Written once against gpiozero's Button; the pin factory underneath is the Pi's GPIO or
gpiozero's own MockFactory (the simulated button, reported as such). gpiozero calls
back on its own thread; the callbacks hand over to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Callable
from typing import Any

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


class PanicButton:
    def __init__(self, config: ButtonConfig, loop: asyncio.AbstractEventLoop,
                 on_press: Callable[[], None], on_long_press: Callable[[], None],
                 pin_factory: Any = None) -> None:
        gpiozero = importlib.import_module("gpiozero")
        self.simulated = pin_factory is not None and "Mock" in type(pin_factory).__name__
        self.health = Health("mock" if self.simulated else "gpio")
        self._loop = loop
        self._on_press = on_press
        self._on_long_press = on_long_press
        self.pin_factory = pin_factory
        self._bounce = config.bounce_seconds
        self._last_press = -1e9
        self.button = gpiozero.Button(
            config.pin, pull_up=config.pull_up,
            bounce_time=config.bounce_seconds or None, hold_time=config.long_press_seconds,
            pin_factory=pin_factory)
        self.button.when_pressed = self._pressed
        self.button.when_held = self._held
        state = State.SIMULATED if self.simulated else State.OK
        self.health.set(state, f"pin {config.pin}, long press {config.long_press_seconds:g} s")
        log.info("panic button on %s (%s)", config.pin, self.health.backend)

    def _pressed(self) -> None:
        # Debounced here too: not every pin factory honours bounce_time (MockFactory
        # does not), and no person presses twice within the bounce time.
        now = time.monotonic()
        if now - self._last_press < self._bounce:
            return
        self._last_press = now
        self._call(self._on_press)

    def _held(self) -> None:
        self._call(self._on_long_press)

    def _call(self, fn: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(fn)
        except RuntimeError:  # loop closed during shutdown
            pass

    def close(self) -> None:
        self.button.close()


def make(config: ButtonConfig, loop: asyncio.AbstractEventLoop, on_press: Callable[[], None],
         on_long_press: Callable[[], None]) -> PanicButton | None:
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
    return PanicButton(config, loop, on_press, on_long_press, pin_factory=factory)
