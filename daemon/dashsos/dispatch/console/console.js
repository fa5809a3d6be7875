// dashsos dispatch console: calls from /api/calls and /api/events, the open call watched
// over WebRTC (POST /api/calls/<id>/watch), the operator's microphone sent back.
// operators.js (login, ringing, take), streetmap.js (the fleet on a street map) and
// history.js (playback) load after this file and share its globals; their functions are
// only called once every script has loaded. No build step; nothing is loaded from
// elsewhere but the map's tiles. Car data is shown with textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
const calls = new Map(); // id -> call JSON as the API gives it
let selected = null; // id of the call on screen
let watch = null; // {pc, id (watcher id), call, mic, stream, firstFrameAt}

// --- API ---

async function api(method, path, body, type) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    options.body = type ? body : JSON.stringify(body);
    options.headers["Content-Type"] = type || "application/json";
  }
  const response = await fetch(path, options);
  if (!response.ok) {
    throw new Error(`${method} ${path}: ${response.status} ${(await response.text()).trim()}`);
  }
  return response;
}

function status(text) {
  $("status").textContent = text;
}

// --- call list ---

// A call is ringing or connected while it is on; then saving (the desk finishes its
// recording) and ended (media.mp4 is whole: it plays here).
function isLive(call) {
  return call.state === "ringing" || call.state === "connected";
}

function order() {
  const all = [...calls.values()];
  all.sort((a, b) => (isLive(b) - isLive(a)) || (b.started > a.started ? 1 : -1));
  return all;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "—";
}

function renderList() {
  const list = $("calls");
  list.replaceChildren();
  for (const call of order()) {
    const item = document.createElement("li");
    item.dataset.id = call.id;
    item.setAttribute("aria-selected", String(call.id === selected));
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = call.vehicle_id + " ";
    const badge = document.createElement("span");
    badge.className = `badge ${call.state}`;
    badge.textContent = call.state;
    who.append(badge);
    if (call.msd && call.msd.duress) {
      const duress = document.createElement("span");
      duress.className = "badge duress";
      duress.textContent = "DURESS";
      who.append(" ", duress);
    }
    if (call.msd && call.msd.test) {
      const test = document.createElement("span");
      test.className = "badge test";
      test.textContent = "test";
      who.append(" ", test);
    }
    const proof = callEvidence(call);
    if (proof) who.append(" ", evidenceBadge(proof));
    const info = document.createElement("div");
    info.className = "when";
    const trigger = call.msd && call.msd.trigger ? ` · ${call.msd.trigger.kind}` : "";
    info.textContent = when(call.started) + trigger;
    item.append(who, info);
    decorateCall(item, call); // operators.js: ringing, owner
    item.addEventListener("click", () => select(call.id));
    list.append(item);
  }
  $("no-calls").hidden = calls.size > 0;
  ringCheck();
  refreshMap(); // streetmap.js: calls carry positions too
}

// --- the selected call ---

function vin(structure) {
  const v = structure && structure.vehicleIdentificationNumber;
  return v ? `${v.isowmi}${v.isovds}${v.isovisModelyear}${v.isovisSeqPlant}` : "unknown";
}

