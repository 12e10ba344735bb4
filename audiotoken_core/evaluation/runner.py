"""The evaluation protocol: generate for every item with three systems, score, write the table.

    runner = EvalRunner(eval_set, generator, scorers, out_dir, EvalProtocol(seed=0))
    results = runner.run(progress=lambda step, total: ...)
    print(results.markdown())            # also written to out/results.md and out/results.json

Systems (rows of the paper's table):
  "audiotoken"  the prompt with the audio vector in place of the placeholder;
  "text_label"  SD with the text label (topline): the same prompt with the label word instead;
  "untrained"   a freshly initialised Embedder (fixed seed, same encoder): the floor.
Item `i` is drawn with noise seed `protocol.seed + i` by every system, so rows are paired.

Metrics (definitions in metrics.py; each needs its own model, all pluggable via `Scorers`):
  AIC  classifier(generated) vs the audio's label (exact, or text-embedding cosine >= 0.75);
  FID  Frechet distance of feature statistics, generated vs reference frames;
  AIS  audio embedding vs generated-image embedding in a shared space (Wav2CLIP + CLIP ViT-B/32);
  IIS  image embedding of the generated image vs its reference frame.
A metric whose model is missing is reported as n/a with the reason, never silently dropped.

Videos (optional, `EvalRunner(..., videos=[VideoItem(...)])`): the runner draws still images, so it
does not make videos itself; generated videos given to it are scored with AV-Align (TempoTokens'
audio onset / motion peak IoU, av_align.py) into `EvalResults.av_align` (`score_videos`).

Resuming: images are written as out/images/<system>/<index>.png next to out/manifest.json,
which records, per system, the generator's settings (checkpoint, token digest, prompt,
sampler, seed...) and which item each index holds. A rerun with the same settings skips the
images that exist. A rerun whose settings differ raises SettingsChangedError naming the
differences (nothing is overwritten or mixed: use another output folder, or delete this one
to start over). Scores are always computed from the PNG files, so a resumed run and a fresh
run give identical numbers.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..audio import REFERENCE_CLIP_SECONDS, AudioInputError, prepare_waveform
from ..io import atomic_write
from . import metrics
from .av_align import AVAlignError, av_align
from .eval_set import EvalItem, item_audio, item_frame

__all__ = ["SYSTEMS", "SYSTEM_TITLES", "METRICS", "Generator", "Scorers", "EvalProtocol", "EvalResults", "EvalRunner",
           "SettingsChangedError", "zero_shot_classifier", "standard_scorers", "settings_hash", "image_path", "load_png", "save_png",
           "VideoItem", "score_videos"]

SYSTEMS = ("audiotoken", "text_label", "untrained")
SYSTEM_TITLES = {"audiotoken": "AudioToken", "text_label": "SD text label (topline)",
                 "untrained": "untrained token (floor)"}
METRICS = ("AIC", "FID", "AIS", "IIS")
DIRECTIONS = {"AIC": "↑", "FID": "↓", "AIS": "↑", "IIS": "↑"}
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

ImageFn = Callable[[Tensor], Tensor]          # [N, H, W, 3] in [0, 1] -> [N, D]
TextFn = Callable[[list], Tensor]             # list[str] -> [N, D]
AudioFn = Callable[[Tensor], Tensor]          # [N, T] mono 16 kHz in [-1, 1] -> [N, D]
ClassifyFn = Callable[[Tensor, list], list]   # (images [N, H, W, 3], candidate labels) -> list[str]


class SettingsChangedError(RuntimeError):
    """The output folder holds images made with other settings."""


class Generator(Protocol):
    """Draws one image for an item with one of the SYSTEMS."""

    def settings(self, system: str) -> dict:
        """JSON-able description of everything that determines `system`'s images (hashed for resuming)."""

    def generate(self, system: str, item: EvalItem, seed: int) -> Tensor:
        """The image [H, W, 3] float in [0, 1] for `item` drawn with noise `seed`."""


