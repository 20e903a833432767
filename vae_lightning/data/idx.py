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


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises IDXError naming the file when the magic number, the dimensions or the length are wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise IDXError(f"{path}: corrupted gzip stream ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise IDXError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise IDXError(f"{path}: IDX type 0x{raw[2]:02x} unsupported (only unsigned byte, 0x08)")
    ndim = raw[3]
    if ndim < 1 or len(raw) < 4 + 4 * ndim:
        raise IDXError(f"{path}: truncated header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + math.prod(shape)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IDXError(
            f"{path}: {what}: {len(raw)} bytes, expected {expected} for shape {shape}. "
            f"Delete it and run `make data`."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


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
