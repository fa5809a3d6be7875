// dashsos dispatch console, part 2: who the operator is (login, logout), the ringing of
// calls and incidents nobody has taken yet, and taking them. Loaded after console.js,
// whose globals ($, api, calls, incidents, selected, renderList, ...) it uses.
"use strict";

let me = null; // this console's operator, from /api/me or the login

// --- login: the token is typed here once; the desk answers with a session cookie ---

async function whoAmI() {
  const response = await fetch("/api/me", { credentials: "same-origin" });
  if (!response.ok) throw new Error(`GET /api/me: ${response.status}`);
  return (await response.json()).operator;
}

function showLogin(message) {
  $("console").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("login-error").textContent = message || "";
  $("login-token").focus();
}

function showConsole() {
  $("login").hidden = true;
  $("console").hidden = false;
  $("logout").hidden = false;
  $("me").textContent = me;
}

async function submitLogin(event) {
  event.preventDefault();
  // The submit is a user gesture: the alert's audio may start from here on.
  unlockAudio();
  const token = $("login-token").value;
  $("login-token").value = ""; // not kept in the page any longer than needed
  const response = await fetch("/login", { method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }) });
  if (!response.ok) {
    showLogin(response.status === 429 ? "Too many failed logins: wait a moment."
      : "Unknown operator token.");
    return;
  }
  me = (await response.json()).operator;
  showConsole();
  listen();
}

async function logout() {
  await fetch("/logout", { method: "POST", credentials: "same-origin" }).catch(() => {});
  location.assign("/"); // a fresh page: nothing of the session stays in memory
}

// --- ringing: an audible alert and a flashing title until someone takes it ---

const ring = { ctx: null, beepTimer: null, titleTimer: null, beeps: 0, titleFlips: 0,
  items: [], startedAt: null, stoppedAt: null };
const TITLE = document.title;

function unlockAudio() {
  try {
    if (!ring.ctx) ring.ctx = new AudioContext();
    if (ring.ctx.state === "suspended") ring.ctx.resume().catch(() => {});
  } catch (error) {
    console.warn("no Web Audio", error);
  }
}

function beep() {
  // Two short tones, like a phone: no audio files, nothing fetched.
  if (!ring.ctx) unlockAudio();
  const ctx = ring.ctx;
  if (!ctx) return;
  for (const [offset, hz] of [[0, 880], [0.25, 660]]) {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.frequency.value = hz;
    gain.gain.value = 0.2;
    osc.connect(gain).connect(ctx.destination);
    osc.start(ctx.currentTime + offset);
    osc.stop(ctx.currentTime + offset + 0.18);
  }
  ring.beeps += 1;
}

function ringingItems() {
  const out = [];
  for (const call of calls.values()) {
    if (isLive(call) && !call.owner) {
      out.push({ kind: "call", id: call.id, vehicle: call.vehicle_id });
    }
  }
  for (const incident of incidents.values()) {
    if (!incident.open || incident.owner) continue;
    // An incident with a live call rings as that call; one whose call was taken is answered.
    const call = incident.call && calls.get(incident.call.id);
    if (incident.call && (isLive(incident.call) || (call && call.owner))) continue;
    out.push({ kind: "incident", id: incident.id, vehicle: incident.vehicle_id });
  }
  return out;
}

function ringCheck() {
  if (!me) return;
  ring.items = ringingItems();
  const first = ring.items[0];
  $("ring").hidden = !first;
  if (first) {
    const more = ring.items.length > 1 ? ` (+${ring.items.length - 1})` : "";
    $("ring-text").textContent = `NEW ${first.kind.toUpperCase()}: ${first.vehicle}${more}`;
  }
  if (first && !ring.beepTimer) {
    ring.startedAt = performance.now();
    beep();
    ring.beepTimer = setInterval(beep, 1500);
    ring.titleTimer = setInterval(() => {
      ring.titleFlips += 1;
      const item = ring.items[0];
      document.title = ring.titleFlips % 2 && item ? `🔔 ${item.vehicle} — NEW ${item.kind}`
        : TITLE;
    }, 600);
  } else if (!first && ring.beepTimer) {
    clearInterval(ring.beepTimer);
    clearInterval(ring.titleTimer);
    ring.beepTimer = ring.titleTimer = null;
    ring.stoppedAt = performance.now();
    document.title = TITLE;
  }
}