function renderMsd(call) {
  const rows = [["Vehicle", call.vehicle_id]];
  const incident = call.msd;
  if (!incident) {
    rows.push(["MSD", call.mode === "whip" ? "none (WHIP ingest call)" : "not received yet"]);
  } else {
    const msd = incident.msd || {};
    const structure = msd.msdStructure || {};
    const control = structure.control || {};
    const decoded = msd.decoded || {};
    const position = incident.position;
    const lat = decoded.latitude ?? (position && position.lat);
    const lon = decoded.longitude ?? (position && position.lon);
    rows.push(
      ["VIN", vin(structure)],
      ["Time", when(decoded.time || incident.time)],
      ["Trigger", incident.trigger ? `${incident.trigger.kind} (${incident.trigger.source})` : "—"],
      ["Activation", control.automaticActivation ? "automatic" : "manual"],
      ["Test call", (control.testCall ?? incident.test) ? "YES — test call" : "no"],
      ["Position", lat != null && lon != null ? `${lat.toFixed(6)}, ${lon.toFixed(6)}` : "unknown"],
      ["Trusted", control.positionCanBeTrusted ? "yes" : "no"],
      ["Direction", decoded.direction_degrees != null ? `${decoded.direction_degrees}°` : "unknown"],
      ["Incident", `${incident.id || "?"} · ${incident.phase || "?"}`],
    );
    if (incident.covert) rows.push(["Covert", "yes: the car does not play your voice"]);
    if (incident.duress) {
      rows.push(["DURESS", `coerced cancel (${incident.duress.source || "?"}) at ` +
                 `${when(incident.duress.time)}: the car looks cancelled, the call goes on`]);
    }
    const proof = callEvidence(call);
    rows.push(["Evidence", proof ? `${verdict(proof)}${proof.problems && proof.problems.length
      ? `: ${proof.problems[0]}` : ""}` : "not uploaded yet"]);
  }
  const list = $("msd");
  list.replaceChildren();
  for (const [name, value] of rows) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    list.append(dt, dd);
  }
}

function renderDetail() {
  const call = calls.get(selected);
  $("detail").hidden = !call;
  if (!call) return;
  $("title").textContent = `${call.vehicle_id} — ${call.id}`;
  $("state").textContent = (call.end_reason ? `${call.state}: ${call.end_reason}` : call.state) +
    (call.recording_error ? ` — RECORDING FAILED: ${call.recording_error}` : "");
  $("state").className = `badge ${call.state}`;
  const live = isLive(call);
  for (const id of ["talk", "mute", "position", "hangup"]) $(id).disabled = !live;
  $("position").disabled = !live || call.mode === "whip";
  // Through Janus the operator watches and listens; the car hears nobody.
  for (const id of ["talk", "mute"]) if (call.media === "janus") $(id).disabled = true;
  renderOwner(call); // operators.js: who took it; only they talk and hang up
  $("media-note").textContent = live ? ""
    : call.state === "saving" ? "Saving the recording…" : `Recording kept at ${call.recording}`;
  showRecording(call); // history.js: an ended call's recording plays here
  $("duress").hidden = !(call.msd && call.msd.duress);
  renderMsd(call);
  drawTrail(call.trail || []);
  const last = call.last_fix;
  $("fix").textContent = last
    ? `Last fix ${when(last.time || last.received)}` +
      (last.speed != null ? ` · ${(last.speed * 3.6).toFixed(0)} km/h` : "") +
      (last.heading != null ? ` · heading ${last.heading.toFixed(0)}°` : "")
    : "No position yet.";
}

async function select(id) {
  if (selected === id && watch) return;
  selected = id;
  renderList();
  renderDetail();
  centreOn(calls.get(id)); // streetmap.js
  await unwatch();
  const call = calls.get(id);
  if (call && isLive(call)) await openWatch(call);
}

// --- position trail: equirectangular, fitted to the trail, with a scale bar ---

const METRES_PER_DEGREE = 111320;

