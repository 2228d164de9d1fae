"use strict";
// The patrol team's phone app: the current page or assignment, live over a WebSocket; a new
// page rings (WebAudio) and vibrates until accepted or declined; the phone's position is shared
// while on duty. Everything the team does goes to /patrol/api/* with the session's CSRF token.

const CSRF = document.querySelector('meta[name="csrf"]').content;
const $ = (id) => document.getElementById(id);
const PHASES = {
  paged: "New page — answer now",
  accepted: "Accepted",
  en_route: "En route",
  on_scene: "On scene",
};
const WITHDRAWN = {
  taken: "Taken by another team",
  cancelled: "The operator cancelled this page",
  timeout: "No answer in time: paged to the next team",
  closed: "The incident is closed",
  reassigned: "The operator gave this incident to another team",
};
const POSITION_EVERY_MS = 5000; // at most one position a 5 s; a fresh fix every 30 s when still

let state = null;
let classifications = [];
let ws = null;
let audio = null;
let ringTimer = null;
let ringingPage = null;
let watchId = null;
let refreshTimer = null;
let lastSentAt = 0;
let resolvedPage = null;
// For tests and diagnostics.
window.__patrol = {rangAt: {}, vibrations: 0, positionsSent: 0, lastPositionError: ""};

async function api(method, path, body) {
  const opts = {method, headers: {"X-CSRF-Token": CSRF}};
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    return {ok: false, status: 0, data: {error: "the server cannot be reached"}};
  }
  if (resp.status === 401) {
    location.href = "/patrol/login";
    return {ok: false, status: 401, data: {error: "log in again"}};
  }
  let data = {};
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  return {ok: resp.ok, status: resp.status, data};
}

function showError(message) {
  const el = $("error");
  el.textContent = message || "";
  el.classList.toggle("hidden", !message);
}

function showNotice(message) {
  const el = $("notice");
  el.textContent = message || "";
  el.classList.toggle("hidden", !message);
}

// ------------------------------------------------------------------ ringing
function audioContext() {
  if (!audio) {
    const Ctx = window.AudioContext || window.webkitAudioContext;
    if (!Ctx) return null;
    audio = new Ctx();
  }
  return audio;
}

function beep() {
  const ctx = audioContext();
  if (!ctx) return;
  $("sound").classList.toggle("hidden", ctx.state !== "suspended");
  if (ctx.state === "suspended") ctx.resume().catch(() => {});
  const t0 = ctx.currentTime;
  [0, 0.3, 0.6].forEach((offset, i) => {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.type = "square";
    osc.frequency.value = i % 2 ? 660 : 990;
    gain.gain.setValueAtTime(0.25, t0 + offset);
    gain.gain.setValueAtTime(0, t0 + offset + 0.22);
    osc.connect(gain).connect(ctx.destination);
    osc.start(t0 + offset);
    osc.stop(t0 + offset + 0.25);
  });
}

function ringOnce() {
  beep();
  if (navigator.vibrate) {
    navigator.vibrate([500, 150, 500, 150, 500]);
    window.__patrol.vibrations += 1;
  }
}

function startRinging(pageId) {
  if (ringingPage === pageId) return;
  stopRinging();
  ringingPage = pageId;
  window.__patrol.rangAt[pageId] = Date.now();
  ringOnce();
  ringTimer = setInterval(ringOnce, 2000);
}

function stopRinging() {
  if (ringTimer) clearInterval(ringTimer);
  ringTimer = null;
  ringingPage = null;
  if (navigator.vibrate) navigator.vibrate(0);
}

// ------------------------------------------------------------------ rendering
function onDuty() {
  return !!(state && state.status && state.status !== "off_duty");
}

