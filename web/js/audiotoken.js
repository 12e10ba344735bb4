// AudioToken frontend extension (ComfyUI). Registers:
//  - audiotoken.nodeColors: one recognisable colour for the pack's nodes;
//  - audiotoken.audioPreview: on the audio nodes, the waveform with the window the token hears
//    (drag it to move start_seconds), the spectrogram of that window and a player; on the
//    Audio Timeline node, the frames' timeline (frame ticks, the windows they hear, the onsets
//    or, in the beat mode, the beats of the last run) over the waveform and the recording's spectrogram, and a player for the frames' span;
//  - audiotoken.lossChart: on Train AudioToken, a live loss chart fed by progress messages.
// Only public extension APIs are used (registerExtension, nodeCreated, addDOMWidget,
// api.addEventListener, onExecuted), which exist in the frontend ComfyUI 0.3.75 pins and in later ones.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import {
  AUDIOTOKEN_TARGET_RATE,
  audiotokenDecode,
  audiotokenDrawPreview,
  audiotokenMaxStart,
  audiotokenMono,
  audiotokenPanels,
  audiotokenParseFileValue,
  audiotokenSpectrogram,
  audiotokenSpectrogramImage,
  audiotokenTimeSpan,
  audiotokenViewPath,
  audiotokenWindowCount,
  audiotokenWindowSamples,
} from "./audiotoken_audio.js";
import { AudiotokenLossChart } from "./audiotoken_loss_chart.js";
import {
  AUDIOTOKEN_WINDOW_MODES,
  audiotokenDrawTimeline,
  audiotokenFrameAt,
  audiotokenTimelinePanels,
  audiotokenTimelinePlan,
} from "./audiotoken_timeline.js";

const AUDIOTOKEN_COLOR = { color: "#2a4d63", bgcolor: "#1c3342" };
const SINGLE_WINDOW_NODES = new Set(["AudioTokenEncode", "AudioTokenEmbedAudio"]);
const MULTI_WINDOW_NODES = new Set(["AudioTokenEmbedWindows"]);
const TIMELINE_NODES = new Set(["AudioTokenTimeline"]);
const TRAIN_NODES = new Set(["AudioTokenTrain"]);
const PROGRESS_EVENT = "audiotoken.train_progress";
const PREVIEW_WIDGET = "audiotoken_preview";
const CHART_WIDGET = "audiotoken_loss_chart";
const PREVIEW_HEIGHT = 230;
const TIMELINE_HEIGHT = 270;
const TIMELINE_UI_KEY = "audiotoken_timeline"; // the node's ui output (nodes/timeline_nodes.py)
const SERVER_DURATION_TOLERANCE = 0.1; // seconds: decoders differ by padding; farther apart is another file
const CHART_HEIGHT = 170;
const MAX_SPECTROGRAM_WINDOWS = 16;

const STYLE = `
.audiotoken-preview { display: flex; flex-direction: column; gap: 4px; width: 100%; height: 100%; box-sizing: border-box; }
.audiotoken-preview-canvas, .audiotoken-chart-canvas { flex: 1 1 auto; width: 100%; min-height: 60px; border-radius: 4px; cursor: default; touch-action: none; }
.audiotoken-preview-canvas.audiotoken-draggable { cursor: ew-resize; }
.audiotoken-player-row { display: flex; gap: 4px; align-items: center; height: 28px; flex: 0 0 28px; }
.audiotoken-player { flex: 1 1 auto; height: 28px; min-width: 0; }
.audiotoken-play-window { flex: 0 0 auto; height: 24px; font-size: 11px; padding: 0 6px; border-radius: 4px; border: 1px solid #3b5566; background: #1c3342; color: #dde; cursor: pointer; }
.audiotoken-chart { display: flex; width: 100%; height: 100%; box-sizing: border-box; }
`;

function ensureStyle() {
  if (document.getElementById("audiotoken-style")) return;
  const style = document.createElement("style");
  style.id = "audiotoken-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function widgetValue(node, name) {
  return node.widgets?.find((w) => w.name === name)?.value;
}

