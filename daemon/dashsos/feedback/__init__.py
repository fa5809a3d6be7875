"""What the driver sees and hears: the indicator light and the spoken prompts, carried out
from the incident machine's Indicate, Prompt and MuteSpeaker effects (it decides; these
only draw and say)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from dashsos.config import Config
from dashsos.effects import Effect
from dashsos.feedback.indicator import Indicator
from dashsos.feedback.prompts import PromptPlayer, SpeakerGate
from dashsos.health import State
from dashsos.incident import IncidentMachine
from dashsos.media.source import Source

FAULT_CHECK_S = 2.0


class Feedback:
    """Built by app.py: the indicator from the device factory, the prompt player on the
    call's speaker (none in covert mode), the speaker gate in front of the call."""

    def __init__(self, config: Config, devices: Any, machine: IncidentMachine) -> None:
        self.machine = machine
        covert = config.incident.covert
        self.gate = SpeakerGate(None if covert else devices.speaker())
        self._devices = devices
        self._covert = covert
        self.indicator: Indicator | None = None  # built in start(), after the button
        self.prompts: PromptPlayer | None = None
        if not covert and config.prompts.enabled and devices.speaker() is not None:
            self.prompts = PromptPlayer(config.prompts,
                                        Path(config.storage.dir) / "cache" / "prompts",
                                        config.call.speaker, self.gate)
        self._tasks: list[asyncio.Task[None]] = []
        machine.handlers.append(self.handle)

    def handle(self, effect: Effect) -> None:
        self.gate.handle(effect)
        if self.indicator is not None:
            self.indicator.handle(effect)
        if self.prompts is not None:
            self.prompts.handle(effect)

    def start(self, sources: dict[str, Source[Any]]) -> None:
        loop = asyncio.get_running_loop()
        if not self._covert:  # covert: no light at all, not even a pin driven low
            self.indicator = self._devices.indicator()
            self.machine.refresh_indicator()
            if self.indicator is not None and self.machine.indicator != "off":
                self.indicator.show(self.machine.indicator)  # decided before it existed
        if self.prompts is not None:
            self._tasks.append(loop.create_task(self.prompts.prepare()))
        self._tasks.append(loop.create_task(self._watch(sources)))

    async def _watch(self, sources: dict[str, Source[Any]]) -> None:
        """A device down (not merely starting) shows the fault pattern while idle."""
        while True:
            self.machine.set_device_fault(any(
                s.health.state == State.DOWN and s.health.detail != "starting"
                for s in sources.values()))
            await asyncio.sleep(FAULT_CHECK_S)

    def describe(self) -> dict[str, Any]:
        return {"indicator": self.indicator.health.as_dict() if self.indicator else
                {"backend": "none", "state": "none", "detail": "no indicator configured"},
                "prompts": self.prompts.health.as_dict() if self.prompts else
                {"backend": "none", "state": "none", "detail": "no prompts (covert, "
                 "disabled or no speaker)"},
                "speaker": self.prompts.speaker.as_dict() if self.prompts else
                {"backend": "none", "state": "none", "detail": "covert: never plays" if
                 self._covert else "none configured"}}

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.prompts is not None:
            self.prompts.close()
        if self.indicator is not None:
            self.indicator.close()
