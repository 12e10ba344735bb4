"""Training AudioTokens: the objective, the config and the model-agnostic trainer (issue 3).

Plain torch; everything model-specific sits behind :class:`DiffusionBackend`.
"""
from .backend import DiffusionBackend, check_backend
from .config import PRECISIONS, REFERENCE_LAMBDA_CL, TrainConfig
from .objective import (
    NUM_TRAIN_TIMESTEPS,
    audiotoken_loss,
    classification_loss,
    compute_objective,
    l1_penalty,
    per_sample_timesteps_and_noise,
    sample_timesteps_and_noise,
)
from .trainer import (
    CheckpointError,
    Trainer,
    TrainingDivergedError,
    TrainSummary,
    checkpoint_paths,
    latest_checkpoint,
    new_audiotoken,
)

__all__ = [
    "DiffusionBackend",
    "check_backend",
    "TrainConfig",
    "PRECISIONS",
    "REFERENCE_LAMBDA_CL",
    "NUM_TRAIN_TIMESTEPS",
    "audiotoken_loss",
    "classification_loss",
    "compute_objective",
    "l1_penalty",
    "per_sample_timesteps_and_noise",
    "sample_timesteps_and_noise",
    "Trainer",
    "TrainSummary",
    "TrainingDivergedError",
    "CheckpointError",
    "checkpoint_paths",
    "latest_checkpoint",
    "new_audiotoken",
]
