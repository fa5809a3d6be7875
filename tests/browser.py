"""Debian's headless Chromium driven through Selenium: the dispatcher's browser in tests.

Nothing here downloads a browser or a driver: chromedriver is given by path, so Selenium
Manager is never run (and SE_OFFLINE is set in case a future Selenium runs it anyway).
The fake camera is Chromium's test pattern; the fake microphone plays a generated sine
(looped WAV) so a test can find a known frequency in what reaches the other side.

Loopback only. By default Chromium gathers ICE candidates on every interface (the machine's
eth0 too) and, even when a page signals only its 127.0.0.1 candidates, checks sent from
the eth0 socket make the other side answer to the machine's own address (a peer-reflexive
candidate). So the browser runs with `--webrtc-ip-handling-policy=default_public_interface_only`:
no adapter enumeration, sockets bound to 0.0.0.0 and no host candidates at all; its only
candidates are server-reflexive ones from a STUN server on 127.0.0.1 (StunServer below,
or coturn, which answers STUN too) or relayed ones from a TURN server on 127.0.0.1. Every
packet it sends then goes to 127.0.0.1, from 127.0.0.1. A page must therefore always be
given such an iceServers list: with none it gathers no candidate and never connects.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1280, 900)
FAKE_AUDIO_RATE = 48_000

# Selenium Manager is skipped when the driver's path is given; should it run all the same,
# offline mode forbids it any download and the statistics it would otherwise send.
os.environ.setdefault("SE_OFFLINE", "true")
os.environ.setdefault("SE_AVOID_STATS", "true")

# Exactly the switches of FIELD-NOTES.md ("Headless Chromium as the dispatcher's browser").
BASE_SWITCHES = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)
# Keeps WebRTC off the machine's other addresses (see the module's docstring), and the
# browser off the network: despite the switches above, Debian's Chromium looks up
# clients2.google.com, update.googleapis.com, accounts.google.com and
# start.duckduckgo.com at startup (DNS to the machine's resolver). With these it resolves
# no name but localhost (IP literals need no resolving) and tries no proxy discovery.
LOOPBACK_SWITCHES = (
    "--webrtc-ip-handling-policy=default_public_interface_only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.*",
    "--no-proxy-server",
)


def chromium_available() -> bool:
    """Chromium, its driver and Selenium are all installed."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return all(os.access(p, os.X_OK) for p in (CHROMIUM, CHROMEDRIVER))