function drawTrail(trail) {
  const canvas = $("map");
  const g = canvas.getContext("2d");
  const { width, height } = canvas;
  g.clearRect(0, 0, width, height);
  const points = trail.filter((f) => Number.isFinite(f.lat) && Number.isFinite(f.lon));
  if (!points.length) {
    g.fillStyle = "#626b7a";
    g.font = "14px system-ui";
    g.fillText("No position yet", 16, 28);
    return;
  }
  const lats = points.map((p) => p.lat);
  const lons = points.map((p) => p.lon);
  const midLat = (Math.min(...lats) + Math.max(...lats)) / 2;
  const kx = Math.cos((midLat * Math.PI) / 180); // a degree of longitude is this short
  // Metres east/north of the south-west corner; at least 100 m across so a car standing
  // still is a dot in a readable frame, not a zoom into GPS noise.
  const x0 = Math.min(...lons), y0 = Math.min(...lats);
  const xy = points.map((p) => [(p.lon - x0) * kx * METRES_PER_DEGREE,
                                (p.lat - y0) * METRES_PER_DEGREE]);
  const spanX = Math.max(100, ...xy.map((p) => p[0]));
  const spanY = Math.max(100, ...xy.map((p) => p[1]));
  const pad = 24;
  const scale = Math.min((width - 2 * pad) / spanX, (height - 2 * pad) / spanY); // px/m
  const offX = (width - spanX * scale) / 2, offY = (height - spanY * scale) / 2;
  const px = ([x, y]) => [offX + x * scale, height - (offY + y * scale)];

  g.lineWidth = 3;
  g.strokeStyle = "#3b5bdb";
  g.beginPath();
  xy.forEach((p, i) => (i ? g.lineTo(...px(p)) : g.moveTo(...px(p))));
  g.stroke();
  const [sx, sy] = px(xy[0]);
  g.fillStyle = "#626b7a";
  g.beginPath();
  g.arc(sx, sy, 4, 0, 2 * Math.PI);
  g.fill();
  const [cx, cy] = px(xy[xy.length - 1]);
  g.fillStyle = "#b3261e";
  g.beginPath();
  g.arc(cx, cy, 7, 0, 2 * Math.PI);
  g.fill();
  const heading = points[points.length - 1].heading;
  if (Number.isFinite(heading)) {
    const a = (heading * Math.PI) / 180;
    g.strokeStyle = "#b3261e";
    g.beginPath();
    g.moveTo(cx, cy);
    g.lineTo(cx + 18 * Math.sin(a), cy - 18 * Math.cos(a));
    g.stroke();
  }
  drawScale(g, scale, height);
  g.fillStyle = "#626b7a";
  g.font = "12px system-ui";
  g.fillText("N ↑", width - 36, 18);
}

function drawScale(g, pxPerMetre, height) {
  // The longest 1, 2 or 5 × 10^n metres that fits in 120 px.
  let metres = 1;
  for (const step of [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000,
    50000, 100000, 200000, 500000, 1000000]) {
    if (step * pxPerMetre <= 120) metres = step;
  }
  const length = metres * pxPerMetre;
  const y = height - 12;
  g.strokeStyle = "#1d2330";
  g.lineWidth = 2;
  g.beginPath();
  g.moveTo(12, y - 5);
  g.lineTo(12, y);
  g.lineTo(12 + length, y);
  g.lineTo(12 + length, y - 5);
  g.stroke();
  g.fillStyle = "#1d2330";
  g.font = "12px system-ui";
  g.fillText(metres >= 1000 ? `${metres / 1000} km` : `${metres} m`, 16 + length, y);
}

// --- watching: the car's video and audio in, the operator's microphone out ---

function gathered(pc, timeoutMs) {
  // The desk takes no trickled candidates: send the offer once gathering is done.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState === "complete") resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs);
  });
}

async function microphone() {
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
    return stream.getAudioTracks()[0] || null;
  } catch (error) {
    status(`No microphone: ${error.message}. You can watch but not talk.`);
    return null;
  }
}

async function iceConfig() {
  // The desk's STUN/TURN servers: without them a browser that hides its host
  // addresses (or sits behind NAT) cannot reach the desk.
  try {
    const response = await fetch("/api/ice", { credentials: "same-origin" });
    if (response.ok) return await response.json();
  } catch (error) {
    console.warn("no ICE config from the desk", error);
  }
  return { iceServers: [] };
}

