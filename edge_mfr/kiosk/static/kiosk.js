// edge-mfr kiosk page: camera preview, live advice, guided enrollment, unlock. Frames go to this page's own
// server (POST /api/frame) one at a time and are never stored; everything else is a small JSON call.
"use strict";

const FRAME_INTERVAL_MS = 150;
const PING_INTERVAL_MS = 5000;
const RESULT_SHOWN_MS = 15000;  // then the result clears, so the next person does not see the last one's
const $ = (id) => document.getElementById(id);

let token = null;
let running = false;
let stream = null;
let pingTimer = null;
let lockTimer = null;
let resultTimer = null;
let state = null;
const grabCanvas = document.createElement("canvas");

class KioskError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path, { json, body, type, method = "POST" } = {}) {
  const headers = {};
  if (token) headers["X-Kiosk-Session"] = token;
  let payload;
  if (json !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(json); }
  else if (body !== undefined) { headers["Content-Type"] = type; payload = body; }
  let response;
  try {
    response = await fetch(path, { method, headers, body: payload, cache: "no-store" });
  } catch (err) {
    throw new KioskError("The kiosk server cannot be reached: is edge-mfr kiosk still running?", 0);
  }
  let data;
  try { data = await response.json(); } catch (err) { data = {}; }
  if (!response.ok) throw new KioskError(data.error || `The kiosk server answered HTTP ${response.status}`, response.status);
  return data;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function setMessage(id, text, kind = "") {
  const el = $(id);
  el.textContent = text;
  el.className = "message" + (kind ? " " + kind : "");
}

function setConnection(text, kind) {
  const el = $("connection");
  el.textContent = text;
  el.className = "pill " + kind;
}

// ---------------------------------------------------------------------------------------------- session
async function openSession(takeover) {
  try {
    const reply = await api("/api/session", { json: { takeover } });
    token = reply.token;
    $("session-message").hidden = true;
    setConnection("connected", "ok");
    applyState(reply);
    pingTimer = setInterval(ping, PING_INTERVAL_MS);
    await startCamera();
  } catch (err) {
    sessionLost(err);
  }
}

function sessionLost(err) {
  running = false;
  token = null;
  clearInterval(pingTimer);
  if (stream) stream.getTracks().forEach((track) => track.stop());
  stream = null;
  $("session-text").textContent = err.message;
  $("takeover").hidden = err.status !== 409;
  $("session-message").hidden = false;
  $("unlock-button").disabled = true;
  $("operator-tools").hidden = true;
  setConnection(err.status === 409 ? "in use elsewhere" : "not connected", "bad");
  $("advice").textContent = "";
}

async function ping() {
  try { applyState(await api("/api/ping")); } catch (err) { handleError(err); }
}

function applyState(s) {
  state = s;
  const operator = Boolean(s.operator);
  $("operator-tools").hidden = !operator;
  $("pin-form").hidden = operator;
  $("enroll-status").hidden = !s.enrollment;
  $("enroll-form").hidden = Boolean(s.enrollment);
  if (s.enrollment) showProgress(s.enrollment);
  $("liveness-note").textContent = "Liveness: " + s.liveness.description + ".";
  $("model-note").textContent = `Model ${s.model}; thresholds at FMR ${s.fmr}: ${s.threshold.unmasked} unmasked, ` +
    `${s.threshold.masked} masked.`;
  if (s.unlock_locked_for_s > 0) lockUnlock(s.unlock_locked_for_s);
  else if (!lockTimer) $("unlock-button").disabled = !stream || s.mode === "enroll" || s.mode === "unlock";
}

function handleError(err) {
  if (err.status === 409 && /no longer the active kiosk page/.test(err.message)) { sessionLost(err); return; }
  if (err.status === 0) { setConnection("server unreachable", "bad"); $("advice").textContent = err.message; return; }
  if (err.status === 401) { refreshState(); setMessage("operator-message", err.message, "error"); return; }
  $("advice").textContent = err.message;
  $("advice").className = "advice warn";
}

async function refreshState() {
  try { applyState(await api("/api/ping")); } catch (err) { /* the next frame or ping reports it */ }
}

// ----------------------------------------------------------------------------------------------- camera
function cameraMessage(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Camera permission was denied. Allow the camera for this page in the browser's site settings, " +
        "then reload the page.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No camera found. Connect a camera to the kiosk and reload the page.";
    case "NotReadableError":
    case "AbortError":
      return "The camera is busy: another program or browser tab is using it. Close that, then reload the page.";
    default:
      return "The camera could not be started" + (err && err.message ? ": " + err.message : "") + ".";
  }
}

