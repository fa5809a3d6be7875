"""Play one WAV file through PortAudio: `python -m dashsos.feedback.play FILE [DEVICE]`.

Prompts play in a child process: PortAudio's initialisation is not thread-safe (two
`PyAudio()` at once, the call's speaker thread and a prompt, abort the process), and a
sound driver that hangs or aborts must never take the recorder with it.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import sys
import wave
from typing import Any

from dashsos.media import portaudio

PR_SET_PDEATHSIG = 1
CHUNK = 1024
PREROLL_CHUNKS = 4


def play(path: str, device: str) -> None:
    pyaudio = importlib.import_module("pyaudio")
    pa: Any = pyaudio.PyAudio()
    try:
        with wave.open(path, "rb") as wav:
            stream = pa.open(format=pa.get_format_from_width(wav.getsampwidth()),
                             channels=wav.getnchannels(), rate=wav.getframerate(),
                             output=True,
                             output_device_index=portaudio.device_index(pa, device,
                                                                        output=True))
            try:
                # Silence first: some ALSA/PulseAudio paths stall for a second or two
                # around their third write; better before the words than in them.
                silence = b"\0" * (CHUNK * wav.getsampwidth() * wav.getnchannels())
                for _ in range(PREROLL_CHUNKS):
                    stream.write(silence)
                while data := wav.readframes(CHUNK):
                    stream.write(data)
            finally:
                stream.stop_stream()
                stream.close()
    finally:
        pa.terminate()


def die_with_parent(parent: int) -> None:
    """A daemon killed mid-prompt must not leave its player behind (Linux only)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)


def main() -> int:
    die_with_parent(int(sys.argv[3]) if len(sys.argv) > 3 else os.getppid())
    try:
        play(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "")
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
