"""The test-set measures ``vae-evaluate`` reports: each returns its metrics and its record for
``eval.json``. Functions of a ``Subject`` (``subject.py``) and its test images."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from vae_lightning.evaluation.fid import CLASSIFIER_SEED, FIDClassifier
from vae_lightning.evaluation.subject import Subject

if TYPE_CHECKING:
    from vae_lightning.models import Autoencoder

log = logging.getLogger(__name__)

ROWS_PER_PASS = 20_000
# The FID classifier's seed is fixed, not the run's: every run of a dataset is then measured
# in the same feature space and their FIDs can be compared.
ACTIVE_UNITS_THRESHOLD = 0.01  # on Var_x of mu_d (Burda et al.)
LIKELIHOOD = {
    "binary": "Bernoulli on binary images: a log-likelihood",
    "grey": "Bernoulli on grey levels: the training objective's scale, not a normalised "
    "density (evaluate a binarized run for a log-likelihood)",
}
# the integer settings and their lowest values; OPTIONAL ones may also be null


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    return ((i, min(i + size, n)) for i in range(0, n, size))


def _subset(images: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    if n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]]


@torch.no_grad()
def mean_terms(
    model: Autoencoder, x: torch.Tensor, batch_size: int, y: torch.Tensor | None = None
) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Means over the test set of ``model.terms`` (the training definitions); for a VAE also
    ``test/active_units`` and the record of the KL per dimension and Var_x of mu. ``y``: the
    labels (a conditional model reads them)."""
    from vae_lightning.evaluation.metrics import LatentMoments, active_units
    from vae_lightning.models.losses import gaussian_kl

    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    moments = LatentMoments() if model.variational else None
    for lo, hi in _batches(len(x), batch_size):
        xb = x[lo:hi].to(device)  # (B, C, H, W) float
        yb = None if y is None else y[lo:hi].to(device)
        for key, value in model.terms(xb, y=yb).items():
            if value.ndim == 0:  # a batch mean (the rest are per-image outputs) -> a sum
                sums[key] = sums.get(key, 0.0) + float(value) * (hi - lo)
        if moments is not None:
            mu, logvar = model.encode(xb, yb)  # (B, D)
            moments.update(mu, gaussian_kl(mu, logvar))
    metrics = {f"test/{k}": v / len(x) for k, v in sums.items()}
    if moments is None:
        return metrics, None
    mu_var = moments.mu_variance()
    metrics["test/active_units"] = float(active_units(mu_var, ACTIVE_UNITS_THRESHOLD))
    return metrics, {
        "kl_per_dim": [round(float(v), 6) for v in moments.kl_per_dim()],
        "mu_variance": [round(float(v), 6) for v in mu_var],
        "active_units_threshold": ACTIVE_UNITS_THRESHOLD,
    }


@torch.no_grad()
def codebook_use(
    model: Autoencoder, x: torch.Tensor, batch_size: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """A VQ-VAE's use of its codebook over the whole test set (its training logs the same keys
    per batch): ``test/usage``, the share of the K codes that some test image's code map uses,
    and ``test/perplexity``, exp of the entropy of the codes' frequencies (K when all are used
    equally); the record holds the counts and the prior that ``test/loss`` bounds with."""
    device = next(model.parameters()).device
    k = model.hparams.codebook_size
    counts = torch.zeros(k, dtype=torch.long)
    for lo, hi in _batches(len(x), batch_size):
        counts += torch.bincount(model.codes(x[lo:hi].to(device)).flatten().cpu(), minlength=k)
    p = counts.double() / counts.sum()
    perplexity = float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))
    usage = float((counts > 0).double().mean())
    log.info(
        "codebook: %d of %d codes used, perplexity %.1f", int((counts > 0).sum()), k, perplexity
    )
    fitted = bool(model.prior_fitted)
    return {"test/perplexity": perplexity, "test/usage": usage}, {
        "codebook_size": k,
        "counts": counts.tolist(),
        "prior": "PixelCNN fitted by vae-prior" if fitted else "uniform (vae-prior not run)",
        # the posterior is a point mass on the code map z*: log p(x) >= log p(z*) + log p(x|z*)
        "bounds": "-log p(x) <= -log p(z*) - log p(x | z*) = test/loss (test/kl = -log p(z*))",
    }


