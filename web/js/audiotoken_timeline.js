// AudioToken frame timeline: which frames a recording becomes and which audio each frame hears, as the
// AudioTokenTimeline node computes them (time base in audiotoken_audio.js), and its drawing: the waveform with
// the frames' span shaded, the frame ticks, the windows the frames hear, the onsets (or, in the beat mode, the
// beats) of the last run and a spectrogram. No ComfyUI imports: plain functions.

import {
  audiotokenCentredWindowStart,
  audiotokenClearCanvas,
  audiotokenFormatSeconds,
  audiotokenFrameCentre,
  audiotokenFrameCount,
  audiotokenFrameTime,
  audiotokenHopPosition,
  audiotokenHopWindowCentres,
  audiotokenOnsetSegmentOf,
  audiotokenOnsetSegments,
  audiotokenOnsetWindowStart,
  audiotokenPeaks,
  audiotokenSpanEnd,
} from "./audiotoken_audio.js";

// The node's `windows` options (audiotoken_core/timeline.py WINDOW_MODES).
export const AUDIOTOKEN_WINDOW_MODES = ["centred on each frame", "every hop", "from each onset", "from each beat"];
const [, HOP, ONSET, BEAT] = AUDIOTOKEN_WINDOW_MODES; // the first: centred

export const AUDIOTOKEN_TIMELINE_COLORS = {
  span: "rgba(95, 211, 255, 0.13)",
  spanEdge: "#5fd3ff",
  tick: "#5fd3ff",
  window: "#ffb347",
  onset: "#ff4fd8",
  beat: "#7dff6a",
  focus: "#ffffff",
};
const MIN_TICK_GAP_PX = 4; // closer frame ticks are thinned to every 2nd, 5th, 10th, ... frame
const NICE_STEPS = [1, 2, 5];

// ---------------------------------------------------------------------------------------
// The plan: frames, and the windows each frame hears

/**
 * What the node will compute for these settings: {frameCount, fps, start, end, mode, windowSeconds, windows:
 * [{start, length}], hears(i) -> [{window, weight}] (indices into windows), onsetsKnown}.
 * `onsets` and `beats` (recording seconds, ascending) come from a run; without them the onset (beat) mode knows
 * only its first segment, and onsetsKnown (the mode's boundaries are known) is false. The beat mode is the onset
 * mode with the beats as boundaries. Windows are those the frames hear, in time order: per frame (centred), the
 * hop windows the frames blend (window k starts at k * hop, as the node cuts them), per onset (beat) segment;
 * their distinct starts are the node's `window_starts`.
 */
export function audiotokenTimelinePlan({ duration, fps, start = 0, length = 0, windowSeconds, mode, hop, onsets = null, beats = null }) {
  const frameCount = audiotokenFrameCount(duration, fps, start, length);
  const end = audiotokenSpanEnd(frameCount, fps, start);
  const boundaries = mode === BEAT ? beats : onsets;
  const plan = { frameCount, fps, start, end, mode, windowSeconds, duration, onsetsKnown: boundaries != null };
  if (mode === HOP) {
    const centres = audiotokenHopWindowCentres(duration, windowSeconds, hop);
    const positions = Array.from({ length: frameCount }, (_, i) => audiotokenHopPosition(audiotokenFrameCentre(i, fps, start), centres, hop));
    const needed = [...new Set(positions.flatMap((p) => [p.k, p.next]))].sort((a, b) => a - b);
    const row = new Map(needed.map((k, j) => [k, j]));
    plan.windows = needed.map((k) => ({ start: k * hop, length: windowSeconds }));
    plan.hears = (i) => {
      const { k, next, u } = positions[i];
      return next === k ? [{ window: row.get(k), weight: 1 }] : [{ window: row.get(k), weight: 1 - u }, { window: row.get(next), weight: u }];
    };
  } else if (mode === ONSET || mode === BEAT) {
    // Segments no frame shows (two onsets within one frame: the later one wins) are left out, as the node does.
    const all = audiotokenOnsetSegments(boundaries || [], fps, start, frameCount);
    const segmentOf = Array.from({ length: frameCount }, (_, i) => audiotokenOnsetSegmentOf(i, all));
    const used = [...new Set(segmentOf)];
    const row = new Map(used.map((j, r) => [j, r]));
    plan.segments = used.map((j) => all[j]);
    plan.windows = plan.segments.map((s) => ({ start: audiotokenOnsetWindowStart(s.boundary, windowSeconds, duration), length: windowSeconds }));
    plan.hears = (i) => [{ window: row.get(segmentOf[i]), weight: 1 }];
  } else {
    plan.windows = Array.from({ length: frameCount }, (_, i) => ({
      start: audiotokenCentredWindowStart(audiotokenFrameCentre(i, fps, start), windowSeconds, duration),
      length: windowSeconds,
    }));
    plan.hears = (i) => [{ window: i, weight: 1 }];
  }
  return plan;
}

