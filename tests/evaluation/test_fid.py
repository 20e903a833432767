"""The Fréchet distance and the dataset classifiers it uses (evaluation.fid): the distance
against its formula and its behaviour under shifts, a classifier that learns, trained once and
cached, replaced only when asked, and refused below the accuracy floor or when its cache is
damaged. (That a cached classifier below the floor reaches vae-evaluate's user as one line:
tests/test_cli.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from tests.conftest import synthetic_images
from vae_lightning.errors import ConfigError, DataError
from vae_lightning.evaluation import fid
from vae_lightning.evaluation.fid import (
    ClassifierSettings,
    classifier_accuracy,
    frechet_distance,
    load_or_train_classifier,
    train_feature_classifier,
)
from vae_lightning.models.networks import ClassifierFeatures, FeatureClassifier


def _images(n: int, seed: int) -> torch.Tensor:
    images, _ = synthetic_images(n, seed)
    return torch.from_numpy(images).unsqueeze(1)  # (N, 1, 28, 28) uint8


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    torch.manual_seed(0)
    clf = FeatureClassifier().eval()  # untrained: random features are enough for this
    real, other = _images(300, 1), _images(300, 2)
    shifted = torch.roll(real, shifts=4, dims=2)  # the bands move down 4 pixels
    noisy = (real.float() + 60 * torch.randn(real.shape)).clamp(0, 255).to(torch.uint8)

    same = frechet_distance(real, real, clf, batch_size=128)
    # uint8 and float [0, 1] inputs are the same images
    same_float = frechet_distance(real, real.float() / 255, clf, batch_size=128)
    resampled = frechet_distance(real, other, clf, batch_size=128)
    moved = frechet_distance(real, shifted, clf, batch_size=128)
    noised = frechet_distance(real, noisy, clf, batch_size=128)
    assert abs(same) < 1e-6 and abs(same_float) < 1e-6
    assert resampled > 0
    assert moved > 5 * resampled and noised > 5 * resampled, (resampled, moved, noised)


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")  # dead ReLUs: singular covs
def test_frechet_distance_matches_the_formula_on_the_classifier_features():
    from scipy import linalg

    torch.manual_seed(1)
    clf = FeatureClassifier().eval()
    a, b = _images(200, 3), torch.roll(_images(200, 4), shifts=2, dims=3)
    with torch.no_grad():
        fa, fb = (ClassifierFeatures(clf)(x).numpy() for x in (a, b))
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a, cov_b = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    expected = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean)
    assert frechet_distance(a, b, clf, batch_size=100) == pytest.approx(expected, rel=1e-4)


def _splits() -> list[torch.Tensor]:
    """Synthetic train images, labels, test images, labels (uint8 (N, 1, 28, 28), int64)."""
    (tx, ty), (vx, vy) = synthetic_images(640, 11), synthetic_images(256, 12)
    return [
        torch.from_numpy(tx).unsqueeze(1),
        torch.from_numpy(ty.astype(np.int64)),
        torch.from_numpy(vx).unsqueeze(1),
        torch.from_numpy(vy.astype(np.int64)),
    ]


def obtain(root, splits, device=None, **settings):
    """load_or_train_classifier of MNIST's ``splits`` (images, labels, test images, labels)."""
    train, test = tuple(splits[:2]), tuple(splits[2:])
    return load_or_train_classifier("mnist", root, train, test, ClassifierSettings(**settings),
                                    device)  # fmt: skip


def test_feature_classifier_learns():
    tx, ty, vx, vy = _splits()
    # no translations here: the synthetic class is the height of a band, 2 pixels per class
    clf = train_feature_classifier(tx, ty, epochs=2, batch_size=64, device="cpu", max_shift=0)
    assert classifier_accuracy(clf, vx, vy) >= 0.9
    assert clf.features(vx[:5].float() / 255).shape == (5, clf.feature_dim)