function markDirty(node) {
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

/** Grow a node (e.g. one loaded from a workflow saved without our widget) to fit its widgets. */
function fitNode(node) {
  const min = node.computeSize?.();
  if (!min || !node.size) return;
  if (node.size[0] < min[0] || node.size[1] < min[1]) {
    node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  }
}

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

// ---------------------------------------------------------------------------------------
// Where the audio comes from: follow the `audio` input upstream to a node with a file widget
// (core Load Audio and look-alikes), through legacy Reroute nodes.

function findAudioFile(node) {
  let current = node;
  for (let depth = 0; depth < 8 && current; depth++) {
    const slot = current === node
      ? current.inputs?.findIndex((i) => i.name === "audio")
      : current.inputs?.length ? 0 : -1;
    if (slot == null || slot < 0) return null;
    const source = current.getInputNode?.(slot);
    if (!source) return null;
    const file = source.widgets?.find((w) => w.name === "audio" && typeof w.value === "string" && w.value);
    if (file) return audiotokenParseFileValue(file.value);
    if (source.type !== "Reroute") return null;
    current = source;
  }
  return null;
}

// ---------------------------------------------------------------------------------------
// Audio preview widget

class AudiotokenPreview {
  constructor(node) {
    this.node = node;
    this.multi = MULTI_WINDOW_NODES.has(node.comfyClass);
    this.signature = "";
    this.sourceKey = "";
    this.decoded = null;
    this.state = { message: "connect Load Audio to see the sound" };
    this.serverPreview = null; // {filename, subfolder, type, start_seconds, window_seconds} after a run
    this.build();
  }

  build() {
    ensureStyle();
    const root = document.createElement("div");
    root.className = "audiotoken-preview";
    const canvas = document.createElement("canvas");
    canvas.className = "audiotoken-preview-canvas";
    const row = document.createElement("div");
    row.className = "audiotoken-player-row";
    const play = document.createElement("button");
    play.className = "audiotoken-play-window";
    play.type = "button";
    [play.textContent, play.title] = this.playButtonText();
    const audio = document.createElement("audio");
    audio.className = "audiotoken-player";
    audio.controls = true;
    audio.preload = "metadata";
    row.append(play, audio);
    root.append(canvas, row);
    this.root = root;
    this.canvas = canvas;
    this.audio = audio;

    play.addEventListener("click", () => this.playWindow());
    audio.addEventListener("timeupdate", () => {
      if (this.stopAt != null && audio.currentTime >= this.stopAt) {
        audio.pause();
        this.stopAt = null;
      }
    });
    audio.addEventListener("play", () => this.animatePlayhead());
    canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
    canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
    canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointercancel", (e) => this.onPointerUp(e));
    canvas.addEventListener("pointerleave", (e) => this.onPointerLeave(e));
    if (typeof ResizeObserver !== "undefined") {
      this.resizeObserver = new ResizeObserver(() => this.requestDraw());
      this.resizeObserver.observe(canvas);
    }

    this.widget = this.node.addDOMWidget(PREVIEW_WIDGET, PREVIEW_WIDGET, root, {
      serialize: false,
      hideOnZoom: false,
      getMinHeight: () => this.height(),
      getHeight: () => this.height(),
    });
    this.widget.serialize = false;
    const onRemove = this.widget.onRemove;
    this.widget.onRemove = () => {
      onRemove?.call(this.widget);
      audio.pause();
      audio.removeAttribute("src");
      this.resizeObserver?.disconnect();
      root.remove();
    };
  }

  height() {
    return PREVIEW_HEIGHT;
  }

  playButtonText() {
    return [this.multi ? "\u25B6 first window" : "\u25B6 window", "Play the part of the recording the token hears"];
  }

  params() {
    const n = this.node;
    const windowSeconds = Number(widgetValue(n, "window_seconds")) || 10;
    if (this.multi) {
      return {
        windowSeconds,
        hop: Number(widgetValue(n, "hop_seconds")) || windowSeconds,
        maxWindows: Number(widgetValue(n, "max_windows")) || 64,
        channels: widgetValue(n, "channels") || "mix",
        loop: true,
      };
    }
    return {
      start: Number(widgetValue(n, "start_seconds")) || 0,
      windowSeconds,
      channels: widgetValue(n, "channels") || "mix",
      loop: widgetValue(n, "loop_short_audio") !== false,
    };
  }

  /** The audio to show: the upstream file, else the window the server used in the last run. */
  source() {
    const file = findAudioFile(this.node);
    if (file) return { url: api.apiURL(audiotokenViewPath(file)), server: false, name: file.filename };
    if (this.serverPreview) {
      return { url: api.apiURL(audiotokenViewPath(this.serverPreview)), server: true, name: "last run" };
    }
    return null;
  }

  /** Cheap; called on every canvas frame. Recomputes only when something changed. */
  refresh() {
    const source = this.source();
    const params = this.params();
    const signature = JSON.stringify([source?.url ?? null, params]);
    if (signature === this.signature) return;
    this.signature = signature;
    const sourceKey = source?.url ?? "";
    if (sourceKey !== this.sourceKey) {
      this.sourceKey = sourceKey;
      this.decoded = null;
      this.audio.pause();
      if (!source) {
        this.audio.removeAttribute("src");
        this.showWithoutSource();
        return;
      }
      this.audio.src = source.url;
      this.state = { message: `decoding ${source.name} ...` };
      this.requestDraw();
      audiotokenDecode(source.url).then(
        (decoded) => {
          if (this.sourceKey !== sourceKey) return;
          this.decoded = { ...decoded, server: source.server };
          this.update();
        },
        (error) => {
          if (this.sourceKey !== sourceKey) return;
          this.state = { message: `cannot preview ${source.name}: ${error.message || error}` };
          this.requestDraw();
        },
      );
      return;
    }
    this.update();
  }

  showWithoutSource() {
    this.state = { message: "connect Load Audio (or run the graph) to see the sound" };
    this.requestDraw();
  }

  windows(params, duration) {
    if (this.decoded?.server) {
      // The server's preview file is exactly the window the model heard (16 kHz mono).
      return [{ start: 0, length: duration }];
    }
    if (!this.multi) return [{ start: params.start, length: params.windowSeconds }];
    const count = audiotokenWindowCount(duration, params.windowSeconds, params.hop);
    const shown = Math.min(count, params.maxWindows);
    this.tooMany = count > params.maxWindows ? count : 0;
    return Array.from({ length: shown }, (_, i) => ({ start: i * params.hop, length: params.windowSeconds }));
  }

  /** Recompute windows and spectrogram for the current parameters, then draw. */
  update() {
    const d = this.decoded;
    if (!d) return;
    const params = this.params();
    const mono = audiotokenMono(d, params.channels);
    const windows = this.windows(params, d.duration);
    const parts = windows.slice(0, MAX_SPECTROGRAM_WINDOWS)
      .map((w) => audiotokenWindowSamples(mono, d.sampleRate, w.start, w.length, params.loop));
    const total = parts.reduce((n, p) => n + p.length, 0);
    const joined = new Float32Array(total);
    let offset = 0;
    for (const p of parts) {
      joined.set(p, offset);
      offset += p.length;
    }
    const maxFreq = Math.min(AUDIOTOKEN_TARGET_RATE / 2, d.sampleRate / 2);
    const spec = audiotokenSpectrogram(joined, d.sampleRate, { maxFreq });
    const caption = d.server ? "(window of the last run)" : this.tooMany ? `${this.tooMany} windows > max_windows` : "";
    const heard = this.serverPreview;
    const label = d.server && heard
      ? `last run heard ${heard.start.toFixed(1)} s + ${heard.window.toFixed(1)} s (16 kHz mono)`
      : null;
    this.state = {
      mono,
      rate: d.sampleRate,
      duration: d.duration,
      // While a drag is on, the time axis keeps the scale it had when the window was grabbed, so
      // the grabbed point stays under the pointer; it fits the window again when the drag ends.
      span: this.dragSpan ?? audiotokenTimeSpan(d.duration, windows),
      windows,
      loop: params.loop,
      draggable: !this.multi && !d.server,
      spectrogram: audiotokenSpectrogramImage(spec),
      maxFreq,
      caption,
      label,
      playhead: null,
    };
    this.canvas.classList.toggle("audiotoken-draggable", this.state.draggable);
    this.requestDraw();
  }

  requestDraw() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = null;
      if (this.state.mono && !this.audio.paused) this.state.playhead = this.audio.currentTime;
      this.draw();
    });
  }

  draw() {
    audiotokenDrawPreview(this.canvas, this.state);
  }

  animatePlayhead() {
    const tick = () => {
      if (this.audio.paused) {
        this.state.playhead = null;
        this.requestDraw();
        return;
      }
      this.requestDraw();
      requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
  }

  playWindow() {
    if (!this.audio.src) return;
    const first = this.state.windows?.[0];
    const start = first ? first.start : 0;
    const duration = this.decoded?.duration ?? Infinity;
    const startAt = this.decoded?.server ? 0 : start % Math.max(duration, 1e-6);
    this.audio.currentTime = startAt;
    this.stopAt = first ? Math.min(duration, startAt + first.length) : null;
    this.audio.play().catch(() => {});
  }

  // --- dragging the window start -------------------------------------------------------
  timeAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const scaleX = rect.width / (this.canvas.clientWidth || rect.width);
    const x = (event.clientX - rect.left) / scaleX;
    const y = (event.clientY - rect.top) / scaleX;
    const { wave } = audiotokenPanels(this.canvas.clientWidth, this.canvas.clientHeight);
    return { t: ((x - wave.x) / wave.w) * this.state.span, inWave: y >= wave.y - 4 && y <= wave.y + wave.h + 4 };
  }

  onPointerDown(event) {
    if (!this.state.draggable || event.button !== 0) return;
    const { t, inWave } = this.timeAt(event);
    if (!inWave) return;
    const start = this.state.windows[0].start;
    const length = this.state.windows[0].length;
    // grab inside the window keeps the offset; a click elsewhere puts the window's start there
    this.dragOffset = t >= start && t <= start + length ? t - start : 0;
    this.dragging = true;
    this.dragSpan = this.state.span;
    this.canvas.setPointerCapture?.(event.pointerId);
    event.preventDefault();
    event.stopPropagation();
    this.setStart(t - this.dragOffset);
  }

  onPointerMove(event) {
    if (!this.dragging) return;
    event.preventDefault();
    event.stopPropagation();
    this.setStart(this.timeAt(event).t - this.dragOffset);
  }

  onPointerLeave() {}

  onPointerUp(event) {
    if (!this.dragging) return;
    this.dragging = false;
    this.dragSpan = undefined;
    this.canvas.releasePointerCapture?.(event.pointerId);
    event.stopPropagation();
    this.update();
  }

  setStart(seconds) {
    const widget = this.node.widgets?.find((w) => w.name === "start_seconds");
    if (!widget || !this.decoded) return;
    const params = this.params();
    const limit = Math.max(0, audiotokenMaxStart(this.decoded.duration, params.loop) - 0.1);
    const step = 0.1;
    const value = Math.round(Math.min(limit, Math.max(0, seconds)) / step) * step;
    const rounded = Number(value.toFixed(1));
    if (rounded === widget.value) return;
    widget.value = rounded;
    widget.callback?.(rounded, app.canvas, this.node);
    this.refresh();
    markDirty(this.node);
  }
}

