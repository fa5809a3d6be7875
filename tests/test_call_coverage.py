"""The call through coverage gaps on a real, impaired network path (issue 11): a car and
a desk in two network namespaces, a userspace netem for a mobile link (300 ms RTT, 5 %
loss, 1 Mb/s) and for outages. The desk is each of the two a car meets: a WHIP server
that allows one session per endpoint (as common WHIP front ends do), and the reference
dispatcher (`dashsos dispatch`, `call` mode). Each test measures how long after the
path's return video is decoded at the desk again, and that the car left no session
behind for the server to clean up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import speech
from dashsos.media.audio import read_wav
from netns import DESKS, MOBILE, NetPath, available, freezes, playout

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))

# The target is 5 s; tests print the figure and hold a bound a loaded machine cannot
# miss by chance (5.4 s was seen with two suites on 2 cores) but a re-dial that waits out
# a backoff, or a session the server must time out first, would.
RECOVERY_BOUND_S = 10.0


@contextmanager
def _net(tmp_path: Path, desk: str, audio: bool = False) -> Iterator[NetPath]:
    net = NetPath(tmp_path / f"net-{desk}", desk=desk, audio=audio)
    try:
        yield net
    finally:
        net.close()


@pytest.fixture(params=DESKS)
def path(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NetPath]:
    with _net(tmp_path, request.param) as net:
        yield net


def _on_air(path: NetPath, **config: dict[str, Any]) -> None:
    path.start_car(config)
    reply = path.request("trigger")
    assert reply["ok"], reply
    path.on_air_after(time.monotonic(), 30)


def _outage(path: NetPath, seconds: float) -> float:
    """Seconds from the path's return to video at the desk; checks nothing leaked."""
    down = path.outage(True)
    time.sleep(max(0.0, seconds - (time.monotonic() - down)))
    up = path.outage(False)
    back = path.on_air_after(up, 60)
    # Settle, then: exactly one session at the desk, the one on the air.
    path._wait(lambda: len(path.live()) == 1, 15, "one live session")
    print(f"{path.desk}: outage {seconds:g} s: video again {back:.2f} s after the path's "
          f"return, {len(path.sessions())} sessions in all, {path.leaked()} left behind")
    assert path.leaked() == 0, path.sessions()
    return back


def _no_leak(path: NetPath) -> None:
    assert path.request("cancel")["ok"]
    path._wait(lambda: not path.live(), 15, "the last session DELETEd")
    assert path.leaked() == 0


def test_short_outage_back_on_air_within_5_s(path: NetPath) -> None:
    path.impair(MOBILE)
    _on_air(path)
    back = _outage(path, 8.0)
    assert back < RECOVERY_BOUND_S, back
    _no_leak(path)


def test_long_outages_back_on_air_within_5_s(tmp_path: Path) -> None:
    """60 s and 120 s gaps at both desks, all four at once (a run of minutes, not ten)."""
    results: dict[str, float | BaseException] = {}
    paths: list[NetPath] = []

    def ride(path: NetPath, seconds: float, start: threading.Barrier) -> None:
        key = f"{path.desk} {seconds:g} s"
        try:
            path.impair(MOBILE)
            _on_air(path)
            start.wait(60)
            results[key] = _outage(path, seconds)
            _no_leak(path)
        except BaseException as exc:  # reported below, with the others' figures
            results[key] = exc
            start.abort()

    try:
        runs: list[tuple[NetPath, float]] = []
        for desk in DESKS:
            for seconds in (60.0, 120.0):
                paths.append(NetPath(tmp_path / f"{desk}-{seconds:g}", desk=desk))
                runs.append((paths[-1], seconds))
        start = threading.Barrier(len(runs))
        threads = [threading.Thread(target=ride, args=(p, s, start)) for p, s in runs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(400)
    finally:
        for p in paths:
            p.close()
    print("long outages, back on the air after the path's return:", results)
    failed = {k: v for k, v in results.items() if not isinstance(v, float)}
    assert not failed and len(results) == 4, results
    assert all(isinstance(v, float) and v < RECOVERY_BOUND_S for v in results.values()), \
        results


def test_no_media_path_after_the_201(path: NetPath) -> None:
    """Signalling works but UDP does not (a carrier firewall): every call the desk
    answered fails at ICE and is DELETEd; once UDP passes, the call is up."""
    path.block_udp(True)
    path.start_car({})
    assert path.request("trigger")["ok"]
    path._wait(lambda: len(path.sessions()) >= 2, 40, "a failed call and its re-dial")
    path._wait(lambda: all(s["deleted"] for s in path.sessions()[:1]), 10,
               "the failed session DELETEd")
    assert not any(s["video_times"] for s in path.sessions())
    path.block_udp(False)
    back = path.on_air_after(time.monotonic(), 30)
    path._wait(lambda: len(path.live()) == 1, 15, "one live session")
    print(f"{path.desk}: UDP blocked: {len(path.sessions())} sessions answered, "
          f"video {back:.2f} s after UDP passes")
    assert back < RECOVERY_BOUND_S, back
    _no_leak(path)


def test_interface_returns_with_a_new_address(path: NetPath) -> None:
    _on_air(path)
    path.link(False)
    time.sleep(6)
    up = path.link(True, "198.51.100.11")  # wwan0 back with another address
    back = path.on_air_after(up, 30)
    print(f"{path.desk}: interface back with a new address: video again after {back:.2f} s")
    assert back < RECOVERY_BOUND_S, back
    _no_leak(path)


def test_mobile_link_video_is_continuous_and_speech_intelligible(tmp_path: Path) -> None:
    # Frame by frame arrival times, media timestamps and decoded audio: the WHIP server
    # records them.
    reference = read_wav(str(speech.speech_wav(tmp_path / "speech.wav")), speech.RATE)
    with _net(tmp_path, "whip", audio=True) as path:
        path.impair(MOBILE)
        _on_air(path, audio={"backend": "test", "test_sound": str(tmp_path / "speech.wav")})
        start = time.monotonic()
        time.sleep(15)
        sessions = path.sessions()
        arrivals = freezes([t for s in sessions for t in s["video_times"] if t > start])
        # What the desk shows with a 0.5 s jitter buffer (retransmissions take an RTT).
        shown = playout(sessions, start, 0.5)
        assert path.audio_dir is not None
        arrived = speech.intelligibility(reference, speech.arrived(path.audio_dir))
        heard = speech.intelligibility(reference, speech.heard(path.audio_dir))
        print(f"mobile link, 15 s: arrivals {arrivals}, played {shown}, speech as it "
              f"arrived {arrived}, as aiortc's receiver decoded it {heard}")
        assert arrivals["fps"] > 25, arrivals
        assert shown["freeze_s"] < 1.5, shown
        # 5 % of 20 ms frames silent scores about 0.97 offline; noise alone scores 0.4.
        assert arrived["segments"] >= 3 and arrived["stoi_worst"] > 0.8, arrived
        _no_leak(path)
