"use strict";
// The operators' console: live queue over a WebSocket, incident view, posts and a map, and the
// video intercom (WebRTC, one offer and one answer through the server; no trickle).
// Plain browser JavaScript, no libraries, no network access beyond this server.

const state = {
  me: null,
  csrf: document.querySelector('meta[name="csrf"]').content,
  incidents: new Map(),   // id -> summary
  posts: new Map(),       // id -> post
  teams: [],              // patrol teams (server.dispatch)
  calls: new Map(),       // post_id -> {call_id, user}
  selected: null,         // incident id
  ws: null,
  audio: null,
  ringing: new Set(),     // incident ids ringing
  seen: new Set(),        // incidents this operator has opened (they ring no more here)
  call: null,             // {pc, post_id, call_id, stream}
  ringedAt: {},           // incident id -> Date.now() when it rang (for tests)
  lastAnswerToFrameMs: null,  // answer click -> first video frame shown, last call
};
window.__console = state;

const $ = (id) => document.getElementById(id);
const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "—");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

async function api(path, options = {}) {
  const opts = {credentials: "same-origin", ...options, headers: {...(options.headers || {})}};
  if (opts.method && opts.method !== "GET") {
    opts.headers["X-CSRF-Token"] = state.csrf;
    opts.headers["Content-Type"] = "application/json";
  }
  const resp = await fetch(`/console/api/${path}`, opts);
  if (resp.status === 401) { location.href = "/console/login"; throw new Error("logged out"); }
  let body = null;
  try { body = await resp.json(); } catch (e) { body = null; }
  if (!resp.ok) throw new Error((body && body.error) || `HTTP ${resp.status}`);
  return body;
}
const post = (path, body) => api(path, {method: "POST", body: JSON.stringify(body || {})});
const may = (p) => state.me && state.me.permissions.includes(p);

// ------------------------------------------------------------------ sound and ringing
function ensureAudio() {
  if (!state.audio) {
    try { state.audio = new AudioContext(); } catch (e) { return null; }
  }
  if (state.audio.state === "suspended") state.audio.resume().catch(() => {});
  $("sound").classList.toggle("hidden", state.audio.state === "running");
  return state.audio;
}
function beep() {
  const ctx = ensureAudio();
  if (!ctx || ctx.state !== "running") return;
  const t = ctx.currentTime;
  for (let i = 0; i < 3; i++) {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.type = "square";
    osc.frequency.value = i % 2 ? 660 : 880;
    gain.gain.setValueAtTime(0.15, t + i * 0.25);
    gain.gain.setValueAtTime(0, t + i * 0.25 + 0.2);
    osc.connect(gain).connect(ctx.destination);
    osc.start(t + i * 0.25);
    osc.stop(t + i * 0.25 + 0.22);
  }
}
let ringTimer = null;
function updateRing() {
  const ringing = [...state.ringing].map((id) => state.incidents.get(id)).filter(Boolean);
  const el = $("ring");
  if (!ringing.length) {
    el.classList.add("hidden");
    clearInterval(ringTimer); ringTimer = null;
    return;
  }
  const inc = ringing[0];
  $("ring-text").textContent = `ALARM ${inc.post_id} — ${inc.school || inc.post_name || ""}` +
    (ringing.length > 1 ? ` (+${ringing.length - 1})` : "");
  el.dataset.incident = inc.id;
  el.classList.remove("hidden");
  if (!ringTimer) { beep(); ringTimer = setInterval(beep, 2000); }
}
function ring(incident) {
  if (!state.ringedAt[incident.id]) state.ringedAt[incident.id] = Date.now();
  state.ringing.add(incident.id);
  updateRing();
}
function stopRinging(id) { state.ringing.delete(id); updateRing(); }
// An open incident rings until an operator acknowledges it or takes its call (the dispatcher
// may page a team at once: its state is then "paged", and it must still ring), or until this
// operator opens it.
// An incident opened while its post was in test mode is classified "test" from the start: it is
// shown as TEST and never rings.
const isOpen = (i) => i.state !== "resolved" && i.state !== "cancelled";
const isTest = (i) => i.classification === "test";
const wantsRing = (i) => isOpen(i) && !isTest(i) && !i.acknowledged_by && !i.call_owner && !state.seen.has(i.id);
const TEST_BADGE = '<span class="badge-test">TEST</span> ';

