// avatar-serve's web page: one more client of the HTTP API (see README "HTTP API").
// Plain JavaScript, no build step, no third-party code: it works offline.
//
// Calls carry `Authorization: Bearer <key>` when a key is set (kept in sessionStorage), so server-sent
// events are read with fetch() (EventSource cannot send headers) and results are fetched as blobs.
// Talk turns are played while they stream: the fragmented MP4 goes into a Media Source Extensions
// SourceBuffer, with the codec string read from the stream's own avcC box.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "avatar-serve.api-key";
const FINAL = new Set(["completed", "failed", "cancelled"]);
const AAC_LC = "mp4a.40.2"; // the lip-sync stage's audio: FFmpeg's AAC encoder, LC profile
const STAGE_TEXT = {
  encode: "Encoding the prompt and the portrait",
  decode: "Decoding the latents and writing the MP4",
  lipsync: "Lip-syncing the clip",
};

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  limits: null,
  job: null, // the job shown in the Job card
  follow: null, // AbortController of the job's event stream
  videoUrl: null,
  eventsById: new Map(), // job id -> events followed live on this page (timed on arrival)
  avatar: null,
  avatarPoll: null,
  speech: null, // {blob, name}: the audio the next turn sends
  recorder: null,
  talkUrl: null,
  authFailed: false,
};

// ------------------------------------------------------------------ API calls and errors

class ApiFailure extends Error {
  constructor(status, type, message, param, retryAfter) {
    super(message);
    Object.assign(this, { status, type, param: param ?? null, retryAfter: retryAfter ?? null });
  }
}

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function failureOf(resp) {
  let type = "http_error";
  let message = `${resp.status} ${resp.statusText || "error"}`;
  let param = null;
  try {
    const body = await resp.json();
    if (body && body.error) ({ type, message, param } = body.error);
  } catch (_) {
    /* not the JSON envelope: keep the status line */
  }
  return new ApiFailure(resp.status, type, message, param, resp.headers.get("Retry-After"));
}

async function api(path, { method = "GET", body, signal } = {}) {
  let resp;
  try {
    resp = await fetch(path, { method, body, signal, headers: authHeaders(), cache: "no-store" });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure(0, "network_error", `the server could not be reached (${err.message})`, null);
  }
  if (!resp.ok) {
    const failure = await failureOf(resp);
    if (failure.status === 401) authFailed(failure);
    throw failure;
  }
  if (state.authFailed) authOk();
  return resp;
}

/** An API error in words. */
function describe(err) {
  if (!(err instanceof ApiFailure)) return `Something went wrong in the page: ${err.message}`;
  switch (err.status) {
    case 401:
      return `Not authorised (401): ${err.message}. Enter a valid API key at the top of the page.`;
    case 403:
      return `Not allowed with this key (403): ${err.message}`;
    case 404:
      return `Not found (404): ${err.message}`;
    case 408:
      return `The upload took too long (408): ${err.message}`;
    case 409:
      return `Not now (409): ${err.message}`;
    case 413:
      return `Too large (413): ${err.message}`;
    case 429: {
      const secs = Number(err.retryAfter);
      const when = Number.isFinite(secs)
        ? `Retry after ${secs} s (at ${new Date(Date.now() + secs * 1000).toLocaleTimeString()}).`
        : "Retry in a moment.";
      return `The server is busy (429): ${err.message}. ${when}`;
    }
    case 0:
      return `Network error: ${err.message}`;
    default:
      return err.status >= 500 ? `Server error (${err.status}): ${err.message}` : err.message;
  }
}

const FIELD_OF_PARAM = { size: ["width", "height"] }; // API field -> the inputs that make it

function clearErrors(form) {
  form.querySelectorAll(".field-error").forEach((el) => (el.textContent = ""));
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
}

