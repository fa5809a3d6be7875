"""The desk with Janus as its media plane (issue 14): a car (`dashsos run`, `whip` mode) in
one network namespace calls the reference dispatcher (`dispatch.media = "janus"`) in the
other, which publishes the car's offer into a recorded VideoRoom of Debian's Janus and
returns Janus's answer; media flows car -> Janus, the desk decodes nothing. After the
hang-up the desk turns Janus's recording into the call's media.mp4: its pictures are
the car's own, bit for bit, the same run of them as in the car's clip, with Opus audio.
A console in headless Chromium (in the desk's namespace: Janus offers no loopback
candidates) plays the call through Janus: Janus offers, the browser answers via the desk.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

import clipcheck
import janus
from browser import Browser, chromium_available, console_login
from conftest import TCP_LISTEN, descendants, free_port, inet_sockets
from dashsos.config import from_dict
from dashsos.dispatch.desk import Desk
from janus import JanusPath
from netns import CONSOLE_TOKEN, DESK_IP, DESK_PORT

pytestmark = pytest.mark.skipif(janus.available() is not None, reason=str(janus.available()))

# Where the console's open call (console.js's `watch`) gets its media from: the ICE pair in
# use, its remote end, and the video bytes received.
MEDIA_PATH_JS = """(async () => {
  const report = await watch.pc.getStats();
  const all = [...report.values()];
  const transport = all.find((s) => s.type === "transport" && s.selectedCandidatePairId);
  const pair = transport ? report.get(transport.selectedCandidatePairId) : null;
  const remote = pair ? report.get(pair.remoteCandidateId) : null;
  const video = all.find((s) => s.type === "inbound-rtp" && s.kind === "video");
  return { videoBytes: video ? video.bytesReceived : 0, pairBytes: pair ? pair.bytesReceived : 0,
    remote: remote ? { address: remote.address, port: remote.port, protocol: remote.protocol,
                       type: remote.candidateType } : null };
})()"""


def test_a_car_calls_through_the_desk_into_janus(tmp_path: Path) -> None:
    path = JanusPath(tmp_path / "net", desk=True)
    try:
        path.start_car({"call": {"mode": "whip"},
                        "incident": {"post_seconds": 6, "cancel_grace_seconds": 2}})
        pressed = time.monotonic()
        reply = path.request("trigger")
        assert reply["ok"], reply
        path._wait(lambda: any(s.get("state") == "connected" for s in path.sessions()), 20,
                   "Janus's webrtcup for the car's call")
        connected = time.monotonic() - pressed
        call_id = path.sessions()[0]["id"]
        rec_dir = tmp_path / "net" / "recordings" / call_id
        assert sorted(p.name for p in rec_dir.glob("*.mjr")) == [
            "car-audio-0.mjr", "car-video-1.mjr"]
        # The incident's window ends: the car DELETEs, the desk leaves Janus's room and
        # remuxes its recording (the call is saving), then the call has ended.
        path._wait(lambda: all(s["deleted"] for s in path.sessions()), 30, "the hang-up")
        path._wait(lambda: all(s["state"] == "ended" for s in path.sessions()), 30,
                   "the desk's recording")
        record = json.loads((rec_dir / "call.json").read_text())
        assert record["state"] == "ended", record
        assert record["end_reason"] == "car hung up", record
        clip = tmp_path / "net" / "state" / "incidents" / reply["incident"] / "clip.mp4"
        path._wait(clip.exists, 30, "the car's clip")
        desk, own = clipcheck.frame_hashes(rec_dir / "media.mp4"), clipcheck.frame_hashes(clip)
        start = own.index(desk[0])
        assert len(desk) > 60 and desk == own[start:start + len(desk)], (len(desk), len(own))
        streams = {s["codec_type"]: s for s in clipcheck.ffprobe(
            rec_dir / "media.mp4", "-show_streams")["streams"]}
        assert streams["audio"]["codec_name"] == "opus"
        assert (streams["video"]["width"], streams["video"]["height"]) == (320, 240)
        cpu, rss = path.usage()
        print(f"through Janus: press to connected {connected:.2f} s, {len(desk)} pictures "
              f"recorded bit for bit, Janus {cpu:.2f} s CPU, {rss / 1024:.0f} MB")
        _a_desk_stopped_while_saving_makes_the_recording_at_start(tmp_path, rec_dir, desk)
    finally:
        path.close()



def test_a_desk_restarted_mid_call_gets_the_car_back(tmp_path: Path) -> None:
    """The desk is killed mid-call (the car's media still flowing into Janus, unseen) and
    starts again: it ends the Janus session it left, so the car, hung up, dials again and
    is seen at once, not after Janus's 60 s session timeout; the interrupted call ends
    with what Janus recorded of it as media.mp4."""
    path = JanusPath(tmp_path / "net", desk=True)
    try:
        path.start_car({"call": {"mode": "whip"},
                        "incident": {"post_seconds": 120, "cancel_grace_seconds": 2}})
        assert path.request("trigger")["ok"]
        path._wait(lambda: any(s.get("state") == "connected" for s in path.sessions()), 20,
                   "the car's call")
        first = path.sessions()[0]["id"]
        time.sleep(3)  # some seconds recorded
        path.server.kill()
        path.server.wait()
        path.watch.close()
        started = time.monotonic()
        path.server = path._start_dispatcher(1, media="janus", janus_urls=[path.url])
        desk_up = time.monotonic() - started
        again = path._wait(lambda: next((s for s in path.sessions() if s["id"] != first
                                         and s.get("state") == "connected"), None), 20,
                           "the car's call again")
        back = time.monotonic() - started
        old = next(s for s in path.sessions() if s["id"] == first)
        assert (old["state"], old["end_reason"]) == (
            "ended", "dispatcher restarted during the call"), old
        pictures = clipcheck.frame_hashes(path.rec_dir / first / "media.mp4")
        assert len(pictures) > 60, len(pictures)
        print(f"desk restarted in {desk_up:.2f} s; the car's call back {back:.2f} s after "
              f"the restart began ({again['id']}); {len(pictures)} pictures of the "
              "interrupted call recorded")
    finally:
        path.close()


def test_a_janus_instance_that_is_down_is_passed_over(tmp_path: Path) -> None:
    """Calls spread over `janus_urls`; the first (carrying no calls, so chosen first) is
    down: the car's call goes through the next one, with no failure seen by the car."""
    path = JanusPath(tmp_path / "net")
    try:
        down = f"http://{DESK_IP}:{free_port()}/janus"  # nothing listens there
        path.server = path._start_dispatcher(1, media="janus", janus_urls=[down, path.url])
        path.start_car({"call": {"mode": "whip"},
                        "incident": {"post_seconds": 30, "cancel_grace_seconds": 2}})
        pressed = time.monotonic()
        assert path.request("trigger")["ok"]
        path._wait(lambda: any(s.get("state") == "connected" for s in path.sessions()), 20,
                   "the car's call through the Janus that is up")
        connected = time.monotonic() - pressed
        assert [s["state"] for s in path.sessions()] == ["connected"], path.sessions()
        log = (path.workdir / "dispatch.log").read_text()
        assert log.count("trying the next Janus instance") == 1, log
        assert path.status()["links"]["call"]["attempts"] == 1, path.status()["links"]
        print(f"one Janus down: the call connected {connected:.2f} s after the press")
    finally:
        path.close()

def _a_desk_stopped_while_saving_makes_the_recording_at_start(
        tmp_path: Path, rec_dir: Path, pictures: list[str]) -> None:
    """The same call's folder as a desk stopped in the middle of saving left it: Janus's
    .mjr kept, no media.mp4, call.json saying saving. The desk's next start makes it."""
    root = tmp_path / "restarted"
    folder = root / rec_dir.name
    shutil.copytree(rec_dir, folder, ignore=shutil.ignore_patterns("media.mp4"))
    record = json.loads((folder / "call.json").read_text())
    (folder / "call.json").write_text(json.dumps({**record, "state": "saving"}))
    desk = Desk(from_dict({"dispatch": {"recordings_dir": str(root), "media": "janus",
                                        "janus_urls": ["http://127.0.0.1:1/janus"]}}))
    asyncio.run(desk.load())
    assert clipcheck.frame_hashes(folder / "media.mp4") == pictures
    call = desk.past[rec_dir.name]
    assert call.state == "ended" and call.recording_error is None, call
    assert call.end_reason == "car hung up; dispatcher restarted while saving the recording"
    saved = json.loads((folder / "call.json").read_text())
    assert (saved["state"], saved["end_reason"]) == ("ended", call.end_reason)


@pytest.mark.skipif(not chromium_available(), reason="needs chromium and chromium-driver")
def test_the_console_plays_a_call_through_janus(tmp_path: Path) -> None:
    path = JanusPath(tmp_path / "net", desk=True)
    try:
        path.start_car({"call": {"mode": "whip"}})
        pressed = time.monotonic()
        assert path.request("trigger")["ok"]
        path._wait(lambda: any(s.get("state") == "connected" for s in path.sessions()), 20,
                   "Janus's webrtcup for the car's call")

        def console() -> dict[str, Any]:
            # Chromium gathers on the namespace's one interface (its loopback-only
            # switches are for the root namespace, where other interfaces exist).
            b = Browser(tmp_path / "browser", fake_audio_hz=None, loopback_only=False)
            try:
                opened = time.monotonic()
                console_login(b, f"http://{DESK_IP}:{DESK_PORT}", CONSOLE_TOKEN)
                deadline = time.monotonic() + 30
                stats: dict[str, Any] = {}
                while time.monotonic() < deadline:
                    stats = b.eval_async("window.dashsos.stats()")
                    if stats["framesDecoded"] > 30 and stats["audioPackets"] > 50:
                        break
                    time.sleep(0.2)
                stats["open_to_30_frames_s"] = round(time.monotonic() - opened, 2)
                while (media := b.eval_async(MEDIA_PATH_JS))["videoBytes"] <= 10_000 \
                        and time.monotonic() < deadline:
                    time.sleep(0.2)
                stats["media"] = media
                # While the console plays: the sockets Janus holds, and the desk and any
                # process it started.
                stats["janus_sockets"] = inet_sockets(path.janus.pid)
                stats["desk_pids"] = [path.server.pid, *descendants(path.server.pid)]
                stats["desk_sockets"] = [s for pid in stats["desk_pids"]
                                         for s in inet_sockets(pid)]
                stats["talk_disabled"] = b.eval("return document.getElementById('talk')"
                                                ".disabled")
                stats["screenshot"] = str(b.screenshot(tmp_path / "console-janus.png"))
                stats["errors"] = [e for e in b.console_log() if e.get("level") == "SEVERE"]
                return stats
            finally:
                b.close()

        stats = path.in_desk(console, timeout=90)
        print(f"console through Janus: {stats['framesDecoded']} frames and "
              f"{stats['audioPackets']} audio packets, 30 frames {stats['open_to_30_frames_s']}"
              f" s after opening the page ({time.monotonic() - pressed:.1f} s after the press)"
              f"; screenshot {stats['screenshot']}")
        assert stats["framesDecoded"] > 30 and stats["audioPackets"] > 50, stats
        assert stats["connection"] == "connected" and not stats["errors"], stats
        assert stats["talk_disabled"] is True  # nobody can talk to the car through Janus
        # The subscription is Janus's: the desk carried no media of it. The console's
        # selected ICE pair ends at one of Janus's own UDP sockets, in its RTP port range,
        # and the desk (whose HTTP listener shows these are its sockets) holds no UDP socket.
        assert not any(s.get("frames") for s in path.sessions()), path.sessions()
        media, desk = stats["media"], stats["desk_sockets"]
        remote = media["remote"]
        assert remote, media
        low, high = (int(p) for p in janus.RTP_PORTS.split("-"))
        janus_udp = sorted(s.port for s in stats["janus_sockets"] if s.proto.startswith("udp"))
        desk_udp = [s for s in desk if s.proto.startswith("udp")]
        print(f"console's media path: {media['videoBytes']} video bytes ({media['pairBytes']} "
              f"on the ICE pair) from {remote['type']} {remote['protocol']} "
              f"{remote['address']}:{remote['port']}; Janus's UDP ports {janus_udp} "
              f"(range {janus.RTP_PORTS}); desk pids {stats['desk_pids']}: {len(desk)} sockets, "
              f"{len(desk_udp)} UDP")
        assert (remote["protocol"], remote["address"]) == ("udp", DESK_IP), media
        assert low <= remote["port"] <= high and remote["port"] in janus_udp, (media, janus_udp)
        assert media["videoBytes"] > 10_000, media
        assert desk_udp == [], desk
        assert ("tcp", DESK_PORT, TCP_LISTEN) in desk, desk
    finally:
        path.close()
