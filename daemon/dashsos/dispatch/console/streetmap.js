// The fleet on a street map (Leaflet, served by the desk from its package): every car at
// its last known position, every open incident, and the selected call's trail.
// Positions come from MQTT (vehicles' `location`, incidents' fixes) and from calls (their
// data channel); the newest fix of a car wins. Tiles come from dispatch.map_tiles; without
// it the map still places everything, on a plain background.
// Shares console.js's globals (calls, incidents, selected, select, api, fixText, when).
"use strict";

const vehicles = new Map(); // vehicle id -> vehicle as GET /api/vehicles gives it
const fleetMap = { map: null, settings: null, cars: new Map(), alarms: new Map(),
  trail: null, steered: false, added: false, note: "" };

function mapNote(text) {
  fleetMap.note = text;
  $("map-note").textContent = text;
}

async function startMap() {
  if (fleetMap.settings) return;
  try {
    fleetMap.settings = await (await api("GET", "/api/map")).json();
  } catch (error) {
    mapNote(`No map settings from the desk: ${error.message || error}`);
    return;
  }
  if (typeof L === "undefined") {
    mapNote("No street map: Leaflet is not installed on the desk (scripts/install fetches it).");
    return;
  }
  const map = L.map("streetmap", { worldCopyJump: true, zoomSnap: 0.5 });
  map.setView([20, 0], 2);
  L.control.scale({ imperial: false }).addTo(map);
  const { tiles, attribution } = fleetMap.settings;
  if (tiles) {
    L.tileLayer(tiles, { attribution, maxZoom: 19, crossOrigin: false }).addTo(map);
    mapNote("");
  } else {
    mapNote("No tile server configured (dispatch.map_tiles): positions without streets.");
  }
  // Until the operator steers the map, it keeps every car and incident in view.
  const steered = () => { fleetMap.steered = true; };
  map.on("dragstart", steered);
  map.getContainer().addEventListener("wheel", steered, { passive: true });
  map.getContainer().querySelector(".leaflet-control-zoom")?.addEventListener("click", steered);
  fleetMap.map = map;
  refreshMap();
}

function updateVehicle(vehicle) {
  vehicles.set(vehicle.vehicle_id, vehicle);
  refreshMap();
}

async function loadVehicles() {
  await startMap();
  try {
    const data = await (await api("GET", "/api/vehicles")).json();
    for (const vehicle of data.vehicles) vehicles.set(vehicle.vehicle_id, vehicle);
  } catch (error) {
    console.warn("no vehicles from the desk", error);
  }
  refreshMap();
}

function usable(fix) {
  return fix && Number.isFinite(fix.lat) && Number.isFinite(fix.lon);
}

function fixTime(fix) {
  return fix.time || fix.received || "";
}

// Every car's newest position, whichever way it came: {vehicle id -> {fix, online, via}}.
function carPositions() {
  const found = new Map();
  const offer = (id, fix, via) => {
    if (!usable(fix)) return;
    const have = found.get(id);
    if (!have || fixTime(fix) > fixTime(have.fix)) found.set(id, { fix, via });
  };
  for (const vehicle of vehicles.values()) offer(vehicle.vehicle_id, vehicle.location, "mqtt");
  for (const call of calls.values()) {
    if (isLive(call)) offer(call.vehicle_id, call.last_fix, "call");
  }
  for (const incident of incidents.values()) {
    if (incident.open) offer(incident.vehicle_id, incident.last_fix || incident.position, "incident");
  }
  return found;
}

function openAlarms() {
  const found = new Map();
  for (const incident of incidents.values()) {
    const fix = incident.last_fix || incident.position;
    if (incident.open && usable(fix)) found.set(`${incident.vehicle_id}/${incident.id}`, { incident, fix });
  }
  // An embedded call's car that sends no MQTT: the call itself is the alarm.
  for (const call of calls.values()) {
    const id = call.msd && call.msd.id;
    const key = `${call.vehicle_id}/${id || call.id}`;
    if (isLive(call) && usable(call.last_fix) && !found.has(key)) {
      found.set(key, { call, fix: call.last_fix });
    }
  }
  return found;
}

// Leaflet layers are kept and moved, not rebuilt: a dispatcher's open tooltip stays open.
function place(layers, key, fix, make) {
  let layer = layers.get(key);
  if (!layer) {
    layer = make();
    layers.set(key, layer);
    layer.addTo(fleetMap.map);
    fleetMap.added = true;
  }
  layer.setLatLng([fix.lat, fix.lon]);
  return layer;
}

