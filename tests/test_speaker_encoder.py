"""The GE2E speaker encoder (audiotoken_core/speaker.py) with Resemblyzer 0.1.4's real pretrained.pt.

- Resemblyzer's own computation, recorded once into tests/data/ge2e_resemblyzer_reference.json (the file says how):
  its partial-utterance embeddings of three test sounds, its partial windows, librosa's mel filterbank;
- the LSTM against an explicit numpy computation of its gate equations from the same weights;
- speech from espeak-ng in three voices: utterances of one voice are closer to each other than to any other voice's.

The weights come from scripts/setup_env.sh (`$VENV/assets/resemblyzer/pretrained.pt`, taken from the wheel).
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from audiotoken_core.audio import resample
from audiotoken_core.audio_io import load_audio_file
from audiotoken_core.embedder import Embedder, EmbedderConfig
from audiotoken_core.encoders import AudioEncoderFileError, load_audio_encoder
from audiotoken_core.speaker import (GE2E, SpeakerAudioEncoder, mel_power_spectrogram, normalize_volume,
                                     partial_starts, slaney_mel_filterbank)
from audiotoken_core.token_file import AudioToken

WEIGHTS = Path(sys.prefix) / "assets" / "resemblyzer" / "pretrained.pt"
REFERENCE = json.loads((Path(__file__).resolve().parent / "data" / "ge2e_resemblyzer_reference.json").read_text())


def _missing(what: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: run scripts/setup_env.sh (CI must run the speaker-encoder tests)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def encoder() -> SpeakerAudioEncoder:
    if not WEIGHTS.is_file():
        _missing(f"{WEIGHTS} is missing (scripts/setup_env.sh extracts it from PyPI resemblyzer==0.1.4)")
    return load_audio_encoder(WEIGHTS)


def reference_signal(seconds: float, f0: float, amplitude: float, seed: int) -> np.ndarray:
    """A vowel-like test sound: 20 harmonics of a slowly wobbling f0 under two formant bumps, 4 Hz syllables, a little
    noise (the formula the reference file was made with)."""
    t = np.arange(int(round(seconds * 16000))) / 16000
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))) / 16000
    k = np.arange(1, 21)[:, None]
    weights = np.exp(-((k * f0 - 700) / 300) ** 2) + 0.6 * np.exp(-((k * f0 - 1200) / 400) ** 2) + 0.2 / k
    sig = (weights * np.sin(k * phase)).sum(0) * (0.55 - 0.45 * np.cos(2 * np.pi * 4 * t))
    sig = sig + 0.02 * np.random.default_rng(seed).standard_normal(t.shape)
    return (amplitude * sig / np.abs(sig).max()).astype(np.float32)


def test_mel_filterbank_equals_librosa_slaney():
    ref = REFERENCE["mel_filterbank"]
    expected = np.zeros(ref["shape"])
    for row, col, value in ref["nonzero"]:
        expected[row, col] = value
    ours = slaney_mel_filterbank().numpy()
    assert ours.shape == (40, 201)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-12)


def test_partial_windows_follow_resemblyzer():
    for samples, starts in REFERENCE["partial_mel_starts"].items():
        assert partial_starts(int(samples)) == starts, samples
    assert len(partial_starts(160000)) == 12  # the paper's 10 s window -> 12 speaker vectors


def test_volume_normalisation_raises_quiet_clips_to_minus_30_dbfs_only():
    quiet = torch.from_numpy(reference_signal(1.0, 150.0, 0.003, 3))
    loud = torch.from_numpy(reference_signal(1.0, 150.0, 0.5, 4))
    out = normalize_volume(torch.stack([quiet, loud, torch.zeros_like(quiet)]))
    rms = out.square().mean(-1).sqrt()
    assert abs(20 * np.log10(float(rms[0])) + 30) < 1e-3
    assert torch.equal(out[1], loud) and torch.equal(out[2], torch.zeros_like(quiet))  # never lowered; silence stays


def test_the_file_is_recognised_by_its_keys_and_read_weights_only(encoder):
    assert isinstance(encoder, SpeakerAudioEncoder)
    assert encoder.spec.to_dict() == {"kind": "ge2e", "layers": [1], "hidden_size": 256, "sample_rate": 16000,
                                      "feature_dim": 256}
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)["model_state"]
    ours = encoder.model.state_dict()
    assert set(state) - set(ours) == {"similarity_weight", "similarity_bias"}  # GE2E's loss, training only
    assert all(torch.equal(ours[k], state[k]) for k in ours)
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training


@pytest.mark.parametrize("name", sorted(REFERENCE["signals"]))
def test_partial_embeddings_equal_resemblyzer(encoder, name):
    ref = REFERENCE["signals"][name]
    wave = torch.from_numpy(reference_signal(ref["seconds"], ref["f0"], ref["amplitude"], ref["seed"]))
    with torch.no_grad():
        ours = encoder(wave[None])[0]
    expected = torch.tensor(ref["partials"], dtype=torch.float32)
    assert ours.shape == expected.shape == (len(ref["wav_slices"]), 256)
    diff = float((ours - expected).abs().max())
    assert diff < 2e-5, f"{name}: max |ours - Resemblyzer| = {diff:.2e}"
    utterance = ours.mean(0) / ours.mean(0).norm()  # Resemblyzer's embed_utterance
    assert float((utterance - torch.tensor(ref["embedding"])).abs().max()) < 2e-5


def _numpy_ge2e(state: dict[str, np.ndarray], mels: np.ndarray) -> np.ndarray:
    """The GE2E network written out in float64: 3 LSTM layers (gates input, forget, cell, output), last hidden state,
    Linear, ReLU, L2 norm."""
    def sigmoid(x):
        return 1 / (1 + np.exp(-x))

    x = mels
    for layer in range(3):
        w_ih, w_hh = state[f"lstm.weight_ih_l{layer}"], state[f"lstm.weight_hh_l{layer}"]
        bias = state[f"lstm.bias_ih_l{layer}"] + state[f"lstm.bias_hh_l{layer}"]
        h = np.zeros((x.shape[0], w_hh.shape[1]))
        c = np.zeros_like(h)
        outputs = []
        for t in range(x.shape[1]):
            i, f, g, o = np.split(x[:, t] @ w_ih.T + h @ w_hh.T + bias, 4, axis=1)
            c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
            h = sigmoid(o) * np.tanh(c)
            outputs.append(h)
        x = np.stack(outputs, axis=1)
    raw = np.maximum(h @ state["linear.weight"].T + state["linear.bias"], 0)
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def test_lstm_equals_an_explicit_numpy_computation(encoder):
    state = {k: v.double().numpy() for k, v in encoder.model.state_dict().items()}
    wave = torch.from_numpy(reference_signal(1.6, 130.0, 0.3, 5))
    mels = mel_power_spectrogram(wave[None])[:, :160]
    mels = torch.cat([mels, mels.flip(1) * 0.5])  # two different partials
    with torch.no_grad():
        ours = encoder.model(mels).double().numpy()
    expected = _numpy_ge2e(state, mels.double().numpy())
    assert np.abs(ours - expected).max() < 1e-5


VOICES = {"en-us (male)": ["-v", "en-us"], "en-us+f3 (female)": ["-v", "en-us+f3"],
          "en-us, pitch 99": ["-v", "en-us", "-p", "99"]}
UTTERANCES = [  # two sentences each (about 5 s, 4-5 partials): steadier than one
    "The quick brown fox jumps over the lazy dog near the river bank. Then it runs away into the dark forest.",
    "A sound becomes a word that the picture model understands. Nobody knows how long the journey will take.",
    "Every morning she walks to the station and buys a newspaper. The train is usually late on Mondays.",
    "Please bring the red box from the kitchen before dinner. We will open it together after the meal."]


def test_espeak_voices_same_voice_closer_than_different_voices(encoder, tmp_path):
    """Measured here (espeak-ng 1.51, Debian): same voice min 0.890 mean 0.938, different voices max 0.828
    mean 0.743 (the same text in two voices included)."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("`espeak-ng` is not installed; install it with `apt-get install -y espeak-ng` (CI does)")
    vectors = {}
    for (v, voice), (s, text) in itertools.product(enumerate(VOICES.values()), enumerate(UTTERANCES)):
        path = tmp_path / f"{v}_{s}.wav"
        subprocess.run([espeak, *voice, "-w", str(path), text], check=True)
        wave, rate = load_audio_file(path)
        with torch.no_grad():
            partials = encoder(resample(wave[0].float(), rate, 16000)[None])[0]
        assert partials.shape[0] >= 2
        vectors[v, s] = partials.mean(0) / partials.mean(0).norm()
    same = [float(vectors[a] @ vectors[b]) for a, b in itertools.combinations(vectors, 2) if a[0] == b[0]]
    different = [float(vectors[a] @ vectors[b]) for a, b in itertools.combinations(vectors, 2) if a[0] != b[0]]
    print(f"same voice: min {min(same):.3f} mean {np.mean(same):.3f}; "
          f"different voices: max {max(different):.3f} mean {np.mean(different):.3f}")
    assert min(same) > max(different) + 0.04
    assert np.mean(same) > np.mean(different) + 0.15
    for key, vector in vectors.items():  # each utterance is nearest to the centroid of its own voice's other utterances
        centroids = {v: torch.stack([vectors[v, s] for s in range(len(UTTERANCES)) if (v, s) != key]).mean(0)
                     for v in range(len(VOICES))}
        assert max(centroids, key=lambda v: float(vector @ centroids[v])) == key[0], key