@dataclass
class Scorers:
    """The models behind the metrics; leave one None and its metric is n/a (with `reasons[metric]` or a default)."""

    image_embedder: ImageFn | None = None         # IIS (generated vs reference frame)
    classifier: ClassifyFn | None = None          # AIC (e.g. zero_shot_classifier(CLIP image, CLIP text))
    label_matcher: TextFn | None = None           # AIC: text embedder for the 0.75 cosine match (None: exact match)
    audio_embedder: AudioFn | None = None         # AIS audio side (Wav2CLIP)
    audio_image_embedder: ImageFn | None = None   # AIS image side, same space (CLIP ViT-B/32 for Wav2CLIP)
    fid_features: ImageFn | None = None           # FID (Inception-v3 pool features)
    candidate_labels: Sequence[str] | None = None  # AIC class vocabulary (default: the set's labels)
    names: dict = field(default_factory=dict)     # role -> model description (reported in the protocol)
    reasons: dict = field(default_factory=dict)   # metric -> why it is n/a (set by whoever builds the scorers)

    _DEFAULT_REASONS = {
        "AIC": "no image classifier (give a CLIP with a text tower: a local transformers CLIP folder)",
        "FID": "no FID feature model (give the Inception TorchScript file)",
        "AIS": "no audio embedder in an image space (give a Wav2CLIP file and a CLIP ViT-B/32 folder)",
        "IIS": "no image embedder (give CLIP_VISION or a local CLIP folder)",
    }

    def unavailable(self) -> dict[str, str]:
        """metric -> reason, for the metrics these scorers cannot compute."""
        have = {"AIC": self.classifier is not None, "FID": self.fid_features is not None,
                "AIS": self.audio_embedder is not None and self.audio_image_embedder is not None,
                "IIS": self.image_embedder is not None}
        return {m: self.reasons.get(m, self._DEFAULT_REASONS[m]) for m in METRICS if not have[m]}


def zero_shot_classifier(image_embedder: ImageFn, text_embedder: TextFn, template: str = "a photo of {}") -> ClassifyFn:
    """CLIP zero-shot: the candidate label whose `template` text is closest to the image."""

    cache: dict[tuple, Tensor] = {}

    def classify(images: Tensor, labels: list) -> list:
        key = tuple(labels)
        if key not in cache:
            cache[key] = text_embedder([template.format(label) for label in labels])
        return metrics.zero_shot_labels(image_embedder(images), cache[key], list(labels))

    return classify


def _is_vit_b32(hf_clip) -> bool:
    config = getattr(getattr(hf_clip, "model", None), "config", None)
    vision = getattr(config, "vision_config", None)
    return (getattr(config, "projection_dim", None) == 512 and getattr(vision, "patch_size", None) == 32
            and getattr(vision, "hidden_size", None) == 768)