// ------------------------------------------------------------------ queue
function renderQueue() {
  const body = $("queue").querySelector("tbody");
  const open = [...state.incidents.values()]
    .filter((i) => i.state !== "resolved" && i.state !== "cancelled")
    .sort((a, b) => b.opened_at - a.opened_at);
  body.innerHTML = open.map((i) => {
    const call = state.calls.get(i.post_id);
    const holder = call ? call.user : (i.acknowledged_by || "");
    const cls = isTest(i) ? "test" : (i.acknowledged_by ? "" : "new");
    return `<tr id="inc-${esc(i.id)}" data-id="${esc(i.id)}" class="${cls}` +
      `${state.selected === i.id ? " selected" : ""}">` +
      `<td>${fmtTime(i.opened_at)}</td><td>${esc(i.post_id)}</td><td>${esc(i.school)}</td>` +
      `<td class="state">${isTest(i) ? TEST_BADGE : ""}${esc(i.state)}</td><td>${esc(i.event_count)}</td>` +
      `<td class="holder">${holder ? "taken by " + esc(holder) : ""}</td></tr>`;
  }).join("");
  $("queue-empty").classList.toggle("hidden", open.length > 0);
}
$("ring").addEventListener("click", () => { if ($("ring").dataset.incident) select($("ring").dataset.incident); });
$("queue").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-id]");
  if (row) select(row.dataset.id);
});

async function loadIncidents() {
  if (!may("incidents.view")) return;
  const rows = await api("incidents?state=open");
  state.incidents = new Map(rows.map((r) => [r.id, r]));
  for (const r of rows) if (wantsRing(r)) ring(r);
  renderQueue();
  if (state.selected) await showIncident(state.selected);
}

// ------------------------------------------------------------------ incident view
async function select(id) {
  state.selected = id;
  state.seen.add(id);
  stopRinging(id);
  renderQueue();
  await showIncident(id);
}
async function showIncident(id) {
  let inc;
  try { inc = await api(`incidents/${encodeURIComponent(id)}`); } catch (e) { $("inc-error").textContent = e.message; return; }
  if (state.selected !== id) return;
  $("incident").classList.remove("hidden");
  $("incident").dataset.id = id;
  $("inc-title").innerHTML = (isTest(inc) ? TEST_BADGE : "") + esc(`${inc.post_id} — ${inc.post_name || ""}`);
  $("incident").dataset.test = isTest(inc) ? "1" : "";
  $("inc-meta").textContent = `${inc.school || ""} · ${inc.address || ""} · opened ${fmtTime(inc.opened_at)} · ` +
    `state ${inc.state}` + (inc.acknowledged_by ? ` · acknowledged by ${inc.acknowledged_by}` : "") +
    (inc.classification ? ` · ${inc.classification}` : "");
  $("incident").dataset.state = inc.state;
  $("timeline").innerHTML = inc.timeline.map((t) =>
    `<li>${fmtTime(t.at)} <b>${esc(t.action)}</b> by ${esc(t.actor)}` +
    `${t.to_state ? " → " + esc(t.to_state) : ""} ${esc(t.detail)}</li>`).join("");
  $("commands").innerHTML = inc.commands.map(commandItem).join("");
  const closed = inc.state === "resolved" || inc.state === "cancelled";
  for (const b of ["btn-ack", "btn-resolve", "btn-page"]) $(b).disabled = closed || !may("incidents.handle");
  const d = inc.dispatch;
  $("dispatch").textContent = d ? `dispatch: ${d.state}${d.team_id ? ", team " + d.team_id : ""}` +
    `${d.reason ? " (" + d.reason + ")" : ""}` : (isTest(inc) ? "no dispatch (test mode)" : "no dispatch");
  $("btn-redispatch").disabled = closed || !d || d.state === "done" || !may("incidents.handle");
  // Pages of this incident; one still waiting for an answer can be cancelled.
  $("pages").innerHTML = (d ? d.pages : []).map((p) =>
    `<li id="page-${esc(p.id)}" class="${esc(p.state)}">${fmtTime(p.sent_at)} ${esc(p.kind)} page to team ` +
    `${esc(p.team_id)}: ${esc(p.state)}${p.detail ? " — " + esc(p.detail) : ""}` +
    (p.state === "waiting" && !closed && may("incidents.handle")
      ? ` <button class="cancel-page" data-page="${esc(p.id)}">Cancel page</button>` : "") +
    "</li>").join("");
  for (const b of ["btn-silence", "btn-reset"]) $(b).disabled = !may("posts.command");
  updateCallBar();
}
function commandItem(c) {
  const label = {sent: "sent, waiting for the post", confirmed: "confirmed by the post",
                 failed: "failed", timed_out: "not confirmed (timed out)"}[c.state] || c.state;
  return `<li id="cmd-${esc(c.id)}" class="${esc(c.state)}" data-cmd="${esc(c.cmd)}">` +
    `${fmtTime(c.sent_at)} ${esc(c.cmd)} by ${esc(c.actor)}: <span class="cmd-state">${esc(label)}</span>` +
    `${c.detail ? " — " + esc(c.detail) : ""}</li>`;
}
function showError(e) { $("inc-error").textContent = e.message || String(e); }

