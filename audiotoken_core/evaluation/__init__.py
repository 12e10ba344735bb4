"""Evaluation of AudioTokens with the paper's metrics (AIS, IIS, AIC, FID); plain torch.

`metrics` holds the metric definitions and the protocol; `inception` the FID feature
model (a local TorchScript file), `wav2clip` our port of the Wav2CLIP audio encoder (for
AIS), `clip_models` a local transformers CLIP (image and text embeddings). Model files are
always local; nothing is downloaded. `eval_set` reads an evaluation set, `runner` generates
and scores it for AudioToken, the text-label topline and the untrained floor (resumable),
`contact_sheet` draws spectrogram | generated | reference rows, `av_align` scores how a video's
motion follows its sound (TempoTokens' AV-Align). See docs/evaluation.md.
"""
from .av_align import AVAlignError, AVAlignResult, av_align, frame_motion, optical_flow, peak_iou
from .clip_models import HFClip, load_hf_clip
from .contact_sheet import contact_sheet, eval_contact_sheet
from .eval_set import EvalItem, EvalSet, EvalSetError, load_eval_set
from .inception import FID_INCEPTION_SHA1, FidInception, find_fid_inception_file, load_fid_inception
from .metrics import (
    AIC_THRESHOLD, MetricInputError, activation_statistics, arbitrary_indices, audio_image_score,
    frechet_distance, frechet_distance_from_statistics, image_image_score, label_agreement, zero_shot_labels,
)
from .runner import (
    SYSTEMS, EvalProtocol, EvalResults, EvalRunner, Scorers, SettingsChangedError, VideoItem, score_videos,
    standard_scorers, zero_shot_classifier,
)
from .wav2clip import SAMPLE_RATE, Wav2CLIP, Wav2CLIPCheckpointError, Wav2CLIPConfig, load_wav2clip

__all__ = [
    "AIC_THRESHOLD", "MetricInputError", "activation_statistics", "arbitrary_indices", "audio_image_score",
    "frechet_distance", "frechet_distance_from_statistics", "image_image_score", "label_agreement",
    "zero_shot_labels", "FID_INCEPTION_SHA1", "FidInception", "find_fid_inception_file", "load_fid_inception",
    "SAMPLE_RATE", "Wav2CLIP", "Wav2CLIPCheckpointError", "Wav2CLIPConfig", "load_wav2clip",
    "HFClip", "load_hf_clip", "contact_sheet", "eval_contact_sheet", "EvalItem", "EvalSet", "EvalSetError",
    "load_eval_set", "SYSTEMS", "EvalProtocol", "EvalResults", "EvalRunner", "Scorers", "SettingsChangedError",
    "standard_scorers", "zero_shot_classifier", "VideoItem", "score_videos", "AVAlignError", "AVAlignResult",
    "av_align", "frame_motion", "optical_flow", "peak_iou",
]