// --- taking a call or an incident ---

async function takeCall(id) {
  try {
    const call = await (await api("POST", `/api/calls/${encodeURIComponent(id)}/take`)).json();
    update(call);
    status(`You have taken this call.`);
  } catch (error) {
    status(String(error.message || error));
  }
}

async function takeIncident(incident) {
  try {
    const path = `/api/incidents/${encodeURIComponent(incident.id)}/take`;
    updateIncident(await (await api("POST", path, { vehicle_id: incident.vehicle_id })).json());
  } catch (error) {
    console.warn(error);
    alert(String(error.message || error));
  }
}

function takeFirst() {
  const first = ring.items[0];
  if (!first) return;
  if (first.kind === "call") {
    select(first.id);
    takeCall(first.id);
  } else {
    const incident = incidents.get(`${first.vehicle}/${first.id}`);
    if (incident) takeIncident(incident);
  }
}

function ownerText(owner) {
  return owner === me ? "taken by you" : `taken by ${owner}`;
}

function decorateCall(item, call) {
  const ringing = isLive(call) && !call.owner;
  item.classList.toggle("ringing", ringing);
  if (call.owner) {
    const owner = document.createElement("span");
    owner.className = `badge owner${call.owner === me ? " mine" : ""}`;
    owner.textContent = ownerText(call.owner);
    item.querySelector(".who").append(" ", owner);
  }
}

function decorateIncident(item, incident) {
  const ringing = ringingItems().some((r) => r.kind === "incident" && r.id === incident.id &&
    r.vehicle === incident.vehicle_id);
  item.classList.toggle("ringing", ringing);
  if (incident.owner) {
    const owner = document.createElement("span");
    owner.className = `badge owner${incident.owner === me ? " mine" : ""}`;
    owner.textContent = ownerText(incident.owner);
    item.querySelector(".who").append(" ", owner);
  } else if (ringing) {
    const take = document.createElement("button");
    take.type = "button";
    take.className = "take";
    take.textContent = "Take";
    take.addEventListener("click", (event) => {
      event.stopPropagation();
      takeIncident(incident);
    });
    item.append(take);
  }
}

function renderOwner(call) {
  const live = isLive(call);
  const other = !!call.owner && call.owner !== me;
  $("owner").hidden = !call.owner;
  $("owner").textContent = call.owner ? ownerText(call.owner) : "";
  $("owner").className = `badge owner${call.owner === me ? " mine" : ""}`;
  $("take").hidden = !live || !!call.owner;
  // Only the owner talks to the car and hangs up; the others watch.
  if (other) for (const id of ["talk", "hangup"]) $(id).disabled = true;
}

// --- for tests ---

Object.assign(window.dashsos, {
  me: () => me,
  ringing: () => ({ ringing: ring.beepTimer !== null, items: ring.items, beeps: ring.beeps,
    titleFlips: ring.titleFlips, title: document.title,
    audio: ring.ctx ? ring.ctx.state : null, startedAt: ring.startedAt,
    stoppedAt: ring.stoppedAt }),
  take: takeCall,
});

$("login-form").addEventListener("submit", submitLogin);
$("logout").addEventListener("click", logout);
$("ring-take").addEventListener("click", () => { unlockAudio(); takeFirst(); });
$("take").addEventListener("click", () => { unlockAudio(); if (selected) takeCall(selected); });
// Browsers start audio only after a gesture: any click in the page will do.
document.addEventListener("click", unlockAudio);