def write_sine_wav(path: Path, hz: float, seconds: float = 1.0,
                   rate: int = FAKE_AUDIO_RATE, amplitude: float = 0.5) -> Path:
    """A mono 16-bit WAV of a sine. With a whole number of cycles in the file (880 Hz in
    1 s) Chromium's looping of it is seamless."""
    n = int(rate * seconds)
    peak = amplitude * 32767
    frames = b"".join(struct.pack("<h", round(peak * math.sin(2 * math.pi * hz * i / rate)))
                      for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return path


class BrowserError(RuntimeError):
    """A script in the page threw or rejected."""


class Browser:
    """One headless Chromium with a fresh profile under `workdir`.

    `fake_audio_hz`: the fake microphone plays a looped sine of that frequency; None keeps
    Chromium's own fake audio (a short beep every second).
    `loopback_only`: see the module's docstring; False only to study Chromium's default
    gathering (it then sends to the machine's own non-loopback addresses)."""

    def __init__(self, workdir: Path, *, fake_audio_hz: float | None = 880.0,
                 loopback_only: bool = True) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir))
        self.fake_audio: Path | None = None
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for switch in BASE_SWITCHES + (LOOPBACK_SWITCHES if loopback_only else ()):
            options.add_argument(switch)
        options.add_argument(f"--user-data-dir={self.profile}")
        options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
        if fake_audio_hz is not None:
            self.fake_audio = write_sine_wav(self.workdir / f"fake-mic-{fake_audio_hz:g}hz.wav",
                                             fake_audio_hz)
            # Without a "%noloop" suffix Chromium loops the file for as long as it captures.
            options.add_argument(f"--use-file-for-fake-audio-capture={self.fake_audio}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver_log = self.workdir / "chromedriver.log"
        service = Service(executable_path=CHROMEDRIVER, log_output=str(self.driver_log))
        started = time.monotonic()
        self.driver: webdriver.Chrome = webdriver.Chrome(service=service, options=options)
        self.launch_seconds = time.monotonic() - started
        self._console: list[dict[str, Any]] = []

    def open(self, url: str) -> None:
        self.driver.get(url)

    def eval(self, js: str, *args: Any) -> Any:
        """Run `js` as a function body (use `return`); `arguments[i]` are `args`."""
        return self.driver.execute_script(js, *args)

    def eval_async(self, js_returning_promise: str, timeout: float = 20) -> Any:
        """Await a JS expression (a promise or a plain value) and return its value; a
        rejection raises BrowserError with the JS message and stack."""
        script = (
            "const done = arguments[arguments.length - 1];\n"
            "(async () => await (\n" + js_returning_promise + "\n))().then(\n"
            "  (value) => done({ok: true, value: value === undefined ? null : value}),\n"
            "  (e) => done({ok: false, error: String((e && e.stack) || e)}));"
        )
        self.driver.set_script_timeout(timeout)
        result = self.driver.execute_async_script(script)
        if not result["ok"]:
            raise BrowserError(result["error"])
        return result["value"]

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise BrowserError(f"screenshot to {path} failed")
        return path

    def console_log(self) -> list[dict[str, Any]]:
        """Every console message of the browser so far (chromedriver hands each out once;
        they are kept here). Entries: level, message ('URL LINE:COL "text" ...'), source,
        timestamp."""
        self._console.extend(self.driver.get_log("browser"))
        return list(self._console)

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)


class StunServer:
    """A minimal STUN server (RFC 5389 Binding only) on 127.0.0.1 in a thread: all that a
    loopback-only Chromium needs to have a candidate (127.0.0.1:port, typ srflx)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port: int = self.sock.getsockname()[1]
        self.requests = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stun", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"stun:127.0.0.1:{self.port}"

    def _serve(self) -> None:
        cookie = 0x2112A442
        while not self._stop.is_set():
            try:
                data, (host, port) = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            if len(data) < 20 or data[:2] != b"\x00\x01" or data[4:8] != cookie.to_bytes(4):
                continue
            self.requests += 1
            ip = struct.unpack("!I", socket.inet_aton(host))[0] ^ cookie
            xor_mapped = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, port ^ (cookie >> 16), ip)
            reply = struct.pack("!HHI", 0x0101, len(xor_mapped), cookie) + data[8:20] + xor_mapped
            self.sock.sendto(reply, (host, port))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def __enter__(self) -> StunServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def browser(workdir: Path, **kw: Any) -> Iterator[Browser]:
    b = Browser(workdir, **kw)
    try:
        yield b
    finally:
        b.close()


def console_login(b: Browser, url: str, token: str, timeout: float = 15) -> None:
    """Open the dispatcher's console at `url` (its root) and log in through its form, as an
    operator does: the token typed into the password field, never put in a URL."""
    from selenium.webdriver.common.by import By

    b.open(url.rstrip("/") + "/")
    deadline = time.monotonic() + timeout
    while b.eval("return document.getElementById('login').hidden") is not False:
        if time.monotonic() > deadline:
            raise BrowserError("the console's login form never showed")
        time.sleep(0.05)
    b.driver.find_element(By.ID, "login-token").send_keys(token)
    b.driver.find_element(By.ID, "login-submit").click()
    while b.eval("return document.getElementById('console').hidden") is not False:
        if time.monotonic() > deadline:
            error = b.eval("return document.getElementById('login-error').textContent")
            raise BrowserError(f"console login failed: {error!r}")
        time.sleep(0.05)
