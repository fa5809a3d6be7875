"""The evidence directory at start: created, the device key loaded, and whatever a power
cut left open finished and signed before anything new records. A storage that cannot
be written does not stop the daemon (diskstate holds the storage's state)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dashsos.evidence.diskstate import STATE
from dashsos.evidence.files import make_dirs
from dashsos.evidence.recorder import sign
from dashsos.evidence.recovery import recover
from dashsos.evidence.signing import DeviceKey

log = logging.getLogger(__name__)


def prepare(storage: Path, vehicle_id: str) -> tuple[DeviceKey, list[dict[str, Any]]]:
    """The device key and the records of recovered incidents. A storage that cannot be
    written (read-only, full, failing) does not stop the daemon: it runs with a key in
    memory, calls and publishes, and status says so."""
    incidents = storage / "incidents"
    try:
        make_dirs(incidents)
        # The device key signs every incident; a desk pins its fingerprint.
        key = DeviceKey.load_or_create(storage / "device.key")
    except OSError as exc:
        STATE.failed(exc, f"preparing {storage}")
        try:
            key = DeviceKey.load_or_create(storage / "device.key")
        except (OSError, ValueError):
            key = DeviceKey.generate()
            log.error("device key not stored: this run signs with a key in memory (%s)",
                      key.fingerprint)
        return key, []
    try:
        recovered = recover(incidents)
        # Recovered incidents, and any a power cut caught between saving and signing.
        for directory in sorted(incidents.iterdir()):
            if directory.is_dir() and not directory.name.startswith(".") \
                    and not (directory / "manifest.sig").exists():
                sign(directory, key, vehicle_id)
    except OSError as exc:
        STATE.failed(exc, "recovering incidents")
        return key, []
    return key, recovered
