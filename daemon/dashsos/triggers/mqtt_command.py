"""Commands from the fleet over MQTT: verified (HMAC, fresh, not replayed), executed,
answered on cmd/<name>/reply. A remote trigger turns on a camera and a call: every
refusal says why, and every command is logged with its nonce, never with its key."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashsos.fleet.commands import CommandRefused, CommandVerifier, reply_payload
from dashsos.fleet.mqtt import FleetLink
from dashsos.incident import IncidentMachine

log = logging.getLogger(__name__)


class CommandHandler:
    def __init__(self, verifier: CommandVerifier, allowed: tuple[str, ...],
                 machine: IncidentMachine, status: Callable[[], dict[str, Any]]) -> None:
        self._verifier = verifier
        storage = getattr(status, "storage", None)
        if storage is not None:  # nonces survive a restart: no replay inside the skew window
            verifier.persist_to(Path(storage) / "command-nonces")
        self._allowed = allowed
        self._machine = machine
        self._status = status
        self.link: FleetLink | None = None
        self.handled = 0
        self.refused = 0

    def __call__(self, name: str, payload: bytes) -> None:
        nonce: str | None = None
        try:
            command = self._verifier.verify(name, payload)
            nonce = command.nonce
            if name not in self._allowed:
                raise CommandRefused("not_allowed", f"{name} is not allowed on this car")
            result = self._execute(name, nonce, command.args)
            reply = reply_payload(nonce, True, result=result)
            self.handled += 1
            log.warning("mqtt command %s (nonce %s) done: %s", name, nonce, result)
        except CommandRefused as refused:
            self.refused += 1
            nonce = nonce or getattr(refused, "nonce", None)
            log.warning("mqtt command %s refused: %s %s", name, refused.code, refused.message)
            reply = reply_payload(nonce, False, error=refused)
        except Exception as exc:  # never let a command take the daemon down
            self.refused += 1
            log.exception("mqtt command %s failed", name)
            reply = reply_payload(nonce, False, error=f"internal error: {type(exc).__name__}")
        if self.link is not None:
            self.link.publish(self.link.topics.reply(name), reply, qos=1)

    def _execute(self, name: str, nonce: str, args: dict[str, Any]) -> dict[str, Any]:
        source = f"mqtt command {nonce}"
        if name in ("trigger", "test_call"):
            incident, outcome = self._machine.trigger("mqtt", source, test=name == "test_call")
            return {"outcome": outcome, "incident": incident.id if incident else None}
        if name == "cancel":
            pin = args.get("pin")  # the duress PIN: answered like a cancel
            ok, reason = self._machine.cancel(source, pin=pin if isinstance(pin, str) else None)
            if not ok:
                raise CommandRefused("refused", reason)
            return {"outcome": reason}
        if name == "status":
            return {"status": self._status()}
        raise CommandRefused("unknown_command", f"no command {name!r}")
