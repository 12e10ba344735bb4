"""The evaluation runner: protocol, resuming, results files, contact sheets, eval sets.

A fake generator draws known pictures and fake scorers read them back, so every metric has
a value computable by hand:

  frames: 8 x 8, quadrant k white for item k (labels a..d), everything else black;
  image embedding = the four quadrant means (item k's frame -> one-hot e_k);
  audio: a tone per item, embedded as the one-hot of its nearest class frequency;
  "audiotoken" draws the item's own frame       -> IIS = AIS = AIC = 100, FID = 0;
  "untrained" draws the NEXT item's frame        -> own cosine 0, one other 1, two ties at 0:
                                                    IIS = AIS = (0 + .5 + .5) / 3 = 33.33, AIC = 0;
  "text_label" draws a flat grey picture         -> every cosine equal: IIS = AIS = 50;
                                                    the classifier picks the first label: AIC = 25.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from audio_files import write_tone, write_wav
from audiotoken_core.evaluation.contact_sheet import (cell_box, contact_sheet, eval_contact_sheet, label_strip_width,
                                                     spread_indices)
from audiotoken_core.evaluation.eval_set import EvalSetError, eval_set_from_csv, item_audio, load_eval_set
from audiotoken_core.evaluation.runner import (EvalProtocol, EvalRunner, Scorers, SettingsChangedError, image_path,
                                               load_png)
from audiotoken_core.spectrogram import colourise, log_mel_db, render_spectrogram

LABELS = ["a", "b", "c", "d"]
FREQS = [300.0, 700.0, 1500.0, 3100.0]


def quadrant_image(k: int, size: int = 8) -> np.ndarray:
    image = np.zeros((size, size, 3), dtype=np.uint8)
    h = size // 2
    y, x = divmod(k, 2)
    image[y * h:(y + 1) * h, x * h:(x + 1) * h] = 255
    return image


@pytest.fixture
def eval_folder(tmp_path):
    root = tmp_path / "set"
    for k, label in enumerate(LABELS):
        (root / label).mkdir(parents=True)
        write_tone(root / label / f"clip{k}.wav", FREQS[k], seconds=1.0)
        Image.fromarray(quadrant_image(k)).save(root / label / f"clip{k}.png")
    return root


class FakeGenerator:
    def __init__(self, prompt="a photo of <audio>"):
        self.prompt, self.calls = prompt, []

    def settings(self, system):
        return {"prompt": self.prompt, "system": system, "checkpoint": "fake"}

    def generate(self, system, item, seed):
        self.calls.append((system, item.item_id, seed))
        k = LABELS.index(item.label)
        if system == "audiotoken":
            return torch.from_numpy(quadrant_image(k)).float() / 255
        if system == "untrained":
            return torch.from_numpy(quadrant_image((k + 1) % 4)).float() / 255
        return torch.full((8, 8, 3), 0.5)


def quadrants(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] -> [N, 4] quadrant means (plus a tiny constant so grey is not all zero)."""
    n, h, w, _ = images.shape
    q = images.mean(-1).reshape(n, 2, h // 2, 2, w // 2).mean((2, 4)).reshape(n, 4)
    return q


def tone_class(waves: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.rfft(waves).abs()
    peak = spectrum.argmax(-1).float() * 16000 / waves.shape[-1]
    k = torch.stack([(peak - f).abs() for f in FREQS], -1).argmin(-1)
    return torch.nn.functional.one_hot(k, 4).float()


def classify(images, labels):
    return [LABELS[int(i)] for i in quadrants(images).argmax(-1)]


def full_scorers() -> Scorers:
    return Scorers(image_embedder=quadrants, classifier=classify, audio_embedder=tone_class,
                   audio_image_embedder=quadrants, fid_features=quadrants, names={"image": "quadrant means"})


def test_runner_gives_the_known_metric_values(eval_folder, tmp_path):
    items = load_eval_set(eval_folder)
    assert [i.label for i in items] == LABELS
    gen = FakeGenerator()
    steps = []
    results = EvalRunner(items, gen, full_scorers(), tmp_path / "out", EvalProtocol(seed=7)).run(
        progress=lambda s, t: steps.append((s, t)))
    t = results.table
    assert t["audiotoken"]["IIS"] == pytest.approx(100) and t["audiotoken"]["AIS"] == pytest.approx(100)
    assert t["audiotoken"]["AIC"] == pytest.approx(100) and t["audiotoken"]["FID"] == pytest.approx(0, abs=1e-9)
    assert t["untrained"]["IIS"] == pytest.approx(100 / 3) and t["untrained"]["AIS"] == pytest.approx(100 / 3)
    assert t["untrained"]["AIC"] == pytest.approx(0)
    assert t["text_label"]["IIS"] == pytest.approx(50) and t["text_label"]["AIS"] == pytest.approx(50)
    assert t["text_label"]["AIC"] == pytest.approx(25) and t["text_label"]["FID"] > 0.1
    assert results.not_available == {} and results.errors == {}
    # paired seeds: item i uses seed 7 + i in every system
    assert sorted({(s, seed) for s, _, seed in gen.calls}) == sorted(
        (s, 7 + i) for s in ("audiotoken", "text_label", "untrained") for i in range(4))
    assert steps[-1] == (13, 13) and len(steps) == 13
    assert results.predictions["untrained"] == ["b", "c", "d", "a"]


def test_results_files_and_markdown(eval_folder, tmp_path):
    out = tmp_path / "out"
    EvalRunner(load_eval_set(eval_folder), FakeGenerator(), full_scorers(), out, EvalProtocol(n_arbitrary=2)).run()
    data = json.loads((out / "results.json").read_text())
    assert data["n_items"] == 4 and data["protocol"]["n_arbitrary"] == 2 and data["protocol"]["seed"] == 0
    assert set(data["table"]) == {"audiotoken", "text_label", "untrained"}
    assert data["table"]["audiotoken"]["IIS"] == pytest.approx(100)
    md = (out / "results.md").read_text()
    lines = md.splitlines()
    header = next(line for line in lines if line.startswith("| system"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["system", "AIC ↑", "FID ↓", "AIS ↑", "IIS ↑"]
    assert any(line.startswith("| AudioToken | 100.00 | 0.00 | 100.00 | 100.00 |") for line in lines), md
    assert any(line.startswith("| SD text label (topline) | 25.00 |") for line in lines)
    assert any(line.startswith("| untrained token (floor) | 0.00 |") for line in lines)
    assert "4 items" in md and "2 per item (seed 0)" in md
    assert all(image_path(out, s, i).is_file() for s in ("audiotoken", "untrained", "text_label") for i in range(4))


def test_missing_models_are_reported_as_na(eval_folder, tmp_path):
    scorers = Scorers(image_embedder=quadrants, reasons={"FID": "no Inception file given (--inception)"})
    results = EvalRunner(load_eval_set(eval_folder), FakeGenerator(), scorers, tmp_path / "out").run()
    assert set(results.not_available) == {"AIC", "FID", "AIS"}
    assert results.not_available["FID"] == "no Inception file given (--inception)"
    assert all(results.table[s]["FID"] is None and results.table[s]["IIS"] is not None for s in results.table)
    md = results.markdown()
    assert "| AudioToken | n/a | n/a | n/a | 100.00 |" in md
    assert "- FID: n/a, no Inception file given (--inception)" in md and "- AIS: n/a," in md


def test_resume_skips_done_images(eval_folder, tmp_path):
    items, out = load_eval_set(eval_folder), tmp_path / "out"
    first = FakeGenerator()
    r1 = EvalRunner(items, first, full_scorers(), out).run()
    assert len(first.calls) == 12
    image_path(out, "untrained", 2).unlink()  # as if the run had been stopped there
    (out / "results.json").unlink()
    second = FakeGenerator()
    r2 = EvalRunner(items, second, full_scorers(), out).run()
    assert second.calls == [("untrained", items[2].item_id, 2)]
    assert r2.table == r1.table and r2.timings["images_generated"] == 1
    third = FakeGenerator()
    EvalRunner(items, third, full_scorers(), out).run()
    assert third.calls == []


def test_changed_settings_are_refused(eval_folder, tmp_path):
    items, out = load_eval_set(eval_folder), tmp_path / "out"
    EvalRunner(items, FakeGenerator(), full_scorers(), out).run()
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    with pytest.raises(SettingsChangedError, match=r"prompt 'a photo of <audio>' -> 'a drawing of <audio>'") as exc:
        EvalRunner(items, FakeGenerator("a drawing of <audio>"), full_scorers(), out).run()
    assert "another output folder" in str(exc.value)
    with pytest.raises(SettingsChangedError, match="seed 0 -> 5"):
        EvalRunner(items, FakeGenerator(), full_scorers(), out, EvalProtocol(seed=5)).run()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # another evaluation set in the same folder is refused too
    with pytest.raises(SettingsChangedError, match="evaluation set changed"):
        EvalRunner(list(reversed(items)), FakeGenerator(), full_scorers(), out).run()
    # metric settings do not touch the images: a new n_arbitrary reuses them
    gen = FakeGenerator()
    EvalRunner(items, gen, full_scorers(), out, EvalProtocol(n_arbitrary=1, metric_seed=3)).run()
    assert gen.calls == []
    # a subset (e.g. --limit) of the same set reuses them as well
    gen = FakeGenerator()
    EvalRunner(items[:2], gen, full_scorers(), out).run()
    assert gen.calls == []


def test_eval_set_errors(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    write_tone(root / "lonely.wav", 440, seconds=0.5)
    with pytest.raises(EvalSetError, match="(?s)lonely.wav.*no image"):
        load_eval_set(root)
    Image.fromarray(quadrant_image(0)).save(root / "lonely.png")
    with pytest.raises(EvalSetError, match="(?s)no label.*labels.csv"):
        load_eval_set(root)
    (root / "labels.csv").write_text("file,label\nlonely.wav,dog\n")
    assert [(i.label, i.item_id) for i in load_eval_set(root)] == [("dog", "lonely")]
    with pytest.raises(EvalSetError, match="not found"):
        load_eval_set(tmp_path / "nowhere")
    csv_path = tmp_path / "set.csv"
    csv_path.write_text("audio,frame,label\nset/lonely.wav,set/lonely.png,dog\nset/lonely.wav,set/missing.png,cat\n")
    with pytest.raises(EvalSetError, match="listed twice"):
        eval_set_from_csv(csv_path)
    csv_path.write_text("audio,frame,label\nset/lonely.wav,set/missing.png,cat\n")
    with pytest.raises(EvalSetError, match="(?s)do not exist.*missing.png"):
        eval_set_from_csv(csv_path)
    csv_path.write_text("audio,image,label\nset/lonely.wav,set/lonely.png,\n")
    with pytest.raises(EvalSetError, match="empty label"):
        eval_set_from_csv(csv_path)
    csv_path.write_text("audio,image,label\nset/lonely.wav,set/lonely.png,dog\n")
    items = load_eval_set(csv_path)
    assert items[0].frame == root / "lonely.png" and item_audio(items[0])[1] == 16000


def test_spectrogram_renderer(tmp_path):
    rate = 16000
    t = torch.arange(rate) / rate
    low, high = torch.sin(2 * torch.pi * 200 * t) * 0.5, torch.sin(2 * torch.pi * 4000 * t) * 0.5
    db_low, db_high = log_mel_db(low), log_mel_db(high)
    assert db_low.shape == (128, 98)
    assert int(db_low.mean(1).argmax()) < int(db_high.mean(1).argmax())  # row 0 = lowest band
    image = render_spectrogram(low, rate)
    assert image.dtype == np.uint8 and image.shape == (128, 98, 3)
    # low frequencies at the bottom: the bright band of a 200 Hz tone is in the lower part
    brightness = image.astype(float).sum(-1).mean(1)
    assert brightness.argmax() > 96
    # stereo at 44.1 kHz renders like its mono mix resampled; resizing gives the asked size
    assert render_spectrogram(torch.stack([low, low]), rate, size=(64, 32)).shape == (32, 64, 3)
    assert render_spectrogram(torch.zeros(800), rate).max() <= 4  # silence is the darkest colour
    assert colourise(np.array([0.0, 1.0]), "gray").tolist() == [[0, 0, 0], [255, 255, 255]]


def test_contact_sheet_layout(eval_folder, tmp_path):
    out = tmp_path / "out"
    items = load_eval_set(eval_folder)
    EvalRunner(items, FakeGenerator(), full_scorers(), out).run()
    columns = ("spectrogram", "audiotoken", "reference", "untrained", "text_label")
    sheet = eval_contact_sheet(out, items, columns=columns, indices=[0, 1, 2], cell=(16, 16))
    label_width = label_strip_width(["a", "b", "c"])
    bottom, right = cell_box(2, 4, (16, 16), label_width=label_width)[2:]
    assert sheet.dtype == np.uint8 and sheet.shape == (bottom + 4, right + 4, 3)
    for row, item in enumerate(items[:3]):
        def cell(col):
            top, left, bot, rgt = cell_box(row, col, (16, 16), label_width=label_width)
            return sheet[top:bot, left:rgt]

        wave, rate = item_audio(item)
        assert np.array_equal(cell(0), render_spectrogram(wave, rate, size=(16, 16)))
        k = LABELS.index(item.label)
        for col, drawn in ((1, k), (2, k), (3, (k + 1) % 4)):  # own frame, reference, the next item's frame
            assert int(quadrants(torch.from_numpy(cell(col)).float()[None] / 255).argmax()) == drawn
        assert (cell(4) == 128).all()  # the flat grey topline picture
    assert spread_indices([items[0], items[1], items[0]], 3) == [0, 1, 2]
    assert eval_contact_sheet(out, items, max_rows=2).shape[0] == cell_box(1, 0, (8, 8))[2] + 4
    plain = contact_sheet([[quadrant_image(0), quadrant_image(1)]], pad=2)
    assert plain.shape == (12, 22, 3) and np.array_equal(plain[2:10, 12:20], quadrant_image(1))


def test_runner_with_one_item_reports_ranking_errors(tmp_path):
    root = tmp_path / "one"
    (root / "a").mkdir(parents=True)
    write_wav(root / "a" / "x.wav", np.sin(np.arange(8000) * 0.1) * 0.3)
    Image.fromarray(quadrant_image(0)).save(root / "a" / "x.png")
    results = EvalRunner(load_eval_set(root), FakeGenerator(), full_scorers(), tmp_path / "out").run()
    assert results.table["audiotoken"]["IIS"] is None and "at least 2" in results.errors["audiotoken/IIS"]
    assert results.table["audiotoken"]["AIC"] == 100
    assert load_png(image_path(tmp_path / "out", "audiotoken", 0)).shape == (8, 8, 3)


class _Config:
    def __init__(self, projection_dim, patch_size, hidden_size):
        self.projection_dim = projection_dim
        self.vision_config = type("V", (), {"patch_size": patch_size, "hidden_size": hidden_size})()


class FakeHFClip:
    """Stands in for evaluation.clip_models.HFClip: images -> quadrant means, texts -> one-hot of a..d."""

    def __init__(self, vit_b32: bool):
        self.name, self.embed_dim = ("fake-b32" if vit_b32 else "fake-l14"), 4
        self.model = type("M", (), {"config": _Config(512, 32, 768) if vit_b32 else _Config(768, 14, 1024)})()

    def embed_images(self, images):
        return torch.nn.functional.normalize(quadrants(images), dim=-1)

    def embed_texts(self, texts):
        return torch.stack([torch.nn.functional.one_hot(torch.tensor(LABELS.index(t.split()[-1])), 4).float()
                            for t in texts])


def test_standard_scorers_pick_models_and_explain_what_is_missing(eval_folder, tmp_path):
    from audiotoken_core.evaluation.runner import standard_scorers

    wav2clip = torch.nn.Linear(1, 4)  # only its parameters' device is read before calling it
    scorers = standard_scorers(hf_clip=FakeHFClip(vit_b32=False), wav2clip=wav2clip, missing_hint={"FID": "--inception"})
    na = scorers.unavailable()
    assert set(na) == {"AIS", "FID"} and "ViT-B/32" in na["AIS"] and na["FID"].endswith("(--inception)")
    assert scorers.image_embedder is not None and scorers.label_matcher is not None
    # AIC through CLIP zero-shot over the set's labels ("a photo of <label>")
    results = EvalRunner(load_eval_set(eval_folder), FakeGenerator(), scorers, tmp_path / "out").run()
    assert results.table["audiotoken"]["AIC"] == 100 and results.table["untrained"]["AIC"] == 0
    assert results.table["audiotoken"]["IIS"] == pytest.approx(100) and results.table["audiotoken"]["AIS"] is None
    # a CLIP_VISION-style embedder takes IIS; AIC and AIS then still need the CLIP folder
    only_vision = standard_scorers(image_embedder=quadrants, image_embedder_name="clip vision")
    assert set(only_vision.unavailable()) == {"AIC", "AIS", "FID"}
    assert "text tower" in only_vision.unavailable()["AIC"]
    ok = standard_scorers(hf_clip=FakeHFClip(vit_b32=True), wav2clip=wav2clip)
    assert "AIS" not in ok.unavailable() and ok.names["AIS"].startswith("Wav2CLIP")


def test_runner_scores_given_videos_with_av_align(eval_folder, tmp_path):
    """Videos given to the runner get AV-Align in the results (json and Markdown); the image table is unchanged."""
    from test_av_align import (
        CLICK_FRAMES,
        CLICK_TIMES,
        FPS,
        click_track,
        flash_frames,
        rgb,
        texture,
    )

    from audiotoken_core.evaluation.runner import VideoItem

    clicks = click_track(CLICK_TIMES, 4.0)
    videos = [VideoItem("on the clicks", flash_frames(CLICK_FRAMES), clicks, 16000, FPS),
              VideoItem("every other click", flash_frames(CLICK_FRAMES[::2]), clicks, 16000, FPS),
              VideoItem("still and silent", rgb([texture(16)] * 4), torch.zeros(1, 8000), 16000, FPS)]
    out = tmp_path / "out"
    items = load_eval_set(eval_folder)
    results = EvalRunner(items, FakeGenerator(), full_scorers(), out, videos=videos).run()
    rows = results.av_align["videos"]
    assert [r["name"] for r in rows] == [v.name for v in videos]
    assert rows[0]["score"] == 1.0 and rows[0]["matches"] == 8 and rows[0]["video_peaks"] == 8
    assert rows[1]["score"] == pytest.approx(0.5) and rows[1]["audio_peaks"] == 8 and rows[1]["video_peaks"] == 4
    assert rows[2]["score"] is None and "0 / 0" in rows[2]["error"]
    assert results.av_align["mean"] == pytest.approx(0.75) and results.av_align["scored"] == 2
    assert results.table["audiotoken"]["IIS"] == pytest.approx(100)  # the image metrics as without videos
    md = (out / "results.md").read_text()
    assert "- AV-Align ↑ (audio onsets vs video motion peaks, IoU): 0.750, mean of 2 of 3 videos" in md
    assert "- AV-Align of still and silent: failed, AV-Align is undefined" in md
    assert json.loads((out / "results.json").read_text())["av_align"]["videos"][1]["score"] == pytest.approx(0.5)
    # without videos there is no AV-Align entry
    plain = EvalRunner(items, FakeGenerator(), full_scorers(), out).run()
    assert plain.av_align == {} and "AV-Align" not in plain.markdown()