/** Frame index on screen at recording time t, or null outside the frames' span. */
export function audiotokenFrameAt(plan, t) {
  if (t < plan.start || t >= plan.end) return null;
  return Math.min(plan.frameCount - 1, Math.floor((t - plan.start) * plan.fps));
}

/** Ticks for frames `pxPerFrame` pixels apart: every `step`-th frame, step 1, 2, 5, 10, 20, ... */
export function audiotokenFrameTicks(frameCount, pxPerFrame) {
  let step = 1;
  if (!(pxPerFrame > 0)) step = Math.max(1, frameCount); // no room at all: the first frame only
  for (let scale = 1; pxPerFrame * step < MIN_TICK_GAP_PX && step < frameCount; scale *= 10) {
    step = NICE_STEPS.map((s) => s * scale).find((s) => pxPerFrame * s >= MIN_TICK_GAP_PX) ?? 10 * scale;
  }
  const indices = [];
  for (let i = 0; i < frameCount; i += step) indices.push(i);
  return { step, indices };
}

// ---------------------------------------------------------------------------------------
// Drawing

/** Pixel rectangles (CSS px) of the timeline's lanes for a canvas of size (w, h). */
export function audiotokenTimelinePanels(w, h) {
  const pad = 6;
  const width = Math.max(10, w - 2 * pad);
  const inner = Math.max(80, h - 2 * pad);
  const wave = { x: pad, y: pad, w: width, h: Math.round(inner * 0.3) };
  const frames = { x: pad, y: wave.y + wave.h + 2, w: width, h: 12 };
  const windows = { x: pad, y: frames.y + frames.h + 3, w: width, h: 30 };
  const caption = { x: pad, y: windows.y + windows.h + 2, w: width, h: 14 };
  const specY = caption.y + caption.h + 2;
  const spec = { x: pad, y: specY, w: width, h: Math.max(16, pad + inner - specY) };
  return { wave, frames, windows, caption, spec };
}

function modeText(plan) {
  const win = audiotokenFormatSeconds(plan.windowSeconds);
  if (plan.mode === HOP) return `${plan.windows.length} windows of ${win} (hop), interpolated`;
  if (plan.mode === ONSET) {
    return plan.onsetsKnown ? `${plan.windows.length} windows of ${win}, one per onset segment` : "onset windows: run the graph to detect the onsets";
  }
  if (plan.mode === BEAT) {
    return plan.onsetsKnown ? `${plan.windows.length} windows of ${win}, one per beat` : "beat windows: run the graph to track the beats";
  }
  return `${win} window centred on each frame`;
}

function vline(ctx, x, y, h, color, width = 1) {
  ctx.fillStyle = color;
  ctx.fillRect(Math.round(x), y, width, h);
}

/**
 * Draw the timeline. state = {plan, mono (Float32Array or null), duration, spectrogram (canvas of the whole
 * recording) or null, onsets ([seconds] of the last run) or null, beats ([seconds] of the last run, beat mode
 * only: drawn instead of the onsets, as they are its change boundaries) or null, tempo (BPM of the last run),
 * onsetNote, warning, focusFrame (index or null), playhead (seconds or null), message}. Records what it drew in
 * state.drawn (CSS px) for tests and hit testing.
 */