// ---------------------------------------------------------------------------------------
// Timeline widget (AudioTokenTimeline): the frames the recording becomes and what each hears.
// Before a run it draws what the widgets imply; a run adds the onsets / beats the server found (and its
// duration, which counts where the browser's decoder pads differently).

class AudiotokenTimelinePreview extends AudiotokenPreview {
  height() {
    return TIMELINE_HEIGHT;
  }

  playButtonText() {
    return ["\u25B6 frames' span", "Play the part of the recording the frames show (the video's sound)"];
  }

  params() {
    const n = this.node;
    const number = (name, fallback) => {
      const value = Number(widgetValue(n, name));
      return Number.isFinite(value) ? value : fallback;
    };
    return {
      fps: number("fps", 12),
      windowSeconds: number("window_seconds", 4),
      mode: widgetValue(n, "windows") || AUDIOTOKEN_WINDOW_MODES[0],
      hop: number("hop_seconds", 1),
      start: number("start_seconds", 0),
      length: number("length_seconds", 0),
      channels: widgetValue(n, "channels") || "mix",
      maxFrames: number("max_frames", 2400),
    };
  }

  /** The last run's ui payload {fps, start_seconds, frame_count, window_seconds, windows, duration_seconds, ...}. */
  setLastRun(payload) {
    this.lastRun = payload;
    this.signature = ""; // redraw even if no widget changed
    this.refresh();
  }

