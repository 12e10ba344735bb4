"""Training data: example lists (items), the torch Dataset (dataset) and encoder-output caches (cache)."""
from .cache import CachedFeatures, CacheError, FeatureCache, module_fingerprint
from .dataset import DEFAULT_IMAGE_SIZE, AudioImageDataset, collate, seeded_generator
from .clip_score import load_clip_scorer
from .loader import TrainBatches, build_train_batches
from .items import (
    AUDIO_EXTENSIONS,
    FRAME_MODES,
    IMAGE_EXTENSIONS,
    VIDEO_EXTENSIONS,
    DatasetSourceError,
    PairItem,
    PairList,
    Problem,
    VideoFrame,
    pairs_from_folder,
    pairs_from_videos,
    pairs_from_vggsound_csv,
)
from .media import MediaError

__all__ = [
    "AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "FRAME_MODES", "DEFAULT_IMAGE_SIZE",
    "PairItem", "PairList", "Problem", "VideoFrame", "DatasetSourceError", "MediaError",
    "pairs_from_folder", "pairs_from_videos", "pairs_from_vggsound_csv",
    "AudioImageDataset", "collate", "seeded_generator",
    "FeatureCache", "CachedFeatures", "CacheError", "module_fingerprint", "TrainBatches", "build_train_batches", "load_clip_scorer",
]
