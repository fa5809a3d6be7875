"""The control socket's commands: trigger, test, cancel, status. The socket itself
(control_socket.py) knows nothing of incidents; this maps a request to the machine."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dashsos import clock
from dashsos.incident import Incident, IncidentMachine


class LocalCommands:
    def __init__(self, machine: IncidentMachine, status: Callable[[], dict[str, Any]],
                 directory: Callable[[Incident], Path],
                 durable: Callable[[Incident], Awaitable[None]] | None = None) -> None:
        self._machine = machine
        self._status = status
        self._directory = directory
        self._durable = durable

    def __call__(self, request: dict[str, Any],
                 peer: str) -> dict[str, Any] | Awaitable[dict[str, Any]]:
        cmd = request["cmd"]
        if cmd in ("trigger", "test"):
            incident, outcome = self._machine.trigger("local", peer, test=cmd == "test")
            if incident is None:  # shutting down
                return {"ok": False, "error": f"trigger {outcome}: the daemon is stopping"}
            reply = {"ok": True, "incident": incident.id, "opened": outcome == "opened",
                     "directory": str(self._directory(incident)),
                     "ends": clock.iso(incident.end_ns)}
            return reply if self._durable is None else self._when_durable(incident, reply)
        if cmd == "cancel":
            pin = request.get("pin")
            ok, reason = self._machine.cancel(peer, pin=pin if isinstance(pin, str) else None)
            return {"ok": ok, "result": reason} if ok else {"ok": False, "error": reason}
        if cmd == "status":
            return {"ok": True, "status": self._status()}
        return {"ok": False, "error": f"unknown command {cmd!r} "
                                      "(known: trigger, test, cancel, status)"}

    async def _when_durable(self, incident: Incident, reply: dict[str, Any]) -> dict[str, Any]:
        """The answer waits for the pre-window to be on the medium: "answered" must
        mean a power cut now keeps it (issue 12)."""
        assert self._durable is not None
        await self._durable(incident)
        return reply