/** Show an API error next to the field its `param` names (else at the form's foot). */
function showError(form, err) {
  if (err && err.name === "AbortError") return;
  console.warn(err);
  const param = err instanceof ApiFailure ? err.param : null;
  let slot = param ? form.querySelector(`[data-error-for="${CSS.escape(param)}"]`) : null;
  if (!slot) slot = form.querySelector('[data-error-for=""]');
  slot.textContent = describe(err);
  if (param) {
    for (const name of FIELD_OF_PARAM[param] || [param]) {
      const input = form.querySelector(`[name="${CSS.escape(name)}"]`);
      if (input) input.setAttribute("aria-invalid", "true");
    }
  }
}

// ------------------------------------------------------------------ auth

function authFailed(err) {
  state.authFailed = true;
  const text = state.key
    ? `The API key was refused (401 Unauthorized): ${err.message}. Check the key and press "Use key" again.`
    : `This server needs an API key (401 Unauthorized): enter it above and press "Use key".`;
  $("auth-error").textContent = text;
  $("auth-error").hidden = false;
  $("key-status").textContent = text;
  $("key-status").className = "note bad";
  $("model-info").textContent = "Not connected: an API key is needed.";
}

function authOk() {
  state.authFailed = false;
  $("auth-error").hidden = true;
  $("key-status").textContent = state.key ? "Key accepted (kept in this tab's session only)." : "No key needed.";
  $("key-status").className = "note good";
}

function setupAuth() {
  $("api-key").value = state.key;
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.key = $("api-key").value.trim();
    if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
    else sessionStorage.removeItem(KEY_STORE);
    $("key-status").textContent = "Checking the key…";
    $("key-status").className = "note";
    connect();
  });
  $("key-clear").addEventListener("click", () => {
    state.key = "";
    $("api-key").value = "";
    sessionStorage.removeItem(KEY_STORE);
    $("key-status").textContent = "Key forgotten.";
    $("key-status").className = "note";
    connect();
  });
}

// ------------------------------------------------------------------ the profile's limits

async function connect() {
  try {
    const models = await (await api("/v1/models")).json();
    const card = models.data[0];
    state.limits = card.limits;
    applyLimits(card.limits);
    const loras = Object.entries(card.loras || {})
      .filter(([, active]) => active.length)
      .map(([role, active]) => `${role}: ${active.map((l) => l.name || l).join(", ")}`);
    $("model-info").textContent =
      `Serving ${card.id}${card.description ? ` (${card.description})` : ""}` +
      (loras.length ? ` · LoRAs ${loras.join("; ")}` : "");
    authOk();
    refreshJobs();
  } catch (err) {
    if (err.status !== 401) $("model-info").textContent = `Not connected: ${describe(err)}`;
  }
}

function applyLimits(lim) {
  if (!lim) return;
  const [w, h] = lim.default_size.split("x").map(Number);
  for (const p of ["v", "a"]) {
    bound($(`${p}-width`), 16, lim.max_width, w);
    bound($(`${p}-height`), 16, lim.max_height, h);
    bound($(`${p}-frames`), 1, lim.max_frames, lim.default_num_frames);
    $(`${p}-prompt`).maxLength = lim.max_prompt_chars;
  }
  const steps = $("v-steps");
  bound(steps, 1, lim.max_steps, lim.default_num_inference_steps);
  if (lim.fixed_steps) {
    steps.min = steps.max = String(lim.default_num_inference_steps);
    steps.readOnly = true;
    steps.title = "this profile's sampler is distilled to a fixed number of steps";
  }
  $("v-image-hint").textContent =
    `Up to ${(lim.max_image_bytes / 1048576).toFixed(0)} MB; it is resized to the clip. ` +
    `Clips up to ${lim.max_width}x${lim.max_height} (${lim.max_pixels} pixels), ${lim.max_frames} frames, ` +
    `${lim.max_steps} steps.`;
  $("t-audio").title = `up to ${lim.max_audio_seconds} s of speech`;
}

function bound(input, min, max, value) {
  input.min = String(min);
  input.max = String(max);
  if (!input.value) input.value = String(value);
}