def test_a_token_reads_the_speaker_features(encoder):
    """A token made for kind ge2e reads the [B, N, 256] sequence; a BEATs token is refused with the usual message."""
    torch.manual_seed(0)
    token = AudioToken(embedders={"l": Embedder(EmbedderConfig(input_dim=256, output_dim=768))},
                       encoder=encoder.spec.to_dict())
    encoder.spec.check_token(token.encoder, "AudioToken 'voices'")
    with pytest.raises(ValueError, match="was trained on beats layers"):
        encoder.spec.check_token({"kind": "beats", "layers": [4, 8, 12], "hidden_size": 768}, "AudioToken 'dog'")
    wave = torch.from_numpy(reference_signal(10.0, 120.0, 0.3, 6))
    with torch.no_grad():
        features = encoder(torch.stack([wave, wave.flip(0)]))
    assert features.shape == (2, 12, 256)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2, 12), atol=1e-5)
    vectors = token.eval().embed(features).vectors["l"]
    assert vectors.shape == (2, 768) and torch.isfinite(vectors).all()


def test_a_token_trains_on_speaker_features_and_the_encoder_stays_frozen(encoder, tmp_path):
    """The trainer's generic path (tests/test_trainer.py's toy diffusion backend) with the real speaker encoder: 5 s
    windows give 5 speaker vectors each, only the Embedder moves, the checkpoint names kind ge2e."""
    from test_trainer import ToyBackend, cfg, train, weights

    from audiotoken_core.training import new_audiotoken

    token = new_audiotoken({"l": 8}, encoder.spec, seed=0)
    before, encoder_before = weights(token), {k: v.clone() for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    waves = [torch.from_numpy(reference_signal(5.0, f0, 0.3, i)) for i, f0 in enumerate((110.0, 220.0))]
    with torch.no_grad():
        assert encoder(torch.stack(waves)).shape == (2, 5, 256)
    data = [{"wave16": torch.stack(waves), "images": torch.rand(2, 3, 16, 16, generator=g)} for _ in range(2)]
    _, summary = train(cfg(steps=2), data, tmp_path, token=token, encoder=encoder, backend=ToyBackend())
    assert summary.status == "completed" and summary.step == 2
    after = weights(token)
    assert all(not torch.equal(before[k], after[k]) for k in before if not k.endswith("feature_reduce.bias"))
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert token.encoder["kind"] == "ge2e" and token.encoder["layers"] == [1]


def test_layers_and_broken_files_are_refused_with_a_message(encoder, tmp_path):
    with pytest.raises(ValueError, match="set layers to 1 or auto"):
        load_audio_encoder(WEIGHTS, layers=(4, 8, 12))
    assert load_audio_encoder(WEIGHTS, layers=(1,)).spec.layers == (1,)

    torch.manual_seed(0)
    bare = tmp_path / "ge2e_state.pt"  # a bare GE2E state dict (torch.save(model.state_dict())) is recognised too
    torch.save(GE2E().state_dict(), bare)
    assert load_audio_encoder(bare).spec.kind == "ge2e"

    state = dict(encoder.model.state_dict())
    del state["linear.bias"]
    broken = tmp_path / "ge2e_broken.pt"
    torch.save({"model_state": state}, broken)
    with pytest.raises(AudioEncoderFileError, match="looks like a GE2E speaker encoder .* Missing key"):
        load_audio_encoder(broken)
    state = GE2E().state_dict()
    state["lstm.weight_ih_l0"] = torch.zeros(1024, 80)
    torch.save({"model_state": state}, broken)
    with pytest.raises(AudioEncoderFileError, match="reads 80 mel bands; this encoder computes 40"):
        load_audio_encoder(broken)
