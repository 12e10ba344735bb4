"""The AudioToken trainer: only the Embedder(s) learn; encoder, text encoder, UNet, VAE stay frozen.

    trainer = Trainer(TrainConfig(steps=30000), backend, token, audio_encoder, data, "out/")
    trainer.resume("out/")                     # optional: continue the latest checkpoint
    summary = trainer.run(progress=cb, should_stop=lambda: cancelled)

Why it is built this way:

* Model specifics live behind :class:`~.backend.DiffusionBackend`, so the same loop serves
  ComfyUI, the headless command and the toy models of the tests.
* Reproducibility is counter based. The timestep and noise of global sample ``i`` come
  from a generator seeded with ``(seed, i)`` and every micro-batch's forward runs with the
  global torch RNG (pooling dropout) seeded from ``(seed, micro-batch, rank)`` and restored
  afterwards. So the same seed gives the same weights on CPU, a resumed run is the
  uninterrupted run, accumulation of 2 x 2 draws the noise of a batch of 4, and the host
  process's own RNG (ComfyUI's) is left alone.
* A checkpoint is a pair: ``<name>-step000100.safetensors`` (a normal AudioToken file that
  the encode node can load at once, with the training metadata) and
  ``<name>-step000100.state.pt`` (optimizer, gradient scaler, step, data position, loss
  history, RNG states of every rank; plain tensors and Python values, readable with
  ``torch.load(weights_only=True)``).
* A non-finite loss or gradient stops the run *before* the optimizer applies it
  (:class:`TrainingDivergedError`); the checkpoints on disk are never overwritten with bad
  weights.
* Data parallel: when ``torch.distributed`` is initialised each rank gets its own shard of
  the data, gradients are averaged with one ``all_reduce`` per optimizer step, the lr
  scales with the world size, and only rank 0 writes files.

Data: any iterable of batch dicts (see docs/architecture.md). It is iterated again for
each epoch; ``set_epoch(epoch)`` is called first when the object has it. On resume the
data position is restored by ``load_state_dict`` when the object has ``state_dict`` /
``load_state_dict`` (after which ``iter(data)`` must continue from the saved position),
otherwise by re-iterating the current epoch and skipping the batches already used (with
the RNG states of the epoch start restored first, so shuffling that uses the global RNGs
replays the same order).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..embedder import Embedder, EmbedderConfig
from ..encoders import AudioEncoder
from ..token_file import AudioToken, encoder_feature_dim, load_audiotoken, save_audiotoken
from .backend import backend_modules, backend_trainable_parameters, check_backend
from .config import TrainConfig
from .objective import ObjectiveTerms, compute_objective, per_sample_timesteps_and_noise, sample_seed

__all__ = [
    "Trainer",
    "TrainSummary",
    "TrainingDivergedError",
    "CheckpointError",
    "new_audiotoken",
    "checkpoint_paths",
    "latest_checkpoint",
    "capture_rng_state",
    "restore_rng_state",
    "STATE_SUFFIX",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "audiotoken-trainer-state"
STATE_VERSION = 1
STATE_SUFFIX = ".state.pt"
_DROPOUT_STREAM = 0x64726F70  # "drop": the stream id of the per-micro-batch RNG seeds
# Config fields that decide which samples, noise and lr a step sees: a resume must keep them.
_RESUME_FIXED = ("batch_size", "grad_accum")
# Config fields that may change on resume without breaking anything.
_RESUME_FREE = ("steps", "save_every", "keep_last", "log_every", "name")


class TrainingDivergedError(RuntimeError):
    """The loss or the gradient became NaN/inf; the bad update was not applied.

    Attributes: ``step`` (the 1-based optimizer step that failed), ``parts`` (the loss
    parts of that step) and ``checkpoint`` (the last good checkpoint's token file, or None).
    """

    def __init__(self, message: str, step: int, parts: Mapping[str, float], checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.parts = dict(parts)
        self.checkpoint = checkpoint


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed here; the message says why and what to do."""


@dataclass
class TrainSummary:
    """What :meth:`Trainer.run` returns.

    ``status``: "completed" or "stopped"; ``checkpoint`` / ``state``: the last checkpoint
    pair; ``final``: ``<out_dir>/<name>.safetensors`` when the run completed, else None.
    """

    status: str
    step: int
    steps: int
    lr: float
    world_size: int
    seconds: float
    checkpoint: str | None
    state: str | None
    final: str | None
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last_loss(self) -> float | None:
        return self.history[-1]["loss"] if self.history else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- helpers


def new_audiotoken(
    widths: Mapping[str, int],
    encoder: Mapping[str, Any] | Any,
    *,
    seed: int = 0,
    placeholder: str = "<audio>",
    prompt_template: str | None = None,
    description: str = "",
    **embedder_options: Any,
) -> AudioToken:
    """A freshly initialised AudioToken (one Embedder per key), reproducible from ``seed``.

    ``encoder``: the audio-encoder spec (a dict, or an ``EncoderSpec`` / anything with
    ``to_dict()``). The global torch RNG is left as it was.
    """
    spec = encoder.to_dict() if hasattr(encoder, "to_dict") else dict(encoder)
    feature_dim = encoder_feature_dim(spec)
    state = torch.get_rng_state()
    try:
        torch.random.default_generator.manual_seed(int(seed))
        embedders = {
            key: Embedder(EmbedderConfig(input_dim=feature_dim, output_dim=int(widths[key]), **embedder_options))
            for key in sorted(widths)
        }
    finally:
        torch.set_rng_state(state)
    return AudioToken(
        embedders=embedders,
        encoder=spec,
        placeholder=placeholder,
        prompt_template=prompt_template or f"a photo of {placeholder}",
        description=description,
    )


def checkpoint_paths(out_dir: str | os.PathLike, name: str, step: int) -> tuple[Path, Path]:
    """(token file, state file) of the checkpoint at ``step``."""
    stem = Path(out_dir) / f"{name}-step{int(step):06d}"
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + STATE_SUFFIX)