// ------------------------------------------------------------------ server-sent events over fetch

async function* sseEvents(resp) {
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}

// ------------------------------------------------------------------ video jobs

/** A video or avatar form -> the API's multipart fields (width and height make `size`). */
function videoForm(form) {
  const f = form.elements;
  const fd = new FormData();
  fd.append("prompt", f.prompt.value);
  fd.append("size", `${f.width.value}x${f.height.value}`);
  fd.append("num_frames", f.num_frames.value);
  if (f.num_inference_steps) fd.append("num_inference_steps", f.num_inference_steps.value);
  if (f.seed.value !== "") fd.append("seed", f.seed.value);
  const file = f.input_reference.files[0];
  if (file) fd.append("input_reference", file, file.name);
  return fd;
}

async function startJob(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  clearErrors(form);
  const button = $("v-start");
  button.disabled = true;
  try {
    const job = await (await api("/v1/videos", { method: "POST", body: videoForm(form) })).json();
    openJob(job);
    refreshJobs();
  } catch (err) {
    showError(form, err);
  } finally {
    button.disabled = false;
  }
}

function setProgress(value) {
  $("v-progress").value = value;
  $("v-progress-text").textContent = `${value}%`;
}

function resetJobView(job) {
  if (state.follow) state.follow.abort();
  state.follow = null;
  state.job = job;
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = null;
  const video = $("v-video");
  video.removeAttribute("src");
  video.load();
  $("v-download").hidden = true;
  $("v-job-error").textContent = "";
  $("v-events").textContent = "";
  $("v-timeline").innerHTML = '<p class="note">Drawn when the job ends.</p>';
  $("v-timeline").dataset.segments = "0";
  $("v-job-id").textContent = `${job.id} · ${job.size}, ${job.num_frames} frames, ` +
    `${job.num_inference_steps} steps, seed ${job.seed} · “${job.prompt}”`;
  setProgress(job.progress || 0);
  $("v-stage").textContent = statusText(job);
  $("v-cancel").disabled = FINAL.has(job.status);
}

function statusText(job) {
  if (job.status === "queued") return `Queued${job.queue_position ? `: position ${job.queue_position}` : ""}`;
  if (job.status === "in_progress") return `In progress${job.stage ? `: ${job.stage}` : ""}`;
  return job.status[0].toUpperCase() + job.status.slice(1);
}

/** Show a job: follow its events (replayed from its start) until its final one. */
async function openJob(job) {
  resetJobView(job);
  const known = state.eventsById.get(job.id);
  if (FINAL.has(job.status) && known && FINAL.has(known[known.length - 1].event)) {
    known.forEach((e) => logEvent(e, known[0]._at));
    return finishJob(job.id, known[known.length - 1], known);
  }
  const controller = (state.follow = new AbortController());
  const events = [];
  const live = !FINAL.has(job.status);
  try {
    const resp = await api(`/v1/videos/${job.id}/events`, { signal: controller.signal });
    for await (const ev of sseEvents(resp)) {
      ev._at = typeof ev.at === "number" ? ev.at * 1000 : Date.now(); // the server's time when it says
      events.push(ev);
      logEvent(ev, events[0]._at);
      onJobEvent(ev);
      if (FINAL.has(ev.event)) {
        if (live || typeof ev.at === "number") state.eventsById.set(job.id, events);
        return finishJob(job.id, ev, events, live);
      }
    }
    // The stream ended without a final event (the connection dropped): ask for the record.
    const record = await (await api(`/v1/videos/${job.id}`)).json();
    $("v-stage").textContent = statusText(record);
  } catch (err) {
    if (err.name !== "AbortError") $("v-job-error").textContent = describe(err);
  } finally {
    if (state.follow === controller) state.follow = null;
  }
}

function logEvent(ev, t0) {
  const li = document.createElement("li");
  const { event, _at, at, id, ...data } = ev; // (`at` and `id`: the offset says when)
  li.textContent = `+${((_at - t0) / 1000).toFixed(2)} s  ${event}  ${JSON.stringify(data)}`;
  $("v-events").append(li);
}