def nll_iw(
    subject: Subject,
    x: torch.Tensor,
    k: int,
    chunk: int,
    negative_elbo: float,
    y: torch.Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Any]]:
    """``test/nll_iw``: ``iwae_bound`` over the test set, a few images at a time."""
    from vae_lightning.evaluation.metrics import iwae_bound

    t0 = time.perf_counter()
    generator = torch.Generator(device=subject.device).manual_seed(subject.seed)
    per_call = max(1, ROWS_PER_PASS // min(chunk, k))
    nll = torch.cat(
        [
            iwae_bound(
                subject.model,
                x[lo:hi].to(subject.device),
                k,
                chunk,
                generator,
                None if y is None else y[lo:hi].to(subject.device),
            ).cpu()
            for lo, hi in _batches(len(x), per_call)
        ]
    )  # (N,) nats
    seconds, mean = time.perf_counter() - t0, float(nll.mean())
    log.info("test/nll_iw (k=%d): %.3f nats (%.1f s)", k, mean, seconds)
    if mean > negative_elbo + 0.5:  # a bound worse than k = 1: a bug
        log.warning("test/nll_iw %.3f exceeds the single-sample -ELBO %.3f", mean, negative_elbo)
    return {"test/nll_iw": mean}, {
        "k": k,
        "chunk": chunk,
        "n_images": len(nll),
        "std_over_images": float(nll.std()) if len(nll) > 1 else 0.0,
        "likelihood": LIKELIHOOD["grey" if subject.dm.binarize == "none" else "binary"],
        # a conditional model's bound is on -log p(x | y): it is given the label, so it is not
        # comparable with an unconditional model's -log p(x) (lower by up to log 10 nats)
        "bounds": "-log p(x | y)" if subject.model.conditional else "-log p(x)",
        "seconds": seconds,
    }


def frechet_distances(
    subject: Subject, fid_classifier: FIDClassifier, n_fid: int, batch_size: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """gen/fid (samples vs test images) and gen/fid_train_test (the floor); for a conditional
    model also gen/cond_acc: the share of its class-c samples that the classifier assigns to c
    (the classes drawn in turn)."""
    from vae_lightning.evaluation.fid import classifier_accuracy, frechet_distance

    model, seed = subject.model, subject.seed
    # The classifier and the distances see grey images (the raw files), whatever the run's
    # binarization; samples are the decoder's pixel means.
    classifier, accuracy = fid_classifier.model, fid_classifier.accuracy
    train_grey, test_grey = fid_classifier.train, fid_classifier.test
    n = min(n_fid, len(test_grey))
    real = _subset(test_grey, n, seed)
    generator = torch.Generator(device=subject.device).manual_seed(seed + 1)
    labels = torch.arange(n) % model.hparams.num_classes if model.conditional else None
    draws = (
        model.sample(
            hi - lo, generator=generator,
            y=None if labels is None else labels[lo:hi].to(subject.device),
        )
        for lo, hi in _batches(n, batch_size)
    )  # fmt: skip
    fake = torch.cat([images.float().cpu() for images in draws])  # (n, C, H, W) in [0, 1]
    fid = frechet_distance(real, fake, classifier, batch_size)
    floor = frechet_distance(real, _subset(train_grey, n, seed + 1), classifier, batch_size)
    log.info(
        "gen/fid: %.3f (train vs test floor %.3f; classifier accuracy %.4f)", fid, floor, accuracy
    )
    metrics = {"gen/fid": fid, "gen/fid_train_test": floor, "classifier/test_acc": accuracy}
    if labels is not None:
        metrics["gen/cond_acc"] = classifier_accuracy(classifier, fake, labels)
        log.info("gen/cond_acc: %.4f", metrics["gen/cond_acc"])
    fake_z = _sampled_from(model)
    return metrics, {
        "n": n,
        "real": "test images (grey)",
        "fake": f"decoded samples (pixel means){fake_z}",
        "floor": "training images against test images",
        "classifier": str(fid_classifier.path),
        "classifier_test_acc": accuracy,
        "classifier_seed": fid_classifier.seed,
        "independent": _independent_judge(model, fid_classifier.seed),
        "feature_dim": classifier.feature_dim,
    }


def _sampled_from(model: Any) -> str:
    """What a model's samples are decoded from, for eval.json's fid record."""
    if model.variational:
        return ""
    if not hasattr(model, "prior_fitted"):
        return " of z from the Gaussian fitted to the AE's codes"
    if bool(model.prior_fitted):
        return " of code maps from the PixelCNN prior"
    log.warning("this VQ-VAE's prior is uniform: vae-prior fits the PixelCNN its samples need")
    return " of uniformly drawn code maps (vae-prior not run)"


def _independent_judge(model: Any, classifier_seed: int) -> bool:
    """Whether FID's classifier is another one than the model's feature-matching loss was
    trained against (the default one, seed ``CLASSIFIER_SEED``): in the same features, FID
    rewards the objective itself and is no longer an independent judge."""
    if not float(model.hparams.get("feature_loss_weight") or 0.0):
        return True
    if classifier_seed != CLASSIFIER_SEED:
        return True
    log.warning(
        "gen/fid is measured in the features this model's feature-matching loss was trained "
        "on, so it is not an independent judge; classifier_seed=1 measures it with another "
        "classifier"
    )
    return False


def latent_probes(
    subject: Subject, batch_size: int, max_train: int | None
) -> tuple[dict[str, float], dict[str, Any]]:
    """The latent probes (fit_probes) on the embeddings of the train split and the test set."""
    from vae_lightning.evaluation.metrics import embed_images
    from vae_lightning.evaluation.probes import fit_probes

    model, dm, seed = subject.model, subject.dm, subject.seed
    (train_x, train_y), (test_x, test_y) = dm.splits["train"], dm.splits["test"]
    if max_train:  # the same seed and length: the same permutation for images and labels
        train_x, train_y = _subset(train_x, max_train, seed), _subset(train_y, max_train, seed)
    train_z, test_z = (
        embed_images(model, x, batch_size, labels=y).numpy()
        for x, y in ((train_x, train_y), (test_x, test_y))
    )
    # seed 2's RandomForest (random_state=42, fit_probes' default)
    res = fit_probes(train_z, train_y.numpy(), test_z, test_y.numpy(), num_classes=len(dm.classes))
    return {f"probe/{key}_acc": value for key, value in res.accuracy.items()}, {
        "features": "mu" if model.variational else "z",
        "n_train": res.n_train,
        "n_test": res.n_test,
        "classes": list(dm.classes),
        "confusion_rf": res.confusion.tolist(),
    }