def standard_scorers(*, image_embedder: ImageFn | None = None, image_embedder_name: str = "", hf_clip=None,
                     wav2clip=None, inception=None, missing_hint: dict | None = None) -> Scorers:
    """The paper's scorers from whatever models are given (each may be None).

    IIS: `image_embedder` (e.g. ComfyUI's CLIP_VISION) or else `hf_clip` (a local transformers CLIP,
    evaluation.clip_models.HFClip). AIC: zero-shot over the set's labels with `hf_clip`'s image and
    text towers, labels matched with its text embeddings (cosine >= 0.75). AIS: `wav2clip` against
    `hf_clip` images, which must be CLIP ViT-B/32 (Wav2CLIP's space). FID: `inception`
    (evaluation.inception.FidInception). `missing_hint[metric]` is appended to an n/a reason
    (e.g. which node input or command option supplies the model).
    """
    hint = missing_hint or {}
    scorers = Scorers()

    def na(metric: str, reason: str) -> None:
        scorers.reasons[metric] = reason + (f" ({hint[metric]})" if metric in hint else "")

    if image_embedder is not None:
        scorers.image_embedder = image_embedder
        scorers.names["IIS image embedder"] = image_embedder_name or "CLIP vision"
    elif hf_clip is not None:
        scorers.image_embedder = hf_clip.embed_images
        scorers.names["IIS image embedder"] = f"CLIP {hf_clip.name}"
    else:
        na("IIS", "no CLIP image model given")
    if hf_clip is not None:
        scorers.classifier = zero_shot_classifier(hf_clip.embed_images, hf_clip.embed_texts)
        scorers.label_matcher = hf_clip.embed_texts
        scorers.names["AIC classifier"] = f"CLIP {hf_clip.name} zero-shot over the set's labels ('a photo of <label>')"
    else:
        na("AIC", "no CLIP with a text tower given (a CLIP_VISION model has none; give a local transformers CLIP folder)")
    if wav2clip is None:
        na("AIS", "no Wav2CLIP file given")
    elif hf_clip is None:
        na("AIS", "Wav2CLIP needs a local CLIP ViT-B/32 folder for the image side; none given")
    elif not _is_vit_b32(hf_clip):
        na("AIS", f"Wav2CLIP lives in CLIP ViT-B/32's space but the CLIP folder is {hf_clip.name} "
                  f"({hf_clip.embed_dim}-d); give a ViT-B/32 folder")
    else:
        def embed_audio(waves: Tensor) -> Tensor:
            p = next(wav2clip.parameters())
            with torch.no_grad():
                return wav2clip(waves.to(p.device)).float().cpu()

        scorers.audio_embedder = embed_audio
        scorers.audio_image_embedder = hf_clip.embed_images
        scorers.names["AIS"] = f"Wav2CLIP + CLIP {hf_clip.name}"
    if inception is not None:
        scorers.fid_features = inception.features
        scorers.names["FID"] = f"Inception-v3 pool features ({getattr(inception, 'path', None) or 'TorchScript'})"
    else:
        na("FID", "no FID Inception file given")
    return scorers


@dataclass(frozen=True)
class EvalProtocol:
    """How the set is evaluated (recorded in the results)."""

    seed: int = 0                       # noise seed of item i = seed + i (all systems)
    n_arbitrary: int | None = None      # AIS/IIS arbitrary samples per item; None = all other items
    metric_seed: int = 0                # draws the arbitrary samples when n_arbitrary is set
    systems: tuple = SYSTEMS
    audio_seconds: float = REFERENCE_CLIP_SECONDS  # window the audio embedder hears (from the start, looped)
    channel_policy: str = "mix"
    aic_threshold: float = metrics.AIC_THRESHOLD
    batch_size: int = 16                # images per scoring batch

    def __post_init__(self) -> None:
        if self.n_arbitrary is not None and self.n_arbitrary < 1:
            raise ValueError(f"n_arbitrary must be >= 1 or None (all others), got {self.n_arbitrary}")


@dataclass
class VideoItem:
    """A generated video for AV-Align: frames [N, H, W, 3] in 0..1 played at `fps`, and the audio track
    they show, starting with frame 0 (`waveform` [C, T] at `sample_rate`)."""

    name: str
    frames: Tensor
    waveform: Tensor
    sample_rate: int
    fps: float


def score_videos(videos: Sequence[VideoItem], onset_options: dict | None = None) -> dict:
    """AV-Align of each video and their mean (the reference averages the per-video scores).

    A video that cannot be scored (e.g. no onsets and no motion peaks: 0 / 0) gets score None and
    its error, and is left out of the mean, which says how many videos it covers.
    """
    rows = []
    for video in videos:
        row = {"name": video.name, "score": None}
        try:
            r = av_align(video.frames, video.fps, video.waveform, video.sample_rate, onset_options=onset_options)
            row.update(score=r.score, matches=r.matches, audio_peaks=len(r.audio_peaks),
                       video_peaks=len(r.video_peaks))
        except (AVAlignError, AudioInputError) as exc:  # reported with the video, the others still scored
            row["error"] = str(exc)
        rows.append(row)
    scores = [row["score"] for row in rows if row["score"] is not None]
    return {"mean": sum(scores) / len(scores) if scores else None, "scored": len(scores), "videos": rows}


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def image_path(out_dir: str | os.PathLike, system: str, index: int) -> Path:
    return Path(out_dir) / "images" / system / f"{index:05d}.png"