function onJobEvent(ev) {
  if (typeof ev.progress === "number") setProgress(ev.progress);
  const stage = $("v-stage");
  if (ev.event === "queued") stage.textContent = `Queued: position ${ev.position}`;
  else if (ev.event === "requeued") stage.textContent = "Re-queued after a server restart";
  else if (ev.event === "retry") stage.textContent = `The ${ev.stage} stage's server died: it runs again`;
  else if (ev.event === "first_fragment") stage.textContent = "Decoding: the video streams now";
  else if (ev.event === "stage" && ev.state === "started") stage.textContent = `Stage: ${STAGE_TEXT[ev.stage] || ev.stage}`;
  else if (ev.event === "step") stage.textContent = `Stage: denoising, step ${ev.step} of ${ev.total} (${ev.expert} expert)`;
  else if (FINAL.has(ev.event)) stage.textContent = ev.event[0].toUpperCase() + ev.event.slice(1);
}

async function finishJob(id, last, events, live = true) {
  $("v-cancel").disabled = true;
  if (typeof last.progress === "number") setProgress(last.progress);
  $("v-stage").textContent = last.event[0].toUpperCase() + last.event.slice(1);
  if (last.event === "failed" && last.error) $("v-job-error").textContent = `Failed (${last.error.code}): ${last.error.message}`;
  drawTimeline(events, live || events.some((e) => typeof e.at === "number"));
  refreshJobs();
  if (last.event !== "completed") return;
  try {
    const blob = await (await api(`/v1/videos/${id}/content`)).blob();
    if (!state.job || state.job.id !== id) return; // another job was opened meanwhile
    state.videoUrl = URL.createObjectURL(blob);
    const video = $("v-video");
    video.src = state.videoUrl;
    const link = $("v-download");
    link.href = state.videoUrl;
    link.download = `${id}.mp4`;
    link.hidden = false;
  } catch (err) {
    $("v-job-error").textContent = describe(err);
  }
}

async function cancelJob() {
  if (!state.job) return;
  $("v-cancel").disabled = true;
  try {
    const job = await (await api(`/v1/videos/${state.job.id}`, { method: "DELETE" })).json();
    $("v-stage").textContent = statusText(job);
    refreshJobs();
  } catch (err) {
    $("v-job-error").textContent = describe(err);
    $("v-cancel").disabled = false;
  }
}

// ------------------------------------------------------------------ the stage timeline

const EXPERT = { high: "High-noise expert", low: "Low-noise expert" };

/** Events (each with `_at` in ms) -> [{label, start, end}]. A denoise step is reported when it
 *  ends, so the first step's time is inside the encode segment; MP4 muxing runs in the decoder (or
 *  in lip-sync, for a clip with audio), so it is inside that segment. */
function stageSegments(events) {
  const segments = [];
  let open = null;
  let lastStepAt = null;
  const close = (at) => {
    if (open) segments.push({ ...open, end: at });
    open = null;
  };
  const start = (seg, at) => {
    close(at);
    open = { ...seg, start: at };
  };
  for (const ev of events) {
    const at = ev._at;
    if (ev.event === "queued") {
      if (!open) start({ label: "Wait in the queue" }, at);
    } else if (ev.event === "stage" && ev.state === "started") {
      if (ev.stage === "lipsync" && open && open.stage === "decode") open.label = "Decode";
      const label = { encode: "Encode (text + image)", decode: "Decode + MP4 mux", lipsync: "Lip-sync + MP4 mux" }[ev.stage];
      start({ label: label || ev.stage, stage: ev.stage }, at);
    } else if (ev.event === "step") {
      if (open && open.stage === "encode") {
        open.label = `Encode + ${ev.expert} step ${ev.step}`;
        close(at);
      } else if (open && open.expert === ev.expert) {
        open.last = ev.step;
      } else {
        start({ expert: ev.expert, first: ev.step, last: ev.step }, lastStepAt ?? at);
      }
      lastStepAt = at;
    } else if (FINAL.has(ev.event)) {
      close(at);
    }
  }
  for (const seg of segments) {
    if (seg.expert) {
      const steps = seg.first === seg.last ? `step ${seg.first}` : `steps ${seg.first}–${seg.last}`;
      seg.label = `${EXPERT[seg.expert] || seg.expert}, ${steps}`;
    }
  }
  return segments;
}