// Car data as text, never as HTML (Leaflet would set a string as innerHTML).
function tip(layer, text) {
  const box = document.createElement("div");
  box.className = "map-tip";
  box.textContent = text;
  if (layer.getTooltip()) layer.setTooltipContent(box);
  else layer.bindTooltip(box);
}

function prune(layers, keep) {
  for (const [key, layer] of layers) {
    if (!keep.has(key)) {
      layer.remove();
      layers.delete(key);
    }
  }
}

function refreshMap() {
  const map = fleetMap.map;
  if (!map) return;
  fleetMap.added = false;
  const cars = carPositions();
  for (const [id, { fix, via }] of cars) {
    const vehicle = vehicles.get(id);
    const online = vehicle ? vehicle.online : via === "call";
    const marker = place(fleetMap.cars, id, fix, () => L.circleMarker([fix.lat, fix.lon], {
      radius: 7, weight: 2, fillOpacity: 0.9, className: "car-marker" }));
    marker.setStyle({ color: "#1d2330", fillColor: online === false ? "#9aa1ac" : "#3b5bdb" });
    tip(marker, `${id}${online === false ? " (offline)" : ""}\n${fixText(fix)}`);
    marker.getElement()?.setAttribute("data-vehicle", id);
  }
  prune(fleetMap.cars, cars);
  const alarms = openAlarms();
  for (const [key, alarm] of alarms) {
    const call = alarm.call || (alarm.incident.call && calls.get(alarm.incident.call.id));
    const marker = place(fleetMap.alarms, key, alarm.fix, () => {
      const made = L.circleMarker([alarm.fix.lat, alarm.fix.lon], { radius: 13, weight: 3,
        color: "#b3261e", fillColor: "#b3261e", fillOpacity: 0.35, className: "alarm-marker" });
      made.on("click", () => {
        const target = fleetMap.alarms.get(key)?.callId;
        if (target) select(target);
      });
      return made;
    });
    marker.callId = call ? call.id : null;
    const what = alarm.incident
      ? `${alarm.incident.vehicle_id} · incident ${alarm.incident.id} · ${alarm.incident.phase || "?"}`
      : `${alarm.call.vehicle_id} · call ${alarm.call.id}`;
    tip(marker, `${what}\n${fixText(alarm.fix)}`);
    marker.getElement()?.setAttribute("data-alarm", key);
  }
  prune(fleetMap.alarms, alarms);
  drawSelectedTrail();
  if (fleetMap.added && !fleetMap.steered) fitAll();
}

function drawSelectedTrail() {
  const call = calls.get(selected);
  const points = (call && call.trail ? call.trail : []).filter(usable).map((f) => [f.lat, f.lon]);
  if (fleetMap.trail) fleetMap.trail.remove();
  fleetMap.trail = points.length > 1
    ? L.polyline(points, { color: "#b35c00", weight: 4, className: "trail-line" }).addTo(fleetMap.map)
    : null;
}

function showAll() {
  fleetMap.steered = false;
  fitAll();
}

function fitAll() {
  const map = fleetMap.map;
  if (!map) return;
  const points = [...fleetMap.cars.values(), ...fleetMap.alarms.values()].map((m) => m.getLatLng());
  if (points.length === 1) map.setView(points[0], 15);
  else if (points.length > 1) map.fitBounds(L.latLngBounds(points), { padding: [30, 30], maxZoom: 15 });
}

// The selected call's car comes to the middle, at street level if the map was further out.
function centreOn(call) {
  const map = fleetMap.map;
  if (!map || !call || !usable(call.last_fix)) return;
  fleetMap.steered = true; // the operator chose this call
  map.setView([call.last_fix.lat, call.last_fix.lon], Math.max(map.getZoom(), 14));
}

function mapState() {
  const map = fleetMap.map;
  const where = (layers) => [...layers].map(([key, m]) => {
    const at = m.getLatLng();
    const pixel = map.latLngToContainerPoint(at);
    return { key, lat: at.lat, lon: at.lng, x: pixel.x, y: pixel.y };
  });
  return { library: typeof L !== "undefined", settings: fleetMap.settings, note: fleetMap.note,
    ready: Boolean(map), zoom: map ? map.getZoom() : null,
    size: map ? map.getSize() : null,
    cars: map ? where(fleetMap.cars) : [], alarms: map ? where(fleetMap.alarms) : [],
    trail: fleetMap.trail ? fleetMap.trail.getLatLngs().length : 0,
    tiles: [...document.querySelectorAll("#streetmap img.leaflet-tile-loaded")].map((i) => i.src) };
}

$("map-all").addEventListener("click", showAll);
Object.assign(window.dashsos, { map: mapState });