function cameraError(text) {
  const el = $("camera-error");
  el.textContent = text;
  el.hidden = false;
  $("advice").textContent = "No camera: unlock and enrollment need one.";
  $("advice").className = "advice warn";
  $("unlock-button").disabled = true;
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    cameraError("This page cannot use a camera here: open it on the kiosk itself as http://127.0.0.1:PORT " +
      "(browsers allow cameras only on https or localhost pages).");
    return;
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } },
      audio: false });
  } catch (err) {
    cameraError(cameraMessage(err));
    return;
  }
  const video = $("video");
  video.srcObject = stream;
  stream.getVideoTracks()[0].addEventListener("ended", () => {
    running = false;
    cameraError("The camera was disconnected. Reconnect it and reload the page.");
  });
  try { await video.play(); } catch (err) { /* autoplay of a muted stream is allowed; frames still arrive */ }
  $("camera-error").hidden = true;
  running = true;
  applyState(state);
  frameLoop();
}

function grabFrame() {
  const video = $("video");
  const scale = Math.min(1, 1280 / video.videoWidth);
  grabCanvas.width = Math.round(video.videoWidth * scale);
  grabCanvas.height = Math.round(video.videoHeight * scale);
  grabCanvas.getContext("2d").drawImage(video, 0, 0, grabCanvas.width, grabCanvas.height);
  return new Promise((resolve) => grabCanvas.toBlob(resolve, "image/jpeg", 0.92));
}

async function frameLoop() {
  while (running) {
    const started = performance.now();
    const video = $("video");
    if (video.readyState >= 2 && video.videoWidth > 0) {
      const blob = await grabFrame();
      if (blob && running) {
        try { handleFrame(await api("/api/frame", { body: blob, type: "image/jpeg" })); }
        catch (err) { handleError(err); }
      }
    }
    await sleep(Math.max(FRAME_INTERVAL_MS - (performance.now() - started), 20));
  }
}

function drawBox(reply) {
  const canvas = $("overlay");
  const video = $("video");
  canvas.width = canvas.clientWidth;
  canvas.height = canvas.clientHeight;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!reply.box || !video.videoWidth) return;
  // The frame may have been scaled before upload, and the video is letterboxed (object-fit: contain).
  const [frameW, frameH] = reply.frame;
  const scale = Math.min(canvas.width / frameW, canvas.height / frameH);
  const offsetX = (canvas.width - frameW * scale) / 2;
  const offsetY = (canvas.height - frameH * scale) / 2;
  const [x1, y1, x2, y2] = reply.box;
  ctx.lineWidth = 4;
  ctx.strokeStyle = reply.ok ? "#10b981" : "#f59e0b";
  ctx.strokeRect(offsetX + x1 * scale, offsetY + y1 * scale, (x2 - x1) * scale, (y2 - y1) * scale);
}

function handleFrame(reply) {
  drawBox(reply);
  const advice = $("advice");
  if (reply.advice.length) {
    advice.textContent = reply.advice.join(" · ");
    advice.className = "advice warn";
  } else {
    const ready = { enroll: "Good, hold still", unlock: "Checking…" }[reply.mode] || "Face found: ready";
    advice.textContent = reply.masked ? "Mask detected. " + ready : ready;
    advice.className = "advice ok";
  }
  if (reply.enrollment) showProgress(reply.enrollment);
  if (reply.enrolled) {
    const e = reply.enrolled;
    setMessage("enroll-message", `Enrolled ${e.user}: ${e.captures} captures, ${e.templates} templates ` +
      `(${e.masked_templates} masked, ${e.synthetic_templates} of them with synthetic masks).`, "ok");
    loadUsers();
  }
  if (reply.error) {
    setMessage(reply.mode === "enroll" ? "enroll-message" : "unlock-message", reply.error, "error");
  }
  if (reply.decision) showDecision(reply.decision);
  if (reply.enrolled !== undefined || reply.decision !== undefined) refreshState();
  if (reply.unlock_locked_for_s > 0) lockUnlock(reply.unlock_locked_for_s);
}