async function openWatch(call) {
  const mine = { call: call.id, pc: null, id: null, mic: null, stream: new MediaStream(),
    openedAt: performance.now(), postedAt: null, firstFrameAt: null };
  watch = mine;
  status("Connecting…");
  // No talk-back through Janus: the car's publisher connection receives nothing.
  mine.mic = call.media === "janus" ? null : await microphone();
  if (watch !== mine) { // another call was selected meanwhile
    if (mine.mic) mine.mic.stop();
    return;
  }
  const pc = new RTCPeerConnection(await iceConfig());
  mine.pc = pc;
  pc.addEventListener("track", (event) => {
    mine.stream.addTrack(event.track);
    $("video").srcObject = mine.stream;
    $("video").play().catch(() => status("Click the video to start sound."));
  });
  pc.addEventListener("connectionstatechange", () => {
    if (watch !== mine) return;
    const state = pc.connectionState;
    if (state === "connected") status(mine.mic ? "Live. The car hears you." : "Live.");
    else if (state === "failed") status("Media connection failed.");
  });
  mine.postedAt = performance.now();
  try {
    if (call.media === "janus") await subscribeThroughJanus(call, mine, pc);
    else await watchThroughDesk(call, mine, pc);
  } catch (error) {
    status(String(error.message || error));
    pc.close();
    if (watch === mine) watch = null;
    return;
  }
  if (watch !== mine) {
    closeWatch(mine);
    return;
  }
  watchFrames(mine);
  updateMuteButton();
}

async function watchThroughDesk(call, mine, pc) {
  // The desk answers the browser's offer and relays the car's media itself.
  pc.addTransceiver("video", { direction: "recvonly" });
  if (mine.mic) pc.addTransceiver(mine.mic, { direction: "sendrecv" });
  else pc.addTransceiver("audio", { direction: "recvonly" });
  await pc.setLocalDescription(await pc.createOffer());
  await gathered(pc, 3000);
  const response = await api("POST", `/api/calls/${encodeURIComponent(call.id)}/watch`,
    pc.localDescription.sdp, "application/sdp");
  mine.id = response.headers.get("Location").split("/").pop();
  await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
}

async function subscribeThroughJanus(call, mine, pc) {
  // Janus carries the call: it offers (a VideoRoom subscriber), the browser answers.
  const response = await api("POST", `/api/calls/${encodeURIComponent(call.id)}/subscribe`);
  mine.id = response.headers.get("Location").split("/").pop();
  await pc.setRemoteDescription({ type: "offer", sdp: await response.text() });
  await pc.setLocalDescription(await pc.createAnswer());
  await gathered(pc, 3000);
  await api("PATCH", `/api/watchers/${mine.id}`, pc.localDescription.sdp, "application/sdp");
}

