"""Finding a PortAudio device by the name in the config (pyaudio is imported by callers)."""

from __future__ import annotations

from typing import Any


def device_index(pa: Any, name: str | None, *, output: bool) -> int | None:
    """PortAudio's index for a configured device: None for the default, a number as
    given, else the first device whose name contains `name` and that can play (output)
    or record."""
    if not name:
        return None
    if name.isdigit():
        return int(name)
    channels = "maxOutputChannels" if output else "maxInputChannels"
    for i in range(pa.get_device_count()):
        info = pa.get_device_info_by_index(i)
        if name in str(info.get("name")) and info.get(channels, 0) > 0:
            return i
    raise OSError(f"no {'output' if output else 'input'} device matching {name!r}")
