// AudioToken audio preview: decoding, the window the model hears, a small FFT spectrogram and
// the drawing of waveform + spectrogram on a canvas. No ComfyUI imports: plain functions.

export const AUDIOTOKEN_TARGET_RATE = 16000; // the rate BEATs hears; the spectrogram stops at its Nyquist
export const AUDIOTOKEN_REFERENCE_SECONDS = 10; // a looped clip counts as at least this long (audio.py)
const MAX_FETCH_BYTES = 64 * 1024 * 1024;
const DECODE_CACHE_SIZE = 6;

// ---------------------------------------------------------------------------------------
// Files: ComfyUI's annotated names ("sub/dir/a.wav [input]") -> a same-origin /view URL.

export function audiotokenParseFileValue(value) {
  if (typeof value !== "string" || !value.trim()) return null;
  let name = value.trim();
  let type = "input";
  const m = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (m) {
    name = m[1];
    type = m[2];
  }
  const slash = name.lastIndexOf("/");
  const subfolder = slash >= 0 ? name.slice(0, slash) : "";
  const filename = slash >= 0 ? name.slice(slash + 1) : name;
  if (!filename) return null;
  return { filename, subfolder, type };
}

export function audiotokenViewPath({ filename, subfolder = "", type = "input" }) {
  const params = new URLSearchParams({ filename, type, subfolder });
  return `/view?${params.toString()}`;
}

// ---------------------------------------------------------------------------------------
// Decoding (WebAudio), cached by URL; only the channels are kept (Float32Array each).

const decodeCache = new Map(); // url -> Promise<{sampleRate, channels: Float32Array[], duration}>

export function audiotokenDecode(url) {
  if (decodeCache.has(url)) {
    const hit = decodeCache.get(url);
    decodeCache.delete(url); // refresh LRU order
    decodeCache.set(url, hit);
    return hit;
  }
  const promise = (async () => {
    const response = await fetch(url, { credentials: "same-origin" });
    if (!response.ok) throw new Error(`could not load the audio (${response.status})`);
    const size = Number(response.headers.get("Content-Length") || 0);
    if (size > MAX_FETCH_BYTES) throw new Error(`file too large to preview (${(size / 1048576).toFixed(0)} MB)`);
    const bytes = await response.arrayBuffer();
    const Ctx = window.OfflineAudioContext || window.webkitOfflineAudioContext;
    if (!Ctx) throw new Error("this browser has no WebAudio");
    // The context's rate is only a default: decodeAudioData resamples to it, so use a common one.
    const ctx = new Ctx(1, 1, 44100);
    const buffer = await ctx.decodeAudioData(bytes);
    const channels = [];
    for (let c = 0; c < buffer.numberOfChannels; c++) channels.push(buffer.getChannelData(c));
    return { sampleRate: buffer.sampleRate, channels, duration: buffer.duration };
  })();
  promise.catch(() => decodeCache.delete(url)); // a failed load may succeed later (file uploaded)
  decodeCache.set(url, promise);
  while (decodeCache.size > DECODE_CACHE_SIZE) decodeCache.delete(decodeCache.keys().next().value);
  return promise;
}

/** Mono signal by the node's channel policy ("mix" averages, "first" keeps channel 0). */
export function audiotokenMono(decoded, policy) {
  const key = policy === "first" ? "_monoFirst" : "_monoMix";
  if (decoded[key]) return decoded[key];
  const chans = decoded.channels;
  let mono;
  if (policy === "first" || chans.length === 1) {
    mono = chans[0];
  } else {
    mono = new Float32Array(chans[0].length);
    for (const ch of chans) for (let i = 0; i < mono.length; i++) mono[i] += ch[i];
    for (let i = 0; i < mono.length; i++) mono[i] /= chans.length;
  }
  decoded[key] = mono;
  return mono;
}

/** Largest start the node accepts (mirrors audiotoken_core.audio.prepare_waveform). */
export function audiotokenMaxStart(duration, loop) {
  return loop ? Math.max(duration, AUDIOTOKEN_REFERENCE_SECONDS) : duration;
}

/**
 * How many windows of `windowSeconds` every `hop` seconds (starting at 0) fit in `duration` seconds;
 * at least one (a shorter recording gives one looped window). The node's count
 * (audiotoken_core/audio.py window_count): the same formula in the same doubles, both held to
 * tests/data/window_table.json. The 1e-9 (in hops) counts a window ending exactly at the end.
 */