$("btn-ack").addEventListener("click", () => {
  $("inc-error").textContent = "";
  post(`incidents/${state.selected}/acknowledge`).then(() => showIncident(state.selected)).catch(showError);
});
$("btn-resolve").addEventListener("click", () => {
  $("inc-error").textContent = "";
  post(`incidents/${state.selected}/resolve`, {classification: $("classification").value, note: $("note").value})
    .then(() => { hangup(state.call, "resolved"); showIncident(state.selected); }).catch(showError);
});
function sendCommand(cmd) {
  const inc = state.incidents.get(state.selected);
  const postId = inc ? inc.post_id : $("incident").dataset.post;
  $("inc-error").textContent = "";
  post(`posts/${encodeURIComponent(postId)}/command`, {cmd, incident_id: state.selected})
    .then(() => showIncident(state.selected)).catch(showError);
}
$("btn-silence").addEventListener("click", () => sendCommand("silence"));
$("btn-page").addEventListener("click", () => {
  $("inc-error").textContent = "";
  post(`incidents/${state.selected}/page`, {team_id: $("team").value})
    .then(() => showIncident(state.selected)).catch(showError);
});
$("btn-reset").addEventListener("click", () => sendCommand("reset"));
$("btn-redispatch").addEventListener("click", () => {
  $("inc-error").textContent = "";
  post(`incidents/${state.selected}/redispatch`, {reason: $("note").value})
    .then(() => showIncident(state.selected)).catch(showError);
});
$("pages").addEventListener("click", (ev) => {
  const button = ev.target.closest("button.cancel-page");
  if (!button) return;
  $("inc-error").textContent = "";
  post(`incidents/${state.selected}/pages/${encodeURIComponent(button.dataset.page)}/cancel`, {})
    .then(() => showIncident(state.selected)).catch(showError);
});

