"""Training hyper-parameters, with the reference's defaults.

Defaults follow the AudioToken paper and reference code: AdamW (0.9, 0.999), weight
decay 1e-2, eps 1e-8, base lr 1e-5 scaled by batch x accumulation x GPUs, constant
schedule, L1 weight 0.01, 5 s audio windows, the prompt "a photo of <placeholder>",
a checkpoint every 1000 steps, fp32. The classification loss is off by default
(``lambda_cl = 0``); the paper's "with CL" setting uses ``lambda_cl = 0.01``.

``objective`` "diffusion" is the paper's (the default); "text_match" is a cheaper signal of
this pack, NOT the paper's (nodes/text_match.py: match the text encoder's output for the
prompt with the audio word to its output with the sound's label written there; no diffusion
model, no VAE, no images). ``warm_start_steps`` > 0 runs that many text-match steps before
the diffusion objective takes over; the step counter decides the phase, so a resumed run
continues in the phase it would have been in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from ..config_fields import known_fields

__all__ = ["TrainConfig", "PRECISIONS", "LR_SCHEDULES", "OBJECTIVES", "REFERENCE_LAMBDA_CL"]

PRECISIONS = ("fp32", "bf16", "fp16")
OBJECTIVES = ("diffusion", "text_match")  # the paper's; this pack's cheaper label match (not the paper's)
LR_SCHEDULES = ("constant",)
REFERENCE_LAMBDA_CL = 0.01  # the paper's weight when the classification loss is on


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class TrainConfig:
    """Everything that decides a training run (and goes into the token's metadata).

    ``batch_size`` is the per-process micro-batch; the global batch per optimizer step is
    ``batch_size * grad_accum * world_size``. With ``scale_lr`` (the reference's
    default) the AdamW lr is ``base_lr`` times that global batch: 1e-5 * 8 = 8e-5 for
    the paper's batch 8; the reference README's 4 x 4 gives 1.6e-4.

    ``precision``: "fp32" (reference), "bf16" or "fp16" autocast of the forward; the
    Embedder keeps fp32 master weights, fp16 adds a gradient scaler.
    ``save_every``: checkpoint interval in optimizer steps (0 = only at the end / on stop).
    ``keep_last``: how many step checkpoints to keep on disk (0 = all).
    ``log_every``: interval of the log lines (the loss history records every step).
    ``max_grad_norm``: optional gradient clipping (None = off, as in the reference).
    ``name``: file-name stem of the checkpoints and of the final token.
    ``objective``: "diffusion" (the paper's) or "text_match" (not the paper's; needs labels, no images).
    ``warm_start_steps``: with "diffusion", the first this many steps use "text_match" instead.
    """

    steps: int = 30000
    batch_size: int = 8
    grad_accum: int = 1
    base_lr: float = 1e-5
    scale_lr: bool = True
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    lr_schedule: str = "constant"
    lambda_l1: float = 0.01
    lambda_cl: float = 0.0
    window_seconds: float = 5.0
    prompt: str = "a photo of <audio>"
    placeholder: str = "<audio>"
    seed: int = 0
    precision: str = "fp32"
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 50
    max_grad_norm: float | None = None
    name: str = "audiotoken"
    objective: str = "diffusion"
    warm_start_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError naming the first bad field and what it accepts."""
        counts = {"steps": 1, "batch_size": 1, "grad_accum": 1, "save_every": 0, "keep_last": 0, "log_every": 1}
        checks = [(name, _is_int(getattr(self, name)) and getattr(self, name) >= low, f"an int >= {low}")
                  for name, low in counts.items()]
        checks += [(name, _is_number(getattr(self, name)) and getattr(self, name) >= 0, "a number >= 0")
                   for name in ("weight_decay", "lambda_l1", "lambda_cl")]
        checks += [
            ("seed", _is_int(self.seed), "an int"),
            ("base_lr", _is_number(self.base_lr) and 0 < self.base_lr < 1, "a number in (0, 1)"),
            ("scale_lr", isinstance(self.scale_lr, bool), "a bool"),
            ("betas", isinstance(self.betas, tuple) and len(self.betas) == 2
             and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "two numbers in [0, 1)"),
            ("eps", _is_number(self.eps) and self.eps > 0, "a number > 0"),
            ("lr_schedule", self.lr_schedule in LR_SCHEDULES, f"one of {LR_SCHEDULES}"),
            ("window_seconds", _is_number(self.window_seconds) and self.window_seconds > 0, "a number > 0"),
            ("placeholder", isinstance(self.placeholder, str) and bool(self.placeholder.strip()),
             "a non-empty string"),
            ("prompt", isinstance(self.prompt, str) and str(self.placeholder) in self.prompt,
             f"a text that contains the placeholder {self.placeholder!r}, e.g. 'a photo of {self.placeholder}'"),
            ("precision", self.precision in PRECISIONS, f"one of {PRECISIONS}"),
            ("max_grad_norm", self.max_grad_norm is None or (_is_number(self.max_grad_norm) and self.max_grad_norm > 0),
             "None or a number > 0"),
            ("name", isinstance(self.name, str) and bool(self.name) and not self.name.startswith(".")
             and not any(c in self.name for c in '/\\:*?"<>|\0'),
             "a plain file-name stem (no path separators, no leading dot), e.g. 'dog_bark'"),
            ("objective", self.objective in OBJECTIVES, f"one of {OBJECTIVES}"),
            ("warm_start_steps", _is_int(self.warm_start_steps) and self.warm_start_steps >= 0, "an int >= 0"),
        ]
        for name, ok, accepts in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {accepts}, got {getattr(self, name)!r}")
        if self.warm_start_steps and self.objective != "diffusion":
            raise ValueError(
                f"TrainConfig.warm_start_steps ({self.warm_start_steps}) is the number of text-match steps before the "
                f"diffusion objective; with objective {self.objective!r} set it to 0 (or use objective 'diffusion')")
        if self.warm_start_steps >= self.steps:
            raise ValueError(
                f"TrainConfig.warm_start_steps ({self.warm_start_steps}) must be below steps ({self.steps}), or the "
                "diffusion objective never runs; for a text-match-only run use objective 'text_match'")

    def objective_at(self, step: int) -> str:
        """The objective of the optimizer step that starts after ``step`` completed steps."""
        if self.objective == "diffusion" and step < self.warm_start_steps:
            return "text_match"
        return self.objective

    @property
    def needs_images(self) -> bool:
        """Whether any step of this run uses the diffusion objective (which needs images or latents)."""
        return self.objective_at(self.steps - 1) == "diffusion"

    # ------------------------------------------------------------------ derived values
    def global_batch(self, world_size: int = 1) -> int:
        """Samples per optimizer step over all processes."""
        return self.batch_size * self.grad_accum * int(world_size)

    def lr(self, world_size: int = 1) -> float:
        """The AdamW learning rate: base_lr x global batch when ``scale_lr``, else base_lr."""
        if self.scale_lr:
            return float(self.base_lr) * self.global_batch(world_size)
        return float(self.base_lr)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error (they are usually typos)."""
        values = known_fields(cls, data)
        if "betas" in values and isinstance(values["betas"], list):
            values["betas"] = tuple(values["betas"])
        return cls(**values)
