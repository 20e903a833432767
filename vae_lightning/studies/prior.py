"""The VQ-VAE's second stage: ``vae-prior ckpt=<run folder>/checkpoints/last.ckpt``, with the
settings of ``conf/prior.yaml``.

Fits the model's autoregressive prior (``VQVAE.prior``, a PixelCNN over the 7x7 code map) to the
codes its frozen encoder gives the training split, by maximum likelihood, with a Lightning
Trainer on the run's own DataModule (the same split, binarization and seed). The encoder,
decoder and codebook are not changed. Writes ``<run folder>/checkpoints/prior.ckpt``: the run's
checkpoint with the fitted prior (``prior_fitted`` true), which ``vae-evaluate`` and
``VQVAE.load_from_checkpoint`` read like any other; the run's own checkpoints are left as they
are, and an existing ``prior.ckpt`` is refused unless ``overwrite=true``. Logs ``prior/train_nll``
and ``prior/val_nll`` (nats per image, -log p(z*) of the encoder's code map) to TensorBoard in
``<run folder>/prior/``.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning import config
from vae_lightning.errors import ConfigError, check_float, check_int
from vae_lightning.files import atomic_write
from vae_lightning.run import checkpoints

log = logging.getLogger(__name__)


class PriorFit(L.LightningModule):
    """Trains ``model.prior`` on ``model``'s code maps; everything else in ``model`` is frozen
    and stays in eval mode (no codebook update, no dead-code restart)."""

    def __init__(self, model: Any, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr
        model.requires_grad_(False)
        model.prior.requires_grad_(True)

    def train(self, mode: bool = True) -> PriorFit:
        super().train(mode)
        self.model.eval()
        self.model.prior.train(mode)
        return self

    def _nll(self, batch: Any) -> torch.Tensor:
        x, _ = batch  # (B, C, H, W) in [0, 1], converted by the DataModule
        with torch.no_grad():
            codes = self.model.codes(x)  # (B, 7, 7)
        logits = self.model.prior(codes)  # (B, K, 7, 7)
        nll = torch.nn.functional.cross_entropy(logits.float(), codes, reduction="none")
        return nll.flatten(1).sum(1).mean()  # nats per image

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        nll = self._nll(batch)
        self.log("prior/train_nll", nll, on_step=False, on_epoch=True, prog_bar=True)
        return nll

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("prior/val_nll", self._nll(batch), on_epoch=True, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.prior.parameters(), lr=self.lr)


def fit_prior(
    ckpt: Path | str,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    data_dir: Path | str | None = None,
    accelerator: str = "auto",
    out: Path | str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Fit the prior of the VQ-VAE at ``ckpt``; write the checkpoint with it; return its record."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from vae_lightning.evaluation.subject import load_subject

    epochs = check_int("epochs", epochs, 1)
    lr = check_float("lr", lr, 0.0, inclusive=False)
    batch_size = check_int("batch_size", batch_size, 1)
    name = checkpoints.model_class(checkpoints.read(ckpt, "ckpt"), Path(ckpt), "ckpt")
    if name != "VQVAE":
        raise ConfigError(
            "ckpt", f"holds a {name}; vae-prior fits the code prior of a VQ-VAE (model=vq_vae)"
        )
    subject = load_subject(ckpt, data_dir, batch_size, torch.device("cpu"))
    target = Path(out) if out is not None else subject.ckpt.parent / "prior.ckpt"
    if target.resolve() == subject.ckpt:
        raise ConfigError("out", f"is the checkpoint being read ({target}): give another file")
    if target.exists() and not overwrite:
        raise ConfigError(
            "out", f"{target} exists: overwrite=true replaces it, or give out=<another file>"
        )
    L.seed_everything(subject.seed, verbose=False)
    fit = PriorFit(subject.model, lr)
    trainer = L.Trainer(
        max_epochs=epochs, accelerator=accelerator, devices=1, enable_checkpointing=False,
        logger=TensorBoardLogger(subject.run_dir, name="prior", version=""),
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # the frozen encoder, decoder and codebook are in eval mode on purpose (PriorFit.train)
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode")
        trainer.fit(fit, datamodule=subject.dm)
    model = subject.model.cpu()
    model.prior_fitted.fill_(True)
    record = {
        "from": str(subject.ckpt),
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seconds": time.perf_counter() - t0,
        **{key: float(value) for key, value in trainer.callback_metrics.items()},
    }
    checkpoint = checkpoints.read(subject.ckpt, "ckpt")
    checkpoint["state_dict"] = {key: value.cpu() for key, value in model.state_dict().items()}
    checkpoint.setdefault("vae_lightning", {})["prior"] = record
    atomic_write(target, lambda tmp: torch.save(checkpoint, tmp))
    log.info("prior: val -log p(z) %.2f nats per image; wrote %s", record["prior/val_nll"], target)
    return {**record, "checkpoint": str(target)}


def run(cfg: DictConfig) -> None:
    """``vae-prior ckpt=PATH [key=value ...]``; the settings are conf/prior.yaml's."""
    settings = OmegaConf.to_container(cfg, resolve=True)
    if settings.get("ckpt") is None:
        raise ConfigError(
            "ckpt", "is required: ckpt=<run folder of model=vq_vae>/checkpoints/last.ckpt"
        )
    fit_prior(**settings)


main = config.tool_main("prior", doc=__doc__)(run)


if __name__ == "__main__":
    sys.exit(main())