// ------------------------------------------------------------------ video intercom
// mode "call": the incident's intercom call (video, both ways audio; one operator at a time);
// mode "view": a post's camera only, any number of viewers, from the posts view.
function updateCallBar() {
  const inc = state.incidents.get(state.selected);
  const postId = inc && inc.post_id;
  const holder = postId && state.calls.get(postId);
  const mine = state.call && state.call.post_id === postId;
  $("btn-answer").disabled = !may("calls") || !postId || !!state.call || (!!holder && !mine);
  $("btn-hangup").disabled = !mine;
  if (mine) $("call-status").textContent = state.call.call_id ? "in call" : "calling…";
  else if (holder) $("call-status").textContent = `taken by ${holder.user}`;
  else if (!state.call) $("call-status").textContent = "";
}
async function openPeer(call, video, audio) {
  const pc = new RTCPeerConnection({iceServers: state.me.ice_servers});
  call.pc = pc;
  pc.addTransceiver("video", {direction: "recvonly"});
  if (call.mode === "call") {
    try {
      call.stream = await navigator.mediaDevices.getUserMedia({audio: true});
      for (const track of call.stream.getAudioTracks()) pc.addTrack(track, call.stream);
    } catch (e) {
      pc.addTransceiver("audio", {direction: "recvonly"});  // no microphone: listen only
    }
  }
  pc.ontrack = (ev) => {
    if (ev.track.kind === "video") {
      video.srcObject = new MediaStream([ev.track]);
      if (video.requestVideoFrameCallback) {
        video.requestVideoFrameCallback(() => {
          call.firstFrameAt = performance.now();
          if (call.mode === "call") state.lastAnswerToFrameMs = call.firstFrameAt - call.clickedAt;
        });
      }
    } else if (audio) {
      audio.srcObject = new MediaStream([ev.track]);
    }
  };
  pc.onconnectionstatechange = () => {
    if (pc.connectionState === "failed") hangup(call, "connection failed");
  };
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete") {
    await new Promise((resolve) => {
      pc.addEventListener("icegatheringstatechange", () => {
        if (pc.iceGatheringState === "complete") resolve();
      });
      setTimeout(resolve, 3000);  // use what was gathered
    });
  }
  if (call.ended) return;
  state.ws.send(JSON.stringify({type: "call.start", mode: call.mode, post_id: call.post_id,
                                incident_id: call.incident_id, sdp: pc.localDescription.sdp}));
}
async function answer() {
  const inc = state.incidents.get(state.selected);
  if (!inc || state.call) return;
  const call = {mode: "call", post_id: inc.post_id, incident_id: inc.id, call_id: null,
                clickedAt: performance.now(), video: $("video"), audio: $("remote-audio")};
  state.call = call;
  updateCallBar();
  await openPeer(call, call.video, call.audio);
}
async function viewCamera(postId) {
  if (state.view) hangup(state.view);
  const call = {mode: "view", post_id: postId, incident_id: null, call_id: null,
                clickedAt: performance.now(), video: $("viewer-video"), audio: null};
  state.view = call;
  $("viewer").classList.remove("hidden");
  $("viewer-title").textContent = `Camera of ${postId}`;
  $("viewer-status").textContent = "connecting…";
  await openPeer(call, call.video, null);
}
function endLocal(call, reason) {
  if (!call || call.ended) return;
  call.ended = true;
  if (call.stream) call.stream.getTracks().forEach((t) => t.stop());
  if (call.pc) call.pc.close();
  call.video.srcObject = null;
  if (call.audio) call.audio.srcObject = null;
  if (state.call === call) {
    state.call = null;
    $("call-status").textContent = reason ? `call ended: ${reason}` : "";
    updateCallBar();
  }
  if (state.view === call) {
    state.view = null;
    $("viewer-status").textContent = reason ? `camera closed: ${reason}` : "";
  }
}
function hangup(call, reason) {
  if (!call || call.ended) return;
  if (call.call_id && state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({type: "call.hangup", call_id: call.call_id}));
  }
  endLocal(call, reason || "hung up");
}
const byMode = (mode) => (mode === "view" ? state.view : state.call);
const byId = (id) => [state.call, state.view].find((c) => c && c.call_id === id);
async function onCallAnswer(msg) {
  const call = byMode(msg.mode);
  if (!call || call.post_id !== msg.post_id || call.call_id) {  // we gave up meanwhile
    state.ws.send(JSON.stringify({type: "call.hangup", call_id: msg.call_id}));
    return;
  }
  call.call_id = msg.call_id;
  await call.pc.setRemoteDescription({type: "answer", sdp: msg.sdp});
  if (call.mode === "view") $("viewer-status").textContent = "live";
  updateCallBar();
}
// For tests and the benchmark: frames decoded by the video receiver so far.
state.videoStats = async (mode = "call") => {
  const call = byMode(mode);
  if (!call || !call.pc) return {framesDecoded: 0, connected: false};
  const stats = await call.pc.getStats();
  let frames = 0;
  stats.forEach((s) => { if (s.type === "inbound-rtp" && s.kind === "video") frames = s.framesDecoded || 0; });
  return {framesDecoded: frames, connected: call.pc.connectionState === "connected", callId: call.call_id};
};
$("btn-answer").addEventListener("click", () => {
  answer().catch((e) => { showError(e); endLocal(state.call, e.message); });
});
$("btn-hangup").addEventListener("click", () => hangup(state.call));
$("viewer-close").addEventListener("click", () => { hangup(state.view, "closed"); $("viewer").classList.add("hidden"); });
window.addEventListener("beforeunload", () => { hangup(state.call, "console closed"); hangup(state.view, "console closed"); });