function drawTimeline(events, timed) {
  const box = $("v-timeline");
  box.textContent = "";
  const segments = stageSegments(events);
  if (!segments.length) {
    box.innerHTML = '<p class="note">No stage ran.</p>';
    return;
  }
  if (!timed) {
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = "This job finished before the page followed it, and its events carry no " +
      "timestamps: the stages are listed without durations.";
    box.append(note);
  }
  const t0 = segments[0].start;
  const total = Math.max(1, segments[segments.length - 1].end - t0);
  const list = document.createElement("ol");
  list.className = "tl";
  for (const seg of segments) {
    const li = document.createElement("li");
    li.className = "tl-row";
    const label = document.createElement("span");
    label.className = "tl-label";
    label.textContent = seg.label;
    const track = document.createElement("span");
    track.className = "tl-track";
    track.setAttribute("aria-hidden", "true");
    const bar = document.createElement("span");
    bar.className = `tl-bar ${seg.expert ? `tl-${seg.expert}` : `tl-${seg.stage || "queue"}`}`;
    bar.style.marginLeft = `${(100 * (seg.start - t0)) / total}%`;
    bar.style.width = `${Math.max(0.5, (100 * (seg.end - seg.start)) / total)}%`;
    track.append(bar);
    const dur = document.createElement("span");
    dur.className = "tl-dur";
    dur.textContent = timed ? `${((seg.end - seg.start) / 1000).toFixed(2)} s` : "";
    li.append(label, track, dur);
    list.append(li);
  }
  box.append(list);
  if (timed) {
    const sum = document.createElement("p");
    sum.className = "note";
    sum.textContent = `Total ${(total / 1000).toFixed(2)} s from the first event to the last. ` +
      "A denoise step is reported when it ends, so the first step is timed with encode.";
    box.append(sum);
  }
  box.dataset.segments = String(segments.length);
}

// ------------------------------------------------------------------ recent jobs

let jobsTimer = null;

async function refreshJobs() {
  clearTimeout(jobsTimer);
  try {
    const list = await (await api("/v1/videos?limit=10")).json();
    renderJobs(list.data);
    $("jobs-error").textContent = "";
  } catch (err) {
    $("jobs-error").textContent = describe(err);
  }
  if (!state.authFailed) jobsTimer = setTimeout(refreshJobs, document.hidden ? 15000 : 4000);
}

function renderJobs(jobs) {
  const body = $("jobs-table").tBodies[0];
  body.textContent = "";
  if (!jobs.length) {
    const row = body.insertRow();
    const cell = row.insertCell();
    cell.colSpan = 7;
    cell.textContent = "No jobs yet.";
    return;
  }
  for (const job of jobs) {
    const row = body.insertRow();
    row.dataset.id = job.id;
    const created = new Date(job.created_at * 1000).toLocaleTimeString();
    for (const text of [created, job.id.slice(0, 14) + "…", job.prompt, job.size]) {
      row.insertCell().textContent = text;
    }
    const status = row.insertCell();
    status.textContent = job.status + (job.error ? ` (${job.error.code})` : "");
    status.className = `status-${job.status}`;
    if (job.error) status.title = job.error.message;
    row.insertCell().textContent = `${job.progress}%`;
    const actions = row.insertCell();
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Open";
    open.setAttribute("aria-label", `Open job ${job.id}`);
    open.addEventListener("click", () => openJob(job));
    actions.append(open);
    if (!FINAL.has(job.status)) {
      const cancel = document.createElement("button");
      cancel.type = "button";
      cancel.textContent = "Cancel";
      cancel.setAttribute("aria-label", `Cancel job ${job.id}`);
      cancel.addEventListener("click", async () => {
        cancel.disabled = true;
        try {
          await api(`/v1/videos/${job.id}`, { method: "DELETE" });
        } catch (err) {
          $("jobs-error").textContent = describe(err);
        }
        refreshJobs();
      });
      actions.append(cancel);
    }
  }
}

