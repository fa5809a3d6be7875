"""The WHIP session lifecycle against a server that allows one session per endpoint, as
common WHIP front ends do (issue 11): every created session is DELETEd, a failed DELETE
is retried until it works, a far end that dies silently is noticed within 5 s, and the
offer and redirects follow RFC 9725."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Daemon, wait_for
from dashsos.call.ice import ice_configuration
from dashsos.call.signalling import IceServer, parse_ice_links, redirect_refusal, sanitise
from dashsos.config import IceConfig
from whipserver import WhipServer


@pytest.fixture
def whip() -> Iterator[WhipServer]:
    server = WhipServer(single=True)
    yield server
    server.stop()


def _car(tmp_path: Path, endpoints: list[str], mode: str = "whip",
         **incident: Any) -> dict[str, dict[str, Any]]:
    token_file = tmp_path / "call.token"
    token_file.write_text("car-token\n")
    return {"call": {"endpoints": endpoints, "token_file": str(token_file), "mode": mode,
                     "connect_timeout": 3.0, "redial_max_seconds": 1.0, "speaker": "none"},
            "ice": {"interfaces": ["127.0.0.1"]},
            "incident": {"post_seconds": 60, "cancel_grace_seconds": 30, **incident}}


def _on_air(whip: WhipServer, after: int = 0) -> Any:
    """A session created after the first `after` ones that receives video and audio."""
    sessions = list(whip.sessions.values())[after:]
    return next((s for s in sessions if not s.deleted and s.video_frames > 5
                 and s.audio_frames > 5), None)


def test_session_failing_after_201_is_deleted(daemon: Any, whip: WhipServer,
                                              tmp_path: Path) -> None:
    whip.failure = "ice-timeout"  # 201, then no media path
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.trigger()
    wait_for(lambda: len(whip.sessions) >= 2, 30, "a failed call and its re-dial")
    wait_for(lambda: all(s.deleted for s in list(whip.sessions.values())[:2]), 10,
             "the failed sessions DELETEd")
    assert whip.refusals == 0  # the endpoint was free for every re-dial
    call = d.status()["links"]["call"]
    assert "connection failed" in call["detail"] or "no media path" in call["detail"], call
    whip.failure = None
    wait_for(lambda: _on_air(whip), 20, "the call once the server answers well")
    assert len(whip.live()) == 1


def test_hang_up_while_the_server_answers_deletes_its_session(daemon: Any, whip: WhipServer,
                                                              tmp_path: Path) -> None:
    whip.failure = "slow"  # the 201 comes 1 s after the POST
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.trigger()
    wait_for(lambda: any(m == "POST" for m, _ in whip.requests), 10, "the POST")
    assert d.request("cancel")["ok"]
    wait_for(lambda: len(whip.sessions) == 1, 10, "the 201")
    wait_for(lambda: not whip.live(), 10, "the DELETE of a session created while hanging up")
    call = wait_for(lambda: (c := d.status()["links"]["call"])["call_state"] == "idle" and c,
                    10, "idle")
    assert not call["detail"].startswith("connected"), call


def test_far_end_killed_without_dtls_close(daemon: Any, whip: WhipServer,
                                           tmp_path: Path) -> None:
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.wait_buffered(1)
    d.trigger()
    first = wait_for(lambda: _on_air(whip), 20, "the call")
    whip.kill_sessions()
    killed = time.monotonic()
    wait_for(lambda: first.deleted, 10, "the car to notice and DELETE the dead session")
    noticed = time.monotonic() - killed
    second = wait_for(lambda: _on_air(whip, after=1), 10, "the re-dial")
    back = time.monotonic() - killed
    print(f"far end killed: noticed in {noticed:.1f} s, back on the air in {back:.1f} s")
    assert noticed < 5, noticed
    assert back < 5, back
    assert whip.live() == [second] and whip.refusals == 0


def test_failed_delete_is_retried_until_the_endpoint_is_free(daemon: Any, whip: WhipServer,
                                                             tmp_path: Path) -> None:
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.wait_buffered(1)
    d.trigger()
    first = wait_for(lambda: _on_air(whip), 20, "the call")
    whip.delete_failure = 503
    whip.kill_sessions()
    # The car notices, cannot DELETE, re-dials and is refused: the endpoint is busy,
    # which is not a token problem.
    call = wait_for(lambda: (c := d.status()["links"]["call"])["pending_deletes"] == 1
                    and "403" in c["detail"] and c, 20, "a 403 for the busy endpoint")
    assert "Endpoint ID already in use" in call["detail"], call
    assert "token" not in call["detail"], call
    assert not first.deleted
    whip.delete_failure = None
    recovered = time.monotonic()
    wait_for(lambda: first.deleted, 10, "the DELETE on a retry")
    wait_for(lambda: _on_air(whip, after=1), 10, "the call after the endpoint is free")
    back = time.monotonic() - recovered
    print(f"DELETE failure: back on the air {back:.1f} s after the server recovered")
    assert back < 5, back
    assert len(whip.live()) == 1
    assert d.status()["links"]["call"]["pending_deletes"] == 0


def test_incident_end_deletes_and_status_goes_idle(daemon: Any, whip: WhipServer,
                                                    tmp_path: Path) -> None:
    d: Daemon = daemon(_car(tmp_path, [whip.url], post_seconds=3))
    d.trigger()
    session = wait_for(lambda: _on_air(whip), 20, "the call")
    wait_for(lambda: session.deleted, 20, "the DELETE at the incident's end")
    call = wait_for(lambda: (c := d.status()["links"]["call"])["call_state"] == "idle" and c,
                    10, "idle")
    assert not call["detail"].startswith("connected"), call


def test_offer_is_max_bundle_with_rtcp_mux_only(daemon: Any, whip: WhipServer,
                                                tmp_path: Path) -> None:
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.trigger()
    session = wait_for(lambda: _on_air(whip), 20, "the call")
    sections = session.offer.split("\r\nm=")[1:]
    assert len(sections) == 2
    mids = [line[6:] for s in sections for line in s.split("\r\n") if line.startswith("a=mid:")]
    groups = [line for line in session.offer.split("\r\n") if line.startswith("a=group:")]
    assert groups == ["a=group:BUNDLE " + " ".join(mids)], groups
    for section in sections:
        assert "a=rtcp-mux\r\n" in section and "a=rtcp-mux-only" in section, section
    # One transport: the same ICE credentials and candidates for every m-line.
    ufrags = {line for s in sections for line in s.split("\r\n")
              if line.startswith("a=ice-ufrag:")}
    assert len(ufrags) == 1, ufrags
    ports = {line.split()[5] for line in session.offer.split("\r\n")
             if line.startswith("a=candidate")}
    assert len(ports) == 1, ports


def test_answer_rejecting_video_keeps_audio(daemon: Any, whip: WhipServer,
                                            tmp_path: Path) -> None:
    whip.failure = "reject-video"
    d: Daemon = daemon(_car(tmp_path, [whip.url]))
    d.trigger()
    session = wait_for(lambda: next((s for s in whip.sessions.values()
                                     if s.audio_frames > 20), None), 20, "audio at the server")
    assert session.video_frames == 0
    call = d.status()["links"]["call"]
    assert call["call_state"] == "connected", call
    assert "audio only" in call["detail"] and "video" in call["detail"], call
    assert call["refused_media"] == ["video"]


def test_redirect_to_another_origin_is_refused_without_the_token(daemon: Any,
                                                                 whip: WhipServer,
                                                                 tmp_path: Path) -> None:
    other = WhipServer()
    try:
        whip.redirect_to = other.url
        d: Daemon = daemon(_car(tmp_path, [f"http://127.0.0.1:{whip.port}/redirect"]))
        d.trigger()
        call = wait_for(lambda: "redirect" in (c := d.status()["links"]["call"])["detail"]
                        and c, 15, "the refused redirect in status")
        assert "another origin" in call["detail"], call
        time.sleep(1)
        assert other.requests == []  # the token never left for the other origin
    finally:
        other.stop()


def test_https_redirect_to_http_is_refused_without_the_token(daemon: Any,
                                                           tmp_path: Path) -> None:
    import ssl

    from mqttbroker import make_certs

    certs = make_certs(tmp_path / "certs")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certs["cert"], certs["key"])
    secure, plain = WhipServer(tls=tls), WhipServer()
    try:
        secure.redirect_to = plain.url  # http: the token would travel in clear text
        config = _car(tmp_path, [f"https://127.0.0.1:{secure.port}/redirect"])
        config["call"]["ca_file"] = str(certs["ca"])
        d: Daemon = daemon(config)
        d.trigger()
        call = wait_for(lambda: "redirect" in (c := d.status()["links"]["call"])["detail"]
                        and c, 15, "the refused redirect in status")
        assert "from https to http" in call["detail"] and "refused" in call["detail"], call
        assert [m for m, _ in secure.requests] and \
            secure.requests[0][1]["Authorization"] == "Bearer car-token"  # over TLS
        time.sleep(1)
        assert plain.requests == []  # nothing, let alone the token, went in clear text
    finally:
        secure.stop()
        plain.stop()


def test_same_origin_redirect_is_followed(daemon: Any, whip: WhipServer,
                                          tmp_path: Path) -> None:
    whip.redirect_to = "/whip"
    d: Daemon = daemon(_car(tmp_path, [f"http://127.0.0.1:{whip.port}/redirect"]))
    d.trigger()
    wait_for(lambda: _on_air(whip), 20, "the call through the redirect")


def test_redirect_policy() -> None:
    https = "https://desk.example/whip"
    assert "clear text" in (redirect_refusal(https, "http://desk.example/whip", ()) or "")
    assert "another origin" in (redirect_refusal(https, "https://evil.example/whip", ()) or "")
    assert redirect_refusal(https, "https://desk.example:443/x", ()) is None
    assert redirect_refusal("http://desk.example/whip", "https://desk.example/whip",
                            ("https://desk.example",)) is None  # an upgrade, allowed
    assert redirect_refusal(https, "https://sfu2.example/whip",
                            ("https://sfu2.example:443",)) is None
    assert "scheme" in (redirect_refusal(https, "ftp://desk.example/x", ()) or "")


def test_errors_are_sanitised() -> None:
    assert sanitise("<html><body><h1>403</h1>\x1b[31mbusy\nnow</body></html>") == \
        "403 [31mbusy now"
    assert len(sanitise("x" * 1000)) == 120


def test_ice_servers_from_link_headers() -> None:
    links = parse_ice_links([
        '<stun:stun.example.net>; rel="ice-server"',
        '<turn:turn.example.net?transport=udp>; rel="ice-server"; username="user"; '
        'credential="pass"; credential-type="password", <https://x.example>; rel="other"'])
    assert links == (IceServer("stun:stun.example.net"),
                     IceServer("turn:turn.example.net?transport=udp", "user", "pass"))
    off = ice_configuration(IceConfig(), offered=links)
    assert off.iceServers == []
    on = ice_configuration(IceConfig(from_server=True), offered=links)
    assert [s.urls for s in on.iceServers or []] == [
        "stun:stun.example.net", "turn:turn.example.net?transport=udp"]
    assert (on.iceServers or [])[1].username == "user"


def test_link_ice_servers_are_used_on_the_next_dial(daemon: Any, whip: WhipServer,
                                                    tmp_path: Path) -> None:
    from turn import TurnServer

    turn = TurnServer(tmp_path / "turn")
    try:
        whip.ice_links = [f'<{turn.url}>; rel="ice-server"; username="{turn.user}"; '
                          f'credential="{turn.password}"; credential-type="password"']
        config = _car(tmp_path, [whip.url], post_seconds=1)
        config["ice"]["from_server"] = True
        d: Daemon = daemon(config)
        d.trigger()
        wait_for(lambda: _on_air(whip), 20, "the first call")
        assert d.request("cancel")["ok"]
        wait_for(lambda: not whip.live(), 15, "the first call to end")
        wait_for(lambda: d.status()["state"] in ("idle", "cooldown"), 15, "the incident to end")
        d.trigger()
        second = wait_for(lambda: _on_air(whip, after=1), 20, "the second call")
        assert " typ relay" in second.offer
        assert turn.allocations_seen() >= 1
    finally:
        turn.stop()


def test_unreachable_https_endpoint_status_is_readable(daemon: Any, tmp_path: Path) -> None:
    d: Daemon = daemon(_car(tmp_path, ["https://127.0.0.1:9/whip"], mode="call"))
    d.trigger()
    call = wait_for(lambda: (c := d.status()["links"]["call"])["state"] == "degraded" and c,
                    15, "the failure in status")
    assert "SSLContext" not in call["detail"] and "object at 0x" not in call["detail"], call
    assert "cannot connect to 127.0.0.1:9" in call["detail"], call