function watchFrames(mine) {
  const video = $("video");
  if (!("requestVideoFrameCallback" in video)) return; // getStats() fills in
  const onFrame = (now) => {
    if (watch !== mine) return;
    if (mine.firstFrameAt === null) mine.firstFrameAt = now;
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

function closeWatch(w) {
  if (w.pc) w.pc.close();
  if (w.mic) w.mic.stop();
  if (w.id) api("DELETE", `/api/watchers/${w.id}`).catch(() => {});
}

async function unwatch() {
  if (!watch) return;
  const w = watch;
  watch = null;
  closeWatch(w);
  $("video").srcObject = null;
  status("");
}

function updateMuteButton() {
  const muted = !!(watch && watch.mic && !watch.mic.enabled);
  $("mute").setAttribute("aria-pressed", String(muted));
  $("mute").textContent = muted ? "Unmute mic" : "Mute mic";
}

async function talk() {
  if (!watch || !watch.id) return;
  if (!watch.mic) {
    status("No microphone on this console.");
    return;
  }
  watch.mic.enabled = true;
  updateMuteButton();
  try {
    await api("POST", `/api/calls/${encodeURIComponent(watch.call)}/talk`, { watcher: watch.id });
    status("You have the car's speaker.");
  } catch (error) {
    status(String(error.message || error));
  }
}

function mute() {
  if (!watch || !watch.mic) return;
  watch.mic.enabled = !watch.mic.enabled;
  updateMuteButton();
}

async function command(what) {
  if (!selected) return;
  try {
    await api("POST", `/api/calls/${encodeURIComponent(selected)}/${what}`);
    status(what === "hangup" ? "Hung up." : "Position requested.");
  } catch (error) {
    status(String(error.message || error));
  }
}

// --- evidence the cars uploaded: GET /api/evidence, then "evidence" events ---

const evidence = new Map(); // "<vehicle id>/<incident id>" -> entry as the API gives it

function verdict(entry) {
  if (entry.verified === true) return "VERIFIED";
  return entry.verified === false ? "NOT VERIFIED" : "receiving";
}

function evidenceBadge(entry) {
  const badge = document.createElement("span");
  const kind = entry.verified === true ? "verified"
    : entry.verified === false ? "unverified" : "receiving";
  badge.className = `badge ${kind}`;
  badge.textContent = verdict(entry);
  if (entry.problems && entry.problems.length) badge.title = entry.problems[0];
  return badge;
}

function callEvidence(call) {
  // The car's MSD names its incident: the same id the upload carries.
  const id = call.msd && call.msd.id;
  return id ? evidence.get(`${call.vehicle_id}/${id}`) : undefined;
}

function evidenceList() {
  // index.html predates uploads: the section is added here, under the calls.
  let list = $("evidence");
  if (list) return list;
  const section = document.createElement("section");
  section.className = "evidence";
  const title = document.createElement("h2");
  title.textContent = "Evidence received";
  list = document.createElement("ul");
  list.id = "evidence";
  const none = document.createElement("p");
  none.id = "no-evidence";
  none.className = "muted";
  none.textContent = "No evidence uploaded yet.";
  section.append(title, list, none);
  document.querySelector("nav").append(section);
  return list;
}

function renderEvidence() {
  const list = evidenceList();
  list.replaceChildren();
  const all = [...evidence.values()].sort((a, b) => (b.incident > a.incident ? 1 : -1));
  for (const entry of all) {
    const item = document.createElement("li");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = `${entry.vehicle_id} `;
    who.append(evidenceBadge(entry));
    const info = document.createElement("div");
    info.className = "when";
    info.textContent = `${entry.incident} · ${entry.received ? when(entry.received) : "arriving"}`;
    item.append(who, info);
    if (entry.problems && entry.problems.length) {
      const problem = document.createElement("div");
      problem.className = "problem";
      problem.textContent = entry.problems[0];
      item.append(problem);
    }
    decorateEvidence(item, entry); // history.js: play its video
    list.append(item);
  }
  $("no-evidence").hidden = evidence.size > 0;
}

function updateEvidence(entry) {
  evidence.set(`${entry.vehicle_id}/${entry.incident}`, entry);
  renderEvidence();
  renderList();
  if (selected) renderDetail();
}

async function loadEvidence() {
  try {
    const data = await (await api("GET", "/api/evidence")).json();
    evidence.clear();
    for (const entry of data.evidence) evidence.set(`${entry.vehicle_id}/${entry.incident}`, entry);
  } catch (error) {
    console.warn("no evidence list from the desk", error);
  }
  renderEvidence();
  renderList();
  if (selected) renderDetail();
}

// --- the fleet's incidents: GET /api/incidents, then "incident" events (MQTT) ---

const incidents = new Map(); // "<vehicle id>/<incident id>" -> incident as the API gives it
const shownAt = new Map(); // same key -> when it was first in the page (epoch ms), for tests

function fixText(fix) {
  if (!fix || !Number.isFinite(fix.lat) || !Number.isFinite(fix.lon)) return "position unknown";
  const parts = [`${fix.lat.toFixed(6)}, ${fix.lon.toFixed(6)}`];
  const errors = [fix.epx, fix.epy].filter(Number.isFinite);
  if (errors.length) parts[0] += ` ±${Math.max(...errors).toFixed(0)} m`;
  // Absent is unknown: a receiver without a course must not read as "north".
  parts.push(Number.isFinite(fix.heading) ? `heading ${fix.heading.toFixed(0)}°` : "heading unknown");
  if (Number.isFinite(fix.speed)) parts.push(`${(fix.speed * 3.6).toFixed(0)} km/h`);
  if (fix.time) parts.push(`fix ${when(fix.time)}`);
  return parts.join(" · ");
}

function callBadge(incident) {
  const badge = document.createElement("span");
  badge.className = "badge call";
  const call = incident.call;
  if (!call) {
    badge.className = "badge nocall";
    badge.textContent = "NO CALL";
    badge.title = "No call from the car has reached this desk: phone the vehicle";
  } else {
    badge.className = `badge ${call.state}`;
    badge.textContent = isLive(call) ? `call ${call.state}`
      : `call ended${call.end_reason ? `: ${call.end_reason}` : ""}` +
        (call.state === "saving" ? " (saving the recording…)" : "");
  }
  return badge;
}

function line(text, kind) {
  const div = document.createElement("div");
  div.className = `line ${kind || ""}`;
  div.textContent = text;
  return div;
}

function incidentItem(incident) {
  const item = document.createElement("li");
  item.dataset.incident = incident.id;
  item.dataset.vehicle = incident.vehicle_id;
  item.className = [incident.open ? "open" : "closed", incident.call ? "has-call" : ""].join(" ");
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = `${incident.vehicle_id} `;
  const phase = document.createElement("span");
  phase.className = "badge phase";
  phase.textContent = String(incident.phase || incident.event || "?");
  who.append(phase, " ", callBadge(incident));
  if (incident.duress) {
    const duress = document.createElement("span");
    duress.className = "badge duress";
    duress.textContent = "DURESS";
    who.append(" ", duress);
  }
  const summary = incident.msd_summary || {};
  if (incident.test || summary.test_call) {
    const test = document.createElement("span");
    test.className = "badge test";
    test.textContent = "test";
    who.append(" ", test);
  }
  if (!incident.known_vehicle) {
    const unknown = document.createElement("span");
    unknown.className = "badge unknown";
    unknown.textContent = "not a registered car";
    unknown.title = "This vehicle id is not in the desk's car_tokens_file";
    who.append(" ", unknown);
  }
  const trigger = incident.trigger || {};
  item.append(who,
    line(`${trigger.kind || "trigger unknown"} · ${when(trigger.time || incident.first_seen)}` +
         ` · last: ${incident.event}`),
    line(fixText(incident.last_fix || incident.position), "position"),
    line(incident.msd ? `MSD: VIN ${summary.vin || "unknown"} · test call ` +
         `${summary.test_call === true ? "YES" : summary.test_call === false ? "no" : "?"}` +
         (summary.automatic ? " · automatic" : "")
      : "MSD: not received"),
    line(`incident ${incident.id}`));
  if (incident.call) item.addEventListener("click", () => select(incident.call.id));
  decorateIncident(item, incident); // operators.js: ringing, owner, Take
  return item;
}

function renderIncidents() {
  const list = $("incidents");
  const all = [...incidents.values()].sort((a, b) =>
    (b.open - a.open) || (b.first_seen > a.first_seen ? 1 : -1));
  list.replaceChildren(...all.map(incidentItem));
  const now = performance.timeOrigin + performance.now();
  for (const incident of all) {
    const key = `${incident.vehicle_id}/${incident.id}`;
    if (!shownAt.has(key)) shownAt.set(key, now);
  }
  $("no-incidents").hidden = incidents.size > 0;
  ringCheck();
  refreshMap(); // streetmap.js
}

function updateIncident(incident) {
  incidents.set(`${incident.vehicle_id}/${incident.id}`, incident);
  renderIncidents();
}

function showLink(link) {
  const badge = $("mqtt");
  badge.textContent = link.enabled ? `MQTT ${link.state}` : "MQTT off";
  badge.className = `badge ${link.state === "ok" ? "online" : link.enabled ? "down" : ""}`;
  badge.title = `${link.detail}` + (link.rejected ? ` · ${link.rejected} bad messages` : "");
}

async function loadIncidents() {
  try {
    const data = await (await api("GET", "/api/incidents")).json();
    for (const incident of data.incidents) {
      incidents.set(`${incident.vehicle_id}/${incident.id}`, incident);
    }
    showLink(data.link);
  } catch (error) {
    console.warn("no incidents from the desk", error);
  }
  renderIncidents();
}

// --- live updates ---

function update(call) {
  calls.set(call.id, call);
  if (selected === null && isLive(call)) {
    select(call.id); // a new emergency comes to the front by itself
    return;
  }
  renderList();
  if (call.id === selected) {
    renderDetail();
    if (!isLive(call) && watch && watch.call === call.id) unwatch();
  }
}

function addFix(id, fix) {
  const call = calls.get(id);
  if (!call) return;
  call.trail = call.trail || [];
  call.trail.push(fix);
  call.last_fix = fix;
  if (id === selected) renderDetail();
  refreshMap();
}

function listen() {
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => {
    $("link").textContent = "online";
    $("link").className = "badge online";
    load(); // catch up on whatever happened while the stream was down
    loadEvidence();
    loadIncidents();
    loadVehicles(); // streetmap.js
  });
  source.addEventListener("error", () => {
    $("link").textContent = "reconnecting…";
    $("link").className = "badge";
  });
  source.addEventListener("call", (event) => update(JSON.parse(event.data)));
  source.addEventListener("evidence", (event) => updateEvidence(JSON.parse(event.data)));
  source.addEventListener("incident", (event) => updateIncident(JSON.parse(event.data)));
  source.addEventListener("fleet", (event) => showLink(JSON.parse(event.data)));
  source.addEventListener("vehicle", (event) => updateVehicle(JSON.parse(event.data)));
  source.addEventListener("fix", (event) => {
    const data = JSON.parse(event.data);
    addFix(data.call, data.fix);
  });
}

async function load() {
  const response = await api("GET", "/api/calls");
  const data = await response.json();
  for (const call of data.calls) calls.set(call.id, call);
  renderList();
  if (selected === null) {
    const first = order().find(isLive);
    if (first) await select(first.id);
  } else {
    renderDetail();
  }
}

// --- for tests (Selenium's execute_async_script) and the curious ---

async function stats() {
  const call = calls.get(selected);
  const out = { framesDecoded: 0, firstFrameAt: watch ? watch.firstFrameAt : null,
    openedAt: watch ? watch.openedAt : null, postedAt: watch ? watch.postedAt : null,
    audioLevel: 0, audioPackets: 0, trailLength: call && call.trail ? call.trail.length : 0,
    msd: call ? call.msd : null, call: selected, watcher: watch ? watch.id : null,
    connection: watch && watch.pc ? watch.pc.connectionState : null };
  if (watch && watch.pc) {
    const report = await watch.pc.getStats();
    report.forEach((s) => {
      if (s.type !== "inbound-rtp") return;
      if (s.kind === "video") {
        out.framesDecoded = s.framesDecoded || 0;
        const codec = s.codecId && report.get(s.codecId);
        out.videoCodec = codec ? codec.mimeType : null;
        if (out.firstFrameAt === null && out.framesDecoded > 0) {
          out.firstFrameAt = performance.now(); // no requestVideoFrameCallback: polled
          watch.firstFrameAt = out.firstFrameAt;
        }
      } else if (s.kind === "audio") {
        out.audioLevel = s.audioLevel || 0;
        out.audioPackets = s.packetsReceived || 0;
      }
    });
  }
  return out;
}

window.dashsos = { stats, select, talk, calls: () => order(), watcher: () => watch && watch.id,
  evidence: () => [...evidence.values()], incidents: () => [...incidents.values()],
  incidentShownAt: (vehicle, id) => shownAt.get(`${vehicle}/${id}`) ?? null };

$("talk").addEventListener("click", talk);
$("mute").addEventListener("click", mute);
$("position").addEventListener("click", () => command("position"));
$("hangup").addEventListener("click", () => command("hangup"));
$("video").addEventListener("click", () => $("video").play());
// listen() starts in history.js, the last script, once the operator is logged in.
