"""IDX files, the format MNIST and Fashion-MNIST ship in: reading them, checked, and a split."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import torch

from vae_lightning.data.sources import SPLIT_FILES
from vae_lightning.errors import DataError


class IDXError(DataError):
    """An IDX file is malformed (wrong magic, truncated, inconsistent)."""


def _header(raw: bytes, path: Path) -> tuple[int, tuple[int, ...]]:
    """The header's (size, shape) of IDX bytes, checked: wrong magic or type is an IDXError."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise IDXError(f"{path}: IDX type 0x{raw[2]:02x} unsupported (only unsigned byte, 0x08)")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return 4 + 4 * ndim, shape


def _opened(path: Path, raw: bytes) -> bytes:
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as err:
        raise IDXError(f"{path}: corrupted gzip stream ({err})") from None


def idx_shape(path: str | Path) -> tuple[int, ...]:
    """The shape an IDX file (optionally gzipped) declares, from its header alone."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as f:
            return _header(f.read(4 + 4 * 255), path)[1]
    except (OSError, EOFError) as err:
        raise IDXError(f"{path}: corrupted gzip stream ({err})") from None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises IDXError naming the file when the magic number, the dimensions or the length are wrong.
    """
    path = Path(path)
    raw = _opened(path, path.read_bytes())
    offset, shape = _header(raw, path)
    expected = offset + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: {len(raw)} bytes, expected {expected} for shape {shape}. "
            f"Delete it and run `make data`."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(shape)


def load_split(raw_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, H, W) uint8 and labels (N,) int64 of the ``train`` or ``test`` split."""
    images_path = raw_dir / SPLIT_FILES[f"{split}_images"]
    labels_path = raw_dir / SPLIT_FILES[f"{split}_labels"]
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3:
        raise IDXError(f"{images_path}: expected 3 dimensions (N, H, W), got shape {images.shape}")
    if labels.ndim != 1:
        raise IDXError(f"{labels_path}: expected 1 dimension (N,), got shape {labels.shape}")
    if len(images) != len(labels):
        raise IDXError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, H, W) uint8
    return x, torch.from_numpy(labels.astype(np.int64))


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (as torchvision's ToTensor), on x's device."""
    return x.float().div_(255.0)
