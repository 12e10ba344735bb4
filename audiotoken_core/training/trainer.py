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
* Checkpoints (``checkpoint.py``) are written every ``save_every`` steps, at the end, on a
  stop, and when an exception escapes a step (Ctrl-C, ComfyUI's Cancel raised from inside
  the UNet): then the last completed step is saved before the exception goes on.
* A non-finite loss or gradient stops the run *before* the optimizer applies it
  (:class:`TrainingDivergedError`); the checkpoints on disk are never overwritten with bad
  weights.
* ComfyUI runs nodes under ``torch.inference_mode()``; the trainer builds, resumes and
  trains with normal tensors whatever mode its caller is in.
* Two objectives (``TrainConfig.objective``): the paper's diffusion loss, and "text_match"
  (the backend's ``text_match_loss``: NOT the paper's; no diffusion model, VAE or images),
  alone or for the first ``warm_start_steps``. The step counter picks the objective of each
  step, so resume works across the switch; a step that does not use images never encodes them.
* Data parallel: when ``torch.distributed`` is initialised the token is wrapped in
  ``DistributedDataParallel`` (rank 0's initial weights, averaged gradients), each rank
  feeds its consecutive slice of the global batch, the lr scales with the world size, and
  only rank 0 writes files.

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
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..embedder import Embedder, EmbedderConfig
from ..encoders import AudioEncoder, EncoderSpec
from ..token_file import AudioToken, encoder_feature_dim, load_audiotoken, save_audiotoken
from .checkpoint import (
    CheckpointError,
    capture_rng_state,
    checkpoint_paths,
    load_state,
    prune_checkpoints,
    resolve_checkpoint,
    restore_rng_state,
    save_state,
)
from .config import TrainConfig
from .objective import classification_loss, compute_objective, l1_penalty, per_sample_timesteps_and_noise, sample_seed

__all__ = ["Trainer", "TrainSummary", "TrainingDivergedError", "new_audiotoken"]

log = logging.getLogger(__name__)

_DROPOUT_STREAM = 0x64726F70  # "drop": the stream id of the per-micro-batch RNG seeds
# Config fields that decide which samples, noise and lr a step sees: a resume must keep them.
_RESUME_FIXED = ("batch_size", "grad_accum")
# Config fields that may change on resume without breaking anything.
_RESUME_FREE = ("steps", "save_every", "keep_last", "log_every", "name")
# The loss parts of a step, in the order of the trainer's reduction and of the history entries.
_PARTS = ("loss", "diffusion", "text_match", "l1", "cl")


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


def new_audiotoken(
    widths: Mapping[str, int],
    encoder: EncoderSpec | Mapping[str, Any],
    *,
    seed: int = 0,
    placeholder: str = "<audio>",
    prompt_template: str | None = None,
    description: str = "",
    **embedder_options: Any,
) -> AudioToken:
    """A freshly initialised AudioToken (one Embedder per key, in sorted key order), reproducible from ``seed``.

    ``encoder``: the audio encoder's spec (or a token's ``encoder`` dict). The global torch
    RNG is left as it was.
    """
    spec = encoder.to_dict() if isinstance(encoder, EncoderSpec) else dict(encoder)
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


def _normal(tensor: Tensor) -> Tensor:
    """A tensor autograd may save: inference tensors (made under inference_mode) are copied."""
    return tensor.clone() if tensor.is_inference() else tensor


def _untrack_inference_tensors(module: nn.Module) -> None:
    """Replace inference-mode parameters and buffers (made under ComfyUI's inference_mode) by normal ones."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and param.is_inference():
                sub._parameters[name] = nn.Parameter(param.clone(), requires_grad=param.requires_grad)
        for name, buf in sub._buffers.items():
            if buf is not None and buf.is_inference():
                sub._buffers[name] = buf.clone()


class Trainer:
    """Trains the Embedder(s) of ``token`` in place; see the module docstring.

    ``data``: this rank's iterable of batch dicts: ``features`` [B, N, F] (cached encoder
    output) or ``wave16`` [B, T] (then ``audio_encoder`` runs frozen under no_grad);
    ``latents`` [B, C, h, w] or ``images`` [B, 3, H, W] in [0, 1] (only read by diffusion
    steps); ``label`` list[str] (needed when ``lambda_cl > 0`` and by text-match steps);
    optional ``padding_mask`` [B, N] (True = padded).
    ``device``: where the Embedders train (default: where they are); batches are moved there.
    The caller passes a token made for this backend's text encoders and this audio encoder
    (``new_audiotoken(backend.widths, encoder.spec)``) and a frozen backend.
    """

    def __init__(
        self,
        config: TrainConfig,
        backend: Any,
        token: AudioToken,
        audio_encoder: AudioEncoder | None,
        data: Iterable[Mapping[str, Any]],
        out_dir: str | os.PathLike = ".",
        *,
        device: str | torch.device | None = None,
    ) -> None:
        self.config = config
        self.backend = backend
        self.token = token
        self.audio_encoder = audio_encoder
        self.data = data
        self.out_dir = Path(out_dir)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = dist.get_rank() if self.distributed else 0
        self.device = torch.device(device) if device is not None else next(token.parameters()).device

        self._autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.precision]
        if self.device.type == "cuda" and self._autocast_dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU does not support bf16: use precision 'fp16' or 'fp32'")

        if config.objective_at(0) == "text_match" and not callable(getattr(backend, "text_match_loss", None)):
            raise ValueError(f"objective 'text_match' (or warm_start_steps) needs a backend with text_match_loss; "
                             f"{type(backend).__name__} has none: use objective 'diffusion' with warm_start_steps 0")
        self.lr = config.lr(self.world_size)
        with torch.inference_mode(False):
            _untrack_inference_tensors(token)
            token.to(device=self.device, dtype=torch.float32)  # fp32 master weights, whatever the autocast
            token.requires_grad_(True)
            self.optimizer = torch.optim.AdamW(
                token.parameters(), lr=self.lr, betas=tuple(config.betas), eps=config.eps,
                weight_decay=config.weight_decay,
            )
            # DDP starts every rank from rank 0's weights and averages the gradients in backward.
            self.model: nn.Module = (
                DistributedDataParallel(token, device_ids=[self.device] if self.device.type == "cuda" else None)
                if self.distributed else token
            )
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None

        self.step = 0
        self.history: list[dict[str, float]] = []
        self._epoch = 0
        self._epoch_batches = 0
        self._batches = 0
        self._epoch_rng: dict[str, Any] | None = None
        self._iter: Iterator | None = None
        self._stateful_data = hasattr(data, "state_dict") and hasattr(data, "load_state_dict")
        self._saved_step: int | None = None
        self._last_checkpoint: tuple[Path, Path] | None = None

    # ------------------------------------------------------------------ data
    def _open_epoch(self) -> None:
        self._epoch_rng = capture_rng_state(self.device)
        if hasattr(self.data, "set_epoch"):
            self.data.set_epoch(self._epoch)
        self._iter = iter(self.data)

    def _next_batch(self) -> Mapping[str, Any]:
        while True:
            if self._iter is None:
                self._open_epoch()
            try:
                batch = next(self._iter)
            except StopIteration:
                if self._epoch_batches == 0:
                    raise ValueError(
                        "the training data yielded no batches; an exhausted one-shot iterator (a generator) "
                        "cannot start a new epoch: pass a re-iterable (a list, a dataset object or a DataLoader)"
                    ) from None
                self._iter = None
                self._epoch += 1
                self._epoch_batches = 0
                continue
            self._epoch_batches += 1
            self._batches += 1
            return batch

    def _position(self) -> dict[str, Any]:
        """Where the run stands between two steps: what a checkpoint of the current step restores."""
        return {
            "rng": capture_rng_state(self.device),
            "epoch": self._epoch,
            "epoch_batches": self._epoch_batches,
            "batches": self._batches,
            "epoch_rng": self._epoch_rng,
            "data": self.data.state_dict() if self._stateful_data else None,
        }

    def _restore_data_position(self, data_state: Mapping[str, Any]) -> None:
        self._epoch = int(data_state["epoch"])
        self._epoch_batches = int(data_state["epoch_batches"])
        self._batches = int(data_state["batches"])
        saved = data_state.get("states")
        if saved is not None and self._stateful_data:
            self.data.load_state_dict(saved[self.rank])
            self._iter = None
            return
        epoch_rng = data_state.get("epoch_rng")
        if epoch_rng is not None:
            restore_rng_state(epoch_rng[self.rank], self.device)
        self._open_epoch()
        for skipped in range(self._epoch_batches):
            if next(self._iter, None) is None:
                raise CheckpointError(
                    f"the data has only {skipped} batches in epoch {self._epoch} but the checkpoint had used "
                    f"{self._epoch_batches}: resume with the same data (and the same batch size)"
                )

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
            return _normal(batch["features"]).to(device=self.device, dtype=torch.float32)
        with torch.no_grad():
            return self.audio_encoder(batch["wave16"]).to(self.device)

    def _latents(self, batch: Mapping[str, Any]) -> Tensor:
        if "latents" in batch:
            return _normal(batch["latents"]).to(self.device)
        with torch.no_grad():
            return self.backend.encode_images(batch["images"].to(self.device))

    @staticmethod
    def _labels(batch: Mapping[str, Any], why: str) -> list[str]:
        if "label" not in batch:
            raise ValueError(f"{why} needs the sound's label: the training batches have no 'label' (give every item a "
                             "label: subfolder name, labels CSV or the VGGSound class)")
        return [str(label) for label in batch["label"]]

    def _forward(self, batch: Mapping[str, Any], first_sample: int) -> dict[str, Tensor]:
        """The loss parts of one micro-batch (``_PARTS``): ``loss`` to backpropagate, the others detached."""
        cfg = self.config
        objective = cfg.objective_at(self.step)
        with self._autocast():
            features = self._features(batch)
            mask = batch.get("padding_mask")
            vectors = self.model(features, padding_mask=None if mask is None else mask.to(self.device))
            targets = None
            if cfg.lambda_cl > 0:
                with torch.no_grad():
                    labels = self._labels(batch, "the classification loss (lambda_cl > 0)")
                    targets = {k: v.to(self.device) for k, v in self.backend.label_targets(labels).items()}
            if objective == "text_match":
                labels = self._labels(batch, "the text-match objective")
                match = self.backend.text_match_loss(cfg.prompt, cfg.placeholder, vectors, labels).float().mean()
                l1 = l1_penalty(vectors)
                total = match + float(cfg.lambda_l1) * l1
                cl = torch.zeros((), device=match.device)
                if targets is not None:
                    cl = classification_loss(vectors, targets)
                    total = total + float(cfg.lambda_cl) * cl
                return {"loss": total, "diffusion": torch.zeros((), device=match.device), "text_match": match.detach(),
                        "l1": l1.detach(), "cl": cl.detach()}
            latents = self._latents(batch)
            cond = self.backend.encode_prompt(cfg.prompt, cfg.placeholder, vectors)
            timesteps, noise = per_sample_timesteps_and_noise(latents, cfg.seed, first_sample)
            terms = compute_objective(
                self.backend, latents, cond, vectors, timesteps, noise,
                lambda_l1=cfg.lambda_l1, lambda_cl=cfg.lambda_cl, label_targets=targets,
            )
            return {"loss": terms.total, "diffusion": terms.diffusion, "text_match": torch.zeros_like(terms.diffusion),
                    "l1": terms.l1, "cl": terms.cl}

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
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(len(_PARTS), dtype=torch.float64, device=self.device)
        for micro in range(cfg.grad_accum):
            micro_index = self.step * cfg.grad_accum + micro
            batch = self._next_batch()
            # DDP averages the gradients once per optimizer step, in the last micro-batch's backward.
            local = self.distributed and micro < cfg.grad_accum - 1
            with self._seeded_rng(sample_seed(cfg.seed, _DROPOUT_STREAM, micro_index, self.rank)), \
                    (self.model.no_sync() if local else contextlib.nullcontext()):
                terms = self._forward(batch, (micro_index * self.world_size + self.rank) * cfg.batch_size)
                loss = terms["loss"] / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            sums += torch.stack([terms[k].detach().to(self.device) for k in _PARTS]).double() / cfg.grad_accum
        if self.distributed:
            dist.all_reduce(sums)
            sums /= self.world_size
        parts = dict(zip(_PARTS, sums.tolist()))
        step = self.step + 1
        if not all(math.isfinite(v) for v in parts.values()):
            self.optimizer.zero_grad(set_to_none=True)
            raise self._diverged(step, parts, "loss")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = list(self.token.parameters())
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
        if should_stop is None:
            return False
        stop = bool(should_stop())
        if self.distributed:  # every rank must stop at the same step
            device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
            flag = torch.tensor([1.0 if stop else 0.0], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item() > 0)
        return stop

    def _set_training(self, training: bool) -> None:
        self.token.train(training)
        self.token.requires_grad_(training)

    def _keep_after_interrupt(self, position: Mapping[str, Any] | None) -> None:
        """Save the last completed step before an exception leaves :meth:`run`.

        Not under torch.distributed: saving is collective, and the other ranks are not saving.
        """
        if not self.distributed and self.step > 0 and self._saved_step != self.step:
            self._set_training(False)
            self.save_checkpoint(position)

    def run(
        self,
        progress: Callable[[int, dict], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainSummary:
        """Train until ``config.steps``; returns a :class:`TrainSummary`.

        ``progress(step, info)`` is called after every optimizer step (``info``: loss,
        diffusion, text_match, l1, cl, grad_norm, lr, steps; the part of the objective a step
        did not use is 0). ``should_stop()`` is asked before every
        step; when it says True the run saves a checkpoint and returns with status
        "stopped". An exception raised inside a step or by ``progress`` (Ctrl-C, ComfyUI's
        Cancel) saves the last completed step and is re-raised. Checkpoints are written
        every ``save_every`` steps and at the end, and on completion the final token goes
        to ``<out_dir>/<name>.safetensors``. Raises :class:`TrainingDivergedError` on a
        NaN/inf loss or gradient (without saving that step).
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
                    position = self._position()
                    try:
                        entry = self._train_step()
                    except TrainingDivergedError:
                        raise
                    except BaseException:
                        self._keep_after_interrupt(position)
                        raise
                    self.history.append(entry)
                    if progress is not None:
                        try:
                            progress(self.step, {**entry, "steps": cfg.steps})
                        except BaseException:
                            self._keep_after_interrupt(None)
                            raise
                    if self.step % cfg.log_every == 0 and self.rank == 0:
                        log.info(
                            "step %d/%d loss %.5f (diffusion %.5f, text_match %.5f, l1 %.5f, cl %.5f) lr %.3g",
                            self.step, cfg.steps, entry["loss"], entry["diffusion"], entry["text_match"], entry["l1"],
                            entry["cl"], entry["lr"],
                        )
                    if cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_checkpoint()
            finally:
                self._set_training(False)
            if self._saved_step != self.step:
                self.save_checkpoint()
            final = self._save_final() if status == "completed" else None
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

    def save_checkpoint(self, position: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
        """Write the checkpoint pair of the current step (collective under torch.distributed).

        ``position``: the data position and RNG states to record (default: now).
        """
        cfg = self.config
        position = position or self._position()
        rng = self._gather(position["rng"])
        epoch_rng = self._gather(position["epoch_rng"])
        data_states = self._gather(position["data"]) if self._stateful_data else None
        token_path, state_path = checkpoint_paths(self.out_dir, cfg.name, self.step)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.token.training_info = self.training_metadata(completed=False)
            save_audiotoken(token_path, self.token)
            save_state(state_path, {
                "step": self.step,
                "world_size": self.world_size,
                "config": cfg.to_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "history": list(self.history),
                "data": {
                    "epoch": position["epoch"],
                    "epoch_batches": position["epoch_batches"],
                    "batches": position["batches"],
                    "epoch_rng": epoch_rng if all(r is not None for r in epoch_rng) else None,
                    "states": data_states,
                },
                "rng": rng,
            })
            prune_checkpoints(self.out_dir, cfg.name, cfg.keep_last)
        if self.distributed:
            dist.barrier()
        self._saved_step = self.step
        self._last_checkpoint = (token_path, state_path)
        return token_path, state_path

    def _save_final(self) -> Path:
        path = self.out_dir / f"{self.config.name}.safetensors"
        if self.rank == 0:
            self.token.training_info = self.training_metadata(completed=True)
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
        token_path, state_path = resolve_checkpoint(path)
        state = load_state(state_path)
        self._check_resume_config(state, state_path)
        with torch.inference_mode(False):
            loaded = load_audiotoken(token_path)
        if loaded.widths != self.token.widths:
            raise CheckpointError(
                f"{token_path} holds Embedders {loaded.widths} (text-encoder key -> width) but this model needs "
                f"{self.token.widths}: resume with the model family the checkpoint was trained for, or start anew"
            )
        if self.audio_encoder is not None:
            self.audio_encoder.spec.check_token(loaded.encoder, f"checkpoint {token_path.name}")
        with torch.inference_mode(False), torch.no_grad():
            self.token.load_state_dict(loaded.state_dict())
            self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the current config's hyper-parameters win
            group.update(lr=self.lr, betas=tuple(self.config.betas), eps=self.config.eps,
                         weight_decay=self.config.weight_decay)
        if self.scaler is not None and state["scaler"] is not None:
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
