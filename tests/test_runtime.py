"""nodes/runtime.py: the windows Embed Windows embeds are the ones the preview shows
(tests/data/window_table.json, which the frontend is held to in tests/test_browser_preview.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.comfy_root import import_comfy, import_pack

import_comfy(cpu=True)
import_pack()
from audiotoken.nodes.runtime import LoadedAudioToken  # noqa: E402

RATE = 16000
TABLE = json.loads((Path(__file__).parent / "data" / "window_table.json").read_text())["cases"]
# Recordings that are a whole number of samples at 16 kHz, with few enough windows to embed.
CASES = [c for c in TABLE if round(c["duration"] * RATE) / RATE == c["duration"] and c["count"] <= 64
         and c["window"] <= 10]


class _Windows:
    """Stands in for a loaded token: `_embed` returns the 16 kHz windows it is given."""

    name = "windows"

    def _embed(self, wave16, source):
        return wave16


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['duration']}s/{c['window']}s/{c['hop']}s")
def test_embed_windows_embeds_the_windows_of_the_table(case):
    samples = round(case["duration"] * RATE)
    ramp = torch.arange(samples, dtype=torch.float32)[None, None] / samples
    wave16, starts = LoadedAudioToken.embed_windows(
        _Windows(), {"waveform": ramp, "sample_rate": RATE}, window_seconds=case["window"],
        hop_seconds=case["hop"], max_windows=64, channel_policy="mix")
    assert len(starts) == case["count"] and wave16.shape == (case["count"], round(case["window"] * RATE))
    for i, start in enumerate(starts):
        assert start == pytest.approx(i * case["hop"])
        first = round(start * RATE)
        assert wave16[i, 0] == ramp[0, 0, first % samples]  # each row is its own window of the recording


def test_too_many_windows_is_refused_with_the_fix():
    audio = {"waveform": torch.zeros(1, 1, 36800), "sample_rate": RATE}  # 2.3 s: 4 windows of 0.5 s every 0.6 s
    with pytest.raises(ValueError, match="4 windows .* more than max_windows=3. Raise max_windows or the hop"):
        LoadedAudioToken.embed_windows(_Windows(), audio, window_seconds=0.5, hop_seconds=0.6, max_windows=3,
                                       channel_policy="mix")
