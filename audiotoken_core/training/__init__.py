"""Training AudioTokens: the objective, the config, checkpoints and the model-agnostic trainer.

Plain torch; everything model-specific sits behind :class:`DiffusionBackend`.
"""
from .backend import DiffusionBackend
from .checkpoint import CheckpointError, checkpoint_paths, latest_checkpoint
from .config import PRECISIONS, REFERENCE_LAMBDA_CL, TrainConfig
from .objective import (
    NUM_TRAIN_TIMESTEPS,
    classification_loss,
    compute_objective,
    l1_penalty,
    per_sample_timesteps_and_noise,
    sample_timesteps_and_noise,
)
from .trainer import Trainer, TrainingDivergedError, TrainSummary, new_audiotoken

__all__ = [
    "DiffusionBackend",
    "TrainConfig",
    "PRECISIONS",
    "REFERENCE_LAMBDA_CL",
    "NUM_TRAIN_TIMESTEPS",
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
