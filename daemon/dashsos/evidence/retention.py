"""Keeping the SD card from filling: delete the oldest incidents the dispatcher already has.

An incident is only ever deleted once it is uploaded (upload.json says so) or acknowledged
(incident.json says so). Evidence nobody else holds stays, even over quota.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import fsync_dir

log = logging.getLogger(__name__)

# Module level so tests can stand in for a filesystem of any size.
disk_usage = shutil.disk_usage

DELETING_SUFFIX = ".deleting"
_STAMP = re.compile(r"^(\d{8}T\d{6}Z)")


@dataclass(frozen=True)
class Quota:
    max_bytes: int  # total bytes incidents may use (0 = no byte limit)
    max_percent: float  # of the filesystem's size incidents may use (0 = no limit)
    min_free_bytes: int  # always leave this much free on the filesystem


@dataclass
class PruneReport:
    used_bytes: int
    limit_bytes: int  # 0 = no limit
    free_bytes: int
    pruned: list[str] = field(default_factory=list)
    kept_unsafe: list[str] = field(default_factory=list)
    over_quota: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Incident:
    id: str
    path: Path
    bytes: int
    order: tuple[float, float, str]
    safe: bool


def incident_bytes(directory: Path) -> int:
    total = 0
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed while we looked
        if stat.S_ISDIR(st.st_mode):
            total += incident_bytes(Path(entry.path))
        elif stat.S_ISREG(st.st_mode):
            total += st.st_size
    return total


def limit_bytes(quota: Quota, fs_total: int) -> int:
    limits = []
    if quota.max_bytes > 0:
        limits.append(quota.max_bytes)
    if quota.max_percent > 0:
        limits.append(int(fs_total * quota.max_percent / 100))
    return min(limits) if limits else 0


def prune(incidents_dir: Path, quota: Quota, *, open_ids: AbstractSet[str] = frozenset(),
          now: float | None = None) -> PruneReport:
    """Delete uploaded incidents, oldest first, until usage and free space are within quota.

    `now` (epoch seconds) only dates the log lines; tests pass it to stay deterministic.
    """
    now = time.time() if now is None else now
    if not incidents_dir.is_dir():
        usage = disk_usage(_existing_ancestor(incidents_dir))
        return PruneReport(0, limit_bytes(quota, usage.total), usage.free)
    _finish_deleting(incidents_dir)
    incidents = sorted(_scan(incidents_dir, open_ids), key=lambda i: i.order)
    usage = disk_usage(incidents_dir)
    report = PruneReport(used_bytes=sum(i.bytes for i in incidents),
                         limit_bytes=limit_bytes(quota, usage.total), free_bytes=usage.free)

    def over() -> bool:
        too_big = report.limit_bytes > 0 and report.used_bytes > report.limit_bytes
        return too_big or report.free_bytes < quota.min_free_bytes

    for incident in incidents:
        if not over():
            break
        if not incident.safe:
            report.kept_unsafe.append(incident.id)
            continue
        if _delete(incident, now):
            report.pruned.append(incident.id)
            report.used_bytes -= incident.bytes
            # An estimate: the filesystem rounds up to blocks, so at least this much is freed.
            report.free_bytes += incident.bytes
    report.over_quota = over()
    if report.over_quota:
        log.warning("incidents use %d bytes (limit %d, %d free): %d not yet uploaded, kept",
                    report.used_bytes, report.limit_bytes, report.free_bytes,
                    len(report.kept_unsafe))
    return report


def space_for_recording(incidents_dir: Path, quota: Quota, needed_bytes: int) -> bool:
    """Advice only: the recorder records anyway, because evidence beats quota."""
    free = disk_usage(_existing_ancestor(incidents_dir)).free
    return free - needed_bytes >= quota.min_free_bytes


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _scan(incidents_dir: Path, open_ids: AbstractSet[str]) -> list[_Incident]:
    found = []
    for entry in os.scandir(incidents_dir):
        # Hidden names are ours (.<id>.deleting) or someone's temporary; not incidents.
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        stamp = _stamp(entry.name)
        safe = entry.name not in open_ids and _delivered(path)
        found.append(_Incident(entry.name, path, incident_bytes(path),
                               (mtime if stamp is None else stamp, mtime, entry.name), safe))
    return found


def _stamp(incident_id: str) -> float | None:
    match = _STAMP.match(incident_id)
    if not match:
        return None
    try:
        return datetime.strptime(match[1], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def _delivered(directory: Path) -> bool:
    """True only on a clear yes; an unreadable or odd marker keeps the evidence."""
    upload = _read_json(directory / "upload.json")
    if upload is not None and upload.get("uploaded") is True:
        return True
    record = _read_json(directory / "incident.json")
    return record is not None and record.get("acknowledged") is True


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _delete(incident: _Incident, now: float) -> bool:
    parent = incident.path.parent
    doomed = parent / f".{incident.id}{DELETING_SUFFIX}"
    try:
        # Renamed first, durably: after a power cut the incident is either whole or
        # clearly on its way out, never a half-deleted directory that looks like evidence.
        os.rename(incident.path, doomed)
        fsync_dir(parent)
    except OSError as exc:
        log.error("cannot prune incident %s: %s", incident.id, exc)
        return False
    age_h = (now - incident.order[0]) / 3600
    log.warning("pruning incident %s (%d bytes, %.1f h old, uploaded)", incident.id,
                incident.bytes, age_h)
    _remove(doomed)
    return True


def _finish_deleting(incidents_dir: Path) -> None:
    for entry in os.scandir(incidents_dir):
        if entry.name.startswith(".") and entry.name.endswith(DELETING_SUFFIX) \
                and entry.is_dir(follow_symlinks=False):
            log.warning("finishing interrupted deletion of %s", entry.name)
            _remove(Path(entry.path))


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as exc:
        # Left under its .deleting name; the next prune tries again.
        log.error("cannot remove %s: %s", path, exc)


class Retention:
    """Prunes after every saved incident and at start; status shows the last report."""

    def __init__(self, incidents_dir: Path, quota: Quota,
                 open_ids: Callable[[], AbstractSet[str]] = frozenset) -> None:
        self._dir = incidents_dir
        self._quota = quota
        self._open_ids = open_ids
        self.report: PruneReport | None = None

    def prune(self) -> None:
        try:
            self.report = prune(self._dir, self._quota, open_ids=self._open_ids())
        except OSError as exc:  # a storage fault is a state (status), not a crash
            STATE.failed(exc, "retention")
            return
        if self.report.over_quota:
            log.warning("storage over quota with incidents not yet uploaded: %s",
                        ", ".join(self.report.kept_unsafe))
