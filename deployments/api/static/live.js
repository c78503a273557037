// avatar-serve's web page, live mode: a live session over the WebSocket /v1/avatars/{id}/live (see
// README "Live sessions"). The microphone's audio goes out as 48 kHz float32 PCM in 100 ms pieces
// while Talk is on (an AudioWorklet, pcm-worklet.js); the one continuous fragmented MP4 that comes
// back plays through Media Source Extensions, kept near its live edge. Uses app.js's `$`, `state`,
// `once` and `Appender` (both scripts are classic scripts of one page).
"use strict";

const live = { ws: null, source: null, appender: null, pending: [], ctx: null, mic: null, node: null,
               talking: false, url: null };

function liveUrl(avatarId) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  // Browsers cannot set headers on a WebSocket: the key goes in the query (README: keys for browsers
  // are best short-lived).
  const key = state.key ? `?access_token=${encodeURIComponent(state.key)}` : "";
  return `${proto}://${location.host}/v1/avatars/${avatarId}/live${key}`;
}

function liveState(text) {
  $("l-state").textContent = text;
}

function liveButtons(open) {
  $("l-start").disabled = open;
  for (const id of ["l-talk", "l-interrupt", "l-end"]) $(id).disabled = !open;
}

function logLive(ev) {
  if (ev.type === "stats") return;
  const li = document.createElement("li");
  li.textContent = JSON.stringify(ev);
  $("l-events").appendChild(li);
}

async function startLive() {
  $("l-error").textContent = "";
  if (!state.avatar || state.avatar.status !== "ready") {
    $("l-error").textContent = "Create an avatar first and wait until it is ready.";
    return;
  }
  if (!("MediaSource" in window)) {
    $("l-error").textContent = "This browser has no Media Source Extensions: it cannot play a live stream.";
    return;
  }
  const video = $("l-video");
  const metrics = $("l-metrics");
  for (const key of Object.keys(metrics.dataset)) delete metrics.dataset[key];
  $("l-events").textContent = "";
  if (live.url) URL.revokeObjectURL(live.url);
  live.source = new MediaSource();
  live.url = URL.createObjectURL(live.source);
  video.src = live.url;
  video.play().catch(() => {});
  await once(live.source, "sourceopen");
  live.appender = null;
  live.pending = [];
  const ws = new WebSocket(liveUrl(state.avatar.id));
  ws.binaryType = "arraybuffer";
  live.ws = ws;
  liveState("Connecting…");
  ws.addEventListener("open", () => ws.send(JSON.stringify({ type: "start", format: "pcm_f32le", sample_rate: 48000 })));
  ws.addEventListener("message", (m) => {
    if (typeof m.data !== "string") {
      const bytes = new Uint8Array(m.data);
      if (live.appender) live.appender.push(bytes);
      else live.pending.push(bytes);
      return;
    }
    onLiveEvent(JSON.parse(m.data));
  });
  ws.addEventListener("close", (e) => {
    stopTalking(false);
    liveButtons(false);
    metrics.dataset.closeCode = String(e.code);
    liveState(e.code === 1000 ? "Ended" : `Closed (${e.code}): ${e.reason || "connection lost"}`);
    if (live.source && live.source.readyState === "open" && live.appender && !live.appender.buffer.updating) {
      try { live.source.endOfStream(); } catch (err) { /* already ended */ }
    }
  });
}

function onLiveEvent(ev) {
  logLive(ev);
  const metrics = $("l-metrics");
  if (ev.type === "ready") {
    if (!MediaSource.isTypeSupported(ev.mime)) {
      $("l-error").textContent = `This browser cannot play ${ev.mime}.`;
      live.ws.close();
      return;
    }
    live.appender = new Appender(live.source.addSourceBuffer(ev.mime));
    for (const bytes of live.pending) live.appender.push(bytes);
    live.pending = [];
    metrics.dataset.mime = ev.mime;
    liveButtons(true);
    liveState("Idle");
  } else if (ev.type === "speech_started") {
    metrics.dataset.speechStarted = String(ev.frame);
    liveState(`Speaking (from frame ${ev.frame})`);
  } else if (ev.type === "speech_ended") {
    metrics.dataset.speechEnded = String(ev.frame);
    liveState("Idle");
  } else if (ev.type === "interrupted") {
    metrics.dataset.interrupted = String(ev.frame);
    liveState("Idle (interrupted)");
  } else if (ev.type === "stats") {
    if (ev.lag_ms !== null && ev.lag_ms !== undefined) {
      $("l-lag").textContent = `${ev.lag_ms} ms`;
      metrics.dataset.lagMs = String(ev.lag_ms);
    }
    $("l-frames").textContent = `${ev.frames_sent} sent, ${ev.speech_frames} speaking`;
    metrics.dataset.framesSent = String(ev.frames_sent);
    keepNearLiveEdge();
  } else if (ev.type === "error") {
    $("l-error").textContent = ev.message;
  }
}

/** The stream is made at real-time pace; a player that fell behind (a stall, a busy tab) jumps
 *  forward instead of lagging more and more behind what is said. */
function keepNearLiveEdge() {
  const video = $("l-video");
  const buffered = video.buffered;
  if (!buffered.length) return;
  const end = buffered.end(buffered.length - 1);
  if (end - video.currentTime > 1.0) video.currentTime = end - 0.2;
  if (video.paused) video.play().catch(() => {});
}

async function startTalking() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.AudioWorkletNode) {
    $("l-error").textContent = "This browser cannot capture audio here (the microphone needs https, or http on localhost).";
    return;
  }
  try {
    live.mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    live.ctx = new AudioContext({ sampleRate: 48000 });
    await live.ctx.audioWorklet.addModule("/static/pcm-worklet.js");
  } catch (err) {
    $("l-error").textContent = `No microphone: ${err.message}`;
    stopTalking(false);
    return;
  }
  live.node = new AudioWorkletNode(live.ctx, "pcm-capture");
  live.node.port.onmessage = (e) => {
    if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(e.data);
  };
  live.ctx.createMediaStreamSource(live.mic).connect(live.node);
  live.talking = true;
  $("l-talk").textContent = "End utterance";
  $("l-talk").setAttribute("aria-pressed", "true");
}

function stopTalking(endUtterance = true) {
  if (live.mic) live.mic.getTracks().forEach((t) => t.stop());
  if (live.ctx) live.ctx.close().catch(() => {});
  live.mic = live.ctx = live.node = null;
  if (live.talking && endUtterance && live.ws && live.ws.readyState === WebSocket.OPEN) {
    live.ws.send(JSON.stringify({ type: "end_of_utterance" }));
  }
  live.talking = false;
  $("l-talk").textContent = "Talk";
  $("l-talk").setAttribute("aria-pressed", "false");
}

function setupLive() {
  $("l-start").addEventListener("click", startLive);
  $("l-talk").addEventListener("click", () => (live.talking ? stopTalking() : startTalking()));
  $("l-interrupt").addEventListener("click", () => {
    stopTalking(false);
    if (live.ws) live.ws.send(JSON.stringify({ type: "interrupt" }));
  });
  $("l-end").addEventListener("click", () => {
    stopTalking(false);
    if (live.ws) live.ws.send(JSON.stringify({ type: "close" }));
  });
  $("l-sound").addEventListener("change", (e) => ($("l-video").muted = !e.target.checked));
}

document.addEventListener("DOMContentLoaded", setupLive);
