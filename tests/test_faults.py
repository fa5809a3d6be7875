"""Faults: the car killed at random points, and its dispatcher, camera, microphone and GPS
vanishing and returning during an incident.

Every measured number goes to artifacts/faults-summary.json (and is printed), so the notes
can quote them.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import clipcheck
import nmea
from conftest import REPO, TONE_HZ, DaemonClient, GpsFake, feed_camera, free_port, toml, wait_for
from dashsos.evidence.signing import verify
from mqttbroker import Broker, Subscriber
from whipserver import WhipServer

pytestmark = pytest.mark.faults

INCIDENT_TOPIC = "dashsos/car-1/incident"
SUMMARY = REPO / "artifacts" / "faults-summary.json"
TERMINAL = ("evidence_saved", "evidence_recovered", "evidence_failed")


def write_summary(*keys: str, data: dict[str, Any]) -> None:
    """Merge one test's numbers into artifacts/faults-summary.json and print them."""
    SUMMARY.parent.mkdir(exist_ok=True)
    try:
        summary = json.loads(SUMMARY.read_text())
    except (OSError, ValueError):
        summary = {}
    node = summary
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = data
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nfaults summary [{'.'.join(keys)}]: {json.dumps(data)}")


# --- a car the test starts and SIGKILLs ---