function render(next) {
  if (!next) return;
  state = next;
  $("team-name").textContent = `${state.name || state.team} (${state.team})`;
  const duty = onDuty();
  $("duty-state").textContent = duty ? "On duty" : "Off duty";
  $("duty-state").className = duty ? "on" : "off";
  $("duty").textContent = duty ? "Go off duty" : "Go on duty";
  $("duty").dataset.duty = duty ? "on" : "off";
  const cur = state.current;
  $("idle").classList.toggle("hidden", !!cur);
  const section = $("page");
  section.classList.toggle("hidden", !cur);
  if (!cur) {
    section.dataset.phase = "";
    section.dataset.page = "";
    stopRinging();
  } else {
    section.dataset.phase = cur.phase;
    section.dataset.page = cur.id;
    section.dataset.incident = cur.incident;
    $("page-phase").textContent = (PHASES[cur.phase] || cur.phase) + (cur.broadcast && cur.phase === "paged" ? " (broadcast: first to accept takes it)" : "");
    $("page-post").textContent = cur.post_name || cur.post;
    $("page-school").textContent = cur.school || "";
    $("page-address").textContent = cur.address || "";
    $("page-what").textContent = cur.what || "alarm";
    $("page-deadline").textContent = "";
    const geo = $("nav-geo");
    if (cur.nav && cur.nav.geo) {
      geo.href = cur.nav.geo;
      geo.classList.remove("hidden");
    } else {
      geo.classList.add("hidden");
    }
    const map = $("nav-map");
    if (cur.nav && cur.nav.map) {
      map.href = cur.nav.map;
      map.classList.remove("hidden");
    } else {
      map.classList.add("hidden");
    }
    const p = cur.phase;
    $("btn-accept").classList.toggle("hidden", p !== "paged");
    $("btn-decline").classList.toggle("hidden", p !== "paged");
    $("btn-en-route").classList.toggle("hidden", p !== "accepted");
    $("btn-on-scene").classList.toggle("hidden", !(p === "accepted" || p === "en_route"));
    $("btn-resolve").classList.toggle("hidden", !(p === "accepted" || p === "en_route" || p === "on_scene"));
    if (p === "paged") {
      startRinging(cur.id);
    } else {
      stopRinging();
      $("resolve-form").classList.toggle("hidden", $("resolve-form").dataset.open !== cur.id);
    }
    if (p === "paged") $("resolve-form").classList.add("hidden");
  }
  updateDeadline();
  syncGeolocation();
}

function updateDeadline() {
  const cur = state && state.current;
  if (!cur || cur.phase !== "paged") return;
  const left = Math.max(0, Math.round(cur.deadline - Date.now() / 1000));
  $("page-deadline").textContent = `answer within ${left} s`;
}
setInterval(updateDeadline, 1000);

async function refresh() {
  const r = await api("GET", "/patrol/api/state");
  if (r.ok) {
    classifications = r.data.classifications || classifications;
    fillClassifications();
    render(r.data);
  }
}

function fillClassifications() {
  const select = $("classification");
  if (select.options.length === classifications.length) return;
  select.textContent = "";
  for (const c of classifications) {
    const opt = document.createElement("option");
    opt.value = c;
    opt.textContent = c.replace(/_/g, " ");
    select.appendChild(opt);
  }
}

// ------------------------------------------------------------------ actions
async function answer(kind, extra) {
  const cur = state && state.current;
  if (!cur) return;
  showError("");
  if (kind === "resolved") resolvedPage = cur.id;
  const buttons = document.querySelectorAll(".actions button, #btn-resolve-confirm");
  buttons.forEach((b) => { b.disabled = true; });
  const r = await api("POST", "/patrol/api/answer",
                      {page: cur.id, incident: cur.incident, answer: kind, ...(extra || {})});
  buttons.forEach((b) => { b.disabled = false; });
  if (r.ok) {
    if (kind === "resolved") showNotice("Resolved. Thank you.");
    else if (kind === "decline") showNotice("Declined: the next team is paged.");
    else showNotice("");
    $("resolve-form").dataset.open = "";
    render(r.data);
  } else {
    showError(r.data.error || `refused (${r.status})`);
    refresh();
  }
}

$("btn-accept").addEventListener("click", () => { stopRinging(); answer("accept"); });
$("btn-decline").addEventListener("click", () => { stopRinging(); answer("decline"); });
$("btn-en-route").addEventListener("click", () => answer("en_route"));
$("btn-on-scene").addEventListener("click", () => answer("on_scene"));
$("btn-resolve").addEventListener("click", () => {
  const form = $("resolve-form");
  form.dataset.open = state && state.current ? state.current.id : "";
  form.classList.remove("hidden");
});
$("resolve-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  answer("resolved", {classification: $("classification").value,
                      detail: $("resolve-note").value.slice(0, 200)});
});