export function audiotokenDrawTimeline(canvas, state) {
  const dpr = window.devicePixelRatio || 1;
  const { ctx, w, h } = audiotokenClearCanvas(canvas, canvas.width / dpr, canvas.height / dpr);
  const plan = state?.plan;
  if (!plan) {
    ctx.fillStyle = "#9ab";
    ctx.fillText(state?.message || "connect Load Audio to see the frames", 8, 8);
    state && (state.drawn = null);
    return;
  }
  const C = AUDIOTOKEN_TIMELINE_COLORS;
  const P = audiotokenTimelinePanels(w, h);
  const span = Math.max(state.duration, plan.end, 1e-3);
  const xOf = (t) => P.wave.x + (t / span) * P.wave.w;
  const focus = state.focusFrame ?? null;
  const heard = focus == null ? [] : plan.hears(focus);
  const drawn = { panels: P, span, ticks: [], onsets: [], beats: [], tickStep: 1 };

  // Waveform of the recording, the frames' span shaded; the windows the focused frame hears behind it.
  ctx.fillStyle = "#0b1116";
  ctx.fillRect(P.wave.x, P.wave.y, P.wave.w, P.wave.h);
  const spanX0 = xOf(plan.start);
  const spanX1 = xOf(plan.end);
  ctx.fillStyle = C.span;
  ctx.fillRect(spanX0, P.wave.y, Math.max(1, spanX1 - spanX0), P.wave.h);
  for (const { window, weight } of heard) {
    const win = plan.windows[window];
    ctx.fillStyle = `rgba(255, 179, 71, ${(0.12 + 0.3 * weight).toFixed(3)})`;
    ctx.fillRect(xOf(win.start), P.wave.y, Math.max(1, xOf(win.start + win.length) - xOf(win.start)), P.wave.h);
  }
  if (state.mono) {
    const cols = Math.max(1, Math.round((state.duration / span) * P.wave.w));
    if (!state._peaks || state._peaksKey !== cols) {
      state._peaks = audiotokenPeaks(state.mono, cols);
      state._peaksKey = cols;
    }
    const mid = P.wave.y + P.wave.h / 2;
    const amp = P.wave.h / 2 - 1;
    for (let c = 0; c < cols; c++) {
      const x = P.wave.x + c;
      const lo = state._peaks[2 * c];
      const hi = state._peaks[2 * c + 1];
      ctx.fillStyle = x >= spanX0 && x < spanX1 ? "#9cc8e4" : "#4a6a80";
      ctx.fillRect(x, mid - hi * amp, 1, Math.max(1, (hi - lo) * amp));
    }
  } else {
    ctx.fillStyle = "#9ab";
    ctx.fillText(state.message || "no waveform (the audio is not a file)", P.wave.x + 4, P.wave.y + 4);
  }
  vline(ctx, spanX0, P.wave.y, P.wave.h, C.spanEdge);
  vline(ctx, Math.min(spanX1, P.wave.x + P.wave.w - 1), P.wave.y, P.wave.h, C.spanEdge);

  // Frame ticks: one per frame where they fit, else every step-th (longer every 5 steps).
  ctx.fillStyle = "#0b1116";
  ctx.fillRect(P.frames.x, P.frames.y, P.frames.w, P.frames.h);
  const ticks = audiotokenFrameTicks(plan.frameCount, P.wave.w / span / plan.fps);
  drawn.tickStep = ticks.step;
  for (const i of ticks.indices) {
    const x = xOf(audiotokenFrameTime(i, plan.fps, plan.start));
    const major = (i / ticks.step) % 5 === 0;
    const tickH = major ? P.frames.h : Math.ceil(P.frames.h / 2);
    vline(ctx, x, P.frames.y + P.frames.h - tickH, tickH, C.tick);
    drawn.ticks.push(Math.round(x));
  }
  if (focus != null) vline(ctx, xOf(audiotokenFrameTime(focus, plan.fps, plan.start)), P.frames.y, P.frames.h, C.focus, 2);

  // The windows the frames hear, one line each from its start to its end, later frames lower: a sample of
  // them where there are more than the lane has rows; those of the focused frame always, in white.
  ctx.fillStyle = "#0b1116";
  ctx.fillRect(P.windows.x, P.windows.y, P.windows.w, P.windows.h);
  const count = plan.windows.length;
  const rows = Math.max(1, Math.floor(P.windows.h / 2));
  const every = Math.max(1, Math.ceil(count / rows));
  const yOf = (j) => P.windows.y + 1 + (count > 1 ? (j / (count - 1)) * (P.windows.h - 3) : (P.windows.h - 3) / 2);
  const line = (j, color) => {
    const win = plan.windows[j];
    const x0 = xOf(win.start);
    ctx.fillStyle = color;
    ctx.fillRect(x0, Math.round(yOf(j)), Math.max(1, xOf(win.start + win.length) - x0), 1.5);
  };
  for (let j = 0; j < count; j += every) line(j, C.window);
  if (count > 1 && (count - 1) % every) line(count - 1, C.window);
  for (const { window } of heard) line(window, C.focus);
  drawn.windowLines = Math.ceil(count / every);

  // Onsets of the last run, across the waveform (with a marker on top) and the spectrogram; in the beat mode
  // its beats instead (the mode's change boundaries), in their own colour.
  const beatMode = state.beats != null;
  const marks = (beatMode ? state.beats : state.onsets) || [];

  // Caption: the frames and windows, or what the focused frame hears; on the right the onsets or a warning.
  ctx.fillStyle = "#c8d3dc";
  const tickNote = ticks.step > 1 ? ` (a tick every ${ticks.step} frames)` : "";
  const frames = `${plan.frameCount} frames at ${plan.fps} fps, ${audiotokenFormatSeconds(plan.start)} to ${audiotokenFormatSeconds(plan.end)}`;
  ctx.fillText(focus != null ? focusText(plan, focus, heard) : `${frames}${tickNote}; ${modeText(plan)}`, P.caption.x, P.caption.y + 1);
  const tempo = state.tempo > 0 ? ` at ${state.tempo.toFixed(1)} BPM` : "";
  const marksText = beatMode ? `${marks.length} beats${tempo}` : `${marks.length} onsets`;
  const right = state.warning || (focus == null && (beatMode || state.onsets) ? `${marksText} ${state.onsetNote || ""}` : "");
  ctx.textAlign = "right";
  ctx.fillStyle = state.warning ? C.window : "#c8d3dc";
  ctx.fillText(right, P.caption.x + P.caption.w, P.caption.y + 1);
  ctx.textAlign = "left";

  // Spectrogram of the whole recording on the same time axis; outside the frames' span dimmed.
  ctx.fillStyle = "#0b1116";
  ctx.fillRect(P.spec.x, P.spec.y, P.spec.w, P.spec.h);
  if (state.spectrogram) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.spectrogram, P.spec.x, P.spec.y, xOf(state.duration) - P.spec.x, P.spec.h);
    ctx.fillStyle = "rgba(0, 0, 0, 0.5)";
    ctx.fillRect(P.spec.x, P.spec.y, Math.max(0, spanX0 - P.spec.x), P.spec.h);
    ctx.fillRect(spanX1, P.spec.y, Math.max(0, P.spec.x + P.spec.w - spanX1), P.spec.h);
  }
  const markColor = beatMode ? C.beat : C.onset;
  for (const t of marks) {
    const x = xOf(t);
    if (x < P.wave.x || x > P.wave.x + P.wave.w) continue;
    vline(ctx, x, P.wave.y, P.wave.h, markColor);
    vline(ctx, x, P.spec.y, P.spec.h, markColor);
    ctx.fillStyle = markColor;
    ctx.beginPath();
    ctx.moveTo(Math.round(x) - 3.5, P.wave.y);
    ctx.lineTo(Math.round(x) + 4.5, P.wave.y);
    ctx.lineTo(Math.round(x) + 0.5, P.wave.y + 5);
    ctx.fill();
    (beatMode ? drawn.beats : drawn.onsets).push(Math.round(x));
  }
  if (state.playhead != null) {
    vline(ctx, xOf(state.playhead), P.wave.y, P.wave.h, C.focus, 1.5);
    vline(ctx, xOf(state.playhead), P.spec.y, P.spec.h, C.focus, 1.5);
  }
  state.drawn = drawn;
}

function focusText(plan, i, heard) {
  const parts = heard.map(({ window, weight }) => {
    const win = plan.windows[window];
    const range = `${win.start.toFixed(2)}-${(win.start + win.length).toFixed(2)} s`;
    return heard.length > 1 ? `${(100 * weight).toFixed(0)}% ${range}` : range;
  });
  return `frame ${i} (${audiotokenFrameTime(i, plan.fps, plan.start).toFixed(2)} s) hears ${parts.join(" + ")}`;
}
