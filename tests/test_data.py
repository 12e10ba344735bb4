"""audiotoken_core.data: example lists, the training Dataset and the encoder-output caches.

All media are made here: WAVs with numpy/PyAV, PNG/JPEG with Pillow, and short videos with
PyAV whose frame colour encodes the frame number and whose tone changes every second, so a
test can tell which frame was picked and which second of audio a window holds.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from audiotoken_core.audio import prepare_waveform
from audiotoken_core.audio_io import load_audio_file
from audiotoken_core.data import (
    AudioImageDataset,
    CachedFeatures,
    DatasetSourceError,
    FeatureCache,
    PairItem,
    Problem,
    VideoFrame,
    collate,
    pairs_from_folder,
    pairs_from_videos,
    pairs_from_vggsound_csv,
)

SIZE = (64, 48)  # small (width, height) for speed; the default 512x320 is tested once
FPS = 10
TONES = tuple(500.0 + 700.0 * k for k in range(10))  # Hz of second 0, 1, 2, ... of a test clip


# ----------------------------------------------------------------------------- media makers


def tone_seconds(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    """[channels, samples] float32: second k of the clip is a sine at TONES[k]."""
    t = np.arange(round(seconds * rate)) / rate
    freq = np.asarray(TONES)[np.minimum(t.astype(int), len(TONES) - 1)]
    phase = 2 * np.pi * np.cumsum(freq) / rate
    wave = (0.5 * np.sin(phase)).astype(np.float32)
    return np.repeat(wave[None], channels, axis=0)


def write_wav(path: Path, wave: np.ndarray, rate: int) -> Path:
    """Write float [channels, samples] as 16-bit PCM WAV through PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pcm = np.clip(np.round(wave * 32767), -32768, 32767).astype(np.int16)
    with av.open(str(path), "w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=rate, layout="mono" if wave.shape[0] == 1 else "stereo")
        frame = av.AudioFrame.from_ndarray(pcm.T.reshape(1, -1).copy(), format="s16", layout=stream.layout.name)
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_image(path: Path, color=(200, 30, 30), size=(80, 60)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def frame_color(i: int) -> tuple[int, int, int]:
    return (16 + 22 * (i % 10), 16 + 22 * (i // 10), 60)


def frame_number(image: torch.Tensor) -> int:
    """Invert frame_color from a decoded [3, H, W] image (tolerates codec error of a few levels)."""
    red, green = (float(image[c].mean()) * 255 for c in (0, 1))
    return round((red - 16) / 22) + 10 * round((green - 16) / 22)


def write_video(path: Path, seconds: float = 3.0, audio: str | None = "aac", rate: int = 16000,
                container_format: str | None = None) -> Path:
    """`seconds` of video at FPS with frame i in frame_color(i), and a tone_seconds audio track."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format=container_format) as out:
        video = out.add_stream("mpeg4", rate=FPS)
        video.width, video.height, video.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        video.options = {"qscale": "2"}
        sound = out.add_stream(audio, rate=rate, layout="mono") if audio else None
        for i in range(round(seconds * FPS)):
            pixels = np.empty((SIZE[1], SIZE[0], 3), np.uint8)
            pixels[:] = frame_color(i)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = i
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None:
            wave = tone_seconds(seconds, rate)[0]
            fmt = "fltp" if audio == "aac" else "s16"
            data = wave if fmt == "fltp" else np.round(wave * 32767).astype(np.int16)
            step = 1024
            for offset in range(0, data.size, step):
                chunk = data[offset:offset + step][None].copy()
                frame = av.AudioFrame.from_ndarray(chunk, format=fmt, layout="mono")
                frame.sample_rate, frame.pts = rate, offset
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def dominant_hz(wave: torch.Tensor, rate: int = 16000) -> float:
    spectrum = np.abs(np.fft.rfft(wave.numpy() * np.hanning(wave.numel())))
    return float(np.fft.rfftfreq(wave.numel(), 1 / rate)[spectrum.argmax()])


def second_of(wave16: torch.Tensor, offset: float = 0.1) -> int:
    """Which TONES second a window's audio at `offset` s holds (measured over 0.2 s)."""
    part = wave16[int(offset * 16000):int((offset + 0.2) * 16000)]
    hz = dominant_hz(part)
    return int(np.argmin([abs(hz - f) for f in TONES]))


# ----------------------------------------------------------------------------- (a) folder of pairs


@pytest.fixture
def pair_folder(tmp_path) -> Path:
    root = tmp_path / "pairs"
    write_wav(root / "dog" / "a.wav", tone_seconds(3.0, 44100, channels=2), 44100)
    write_image(root / "dog" / "a.png", (250, 0, 0))
    write_wav(root / "cat" / "b.wav", tone_seconds(12.0, 16000), 16000)
    write_image(root / "cat" / "b.jpg", (0, 250, 0), size=(100, 40))
    write_wav(root / "cat" / "lonely.wav", tone_seconds(1.0, 16000), 16000)  # no image
    write_image(root / "cat" / "orphan.webp", (0, 0, 250))  # no audio
    write_wav(root / "audio" / "x.wav", tone_seconds(2.0, 22050), 22050)  # unique stem across folders
    write_image(root / "images" / "x.jpeg", (10, 10, 10))
    write_wav(root / "c.wav", tone_seconds(5.0, 16000), 16000)  # at the root: no folder label
    write_image(root / "c.png", (90, 90, 90))
    (root / "notes.txt").write_text("not media")
    return root


def test_pairs_from_folder_matches_stems_and_uses_folder_labels(pair_folder):
    pairs = pairs_from_folder(pair_folder)
    got = {p.item_id: (p.audio.name, p.image.name, p.label) for p in pairs}
    assert got == {
        "audio/x": ("x.wav", "x.jpeg", "audio"),
        "c": ("c.wav", "c.png", ""),
        "cat/b": ("b.wav", "b.jpg", "cat"),
        "dog/a": ("a.wav", "a.png", "dog"),
    }
    assert sorted(Path(p.file).name for p in pairs.problems) == ["lonely.wav", "orphan.webp"]
    assert all("stem" in p.reason for p in pairs.problems)


@pytest.mark.parametrize("header", ["file,label\n", "stem,label\n", ""])
def test_pairs_from_folder_labels_from_csv(pair_folder, tmp_path, header):
    csv_path = tmp_path / "labels.csv"
    rows = ["dog/a.wav,barking dog", "b,\"cat, meowing\"", "x.jpeg,tone"] if header != "stem,label\n" else \
        ["a,barking dog", "b,\"cat, meowing\"", "x,tone"]
    csv_path.write_text(header + "\n".join(rows) + "\n")
    labels = {p.item_id: p.label for p in pairs_from_folder(pair_folder, labels_csv=csv_path)}
    assert labels == {"dog/a": "barking dog", "cat/b": "cat, meowing", "audio/x": "tone", "c": ""}


def test_pairs_from_folder_errors_name_the_fix(tmp_path):
    with pytest.raises(DatasetSourceError, match="folder not found"):
        pairs_from_folder(tmp_path / "nope")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,label\na,b\n")
    (tmp_path / "d").mkdir()
    with pytest.raises(DatasetSourceError, match="'file'"):
        pairs_from_folder(tmp_path / "d", labels_csv=bad)


def test_dataset_windows_images_and_batches(pair_folder):
    dataset = AudioImageDataset(pairs_from_folder(pair_folder), seed=3)  # default (512, 320)
    loader = DataLoader(dataset, batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert [b["wave16"].shape for b in batches] == [torch.Size([2, 80000])] * 2
    batch = batches[0]
    assert batch["images"].shape == (2, 3, 320, 512) and batch["images"].dtype == torch.float32
    assert 0.0 <= float(batch["images"].min()) and float(batch["images"].max()) <= 1.0
    assert batch["wave16"].dtype == torch.float32
    assert batch["label"] == ["audio", ""] and batch["id"] == ["audio/x", "c"]
    assert batch["window_start"].dtype == torch.long
    # the dog image is solid red, fitted without distortion
    dog = dataset[[p.item_id for p in dataset.items].index("dog/a")]["image"]
    assert torch.allclose(dog[:, 10, 10], torch.tensor([250, 0, 0]) / 255.0, atol=2 / 255)
    # problems from building the list are carried over
    assert len(dataset.problems) == 2


def test_window_start_is_a_random_whole_second_and_reproducible(tmp_path):
    path = write_wav(tmp_path / "t" / "tone.wav", tone_seconds(10.0, 16000), 16000)
    write_image(tmp_path / "t" / "tone.png")
    items = pairs_from_folder(tmp_path / "t") * 6
    dataset = AudioImageDataset(items, image_size=SIZE, seed=11)
    source, rate = load_audio_file(path)
    starts = {}
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            sample = dataset[index]
            start = sample["window_start"]
            assert isinstance(start, int) and 0 <= start <= 4
            assert sample["wave16"].shape == (80000,)
            # the window is the clip from `start` (16 kHz source: sample-exact)
            assert torch.allclose(sample["wave16"], source[0, start * 16000:(start + 5) * 16000], atol=1e-6)
            assert second_of(sample["wave16"]) == start
            starts[epoch, index] = start
    assert set(starts.values()) == {0, 1, 2, 3, 4}
    again = AudioImageDataset(items, image_size=SIZE, seed=11)
    for (epoch, index), start in starts.items():
        again.set_epoch(epoch)
        assert again[index]["window_start"] == start
    other = AudioImageDataset(items, image_size=SIZE, seed=12)
    assert [other[i]["window_start"] for i in range(len(items))] != [starts[0, i] for i in range(len(items))]
    assert [starts[0, i] for i in range(6)] != [starts[1, i] for i in range(6)]
    evaluation = AudioImageDataset(items, image_size=SIZE, train=False, window_seconds=10.0)
    assert evaluation[0]["window_start"] == 0 and evaluation[0]["wave16"].shape == (160000,)


def test_short_clip_is_tiled_to_ten_seconds_before_the_window(tmp_path):
    path = write_wav(tmp_path / "s" / "short.wav", tone_seconds(3.0, 44100), 44100)
    write_image(tmp_path / "s" / "short.png")
    dataset = AudioImageDataset(pairs_from_folder(tmp_path / "s") * 8, image_size=SIZE, seed=0)
    source, rate = load_audio_file(path)
    tiled = prepare_waveform(source, rate, window_seconds=10.0)[0]  # the reference's 10 s tiling
    seen = set()
    for index in range(len(dataset)):
        sample = dataset[index]
        start = sample["window_start"]
        seen.add(start)
        assert torch.allclose(sample["wave16"], tiled[start * 16000:(start + 5) * 16000], atol=2e-3)
        assert second_of(sample["wave16"]) == start % 3
    assert len(seen) > 1


def test_bad_items_are_skipped_and_reported(tmp_path):
    root = tmp_path / "bad"
    write_wav(root / "ok" / "good.wav", tone_seconds(2.0, 16000), 16000)
    write_image(root / "ok" / "good.png")
    write_wav(root / "ok" / "tiny.wav", tone_seconds(0.1, 16000), 16000)  # too short
    write_image(root / "ok" / "tiny.png")
    write_wav(root / "ok" / "broken.wav", tone_seconds(2.0, 16000), 16000)
    (root / "ok" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")  # unreadable image
    write_wav(root / "ok" / "cut.wav", tone_seconds(2.0, 16000), 16000)
    write_image(root / "ok" / "cut.jpg", size=(300, 300))
    data = (root / "ok" / "cut.jpg").read_bytes()
    (root / "ok" / "cut.jpg").write_bytes(data[: len(data) // 3])  # truncated image
    (root / "ok" / "noise.wav").write_bytes(b"RIFF....WAVEgarbage")  # unreadable audio
    write_image(root / "ok" / "noise.png")
    dataset = AudioImageDataset(pairs_from_folder(root), image_size=SIZE)
    assert len(dataset) == 5
    samples = [dataset[i] for i in range(len(dataset))]
    assert all(s["id"] == "ok/good" for s in samples)  # every bad one replaced by the good one
    reasons = {Path(p.file).name: p.reason for p in dataset.problems}
    assert set(reasons) == {"tiny.wav", "broken.png", "cut.jpg", "noise.wav"}
    assert "shorter than the 0.2 s minimum" in reasons["tiny.wav"]
    assert "re-save it" in reasons["broken.png"]
    batch = collate(samples)
    assert {Path(p.file).name for p in batch["problems"]} == set(reasons)
    assert dataset.note_problems(batch["problems"]) == []  # already known
    # DataLoader workers report through the batches; the main process merges them
    main = AudioImageDataset(pairs_from_folder(root), image_size=SIZE)
    loader = DataLoader(main, batch_size=2, num_workers=2, collate_fn=collate)
    ids = []
    for batch in loader:
        main.note_problems(batch["problems"])
        ids += batch["id"]
    assert ids == ["ok/good"] * 5 and {Path(p.file).name for p in main.problems} == set(reasons)
    # scan() drops them up front
    fresh = AudioImageDataset(pairs_from_folder(root), image_size=SIZE)
    assert {Path(p.file).name for p in fresh.scan(threads=2)} == set(reasons)
    assert [item.item_id for item in fresh.items] == ["ok/good"]
    # nothing usable at all: one clear error
    only_bad = AudioImageDataset([i for i in pairs_from_folder(root) if i.item_id != "ok/good"], image_size=SIZE)
    with pytest.raises(DatasetSourceError, match="none of the 4 examples"):
        only_bad[0]


def test_image_size_must_suit_the_vae():
    with pytest.raises(DatasetSourceError, match="multiples of 8"):
        AudioImageDataset([], image_size=(500, 320))


# ----------------------------------------------------------------------------- (b) videos


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "beep" / "clip.mp4")
    write_video(root / "beep" / "pcm.mkv", audio="pcm_s16le", rate=22050, container_format="matroska")
    write_video(root / "long" / "ten.mp4", seconds=10.0)
    write_video(root / "silent" / "mute.mp4", audio=None)
    write_video(root / "silent" / "full.mp4")
    data = (root / "silent" / "full.mp4").read_bytes()
    (root / "silent" / "full.mp4").unlink()
    (root / "silent" / "cut.mp4").write_bytes(data[: len(data) // 3])  # truncated
    return root


def decoded_seconds(path: Path) -> float:
    """The audio track's decoded length (AAC adds a few ms of padding; the clip tiles with this period)."""
    wave, rate = load_audio_file(path)
    return wave.shape[-1] / rate


def _check_middle(sample, path):
    start, period = sample["window_start"], decoded_seconds(path)
    expected = math.fmod(start + 2.5, period)  # the middle of the window in the (tiled) clip
    assert sample["frame_seconds"] == pytest.approx(expected)
    assert frame_number(sample["image"]) == math.floor(expected * FPS + 1e-6)  # the frame on screen then
    assert second_of(sample["wave16"]) == start % round(period)  # audio and frame from the same window


def test_video_middle_frame_is_inside_the_window(videos):
    pairs = pairs_from_videos(videos)
    assert [(p.item_id, p.label) for p in pairs] == [
        ("beep/clip", "beep"), ("beep/pcm", "beep"), ("long/ten", "long"), ("silent/cut", "silent"),
        ("silent/mute", "silent")]
    assert all(isinstance(p.image, VideoFrame) and p.image.mode == "middle" for p in pairs)
    dataset = AudioImageDataset(pairs, image_size=SIZE, seed=5)
    seen = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in (0, 1, 2):
            sample = dataset[index]
            assert sample["id"] == pairs[index].item_id
            assert sample["wave16"].shape == (80000,) and sample["image"].shape == (3, 48, 64)
            _check_middle(sample, pairs[index].audio)
            seen.add(sample["window_start"])
    assert len(seen) > 1
    for index in (3, 4):  # truncated and mute videos are replaced by the next good one
        assert dataset[index]["id"] == "beep/clip"
    reasons = {Path(p.file).name: p.reason for p in dataset.problems}
    assert set(reasons) == {"cut.mp4", "mute.mp4"}
    assert "no audio stream" in reasons["mute.mp4"]


def test_video_random_frame_is_inside_the_window_and_reproducible(videos):
    pairs = [p for p in pairs_from_videos(videos, frame="random") if p.item_id == "long/ten"] * 12
    dataset = AudioImageDataset(pairs, image_size=SIZE, seed=1)
    times = []
    for index in range(len(dataset)):
        sample = dataset[index]
        start, at = sample["window_start"], sample["frame_seconds"]
        assert start <= at < start + 5  # a 10 s clip: no tiling, the window is [start, start + 5)
        assert frame_number(sample["image"]) == math.floor(at * FPS + 1e-6)  # the frame on screen then
        assert second_of(sample["wave16"]) == start
        times.append(at)
    assert len({round(t, 3) for t in times}) == len(times)  # really random
    again = AudioImageDataset(pairs, image_size=SIZE, seed=1)
    assert [again[i]["frame_seconds"] for i in range(len(pairs))] == times
    again.set_epoch(1)
    assert [again[i]["frame_seconds"] for i in range(len(pairs))] != times


def test_video_clip_scorer_picks_the_best_frame_in_the_window(videos):
    calls = []

    def scorer(frames, label):
        numbers = [frame_number(torch.from_numpy(np.array(f)).permute(2, 0, 1).float() / 255) for f in frames]
        calls.append((numbers, label, [f.size for f in frames]))
        return [-abs(n - 13) for n in numbers]  # prefer frame 13

    pairs = [p for p in pairs_from_videos(videos, clip_scorer=scorer, candidates=5) if p.item_id == "beep/clip"]
    assert pairs[0].image.mode == "clip"
    dataset = AudioImageDataset(pairs * 5, image_size=SIZE, seed=2)
    for index in range(len(dataset)):
        sample = dataset[index]
        numbers, label, sizes = calls[-1]
        start = sample["window_start"]
        period = decoded_seconds(pairs[0].audio)
        expected = [math.floor(math.fmod(start + 5 * (k + 0.5) / 5, period) * FPS + 1e-6) for k in range(5)]
        assert numbers == expected  # five candidates spread over the window
        assert label == "beep" and sizes == [SIZE] * 5
        assert frame_number(sample["image"]) == max(numbers, key=lambda n: -abs(n - 13))
    with pytest.raises(DatasetSourceError, match="needs clip_scorer"):
        pairs_from_videos(videos, frame="clip")
    with pytest.raises(DatasetSourceError, match="only used with frame='clip'"):
        pairs_from_videos(videos, frame="middle", clip_scorer=scorer)


# ----------------------------------------------------------------------------- (c) VGGSound CSV


def test_vggsound_csv(videos, tmp_path):
    media = tmp_path / "vgg"
    (media / "train").mkdir(parents=True)
    os.link(videos / "beep" / "clip.mp4", media / "train" / "abc-DEF_12_000030.mp4")  # a cut 10 s clip
    long = write_video(media / "test" / "fullvid.mp4", seconds=6.0)  # a full video, clip from 2 s
    rows = [
        'abc-DEF_12,30,"dog barking, growling",train',
        "fullvid,2,playing drums,test",
        "gone,40,cat purring,train",
        "fullvid,2,playing drums,test",  # duplicate row: one example
    ]
    official = tmp_path / "vggsound.csv"
    official.write_text("\n".join(rows) + "\n")
    train = pairs_from_vggsound_csv(official, media)
    assert [(p.item_id, p.label, p.clip_start) for p in train] == [("abc-DEF_12_000030", "dog barking, growling", 0.0)]
    assert [Path(p.file).name for p in train.problems] == ["gone_000040.mp4"]
    with_header = tmp_path / "header.csv"
    with_header.write_text("ytid,start,label,split\n" + "\n".join(rows).replace('"', "") + "\n")  # unquoted commas
    everything = pairs_from_vggsound_csv(with_header, media, split=None)
    assert [(p.item_id, p.label, p.clip_start, p.audio.name) for p in everything] == [
        ("abc-DEF_12_000030", "dog barking, growling", 0.0, "abc-DEF_12_000030.mp4"),
        ("fullvid_000002", "playing drums", 2.0, "fullvid.mp4"),
    ]
    # the full video's clip is [2, 6) s: audio and frame come from there
    dataset = AudioImageDataset(everything[1:], image_size=SIZE, seed=4)
    period = decoded_seconds(long) - 2.0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        sample = dataset[0]
        start = sample["window_start"]
        clip_time = math.fmod(start + 2.5, period)
        assert sample["frame_seconds"] == pytest.approx(2.0 + clip_time)
        assert frame_number(sample["image"]) == math.floor((2.0 + clip_time) * FPS + 1e-6)
        assert second_of(sample["wave16"]) == 2 + start % 4
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n")
    with pytest.raises(DatasetSourceError, match="row 1"):
        pairs_from_vggsound_csv(bad, media)


# ----------------------------------------------------------------------------- caches


def test_feature_cache_round_trip_and_misses(tmp_path):
    source = tmp_path / "a.bin"
    source.write_bytes(b"first")
    settings = {"encoder": {"kind": "beats", "layers": [4, 8, 12]}, "vae": "sd15"}
    cache = FeatureCache(tmp_path / "cache", settings)
    keys = [cache.item_key([source], start=s) for s in range(3)]
    assert len(set(keys)) == 3 and cache.get(keys[0]) is None and keys[0] not in cache
    tensors = [{"features": torch.randn(4, 6), "n": torch.tensor([s])} for s in range(3)]
    base = torch.randn(3, 4, 6)
    tensors[2]["features"] = base[2]  # a row of a batch is stored on its own
    for key, t in zip(keys, tensors):
        cache.put(key, t)
    cache.flush()
    files = sorted(cache.dir.rglob("*.safetensors"))
    assert files == sorted(cache.path(k) for k in keys) and all(f.parent.name == f.stem[:2] for f in files)
    assert not [p for p in cache.dir.rglob("*") if p.is_file() and p.name.startswith(".")]  # no temp files left
    reopened = FeatureCache(tmp_path / "cache", settings)
    for key, t in zip(keys, tensors):
        got = reopened.get(key)
        assert key in reopened and set(got) == set(t) and all(torch.equal(got[n], t[n]) for n in t)
    assert torch.equal(load_file(str(reopened.path(keys[2])))["features"], base[2])
    assert json.loads((tmp_path / "cache" / "file_hashes.json").read_text())[str(source.resolve())][0] == 5
    # changed content -> another key; changed settings -> another folder (miss)
    source.write_bytes(b"second, longer")
    assert reopened.item_key([source], start=0) not in keys
    other = FeatureCache(tmp_path / "cache", {**settings, "vae": "sdxl"})
    assert other.dir != reopened.dir and other.get(keys[0]) is None
    half = FeatureCache(tmp_path / "cache", settings, store_dtype=torch.float16)
    half.put("k0", {"x": torch.ones(2)})
    assert FeatureCache(tmp_path / "cache", settings).get("k0")["x"].dtype == torch.float16


def test_feature_cache_rebuilds_truncated_and_corrupt_entries(tmp_path):
    """A cut or damaged entry file is a miss: deleted, computed again by the next precompute, never fatal."""
    cache = FeatureCache(tmp_path / "cache", {"encoder": "x"})
    for key in ("aa1", "bb2", "cc3"):
        cache.put(key, {"features": torch.full((64, 8), 2.0)})
    whole = cache.path("aa1").read_bytes()
    cache.path("aa1").write_bytes(whole[:-10])  # truncated data
    cache.path("bb2").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")  # damaged header
    reopened = FeatureCache(tmp_path / "cache", {"encoder": "x"})
    assert "aa1" not in reopened and not reopened.path("aa1").exists()
    assert reopened.get("bb2") is None and not reopened.path("bb2").exists()
    assert "cc3" in reopened and torch.equal(reopened.get("cc3")["features"], torch.full((64, 8), 2.0))


def test_cached_features_recompute_a_damaged_entry(tmp_path):
    root = tmp_path / "pairs"
    for name, seconds, color in (("one", 6.0, (250, 0, 0)), ("two", 7.0, (0, 250, 0))):
        write_wav(root / "k" / f"{name}.wav", tone_seconds(seconds, 16000), 16000)
        write_image(root / "k" / f"{name}.png", color)
    items = pairs_from_folder(root)

    def build():
        encoders = CountingEncoders()
        cached = CachedFeatures(AudioImageDataset(items, image_size=SIZE), encoders.audio, encoders.image,
                                FeatureCache(tmp_path / "cache", {"encoder": "counting"}), batch_size=4)
        return encoders, cached

    _, cached = build()
    assert cached.precompute() == 2 * 5 + 2
    victim = sorted(cached.cache.dir.rglob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:100])  # e.g. the disk filled up while an older version wrote it
    encoders, cached = build()
    assert cached.precompute() == 1 and encoders.audio_calls + encoders.image_calls == 1
    for epoch in range(3):  # every window start and image of both items reads back
        cached.set_epoch(epoch)
        assert [cached[i]["id"] for i in range(len(cached))] == ["k/one", "k/two"]
    assert len(list(cached.cache.dir.rglob("*.safetensors"))) == 12


class CountingEncoders:
    def __init__(self):
        self.audio_calls = self.image_calls = 0

    def audio(self, wave16):
        self.audio_calls += 1
        assert wave16.ndim == 2 and wave16.shape[1] == 80000
        frames = wave16.reshape(wave16.shape[0], 10, -1)
        return torch.stack([frames.mean(-1), frames.std(-1)], dim=-1)  # [B, 10, 2]

    def image(self, images):
        self.image_calls += 1
        assert images.ndim == 4 and images.shape[1:] == (3, SIZE[1], SIZE[0])
        return torch.nn.functional.avg_pool2d(images, 8)[:, :, :, :]  # [B, 3, h, w]


def test_cached_features_skip_the_encoders_on_later_passes(tmp_path, videos):
    root = tmp_path / "pairs"
    for name, color, seconds in (("one", (250, 0, 0), 6.0), ("two", (0, 250, 0), 7.0)):
        write_wav(root / "k" / f"{name}.wav", tone_seconds(seconds, 16000), 16000)
        write_image(root / "k" / f"{name}.png", color)
    write_wav(root / "k" / "tiny.wav", tone_seconds(0.05, 16000), 16000)
    write_image(root / "k" / "tiny.png")
    items = list(pairs_from_folder(root)) + [p for p in pairs_from_videos(videos) if p.item_id == "beep/clip"]
    settings = {"encoder": "counting", "vae": "pool8"}

    def build(cache_settings=settings):
        encoders = CountingEncoders()
        dataset = AudioImageDataset(items, image_size=SIZE, seed=9)
        cached = CachedFeatures(dataset, encoders.audio, encoders.image,
                                FeatureCache(tmp_path / "cache", cache_settings), batch_size=4)
        return encoders, dataset, cached

    encoders, dataset, cached = build()
    assert cached.precompute() == 3 * 5 + 2 + 5  # 5 windows per clip, 2 stills, 5 video frames
    assert (encoders.audio_calls, encoders.image_calls) == (4, 2)
    assert len(cached) == 3 and [Path(p.file).name for p in dataset.problems] == ["tiny.wav"]
    loader = DataLoader(cached, batch_size=3, collate_fn=collate)
    first = next(iter(loader))
    assert first["features"].shape == (3, 10, 2) and first["latents"].shape == (3, 3, 6, 8)
    assert "wave16" not in first and "images" not in first
    # each sample equals encoding the uncached sample of the same epoch
    for epoch in range(2):
        cached.set_epoch(epoch)
        for position, index in enumerate((0, 2, 3)):
            sample, raw = cached[position], dataset[index]
            assert sample["id"] == raw["id"] and sample["window_start"] == raw["window_start"]
            assert torch.allclose(sample["features"], CountingEncoders().audio(raw["wave16"][None])[0], atol=1e-6)
            assert torch.allclose(sample["latents"], CountingEncoders().image(raw["image"][None])[0], atol=1e-6)

    # a later run: everything from disk, no encoder call
    encoders, dataset, cached = build()
    assert cached.precompute() == 0
    assert (encoders.audio_calls, encoders.image_calls) == (0, 0)
    assert torch.equal(cached[0]["features"], first["features"][0])

    # one file changes: only its entries are recomputed
    write_image(root / "k" / "two.png", (0, 0, 250), size=(90, 60))
    encoders, dataset, cached = build()
    assert cached.precompute() == 1 and encoders.image_calls == 1 and encoders.audio_calls == 0
    assert cached[1]["latents"][2].mean() > 0.9  # now blue

    # other settings: a full miss
    encoders, dataset, cached = build({**settings, "vae": "other"})
    assert cached.precompute() == 22 and encoders.audio_calls > 0


def test_pair_item_source_files():
    still = PairItem(audio="a.wav", image="a.png", label="x", item_id="a")
    video = PairItem(audio="v.mp4", image=VideoFrame("v.mp4"), label="x", item_id="v")
    assert still.source_files == (Path("a.wav"), Path("a.png")) and video.source_files == (Path("v.mp4"),)
    assert str(Problem("f.wav", "bad")) == "f.wav: bad"
