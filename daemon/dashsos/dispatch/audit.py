"""The operators' audit log: one JSON line per action in <recordings_dir>/audit.jsonl.

Each line is written and flushed as the action happens, so a crash loses none that were
answered; the log is only ever appended to. The latest lines are kept in memory for
GET /api/audit.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from pathlib import Path
from typing import Any

from dashsos.dispatch.record import now_iso

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.jsonl"
RECENT = 1000  # lines GET /api/audit can give


class AuditLog:
    def __init__(self, root: Path) -> None:
        self.path = root / AUDIT_FILE
        self._recent: deque[dict[str, Any]] = deque(maxlen=RECENT)

    def load(self) -> None:
        """The tail of the file from earlier runs, so /api/audit survives a restart."""
        try:
            with self.path.open(encoding="utf-8") as f:
                for line in deque(f, maxlen=RECENT):
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        continue  # a line cut short by a power cut
                    if isinstance(entry, dict):
                        self._recent.append(entry)
        except FileNotFoundError:
            pass

    def add(self, action: str, operator: str | None, address: str | None, *,
            call: str | None = None, incident: str | None = None,
            **detail: Any) -> dict[str, Any]:
        entry: dict[str, Any] = {"time": now_iso(), "operator": operator, "action": action,
                                 "call": call, "incident": incident, "address": address}
        entry.update({k: v for k, v in detail.items() if v is not None})
        line = json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
        except OSError as exc:  # the action stands; the operator must not be blocked
            log.error("audit: cannot write %s: %s (%s)", self.path, exc, line.strip())
        self._recent.append(entry)
        return entry

    def recent(self, limit: int = 200) -> list[dict[str, Any]]:
        """The latest entries, oldest first."""
        return list(self._recent)[-limit:] if limit > 0 else []