  showWithoutSource() {
    this.decoded = null;
    if (this.lastRun) this.update();
    else super.showWithoutSource();
  }

  /** The recording's duration: the server's (what the node used) when it ran on this recording. */
  duration() {
    const decoded = this.decoded?.duration;
    const server = Number(this.lastRun?.duration_seconds);
    if (decoded == null) return Number.isFinite(server) ? server : null;
    return Math.abs(server - decoded) <= SERVER_DURATION_TOLERANCE ? server : decoded;
  }

  update() {
    const duration = this.duration();
    if (duration == null) return;
    const p = this.params();
    if (!(p.fps > 0) || !(p.windowSeconds > 0) || !(p.hop > 0) || p.start >= duration) {
      this.state = { message: `nothing to show: fps, window and hop must be > 0 and start before the end (${duration.toFixed(1)} s)` };
      this.requestDraw();
      return;
    }
    const run = this.lastRun;
    const plan = audiotokenTimelinePlan({
      duration, fps: p.fps, start: p.start, length: p.length, windowSeconds: p.windowSeconds, mode: p.mode, hop: p.hop,
      onsets: run ? run.onsets || [] : null,
      beats: run ? run.beats || [] : null,
    });
    const current = run && Number(run.fps) === p.fps && Number(run.start_seconds) === p.start && run.windows === p.mode
      && Number(run.window_seconds) === p.windowSeconds && Number(run.frame_count) === plan.frameCount;
    const d = this.decoded;
    const mono = d ? audiotokenMono(d, p.channels) : null;
    const specKey = d ? `${this.sourceKey}:${p.channels}` : "";
    if (this.specKey !== specKey) {
      this.specKey = specKey;
      const maxFreq = Math.min(AUDIOTOKEN_TARGET_RATE / 2, d ? d.sampleRate / 2 : 0);
      this.spectrogram = mono ? audiotokenSpectrogramImage(audiotokenSpectrogram(mono, d.sampleRate, { maxFreq, maxFrames: 480 })) : null;
    }
    this.state = {
      plan,
      mono,
      duration,
      spectrogram: this.spectrogram,
      onsets: run ? run.onsets || [] : null,
      beats: run && p.mode === AUDIOTOKEN_WINDOW_MODES[3] ? run.beats || [] : null, // beat mode: drawn instead of the onsets
      tempo: run ? Number(run.tempo_bpm) || 0 : 0,
      onsetNote: current ? "(last run)" : "(last run, other settings)",
      warning: plan.frameCount > p.maxFrames ? `${plan.frameCount} frames > max_frames (${p.maxFrames}): the node refuses` : "",
      message: d ? "" : "no waveform: the audio is not a file (timeline of the last run)",
      focusFrame: null,
      playhead: null,
    };
    this.requestDraw();
  }

