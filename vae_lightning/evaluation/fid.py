"""The Fréchet distance of generated images, in the feature space of a small classifier trained
(once, then cached) on the same dataset: ``gen/fid``.

The classifier stands in for Inception, which neither fits 28x28 grey images nor can be
downloaded here; torchmetrics' ``FrechetInceptionDistance`` does the maths with it as its
feature extractor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vae_lightning.data.idx import to_unit_float
from vae_lightning.errors import ConfigError, DataError
from vae_lightning.files import atomic_write, file_lock
from vae_lightning.models import eval_mode
from vae_lightning.models.networks import ClassifierFeatures, FeatureClassifier
from vae_lightning.run.checkpoints import load_weights_only, torch_reason

log = logging.getLogger(__name__)

# Bump when FeatureClassifier or its training changes: cached weights of another version are
# refused (retrain_classifier=true replaces them) rather than silently reused.
CLASSIFIER_VERSION = 1
# The lowest held-out test accuracy an FID classifier may have (vae-evaluate's
# classifier_min_accuracy). Its features define gen/fid: a classifier near chance (0.10) gives
# small, confident and meaningless distances. Trained for the default 4 epochs on the CPU, the
# classifiers reached 0.993 (MNIST) and 0.914 (Fashion-MNIST); the floor is well below both and
# far above chance.
CLASSIFIER_MIN_ACCURACY = 0.80
# The default classifier's seed: its cache is <data_dir>/classifiers/<dataset>.pt, and it is the
# one a model's feature-matching loss (model.feature_loss_weight) is trained against. Another
# seed (vae-evaluate's classifier_seed) is a second, separately cached classifier: an FID judge
# independent of those features.
CLASSIFIER_SEED = 0
# the vae-evaluate settings that a cached classifier's record holds under another name
SETTINGS = {"epochs": "classifier_epochs", "max_steps": "classifier_max_steps"}


def _as_unit_float(images: torch.Tensor) -> torch.Tensor:
    return to_unit_float(images) if images.dtype == torch.uint8 else images.float()


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_feature_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    epochs: int = 4,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    num_classes: int = 10,
    max_shift: int = 2,
) -> FeatureClassifier:
    """Train a FeatureClassifier on uint8 (or [0, 1] float) images (N, 1, 28, 28).

    AdamW with a one-cycle learning-rate schedule and random translations of up to
    ``max_shift`` pixels; seeded (initialisation, order, dropout) without touching the global
    RNG. ``max_steps`` stops early (tests). Returns the classifier in eval mode, on ``device``.
    """
    device = torch.device(device) if device is not None else _default_device()
    n = len(train_images)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = FeatureClassifier(num_classes=num_classes).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(total, 1))
        g = torch.Generator().manual_seed(seed)
        model.train()
        step = 0
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[i * batch_size : (i + 1) * batch_size]
                x = _as_unit_float(train_images[idx].to(device))  # (b, 1, 28, 28)
                if max_shift > 0:
                    x = _random_shift(x, max_shift, g)
                y = train_labels[idx].to(device)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
    return model.eval()


def _random_shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (zero fill): (B, C, H, W) -> same."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (B, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=g).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@torch.no_grad()
def classifier_accuracy(
    classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``classifier`` on uint8 or [0, 1] float images."""
    device = next(classifier.parameters()).device
    correct = 0
    with eval_mode(classifier):
        for i in range(0, len(images), batch_size):
            x = _as_unit_float(images[i : i + batch_size].to(device))
            pred = classifier(x).argmax(1).cpu()
            correct += int((pred == labels[i : i + batch_size]).sum())
    return correct / len(images)


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _setting(value: Any) -> str:
    return "null" if value is None else str(value)


