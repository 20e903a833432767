"""The seeds' future-work models beside the seeds' own, measured alike: ``make zoo`` (``vae-zoo``).

On MNIST, seed 1's MLP VAE (784-400-20) with the conditional VAE of the same shape and the IWAE
paper's two-layer hierarchical VAE; on Fashion-MNIST, seed 2's ConvVAE with its conditional
twin, seed 2's proposed deeper ConvVAE (256 channels, BatchNorm, LeakyReLU) and the VQ-VAE, whose
PixelCNN prior is fitted afterwards (prior.py, the second stage). Every run has the seeds' batch
of 128 and their data settings, and trains for the same number of epochs; each final checkpoint
is evaluated (evaluate.py) and ``<out>/ZOO.md`` gets one table. Options: conf/zoo.yaml
(``vae-zoo --help``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.errors import check_int, check_names
from vae_lightning.files import atomic_write_text
from vae_lightning.studies.markdown import fmt, md_row, pct
from vae_lightning.studies.reproduce import Result, Results, run_all

log = logging.getLogger(__name__)

# the seeds' data settings, for the models no seed experiment describes
MNIST = ("data=mnist", "data.batch_size=128", "data.val_on_test=true")
FASHION = ("data=fashion_mnist", "data.batch_size=128", "data.val_on_test=true")


@dataclass(frozen=True)
class Entry:
    """One model of the zoo: what it is, in words, and its overrides."""

    model: str
    dataset: str
    overrides: tuple[str, ...]


ENTRIES = {
    "seed1_vae": Entry("seed 1's MLP VAE, latent 20", "MNIST", ("experiment=seed1_vae_mnist",)),
    "cvae": Entry(
        "conditional VAE, seed 1's MLP", "MNIST", ("experiment=seed1_vae_mnist", "model=cvae")
    ),
    "hvae": Entry("hierarchical VAE (IWAE paper, 2 layers)", "MNIST", (*MNIST, "model=hvae")),
    "seed2_convvae": Entry(
        "seed 2's ConvVAE, latent 32", "Fashion-MNIST", ("experiment=seed2_convvae_fashion",)
    ),
    "conv_cvae": Entry(
        "conditional ConvVAE (seed 2's)",
        "Fashion-MNIST",
        ("experiment=seed2_convvae_fashion", "model=conv_cvae"),
    ),
    "conv_vae_deep": Entry(
        "deeper ConvVAE (+256, BatchNorm, LeakyReLU)",
        "Fashion-MNIST",
        ("experiment=seed2_convvae_fashion", "model=conv_vae_deep"),
    ),
    "vq_vae": Entry(
        "VQ-VAE, 128 codes, PixelCNN prior", "Fashion-MNIST", (*FASHION, "model=vq_vae")
    ),
}


def fit_prior_once(prior_epochs: int, data_dir: Path) -> Any:
    """run_all's second stage: a VQ-VAE's prior fitted (prior.py), once per checkpoint."""
    from vae_lightning.studies.prior import fit_prior

    def stage_two(name: str, last: Path) -> Path:
        if "model=vq_vae" not in ENTRIES[name].overrides:
            return last
        fitted = last.parent / "prior.ckpt"
        if _fitted_for(fitted, last, prior_epochs):
            log.info("zoo: reusing %s (%d epochs, after %s)", fitted, prior_epochs, last.name)
            return fitted
        log.info("zoo: fitting the prior of %s (%d epochs)", name, prior_epochs)
        fit_prior(last, epochs=prior_epochs, data_dir=data_dir, out=fitted, overwrite=True)
        return fitted

    return stage_two


def _fitted_for(fitted: Path, last: Path, prior_epochs: int) -> bool:
    """Whether ``fitted`` holds a prior fitted for ``prior_epochs`` epochs after ``last`` was
    written (a retrained run, or another prior length, is fitted again)."""
    import torch

    if not fitted.is_file() or fitted.stat().st_mtime < last.stat().st_mtime:
        return False
    record = torch.load(fitted, map_location="cpu", weights_only=True).get("vae_lightning", {})
    return (record.get("prior") or {}).get("epochs") == prior_epochs


def _metric(result: Result, key: str) -> float | None:
    value = result.metrics.get(key)
    return None if value is None else float(value)


def bound(result: Result) -> tuple[float | None, str]:
    """The run's bound on the negative log-likelihood and what it is."""
    if result.evaluation.get("model") == "VQVAE":
        return _metric(result, "test/loss"), "‡"
    mark = "†" if result.evaluation.get("model") == "CVAE" else ""
    return _metric(result, "test/nll_iw"), mark


