"""The car's side of the call against a minimal WHIP server: RFC 9725 conformance and the
failures a real dispatcher can produce (issue 4, items 5 and 6)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import clipcheck
from conftest import Daemon, wait_for
from whipserver import WhipServer


@pytest.fixture
def whip() -> Iterator[WhipServer]:
    server = WhipServer()
    yield server
    server.stop()


def _call(tmp_path: Path, endpoints: list[str], mode: str = "call", token: str = "car-token",
          **incident: Any) -> dict[str, dict[str, Any]]:
    token_file = tmp_path / "call.token"
    token_file.write_text(token + "\n")
    return {"call": {"endpoints": endpoints, "token_file": str(token_file), "mode": mode,
                     "connect_timeout": 5.0, "redial_max_seconds": 1.0, "speaker": "none"},
            "ice": {"interfaces": ["127.0.0.1"]},
            "incident": {"post_seconds": 3, **incident}}


def test_whip_mode_conforms_to_rfc9725(daemon: Any, whip: WhipServer, tmp_path: Path) -> None:
    d: Daemon = daemon(_call(tmp_path, [whip.url], mode="whip"))
    d.wait_buffered(1)
    d.trigger()
    session = wait_for(lambda: next((s for s in whip.sessions.values()
                                     if s.video_frames > 10 and s.audio_frames > 10), None),
                       20, "media at the WHIP server")
    offer = session.offer
    # One audio and one video m-line, both sendonly, no data channel (RFC 9725 4.2).
    media = [line.split()[0] for line in offer.splitlines() if line.startswith("m=")]
    assert media == ["m=audio", "m=video"], media
    assert offer.count("a=sendonly") == 2 and "a=sendrecv" not in offer
    assert "m=application" not in offer
    assert "H264" in offer and "opus" in offer.lower()
    assert session.headers["Content-Type"] == "application/sdp"
    assert session.headers["Authorization"] == "Bearer car-token"
    # The incident ends: the car DELETEs the session's Location with its token.
    wait_for(lambda: session.deleted, 20, "DELETE of the WHIP session")
    deletes = [h for m, h in whip.requests if m == "DELETE"]
    assert deletes and deletes[0]["Authorization"] == "Bearer car-token"


def test_first_endpoint_down_leads_to_next(daemon: Any, whip: WhipServer,
                                           tmp_path: Path) -> None:
    dead = "http://127.0.0.1:9/whip"  # discard port: refused at once
    d: Daemon = daemon(_call(tmp_path, [dead, whip.url]))
    d.trigger()
    wait_for(lambda: any(s.video_frames > 5 for s in whip.sessions.values()), 20,
             "the call on the second endpoint")
    call = d.status()["links"]["call"]
    assert call["call_state"] == "connected" and call["endpoint"] == whip.url


@pytest.mark.parametrize(("failure", "token", "expected"), [
    (None, "wrong-token", "401 Unauthorized: the dispatcher refused our token"),
    ("malformed", "car-token", "the answer is not an SDP"),
    ("bad-sdp", "car-token", "unusable SDP answer: ICE username fragment or password is "
                             "missing"),
    ("html", "car-token", "answer is text/html, not application/sdp"),
    ("no-location", "car-token", "201 without a Location"),
    ("500", "car-token", "500 Internal Server Error"),
])
def test_failures_give_clear_status(daemon: Any, whip: WhipServer, tmp_path: Path,
                                    failure: str | None, token: str, expected: str) -> None:
    whip.failure = failure
    d: Daemon = daemon(_call(tmp_path, [whip.url], token=token, post_seconds=30))
    d.wait_buffered(1)
    reply = d.trigger()
    call = wait_for(lambda: (c := d.status()["links"]["call"])["state"] == "degraded"
                    and expected in c["detail"] and c, 20, f"status saying {expected!r}")
    assert call["attempts"] >= 1
    # The evidence is recorded whatever the call does.
    assert d.status()["state"] in ("triggered", "ending")
    d.stop()
    clipcheck.check_clip(d.incident_dir(reply["incident"]) / "clip.mp4")


def test_relay_only_call_through_local_turn(daemon: Any, whip: WhipServer,
                                            tmp_path: Path) -> None:
    from turn import TurnServer

    turn = TurnServer(tmp_path / "turn")
    try:
        password = tmp_path / "turn.password"
        password.write_text(turn.password + "\n")
        config = _call(tmp_path, [whip.url])
        config["ice"] = {"interfaces": ["127.0.0.1"], "turn_urls": [turn.url],
                         "turn_username": turn.user, "turn_password_file": str(password),
                         "relay_only": True}
        d: Daemon = daemon(config)
        d.wait_buffered(1)
        d.trigger()
        session = wait_for(lambda: next((s for s in whip.sessions.values()
                                         if s.video_frames > 10), None), 20,
                           "video through the relay")
        offer = session.offer
        candidates = [line for line in offer.splitlines() if line.startswith("a=candidate")]
        assert candidates and all(" typ relay" in c for c in candidates), candidates
        assert turn.allocations_seen() >= 1
    finally:
        turn.stop()


def test_new_incident_right_after_one_ends_still_calls(daemon: Any, whip: WhipServer,
                                                       tmp_path: Path) -> None:
    """The first incident finishing its evidence must not hang up the next one's call."""
    config = _call(tmp_path, [whip.url], post_seconds=1)
    config["incident"]["cancel_grace_seconds"] = 30
    d: Daemon = daemon(config)
    d.trigger()
    wait_for(lambda: len(whip.sessions) == 1, 15, "the first call")
    assert d.request("cancel")["ok"]
    wait_for(lambda: d.status()["state"] in ("idle", "cooldown"), 15, "the first to end")
    d.trigger()  # while the first may still be writing its files
    wait_for(lambda: len(whip.sessions) == 2 and any(
        s.video_frames > 10 for s in list(whip.sessions.values())[1:]), 15, "the second call")
    call = d.status()["links"]["call"]
    assert call["call_state"] == "connected", call
