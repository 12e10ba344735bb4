"""ComfyUI adapter for audiotoken_core: model folders, node classes, the V3 entry point."""
from __future__ import annotations

from comfy_api.v0_0_2 import ComfyExtension, io

from .audiotoken_nodes import NODES as INFERENCE_NODES
from .core_audio_encoder import NODES as CORE_AUDIO_ENCODER_NODES
from .eval_nodes import NODES as EVALUATION_NODES
from .frame_nodes import NODES as FRAME_NODES
from .model_folders import register_model_folders
from .timeline_nodes import NODES as TIMELINE_NODES
from .train_nodes import NODES as TRAINING_NODES
from .video_windows import NODES as VIDEO_WINDOW_NODES

register_model_folders()


class AudioTokenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*INFERENCE_NODES, *CORE_AUDIO_ENCODER_NODES, *TIMELINE_NODES, *FRAME_NODES, *VIDEO_WINDOW_NODES,
                *TRAINING_NODES, *EVALUATION_NODES]


async def comfy_entrypoint() -> AudioTokenExtension:
    return AudioTokenExtension()
