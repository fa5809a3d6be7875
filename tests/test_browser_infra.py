"""The headless Chromium helper works here: a page from a loopback server sends the fake
camera and the fake microphone (an 880 Hz sine) from one RTCPeerConnection to another in
the same page, over 127.0.0.1 only (a STUN server on 127.0.0.1 gives the loopback-only
browser its candidates); video frames are decoded and the tone is heard."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from browser import Browser, StunServer, chromium_available
from turn import TurnServer

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "artifacts"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>dashsos browser check</title>
<style>
 body { font: 15px sans-serif; margin: 16px; background: #f4f4f4; }
 video { width: 480px; height: 360px; background: #000; margin-right: 12px; }
 #out { white-space: pre; font-family: monospace; margin-top: 8px; }
</style></head>
<body>
<h1>dashsos: Chromium loopback WebRTC check</h1>
<video id="local" autoplay muted playsinline></video>
<video id="remote" autoplay playsinline></video>
<div id="out">waiting</div>
<script>
console.log("dashsos-console-check", 42);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const show = (o) => { document.getElementById("out").textContent = JSON.stringify(o, null, 1); };

function trickle(log, to) {
  return (e) => {
    if (!e.candidate || !e.candidate.candidate) return;
    log.push({address: e.candidate.address, type: e.candidate.type, line: e.candidate.candidate});
    to.addIceCandidate(e.candidate);
  };
}

async function inbound(pc, kind) {
  let found = null;
  (await pc.getStats()).forEach((r) => {
    if (r.type === "inbound-rtp" && r.kind === kind) found = r;
  });
  return found;
}

async function selectedPair(pc) {
  const stats = await pc.getStats();
  let pair = null;
  stats.forEach((r) => {
    if (r.type === "transport" && r.selectedCandidatePairId) {
      pair = stats.get(r.selectedCandidatePairId);
    }
  });
  if (!pair) return null;
  const l = stats.get(pair.localCandidateId), rm = stats.get(pair.remoteCandidateId);
  return {local: `${l.candidateType} ${l.address}:${l.port}`,
          remote: `${rm.candidateType} ${rm.address}:${rm.port}`};
}

async function loopback(config) {
  const t0 = performance.now();
  const result = {candidates: {a: [], b: []}};
  const stream = await navigator.mediaDevices.getUserMedia({
    video: {width: 640, height: 480},
    // A steady sine is what noise suppression removes: keep the capture raw.
    audio: {echoCancellation: false, noiseSuppression: false, autoGainControl: false},
  });
  result.getUserMediaMs = performance.now() - t0;
  document.getElementById("local").srcObject = stream;
  const a = new RTCPeerConnection(config);
  const b = new RTCPeerConnection(config);
  a.onicecandidate = trickle(result.candidates.a, b);
  b.onicecandidate = trickle(result.candidates.b, a);
  const remote = new Promise((r) => { b.ontrack = (e) => r(e.streams[0]); });
  stream.getTracks().forEach((t) => a.addTrack(t, stream));
  const offer = await a.createOffer();
  await b.setRemoteDescription(offer);
  await a.setLocalDescription(offer);
  const answer = await b.createAnswer();
  await a.setRemoteDescription(answer);
  await b.setLocalDescription(answer);
  const rs = await remote;
  document.getElementById("remote").srcObject = rs;

  let video = null;
  while (performance.now() - t0 < 15000) {
    video = await inbound(b, "video");
    if (video && video.framesDecoded > 0) break;
    await sleep(10);
  }
  result.firstFrameMs = performance.now() - t0;
  result.framesDecoded = video ? video.framesDecoded : 0;

  // The remote audio, also played by the <video> element (WebAudio hears a remote track
  // only while a media element plays it).
  const ctx = new AudioContext();
  await ctx.resume();
  const analyser = ctx.createAnalyser();
  analyser.fftSize = 8192;
  analyser.smoothingTimeConstant = 0;
  ctx.createMediaStreamSource(new MediaStream(rs.getAudioTracks())).connect(analyser);
  const bins = new Float32Array(analyser.frequencyBinCount);
  const wave = new Float32Array(analyser.fftSize);
  result.audio = {sampleRate: ctx.sampleRate, peaks: []};
  const deadline = performance.now() + 8000;
  while (performance.now() < deadline && result.audio.peaks.length < 5) {
    await sleep(250);
    analyser.getFloatTimeDomainData(wave);
    const rms = Math.sqrt(wave.reduce((s, x) => s + x * x, 0) / wave.length);
    if (rms < 0.01) continue;
    analyser.getFloatFrequencyData(bins);
    let peak = 1;
    for (let i = 1; i < bins.length; i++) if (bins[i] > bins[peak]) peak = i;
    result.audio.peaks.push({hz: peak * ctx.sampleRate / analyser.fftSize, db: bins[peak], rms});
  }
  const audio = await inbound(b, "audio");
  result.audio.audioLevel = audio ? audio.audioLevel : null;
  result.audio.totalAudioEnergy = audio ? audio.totalAudioEnergy : null;
  result.audio.packetsReceived = audio ? audio.packetsReceived : 0;
  result.framesDecodedLater = (await inbound(b, "video")).framesDecoded;
  result.pair = await selectedPair(b);
  result.totalMs = performance.now() - t0;
  show(result);
  await sleep(300);  // a few more frames painted before the screenshot
  return result;
}
</script></body></html>
"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture
def page_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/check.html"
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def _tools() -> None:
    # Like conftest's _require: a missing tool fails (a skip would pass CI unseen).
    if not chromium_available():
        pytest.fail("needs chromium, chromium-driver (apt) and selenium (pip)")
    if shutil.which("turnserver") is None:
        pytest.fail("needs coturn (apt)")


def test_loopback_call_in_chromium(tmp_path: Path, page_url: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    stun = StunServer()
    started = time.monotonic()
    b = Browser(tmp_path, fake_audio_hz=880.0)
    try:
        b.open(page_url)
        opened = time.monotonic()
        config = {"iceServers": [{"urls": stun.url}]}
        result = b.eval_async(f"loopback({json.dumps(config)})", timeout=30)
        shot = b.screenshot(ARTIFACTS / "browser-infra.png")
        console = b.console_log()
    finally:
        b.close()
        stun.close()
    first_frame = result["firstFrameMs"] / 1000  # from getUserMedia in the page
    timings = {"launch_s": round(b.launch_seconds, 3),
               "page_load_s": round(opened - started - b.launch_seconds, 3),
               "page_first_frame_s": round(first_frame, 3),
               "launch_to_first_frame_s": round(opened - started + first_frame, 3)}
    (ARTIFACTS / "browser-infra.json").write_text(json.dumps({**timings, **result}, indent=1))
    print(timings, result["pair"], result["audio"])

    # Only loopback addresses carried the call: every candidate either side offered is
    # 127.0.0.1 (server-reflexive, from the STUN server), and so is the pair in use. Its
    # local end may be peer-reflexive (learnt from the other side's check response before
    # the STUN answer, which Chromium then drops as a duplicate); a peer-reflexive remote's
    # address is hidden by Chromium's stats.
    offered = result["candidates"]["a"] + result["candidates"]["b"]
    assert offered and all(c["address"] == "127.0.0.1" for c in offered), offered
    assert stun.requests >= 2
    assert result["pair"] is not None, result
    assert " 127.0.0.1:" in result["pair"]["local"], result["pair"]
    assert result["pair"]["remote"].startswith("prflx :") or \
        " 127.0.0.1:" in result["pair"]["remote"], result["pair"]

    assert result["framesDecoded"] > 0, result
    assert result["framesDecodedLater"] > result["framesDecoded"], result

    audio = result["audio"]
    assert audio["packetsReceived"] > 0, audio
    assert audio["audioLevel"] and audio["audioLevel"] > 0.05, audio
    assert len(audio["peaks"]) >= 3, audio
    bin_hz = audio["sampleRate"] / 8192
    for peak in audio["peaks"]:
        assert abs(peak["hz"] - 880) <= 2 * bin_hz, audio

    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # two videos and text, not a blank page

    texts = [e["message"] for e in console]
    assert any('"dashsos-console-check" 42' in m for m in texts), texts


def test_relay_only_call_in_chromium(tmp_path: Path, page_url: str) -> None:
    """The same call relay-only through a private coturn on 127.0.0.1, as a dispatcher
    behind a firewall would make it."""
    turn = TurnServer(tmp_path / "turn")
    b = Browser(tmp_path / "browser", fake_audio_hz=880.0)
    try:
        b.open(page_url)
        config = {"iceServers": [turn.ice_server()], "iceTransportPolicy": "relay"}
        result = b.eval_async(f"loopback({json.dumps(config)})", timeout=30)
    finally:
        b.close()
        turn.stop()
    print(f"relay: first frame {result['firstFrameMs'] / 1000:.3f} s", result["pair"])

    offered = result["candidates"]["a"] + result["candidates"]["b"]
    assert offered and all(c["type"] == "relay" and c["address"] == "127.0.0.1"
                           for c in offered), offered
    assert result["pair"]["local"].startswith("relay 127.0.0.1:"), result["pair"]
    assert result["pair"]["remote"].startswith("relay 127.0.0.1:"), result["pair"]
    assert result["framesDecoded"] > 0, result
    assert result["audio"]["peaks"], result["audio"]
    assert turn.allocations_seen() >= 2, turn.log()