export function audiotokenWindowCount(duration, windowSeconds, hop) {
  if (duration <= windowSeconds) return 1;
  return 1 + Math.floor((duration - windowSeconds) / hop + 1e-9);
}

// ---------------------------------------------------------------------------------------
// Time base of the frame timeline (AudioTokenTimeline): audiotoken_core/timeline.py has the same
// formulas in the same doubles, and tests/data/timeline_table.json holds both to them.

const FRAME_EPSILON = 1e-9; // in frames: a span that is a whole number of frames up to rounding keeps its last frame

/** Frames at `fps` from `start` over `length` seconds (0 = to the end of the recording); at least one. */
export function audiotokenFrameCount(duration, fps, start = 0, length = 0) {
  const span = length <= 0 ? duration - start : length;
  return Math.max(1, Math.floor(span * fps + FRAME_EPSILON));
}

/** Where the last of `frameCount` frames ends: the frames (and the video's sound) cover [start, this). */
export function audiotokenSpanEnd(frameCount, fps, start = 0) {
  return start + frameCount / fps;
}

/** When frame `index` appears, in recording seconds. */
export function audiotokenFrameTime(index, fps, start = 0) {
  return start + index / fps;
}

/** The middle of frame `index`'s display interval, in recording seconds. */
export function audiotokenFrameCentre(index, fps, start = 0) {
  return start + (index + 0.5) / fps;
}

/** Start of the `windowSeconds` window centred on `centre`, clamped into the recording. */
export function audiotokenCentredWindowStart(centre, windowSeconds, duration) {
  return Math.min(Math.max(centre - windowSeconds / 2, 0), Math.max(duration - windowSeconds, 0));
}

/**
 * Centres of the hop windows (window k starts at k * hop, as AudioTokenEmbedWindows cuts them): c_k = k * hop +
 * window / 2; one looped window (centre window / 2) for a recording no longer than the window.
 */
export function audiotokenHopWindowCentres(duration, windowSeconds, hop) {
  const count = audiotokenWindowCount(duration, windowSeconds, hop);
  return Array.from({ length: count }, (_, k) => k * hop + windowSeconds / 2);
}

/**
 * The hop windows a frame centred at `t` hears: {k, next, u}; its vector is interp(v_k, v_next, u). Between two
 * centres c_k <= t < c_k+1: next = k + 1, u = (t - c_k) / hop; at or before the first centre v_0, at or after the
 * last v_last (next = k, u = 0). The node embeds both windows of a pair, also where u is 0.
 */
export function audiotokenHopPosition(t, centres, hop) {
  const last = centres.length - 1;
  if (t <= centres[0]) return { k: 0, next: 0, u: 0 };
  if (t >= centres[last]) return { k: last, next: last, u: 0 };
  let k = Math.min(Math.max(Math.floor((t - centres[0]) / hop), 0), last - 1);
  while (k + 1 < last && centres[k + 1] <= t) k += 1; // the division may land one off: the centres decide
  while (k > 0 && centres[k] > t) k -= 1;
  return { k, next: k + 1, u: Math.min(Math.max((t - centres[k]) / hop, 0), 1) };
}

/** The first frame shown once onset `onset` sounds: the frame on screen at that moment. */
export function audiotokenOnsetFrame(onset, fps, start = 0) {
  return Math.floor((onset - start) * fps + FRAME_EPSILON);
}

/**
 * Onset segments of a timeline of `frameCount` frames: boundary 0 is the span start, then every onset from the
 * start on whose first frame is one of the timeline's. Returns [{boundary, firstFrame}], ascending.
 */
export function audiotokenOnsetSegments(onsets, fps, start, frameCount) {
  const segments = [{ boundary: start, firstFrame: 0 }];
  for (const onset of onsets) {
    const firstFrame = audiotokenOnsetFrame(onset, fps, start);
    if (onset >= start && firstFrame < frameCount) segments.push({ boundary: onset, firstFrame });
  }
  return segments;
}