def test_classifier_is_trained_once_cached_and_replaced_only_when_asked(tmp_path, monkeypatch):
    splits = _splits()
    # min_accuracy=0: 3 steps on the synthetic images stay near chance (the floor's own tests
    # are below)
    clf, acc = obtain(tmp_path, splits, epochs=1, max_steps=3, device="cpu", min_accuracy=0)
    assert acc == classifier_accuracy(clf, splits[2], splits[3])
    weights, record = tmp_path / "classifiers" / "mnist.pt", tmp_path / "classifiers" / "mnist.json"
    saved = torch.load(weights, weights_only=True)
    assert (
        saved["record"]["test_accuracy"] == acc == json.loads(record.read_text())["test_accuracy"]
    )
    assert not list((tmp_path / "classifiers").glob("*.part"))

    calls = []
    real_train = fid.train_feature_classifier
    monkeypatch.setattr(
        fid,
        "train_feature_classifier",
        lambda *a, **kw: calls.append(kw) or real_train(*a, **kw),
    )
    again, acc2 = obtain(tmp_path, splits, epochs=1, max_steps=3, device="cpu", min_accuracy=0)
    assert calls == [] and acc2 == acc
    for p, q in zip(clf.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)

    # asked otherwise: an error naming the setting and retrain_classifier; the cache untouched
    cached = weights.read_bytes(), record.read_text()
    with pytest.raises(ConfigError) as err:
        obtain(tmp_path, splits, epochs=1, max_steps=2, device="cpu", min_accuracy=0)
    assert str(err.value) == (
        f"classifier_max_steps is 2, but the cached FID classifier {weights} was trained with "
        "classifier_epochs=1, classifier_max_steps=3 (asked: classifier_epochs=1, "
        "classifier_max_steps=2). Pass retrain_classifier=true to replace it (later evaluations "
        "on mnist then use the new one), or classifier_epochs=1 classifier_max_steps=3 to use it"
    )
    # other images than it was trained on: the same
    other = [splits[0].flip(0), *splits[1:]]
    with pytest.raises(DataError, match=r"trained on other mnist image files .* retrain_classif"):
        obtain(tmp_path, other, epochs=1, max_steps=3, min_accuracy=0)
    assert calls == [] and (weights.read_bytes(), record.read_text()) == cached

    # retrain=True replaces it
    obtain(tmp_path, splits, epochs=1, max_steps=2, device="cpu", min_accuracy=0,
        retrain=True,
    )  # fmt: skip
    assert len(calls) == 1 and calls[0]["max_steps"] == 2
    assert json.loads(record.read_text())["max_steps"] == 2


def test_a_classifier_below_the_accuracy_floor_is_refused_and_not_cached(tmp_path):
    splits = _splits()
    folder = tmp_path / "classifiers"
    # new, with no cache: refused, nothing written
    with pytest.raises(DataError) as err:
        obtain(tmp_path, splits, epochs=1, max_steps=1, device="cpu")
    assert re.fullmatch(
        r"the FID classifier just trained on mnist \(classifier_epochs=1, classifier_max_steps=1\) "
        r"reaches 0\.\d{4} test accuracy, below classifier_min_accuracy=0\.8: its features would "
        r"make gen/fid meaningless, so no FID was computed, and nothing was cached\. Train it "
        r"longer \(more classifier_epochs, classifier_max_steps=null\), or lower "
        r"classifier_min_accuracy for images that cannot be classified better",
        str(err.value),
    ), str(err.value)
    assert sorted(p.name for p in folder.iterdir()) == [".mnist.lock"]

    # cached (under a floor of 0), then asked for with the default floor: refused, kept
    _, acc = obtain(tmp_path, splits, epochs=1, max_steps=5, device="cpu", min_accuracy=0)
    assert acc < fid.CLASSIFIER_MIN_ACCURACY
    cached = (folder / "mnist.pt").read_bytes()
    with pytest.raises(DataError) as err:
        obtain(tmp_path, splits, epochs=1, max_steps=5, device="cpu")
    assert str(err.value) == (
        f"the cached FID classifier {folder / 'mnist.pt'} reaches {acc:.4f} test accuracy, below "
        "classifier_min_accuracy=0.8: its features would make gen/fid meaningless, so no FID was "
        "computed. Replace it: retrain_classifier=true, with enough training (more "
        "classifier_epochs, classifier_max_steps=null)"
    )
    # retrained, still below: the cached one is kept
    with pytest.raises(DataError, match=f"the cached one in {re.escape(str(folder))}.* was kept"):
        obtain(tmp_path, splits, epochs=1, max_steps=1, device="cpu", retrain=True)
    assert (folder / "mnist.pt").read_bytes() == cached


def test_an_unreadable_classifier_cache_is_an_error_not_overwritten(tmp_path):
    folder = tmp_path / "classifiers"
    folder.mkdir()
    (folder / "mnist.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError) as err:
        obtain(tmp_path, _splits(), epochs=1, max_steps=1)
    assert str(err.value).startswith(f"{folder / 'mnist.pt'} is truncated or not a checkpoint")
    assert str(err.value).endswith(
        "Pass retrain_classifier=true to replace it with a newly trained one."
    )
    assert (folder / "mnist.pt").read_bytes() == b"not a zip"
