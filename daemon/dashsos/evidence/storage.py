"""The evidence directory at start: created, the device key loaded, and whatever a power
cut left open finished and signed before anything new records."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dashsos.evidence.recorder import sign
from dashsos.evidence.recovery import recover
from dashsos.evidence.signing import DeviceKey


def prepare(storage: Path, vehicle_id: str) -> tuple[DeviceKey, list[dict[str, Any]]]:
    """The device key and the records of recovered incidents."""
    incidents = storage / "incidents"
    incidents.mkdir(parents=True, exist_ok=True)
    # The device key signs every incident; a desk pins its fingerprint.
    key = DeviceKey.load_or_create(storage / "device.key")
    recovered = recover(incidents)
    # Recovered incidents, and any a power cut caught between saving and signing.
    for directory in sorted(incidents.iterdir()):
        if directory.is_dir() and not directory.name.startswith(".") \
                and not (directory / "manifest.sig").exists():
            sign(directory, key, vehicle_id)
    return key, recovered