$("duty").addEventListener("click", async () => {
  audioContext();  // a tap: browsers allow sound from now on
  if (audio && audio.state === "suspended") audio.resume().catch(() => {});
  showError("");
  const r = await api("POST", "/patrol/api/status", {state: onDuty() ? "off_duty" : "available"});
  if (r.ok) render(r.data);
  else showError(r.data.error || `refused (${r.status})`);
});

$("sound").addEventListener("click", () => {
  const ctx = audioContext();
  if (ctx) ctx.resume().then(() => $("sound").classList.add("hidden")).catch(() => {});
});

$("logout").addEventListener("click", async () => {
  stopGeolocation();
  await api("POST", "/patrol/api/logout");
  location.href = "/patrol/login";
});

// ------------------------------------------------------------------ position
async function sendFix(pos) {
  const now = Date.now();
  if (now - lastSentAt < POSITION_EVERY_MS) return;
  lastSentAt = now;
  const c = pos.coords;
  const body = {
    lat: c.latitude, lon: c.longitude, ts: pos.timestamp / 1000,
    accuracy_m: Math.min(Math.max(c.accuracy || 0, 0), 100000),
    speed_mps: c.speed && c.speed > 0 ? Math.min(c.speed, 100) : 0,
  };
  const r = await api("POST", "/patrol/api/position", body);
  if (r.ok) {
    window.__patrol.positionsSent += 1;
    window.__patrol.lastPositionError = "";
    $("gps").textContent = `position shared ${new Date().toLocaleTimeString()} (±${Math.round(body.accuracy_m)} m)`;
  } else {
    window.__patrol.lastPositionError = r.data.error || String(r.status);
    $("gps").textContent = `position refused: ${window.__patrol.lastPositionError}`;
  }
}

function fixFailed(err) {
  $("gps").textContent = `no position: ${err.message || "unavailable"}`;
}

function syncGeolocation() {
  if (onDuty()) startGeolocation();
  else stopGeolocation();
}

function startGeolocation() {
  if (watchId !== null) return;
  if (!("geolocation" in navigator)) {
    $("gps").textContent = "this browser cannot share its position";
    return;
  }
  $("gps").textContent = "finding position…";
  const opts = {enableHighAccuracy: true, maximumAge: 10000, timeout: 30000};
  watchId = navigator.geolocation.watchPosition(sendFix, fixFailed, opts);
  // A phone standing still gets no new fix from watchPosition; ask for one now and then so the
  // server does not count the team's position as stale.
  refreshTimer = setInterval(() => {
    navigator.geolocation.getCurrentPosition(sendFix, fixFailed,
                                             {enableHighAccuracy: true, maximumAge: 15000, timeout: 20000});
  }, 30000);
}

function stopGeolocation() {
  if (watchId !== null && navigator.geolocation) navigator.geolocation.clearWatch(watchId);
  if (refreshTimer) clearInterval(refreshTimer);
  watchId = null;
  refreshTimer = null;
  $("gps").textContent = "position not shared";
}

// ------------------------------------------------------------------ live connection
function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/patrol/ws?csrf=${encodeURIComponent(CSRF)}`);
  ws.onopen = () => {
    $("conn").textContent = "live";
    $("conn").className = "ok";
    refresh();
  };
  ws.onmessage = (ev) => {
    let msg;
    try { msg = JSON.parse(ev.data); } catch (e) { return; }
    if (msg.type === "hello") {
      render(msg.state);
    } else if (msg.type === "page") {
      showNotice("");
      render(msg.state);
    } else if (msg.type === "withdrawn") {
      // Not after the team resolved it itself (the dispatcher then says "closed" too).
      if (!(msg.reason === "closed" && resolvedPage === msg.page)) {
        showNotice(WITHDRAWN[msg.reason] || `page withdrawn (${msg.reason})`);
      }
      render(msg.state);
    }
  };
  ws.onclose = () => {
    $("conn").textContent = "offline";
    $("conn").className = "";
    setTimeout(connect, 2000);
  };
}

setInterval(() => {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send('{"type":"ping"}');
}, 25000);

refresh();
connect();