def _read_cache(weights: Path, device: torch.device) -> tuple[dict, dict]:
    """The cached classifier's record and weights, or a DataError saying how to replace them."""
    replace = "Pass retrain_classifier=true to replace it with a newly trained one."
    saved = load_weights_only(weights, advice=replace, map_location=device)
    if not (
        isinstance(saved, dict)
        and isinstance(saved.get("record"), dict)
        and isinstance(saved.get("state_dict"), dict)
    ):
        raise DataError(f"{weights} is not a cached FID classifier (no record). {replace}")
    return saved["record"], saved["state_dict"]


def _check_record(weights: Path, record: dict, wanted: dict, any_settings: bool) -> None:
    """Refuse a cached classifier trained otherwise than ``wanted`` asks: replacing it changes
    every later evaluation's FID, so only ``retrain_classifier=true`` does. ``any_settings``:
    its training length (``SETTINGS``) may be any."""
    differ = [
        key for key, value in wanted.items()
        if record.get(key) != value and not (any_settings and key in SETTINGS)
    ]  # fmt: skip
    settings = [key for key in differ if key in SETTINGS]
    if settings:
        had = ", ".join(f"{SETTINGS[k]}={_setting(record.get(k))}" for k in SETTINGS)
        asked = ", ".join(f"{SETTINGS[k]}={_setting(wanted[k])}" for k in SETTINGS)
        raise ConfigError(
            SETTINGS[settings[0]],
            f"is {_setting(wanted[settings[0]])}, but the cached FID classifier {weights} was "
            f"trained with {had} (asked: {asked}). Pass retrain_classifier=true to replace it "
            f"(later evaluations on {wanted['dataset']} then use the new one), or "
            f"{had.replace(',', '')} to use it",
        )
    if differ:
        why = {
            "data_sha1": f"on other {wanted['dataset']} image files than the ones there now",
            "version": f"by classifier version {record.get('version')}, not {CLASSIFIER_VERSION}",
        }
        reasons = [why.get(k, f"with {k}={record.get(k)!r}, not {wanted[k]!r}") for k in differ]
        raise DataError(
            f"the cached FID classifier {weights} was trained {' and '.join(reasons)}; it was "
            f"left as it is. Pass retrain_classifier=true to replace it"
        )