class Car(DaemonClient):
    """`dashsos run` as a subprocess. Unlike conftest.Daemon it returns at once, so a
    SIGKILL can land during startup (imports, recovery, signing) as well."""

    def __init__(self, workdir: Path, config: dict[str, dict[str, Any]], name: str,
                 env: dict[str, str] | None = None) -> None:
        self.socket = Path(config["control"]["socket"])
        self.state = Path(config["storage"]["dir"])
        if self.socket.is_socket():
            self.socket.unlink()  # the killed one's: we wait for the new one
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(toml(config))
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dashsos", "--config", str(self.config_path), "run"],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.started = time.monotonic()

    def up(self, timeout: float = 20) -> None:
        """Until it answers on its control socket: by then its SIGTERM handler is set too
        (the socket is created earlier, during startup)."""
        wait_for(lambda: self.socket.exists() or self.process.poll() is not None, timeout,
                 "the control socket")
        self.alive_or_fail()
        self.request("status")

    def alive_or_fail(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"dashsos exited by itself ({self.process.returncode}):\n"
                                 + self.logs()[-4000:])

    def kill(self) -> None:
        self.alive_or_fail()  # it must have been running until now
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def car_config(workdir: Path, state: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, dict[str, Any]] = {
        "storage": {"dir": str(state)},
        "control": {"socket": str(workdir / "control.sock")},
        "buffer": {"pre_seconds": 2},
        "incident": {"post_seconds": 2, "cancel_grace_seconds": 0},
        "video": {"backend": "test", "width": 320, "height": 240, "fps": 30,
                  "bitrate": 400_000},
        "audio": {"backend": "test"},
        "gps": {"backend": "simulated"},
        "button": {"backend": "none"},
        "log": {"level": "info"},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return config


def call_section(workdir: Path, whip: WhipServer, mode: str, **extra: Any) -> dict[str, Any]:
    token = workdir / "call.token"
    token.write_text(whip.token + "\n")
    return {"endpoints": [whip.url], "token_file": str(token), "mode": mode,
            "speaker": "none", "connect_timeout": 5.0, "redial_max_seconds": 1.0, **extra}


def hang_up_everything(whip: WhipServer) -> None:
    """A killed car leaves its peer at the server: close them, they cost CPU."""
    async def close() -> None:
        for session in list(whip.sessions.values()):
            await session.pc.close()

    whip.call(close())


def stop_whip(whip: WhipServer) -> None:
    """Close its peers and let their tasks end before its loop stops, and collect what is
    left now: a finalizer running later inside pytest's own ast.parse of a traceback has
    crashed CPython 3.11 ("AST constructor recursion depth mismatch")."""
    hang_up_everything(whip)
    whip.call(asyncio.sleep(0.3))
    whip.stop()
    gc.collect()


def outbox_incident_messages(state: Path, scratch: Path) -> list[bytes]:
    """Incident messages the killed car left in its outbox: each must reach the fleet.
    Read from a copy, so the next start replays the WAL itself, as after a power cut."""
    if scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = state / f"state.db{suffix}"
        if source.exists():
            shutil.copy(source, scratch / source.name)
    if not (scratch / "state.db").exists():
        return []
    db = sqlite3.connect(scratch / "state.db")
    try:
        rows = db.execute("SELECT payload FROM outbox WHERE topic = ? ORDER BY id",
                          (INCIDENT_TOPIC,)).fetchall()
    except sqlite3.OperationalError:  # killed before the table was created
        rows = []
    finally:
        db.close()
    return [bytes(payload) for (payload,) in rows]


def record_of(state: Path, incident: str) -> dict[str, Any] | None:
    try:
        record: dict[str, Any] = json.loads(
            (state / "incidents" / incident / "incident.json").read_text())
    except (OSError, ValueError):
        return None
    return record


def media_packets(clip: Path) -> int:
    return len(clipcheck.ffprobe(clip, "-show_entries", "packet=stream_index")["packets"])


def has_audio(clip: Path) -> bool:
    streams = clipcheck.ffprobe(clip, "-show_streams")["streams"]
    return any(s["codec_type"] == "audio" for s in streams)


# --- 100 SIGKILLs ---

KILLS = int(os.environ.get("DASHSOS_FAULT_KILLS", "100"))
# Where each kill is aimed, and how many of each (scaled to KILLS).
PHASES = {"startup": 15, "buffering": 15, "outbox": 18, "clip_writing": 18, "finalize": 17,
          "mid_call": 17}
# A clip's first fragment is written at the second keyframe it holds: at most one keyframe
# interval (1 s) after the trigger when less than that was buffered. Only a car killed
# within this long of its trigger may lose the whole clip.
NO_FRAGMENT_WITHIN_S = 1.5
NO_FRAGMENT_NOTE = re.compile(r"no complete fragment|before its first fragment")


def plan(rnd: random.Random, kills: int) -> list[str]:
    phases = [p for p, n in PHASES.items() for _ in range(n)]
    chosen = [phases[i * len(phases) // kills] for i in range(kills)]
    rnd.shuffle(chosen)
    return chosen


def aim(car: Car, phase: str, post: int, rnd: random.Random, state: Path) -> dict[str, Any]:
    """Wait (and trigger) so that the SIGKILL that follows lands in `phase`."""
    if phase == "startup":
        time.sleep(rnd.uniform(0.05, 1.0))
        up = car.socket.exists()
        return {"landed": "startup, socket up" if up else "startup, before the control socket"}
    car.up()
    if phase == "buffering":
        time.sleep(rnd.uniform(0, 0.3))
        return {"landed": "buffering"}
    time.sleep(rnd.uniform(0, 0.5) if phase == "outbox" else
               rnd.uniform(0.2, 1.0) if phase == "clip_writing" else 0.5)
    reply = car.request("trigger")
    triggered = time.monotonic()
    cycle: dict[str, Any] = {"incident": reply.get("incident")} if reply.get("ok") \
        else {"refused": reply}
    if phase == "outbox":
        time.sleep(rnd.uniform(0, 0.08))
        cycle["landed"] = "outbox, just after the trigger"
    elif phase == "clip_writing":
        time.sleep(rnd.uniform(0.1, post))
        cycle["landed"] = "clip writing"
    elif phase == "finalize":
        # The clip closes 0.5 s (the recorder's grace) after the post window.
        time.sleep(max(0.0, triggered + post + rnd.uniform(0.35, 0.75) - time.monotonic()))
        record = record_of(state, cycle.get("incident") or "")
        cycle["landed"] = f"finalize, record {record['status'] if record else 'missing'}"
    else:  # mid_call
        try:
            wait_for(lambda: car.status()["links"]["call"]["call_state"] == "connected", 5,
                     "the call", step=0.05)
            time.sleep(rnd.uniform(0, 1.0))
            cycle["landed"] = "mid-call"
        except AssertionError:
            cycle["landed"] = "mid_call aimed, call not connected"
    cycle["after_trigger_s"] = round(time.monotonic() - triggered, 3)
    return cycle


@pytest.mark.timeout(900)  # ~4 min here; the project's 300 s default is too tight for it
def test_sigkill_100_times_loses_nothing(tmp_path: Path) -> None:
    """100 SIGKILLs of one car (one state directory, one broker, one WHIP server), each
    aimed at a phase:

    - startup: 0.05-1.0 s after exec (imports, recovery of the last cut, signing);
    - buffering: 0-0.3 s after the control socket appeared, no incident;
    - outbox: 0-80 ms after a trigger was acknowledged (the clip opens, `triggered` is
      in flight to the broker);
    - clip_writing: 0.1 s to post_seconds after the trigger (fragments being written);
    - finalize: around the end of the post window (WHIP mode, so the call does not hold
      the incident open): the clip closed, renamed, sidecars, record, manifest;
    - mid_call: 0-1 s after the call to the WHIP server connected (call mode).

    After the loop one clean start runs recovery and drains the outbox. Then every
    acknowledged incident has a record (saved or recovered) and a clip that passes
    ffprobe; its `triggered` event reached the persistent subscriber, first of its events;
    every incident message any killed car left in its outbox arrived. QoS 1 is
    at-least-once: a kill between the broker's receipt and the car's removal of the message
    re-sends it after the restart, so duplicates are counted (they must be identical and
    rare), not refused.

    A clip may have no complete fragment only when the car was killed within
    NO_FRAGMENT_WITHIN_S of the trigger, before the keyframe that closes the clip's first
    fragment was written (the `outbox` kills, 0-80 ms after a trigger given 0-0.5 s after
    the start, aim there); the recovery notes must say so. That bound is what "rare" means
    here: any such clip killed later fails the test.

    DASHSOS_FAULT_KILLS and DASHSOS_FAULT_SEED (printed) replay a run.
    """
    seed = int(os.environ.get("DASHSOS_FAULT_SEED", str(random.randrange(2**32))))
    rnd = random.Random(seed)
    began = time.monotonic()
    state = tmp_path / "state"
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    desk = Subscriber(broker.port, INCIDENT_TOPIC, client_id="faults-desk", persistent=True)
    whip = WhipServer()
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive": 5,
            "status_interval": 2.0}
    acknowledged: dict[str, dict[str, Any]] = {}  # incident id -> the cycle that made it
    refused = 0
    left_in_outbox: set[bytes] = set()
    landed: Counter[str] = Counter()  # where the kills actually landed
    cycles: list[dict[str, Any]] = []
    try:
        for n, phase in enumerate(plan(rnd, KILLS)):
            post = rnd.choice((1, 2))
            mode = "whip" if phase == "finalize" else \
                "call" if phase in ("mid_call", "outbox") else rnd.choice(("call", "whip"))
            config = car_config(tmp_path, state, mqtt=mqtt,
                                incident={"post_seconds": post, "cancel_grace_seconds": 0},
                                call=call_section(tmp_path, whip, mode),
                                ice={"interfaces": ["127.0.0.1"]})
            car = Car(tmp_path, config, f"car{n:03d}")
            cycle = {"n": n, "phase": phase, "mode": mode, "post": post,
                     **aim(car, phase, post, rnd, state)}
            if cycle.get("incident"):
                acknowledged[cycle["incident"]] = cycle
            elif "refused" in cycle:
                refused += 1
            car.kill()
            landed[cycle["landed"]] += 1
            cycles.append(cycle)
            left_in_outbox.update(outbox_incident_messages(state, tmp_path / "outbox-copy"))
            hang_up_everything(whip)

        # One clean start: recovery of the last cut, the outbox drains; then a clean stop.
        final = Car(tmp_path, car_config(tmp_path, state, mqtt=mqtt), "final")
        final.up()
        wait_for(lambda: (m := final.status()["links"]["mqtt"])["state"] == "ok"
                 and m["outbox"]["incident"] == 0, 30, "the outbox to drain")
        assert final.stop() == 0, final.logs()[-3000:]
        calls = len(whip.sessions)
    finally:
        stop_whip(whip)

    # --- what the fleet heard ---
    def received() -> list[bytes]:
        return [p for t, p, _, _ in list(desk.received) if t == INCIDENT_TOPIC]

    def triggered_ids() -> set[str]:
        return {json.loads(p)["id"] for p in received() if json.loads(p)["event"] == "triggered"}

    try:
        wait_for(lambda: set(acknowledged) <= triggered_ids()
                 and left_in_outbox <= set(received()), 30, "every incident message")
        time.sleep(1.0)  # a late duplicate would arrive now
    except AssertionError:
        pass  # reported precisely below
    finally:
        desk.close()
        broker.stop()
    payloads = received()
    messages = [json.loads(p) for p in payloads]
    lost_triggered = sorted(set(acknowledged) - triggered_ids())
    lost_stored = [json.loads(p) for p in left_in_outbox - set(payloads)]
    # The same message (same incident, event and creation time) received more than once.
    by_key: dict[tuple[Any, ...], list[bytes]] = {}
    for payload, m in zip(payloads, messages, strict=True):
        by_key.setdefault((m["id"], m["event"], m["time"]), []).append(payload)
    duplicates = sum(len(v) - 1 for v in by_key.values())
    differing = [k for k, v in by_key.items() if len(set(v)) > 1]
    out_of_order = []
    for incident in acknowledged:
        events = [m["event"] for m in messages if m["id"] == incident]
        if events and events[0] != "triggered":
            out_of_order.append((incident, events))
    terminal_missing = sorted(i for i in acknowledged
                              if not any(m["id"] == i and m["event"] in TERMINAL
                                         for m in messages))

    # --- what the car kept ---
    problems: list[str] = []
    statuses: Counter[str] = Counter()
    recovered_clips = no_fragment = audio_less = unsigned = header_only = 0
    for incident, cycle in acknowledged.items():
        directory = state / "incidents" / incident
        record = record_of(state, incident)
        if record is None:
            problems.append(f"{incident} ({cycle['phase']}): no incident.json")
            continue
        statuses[record["status"]] += 1
        if record["status"] not in ("saved", "recovered"):
            problems.append(f"{incident}: status {record['status']}")
        notes = " ".join(record.get("recovery") or [])
        clip = directory / "clip.mp4"
        cut_early = cycle.get("after_trigger_s", 99) <= NO_FRAGMENT_WITHIN_S
        if not clip.exists():
            if not NO_FRAGMENT_NOTE.search(notes):
                problems.append(f"{incident} ({cycle}): no clip.mp4 and the recovery notes "
                                f"do not say why: {record.get('recovery')}")
            elif not cut_early:
                problems.append(f"{incident}: no complete fragment though killed "
                                f"{cycle['after_trigger_s']} s after the trigger")
            no_fragment += 1
            continue
        if "clip trimmed" in notes:
            recovered_clips += 1
            if not media_packets(clip):  # the bug fixed in 59a8315, found by this test
                header_only += 1
                problems.append(f"{incident}: a header without a fragment called clip.mp4")
                continue
        audio = has_audio(clip)
        if not audio:
            audio_less += 1
            if record["sources"]["audio"]["state"] != "down":
                problems.append(f"{incident} ({cycle}): clip without audio, but the record "
                                f"says audio was {record['sources']['audio']['state']}")
        try:
            clipcheck.check_clip(clip, audio=audio)
        except (AssertionError, subprocess.CalledProcessError) as exc:
            problems.append(f"{incident} ({cycle}): clip fails ffprobe: {exc}")
        if not verify(directory).ok:
            unsigned += 1
    # Incidents nobody acknowledged (none expected) must be sound as well.
    others = [p.name for p in (state / "incidents").iterdir()
              if p.is_dir() and p.name not in acknowledged]

    elapsed = time.monotonic() - began
    summary = {
        "seed": seed, "kills": len(cycles), "kills_survived": len(cycles),
        "phases_aimed": dict(Counter(c["phase"] for c in cycles)),
        "kills_landed": dict(landed), "incidents_acknowledged": len(acknowledged),
        "triggers_refused": refused, "records": dict(statuses),
        "recovered_clips_trimmed": recovered_clips, "no_complete_fragment": no_fragment,
        "header_only_clips_committed": header_only,
        "audio_less_clips": audio_less, "calls_answered": calls,
        "incident_messages_received": len(payloads), "duplicates": duplicates,
        "lost_triggered": len(lost_triggered), "lost_from_outbox": len(lost_stored),
        "incidents_without_final_event": len(terminal_missing),
        "incidents_not_verifiable": unsigned, "unacknowledged_incident_dirs": len(others),
        "seconds": round(elapsed, 1),
    }
    write_summary("sigkill", data=summary)
    print(f"{len(cycles)} SIGKILLs survived in {elapsed:.0f} s: {len(acknowledged)} incidents, "
          f"{recovered_clips} recovered clips ({header_only} header-only), {no_fragment} "
          f"without a fragment, {duplicates} duplicate messages, {len(lost_triggered)} "
          f"triggered lost, {len(terminal_missing)} without a final event (seed {seed})")
    assert not lost_triggered, f"triggered never arrived for {lost_triggered}"
    assert not lost_stored, f"messages left in the outbox never arrived: {lost_stored}"
    assert not differing, f"duplicates that differ: {differing}"
    assert not out_of_order, out_of_order
    assert not problems, "\n".join(problems)
    assert not others, others
    assert duplicates <= max(3, len(cycles) // 10), f"{duplicates} duplicates: not rare"
    assert statuses["saved"] + statuses["recovered"] == len(acknowledged)


# --- a killed car must not lose its final event, nor leave evidence unsigned ---
#
# A FIFO named like the manifest's temporary file freezes the daemon at a precise point:
# write_atomic() opens "manifest.json.tmp" and blocks there until a reader comes. Killed
# while frozen, the disk holds exactly what a power cut at that instant leaves.


def _broker_and_desk(workdir: Path, name: str) -> tuple[Broker, Subscriber, dict[str, Any]]:
    (workdir / "broker").mkdir()
    broker = Broker(workdir / "broker")
    desk = Subscriber(broker.port, INCIDENT_TOPIC, client_id=f"desk-{name}", persistent=True)
    mqtt = {"enabled": True, "host": "127.0.0.1", "port": broker.port, "keepalive": 5}
    return broker, desk, mqtt


def _events(desk: Subscriber, incident: str) -> list[str]:
    return [m["event"] for m in desk.json("/incident") if m["id"] == incident]


def _wait_status(state: Path, incident: str, status: str, timeout: float = 20) -> None:
    wait_for(lambda: (r := record_of(state, incident)) is not None and r["status"] == status,
             timeout, f"incident {incident} {status}", step=0.02)


@pytest.fixture(scope="module")
def killed_after_saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A car killed after it wrote `saved` into incident.json, before it signed the
    incident and stored `evidence_saved` in its outbox; then started again."""
    workdir = tmp_path_factory.mktemp("killed-after-saved")
    broker, desk, mqtt = _broker_and_desk(workdir, "saved")
    state = workdir / "state"
    try:
        car = Car(workdir, car_config(workdir, state, mqtt=mqtt,
                                      incident={"post_seconds": 1, "cancel_grace_seconds": 0}),
                  "car0")
        car.up()
        wait_for(lambda: car.source("video")["buffered_seconds"] >= 2, 20, "2 s buffered")
        incident = car.request("trigger")["incident"]
        fifo = state / "incidents" / incident / "manifest.json.tmp"
        os.mkfifo(fifo)
        _wait_status(state, incident, "saved")
        time.sleep(0.3)  # frozen in sign(): the loop cannot reach the outbox
        car.kill()
        fifo.unlink()
        again = Car(workdir, car_config(workdir, state, mqtt=mqtt), "car1")
        again.up()
        wait_for(lambda: (m := again.status()["links"]["mqtt"])["state"] == "ok"
                 and m["outbox"]["incident"] == 0, 20, "the outbox to drain")
        time.sleep(1.0)
        yield {"state": state, "incident": incident, "events": _events(desk, incident)}
        again.stop()
    finally:
        desk.close()
        broker.stop()


def test_final_event_survives_a_kill_after_the_record_says_saved(
        killed_after_saved: dict[str, Any]) -> None:
    events = killed_after_saved["events"]
    assert events[0] == "triggered"
    assert set(events) & set(TERMINAL), events


def test_incident_is_signed_after_a_kill_between_record_and_manifest(
        killed_after_saved: dict[str, Any]) -> None:
    directory = killed_after_saved["state"] / "incidents" / killed_after_saved["incident"]
    clipcheck.check_clip(directory / "clip.mp4")  # the evidence itself is complete
    result = verify(directory)
    assert result.ok, result.problems


def test_recovered_event_survives_a_kill_during_startup(tmp_path: Path) -> None:
    broker, desk, mqtt = _broker_and_desk(tmp_path, "recovered")
    state = tmp_path / "state"
    try:
        config = car_config(tmp_path, state, mqtt=mqtt, incident={"post_seconds": 60})
        car = Car(tmp_path, config, "car0")
        car.up()
        wait_for(lambda: car.source("video")["buffered_seconds"] >= 2, 20, "2 s buffered")
        incident = car.request("trigger")["incident"]
        time.sleep(1.5)
        car.kill()  # the incident is cut: the next start recovers it
        fifo = state / "incidents" / incident / "manifest.json.tmp"
        os.mkfifo(fifo)
        starting = Car(tmp_path, config, "car1")
        _wait_status(state, incident, "recovered")
        time.sleep(0.3)  # frozen in sign(), before the fleet link exists
        starting.kill()
        fifo.unlink()
        again = Car(tmp_path, config, "car2")
        again.up()
        wait_for(lambda: (m := again.status()["links"]["mqtt"])["state"] == "ok"
                 and m["outbox"]["incident"] == 0, 20, "the outbox to drain")
        time.sleep(1.0)
        events = _events(desk, incident)
        again.stop()
        assert events[0] == "triggered"
        assert "evidence_recovered" in events, events
    finally:
        desk.close()
        broker.stop()


# --- what recovery makes of a clip cut early ---


def test_clip_cut_before_its_first_fragment_is_not_called_playable(tmp_path: Path) -> None:
    """Found by the SIGKILL loop (fixed in 59a8315): recovery kept ftyp+moov of a partial
    cut before its first fragment and renamed it clip.mp4, an MP4 without a frame, with the
    note 'trimmed to its last complete fragment'."""
    state = tmp_path / "state"
    config = car_config(tmp_path, state)
    car = Car(tmp_path, config, "car0")
    car.up()

    def buffered() -> tuple[float, float]:
        sources = car.status()["sources"]
        return sources["video"]["buffered_seconds"], sources["audio"]["buffered_seconds"]

    wait_for(lambda: min(buffered()) > 0, 10, "the first video and audio", step=0.01)
    assert buffered()[0] < 0.8  # one keyframe buffered, the next (1 s on) closes a fragment
    incident = car.request("trigger")["incident"]
    partial = state / "incidents" / incident / "clip.mp4.partial"
    wait_for(lambda: partial.exists() and partial.stat().st_size > 0, 10,
             "the clip's header", step=0.005)
    car.kill()  # the first fragment closes at the next keyframe, up to 1 s later
    again = Car(tmp_path, config, "car1")
    again.up()
    assert again.stop() == 0
    record = record_of(state, incident)
    assert record is not None and record["status"] == "recovered"
    clip = state / "incidents" / incident / "clip.mp4"
    if clip.exists():
        assert media_packets(clip) > 0, f"clip.mp4 holds no media; notes: {record['recovery']}"
        clipcheck.check_clip(clip)
    else:
        assert NO_FRAGMENT_NOTE.search(" ".join(record["recovery"])), record["recovery"]


def test_trigger_at_power_on_records_video_and_audio(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = car_config(tmp_path, state, incident={"post_seconds": 1})
    clips = []
    for n in range(3):
        car = Car(tmp_path, config, f"car{n}")
        while not car.socket.exists():  # pressed the moment the car can hear it
            car.alive_or_fail()
            time.sleep(0.001)
        incident = car.request("trigger")["incident"]
        _wait_status(state, incident, "saved")
        assert car.stop() == 0
        clips.append(state / "incidents" / incident / "clip.mp4")
    for clip in clips:
        clipcheck.check_clip(clip, audio=True)


def test_audio_only_incident_survives_a_power_cut(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = car_config(tmp_path, state, video={"backend": "none"},
                        incident={"post_seconds": 60})
    car = Car(tmp_path, config, "car0")
    car.up()
    wait_for(lambda: car.source("audio")["buffered_seconds"] >= 2, 20, "2 s of audio")
    incident = car.request("trigger")["incident"]
    time.sleep(4)
    car.kill()
    again = Car(tmp_path, config, "car1")
    again.up()
    assert again.stop() == 0
    record = record_of(state, incident)
    assert record is not None
    clip = state / "incidents" / incident / "clip.mp4"
    assert clip.exists(), f"no clip after 6 s of audio; notes: {record['recovery']}"
    duration = float(clipcheck.ffprobe(clip, "-show_format")["format"]["duration"])
    assert duration >= 4, duration


# --- dispatcher, camera, microphone and GPS vanish during an incident and return ---

RECOVERY_S = 5.0  # the issue: back within 5 s of the device's (or dispatcher's) return
OUTAGE_S = 2.0


def packet_times(clip: Path, stream: str) -> list[float]:
    packets = clipcheck.ffprobe(clip, "-select_streams", stream, "-show_entries",
                                "packet=pts_time")["packets"]
    return [float(p["pts_time"]) for p in packets]


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


def keeps_recording(car: Car, name: str) -> None:
    """The source's buffer keeps changing: its data keeps arriving."""
    before = car.source(name)
    assert before["state"] in ("ok", "simulated"), before
    wait_for(lambda: car.source(name)["buffered_bytes"] != before["buffered_bytes"], 3,
             f"{name} to keep recording")


def start_incident(car: Car) -> str:
    wait_for(lambda: car.status()["buffer"]["seconds"] >= 2, 30, "2 s buffered", step=0.2)
    reply = car.request("trigger")
    assert reply["ok"], reply
    incident: str = reply["incident"]
    return incident


def wait_state(car: Car, name: str, states: tuple[str, ...], timeout: float) -> float:
    """Waits for a source's state; returns when it was seen (monotonic)."""
    wait_for(lambda: car.source(name)["state"] in states, timeout,
             f"{name} to be {'/'.join(states)}", step=0.05)
    return time.monotonic()


def test_dispatcher_vanishes_and_returns(tmp_path: Path) -> None:
    """The WHIP server goes away mid-call (its site closed, its peers closed) for 2 s and
    comes back on the same port: the car, re-dialing with its default backoff, is connected
    again within 5 s of the return; the evidence is recorded throughout."""
    whip = WhipServer()
    try:
        config = car_config(tmp_path, tmp_path / "state", incident={"post_seconds": 60},
                            call=call_section(tmp_path, whip, "call", redial_max_seconds=5.0),
                            ice={"interfaces": ["127.0.0.1"]})
        car = Car(tmp_path, config, "car")
        car.up()
        incident = start_incident(car)

        def call_state() -> str:
            return str(car.status()["links"]["call"]["call_state"])

        wait_for(lambda: call_state() == "connected", 15, "the call", step=0.05)
        assert whip._runner is not None
        gone = time.monotonic()
        whip.call(whip._runner.cleanup())  # the port refuses from now on
        hang_up_everything(whip)
        wait_for(lambda: call_state() != "connected", 10, "the car to notice", step=0.05)
        noticed = time.monotonic() - gone
        keeps_recording(car, "video")
        time.sleep(max(0.0, gone + OUTAGE_S - time.monotonic()))
        sessions_before = len(whip.sessions)
        whip.call(whip._start())
        back = time.monotonic()
        wait_for(lambda: call_state() == "connected", 15, "the re-dial", step=0.05)
        recovered = time.monotonic() - back
        wait_for(lambda: any(s.video_frames > 10 for s in
                             list(whip.sessions.values())[sessions_before:]), 10,
                 "media on the new call")
        assert car.stop() == 0
        clip = tmp_path / "state" / "incidents" / incident / "clip.mp4"
        facts = clipcheck.check_clip(clip)
        video_gap = longest_gap(packet_times(clip, "v"))
        measured = {
            "outage_s": OUTAGE_S,
            "noticed_s": round(noticed, 2),
            "connected_again_s": round(recovered, 2),
            "clip_s": round(facts.duration, 1),
            "clip_longest_video_gap_s": round(video_gap, 3),
        }
        write_summary("recovery", "dispatcher", data=measured)
        assert recovered < RECOVERY_S, recovered
        assert video_gap < 0.5, video_gap  # the call's trouble is not the evidence's
    finally:
        stop_whip(whip)


def test_default_redial_interval_allows_recovery_within_5_s(tmp_path: Path) -> None:
    whip = WhipServer()
    whip.failure = "500"  # the dispatcher's desk is down: every POST is refused
    try:
        call = call_section(tmp_path, whip, "call")
        del call["redial_max_seconds"]  # the default
        config = car_config(tmp_path, tmp_path / "state", incident={"post_seconds": 60},
                            call=call, ice={"interfaces": ["127.0.0.1"]})
        car = Car(tmp_path, config, "car")
        car.up()
        car.request("trigger")
        posts: list[float] = []

        def count() -> bool:
            while len(posts) < sum(1 for m, _ in list(whip.requests) if m == "POST"):
                posts.append(time.monotonic())
            return len(posts) >= 6

        wait_for(count, 30, "six refused calls", step=0.01)
        intervals = [round(b - a, 2) for a, b in zip(posts, posts[1:], strict=False)]
        car.stop()
        print(f"\nre-dial intervals with the default backoff: {intervals}")
        # A call takes time to set up after the POST: re-dials must come within 4 s.
        assert max(intervals) <= RECOVERY_S - 1, intervals
    finally:
        stop_whip(whip)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def test_camera_vanishes_and_returns(tmp_path: Path) -> None:
    """The camera (ffmpeg writing H.264 into a FIFO) dies during an incident and is back
    2 s later: video is ok again within 5 s; audio and GPS record all along; the clip plays,
    with a gap in its video and none in its audio."""
    fifo = tmp_path / "camera.h264"
    os.mkfifo(fifo)
    camera = feed_camera(fifo)
    try:
        config = car_config(tmp_path, tmp_path / "state", incident={"post_seconds": 60},
                            video={"backend": "ffmpeg", "input": str(fifo),
                                   "input_format": "h264"})
        car = Car(tmp_path, config, "car")
        car.up()
        wait_state(car, "video", ("ok",), 20)
        incident = start_incident(car)
        time.sleep(1)
        kill_group(camera)  # the camera vanishes
        gone = time.monotonic()
        noticed = wait_state(car, "video", ("down", "degraded"), 10) - gone
        keeps_recording(car, "audio")
        gps = car.source("gps")
        assert gps["state"] == "simulated" and gps["last_known"]["age_seconds"] < 2.5, gps
        time.sleep(max(0.0, gone + OUTAGE_S - time.monotonic()))
        camera = feed_camera(fifo)  # it comes back
        back = time.monotonic()
        recovered = wait_state(car, "video", ("ok",), 15) - back
        keeps_recording(car, "video")
        time.sleep(1.5)
        assert car.stop() == 0
        clip = tmp_path / "state" / "incidents" / incident / "clip.mp4"
        facts = clipcheck.check_clip(clip)
        video_gap = longest_gap(packet_times(clip, "v"))
        audio_gap = longest_gap(packet_times(clip, "a"))
        measured = {
            "outage_s": OUTAGE_S,
            "noticed_s": round(noticed, 2),
            "ok_again_s": round(recovered, 2),
            "clip_s": round(facts.duration, 1),
            "clip_video_gap_s": round(video_gap, 2),
            "clip_longest_audio_gap_s": round(audio_gap, 3),
        }
        write_summary("recovery", "camera", data=measured)
        assert recovered < RECOVERY_S, recovered
        assert video_gap >= OUTAGE_S - 0.5  # the gap is there, not papered over
        assert audio_gap < 0.1, audio_gap  # the microphone recorded throughout
    finally:
        kill_group(camera)


class PrivatePulse:
    """A PulseAudio of this test's own (the session's `pulse` is shared): its tone is the
    car's microphone, and the test kills and restarts it."""

    def __init__(self, root: Path) -> None:
        (root / "run").mkdir(parents=True)
        (root / "home").mkdir()
        self.root = root
        self.sock = root / "native"
        self.env = {**os.environ, "XDG_RUNTIME_DIR": str(root / "run"),
                    "HOME": str(root / "home")}
        self.client = {"PULSE_SERVER": f"unix:{self.sock}"}
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        if self.sock.exists():
            self.sock.unlink()  # left by the killed one
        with open(self.root / "pulseaudio.log", "ab") as log:
            self.process = subprocess.Popen(
                ["pulseaudio", "--exit-idle-time=-1", "--system=false", "-n",
                 "--daemonize=no", "--disallow-exit", "--use-pid-file=false",
                 "-L", f"module-native-protocol-unix auth-anonymous=1 socket={self.sock}",
                 "-L", "module-null-sink sink_name=vsink",
                 "-L", f"module-sine-source source_name=tone frequency={TONE_HZ}",
                 "-L", "module-loopback source=tone sink=vsink",
                 "-L", "module-always-sink"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: subprocess.run(
            ["pactl", "set-default-source", "vsink.monitor"], env={**self.env, **self.client},
            capture_output=True).returncode == 0, 10, "PulseAudio to answer")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def test_microphone_vanishes_and_returns(tmp_path: Path) -> None:
    """The sound server behind the microphone (PortAudio -> ALSA -> PulseAudio) is killed
    during an incident; once the car shows audio down it stays away 2 s, then comes back:
    audio is ok again within 5 s; video records all along."""
    pulse = PrivatePulse(tmp_path / "pulse")
    try:
        config = car_config(tmp_path, tmp_path / "state", incident={"post_seconds": 60},
                            audio={"backend": "pyaudio"})
        car = Car(tmp_path, config, "car", env=pulse.client)
        car.up()
        wait_state(car, "audio", ("ok",), 20)
        incident = start_incident(car)
        time.sleep(1)
        pulse.kill()  # the microphone vanishes
        gone = time.monotonic()
        down = wait_state(car, "audio", ("down",), 10)
        keeps_recording(car, "video")
        time.sleep(OUTAGE_S)
        pulse.start()  # it comes back
        back = time.monotonic()
        recovered = wait_state(car, "audio", ("ok",), 15) - back
        keeps_recording(car, "audio")
        time.sleep(1.5)
        assert car.stop() == 0
        clip = tmp_path / "state" / "incidents" / incident / "clip.mp4"
        facts = clipcheck.check_clip(clip)
        peak, _ = clipcheck.audio_tone(clip)
        video_gap = longest_gap(packet_times(clip, "v"))
        measured = {
            "outage_s": round(back - gone, 1),
            "noticed_s": round(down - gone, 2),
            "ok_again_s": round(recovered, 2),
            "clip_s": round(facts.duration, 1),
            "clip_longest_video_gap_s": round(video_gap, 3),
        }
        write_summary("recovery", "microphone", data=measured)
        assert recovered < RECOVERY_S, recovered
        assert video_gap < 0.5, video_gap  # the camera recorded throughout
        assert abs(peak - TONE_HZ) < 20, peak  # the tone, before and after
    finally:
        pulse.kill()


class GpsFakeOn(GpsFake):
    """conftest.GpsFake on a port of the caller's choice: a gpsd restarted where the car
    expects it. The log starts with a single no-fix epoch, so the fix comes at once."""

    def __init__(self, workdir: Path, port: int, seconds: int = 300) -> None:
        start = datetime.now(UTC).replace(microsecond=0)
        text, self.first_fix = nmea.log(start, seconds, pad=1)
        self.log = workdir / f"track-{port}.nmea"
        self.log.write_text(text)
        self.port = port
        self.output = open(workdir / f"gpsfake-{port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            ["gpsfake", "-q", "-c", "0.333", "-P", str(port), str(self.log)],
            stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self._listening, 10, "gpsfake's gpsd to listen")


def gpsd_has_fix(port: int) -> bool:
    """Whether gpsd on `port` answers a poll with a 2D or 3D fix."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b'?WATCH={"enable":true};\n?POLL;\n')
            lines = s.makefile("rb")
            for _ in range(20):
                message = json.loads(lines.readline() or b"{}")
                if message.get("class") == "POLL":
                    return any(t.get("mode", 0) >= 2 for t in message.get("tpv", []))
    except (OSError, ValueError):
        pass
    return False


def test_gps_vanishes_and_returns(tmp_path: Path) -> None:
    """gpsd (gpsfake) is killed during an incident; 2 s later a new one listens on the same
    port: once it has a fix again, the car's GPS is ok within 5 s; video and audio record
    all along."""
    gps = GpsFakeOn(tmp_path, free_port())
    try:
        config = car_config(tmp_path, tmp_path / "state", incident={"post_seconds": 60},
                            gps={"backend": "gpsd", "port": gps.port, "timeout": 1.0,
                                 "poll_interval": 0.2})
        car = Car(tmp_path, config, "car")
        car.up()
        wait_state(car, "gps", ("ok",), 30)
        incident = start_incident(car)
        time.sleep(1)
        gps.stop()  # gpsd and its receiver are gone
        gone = time.monotonic()
        noticed = wait_state(car, "gps", ("down", "degraded"), 10) - gone
        keeps_recording(car, "video")
        keeps_recording(car, "audio")
        time.sleep(max(0.0, gone + OUTAGE_S - time.monotonic()))
        gps = GpsFakeOn(tmp_path, gps.port)  # it comes back
        listening = time.monotonic()
        # Back means gpsd serves a fix again: the receiver's own start is not the car's.
        wait_for(lambda: gpsd_has_fix(gps.port), 15, "gpsd to have a fix", step=0.05)
        back = time.monotonic()
        recovered = wait_state(car, "gps", ("ok",), 15) - back
        time.sleep(1.5)
        assert car.stop() == 0
        directory = tmp_path / "state" / "incidents" / incident
        facts = clipcheck.check_clip(directory / "clip.mp4")
        video_gap = longest_gap(packet_times(directory / "clip.mp4", "v"))
        points = (directory / "track.gpx").read_text().count("<trkpt")
        measured = {
            "outage_s": OUTAGE_S,
            "noticed_s": round(noticed, 2),
            "gpsd_fix_after_listening_s": round(back - listening, 2),
            "ok_again_s": round(recovered, 2),
            "ok_after_listening_s": round(back - listening + recovered, 2),
            "clip_s": round(facts.duration, 1),
            "clip_longest_video_gap_s": round(video_gap, 3),
            "track_points": points,
        }
        write_summary("recovery", "gps", data=measured)
        assert recovered < RECOVERY_S, recovered
        assert video_gap < 0.5, video_gap
        assert points >= 3
    finally:
        gps.stop()