def _list_checkpoints(out_dir: Path, name: str | None) -> list[tuple[int, Path, Path]]:
    """(step, token, state) of complete checkpoint pairs in ``out_dir``, oldest first."""
    if not out_dir.is_dir():
        return []
    pattern = re.compile(r"^(?P<name>.+)-step(?P<step>\d{6,})\.safetensors$")
    found = []
    for entry in out_dir.iterdir():
        match = pattern.match(entry.name)
        if not match or (name is not None and match["name"] != name):
            continue
        state = entry.with_name(entry.name[: -len(".safetensors")] + STATE_SUFFIX)
        if state.is_file():
            found.append((int(match["step"]), entry, state))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def latest_checkpoint(out_dir: str | os.PathLike, name: str | None = None) -> Path | None:
    """The state file of the newest complete checkpoint in ``out_dir`` (optionally of ``name``)."""
    found = _list_checkpoints(Path(out_dir), name)
    return found[-1][2] if found else None


def _resolve_checkpoint(path: str | os.PathLike, name: str | None) -> tuple[Path, Path]:
    """(token file, state file) from a state file, a token file or a folder of checkpoints."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"cannot resume from {path}: it does not exist")
    if path.is_dir():
        state = latest_checkpoint(path, name)
        if state is None:
            raise CheckpointError(
                f"no checkpoint in {path}: expected a pair <name>-stepNNNNNN.safetensors + "
                f"<name>-stepNNNNNN{STATE_SUFFIX}"
            )
        path = state
    if path.name.endswith(STATE_SUFFIX):
        token = path.with_name(path.name[: -len(STATE_SUFFIX)] + ".safetensors")
        state = path
    elif path.suffix == ".safetensors":
        token = path
        state = path.with_name(path.name[: -len(".safetensors")] + STATE_SUFFIX)
    else:
        raise CheckpointError(
            f"{path} is not a checkpoint: pass a <name>-stepNNNNNN{STATE_SUFFIX} file, its .safetensors "
            "twin, or the folder that holds them"
        )
    for needed in (token, state):
        if not needed.is_file():
            raise CheckpointError(
                f"checkpoint file {needed} is missing; a resumable checkpoint is a .safetensors token and "
                f"its {STATE_SUFFIX} twin (a final token alone can be loaded, but not resumed)"
            )
    return token, state


def capture_rng_state(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, numpy, torch CPU and (for a CUDA ``device``) that GPU's RNG states.

    All values load with ``torch.load(weights_only=True)``. Only the training GPU is
    read, so that a process of a multi-GPU job does not open contexts on the others.
    """
    version, internal, gauss = random.getstate()
    device = torch.device(device) if device is not None else None
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device is not None and device.type == "cuda" else None,
        "numpy": None,
    }
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng_state(state: Mapping[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng_state` (the CUDA state goes to ``device``)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    device = torch.device(device) if device is not None else None
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _untrack_inference_tensors(module: nn.Module) -> None:
    """Replace inference-mode parameters (made under ComfyUI's inference_mode) by normal ones."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_inference():
                sub._parameters[name] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and buf.is_inference():
                sub._buffers[name] = buf.clone()


def _as_tensor(batch: Mapping[str, Any], key: str, dims: int, what: str) -> Tensor:
    value = batch[key]
    if not isinstance(value, Tensor) or value.dim() != dims:
        shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"batch[{key!r}] must be a tensor {what}, got {shape}")
    if value.is_inference():  # made under inference_mode: cannot be saved for backward
        value = value.clone()
    return value


# --------------------------------------------------------------------------- trainer


class Trainer:
    """Trains the Embedder(s) of ``token`` in place; see the module docstring.

    ``data``: this rank's iterable of batch dicts: ``features`` [B, N, F] (cached encoder
    output) or ``wave16`` [B, T] (then ``audio_encoder`` runs frozen under no_grad);
    ``latents`` [B, C, h, w] or ``images`` [B, 3, H, W] in [0, 1]; ``label`` list[str]
    (needed when ``lambda_cl > 0``); optional ``padding_mask`` [B, N] (True = padded).
    ``device``: where the Embedders train (default: where they are); batches are moved there.
    """

    def __init__(
        self,
        config: TrainConfig,
        backend: Any,
        token: AudioToken,
        audio_encoder: AudioEncoder | None = None,
        data: Iterable[Mapping[str, Any]] | None = None,
        out_dir: str | os.PathLike = ".",
        *,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        config.validate()
        if not isinstance(token, AudioToken):
            raise TypeError(f"token must be an AudioToken, got {type(token).__name__}")
        if data is None or not isinstance(data, Iterable):
            raise TypeError(f"data must be an iterable of batch dicts, got {type(data).__name__}")
        check_backend(backend)
        self.config = config
        self.backend = backend
        self.token = token
        self.audio_encoder = audio_encoder
        self.data = data
        self.out_dir = Path(out_dir)

        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0

        self._check_models()
        self.device = torch.device(device) if device is not None else token.device
        with torch.inference_mode(False):
            for embedder in token.embedders.values():
                _untrack_inference_tensors(embedder)
            # fp32 master weights, whatever the autocast precision.
            token.to(device=self.device, dtype=torch.float32)
        self._autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        self._check_precision()
        if token.placeholder != config.placeholder:
            token.prompt_template = token.prompt_template.replace(token.placeholder, config.placeholder)
            token.placeholder = config.placeholder

        self.keys = sorted(token.embedders)
        self.param_names = [f"{k}.{n}" for k in self.keys for n, _ in token.embedders[k].named_parameters()]
        params = self._params()
        for param in params:
            param.requires_grad_(True)
        self.lr = config.lr(self.world_size)
        self.optimizer = torch.optim.AdamW(
            params, lr=self.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=config.weight_decay
        )
        self._check_optimizer_params()
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None

        self.step = 0
        self.history: list[dict[str, float]] = []
        self._epoch = 0
        self._epoch_batches = 0
        self._batches = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._iter: Iterator | None = None
        self._saved_step: int | None = None
        self._last_checkpoint: tuple[Path, Path] | None = None
        self._warned_small_batch = False

        if self.distributed:
            # All ranks start from rank 0's weights, as DistributedDataParallel does.
            with torch.no_grad():
                for param in params:
                    dist.broadcast(param.data, src=0)

    # ------------------------------------------------------------------ checks
    def _check_models(self) -> None:
        backend, token = self.backend, self.token
        widths = dict(backend.widths)
        if widths != token.widths:
            raise ValueError(
                f"the token's Embedders {token.widths} do not match the model's text encoders {widths} "
                "(key -> width): train a token with one Embedder per text-encoder key of this model, "
                "e.g. new_audiotoken(backend.widths, encoder_spec)"
            )
        trainable = backend_trainable_parameters(backend)
        if trainable:
            shown = ", ".join(trainable[:3]) + (f", ... ({len(trainable) - 3} more)" if len(trainable) > 3 else "")
            raise ValueError(
                f"the backend has {len(trainable)} parameter(s) with requires_grad=True ({shown}); only the "
                "Embedder trains: freeze the model (module.requires_grad_(False)) before building the Trainer"
            )
        encoder = self.audio_encoder
        if encoder is not None:
            if not isinstance(encoder, nn.Module) or not hasattr(encoder, "spec"):
                raise TypeError(f"audio_encoder must be an AudioEncoder, got {type(encoder).__name__}")
            if encoder.spec.feature_dim != token.feature_dim:
                raise ValueError(
                    f"the audio encoder gives {encoder.spec.feature_dim} features ({encoder.spec.kind}, layers "
                    f"{list(encoder.spec.layers)}) but the token's Embedders read {token.feature_dim}: use the "
                    f"encoder the token was made for ({token.encoder})"
                )
            encoder.requires_grad_(False)
            encoder.eval()

    def _check_precision(self) -> None:
        if self._autocast_dtype is None:
            return
        if not torch.amp.is_autocast_available(self.device.type):
            raise ValueError(
                f"precision {self.config.precision!r} needs autocast, which {self.device.type} does not offer; "
                "use precision='fp32'"
            )
        if self.device.type == "cuda" and self._autocast_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16: use precision='fp16' or 'fp32'")

    def _params(self) -> list[nn.Parameter]:
        return [p for k in self.keys for p in self.token.embedders[k].parameters()]

    def _check_optimizer_params(self) -> None:
        embedder_ids = {id(p) for p in self._params()}
        optimizer_ids = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        frozen_ids = {id(p) for _, m in backend_modules(self.backend) for p in m.parameters()}
        if self.audio_encoder is not None:
            frozen_ids |= {id(p) for p in self.audio_encoder.parameters()}
        if optimizer_ids != embedder_ids or optimizer_ids & frozen_ids:
            raise RuntimeError(
                "internal error: the optimizer must hold exactly the Embedder parameters; a frozen model's "
                "parameters leaked into it (is an Embedder shared with the backend or the audio encoder?)"
            )

    # ------------------------------------------------------------------ data
    def _open_epoch(self) -> None:
        self._epoch_rng = capture_rng_state(self.device)
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self._epoch)
        self._iter = iter(self.data)

    def _next_batch(self) -> Mapping[str, Any]:
        empty_epochs = 0
        while True:
            if self._iter is None:
                self._open_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                if self._epoch_batches == 0:
                    empty_epochs += 1
                if empty_epochs:
                    raise ValueError(
                        f"the training data yielded no batches (epoch {self._epoch}); an exhausted one-shot "
                        "iterator (a generator) cannot start a new epoch: pass a re-iterable (a list, a dataset "
                        "object or a DataLoader) or an endless iterator"
                    ) from None
                self._iter = None
                self._epoch += 1
                self._epoch_batches = 0
                continue
            self._epoch_batches += 1
            self._batches += 1
            if not isinstance(batch, Mapping):
                raise ValueError(f"a training batch must be a dict, got {type(batch).__name__}")
            return batch

    def _restore_data_position(self, data_state: Mapping[str, Any]) -> None:
        self._epoch = int(data_state["epoch"])
        self._epoch_batches = int(data_state["epoch_batches"])
        self._batches = int(data_state["batches"])
        saved = data_state.get("states")
        if saved is not None and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(saved[self.rank])
            self._iter = None
            return
        epoch_rng = data_state.get("epoch_rng")
        if epoch_rng is not None:
            restore_rng_state(epoch_rng[self.rank], self.device)
        self._open_epoch()
        for skipped in range(self._epoch_batches):
            try:
                next(self._iter)
            except StopIteration:
                raise CheckpointError(
                    f"the data has only {skipped} batches in epoch {self._epoch} but the checkpoint had used "
                    f"{self._epoch_batches}: resume with the same data (and the same batch size)"
                ) from None

    # ------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def _seeded_rng(self, seed: int):
        """Run with the global torch RNG (dropout) seeded; restore the caller's RNG afterwards."""
        cpu_state = torch.get_rng_state()
        cuda = self.device.type == "cuda"
        cuda_state = torch.cuda.get_rng_state(self.device) if cuda else None
        try:
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                with torch.cuda.device(self.device):
                    torch.cuda.manual_seed(seed)
            yield
        finally:
            torch.set_rng_state(cpu_state)
            if cuda:
                torch.cuda.set_rng_state(cuda_state, self.device)

    def _autocast(self):
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self._autocast_dtype)

    def _features(self, batch: Mapping[str, Any]) -> Tensor:
        if "features" in batch:
            features = _as_tensor(batch, "features", 3, f"[B, N, {self.token.feature_dim}]")
            features = features.to(device=self.device, dtype=torch.float32)
        elif "wave16" in batch:
            if self.audio_encoder is None:
                raise ValueError(
                    "the batch carries raw audio ('wave16') but the Trainer has no audio_encoder: pass the "
                    "encoder the token was made for, or cache its features in the batch as 'features'"
                )
            wave = _as_tensor(batch, "wave16", 2, "[B, T] of 16 kHz audio")
            with torch.no_grad():
                features = self.audio_encoder(wave).to(self.device)
        else:
            raise ValueError(
                f"a training batch needs 'features' [B, N, F] or 'wave16' [B, T]; it has {sorted(batch)}"
            )
        if features.shape[-1] != self.token.feature_dim:
            raise ValueError(
                f"features of width {features.shape[-1]} do not fit the token's Embedders (width "
                f"{self.token.feature_dim}, encoder {self.token.encoder.get('kind')!r}): the feature cache "
                "was made with another audio encoder or other layers"
            )
        return features.detach()

    def _latents(self, batch: Mapping[str, Any]) -> Tensor:
        if "latents" in batch:
            return _as_tensor(batch, "latents", 4, "[B, C, h, w]").to(self.device)
        if "images" in batch:
            images = _as_tensor(batch, "images", 4, "[B, 3, H, W] in [0, 1]").to(self.device)
            with torch.no_grad():
                return self.backend.encode_images(images).detach()
        raise ValueError(f"a training batch needs 'latents' or 'images'; it has {sorted(batch)}")

    def _forward(self, batch: Mapping[str, Any], first_sample: int) -> ObjectiveTerms:
        cfg = self.config
        with self._autocast():
            features = self._features(batch)
            latents = self._latents(batch)
            b = features.shape[0]
            if latents.shape[0] != b:
                raise ValueError(f"the batch has {b} audio items but {latents.shape[0]} images/latents")
            if b > cfg.batch_size:
                raise ValueError(
                    f"the data yields batches of {b} but TrainConfig.batch_size is {cfg.batch_size}: set batch_size "
                    "to the per-process batch of the data (the lr scaling and noise indexing use it)"
                )
            if b < cfg.batch_size and not self._warned_small_batch:
                self._warned_small_batch = True
                log.info("a batch of %d is smaller than batch_size %d (last batch of an epoch?)", b, cfg.batch_size)
            mask = _as_tensor(batch, "padding_mask", 2, "[B, N] bool") if "padding_mask" in batch else None
            if mask is not None:
                mask = mask.to(self.device)
            vectors = {k: self.token.embedders[k](features, padding_mask=mask) for k in self.keys}
            cond = self.backend.encode_prompt(cfg.prompt, cfg.placeholder, vectors)
            timesteps, noise = per_sample_timesteps_and_noise(latents, cfg.seed, first_sample)
            targets = None
            if cfg.lambda_cl > 0:
                labels = batch.get("label")
                if labels is None or len(labels) != b:
                    raise ValueError(
                        f"lambda_cl = {cfg.lambda_cl} needs a 'label' list of {b} strings in every batch "
                        "(or set lambda_cl = 0)"
                    )
                with torch.no_grad():
                    targets = {k: v.to(self.device) for k, v in self.backend.label_targets(list(labels)).items()}
            return compute_objective(
                self.backend, latents, cond, vectors, timesteps, noise,
                lambda_l1=cfg.lambda_l1, lambda_cl=cfg.lambda_cl, label_targets=targets,
            )

    def _reduce_gradients(self, params: list[nn.Parameter]) -> None:
        """Average the gradients over the ranks with one all_reduce of a flat buffer."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for param in params:
            n = param.numel()
            param.grad = flat[offset : offset + n].view_as(param).clone()
            offset += n

    def _diverged(self, step: int, parts: Mapping[str, float], what: str) -> TrainingDivergedError:
        last = self._last_checkpoint
        where = (
            f"the last good checkpoint is {last[0]} (step {self._saved_step}); resume from it"
            if last is not None
            else "no checkpoint was written yet"
        )
        shown = ", ".join(f"{k} {v:.4g}" for k, v in parts.items())
        return TrainingDivergedError(
            f"training diverged at step {step}: the {what} is not finite ({shown}). The update of this step was "
            f"not applied and no checkpoint was written for it; {where}. Lower the learning rate (now "
            f"{self.lr:.3g}; TrainConfig.base_lr {self.config.base_lr:g}) or train in fp32 (now "
            f"{self.config.precision}).",
            step,
            parts,
            str(last[0]) if last is not None else None,
        )

    def _train_step(self) -> dict[str, float]:
        cfg = self.config
        params = self._params()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            micro_index = self.step * cfg.grad_accum + micro
            batch = self._next_batch()
            with self._seeded_rng(sample_seed(cfg.seed, _DROPOUT_STREAM, micro_index, self.rank)):
                terms = self._forward(batch, (micro_index * self.world_size + self.rank) * cfg.batch_size)
                loss = terms.total / cfg.grad_accum
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            sums += torch.stack([terms.total.detach(), terms.diffusion, terms.l1, terms.cl]).double() / cfg.grad_accum
        if self.distributed:
            dist.all_reduce(sums)
            sums /= self.world_size
        total, diffusion, l1, cl = sums.tolist()
        parts = {"loss": total, "diffusion": diffusion, "l1": l1, "cl": cl}
        step = self.step + 1
        if not all(math.isfinite(v) for v in parts.values()):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step, parts, "loss")
        if self.distributed:
            self._reduce_gradients(params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if cfg.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))
        if not math.isfinite(grad_norm) and self.scaler is None:
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step, {**parts, "grad_norm": grad_norm}, "gradient")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update when fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.step = step
        return {"step": step, **parts, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}

    # ------------------------------------------------------------------ run
    def _stop_requested(self, should_stop: Callable[[], bool] | None) -> bool:
        stop = bool(should_stop()) if should_stop is not None else False
        if self.distributed:  # every rank must stop at the same step
            flag = torch.tensor([1.0 if stop else 0.0], device=self._comm_device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _set_training(self, training: bool) -> None:
        for embedder in self.token.embedders.values():
            embedder.train(training)
            embedder.requires_grad_(training)

    def run(
        self,
        progress: Callable[[int, dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainSummary:
        """Train until ``config.steps``; returns a :class:`TrainSummary`.

        ``progress(step, info)`` is called after every optimizer step (``info``: loss,
        diffusion, l1, cl, grad_norm, lr, steps). ``should_stop()`` is asked before every
        step; when it says True the run saves a checkpoint and returns with status
        "stopped" (in ComfyUI pass e.g. ``comfy.model_management.processing_interrupted``).
        Checkpoints are written every ``save_every`` steps and at the end, and on
        completion the final token goes to ``<out_dir>/<name>.safetensors``.
        Raises :class:`TrainingDivergedError` on a NaN/inf loss or gradient.
        """
        cfg = self.config
        start = time.perf_counter()
        status = "completed"
        with torch.inference_mode(False), torch.enable_grad():
            self._set_training(True)
            try:
                while self.step < cfg.steps:
                    if self._stop_requested(should_stop):
                        status = "stopped"
                        break
                    position = (self._epoch, self._epoch_batches, self._batches)
                    try:
                        entry = self._train_step()
                    except KeyboardInterrupt:
                        if self.distributed:
                            raise
                        # Ctrl-C mid-step: keep the last completed step (its data position) and save it.
                        # (Data with its own state_dict may by then be up to one step ahead.)
                        self._epoch, self._epoch_batches, self._batches = position
                        self._iter = None
                        self._set_training(False)
                        if self._saved_step != self.step:
                            self.save_checkpoint()
                        raise
                    self.history.append(entry)
                    if progress is not None:
                        try:
                            progress(self.step, {**entry, "steps": cfg.steps})
                        except BaseException:
                            # e.g. ComfyUI's progress bar raising on Cancel: the step is complete,
                            # so keep it (saving is collective: not possible when one rank raises).
                            if not self.distributed:
                                self._set_training(False)
                                self.save_checkpoint()
                            raise
                    if self.step % cfg.log_every == 0 and self.rank == 0:
                        log.info(
                            "step %d/%d loss %.5f (diffusion %.5f, l1 %.5f, cl %.5f) lr %.3g",
                            self.step, cfg.steps, entry["loss"], entry["diffusion"], entry["l1"], entry["cl"],
                            entry["lr"],
                        )
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
            finally:
                self._set_training(False)
            if self._saved_step != self.step:
                self.save_checkpoint()
            final = None
            if status == "completed":
                final = self._save_final()
        last = self._last_checkpoint
        return TrainSummary(
            status=status,
            step=self.step,
            steps=cfg.steps,
            lr=self.lr,
            world_size=self.world_size,
            seconds=time.perf_counter() - start,
            checkpoint=str(last[0]) if last else None,
            state=str(last[1]) if last else None,
            final=str(final) if final else None,
            history=list(self.history),
        )

    # ------------------------------------------------------------------ checkpoints
    def training_metadata(self, completed: bool) -> dict[str, Any]:
        """The ``training`` metadata written into the token file (JSON values only)."""
        last = self.history[-1] if self.history else {}
        return {
            "trainer": "audiotoken_core.training",
            "config": self.config.to_dict(),
            "step": self.step,
            "completed": bool(completed),
            "world_size": self.world_size,
            "lr": self.lr,
            "global_batch": self.config.global_batch(self.world_size),
            "prediction": self.backend.prediction,
            "backend": type(self.backend).__name__,
            "loss": last.get("loss"),
        }

    def _gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def save_checkpoint(self) -> tuple[Path, Path]:
        """Write the checkpoint pair of the current step (collective under torch.distributed)."""
        cfg = self.config
        rng = self._gather(capture_rng_state(self.device))
        epoch_rng = self._gather(self._epoch_rng)
        data_states = None
        if hasattr(self.data, "state_dict") and hasattr(self.data, "load_state_dict"):
            data_states = self._gather(self.data.state_dict())
        token_path, state_path = checkpoint_paths(self.out_dir, cfg.name, self.step)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.token.training = self.training_metadata(completed=False)
            save_audiotoken(token_path, self.token)
            state = {
                "format": STATE_FORMAT,
                "version": STATE_VERSION,
                "step": self.step,
                "world_size": self.world_size,
                "config": cfg.to_dict(),
                "param_names": list(self.param_names),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": list(self.history),
                "data": {
                    "epoch": self._epoch,
                    "epoch_batches": self._epoch_batches,
                    "batches": self._batches,
                    "epoch_rng": epoch_rng if all(r is not None for r in epoch_rng) else None,
                    "states": data_states,
                },
                "rng": rng,
            }
            _atomic_torch_save(state, state_path)
            self._prune()
        if self.distributed:
            dist.barrier()
        self._saved_step = self.step
        self._last_checkpoint = (token_path, state_path)
        return token_path, state_path

    def _prune(self) -> None:
        keep = self.config.keep_last
        if not keep:
            return
        found = _list_checkpoints(self.out_dir, self.config.name)
        for _, token_path, state_path in found[:-keep]:
            for path in (token_path, state_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _save_final(self) -> Path | None:
        path = self.out_dir / f"{self.config.name}.safetensors"
        if self.rank == 0:
            self.token.training = self.training_metadata(completed=True)
            save_audiotoken(path, self.token)
        if self.distributed:
            dist.barrier()
        return path

    def resume(self, path: str | os.PathLike) -> int:
        """Continue from a checkpoint (a state file, its token file, or a folder: the newest).

        Restores the Embedder weights, optimizer, gradient scaler, step, loss history,
        data position and RNG states, so that the rest of the run is the one the
        checkpointed run would have done (bitwise on CPU). Returns the restored step.
        Every rank reads the same files (use a shared folder under torch.distributed).
        """
        token_path, state_path = _resolve_checkpoint(path, None)
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same advice
            raise CheckpointError(f"cannot read the trainer state {state_path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{state_path} is not an AudioToken trainer state file")
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(
                f"{state_path} has trainer-state version {state.get('version')}; this trainer reads {STATE_VERSION}"
            )
        self._check_resume_config(state, state_path)
        if state["param_names"] != self.param_names:
            raise CheckpointError(
                f"{state_path} was written for Embedders {sorted({n.split('.')[0] for n in state['param_names']})} "
                f"but this token has {self.keys}: resume with a token of the same model family"
            )
        loaded = load_audiotoken(token_path)
        if loaded.training.get("step") != state["step"]:
            raise CheckpointError(
                f"{token_path} (step {loaded.training.get('step')}) and {state_path} (step {state['step']}) are not "
                "from the same checkpoint"
            )
        if loaded.widths != self.token.widths or loaded.feature_dim != self.token.feature_dim:
            raise CheckpointError(
                f"{token_path} holds Embedders {loaded.widths} reading {loaded.feature_dim} features; this run trains "
                f"{self.token.widths} reading {self.token.feature_dim}"
            )
        with torch.inference_mode(False), torch.no_grad():
            for key in self.keys:
                self.token.embedders[key].load_state_dict(loaded.embedders[key].state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the current config's hyper-parameters win
            group.update(lr=self.lr, betas=tuple(self.config.betas), eps=self.config.eps,
                         weight_decay=self.config.weight_decay)
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._restore_data_position(state["data"])
        restore_rng_state(state["rng"][self.rank], self.device)
        self._saved_step = self.step
        self._last_checkpoint = (token_path, state_path)
        return self.step

    def _check_resume_config(self, state: Mapping[str, Any], state_path: Path) -> None:
        if state["world_size"] != self.world_size:
            raise CheckpointError(
                f"{state_path} was written by {state['world_size']} process(es); this run has {self.world_size}. "
                "Resume with the same number of processes (the data shards and noise indices depend on it)"
            )
        saved = state["config"]
        current = self.config.to_dict()
        fixed = [k for k in _RESUME_FIXED if saved.get(k) != current.get(k)]
        if fixed:
            raise CheckpointError(
                f"cannot resume {state_path}: {', '.join(f'{k} was {saved.get(k)!r}, now {current.get(k)!r}' for k in fixed)}; "
                "keep these equal to the checkpoint's (TrainConfig.from_dict(state['config']) gives its config)"
            )
        changed = [
            f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
            for k in current
            if k not in _RESUME_FREE and k not in _RESUME_FIXED and saved.get(k) != current.get(k)
        ]
        if changed:
            warnings.warn(
                f"resuming {state_path} with a changed config ({'; '.join(changed)}): the run will not reproduce "
                "an uninterrupted run with the original config",
                stacklevel=3,
            )