def _cached_classifier(
    weights: Path, wanted: dict, device: torch.device, any_settings: bool
) -> tuple[FeatureClassifier, float] | None:
    """The cached classifier and its test accuracy; None when there is none; an error when it
    cannot be read or was trained otherwise than ``wanted`` asks."""
    if not weights.is_file():
        return None
    record, state = _read_cache(weights, device)
    _check_record(weights, record, wanted, any_settings)
    try:
        model = FeatureClassifier(num_classes=int(record["num_classes"]))
        model.load_state_dict(state)
        accuracy = float(record["test_accuracy"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DataError(
            f"{weights} does not hold a FeatureClassifier ({torch_reason(err)}). Pass "
            f"retrain_classifier=true to replace it with a newly trained one."
        ) from None
    log.info("classifier: %s (test accuracy %.4f)", weights, accuracy)
    return model.to(device).eval(), accuracy


def _train(
    wanted: dict,
    device: torch.device,
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    **train_kwargs: Any,
) -> tuple[FeatureClassifier, dict[str, Any]]:
    """Train the classifier and measure it on the test set: the model and its record."""
    (train_images, train_labels), (test_images, test_labels) = train, test
    t0 = time.perf_counter()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    model = train_feature_classifier(
        train_images,
        train_labels,
        device=device,
        **train_kwargs,
        num_classes=num_classes,
    )
    seconds = time.perf_counter() - t0
    accuracy = classifier_accuracy(model, test_images, test_labels)
    log.info("classifier: trained in %.1f s, test accuracy %.4f", seconds, accuracy)
    return model, {
        **wanted,
        "num_classes": num_classes,
        "test_accuracy": accuracy,
        "n_train": len(train_images),
        "n_test": len(test_images),
        "train_seconds": seconds,
        "device": str(device),
    }


def _write_cache(model: FeatureClassifier, record: dict, weights: Path, record_path: Path) -> None:
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_write(weights, lambda p: torch.save({"state_dict": state, "record": record}, p))
    atomic_write(record_path, lambda p: p.write_text(json.dumps(record, indent=2) + "\n"))
    log.info("classifier: cached in %s", weights)


def _check_accuracy(
    accuracy: float, min_accuracy: float, weights: Path, record: dict, fresh: bool
) -> None:
    """Refuse a classifier below the floor: its features would make gen/fid meaningless."""
    if accuracy >= min_accuracy:
        return
    below = (
        f"reaches {accuracy:.4f} test accuracy, below classifier_min_accuracy={min_accuracy}: "
        f"its features would make gen/fid meaningless, so no FID was computed"
    )
    if not fresh:
        raise DataError(
            f"the cached FID classifier {weights} {below}. Replace it: retrain_classifier=true, "
            f"with enough training (more classifier_epochs, classifier_max_steps=null)"
        )
    kept = f"the cached one in {weights} was kept" if weights.is_file() else "nothing was cached"
    raise DataError(
        f"the FID classifier just trained on {record['dataset']} (classifier_epochs="
        f"{record['epochs']}, classifier_max_steps={_setting(record['max_steps'])}) {below}, "
        f"and {kept}. Train it longer (more classifier_epochs, classifier_max_steps=null), or "
        f"lower classifier_min_accuracy for images that cannot be classified better"
    )


@dataclass(frozen=True)
class ClassifierSettings:
    """How a dataset's FID classifier is obtained (vae-evaluate's ``classifier_*`` settings):
    trained for ``epochs`` (or ``max_steps``) from ``seed`` when it is not cached; ``retrain``
    replaces the cache; one below ``min_accuracy`` is refused; ``any_settings`` takes a cache
    of any training length (for those who did not choose one)."""

    epochs: int = 4
    max_steps: int | None = None
    seed: int = CLASSIFIER_SEED
    retrain: bool = False
    min_accuracy: float = CLASSIFIER_MIN_ACCURACY
    any_settings: bool = False


Split = tuple[torch.Tensor, torch.Tensor]  # images (N, 1, 28, 28) uint8 and labels (N,)


def load_or_train_classifier(
    dataset_name: str,
    data_dir: Path,
    train: Split,
    test: Split,
    settings: ClassifierSettings | None = None,
    device: str | torch.device | None = None,
) -> tuple[FeatureClassifier, float]:
    """The dataset's FeatureClassifier and its test accuracy, trained once and cached.

    Cached under ``<data_dir>/classifiers/<dataset_name>.pt`` (``<dataset_name>_seed<seed>.pt``
    for a seed other than ``CLASSIFIER_SEED``; weights and a record, loaded with
    ``weights_only=True``) with a readable copy of the record in a ``.json`` of the same name. When
    there is no cache, the classifier is trained and cached. A cache is used only when its
    record matches this request (classifier version, epochs, max_steps, seed and a fingerprint
    of the images and labels); one that does not, or cannot be read, is an error and is left as
    it is (``settings.any_settings``: a cache of any training length is used): every later
    evaluation measures FID with it, so only ``settings.retrain`` (vae-evaluate's
    ``retrain_classifier=true``) trains a new one and replaces the files (atomically).

    A classifier, cached or new, whose test accuracy is below ``settings.min_accuracy``
    (``classifier_min_accuracy``) is refused with a DataError, and a new one is then not
    cached. Errors name vae-evaluate's settings. A file lock keeps parallel evaluations from
    training it twice.
    """
    s = settings or ClassifierSettings()
    device = torch.device(device) if device is not None else _default_device()
    folder = Path(data_dir) / "classifiers"
    folder.mkdir(parents=True, exist_ok=True)
    weights = classifier_path(data_dir, dataset_name, s.seed)
    record_path = weights.with_suffix(".json")
    wanted = {
        "dataset": dataset_name,
        "version": CLASSIFIER_VERSION,
        "epochs": s.epochs,
        "max_steps": s.max_steps,
        "seed": s.seed,
        "data_sha1": _fingerprint(*train, *test),
    }
    with file_lock(folder / f".{weights.stem}.lock"):
        cached = None if s.retrain else _cached_classifier(weights, wanted, device, s.any_settings)
        if cached is not None:
            _check_accuracy(cached[1], s.min_accuracy, weights, wanted, fresh=False)
            return cached
        model, record = _train(
            wanted, device, train, test, epochs=s.epochs, seed=s.seed, max_steps=s.max_steps
        )
        _check_accuracy(record["test_accuracy"], s.min_accuracy, weights, record, fresh=True)
        _write_cache(model, record, weights, record_path)
        return model, record["test_accuracy"]


def classifier_path(data_dir: Path | str, dataset_name: str, seed: int = CLASSIFIER_SEED) -> Path:
    """Where the classifier of ``dataset_name`` trained with ``seed`` is cached."""
    suffix = "" if seed == CLASSIFIER_SEED else f"_seed{seed}"
    return Path(data_dir) / "classifiers" / f"{dataset_name}{suffix}.pt"


@dataclass
class FIDClassifier:
    """A dataset's FID classifier, its test accuracy, and the grey training and test images
    (uint8 (N, 1, 28, 28)) it was trained and tested on."""

    model: FeatureClassifier
    accuracy: float
    train: torch.Tensor
    test: torch.Tensor
    seed: int
    path: Path  # its cache


def classifier_of(
    dataset: str,
    data_dir: Path,
    device: torch.device | str | None = None,
    settings: ClassifierSettings | None = None,
    **keys: Any,
) -> FIDClassifier:
    """The dataset's classifier: trained once, then cached (``load_or_train_classifier``);
    ``settings`` (or the same as keywords: ``seed=1``, ``any_settings=True``) say how."""
    from vae_lightning.data import load_split
    from vae_lightning.data.sources import get_spec

    settings = settings or ClassifierSettings(**keys)
    raw = get_spec(dataset).raw_dir(data_dir)
    train, test = load_split(raw, "train"), load_split(raw, "test")
    classifier, accuracy = load_or_train_classifier(
        dataset, Path(data_dir), train, test, settings, device
    )
    path = classifier_path(data_dir, dataset, settings.seed)
    return FIDClassifier(classifier, accuracy, train[0], test[0], settings.seed, path)


@torch.no_grad()
def frechet_distance(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    classifier: FeatureClassifier,
    batch_size: int = 1000,
) -> float:
    """Fréchet distance between two image sets in ``classifier``'s feature space.

    torchmetrics' FrechetInceptionDistance with ``ClassifierFeatures`` as its feature extractor
    (Gaussians fitted to the features of each set). Images: uint8 in [0, 255] or float in
    [0, 1], (N, 1, 28, 28), on any device; computed on the classifier's device.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    device = next(classifier.parameters()).device
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier)).to(device)
    for images, real in ((real_images, True), (fake_images, False)):
        for i in range(0, len(images), batch_size):
            fid.update(images[i : i + batch_size].to(device), real=real)
    return float(fid.compute())


def feature_classifier_for(datamodule: Any) -> FeatureClassifier:
    """The feature-matching loss's frozen features: the dataset's default FID classifier, cached
    under <data_dir>/classifiers (``make classifiers``), or trained now with vae-evaluate's
    defaults and cached (3 minutes on 2 CPU cores for Fashion-MNIST)."""
    datamodule.prepare_data()  # the raw files the classifier is trained on (fetched if missing)
    try:
        found = classifier_of(datamodule.dataset_name, datamodule.data_dir, any_settings=True)
    except DataError as err:
        raise DataError(
            f"model.feature_loss_weight needs {datamodule.dataset_name}'s classifier: {err}. "
            f"Prepare one with vae-evaluate classifiers=true data_dir={datamodule.data_dir} "
            f"datasets={datamodule.dataset_name} (classifier_epochs=...), then train again"
        ) from None
    log.info("feature loss: classifier %s (test accuracy %.4f)", found.path, found.accuracy)
    return found.model