// ------------------------------------------------------------------ avatars

async function createAvatar(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  clearErrors(form);
  clearTimeout(state.avatarPoll);
  const fd = videoForm(form);
  $("a-create").disabled = true;
  try {
    const avatar = await (await api("/v1/avatars", { method: "POST", body: fd })).json();
    showAvatar(avatar);
  } catch (err) {
    showError(form, err);
  } finally {
    $("a-create").disabled = false;
  }
}

function showAvatar(avatar) {
  state.avatar = avatar;
  $("a-progress").value = avatar.progress || 0;
  const status = $("a-status");
  status.dataset.status = avatar.status;
  const id = `Avatar ${avatar.id.slice(0, 15)}…`;
  if (avatar.status === "ready") {
    status.textContent = `${id} is ready: it talks at ${avatar.fps} fps. Choose or record speech, then Speak.`;
  } else if (avatar.status === "failed" || avatar.status === "cancelled") {
    status.textContent = `${id} ${avatar.status}${avatar.error ? `: ${avatar.error.message}` : ""}.`;
  } else {
    const where = avatar.status === "queued" ? `queued${avatar.queue_position ? ` (position ${avatar.queue_position})` : ""}`
      : `being prepared${avatar.stage ? `: ${STAGE_TEXT[avatar.stage] || avatar.stage}` : ""}` +
        (avatar.step ? `, step ${avatar.step}` : "");
    status.textContent = `${id} is ${where} · ${avatar.progress}%`;
    state.avatarPoll = setTimeout(pollAvatar, 400);
  }
  $("t-speak").disabled = avatar.status !== "ready";
}

async function pollAvatar() {
  if (!state.avatar) return;
  try {
    showAvatar(await (await api(`/v1/avatars/${state.avatar.id}`)).json());
  } catch (err) {
    $("a-status").textContent = describe(err);
    if (err.status !== 404) state.avatarPoll = setTimeout(pollAvatar, 2000);
  }
}

// ------------------------------------------------------------------ speech in: a file or the microphone

function chooseFile() {
  const file = $("t-audio").files[0];
  state.speech = file ? { blob: file, name: file.name } : null;
  $("t-recorded").textContent = file ? `Will send ${file.name} (${(file.size / 1024).toFixed(0)} kB).` : "";
}

async function startRecording() {
  const form = $("speak-form");
  clearErrors(form);
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.MediaRecorder) {
    $("t-audio-error").textContent =
      "This browser cannot record here (the microphone needs https, or http on localhost).";
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    $("t-audio-error").textContent = `No microphone: ${err.message}`;
    return;
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  const started = performance.now();
  recorder.addEventListener("dataavailable", (e) => e.data.size && chunks.push(e.data));
  recorder.addEventListener("stop", () => {
    stream.getTracks().forEach((t) => t.stop());
    const type = recorder.mimeType || "audio/webm";
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    state.speech = { blob: new Blob(chunks, { type }), name: `recording.${ext}` };
    $("t-audio").value = "";
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    $("t-recorded").textContent = `Recorded ${secs} s (${type}). Speak sends it.`;
    $("t-record").disabled = false;
    $("t-stop").disabled = true;
    state.recorder = null;
  });
  recorder.start(250);
  state.recorder = recorder;
  $("t-recorded").textContent = "Recording… press Stop recording when done.";
  $("t-record").disabled = true;
  $("t-stop").disabled = false;
  $("t-stop").focus();
}

function stopRecording() {
  if (state.recorder) state.recorder.stop();
}