/** Index into `segments` of frame `index`: the last segment whose first frame is at or before it. */
export function audiotokenOnsetSegmentOf(index, segments) {
  let lo = 0; // segments[0].firstFrame is 0; first frames ascend with the onsets
  let hi = segments.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (segments[mid].firstFrame <= index) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

/** Start of an onset segment's window: the sound that begins at its boundary, clamped into the recording. */
export function audiotokenOnsetWindowStart(boundary, windowSeconds, duration) {
  return Math.min(Math.max(boundary, 0), Math.max(duration - windowSeconds, 0));
}

/** Seconds the time axis shows: the recording, or more where a window runs past its end. */
export function audiotokenTimeSpan(duration, windows) {
  const lastEnd = windows.reduce((m, win) => Math.max(m, win.start + win.length), 0);
  return Math.max(duration, lastEnd, 1e-3);
}

/**
 * The samples the model hears: [start, start + window) of the clip tiled without end
 * (loop) or zero-padded (no loop), at the decoded rate.
 */
export function audiotokenWindowSamples(mono, rate, start, windowSeconds, loop) {
  const n = Math.max(1, Math.round(windowSeconds * rate));
  const first = Math.round(start * rate);
  const out = new Float32Array(n);
  const len = mono.length;
  if (!len) return out;
  for (let i = 0; i < n; i++) {
    const j = first + i;
    out[i] = j < len ? mono[j] : loop ? mono[j % len] : 0;
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Spectrogram: radix-2 FFT, Hann window, log magnitude in dB.

function fftInPlace(re, im) {
  const n = re.length;
  for (let i = 1, j = 0; i < n; i++) {
    let bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) {
      [re[i], re[j]] = [re[j], re[i]];
      [im[i], im[j]] = [im[j], im[i]];
    }
  }
  for (let size = 2; size <= n; size <<= 1) {
    const half = size >> 1;
    const step = (-2 * Math.PI) / size;
    for (let start = 0; start < n; start += size) {
      for (let k = 0; k < half; k++) {
        const wr = Math.cos(step * k);
        const wi = Math.sin(step * k);
        const a = start + k;
        const b = a + half;
        const tr = re[b] * wr - im[b] * wi;
        const ti = re[b] * wi + im[b] * wr;
        re[b] = re[a] - tr;
        im[b] = im[a] - ti;
        re[a] += tr;
        im[a] += ti;
      }
    }
  }
}

/** {frames, bins, db: Float32Array[frames * bins]} up to maxFreq, at most maxFrames frames. */
export function audiotokenSpectrogram(samples, rate, { fftSize = 1024, maxFrames = 320, maxFreq = AUDIOTOKEN_TARGET_RATE / 2 } = {}) {
  const frames = Math.max(1, Math.min(maxFrames, Math.floor(samples.length / (fftSize / 4))));
  const hop = Math.max(1, (samples.length - fftSize) / Math.max(1, frames - 1));
  const bins = Math.max(1, Math.min(fftSize / 2, Math.floor((maxFreq / (rate / 2)) * (fftSize / 2))));
  const hann = new Float32Array(fftSize);
  for (let i = 0; i < fftSize; i++) hann[i] = 0.5 - 0.5 * Math.cos((2 * Math.PI * i) / fftSize);
  const re = new Float32Array(fftSize);
  const im = new Float32Array(fftSize);
  const db = new Float32Array(frames * bins);
  for (let f = 0; f < frames; f++) {
    const offset = Math.round(f * hop);
    for (let i = 0; i < fftSize; i++) {
      const j = offset + i;
      re[i] = (j < samples.length ? samples[j] : 0) * hann[i];
      im[i] = 0;
    }
    fftInPlace(re, im);
    for (let b = 0; b < bins; b++) {
      const power = re[b] * re[b] + im[b] * im[b];
      db[f * bins + b] = 10 * Math.log10(power + 1e-12);
    }
  }
  return { frames, bins, db };
}

// A small "magma"-like colour map (dark purple -> orange -> pale yellow).
const COLOR_STOPS = [
  [0.0, [0, 0, 4]], [0.25, [59, 15, 112]], [0.5, [140, 41, 129]],
  [0.75, [222, 73, 104]], [0.9, [254, 159, 109]], [1.0, [252, 253, 191]],
];

function colorAt(t) {
  for (let i = 1; i < COLOR_STOPS.length; i++) {
    const [t1, c1] = COLOR_STOPS[i];
    if (t <= t1) {
      const [t0, c0] = COLOR_STOPS[i - 1];
      const a = (t - t0) / (t1 - t0);
      return c0.map((v, k) => Math.round(v + a * (c1[k] - v)));
    }
  }
  return COLOR_STOPS[COLOR_STOPS.length - 1][1];
}
const COLOR_LUT = Array.from({ length: 256 }, (_, i) => colorAt(i / 255));

/** The spectrogram as an offscreen canvas (frames x bins pixels, low frequencies at the bottom). */
export function audiotokenSpectrogramImage(spec, rangeDb = 70) {
  const { frames, bins, db } = spec;
  let top = -Infinity;
  for (let i = 0; i < db.length; i++) if (db[i] > top) top = db[i];
  const canvas = document.createElement("canvas");
  canvas.width = frames;
  canvas.height = bins;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(frames, bins);
  for (let f = 0; f < frames; f++) {
    for (let b = 0; b < bins; b++) {
      const t = Math.sqrt(Math.max(0, Math.min(1, (db[f * bins + b] - (top - rangeDb)) / rangeDb)));
      const c = COLOR_LUT[Math.round(t * 255)];
      const p = ((bins - 1 - b) * frames + f) * 4;
      image.data[p] = c[0];
      image.data[p + 1] = c[1];
      image.data[p + 2] = c[2];
      image.data[p + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  return canvas;
}

// ---------------------------------------------------------------------------------------
// Drawing

export const AUDIOTOKEN_LAYOUT = { pad: 6, waveHeight: 0.38, gap: 16 };

/** Pixel rectangles of the two panels for a canvas of css size (w, h). */
export function audiotokenPanels(w, h) {
  const { pad, waveHeight, gap } = AUDIOTOKEN_LAYOUT;
  const innerH = Math.max(20, h - 2 * pad - gap);
  const waveH = Math.round(innerH * waveHeight);
  return {
    wave: { x: pad, y: pad, w: Math.max(10, w - 2 * pad), h: waveH },
    spec: { x: pad, y: pad + waveH + gap, w: Math.max(10, w - 2 * pad), h: innerH - waveH },
  };
}

/** Min/max of `mono` in `columns` equal parts (an envelope cheap enough for hour-long files). */
export function audiotokenPeaks(mono, columns) {
  const out = new Float32Array(columns * 2);
  const per = mono.length / columns;
  for (let c = 0; c < columns; c++) {
    let lo = 0;
    let hi = 0;
    const a = Math.floor(c * per);
    const b = Math.min(mono.length, Math.max(a + 1, Math.floor((c + 1) * per)));
    const stride = Math.max(1, Math.floor((b - a) / 512)); // enough for an envelope, cheap on hour-long files
    for (let i = a; i < b; i += stride) {
      const v = mono[i];
      if (v < lo) lo = v;
      if (v > hi) hi = v;
    }
    out[2 * c] = lo;
    out[2 * c + 1] = hi;
  }
  return out;
}

/** Seconds as "4.2 s", or "m:ss.s" from a minute on. */
export function audiotokenFormatSeconds(seconds) {
  return seconds >= 60 ? `${Math.floor(seconds / 60)}:${(seconds % 60).toFixed(1).padStart(4, "0")}` : `${seconds.toFixed(1)} s`;
}

/**
 * Size a canvas to its CSS box at the device pixel ratio and clear it to the pack's background.
 * Returns { ctx, w, h } in CSS pixels; the fallbacks apply while the canvas has no layout yet.
 */
export function audiotokenClearCanvas(canvas, fallbackWidth, fallbackHeight) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || fallbackWidth;
  const h = canvas.clientHeight || fallbackHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.fillStyle = "#11181d";
  ctx.fillRect(0, 0, w, h);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  return { ctx, w, h };
}

/**
 * Draw the preview. state = {mono, rate, duration, span (seconds on the time axis), windows: [{start, length}],
 * loop, message, playhead (seconds or null), spectrogram image (canvas) or null, caption, label (replaces the
 * window text)}.
 */
export function audiotokenDrawPreview(canvas, state) {
  const dpr = window.devicePixelRatio || 1;
  const { ctx, w, h } = audiotokenClearCanvas(canvas, canvas.width / dpr, canvas.height / dpr);
  if (!state || !state.mono) {
    ctx.fillStyle = "#9ab";
    ctx.fillText(state?.message || "connect Load Audio to see the sound", 8, 8);
    return;
  }
  const { wave, spec } = audiotokenPanels(w, h);
  const windows = state.windows || [];
  const span = state.span;
  const xOf = (t) => wave.x + (t / span) * wave.w;

  // Waveform of the whole recording (and its repetitions where a window loops past the end).
  ctx.fillStyle = "#0b1116";
  ctx.fillRect(wave.x, wave.y, wave.w, wave.h);
  const cols = Math.max(1, Math.floor(wave.w));
  const key = `${cols}:${state.duration}:${span}`;
  if (!state._peaks || state._peaksKey !== key) {
    const recordingCols = Math.max(1, Math.round((state.duration / span) * cols));
    state._peaks = audiotokenPeaks(state.mono, recordingCols);
    state._peaksKey = key;
  }
  const pk = state._peaks;
  const recordingCols = pk.length / 2;
  const mid = wave.y + wave.h / 2;
  const amp = wave.h / 2 - 1;
  // Window bands first, then the waveform on top (brighter where a window hears it), then outlines.
  windows.forEach((win, i) => {
    const x0 = xOf(win.start);
    const x1 = xOf(Math.min(span, win.start + win.length));
    ctx.fillStyle = i % 2 ? "rgba(255, 196, 64, 0.16)" : "rgba(255, 160, 40, 0.24)";
    ctx.fillRect(x0, wave.y, Math.max(1, x1 - x0), wave.h);
  });
  const heard = (x) => windows.some((win) => x >= xOf(win.start) && x < xOf(win.start + win.length));
  const drawRepeat = (x0, color, heardColor) => {
    for (let c = 0; c < recordingCols; c++) {
      const x = x0 + c;
      if (x >= wave.x + wave.w) break;
      const lo = pk[2 * c];
      const hi = pk[2 * c + 1];
      ctx.fillStyle = heard(x) ? heardColor : color;
      ctx.fillRect(x, mid - hi * amp, 1, Math.max(1, (hi - lo) * amp));
    }
  };
  drawRepeat(wave.x, "#7fb3d5", "#ffe3b0");
  if (state.loop && span > state.duration) {
    for (let x0 = wave.x + recordingCols; x0 < wave.x + wave.w; x0 += recordingCols) drawRepeat(x0, "#4a6a80", "#c9a878");
  }
  if (span > state.duration) {
    // the end of the recording: beyond it the window hears a repeat (loop) or silence
    ctx.strokeStyle = "#c0c8d0";
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(xOf(state.duration) + 0.5, wave.y);
    ctx.lineTo(xOf(state.duration) + 0.5, wave.y + wave.h);
    ctx.stroke();
    ctx.setLineDash([]);
  }
  windows.forEach((win, i) => {
    const x0 = xOf(win.start);
    const x1 = xOf(Math.min(span, win.start + win.length));
    ctx.strokeStyle = "#ffb347";
    ctx.lineWidth = 1;
    ctx.strokeRect(x0 + 0.5, wave.y + 0.5, Math.max(1, x1 - x0 - 1), wave.h - 1);
    if (state.draggable && i === 0) {
      ctx.fillStyle = "#ffb347";
      ctx.fillRect(x0 - 2, wave.y, 4, wave.h);
    }
  });
  if (state.playhead != null) {
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(xOf(state.playhead), wave.y, 1.5, wave.h);
  }

  // Labels
  ctx.fillStyle = "#c8d3dc";
  const first = windows[0];
  const label = windows.length > 1
    ? `${windows.length} windows of ${audiotokenFormatSeconds(first.length)}`
    : first ? `window ${audiotokenFormatSeconds(first.start)} + ${audiotokenFormatSeconds(first.length)}` : "";
  const tail = first && span > state.duration ? (state.loop ? " (loops)" : " (padded with silence)") : "";
  ctx.fillText(state.label || `${label}${tail}`, wave.x, wave.y + wave.h + 2);
  ctx.textAlign = "right";
  ctx.fillText(`${audiotokenFormatSeconds(state.duration)}${state.caption ? "  " + state.caption : ""}`, wave.x + wave.w, wave.y + wave.h + 2);
  ctx.textAlign = "left";

  // Spectrogram of what the model hears (the first window; all windows side by side when several).
  if (state.spectrogram) {
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.spectrogram, spec.x, spec.y, spec.w, spec.h);
    ctx.fillStyle = "rgba(0, 0, 0, 0.45)";
    ctx.fillRect(spec.x, spec.y, 92, 14);
    ctx.fillStyle = "#e8eef2";
    ctx.fillText(`0-${(state.maxFreq / 1000).toFixed(0)} kHz, log power`, spec.x + 3, spec.y + 2);
  } else {
    ctx.fillStyle = "#0b1116";
    ctx.fillRect(spec.x, spec.y, spec.w, spec.h);
  }
}
