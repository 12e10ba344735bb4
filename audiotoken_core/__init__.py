"""audiotoken_core: the AudioToken method as a plain torch library (no ComfyUI imports).

Audio in, one word-embedding vector out: `prepare_waveform` (any rate/channels -> 16 kHz
mono window), an audio encoder (`load_audio_encoder`: BEATs or transformers AST/wav2vec2/
HuBERT), and the trained `Embedder`s of an `AudioToken` file. See docs/architecture.md.
"""
from .audio import AudioInputError, prepare_waveform, resample
from .embedder import Embedder, EmbedderConfig
from .embedding import AudioEmbedding, blend_embeddings
from .encoders import AudioEncoder, EncoderSpec, load_audio_encoder
from .token_file import AudioToken, AudioTokenFileError, import_reference_embedder, load_audiotoken, save_audiotoken

__all__ = [
    "AudioEmbedding", "AudioEncoder", "AudioInputError", "AudioToken", "AudioTokenFileError", "Embedder",
    "EmbedderConfig", "EncoderSpec", "blend_embeddings", "import_reference_embedder", "load_audio_encoder",
    "load_audiotoken", "prepare_waveform", "resample", "save_audiotoken",
]
