"""Spoken prompts (a `Prompt` effect) on the call's speaker, and the call's speakers
muted on a duress cancel (a `MuteSpeaker` effect).

Prompts are rendered once by espeak-ng into WAV files under `<state dir>/cache/prompts/`
(named by a hash of voice, speed and text, so a changed text renders again) and played
through PortAudio on `call.speaker` by a child process (play.py), one at a time, in
order, with a breath between two. They never talk over the dispatcher: a prompt waits
while the call's speaker plays the dispatcher's audio (only "connected", said as the
call's audio starts, goes at once). No espeak-ng or no output device is a status
warning; the incident never notices.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from dashsos.call.talkback import Speaker
from dashsos.config import PromptsConfig
from dashsos.effects import Effect, MuteSpeaker, Prompt
from dashsos.health import Health, State

log = logging.getLogger(__name__)
NAMES = ("calling", "connected", "cancelled", "no_connection", "test")
AT_ONCE = ("connected",)
PAUSE_S = 0.6
PLAY_TIMEOUT_S = 20.0
# A player must not outlive the daemon (killed mid-prompt): setpriv (util-linux) ties
# its life to ours before Python starts; the player checks again once it runs, which
# without setpriv is only after importing this package (a quarter of a second).
SETPRIV = shutil.which("setpriv")


def player_command(path: Path, device: str) -> list[str]:
    command = [sys.executable, "-m", "dashsos.feedback.play", str(path), device,
               str(os.getpid())]
    return [SETPRIV, "--pdeathsig", "KILL", *command] if SETPRIV else command


class SpeakerGate:
    """Wraps the device factory's speaker maker: remembers the call's speakers (is the
    dispatcher playing?) and closes them (mutes) on a duress cancel, new ones at birth."""

    def __init__(self, new: Callable[[], Speaker] | None) -> None:
        self._new = new
        self.speakers: list[Speaker] = []
        self.muted = False

    def factory(self) -> Callable[[], Speaker] | None:
        if self._new is None:
            return None
        new = self._new

        def make() -> Speaker:
            speaker = new()
            if self.muted:
                speaker.close()  # consumes the dispatcher's track, plays nothing
            self.speakers = [*self.speakers[-1:], speaker]
            return speaker

        return make

    @property
    def dispatcher_playing(self) -> bool:
        return any(s.writing for s in self.speakers)

    def handle(self, effect: Effect) -> None:
        match effect:
            case MuteSpeaker(muted):
                self.muted = muted
                if muted:
                    for speaker in self.speakers:
                        speaker.close()


class PromptPlayer:
    def __init__(self, config: PromptsConfig, cache: Path, device: str,
                 gate: SpeakerGate) -> None:
        self.config = config
        self.cache = cache
        self.device = device
        self.gate = gate
        self.health = Health("espeak-ng")
        self.speaker = Health("pyaudio")  # what the last prompt found on call.speaker
        self.speaker.set(State.OK, f"{device or 'default device'}, not used yet")
        self.said: list[str] = []  # prompts played, in order, for status and tests
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._child: asyncio.subprocess.Process | None = None
        if shutil.which("espeak-ng") is None:
            self.health.set(State.DOWN, "espeak-ng not installed: no spoken prompts")
            log.warning("prompts: espeak-ng not installed (apt install espeak-ng)")
        else:
            self.health.set(State.OK, "ready")

    def handle(self, effect: Effect) -> None:
        match effect:
            case Prompt(name) if self.config.enabled:
                self._queue.put_nowait(name)
                if self._task is None or self._task.done():
                    self._task = asyncio.get_running_loop().create_task(self._run())

    def text(self, name: str) -> str:
        return str(getattr(self.config, name))

    def path(self, name: str) -> Path:
        key = f"{self.config.language}|{self.config.speed}|{self.text(name)}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.cache / f"{name}-{digest}.wav"

    async def render(self, name: str) -> Path | None:
        path = self.path(name)
        if path.exists():
            return path
        if shutil.which("espeak-ng") is None:
            return None
        self.cache.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        proc = await asyncio.create_subprocess_exec(
            "espeak-ng", "-v", self.config.language, "-s", str(self.config.speed),
            "-w", str(partial), self.text(name), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            self.health.set(State.DOWN, f"espeak-ng failed: {err.decode(errors='replace')}")
            return None
        partial.replace(path)
        return path

    async def prepare(self) -> None:
        """Render every prompt now (at start), so the first press does not wait for it."""
        for name in NAMES:
            try:
                await self.render(name)
            except Exception as exc:
                self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")

    async def _run(self) -> None:
        while not self._queue.empty():
            name = self._queue.get_nowait()
            try:
                path = await self.render(name)
                if path is None:
                    continue
                while name not in AT_ONCE and self.gate.dispatcher_playing:
                    await asyncio.sleep(0.1)  # never over the dispatcher's voice
                try:
                    await self._play(path)
                except OSError as exc:
                    self.speaker.set(State.DOWN, str(exc))
                    raise
                self.speaker.set(State.OK, f"{self.device or 'default device'}: "
                                 f"said {name!r}")
                self.said.append(name)
                await asyncio.sleep(PAUSE_S)  # a breath between two prompts
                self.health.set(State.OK, f"said {name!r}")
            except Exception as exc:  # no device: a warning, the incident goes on
                self.health.set(State.DOWN, f"{type(exc).__name__}: {exc}")
                log.warning("prompt %s not played: %s", name, exc)

    async def _play(self, path: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            *player_command(path, self.device),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        self._child = proc
        try:
            _, err = await asyncio.wait_for(proc.communicate(), PLAY_TIMEOUT_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise OSError("the sound device hung") from None
        finally:
            self._child = None
        if proc.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise OSError(lines[-1] if lines else f"player exited {proc.returncode}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._child is not None and self._child.returncode is None:
            self._child.kill()