  /** While the span plays, the frame on screen at the playhead is the focused one; it is let go at the end. */
  draw() {
    const state = this.state;
    if (state.plan && state.playhead != null) {
      state.focusFrame = audiotokenFrameAt(state.plan, state.playhead);
      state.focusFromPlayback = true;
    } else if (state.focusFromPlayback) {
      state.focusFrame = null;
      state.focusFromPlayback = false;
    }
    audiotokenDrawTimeline(this.canvas, state);
  }

  playWindow() {
    const plan = this.state.plan;
    if (!this.audio.src || !plan) return;
    this.audio.currentTime = plan.start;
    this.stopAt = Math.min(this.decoded?.duration ?? Infinity, plan.end);
    this.audio.play().catch(() => {});
  }

  timeAt(event) {
    const rect = this.canvas.getBoundingClientRect();
    const scale = rect.width / (this.canvas.clientWidth || rect.width);
    const x = (event.clientX - rect.left) / scale;
    const { wave } = audiotokenTimelinePanels(this.canvas.clientWidth, this.canvas.clientHeight);
    return ((x - wave.x) / wave.w) * (this.state.drawn?.span ?? 1);
  }

  onPointerDown() {} // nothing to drag: start and length are widgets

  /** Hovering the canvas shows the frame on screen at that time and the windows it hears. */
  onPointerMove(event) {
    if (!this.state.plan || !this.audio.paused) return;
    const frame = audiotokenFrameAt(this.state.plan, this.timeAt(event));
    if (frame === this.state.focusFrame) return;
    this.state.focusFrame = frame;
    this.requestDraw();
  }