// ------------------------------------------------------------------ posts and map
async function loadTeams() {
  if (!may("incidents.view")) return;
  state.teams = await api("teams");
  $("team").innerHTML = state.teams.map((t) =>
    `<option value="${esc(t.id)}">${esc(t.id)} ${esc(t.name || "")} (${esc(t.state)})</option>`).join("");
  renderPosts();
}
async function loadPosts() {
  if (!may("posts.view")) return;
  const rows = await api("posts");
  state.posts = new Map(rows.map((r) => [r.id, r]));
  renderPosts();
}
$("posts").addEventListener("click", (ev) => {
  const button = ev.target.closest("button.camera");
  if (button) viewCamera(button.dataset.post).catch((e) => { $("viewer-status").textContent = e.message; });
  const test = ev.target.closest("button.testmode");
  if (test) {
    const on = test.dataset.on === "1";
    $("posts-error").textContent = "";
    post(`posts/${encodeURIComponent(test.dataset.post)}/test_mode`, {on, reason: $("test-reason").value})
      .then((row) => { state.posts.set(row.id, {...state.posts.get(row.id), ...row}); renderPosts(); })
      .catch((e) => { $("posts-error").textContent = e.message; });
  }
});
function renderPosts() {
  const alarmed = new Set([...state.incidents.values()]
    .filter((i) => isOpen(i) && !isTest(i)).map((i) => i.post_id));
  const rows = [...state.posts.values()];
  $("posts").querySelector("tbody").innerHTML = rows.map((p) => {
    const h = p.health || {};
    const clock = typeof h.clock_offset_s === "number" && Math.abs(h.clock_offset_s) >= 1
      ? `, clock ${h.clock_offset_s > 0 ? "behind" : "ahead"} ${Math.abs(h.clock_offset_s).toFixed(0)} s` : "";
    const health = p.health ? `siren ${h.siren ? "on" : "off"}, strobe ${h.strobe ? "on" : "off"}, outbox ${h.outbox_depth}${clock}` : "—";
    const test = p.test_mode
      ? `${TEST_BADGE}by ${esc(p.test_mode_by)}: ${esc(p.test_mode_reason)}` : "off";
    const toggle = may("posts.test_mode")
      ? ` <button class="testmode" data-post="${esc(p.id)}" data-on="${p.test_mode ? 0 : 1}">` +
        `${p.test_mode ? "End test mode" : "Test mode"}</button>` : "";
    return `<tr id="post-${esc(p.id)}" class="${p.test_mode ? "test" : ""}"><td>${esc(p.id)}</td><td>${esc(p.school)}</td>` +
      `<td class="state">${alarmed.has(p.id) ? "alarm" : esc(p.state)}</td><td>${fmtTime(p.last_seen)}</td>` +
      `<td>${esc(health)}</td><td>${p.faults.map((f) => esc(f.kind + ": " + f.detail)).join("; ")}</td>` +
      `<td class="testmode">${test}${toggle}</td>` +
      `<td>${may("calls") ? `<button class="camera" data-post="${esc(p.id)}">Camera</button>` : ""}</td></tr>`;
  }).join("");
  const located = rows.filter((p) => p.lat != null && p.lon != null);
  const teams = state.teams.filter((t) => t.position && t.position.known);
  if (!located.length && !teams.length) { $("map").innerHTML = ""; return; }
  const lats = [...located.map((p) => p.lat), ...teams.map((t) => t.position.lat)];
  const lons = [...located.map((p) => p.lon), ...teams.map((t) => t.position.lon)];
  // Web Mercator at the largest zoom that fits everything in 560x360 px of the 600x400 map.
  const mx = (lon, z) => ((lon + 180) / 360) * 256 * 2 ** z;
  const my = (lat, z) => {
    const r = (lat * Math.PI) / 180;
    return ((1 - Math.log(Math.tan(r) + 1 / Math.cos(r)) / Math.PI) / 2) * 256 * 2 ** z;
  };
  const [la0, la1, lo0, lo1] = [Math.min(...lats), Math.max(...lats), Math.min(...lons), Math.max(...lons)];
  let z = 18;
  while (z > 1 && (mx(lo1, z) - mx(lo0, z) > 560 || my(la0, z) - my(la1, z) > 360)) z--;
  const cx = (mx(lo0, z) + mx(lo1, z)) / 2, cy = (my(la0, z) + my(la1, z)) / 2;
  const sx = (lon) => mx(lon, z) - cx + 300;
  const sy = (lat) => my(lat, z) - cy + 200;
  let tiles = "";
  if (state.me.tile_url) {  // optional tile server from [console] tile_url: {z}/{x}/{y}
    for (let tx = Math.floor((cx - 300) / 256); tx <= Math.floor((cx + 300) / 256); tx++) {
      for (let ty = Math.floor((cy - 200) / 256); ty <= Math.floor((cy + 200) / 256); ty++) {
        const url = state.me.tile_url.replace("{z}", z).replace("{x}", tx).replace("{y}", ty);
        tiles += `<image href="${esc(url)}" x="${(tx * 256 - cx + 300).toFixed(1)}" ` +
          `y="${(ty * 256 - cy + 200).toFixed(1)}" width="256" height="256"/>`;
      }
    }
  }
  $("map").innerHTML = tiles + located.map((p) => {
    const cls = alarmed.has(p.id) ? "alarm" : (p.test_mode ? "test" : p.state);
    return `<circle class="${esc(cls)}" cx="${sx(p.lon).toFixed(1)}" cy="${sy(p.lat).toFixed(1)}" r="${alarmed.has(p.id) ? 9 : 6}">` +
      `<title>${esc(p.id)} ${esc(p.name)} (${esc(cls)})</title></circle>`;
  }).join("") + teams.map((t) =>
    `<rect class="${esc(t.state)}" x="${(sx(t.position.lon) - 6).toFixed(1)}" y="${(sy(t.position.lat) - 6).toFixed(1)}" width="12" height="12">` +
    `<title>team ${esc(t.id)} ${esc(t.name || "")} (${esc(t.state)})</title></rect>`).join("");
}