// ----------------------------------------------------------------------------------------------- unlock
function showDecision(d) {
  const el = $("result");
  el.hidden = false;
  el.dataset.decision = d.accepted ? "accepted" : "rejected";
  el.className = "result " + (d.accepted ? "accepted" : "rejected");
  el.textContent = d.accepted ? `Welcome, ${d.user}` : "Not recognised";
  const details = document.createElement("small");
  const relation = d.score >= d.threshold ? "≥" : "<";
  details.textContent = `${d.accepted ? "score" : "best score"} ${d.score.toFixed(4)} ${relation} threshold ` +
    `${d.threshold.toFixed(4)} (${d.route} face, FMR ${d.fmr})` +
    (d.accepted ? "" : `; ${d.tries_left} ${d.tries_left === 1 ? "try" : "tries"} left before a 30 s lockout`);
  el.appendChild(details);
  setMessage("unlock-message", d.error || "", d.error ? "error" : "");
  clearTimeout(resultTimer);
  resultTimer = setTimeout(() => { el.hidden = true; }, RESULT_SHOWN_MS);
}

function lockUnlock(seconds) {
  const until = Date.now() + seconds * 1000;
  clearInterval(lockTimer);
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    if (left <= 0) {
      clearInterval(lockTimer);
      lockTimer = null;
      setMessage("unlock-message", "");
      if (state) applyState(state);
      refreshState();
      return;
    }
    $("unlock-button").disabled = true;
    setMessage("unlock-message", `Too many failed unlocks: locked for ${left} more second${left === 1 ? "" : "s"}`,
      "error");
  };
  lockTimer = setInterval(tick, 1000);
  tick();
}

$("unlock-button").addEventListener("click", async () => {
  $("result").hidden = true;
  setMessage("unlock-message", "Look at the camera");
  try { applyState(await api("/api/unlock/start")); }
  catch (err) {
    if (err.status === 429) lockUnlock(parseInt(/(\d+)/.exec(err.message)?.[1] || "30", 10));
    else if (err.status === 409 && !/active kiosk page/.test(err.message)) setMessage("unlock-message", err.message, "error");
    else handleError(err);
  }
});

// --------------------------------------------------------------------------------------------- operator
$("pin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const pin = $("pin").value;
  $("pin").value = "";
  try {
    applyState(await api("/api/operator/sign-in", { json: { pin } }));
    setMessage("operator-message", "Signed in as operator", "ok");
    loadUsers();
  } catch (err) {
    if (err.status === 409) handleError(err);
    else setMessage("operator-message", err.message, "error");
  }
});

$("sign-out").addEventListener("click", async () => {
  try { applyState(await api("/api/operator/sign-out")); setMessage("operator-message", "Signed out"); }
  catch (err) { handleError(err); }
});

$("enroll-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  setMessage("enroll-message", "");
  try {
    applyState(await api("/api/enroll/start", { json: {
      user: $("enroll-name").value, masked: $("enroll-masked").checked, replace: $("enroll-replace").checked } }));
  } catch (err) {
    if (err.status === 409 && /active kiosk page/.test(err.message)) handleError(err);
    else setMessage("enroll-message", err.message, "error");
  }
});

$("enroll-cancel").addEventListener("click", async () => {
  try { applyState(await api("/api/cancel")); setMessage("enroll-message", "Enrollment cancelled"); }
  catch (err) { handleError(err); }
});

function showProgress(p) {
  $("enroll-prompt").textContent = `${p.user}: ${p.prompt}`;
  $("enroll-progress").max = p.total;
  $("enroll-progress").value = p.done;
  $("enroll-count").textContent = `${p.done} of ${p.total}`;
}

async function loadUsers() {
  let reply;
  try { reply = await api("/api/users", { method: "GET" }); } catch (err) { handleError(err); return; }
  const list = $("users");
  list.replaceChildren();
  if (!reply.users.length) {
    const li = document.createElement("li");
    li.textContent = "nobody yet";
    list.appendChild(li);
  }
  for (const user of reply.users) {
    const li = document.createElement("li");
    li.textContent = `${user.name} (${user.num_templates} templates)`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.addEventListener("click", async () => {
      if (remove.dataset.armed !== "yes") {  // two clicks: no dialog a kiosk browser might suppress
        remove.dataset.armed = "yes";
        remove.textContent = `Really remove ${user.name}?`;
        return;
      }
      try {
        await api("/api/users/remove", { json: { user: user.name } });
        setMessage("enroll-message", `Removed ${user.name}`, "ok");
      } catch (err) { setMessage("enroll-message", err.message, "error"); }
      loadUsers();
    });
    li.appendChild(remove);
    list.appendChild(li);
  }
}

// ------------------------------------------------------------------------------------------------ start
$("takeover").addEventListener("click", () => openSession(true));
window.addEventListener("pagehide", () => {
  if (token) fetch("/api/session/close", { method: "POST", keepalive: true, headers: { "X-Kiosk-Session": token } });
});
openSession(false);
