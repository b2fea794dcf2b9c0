// The moshax serve page: microphone -> WebCodecs Opus -> Ogg -> /api/chat; Moshi's Ogg Opus ->
// WebCodecs -> speakers; text pieces as they stream; a latency read-out. State is mirrored in
// window.moshax for tests (read through the DevTools protocol).
"use strict";

const RATE = 24000;
const state = window.moshax = {
  status: "idle", handshake: false, sentFrames: 0, receivedSamples: 0, text: "", error: null,
  firstAudioMs: null, bufferMs: 0,
};
const $ = (id) => document.getElementById(id);

function show() {
  $("stats").textContent = `${state.status} | sent ${state.sentFrames} packets | received ` +
    `${(state.receivedSamples / RATE).toFixed(2)} s of audio | first reply after ` +
    `${state.firstAudioMs === null ? "-" : state.firstAudioMs.toFixed(0) + " ms"} | playback buffer ` +
    `${state.bufferMs.toFixed(0)} ms`;
  $("text").textContent = state.text;
  $("error").textContent = state.error || "";
}

function fail(msg) { state.error = String(msg); state.status = "error"; show(); }

let session = null;

async function start() {
  $("start").disabled = true;
  try {
    session = await openSession();
    $("stop").disabled = false;
  } catch (e) { fail(e); $("start").disabled = false; }
}

async function openSession() {
  const ctx = new AudioContext({ sampleRate: RATE });
  await ctx.resume();
  const mic = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: false, autoGainControl: false } });
  const token = new URLSearchParams(location.search).get("token");
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/api/chat` + (token ? `?token=${encodeURIComponent(token)}` : ""));
  ws.binaryType = "arraybuffer";
  const s = { ctx, mic, ws, t0: null, playAt: 0, nodes: [] };

  // Moshi -> speakers
  const reader = new OggOpusReader();
  const decoder = new AudioDecoder({
    output: (data) => {
      const pcm = new Float32Array(data.numberOfFrames);
      data.copyTo(pcm, { planeIndex: 0, format: "f32-planar" });
      const rate = data.sampleRate;
      data.close();
      state.receivedSamples += Math.round(pcm.length * RATE / rate);
      if (state.firstAudioMs === null && s.t0 !== null) state.firstAudioMs = performance.now() - s.t0;
      const buf = ctx.createBuffer(1, pcm.length, rate);
      buf.copyToChannel(pcm, 0);
      const src = ctx.createBufferSource();
      src.buffer = buf;
      src.connect(ctx.destination);
      s.playAt = Math.max(s.playAt, ctx.currentTime + 0.02);
      src.start(s.playAt);
      s.playAt += buf.duration;
      state.bufferMs = 1000 * (s.playAt - ctx.currentTime);
      show();
    },
    error: (e) => fail("decoder: " + e.message),
  });
  decoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1 });
  let ts = 0;

  ws.onmessage = (ev) => {
    const msg = new Uint8Array(ev.data);
    const kind = msg[0], body = msg.subarray(1);
    if (kind === 0) { state.handshake = true; state.status = "talking"; startMic(s); }
    else if (kind === 1) {
      for (const p of reader.feed(body)) {
        decoder.decode(new EncodedAudioChunk({ type: "key", timestamp: ts, data: p }));
        ts += 20000;
      }
    } else if (kind === 2) { state.text += new TextDecoder().decode(body); }
    else if (kind === 5) { fail(new TextDecoder().decode(body)); }
    show();
  };
  ws.onclose = (ev) => { if (state.status !== "error") state.status = `closed (${ev.code})`; show(); };
  ws.onerror = () => fail("websocket error");
  return s;
}

function startMic(s) {
  // microphone -> Opus packets (WebCodecs) -> Ogg pages -> 0x01 messages
  const writer = new OggOpusWriter(RATE);
  let headersSent = false;
  const encoder = new AudioEncoder({
    output: (chunk) => {
      const data = new Uint8Array(chunk.byteLength);
      chunk.copyTo(data);
      const parts = [];
      if (!headersSent) { parts.push(writer.headers()); headersSent = true; }
      parts.push(writer.packet(data, Math.round(chunk.duration * 48000 / 1e6)));
      if (s.ws.readyState === WebSocket.OPEN) {
        s.ws.send(concatBytes([new Uint8Array([1]), ...parts]));
        state.sentFrames += 1;
        if (s.t0 === null) s.t0 = performance.now();
      }
    },
    error: (e) => fail("encoder: " + e.message),
  });
  encoder.configure({ codec: "opus", sampleRate: RATE, numberOfChannels: 1, bitrate: 32000 });
  const source = s.ctx.createMediaStreamSource(s.mic);
  const proc = s.ctx.createScriptProcessor(2048, 1, 1);
  let t = 0;
  proc.onaudioprocess = (ev) => {
    const pcm = new Float32Array(ev.inputBuffer.getChannelData(0));
    encoder.encode(new AudioData({ format: "f32-planar", sampleRate: RATE, numberOfFrames: pcm.length,
                                   numberOfChannels: 1, timestamp: t, data: pcm }));
    t += Math.round(pcm.length * 1e6 / RATE);
  };
  source.connect(proc);
  proc.connect(s.ctx.destination);  // keeps the processor running (it outputs silence)
  s.nodes = [source, proc];
  s.encoder = encoder;
}

function stop() {
  if (!session) return;
  for (const n of session.nodes) n.disconnect();
  session.mic.getTracks().forEach((t) => t.stop());
  session.ws.close();
  session = null;
  $("start").disabled = false; $("stop").disabled = true;
  state.status = "stopped"; show();
}

$("start").onclick = start;
$("stop").onclick = stop;
show();
