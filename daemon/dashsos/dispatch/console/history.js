// dashsos dispatch console, part 3: history. An ended call's desk recording plays in the
// call's own video element; the evidence a car uploaded plays in the player below, with
// the desk's verdict on its signature. The last script: it starts the console.
"use strict";

const PLAYABLE = /\.(mp4|m4a|webm)$/i;

function showRecording(call) {
  const video = $("video");
  if (call.state === "ended") {
    const url = `/api/calls/${encodeURIComponent(call.id)}/media`;
    $("playback").hidden = false;
    if (video.dataset.recording === call.id) return; // already loaded: leave it playing
    video.dataset.recording = call.id;
    video.srcObject = null;
    video.autoplay = false; // a recording starts when the operator says so ...
    video.preload = "none"; // ... and is fetched only then: the audit's "playback"
    video.controls = true;
    video.src = url;
    $("playback").textContent = "Recorded at the desk: what the car sent.";
  } else if (video.dataset.recording) {
    delete video.dataset.recording;
    video.removeAttribute("src");
    video.controls = false;
    video.autoplay = true;
    video.preload = "auto";
    video.load();
    $("playback").hidden = true;
  }
}

function openPlayer(entry, name) {
  const base = [entry.vehicle_id, entry.incident, name].map(encodeURIComponent).join("/");
  $("player").hidden = false;
  $("player-title").textContent = `Evidence: ${entry.vehicle_id} — ${entry.incident} — ${name}`;
  const badge = evidenceBadge(entry);
  badge.id = "player-verdict";
  $("player-verdict").replaceWith(badge);
  $("player-note").textContent = entry.verified === true
    ? `Signature verified (key ${entry.fingerprint || "?"}).`
    : entry.verified === false ? `NOT verified: ${(entry.problems || []).join("; ") || "?"}`
    : "Still arriving: not verified yet.";
  const video = $("player-video");
  video.dataset.evidence = `${entry.vehicle_id}/${entry.incident}/${name}`;
  video.src = `/api/evidence/${base}`;
  video.play().catch(() => {}); // the operator asked for it: play at once
  $("player").scrollIntoView({ block: "nearest" });
}

function closePlayer() {
  const video = $("player-video");
  video.pause();
  video.removeAttribute("src");
  delete video.dataset.evidence;
  video.load();
  $("player").hidden = true;
}

function decorateEvidence(item, entry) {
  for (const name of Object.keys(entry.files || {})) {
    if (!PLAYABLE.test(name)) continue;
    const play = document.createElement("button");
    play.type = "button";
    play.className = "play";
    play.dataset.file = name;
    play.textContent = `Play ${name}`;
    play.addEventListener("click", () => openPlayer(entry, name));
    item.append(play);
  }
}

function mediaState(video) {
  return { src: video.currentSrc || null, readyState: video.readyState,
    currentTime: video.currentTime, duration: video.duration, paused: video.paused,
    error: video.error ? video.error.code : null, width: video.videoWidth,
    height: video.videoHeight };
}

Object.assign(window.dashsos, {
  recording: () => mediaState($("video")),
  player: () => mediaState($("player-video")),
  playEvidence: (vehicle, incident, name) => {
    const entry = evidence.get(`${vehicle}/${incident}`);
    if (!entry) throw new Error(`no evidence ${vehicle}/${incident}`);
    openPlayer(entry, name);
  },
});

$("player-close").addEventListener("click", closePlayer);
$("video").addEventListener("error", () => {
  if ($("video").dataset.recording) $("playback").textContent = "No recording to play.";
});

// --- start: the console if this browser has a session, else the login form ---

(async () => {
  try {
    me = await whoAmI();
  } catch (error) {
    showLogin(String(error.message || error));
    return;
  }
  if (me === null) {
    showLogin();
    return;
  }
  showConsole();
  listen();
})();