def save_png(image: Tensor, path: Path) -> None:
    """[H, W, 3] float in [0, 1] -> 8-bit PNG, written atomically (a killed run never leaves half a file)."""
    from PIL import Image

    array = to_uint8(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def load_png(path: Path) -> Tensor:
    from PIL import Image

    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()).float().div_(255.0)


def to_uint8(image: Tensor | np.ndarray) -> np.ndarray:
    """[H, W, 3] float in [0, 1] (or uint8) -> uint8 array."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8:
        return image
    t = torch.as_tensor(image).detach().float().cpu()
    if not torch.isfinite(t).all():  # NaN would be saved as a plausible black image
        raise ValueError("the image contains NaN or infinite values")
    return t.clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


@dataclass
class EvalResults:
    """The table and everything needed to read it."""

    table: dict                 # system -> metric -> float | None
    not_available: dict         # metric -> reason
    n_items: int
    protocol: dict
    models: dict
    settings: dict              # system -> generator settings
    timings: dict               # seconds: generation (this run), generated (new images), scoring
    predictions: dict = field(default_factory=dict)  # system -> AIC predicted labels (when AIC ran)
    labels: list = field(default_factory=list)       # the items' true labels
    errors: dict = field(default_factory=dict)       # "system/metric" -> error text (a metric that failed)
    av_align: dict = field(default_factory=dict)     # score_videos() of the videos given to the runner (if any)

    def to_json(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        header = "| system | " + " | ".join(f"{m} {DIRECTIONS[m]}" for m in METRICS) + " |"
        lines = [header, "|" + "---|" * (len(METRICS) + 1)]
        for system, row in self.table.items():
            cells = ["n/a" if row.get(m) is None else f"{row[m]:.2f}" for m in METRICS]
            lines.append(f"| {SYSTEM_TITLES.get(system, system)} | " + " | ".join(cells) + " |")
        p = self.protocol
        arbitrary = "all other items" if p.get("n_arbitrary") is None else \
            f"{p['n_arbitrary']} per item (seed {p.get('metric_seed')})"
        lines += ["", f"{self.n_items} items; noise seed of item i = {p.get('seed')} + i (same for every system); "
                      f"AIS/IIS arbitrary samples: {arbitrary}; ties count half; "
                      f"AIC match: exact label or text cosine >= {p.get('aic_threshold')}."]
        for metric, reason in self.not_available.items():
            lines.append(f"- {metric}: n/a, {reason}")
        for where, text in self.errors.items():
            lines.append(f"- {where}: failed, {text}")
        if self.av_align:
            mean, rows = self.av_align["mean"], self.av_align["videos"]
            shown = "n/a" if mean is None else f"{mean:.3f}"
            lines.append(f"- AV-Align ↑ (audio onsets vs video motion peaks, IoU): {shown}, mean of "
                         f"{self.av_align['scored']} of {len(rows)} videos")
            for row in rows:
                if row["score"] is None:
                    lines.append(f"- AV-Align of {row['name']}: failed, {row['error']}")
        if self.models:
            lines.append("- models: " + "; ".join(f"{k}: {v}" for k, v in sorted(self.models.items())))
        return "\n".join(lines) + "\n"


class EvalRunner:
    """Runs the protocol over `eval_set`, writing images, manifest and results into `out_dir`."""

    def __init__(self, eval_set: Sequence[EvalItem], generator: Generator, scorers: Scorers,
                 out_dir: str | os.PathLike, protocol: EvalProtocol | None = None,
                 videos: Sequence[VideoItem] = ()) -> None:
        if len(eval_set) == 0:
            raise ValueError("the evaluation set is empty")
        self.items = list(eval_set)
        self.generator = generator
        self.scorers = scorers
        self.out_dir = Path(out_dir)
        self.protocol = protocol or EvalProtocol()
        self.videos = list(videos)

    # ------------------------------------------------------------------ manifest

    def _settings(self) -> dict:
        return {s: {**self.generator.settings(s), "seed": self.protocol.seed} for s in self.protocol.systems}

    def _check_manifest(self) -> dict:
        """Load or create the manifest; raise SettingsChangedError if it was made with other settings."""
        path = self.out_dir / MANIFEST
        settings = self._settings()
        index_items = {str(i): item.item_id for i, item in enumerate(self.items)}
        if path.is_file():
            manifest = json.loads(path.read_text())
            problems = []
            for system, wanted in settings.items():
                old = manifest.get("systems", {}).get(system)
                if old is None:
                    continue
                if old["hash"] != settings_hash(wanted):
                    diff = sorted(k for k in set(wanted) | set(old["settings"])
                                  if json.dumps(wanted.get(k), sort_keys=True, default=str)
                                  != json.dumps(old["settings"].get(k), sort_keys=True, default=str))
                    problems.append(f"{system}: " + ", ".join(
                        f"{k} {old['settings'].get(k)!r} -> {wanted.get(k)!r}" for k in diff))
            clash = [i for i, item_id in index_items.items()
                     if manifest.get("items", {}).get(i, item_id) != item_id]
            if clash:
                problems.append(f"items: index {clash[0]} was {manifest['items'][clash[0]]!r}, now "
                                f"{index_items[clash[0]]!r} ({len(clash)} indices differ; the evaluation set changed)")
            if problems:
                raise SettingsChangedError(
                    f"{self.out_dir} holds images generated with other settings:\n  " + "\n  ".join(problems)
                    + "\nNothing was overwritten. Use another output folder (node: another name) to evaluate these "
                      "settings, or delete this folder to start over.")
        else:
            manifest = {"version": MANIFEST_VERSION, "systems": {}, "items": {}}
        for system, wanted in settings.items():
            manifest["systems"][system] = {"settings": wanted, "hash": settings_hash(wanted)}
        manifest["items"].update(index_items)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        text = json.dumps(manifest, indent=1, sort_keys=True, default=str)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return manifest

    # ------------------------------------------------------------------ run

    def pending(self) -> list[tuple[str, int]]:
        """(system, index) pairs whose image does not exist yet."""
        return [(s, i) for s in self.protocol.systems for i in range(len(self.items))
                if not image_path(self.out_dir, s, i).is_file()]

    def run(self, progress: Callable[[int, int], None] | None = None) -> EvalResults:
        self._check_manifest()
        n, systems = len(self.items), self.protocol.systems
        total = len(systems) * n + 1
        step, generated = 0, 0
        t0 = time.perf_counter()
        for system in systems:
            for index, item in enumerate(self.items):
                path = image_path(self.out_dir, system, index)
                if not path.is_file():
                    image = self.generator.generate(system, item, self.protocol.seed + index)
                    save_png(image, path)
                    generated += 1
                step += 1
                if progress is not None:
                    progress(step, total)
        t_gen = time.perf_counter() - t0
        t1 = time.perf_counter()
        results = self.score()
        results.timings = {"generation_seconds": round(t_gen, 3), "images_generated": generated,
                           "scoring_seconds": round(time.perf_counter() - t1, 3)}
        self.write(results)
        if progress is not None:
            progress(total, total)
        return results

    # ------------------------------------------------------------------ scoring

    def _batches(self):
        b = self.protocol.batch_size
        return [list(range(i, min(i + b, len(self.items)))) for i in range(0, len(self.items), b)]

    def _generated(self, system: str, indices: list[int]) -> Tensor:
        return torch.stack([load_png(image_path(self.out_dir, system, i)) for i in indices])

    def _image_size(self) -> tuple[int, int]:
        first = load_png(image_path(self.out_dir, self.protocol.systems[0], 0))
        return int(first.shape[1]), int(first.shape[0])

    def _references(self, indices: list[int], size: tuple[int, int]) -> Tensor:
        return torch.stack([item_frame(self.items[i], size) for i in indices])

    def _audio(self, indices: list[int]) -> Tensor:
        waves = []
        for i in indices:
            wave, rate = item_audio(self.items[i])
            waves.append(prepare_waveform(wave[None], rate, channel_policy=self.protocol.channel_policy,
                                          window_seconds=self.protocol.audio_seconds, loop=True)[0])
        return torch.stack(waves)

    @staticmethod
    def _pass(fns: dict, batches, load) -> dict:
        """One pass over the batches: load each batch once, apply every fn; tensors are concatenated,
        lists (a classifier's labels) joined."""
        out: dict = {name: [] for name in fns}
        for b in batches:
            x = load(b)
            for name, fn in fns.items():
                y = fn(x)
                if isinstance(y, (list, tuple)):
                    out[name].extend(y)
                else:
                    out[name].append(torch.as_tensor(y).detach().float().cpu())
        return {name: (torch.cat(v) if v and isinstance(v[0], Tensor) else v) for name, v in out.items()}

    def score(self) -> EvalResults:
        """Compute the table from the PNGs in the output folder (every image must exist)."""
        sc, p = self.scorers, self.protocol
        missing = self.pending()
        if missing:
            raise RuntimeError(f"{len(missing)} images are missing (e.g. {missing[0]}); run() generates them")
        batches, size = self._batches(), self._image_size()
        labels = [item.label for item in self.items]
        candidates = list(sc.candidate_labels) if sc.candidate_labels is not None else sorted(set(labels))
        na = sc.unavailable()
        table = {s: {m: None for m in METRICS} for s in p.systems}
        errors, predictions = {}, {}

        def guarded(system: str, metric: str, fn: Callable[[], float]) -> None:
            try:
                value = float(fn())
                table[system][metric] = value if math.isfinite(value) else None
                if not math.isfinite(value):
                    errors[f"{system}/{metric}"] = f"not finite ({value})"
            except metrics.MetricInputError as exc:  # e.g. a set of one item: report, keep the other metrics
                errors[f"{system}/{metric}"] = str(exc)

        ref_fns = {k: fn for k, fn in (("IIS", sc.image_embedder), ("FID", sc.fid_features)) if k not in na}
        refs = self._pass(ref_fns, batches, lambda b: self._references(b, size)) if ref_fns else {}
        audio_emb = self._pass({"AIS": sc.audio_embedder}, batches, self._audio)["AIS"] if "AIS" not in na else None
        gen_fns = {"IIS": sc.image_embedder, "AIS": sc.audio_image_embedder, "FID": sc.fid_features,
                   "AIC": (lambda x: sc.classifier(x, candidates)) if sc.classifier is not None else None}
        gen_fns = {k: fn for k, fn in gen_fns.items() if k not in na}
        for system in p.systems:
            gen = self._pass(gen_fns, batches, lambda b, s=system: self._generated(s, b)) if gen_fns else {}
            if "IIS" in gen:
                guarded(system, "IIS", lambda: metrics.image_image_score(gen["IIS"], refs["IIS"], p.n_arbitrary,
                                                                         p.metric_seed))
            if "AIS" in gen:
                guarded(system, "AIS", lambda: metrics.audio_image_score(audio_emb, gen["AIS"], p.n_arbitrary,
                                                                         p.metric_seed))
            if "FID" in gen:
                guarded(system, "FID", lambda: metrics.frechet_distance(gen["FID"], refs["FID"]))
            if "AIC" in gen:
                predictions[system] = [str(label) for label in gen["AIC"]]
                guarded(system, "AIC", lambda: metrics.label_agreement(predictions[system], labels, sc.label_matcher,
                                                                       p.aic_threshold))
        protocol = {**asdict(p), "systems": list(p.systems), "candidate_labels": candidates, "image_size": list(size)}
        return EvalResults(table=table, not_available=na, n_items=len(self.items), protocol=protocol,
                           models=dict(sc.names), settings=self._settings(), timings={},
                           predictions=predictions, labels=labels, errors=errors,
                           av_align=score_videos(self.videos) if self.videos else {})

    def write(self, results: EvalResults) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(json.dumps(results.to_json(), indent=1, default=str))
        (self.out_dir / "results.md").write_text("# AudioToken evaluation\n\n" + results.markdown())