// ------------------------------------------------------------------ talk turns, played while they stream

/** The fragmented MP4's codecs from its init segment: `avc1.PPCCLL` from the avcC box (profile,
 *  compatibility, level as the encoder wrote them), plus AAC when there is an audio track. null
 *  while the moov box is not complete. */
function codecsOf(bytes) {
  let pos = 0;
  while (pos + 8 <= bytes.length) {
    const view = new DataView(bytes.buffer, bytes.byteOffset + pos);
    let size = view.getUint32(0);
    const type = String.fromCharCode(...bytes.subarray(pos + 4, pos + 8));
    if (size === 1 && pos + 16 <= bytes.length) size = Number(view.getBigUint64(8));
    if (size < 8) return null;
    if (type === "moov") {
      if (pos + size > bytes.length) return null;
      const moov = bytes.subarray(pos, pos + size);
      const avcc = indexOf(moov, "avcC");
      const codecs = [];
      if (avcc >= 0) {
        const hex = (b) => b.toString(16).padStart(2, "0");
        codecs.push(`avc1.${hex(moov[avcc + 5])}${hex(moov[avcc + 6])}${hex(moov[avcc + 7])}`);
      }
      if (indexOf(moov, "mp4a") >= 0) codecs.push(AAC_LC);
      return codecs;
    }
    pos += size;
  }
  return null;
}

function indexOf(bytes, fourcc) {
  const c = [...fourcc].map((ch) => ch.charCodeAt(0));
  for (let i = 0; i + 4 <= bytes.length; i++) {
    if (bytes[i] === c[0] && bytes[i + 1] === c[1] && bytes[i + 2] === c[2] && bytes[i + 3] === c[3]) return i;
  }
  return -1;
}

const once = (target, name) => new Promise((resolve) => target.addEventListener(name, resolve, { once: true }));

/** appendBuffer one piece at a time (a SourceBuffer takes one while not `updating`). */
class Appender {
  constructor(buffer) {
    this.buffer = buffer;
    this.queue = [];
    this.error = null;
    buffer.addEventListener("updateend", () => this.next());
    buffer.addEventListener("error", () => (this.error = new Error("the browser could not decode the stream")));
  }
  push(bytes) {
    this.queue.push(bytes);
    this.next();
  }
  next() {
    if (this.buffer.updating || !this.queue.length || this.error) return;
    try {
      this.buffer.appendBuffer(this.queue.shift());
    } catch (err) {
      this.error = err;
    }
  }
  async drain() {
    while ((this.buffer.updating || this.queue.length) && !this.error) await once(this.buffer, "updateend");
    if (this.error) throw this.error;
  }
}

function concat(a, b) {
  const out = new Uint8Array(a.length + b.length);
  out.set(a);
  out.set(b, a.length);
  return out;
}

function setMetric(id, key, ms) {
  $(id).textContent = `${(ms / 1000).toFixed(2)} s`;
  $("t-metrics").dataset[key] = String(Math.round(ms));
}

