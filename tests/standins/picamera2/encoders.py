"""Stand-in for picamera2.encoders (signatures of picamera2 0.3.x)."""

from __future__ import annotations

import threading
from typing import Any


class H264Encoder:
    def __init__(self, bitrate: int | None = None, repeat: bool = True,
                 iperiod: int | None = None, framerate: float | None = None,
                 enable_sps_framerate: bool = False, qp: int | None = None,
                 profile: str | None = None) -> None:
        if profile is not None and profile.lower() not in ("baseline", "main", "high"):
            raise RuntimeError(f"{profile} profile not supported")
        self.bitrate, self.repeat, self.iperiod, self.profile = bitrate, repeat, iperiod, profile
        self._key = threading.Event()
        self.forced: list[Any] = []

    def force_key_frame(self) -> None:
        self._key.set()
        self.forced.append(True)

    def _take_key_frame(self) -> bool:
        if self._key.is_set():
            self._key.clear()
            return True
        return False
