// AudioToken live loss chart: points from `audiotoken.train_progress` messages drawn on a canvas.
// Cheap under many events: points are kept in typed arrays (decimated by 2 when full) and the
// canvas is redrawn at most once per animation frame.

import { audiotokenClearCanvas } from "./audiotoken_audio.js";

const MAX_POINTS = 2048;

export class AudiotokenLossChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.reset();
  }

  reset() {
    this.steps = new Float64Array(MAX_POINTS);
    this.loss = new Float64Array(MAX_POINTS);
    this.diffusion = new Float64Array(MAX_POINTS);
    this.count = 0;
    this.stride = 1; // keep every stride-th step once decimated
    this.lastStep = -1;
    this.totalSteps = 0;
    this.latest = null;
    this.received = 0;
    this.requestDraw();
  }

  /** One progress message {step, steps, loss, diffusion}; a step that goes back starts a new run. */
  add({ step, steps, loss, diffusion }) {
    step = Number(step);
    if (!Number.isFinite(step)) return;
    if (step <= this.lastStep) this.reset();
    this.lastStep = step;
    this.totalSteps = Number(steps) || this.totalSteps;
    this.latest = { step, loss: Number(loss), diffusion: diffusion == null ? NaN : Number(diffusion) };
    this.received += 1;
    if (this.received % this.stride === 0 || this.count === 0) {
      if (this.count === MAX_POINTS) this.decimate();
      const i = this.count++;
      this.steps[i] = step;
      this.loss[i] = this.latest.loss;
      this.diffusion[i] = this.latest.diffusion;
    }
    this.requestDraw();
  }

  decimate() {
    const half = MAX_POINTS >> 1;
    for (let i = 0; i < half; i++) {
      this.steps[i] = this.steps[2 * i];
      this.loss[i] = this.loss[2 * i];
      this.diffusion[i] = this.diffusion[2 * i];
    }
    this.count = half;
    this.stride *= 2;
  }

  requestDraw() {
    if (this._frame) return;
    const raf = window.requestAnimationFrame || ((f) => setTimeout(f, 16));
    this._frame = raf(() => {
      this._frame = null;
      this.draw();
    });
  }

  draw() {
    const { ctx, w, h } = audiotokenClearCanvas(this.canvas, 300, 150);
    if (!this.count) {
      ctx.fillStyle = "#9ab";
      ctx.fillText("loss chart: waiting for training steps", 8, 8);
      return;
    }
    const plot = { x: 40, y: 20, w: Math.max(10, w - 48), h: Math.max(10, h - 36) };
    let lo = Infinity;
    let hi = -Infinity;
    for (const series of [this.loss, this.diffusion]) {
      for (let i = 0; i < this.count; i++) {
        const v = series[i];
        if (Number.isFinite(v)) {
          if (v < lo) lo = v;
          if (v > hi) hi = v;
        }
      }
    }
    if (!Number.isFinite(lo)) {
      lo = 0;
      hi = 1;
    }
    if (hi - lo < 1e-9) {
      hi += 0.5;
      lo -= 0.5;
    }
    const first = this.steps[0];
    const last = Math.max(this.totalSteps || 0, this.steps[this.count - 1], first + 1);
    const xOf = (s) => plot.x + ((s - first) / (last - first)) * plot.w;
    const yOf = (v) => plot.y + plot.h - ((v - lo) / (hi - lo)) * plot.h;

    ctx.strokeStyle = "#2c3a44";
    ctx.lineWidth = 1;
    ctx.strokeRect(plot.x + 0.5, plot.y + 0.5, plot.w, plot.h);
    ctx.fillStyle = "#9ab";
    ctx.textAlign = "right";
    ctx.fillText(hi.toPrecision(3), plot.x - 3, plot.y);
    ctx.fillText(lo.toPrecision(3), plot.x - 3, plot.y + plot.h - 10);
    ctx.textAlign = "left";

    const line = (series, color) => {
      ctx.strokeStyle = color;
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let pen = false;
      for (let i = 0; i < this.count; i++) {
        const v = series[i];
        if (!Number.isFinite(v)) {
          pen = false;
          continue;
        }
        const x = xOf(this.steps[i]);
        const y = yOf(v);
        if (pen) ctx.lineTo(x, y);
        else ctx.moveTo(x, y);
        pen = true;
      }
      if (this.count === 1) ctx.arc(xOf(this.steps[0]), yOf(series[0]), 2, 0, 2 * Math.PI);
      ctx.stroke();
    };
    line(this.diffusion, "#7fb3d5");
    line(this.loss, "#ffb347");

    // header: step, then the two legends, laid out left to right
    const l = this.latest;
    let x = 6;
    const label = (text, color) => {
      ctx.fillStyle = color;
      ctx.fillText(text, x, 4);
      x += ctx.measureText(text).width + 14;
    };
    label(`step ${l.step}/${this.totalSteps || "?"}`, "#c8d3dc");
    label(`loss ${Number.isFinite(l.loss) ? l.loss.toPrecision(4) : "-"}`, "#ffb347");
    label(`diffusion ${Number.isFinite(l.diffusion) ? l.diffusion.toPrecision(4) : "-"}`, "#7fb3d5");
    ctx.textAlign = "left";
  }
}