  onPointerLeave() {
    if (this.state.focusFrame == null) return;
    this.state.focusFrame = null;
    this.requestDraw();
  }
}

// ---------------------------------------------------------------------------------------
// Loss chart widget

const charts = new Set();

function attachLossChart(node) {
  ensureStyle();
  const root = document.createElement("div");
  root.className = "audiotoken-chart";
  const canvas = document.createElement("canvas");
  canvas.className = "audiotoken-chart-canvas";
  root.appendChild(canvas);
  const chart = new AudiotokenLossChart(canvas);
  chart.node = node;
  const widget = node.addDOMWidget(CHART_WIDGET, CHART_WIDGET, root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => CHART_HEIGHT,
    getHeight: () => CHART_HEIGHT,
  });
  widget.serialize = false;
  const observer = typeof ResizeObserver !== "undefined" ? new ResizeObserver(() => chart.requestDraw()) : null;
  observer?.observe(canvas);
  const onRemove = widget.onRemove;
  widget.onRemove = () => {
    onRemove?.call(widget);
    observer?.disconnect();
    charts.delete(chart);
    root.remove();
  };
  charts.add(chart);
  node.audiotokenLossChart = chart;
  fitNode(node);
}

function onTrainProgress(event) {
  const detail = event.detail;
  if (!detail || detail.node == null) return;
  const id = String(detail.node);
  for (const chart of charts) {
    const own = String(chart.node.id);
    // top-level nodes send their id; nodes inside a subgraph send "outer:inner" execution ids
    if (id === own || id.endsWith(`:${own}`)) chart.add(detail);
  }
}

// ---------------------------------------------------------------------------------------
// Registration

app.registerExtension({
  name: "audiotoken.nodeColors",
  nodeCreated(node) {
    if (node.comfyClass && node.comfyClass.startsWith("AudioToken")) {
      node.color = AUDIOTOKEN_COLOR.color;
      node.bgcolor = AUDIOTOKEN_COLOR.bgcolor;
    }
  },
});

app.registerExtension({
  name: "audiotoken.audioPreview",
  nodeCreated(node) {
    const timeline = TIMELINE_NODES.has(node.comfyClass);
    if (!timeline && !SINGLE_WINDOW_NODES.has(node.comfyClass) && !MULTI_WINDOW_NODES.has(node.comfyClass)) return;
    const preview = timeline ? new AudiotokenTimelinePreview(node) : new AudiotokenPreview(node);
    node.audiotokenPreview = preview;
    fitNode(node);
    // Links and widget values (ours and the upstream Load Audio's) change in many ways; checking a
    // small signature whenever the node is drawn catches them all, and costs a string compare.
    chain(node, "onDrawForeground", () => preview.refresh());
    chain(node, "onConnectionsChange", () => setTimeout(() => preview.refresh(), 0));
    chain(node, "onConfigure", () => {
      fitNode(node);
      setTimeout(() => preview.refresh(), 0);
    });
    chain(node, "onExecuted", (output) => {
      const run = output?.[TIMELINE_UI_KEY]?.[0];
      if (timeline && run) preview.setLastRun(run);
      const saved = output?.audiotoken_window?.[0];
      if (saved && saved.filename) {
        preview.serverPreview = {
          filename: saved.filename,
          subfolder: saved.subfolder || "",
          type: saved.type || "temp",
          start: Number(saved.start_seconds) || 0,
          window: Number(saved.window_seconds) || 0,
        };
        preview.refresh();
      }
    });
    for (const w of node.widgets || []) {
      if (w.name !== PREVIEW_WIDGET) chain(w, "callback", () => preview.refresh());
    }
    setTimeout(() => preview.refresh(), 0);
  },
});

app.registerExtension({
  name: "audiotoken.lossChart",
  setup() {
    api.addEventListener(PROGRESS_EVENT, onTrainProgress);
  },
  nodeCreated(node) {
    if (TRAIN_NODES.has(node.comfyClass)) attachLossChart(node);
  },
});
