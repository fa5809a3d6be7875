"""The call end to end: a trigger on the car, the reference dispatcher answers, media and
telemetry arrive, either side hangs up, phases reach MQTT (issue 4, items 1 and 5)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import clipcheck
import nmea
from conftest import Daemon, GpsFake, wait_for
from dispatcher import CAR_TOKEN, Dispatcher
from mqttbroker import Broker, Subscriber


def _car(tmp_path: Path, endpoint: str, **sections: dict[str, Any]) -> dict[str, Any]:
    token = tmp_path / "call.token"
    token.write_text(CAR_TOKEN + "\n")
    config: dict[str, Any] = {
        "vehicle": {"vin": "WVWZZZ1JZXW000001"},
        "call": {"endpoints": [endpoint], "token_file": str(token), "speaker": "none",
                 "redial_max_seconds": 1.0},
        "ice": {"interfaces": ["127.0.0.1"]},
        "buffer": {"pre_seconds": 3},
        "incident": {"post_seconds": 3, "cancel_grace_seconds": 2},
    }
    for section, keys in sections.items():
        config.setdefault(section, {}).update(keys)
    return config


def test_call_end_to_end(daemon: Any, dispatcher: Dispatcher, own_gpsfake: GpsFake,
                         tmp_path: Path) -> None:
    gpsfake = own_gpsfake
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    watcher = Subscriber(broker.port, "dashsos/car-1/incident")
    try:
        car: Daemon = daemon(_car(
            tmp_path, dispatcher.whip,
            gps={"backend": "gpsd", "port": gpsfake.port, "poll_interval": 0.2},
            audio={"backend": "test", "tone_hz": 1000.0},
            mqtt={"enabled": True, "host": "127.0.0.1", "port": broker.port}))
        wait_for(lambda: car.source("gps")["state"] == "ok", 30, "a GPS fix")
        car.wait_buffered(3)
        pressed = time.monotonic()
        reply = car.trigger()
        call = wait_for(dispatcher.connected, 15, "the dispatcher to answer")
        connected_after = time.monotonic() - pressed
        assert call["vehicle_id"] == "car-1"
        # The data channel: the MSD first, then fixes that match the gpsfake track.
        call = wait_for(lambda: (c := dispatcher.connected()) and len(c["trail"]) >= 3 and c,
                        15, "fixes on the data channel")
        msd = call["msd"]
        assert msd["id"] == reply["incident"] and msd["trigger"]["kind"] == "local"
        assert msd["msd"]["msdStructure"]["vehicleIdentificationNumber"]["isowmi"] == "WVW"
        for fix in call["trail"]:
            want = nmea.position(gpsfake.index_of(fix["time"]))
            assert abs(fix["lat"] - want[0]) < 1e-6 and abs(fix["lon"] - want[1]) < 1e-6
        assert car.status()["state"] == "active"  # the dispatcher holds the incident open
        # What the desk decodes is counted, so a console tells live media from stopped.
        received = wait_for(lambda: (r := dispatcher.connected()["received"]).get("video", {})
                            .get("frames", 0) > 30 and r, 10, "frames counted at the desk")
        assert received["audio"]["frames"] > 50 and received["video"]["last"] > call["started"]
        time.sleep(2)
        # The operator hangs up: the car's call ends, the incident's post window runs.
        dispatcher.api(f"/api/calls/{call['id']}/hangup", method="POST")
        car.wait_saved(reply["incident"], timeout=30)
        ended = next(c for c in dispatcher.calls() if c["id"] == call["id"])
        assert ended["state"] == "ended" and "operator" in ended["end_reason"]
        assert ended["received"]["video"]["frames"] >= received["video"]["frames"]
        # The desk kept its own copy (finished: the call has ended), video frames and the
        # car's tone.
        media = dispatcher.recordings / call["id"] / "media.mp4"
        frames = clipcheck.ffprobe(media, "-count_frames", "-select_streams", "v",
                                   "-show_entries", "stream=nb_read_frames")
        assert int(frames["streams"][0]["nb_read_frames"]) > 30
        peak, level = clipcheck.audio_tone(media)
        assert abs(peak - 1000) < 20 and level > -40, (peak, level)
        # Never decoded nor encoded again: the desk's pictures are the car's, bit for bit,
        # the same run of them as in the car's own clip.
        desk = clipcheck.frame_hashes(media)
        own = clipcheck.frame_hashes(car.state / "incidents" / reply["incident"] / "clip.mp4")
        start = own.index(desk[0])
        assert len(desk) > 30 and desk == own[start:start + len(desk)], (len(desk), len(own))
        telemetry = (dispatcher.recordings / call["id"] / "telemetry.jsonl").read_text()
        kinds = [json.loads(line).get("message", json.loads(line)).get("type")
                 for line in telemetry.splitlines()]
        assert kinds[0] == "msd" and "fix" in kinds
        # Call phases reached the fleet.
        events = [m["event"] for m in watcher.json("/incident") if m["id"] == reply["incident"]]
        assert events.index("calling") < events.index("connected") < events.index("ended")
        ended_event = next(m for m in watcher.json("/incident") if m["event"] == "ended")
        assert "hung up" in ended_event["details"]["reason"]
        assert connected_after < 5
        # The evidence did not wait for the call.
        clipcheck.check_clip(car.incident_dir(reply["incident"]) / "clip.mp4")
    finally:
        watcher.close()
        broker.stop()


def test_car_hangs_up_on_cancel(daemon: Any, dispatcher: Dispatcher, tmp_path: Path) -> None:
    car: Daemon = daemon(_car(tmp_path, dispatcher.whip,
                              incident={"cancel_grace_seconds": 20}))
    car.trigger()
    call = wait_for(dispatcher.connected, 15, "the call")
    assert car.request("cancel")["ok"]
    ended = wait_for(lambda: (c := next(x for x in dispatcher.calls() if x["id"] == call["id"]))
                     ["state"] == "ended" and c, 10, "the desk to see the hang-up")
    assert "car" in ended["end_reason"], ended["end_reason"]


def test_dispatcher_killed_mid_call_redials_after_return(daemon: Any, dispatcher: Dispatcher,
                                                         tmp_path: Path) -> None:
    car: Daemon = daemon(_car(tmp_path, dispatcher.whip, incident={"post_seconds": 60}))
    car.wait_buffered(2)
    reply = car.trigger()
    first = wait_for(dispatcher.connected, 15, "the first call")
    dispatcher.kill()  # SIGKILL: no DTLS close, no hang-up, the far end just goes silent
    killed = time.monotonic()
    wait_for(lambda: car.status()["links"]["call"]["call_state"] != "connected", 10,
             "the car to notice")
    noticed = time.monotonic() - killed
    time.sleep(2)
    dispatcher.start()
    returned = time.monotonic()
    second = wait_for(lambda: (c := dispatcher.connected()) and c["id"] != first["id"] and c,
                      15, "the re-dial")
    redial = time.monotonic() - returned
    print(f"dispatcher killed: noticed in {noticed:.1f} s, on the air {redial:.1f} s after "
          "it was back")
    assert noticed < 5, noticed
    assert redial < 5, redial
    # The car's DELETE for the dead call failed while the desk was down and was kept; the
    # restarted desk closed the interrupted call itself: none is left open but the new one.
    assert [c["id"] for c in dispatcher.calls() if c["state"] != "ended"] == [second["id"]]
    wait_for(lambda: car.status()["links"]["call"]["pending_deletes"] == 0, 10,
             "the kept DELETE to be settled")
    second = wait_for(lambda: next((c for c in dispatcher.calls() if c["id"] == second["id"]
                                    and c["msd"]), None), 5, "the MSD on the new call")
    assert second["msd"]["id"] == reply["incident"]  # the same incident, told again
    # Evidence was recorded throughout: no gap in the clip.
    car.stop()
    clip = car.incident_dir(reply["incident"]) / "clip.mp4"
    facts = clipcheck.check_clip(clip)
    packets = clipcheck.ffprobe(clip, "-select_streams", "v", "-show_entries",
                                "packet=pts_time")["packets"]
    times = [float(p["pts_time"]) for p in packets]
    assert max(b - a for a, b in zip(times, times[1:], strict=False)) < 0.5
    assert facts.duration > 5


def test_unauthorized_token_gives_clear_status(daemon: Any, dispatcher: Dispatcher,
                                               tmp_path: Path) -> None:
    config = _car(tmp_path, dispatcher.whip)
    (tmp_path / "call.token").write_text("not-the-token\n")
    car: Daemon = daemon(config)
    car.trigger()
    wait_for(lambda: "401" in car.status()["links"]["call"]["detail"], 15, "a 401 status")
    assert dispatcher.calls() == []


def test_saved_incident_is_uploaded_and_verified_by_the_desk(daemon: Any,
                                                             dispatcher: Dispatcher,
                                                             tmp_path: Path) -> None:
    config = _car(tmp_path, dispatcher.whip, call={"enabled": False},
                  upload={"endpoint": f"{dispatcher.url}/evidence", "interval": 1.0,
                          "token_file": str(tmp_path / "call.token")})
    car: Daemon = daemon(config)
    car.wait_buffered(2)
    reply = car.trigger()
    car.wait_saved(reply["incident"])
    marker = car.incident_dir(reply["incident"]) / "upload.json"
    upload = json.loads(wait_for(lambda: marker.exists() and marker.read_text(), 20,
                                 "the upload"))
    assert upload["uploaded"] and upload["verified"], upload
    fingerprint = car.status()["evidence"]["key_fingerprint"]
    assert upload["fingerprint"] == fingerprint
    evidence = dispatcher.api("/api/evidence")["evidence"]
    mine = next(e for e in evidence if e["incident"] == reply["incident"])
    assert mine["verified"] and mine["vehicle_id"] == "car-1"
    desk_clip = dispatcher.recordings / "evidence" / "car-1" / reply["incident"] / "clip.mp4"
    assert desk_clip.read_bytes() == (car.incident_dir(reply["incident"]) / "clip.mp4") \
        .read_bytes()
