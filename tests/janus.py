"""A real Janus (Debian's `janus`, 1.1.2 on bookworm) as the desk of tests/netns.py's
network path: its REST API on http://198.51.100.2:<port>/janus and only the VideoRoom.

Janus (libnice) never gathers loopback candidates, so it cannot be tested on 127.0.0.1:
it runs in the desk namespace, on the path's interface, and publishers run in the car
namespace (`in_car` runs a coroutine there). JanusPath is a NetPath without its own desk
(desk="none") that starts Janus instead, and optionally the reference dispatcher in front
of it. close() stops Janus (SIGTERM, then SIGKILL) and removes everything else NetPath
made; callers run it in a finally.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from netns import DESK_IP, NetPath
from netns import available as netns_available
from netrelay import enter

T = TypeVar("T")
HTTP_PORT = 8088
RTP_PORTS = "20000-20199"
# Debian's protected_folders, kept: rec_dir must lie outside them (tests use tmp dirs;
# a desk recording under /var must drop "/var" from this list).
PROTECTED = ["/bin", "/boot", "/dev", "/etc", "/initrd", "/lib", "/lib32", "/lib64", "/proc",
             "/sbin", "/sys", "/usr", "/var"]


def libdir() -> Path | None:
    """Where Debian put the plugins and transports (the multiarch triplet varies)."""
    found = sorted(Path("/usr/lib").glob("*/janus/plugins/libjanus_videoroom.so"))
    return found[0].parent.parent if found else None


def available() -> str | None:
    """Why Janus cannot be tested here (None: it can)."""
    if (reason := netns_available()) is not None:
        return reason
    if not shutil.which("janus") or not shutil.which("janus-pp-rec") or libdir() is None:
        return "needs Janus: apt-get install janus janus-tools"
    return None


def _others(folder: Path, keep: str) -> str:
    """Every module in `folder` but `keep`, as Janus's `disable` list wants them."""
    return ",".join(sorted(p.name for p in folder.glob("*.so") if p.name != keep))


class JanusPath(NetPath):
    """The path with Janus in the desk namespace; with `desk`, the reference dispatcher
    there too, carrying calls through this Janus (`dispatch.media = "janus"`)."""

    def __init__(self, workdir: Path, port: int = HTTP_PORT, *, desk: bool = False,
                 cars: int = 1) -> None:
        self.port = port
        self.config_dir = workdir / "janus"
        self.rec_dir = workdir / "recordings"
        self.log = workdir / "janus.log"
        super().__init__(workdir, desk="none")
        self.desk = "janus"
        try:
            self.janus = self._start_janus()
            if desk:
                self.server = self._start_dispatcher(cars, media="janus",
                                                     janus_urls=[self.url])
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"http://{DESK_IP}:{self.port}/janus"

    def _configure(self) -> None:
        lib = libdir()
        assert lib is not None
        self.config_dir.mkdir()
        self.rec_dir.mkdir(exist_ok=True)
        protected = ", ".join(f'"{p}"' for p in PROTECTED)
        (self.config_dir / "janus.jcfg").write_text(f"""\
general: {{
    configs_folder = "{self.config_dir}"
    plugins_folder = "{lib / 'plugins'}"
    transports_folder = "{lib / 'transports'}"
    events_folder = "{lib / 'events'}"
    loggers_folder = "{lib / 'loggers'}"
    debug_level = 4
    server_name = "dashsos-test"
    interface = "{DESK_IP}"  # the SDP's address: without a default route Janus finds none
    protected_folders = [{protected}]
}}
media: {{
    rtp_port_range = "{RTP_PORTS}"
}}
nat: {{
    ice_enforce_list = "{self.desk_if}"
    ignore_mdns = true
}}
plugins: {{
    disable = "{_others(lib / 'plugins', 'libjanus_videoroom.so')}"
}}
transports: {{
    disable = "{_others(lib / 'transports', 'libjanus_http.so')}"
}}
loggers: {{
    disable = "{_others(lib / 'loggers', '')}"
}}
events: {{
    broadcast = false
}}
""")
        (self.config_dir / "janus.transport.http.jcfg").write_text(f"""\
general: {{
    json = "compact"
    base_path = "/janus"
    http = true
    port = {self.port}
    ip = "{DESK_IP}"
    https = false
}}
admin: {{
    admin_http = false
    admin_https = false
}}
""")
        # No static rooms: the desk creates them through the API.
        (self.config_dir / "janus.plugin.videoroom.jcfg").write_text("general: {\n}\n")

    def _start_janus(self) -> subprocess.Popen[bytes]:
        self._configure()
        process = self._spawn(self.desk_ns, self.log.name, [
            "janus", "-C", str(self.config_dir / "janus.jcfg"), "-F", str(self.config_dir),
            "--disable-colors"])
        self._wait(lambda: b"HTTP webserver started" in self.log.read_bytes()
                   or process.poll() is not None, 20, "Janus's HTTP transport")
        if process.poll() is not None:
            raise RuntimeError(f"janus exited:\n{self.log.read_text(errors='replace')}")
        return process

    def usage(self) -> tuple[float, int]:
        """Janus's CPU time so far (seconds) and its resident memory (KiB)."""
        pid = self.janus.pid
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return cpu, rss

    def in_car(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60) -> T:
        """Run the coroutine `make()` on an event loop in a thread inside the car namespace
        (setns is per thread: the test's own thread stays where it is)."""
        return self.in_namespace(self.car_ns, lambda: asyncio.run(
            asyncio.wait_for(make(), timeout)), timeout)

    def in_desk(self, work: Callable[[], T], timeout: float = 60) -> T:
        """Run `work()` in a thread inside the desk namespace; processes it starts (a
        browser) live there too."""
        return self.in_namespace(self.desk_ns, work, timeout)

    def in_namespace(self, ns: str, work: Callable[[], T], timeout: float) -> T:
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                enter(f"/var/run/netns/{ns}")
                result["value"] = work()
            except BaseException as exc:  # handed to the caller's thread
                result["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(timeout + 10)
        if "error" in result:
            raise result["error"]
        if "value" not in result:
            raise TimeoutError(f"the work in {ns} did not finish")
        value: T = result["value"]
        return value

    def stop_janus(self) -> None:
        """SIGTERM (Janus closes its recordings), SIGKILL if it lingers."""
        janus = getattr(self, "janus", None)
        if janus is None or janus.poll() is not None:
            return
        try:
            os.killpg(janus.pid, signal.SIGTERM)
            janus.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(janus.pid, signal.SIGKILL)
            janus.wait(5)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        try:
            self.stop_janus()
        finally:
            super().close()  # the relay, any process left, the namespaces


def convert(mjr: Path, target: Path) -> Path:
    """janus-pp-rec: an .mjr recording to a playable file (no transcoding)."""
    subprocess.run(["janus-pp-rec", str(mjr), str(target)], check=True, capture_output=True,
                   timeout=60)
    return target