// ------------------------------------------------------------------ live notices
function connect(delay = 500) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/console/ws?csrf=${encodeURIComponent(state.csrf)}`);
  state.ws = ws;
  ws.onopen = () => { $("conn").textContent = "live"; $("conn").className = "conn ok"; delay = 500; };
  ws.onclose = () => {
    $("conn").textContent = "reconnecting…"; $("conn").className = "conn bad";
    endLocal(state.call, "connection to the server lost");
    endLocal(state.view, "connection to the server lost");
    setTimeout(() => connect(Math.min(delay * 2, 10000)), delay);
  };
  ws.onmessage = (ev) => { onNotice(JSON.parse(ev.data)).catch((e) => console.error(e)); };
}
async function onNotice(msg) {
  switch (msg.type) {
    case "hello":
      state.calls = new Map(msg.calls.filter((c) => c.mode === "call").map((c) => [c.post_id, c]));
      await Promise.all([loadIncidents(), loadPosts(), loadTeams()]);
      break;
    case "overflow":
      await Promise.all([loadIncidents(), loadPosts(), loadTeams()]);
      break;
    case "team_status":
    case "dispatch_queued":
      await loadTeams();
      if (msg.incident_id && msg.incident_id === state.selected) await showIncident(state.selected);
      break;
    case "incident_opened":
    case "incident_updated":
    case "event_joined":
      if (msg.incident) {
        state.incidents.set(msg.incident.id, msg.incident);
        if (msg.type === "incident_opened" && wantsRing(msg.incident)) ring(msg.incident);
        else if (!wantsRing(msg.incident)) stopRinging(msg.incident.id);
      }
      renderQueue(); renderPosts();
      if (msg.incident_id === state.selected) await showIncident(state.selected);
      break;
    case "post_test_mode":
      await loadPosts();
      break;
    case "post_state": {
      const p = state.posts.get(msg.post_id);
      if (p) { p.state = msg.state; renderPosts(); }
      break;
    }
    case "command_updated":
      if (state.selected && msg.command.incident_id === state.selected) {
        const el = document.getElementById(`cmd-${msg.command.id}`);
        if (el) el.outerHTML = commandItem(msg.command);
        else $("commands").insertAdjacentHTML("afterbegin", commandItem(msg.command));
      }
      break;
    case "call_updated":
      if (msg.mode !== "call") break;
      if (msg.state === "ended") state.calls.delete(msg.post_id);
      else state.calls.set(msg.post_id, msg);
      for (const inc of state.incidents.values()) {
        if (inc.post_id === msg.post_id) {
          inc.call_owner = msg.state === "ended" ? null : msg.user;
          if (!wantsRing(inc)) stopRinging(inc.id);
        }
      }
      renderQueue(); updateCallBar();
      break;
    case "call.answer":
      await onCallAnswer(msg);
      break;
    case "call.error": {
      const call = byMode(msg.mode || "call");
      if (call && call.post_id === msg.post_id) endLocal(call, msg.error);
      else showError(msg.error || "call refused");
      break;
    }
    case "call.ended":
      endLocal(byId(msg.call_id), msg.reason);
      break;
    default:
      break;
  }
}

// ------------------------------------------------------------------ accounts (admins)
async function loadUsers() {
  if (!may("users.manage")) return;
  const users = await api("users");
  const roles = state.me.roles;
  $("users").querySelector("tbody").innerHTML = users.map((u) =>
    `<tr id="user-${esc(u.name)}" class="${u.disabled ? "disabled" : ""}" data-name="${esc(u.name)}">` +
    `<td>${esc(u.name)}</td>` +
    `<td><select class="role">${roles.map((r) => `<option${r === u.role ? " selected" : ""}>${esc(r)}</option>`).join("")}</select></td>` +
    `<td>${fmtTime(u.created_at)}</td>` +
    `<td class="status">${u.disabled ? "disabled" : "active"} <button class="toggle" data-disabled="${u.disabled ? 0 : 1}">` +
    `${u.disabled ? "Enable" : "Disable"}</button></td>` +
    `<td><input class="newpw" type="password" placeholder="new password" maxlength="1024" autocomplete="new-password">` +
    ` <button class="resetpw">Reset password</button></td></tr>`).join("");
  if (may("audit.view")) {
    const rows = await api("audit");
    $("audit").innerHTML = rows.slice(0, 50).map((a) =>
      `<li>${fmtTime(a.at)} <b>${esc(a.action)}</b> by ${esc(a.actor)} ${esc(a.target)} ${esc(a.detail)}</li>`).join("");
  }
}
function usersError(e) { $("users-error").textContent = e ? (e.message || String(e)) : ""; }
const userDone = () => { usersError(null); return loadUsers(); };
$("user-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  post("users", {name: $("new-name").value, role: $("new-role").value, password: $("new-password").value})
    .then(() => { $("new-name").value = ""; $("new-password").value = ""; })
    .then(userDone).catch(usersError);
});
$("users").addEventListener("change", (ev) => {
  const select = ev.target.closest("select.role");
  if (!select) return;
  const name = select.closest("tr").dataset.name;
  post(`users/${encodeURIComponent(name)}/role`, {role: select.value}).then(userDone)
    .catch((e) => { usersError(e); loadUsers(); });
});
$("users").addEventListener("click", (ev) => {
  const row = ev.target.closest("tr[data-name]");
  if (!row) return;
  const name = encodeURIComponent(row.dataset.name);
  if (ev.target.closest("button.toggle")) {
    post(`users/${name}/disabled`, {disabled: ev.target.dataset.disabled === "1"})
      .then(userDone).catch(usersError);
  } else if (ev.target.closest("button.resetpw")) {
    post(`users/${name}/password`, {password: row.querySelector("input.newpw").value})
      .then(userDone).catch(usersError);
  }
});

// ------------------------------------------------------------------ start
for (const tab of document.querySelectorAll(".tab")) {
  tab.addEventListener("click", () => {
    document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
    document.querySelectorAll(".view").forEach((v) => v.classList.toggle("hidden", v.id !== `view-${tab.dataset.view}`));
  });
}
$("sound").addEventListener("click", () => ensureAudio());
document.addEventListener("click", () => ensureAudio(), {once: true});
$("logout").addEventListener("click", async () => {
  hangup(state.call, "logged out");
  hangup(state.view, "logged out");
  try { await post("logout"); } finally { location.href = "/console/login"; }
});

(async () => {
  state.me = await api("me");
  state.csrf = state.me.csrf;
  $("who").textContent = `${state.me.name} (${state.me.role})`;
  $("classification").innerHTML = state.me.classifications.map((c) => `<option>${esc(c)}</option>`).join("");
  if (!may("incidents.view")) { $("tab-queue").classList.add("hidden"); $("tab-posts").click(); }
  if (may("users.manage")) {
    $("tab-users").classList.remove("hidden");
    $("new-role").innerHTML = state.me.roles.map((r) => `<option>${esc(r)}</option>`).join("");
    loadUsers().catch(usersError);
  }
  $("testmode-bar").classList.toggle("hidden", !may("posts.test_mode"));
  ensureAudio();
  connect();
})();
