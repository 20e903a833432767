"""The data: IDX files (``idx``), where they come from and how they are checked (``sources``,
also ``vae-data``), in-memory batches (``batches``) and the LightningDataModules
(``datamodules``).

This floor imports no other floor of the package (only ``config``, ``errors`` and ``files``):
it knows nothing of the models that read its batches. The DataModules are exported here
(``vae_lightning.data.MNISTDataModule``, as the configs name them) and imported on first use,
so that ``vae-data`` starts without Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FashionMNISTDataModule": "datamodules", "IDXDataModule": "datamodules",
    "MNISTDataModule": "datamodules", "to_unit_float": "idx",
    "InMemoryBatches": "batches", "IDXError": "idx", "load_split": "idx", "read_idx": "idx",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