async function speak(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  clearErrors(form);
  if (!state.avatar || state.avatar.status !== "ready") {
    $("t-form-error").textContent = "Create an avatar first and wait until it is ready.";
    return;
  }
  if (!state.speech) {
    $("t-audio-error").textContent = "Choose an audio file or record from the microphone first.";
    return;
  }
  const metrics = $("t-metrics");
  for (const key of Object.keys(metrics.dataset)) delete metrics.dataset[key];
  for (const id of ["t-first-byte", "t-first-frame", "t-done"]) $(id).textContent = "…";
  $("t-status").textContent = "Sending…";
  $("t-speak").disabled = true;

  const video = $("t-video");
  if (state.talkUrl) URL.revokeObjectURL(state.talkUrl);
  const t0 = performance.now();
  const streaming = "MediaSource" in window;
  let source = null;
  if (streaming) {
    source = new MediaSource();
    state.talkUrl = URL.createObjectURL(source);
    video.src = state.talkUrl;
    video.play().catch(() => {}); // inside the click: playback starts as soon as there is a frame
  }
  let firstFrame = false;
  const onFrame = () => {
    if (firstFrame) return;
    firstFrame = true;
    setMetric("t-first-frame", "firstFrameMs", performance.now() - t0);
  };
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(onFrame);
  video.addEventListener("playing", () => {
    metrics.dataset.playingMs = metrics.dataset.playingMs || String(Math.round(performance.now() - t0));
    if (!video.requestVideoFrameCallback) onFrame();
  }, { once: true });

  const fd = new FormData();
  fd.append("audio", state.speech.blob, state.speech.name);
  try {
    const resp = await api(`/v1/avatars/${state.avatar.id}/speech`, { method: "POST", body: fd });
    $("t-status").textContent = "Streaming…";
    const reader = resp.body.getReader();
    let head = new Uint8Array(0);
    let appender = null;
    let whole = [];
    let first = true;
    if (source && source.readyState !== "open") await once(source, "sourceopen");
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (first) {
        first = false;
        setMetric("t-first-byte", "firstByteMs", performance.now() - t0);
      }
      if (appender) {
        appender.push(value);
        continue;
      }
      whole.push(value);
      if (!source) continue;
      head = concat(head, value);
      const codecs = codecsOf(head);
      if (!codecs) continue;
      const mime = `video/mp4; codecs="${codecs.join(", ")}"`;
      metrics.dataset.mime = mime;
      if (!MediaSource.isTypeSupported(mime)) {
        $("t-status").textContent = `This browser cannot stream ${mime}: playing after the download.`;
        source = null;
        continue;
      }
      appender = new Appender(source.addSourceBuffer(mime));
      appender.push(head);
      whole = null;
    }
    setMetric("t-done", "doneMs", performance.now() - t0);
    if (appender) {
      await appender.drain();
      if (source.readyState === "open") source.endOfStream();
    } else {
      // No streaming here (no MSE, or not this codec): play the whole turn once it has arrived.
      state.talkUrl = URL.createObjectURL(new Blob(whole, { type: "video/mp4" }));
      video.src = state.talkUrl;
      video.play().catch(() => {});
    }
    $("t-status").textContent = "Done. Speak again with other audio, or the same.";
  } catch (err) {
    showError(form, err);
    $("t-status").textContent = "";
    for (const id of ["t-first-byte", "t-first-frame", "t-done"]) if ($(id).textContent === "…") $(id).textContent = "–";
  } finally {
    $("t-speak").disabled = !(state.avatar && state.avatar.status === "ready");
  }
}

// ------------------------------------------------------------------ page wiring

function preview(input, img) {
  input.addEventListener("change", () => {
    const file = input.files[0];
    if (img.src) URL.revokeObjectURL(img.src);
    if (!file) {
      img.hidden = true;
      return;
    }
    img.onerror = () => (img.hidden = true);
    img.onload = () => (img.hidden = false);
    img.src = URL.createObjectURL(file);
  });
}

function setupTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab));
    tab.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      select(next);
      next.focus();
    });
  });
  select(tabs[0]);
}

function setupLinks() {
  $("dashboard-link").href = `${location.protocol}//${location.hostname}:8265/`;
}

function main() {
  setupTabs();
  setupLinks();
  setupAuth();
  preview($("v-image"), $("v-preview"));
  preview($("a-image"), $("a-preview"));
  $("video-form").addEventListener("submit", startJob);
  $("v-cancel").addEventListener("click", cancelJob);
  $("jobs-refresh").addEventListener("click", refreshJobs);
  $("avatar-form").addEventListener("submit", createAvatar);
  $("speak-form").addEventListener("submit", speak);
  $("t-audio").addEventListener("change", chooseFile);
  $("t-record").addEventListener("click", startRecording);
  $("t-stop").addEventListener("click", stopRecording);
  connect();
}

document.addEventListener("DOMContentLoaded", main);