def render(results: Results, epochs: int, prior_epochs: int, k: int) -> str:
    n_test = next(iter(results.values())).evaluation.get("data", {}).get("n_test", "the")
    lines = [
        "# The seeds' future-work models, measured beside seed 1's VAE and seed 2's ConvVAE",
        "",
        f"Every run: {epochs} epochs, batch 128, the seed's optimiser settings, evaluated at its"
        f" last epoch on the {n_test} test images (vae-evaluate). Nats per image; `−ELBO` is"
        " `test/loss` (one posterior sample; for the VQ-VAE exact: its posterior is a point"
        f" mass); `bound` the importance-weighted bound with k = {k}, † on −log p(x | y) (the"
        " label is given: not comparable with −log p(x), lower by at most log 10 = 2.30), ‡ the"
        " VQ-VAE's −log p(z*) − log p(x | z*) under its PixelCNN prior (fitted for"
        f" {prior_epochs} epochs by `vae-prior`). MSE per pixel of the reconstructions; FID of"
        " decoded samples against test images in the dataset classifier's features (its floor:"
        " training against test images); `RF probe` seed 2's RandomForest (100 trees,"
        " random_state 42) on the encoder's output (mean, or the quantised code map);"
        " `cond acc` the share of class-c samples that classifier assigns to c; `codes` the"
        " share of the codebook the test set uses and the codes' perplexity; `run time` the"
        " training run's (fit, probe and test; not the evaluation, nor the VQ-VAE's prior).",
        "",
        "| run | model | data | −ELBO | bound | MSE | FID (floor) | RF probe | cond acc | codes |"
        " run time |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        entry, m = ENTRIES[name], result.metrics
        value, mark = bound(result)
        fid = _metric(result, "gen/fid")
        floor = _metric(result, "gen/fid_train_test")
        codes = "—"
        if "test/usage" in m:
            codes = f"{pct(m['test/usage'])}, {fmt(m['test/perplexity'], 1)}"
        cells = [
            fmt(_metric(result, "test/loss")),
            f"{fmt(value)}{mark}",
            fmt(_metric(result, "test/mse"), 4),
            f"{fmt(fid)} ({fmt(floor)})",
            pct(result.rf_acc),
            pct(_metric(result, "gen/cond_acc")) if "gen/cond_acc" in m else "—",
            codes,
            f"{fmt(result.record.get('time/total_s'), 0)} s",
        ]
        lines.append(md_row(name, entry.model, entry.dataset, *cells))
    lines += [
        "",
        "The VQ-VAE's −ELBO and bound are the same figure (no sampling to average over); before"
        " its prior is fitted the prior is uniform and the bound is recon + 49 log 128 = recon +"
        " 237.75 (its training run's `test/loss`).",
        "",
    ]
    return "\n".join(lines)


def check(cfg: DictConfig) -> dict[str, tuple[list[str], int]]:
    """run_all's plan for the chosen runs; a ConfigError naming the key before any run."""
    epochs = check_int("epochs", cfg.epochs, 1)
    names = check_names("runs", cfg.runs, ENTRIES)
    return {n: (list(ENTRIES[n].overrides), epochs) for n in names}


@config.tool_main("zoo", doc=__doc__)
def main(cfg: DictConfig) -> None:
    """vae-zoo [epochs=3] [prior_epochs=3] [runs=[seed1_vae,...]] [out=..] [k=..] [n_fid=..]
    [train="['trainer.accelerator=cpu']"]: train, evaluate and tabulate every model (make zoo)."""
    plan = check(cfg)
    prior_epochs = check_int("prior_epochs", cfg.prior_epochs, 1)
    k = check_int("k", cfg.k, 1)
    n_fid = check_int("n_fid", cfg.n_fid, 1)
    classifier_epochs = check_int("classifier_epochs", cfg.classifier_epochs, 1)
    extra = [str(o) for o in cfg.train or []]
    out = Path(cfg.out) if cfg.out else config.root_dir() / "outputs" / f"zoo_{cfg.epochs}ep"
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(cfg.data_dir).resolve()
    eval_kwargs: dict[str, Any] = {"k": k, "n_fid": n_fid, "classifier_epochs": classifier_epochs}
    results = run_all(
        out, data_dir, plan, extra, eval_kwargs, stage_two=fit_prior_once(prior_epochs, data_dir)
    )
    path = out / "ZOO.md"
    atomic_write_text(path, render(results, cfg.epochs, prior_epochs, k))
    log.info("zoo: report written: %s", path)


if __name__ == "__main__":
    raise SystemExit(main())
