"""The evaluator and its measurements: IWAE bound against an exact likelihood, the Fréchet
distance, the cached classifier, and vae_lightning.evaluate on checkpoints of tiny real runs."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from tests.conftest import run_here, small_overrides, synthetic_images, write_synthetic
from vae_lightning.config import compose
from vae_lightning.errors import ConfigError, DataError
from vae_lightning.evaluate import evaluate, main
from vae_lightning.evaluation import fid
from vae_lightning.evaluation.fid import (
    ClassifierSettings,
    classifier_accuracy,
    frechet_distance,
    load_or_train_classifier,
    train_feature_classifier,
)
from vae_lightning.evaluation.metrics import iwae_bound
from vae_lightning.models.losses import recon_bce
from vae_lightning.models.networks import ClassifierFeatures, FeatureClassifier
from vae_lightning.run.checkpoints import load_model, model_class
from vae_lightning.train import train

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tensors here are tiny: with two threads on a busy 2-core machine, OpenMP's spinning made
    # them 10-20x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- IWAE bound against an exact log-likelihood -----------------------------------------------


GRID_STEP = 0.05
BITS = torch.tensor([32.0, 16, 8, 4, 2, 1], dtype=torch.float64)  # a binary image -> its index


def _grid() -> tuple[torch.Tensor, torch.Tensor]:
    """z on a fine grid over [-8, 8]^2 (G, 2) and log N(z; 0, I) there (G,)."""
    axis = torch.arange(-8, 8 + GRID_STEP / 2, GRID_STEP, dtype=torch.float64)
    z = torch.cartesian_prod(axis, axis)
    return z, -0.5 * (z.pow(2).sum(1) + 2 * math.log(2 * math.pi))


class TinyBernoulliVAE(nn.Module):
    """2-D latent, 6 Bernoulli pixels, logits = W z + b. Small enough that p(x) and the exact
    posterior are computable by quadrature; q(z|x) is a diagonal Gaussian looked up per binary
    image, set from the exact posterior moments but deliberately off (its mean moved by one
    posterior standard deviation), so that k = 1 is loose and large k must close the gap."""

    variational = True

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(2, 6).double()
        with torch.no_grad():
            self.decoder.weight.copy_(
                torch.tensor([[3.0, -1.0], [-2.0, 2.5], [1.5, 1.5], [-1.0, -3.0], [2.0, 0], [0, 2]])
            )
            self.decoder.bias.copy_(torch.tensor([0.5, -0.5, 0.0, 1.0, -1.0, 0.2]))
        every = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 6)
        z, log_prior = _grid()
        with torch.no_grad():
            logits = self.decoder(z)  # (G, 6)
            mus, variances = [], []
            for xi in every:  # exact posterior moments of each of the 64 images
                post = torch.softmax(-recon_bce(logits, xi.expand_as(logits)) + log_prior, 0)
                mean = (post[:, None] * z).sum(0)
                mus.append(mean)
                variances.append((post[:, None] * (z - mean).pow(2)).sum(0))
        variances = torch.stack(variances)  # (64, 2)
        self.register_buffer("table_mu", torch.stack(mus) + variances.sqrt())
        self.register_buffer("table_logvar", variances.log())

    # the models' interface (models.Autoencoder): labels y, which an unconditional model ignores
    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        index = (x @ BITS).long()  # (B,)
        return self.table_mu[index], self.table_logvar[index]  # (B, 2) each

    def logits(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(z)


def exact_log_px(model: TinyBernoulliVAE, x: torch.Tensor) -> torch.Tensor:
    """log p(x) = log ∫ p(x|z) N(z; 0, I) dz by a Riemann sum over the grid (the integrand is
    smooth and beyond |z| = 8 below e^-32): (B, 6) -> (B,)."""
    z, log_prior = _grid()
    with torch.no_grad():
        logits = model.decoder(z)  # (G, 6)
        out = []
        for xi in x:
            log_lik = -recon_bce(logits, xi.expand_as(logits))  # (G,)
            out.append(torch.logsumexp(log_lik + log_prior, 0) + 2 * math.log(GRID_STEP))
    return torch.stack(out)


def exact_neg_elbo(model: TinyBernoulliVAE, x: torch.Tensor) -> torch.Tensor:
    """-ELBO = E_q[-log p(x|z)] + KL(q || p), the expectation by quadrature: (B, 6) -> (B,)."""
    eps, log_density = _grid()  # a standard-normal grid
    weight = log_density.exp() * GRID_STEP**2  # (G,)
    with torch.no_grad():
        mu, logvar = model.encode(x)
        out = []
        for xi, mi, lv in zip(x, mu, logvar, strict=True):
            z = mi + torch.exp(0.5 * lv) * eps  # (G, 2)
            logits = model.decoder(z)
            expected = (weight * recon_bce(logits, xi.expand_as(logits))).sum()
            kl = -0.5 * (1 + lv - mi.pow(2) - lv.exp()).sum()
            out.append(expected + kl)
    return torch.stack(out)


@pytest.fixture(scope="module")
def tiny_vae():
    model = TinyBernoulliVAE()
    x = torch.tensor(
        [[1, 0, 1, 0, 1, 1], [0, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]],
        dtype=torch.float64,
    )
    return model, x, -exact_log_px(model, x)


def repeated_bound(model, x, k: int, reps: int, chunk: int = 100, seed: int = 0) -> torch.Tensor:
    """Mean and standard error over ``reps`` independent estimates per image -> (2, B)."""
    g = torch.Generator().manual_seed(seed)
    est = iwae_bound(model, x.repeat(reps, 1), k=k, chunk=chunk, generator=g).view(reps, -1)
    return torch.stack([est.mean(0), est.std(0) / math.sqrt(reps)])


def test_exact_nll_sanity(tiny_vae):
    model, _, nll = tiny_vae
    # p(x) over all 64 binary images sums to one: the quadrature is exact enough to trust
    every = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 6)
    total = exact_log_px(model, every).exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-9)
    assert (nll > 0).all()


def test_iwae_bounds_the_exact_nll_and_tightens_with_k(tiny_vae):
    model, x, nll = tiny_vae
    means = {}
    for k in (1, 10, 100, 1000):
        mean, stderr = repeated_bound(model, x, k, reps=2000 if k < 1000 else 1000)
        means[k] = mean
        # an upper bound on -log p(x) in expectation
        assert (mean >= nll - 3 * stderr).all(), (k, mean, nll, stderr)
    gaps = {k: (means[k] - nll) for k in means}
    # it tightens: the gap shrinks with k for every image (expected gaps ~0.9, 0.17, 0.03, 0.005
    # nats; the standard errors of the means are below 0.004 from k = 10 on)
    for a, b in ((1, 10), (10, 100), (100, 1000)):
        assert (gaps[b] < gaps[a]).all(), (a, b, gaps)
    assert (gaps[1] > 0.5).all()  # the posterior is off: k = 1 is visibly loose
    assert gaps[1000].abs().max() < 0.02  # and k = 1000 is within 0.02 nats of log p(x)


def test_iwae_k1_is_the_negative_elbo_in_expectation(tiny_vae):
    model, x, _ = tiny_vae
    mean, stderr = repeated_bound(model, x, 1, reps=20000)
    expected = exact_neg_elbo(model, x)
    assert (mean - expected).abs().max() < 4 * stderr.max() + 1e-6, (mean, expected, stderr)


def test_iwae_chunking_does_not_change_the_estimate(tiny_vae):
    model, x, _ = tiny_vae
    whole, se1 = repeated_bound(model, x, 100, reps=300, chunk=100, seed=1)
    chunked, se2 = repeated_bound(model, x, 100, reps=300, chunk=7, seed=2)
    assert ((whole - chunked).abs() < 4 * (se1 + se2)).all()


def test_iwae_refuses_a_deterministic_model():
    class Plain(nn.Module):
        variational = False

    with pytest.raises(TypeError, match="not variational"):
        iwae_bound(Plain(), torch.zeros(2, 6), k=2)


# --- Fréchet distance and the classifier ---------------------------------------------------------


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


# --- the evaluator on checkpoints of tiny real runs ---------------------------------------------


def _tiny_run(tmp_path_factory, data_dir: Path, name: str, *overrides: str) -> Path:
    """A 2-epoch run of a few batches; its config saved as Hydra saves it."""
    out = tmp_path_factory.mktemp(name)
    cfg = compose(
        [
            *small_overrides(data_dir, out),
            "debug=limit",
            "callbacks=minimal",
            "logger=none",
            "model.latent_dim=4",
            *overrides,
        ]
    )
    train(cfg)
    # train() wrote a resolved one; Hydra writes it unresolved, with ${repo_root:} in paths.*
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return out


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(tmp_path_factory, data_dir, "vae_run", "model.hidden_dim=64")


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(tmp_path_factory, data_dir, "ae_run", "model=ae", "model.hidden_dim=64")


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory, data_dir) -> Path:
    return _tiny_run(
        tmp_path_factory,
        data_dir,
        "conv_run",
        "model=conv_vae",
        "model.channels=[4,8,8]",
        "data=fashion_mnist",
        "data.binarize=dynamic",
    )


# classifier_min_accuracy=0: 5 steps on the synthetic images stay far below the real floor
FAST = {
    "classifier_epochs": 1,
    "classifier_max_steps": 5,
    "classifier_min_accuracy": 0.0,
    "device": "cpu",
    "batch_size": 64,
}


def test_evaluate_a_vae_checkpoint(vae_run):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    result = evaluate(ckpt, k=64, chunk=16, n_fid=200, probes=True, probe_max_train=200, **FAST)
    written = json.loads((vae_run / "eval.json").read_text())
    assert written["metrics"] == pytest.approx(result["metrics"])
    m = result["metrics"]
    assert result["model"] == "VAE" and result["data"]["dataset"] == "mnist"
    assert result["data"]["n_test"] == 256
    for key in ("test/loss", "test/recon", "test/kl", "test/mse", "test/nll_iw", "gen/fid"):
        assert math.isfinite(m[key]), key
    # beta = 1: the loss is the single-sample -ELBO, which the k-sample bound improves on
    assert m["test/nll_iw"] <= m["test/loss"] + 1.0
    assert m["test/loss"] == pytest.approx(m["test/recon"] + m["test/kl"], rel=1e-5)
    assert 0 <= m["test/mse"] <= 1
    # the KL per dimension adds up to the (closed-form) test KL
    kl_dims = result["latent"]["kl_per_dim"]
    assert len(kl_dims) == 4 and sum(kl_dims) == pytest.approx(m["test/kl"], rel=1e-4, abs=1e-4)
    assert m["test/active_units"] == sum(v > 0.01 for v in result["latent"]["mu_variance"])
    assert m["gen/fid"] >= 0 and m["gen/fid_train_test"] >= 0
    assert 0 <= m["classifier/test_acc"] <= 1
    assert result["fid"]["n"] == 200
    assert {"probe/rf_acc", "probe/logreg_acc", "probe/knn_acc"} <= set(m)
    assert np.asarray(result["probe"]["confusion_rf"]).sum() == 256
    for path in result["images"].values():
        assert Path(path).is_file() and Path(path).parent == vae_run / "eval"
    assert (data_dir_of(result) / "classifiers" / "mnist.pt").is_file()


def data_dir_of(result) -> Path:
    return Path(result["data"]["data_dir"])


def test_evaluate_is_seeded(vae_run):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    first = evaluate(ckpt, k=8, n_fid=0, **FAST)["metrics"]
    second = evaluate(ckpt, k=8, n_fid=0, **FAST)["metrics"]
    assert first == second and "gen/fid" not in first


def test_evaluate_an_ae_checkpoint(ae_run):
    result = evaluate(ae_run / "checkpoints" / "last.ckpt", n_fid=100, **FAST)
    m = result["metrics"]
    assert result["model"] == "AE"
    assert {"test/loss", "test/recon", "test/mse", "gen/fid"} <= set(m)
    assert not {"test/kl", "test/nll_iw", "test/active_units"} & set(m)


def test_evaluate_a_binarized_convvae_on_fashion_mnist(conv_run):
    result = evaluate(conv_run / "checkpoints" / "last.ckpt", k=32, n_fid=100, **FAST)
    m = result["metrics"]
    assert result["model"] == "ConvVAE" and result["data"]["dataset"] == "fashion_mnist"
    assert result["data"]["binarize"] == "dynamic"
    assert result["nll_iw"]["likelihood"].startswith("Bernoulli on binary images")
    assert m["test/nll_iw"] <= m["test/recon"] + m["test/kl"] + 1.0
    assert Path(result["fid"]["classifier"]).name == "fashion_mnist.pt"


def test_model_class_from_record_and_weights(vae_run, ae_run):
    vae = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)
    ae = torch.load(ae_run / "checkpoints" / "last.ckpt", weights_only=True)
    path = Path("x.ckpt")
    assert model_class(vae, path) == "VAE" and model_class(ae, path) == "AE"
    assert vae["vae_lightning"]["model_class"] == "VAE"  # recorded by the model itself

    def recorded(name):
        return {**vae, "vae_lightning": {**vae["vae_lightning"], "model_class": name}}

    assert model_class(recorded("VAE"), path) == "VAE"
    with pytest.raises(ConfigError, match="records model_class=AE but holds the weights of a VAE"):
        model_class(recorded("AE"), path)
    with pytest.raises(ConfigError, match="only vae_lightning's"):
        model_class(recorded("os.system"), path)
    with pytest.raises(ConfigError, match="weights of none of vae_lightning's models"):
        model_class({"state_dict": {"fc.weight": torch.zeros(1)}}, path)


def error_line(capsys) -> str:
    """What the tool wrote to stderr: one line, starting with ``error:``."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_cli_writes_eval_json_and_rejects_bad_settings(vae_run, capsys):
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    (vae_run / "eval.json").unlink(missing_ok=True)
    assert main([f"ckpt={ckpt}", "k=4", "n_fid=0", "device=cpu", "batch_size=64"]) == 0
    written = json.loads((vae_run / "eval.json").read_text())
    assert written["nll_iw"]["k"] == 4 and "gen/fid" not in written["metrics"]
    assert written["checkpoint"] == str(ckpt.resolve())
    capsys.readouterr()
    assert main([f"ckpt={ckpt}", "kk=4"]) == 2
    assert "kk" in error_line(capsys)
    assert main([f"ckpt={ckpt}", "+kk=4"]) == 2
    assert "kk is not a setting of vae-evaluate" in error_line(capsys)
    assert main([f"ckpt={ckpt}", "k=-1"]) == 2
    assert "k must be an integer >= 0, got -1" in error_line(capsys)
    assert main([f"ckpt={ckpt}", "probes=maybe"]) == 2
    assert "probes must be true or false, got 'maybe'" in error_line(capsys)
    assert main([f"ckpt={ckpt}", "device=nodevice"]) == 2
    assert error_line(capsys) == (
        "error: device must be one of cpu, cuda, cuda:<index>, mps, or null (CUDA when "
        "available, else the CPU); got 'nodevice'\n"
    )
    assert main(["k=3"]) == 2
    assert "ckpt is required" in error_line(capsys)
    assert main([f"ckpt={vae_run / 'nonexistent.ckpt'}"]) == 2
    assert "which is not a file" in error_line(capsys)


def test_cli_help_prints_the_settings(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "vae-evaluate" in out and "n_fid: 10000" in out and "classifiers: false" in out


def test_cli_writes_nothing_but_its_files(vae_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where Hydra would put outputs/ or .hydra/
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    before = set(vae_run.rglob("*"))
    assert main([f"ckpt={ckpt}", "k=2", "n_fid=0", "device=cpu"]) == 0
    assert list(tmp_path.iterdir()) == []
    eval_files = {
        vae_run / "eval",
        *(vae_run / "eval" / f"{n}.png" for n in ("reconstructions", "samples")),
    }
    assert set(vae_run.rglob("*")) - before <= {vae_run / "eval.json", *eval_files}
    assert eval_files <= set(vae_run.rglob("*"))


def test_cli_trains_the_classifiers_ahead_of_time(tmp_path, capsys):
    data = write_synthetic(tmp_path / "data")
    args = ["classifiers=true", f"data_dir={data}", "classifier_epochs=1", "classifier_max_steps=2"]
    args.append("classifier_min_accuracy=0")  # 2 steps: near chance
    # the synthetic files are not the official ones: verification names the first it checks
    assert main(args) == 2 and "train-images-idx3-ubyte" in error_line(capsys)
    assert main([*args, "verify=false", "device=cpu"]) == 0
    for name in ("mnist", "fashion_mnist"):
        record = json.loads((data / "classifiers" / f"{name}.json").read_text())
        assert record["max_steps"] == 2 and 0 <= record["test_accuracy"] <= 1
    capsys.readouterr()
    assert main(["classifiers=true", "verify=false"]) == 2
    assert "data_dir is required" in error_line(capsys)
    assert main([*args, "datasets=[cifar]"]) == 2
    assert "datasets must be one of mnist, fashion_mnist" in error_line(capsys)


def test_refuses_a_checkpoint_of_another_model_class(vae_run, ae_run):
    foreign = vae_run / "checkpoints" / "from_ae.ckpt"
    shutil.copy(ae_run / "checkpoints" / "last.ckpt", foreign)
    with pytest.raises(ConfigError) as err:
        evaluate(foreign, **FAST)
    message = str(err.value)
    assert "holds a AE" in message and "vae_lightning.models.VAE" in message
    assert str(foreign) in message


def test_refuses_hyper_parameters_that_disagree(vae_run):
    checkpoint = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["latent_dim"] = 8
    wrong = vae_run / "checkpoints" / "wrong_hparams.ckpt"
    torch.save(checkpoint, wrong)
    # against the run config
    with pytest.raises(ConfigError, match=r"latent_dim: config 4 vs checkpoint 8"):
        evaluate(wrong, **FAST)
    # against its own weights
    with pytest.raises(ConfigError, match=r"weights do not fit a VAE .*size mismatch"):
        load_model(wrong, "VAE", torch.device("cpu"))


def test_refuses_a_truncated_checkpoint_naming_it(vae_run, capsys):
    data = (vae_run / "checkpoints" / "last.ckpt").read_bytes()
    cut = vae_run / "checkpoints" / "truncated.ckpt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="is truncated or not a checkpoint") as err:
        evaluate(cut, **FAST)
    assert str(cut) in str(err.value)
    assert main([f"ckpt={cut}"]) == 2 and str(cut) in error_line(capsys)


class NotAllowed:  # a class torch's weights_only unpickler does not admit
    pass


def test_refuses_a_checkpoint_holding_arbitrary_objects(vae_run):
    checkpoint = torch.load(vae_run / "checkpoints" / "last.ckpt", weights_only=True)
    checkpoint["extra"] = NotAllowed()
    unsafe = vae_run / "checkpoints" / "unsafe.ckpt"
    torch.save(checkpoint, unsafe)
    with pytest.raises(DataError, match=r"not loaded: it holds a .*NotAllowed object.*could run"):
        evaluate(unsafe, **FAST)


def test_never_instantiates_targets_from_the_run_config(tmp_path, vae_run):
    run = tmp_path / "run"
    shutil.copytree(vae_run / ".hydra", run / ".hydra")
    (run / "checkpoints").mkdir()
    shutil.copy(vae_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")
    cfg_path = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(cfg_path)
    marker = tmp_path / "pwned"
    cfg.data._target_ = "pathlib.Path.touch"
    cfg.data.self = str(marker)
    OmegaConf.save(cfg, cfg_path)
    with pytest.raises(ConfigError, match=r"data._target_ .* evaluate takes only"):
        evaluate(run / "checkpoints" / "last.ckpt", **FAST)
    assert not marker.exists()


# --- the real command line: one line, exit 2, nothing written --------------------


def run_evaluate(*args: str) -> str:
    """``vae-evaluate``'s entry point that must fail as a user error: its one error line."""
    result = run_here("vae-evaluate", *args)
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err[-3000:])
    # the last line is the error; any before it are the tool's own INFO log lines
    *logged, last = err.splitlines()
    assert last.startswith("error: ") and err.endswith("\n"), err
    assert all(re.match(r"\[[^]]+\]\[[\w.]+\]\[INFO\] - ", line) for line in logged), err
    assert "Traceback" not in err and "weights_only=False" not in err
    return last[len("error: ") :]


@pytest.fixture
def cached_classifier(tmp_path) -> tuple[Path, bytes]:
    """A data folder whose MNIST FID classifier is cached (5 steps: far below the floor)."""
    from vae_lightning.evaluate import prepare_classifiers

    data = write_synthetic(tmp_path / "data")
    prepare_classifiers(
        data, "mnist", classifier_epochs=1, classifier_max_steps=5, device="cpu", verify=False,
        classifier_min_accuracy=0,
    )  # fmt: skip
    return data, (data / "classifiers" / "mnist.pt").read_bytes()


@pytest.mark.slow  # a classifier trained three times
def test_cli_never_replaces_the_cached_classifier_unasked(vae_run, cached_classifier):
    data, cached = cached_classifier
    weights = data / "classifiers" / "mnist.pt"
    accuracy = torch.load(weights, weights_only=True)["record"]["test_accuracy"]
    assert accuracy < fid.CLASSIFIER_MIN_ACCURACY
    ckpt = vae_run / "checkpoints" / "last.ckpt"
    (vae_run / "eval.json").unlink(missing_ok=True)
    shutil.rmtree(vae_run / "eval", ignore_errors=True)  # earlier tests' grids
    common = [f"ckpt={ckpt}", f"data_dir={data}", "device=cpu", "k=0", "batch_size=64"]
    # the command: refused before any work
    message = run_evaluate(*common, "classifier_epochs=0")
    assert message == "classifier_epochs must be an integer >= 1, got 0"
    # settings other than the cache's (in-process: the CLI's line is the same error's text)
    settings = {"data_dir": data, "device": "cpu", "k": 0, "batch_size": 64}
    with pytest.raises(ConfigError) as info:
        evaluate(ckpt, **settings, classifier_epochs=1, classifier_max_steps=1)
    message = str(info.value)
    assert message.startswith(f"classifier_max_steps is 1, but the cached FID classifier {weights}")
    assert "Pass retrain_classifier=true to replace it" in message
    # the cache's settings, but it is below the floor
    message = run_evaluate(*common, "classifier_epochs=1", "classifier_max_steps=5")
    assert message == (
        f"the cached FID classifier {weights} reaches {accuracy:.4f} test accuracy, below "
        "classifier_min_accuracy=0.8: its features would make gen/fid meaningless, so no FID was "
        "computed. Replace it: retrain_classifier=true, with enough training (more "
        "classifier_epochs, classifier_max_steps=null)"
    )
    # retrained as asked, to a classifier near chance: refused, the cache kept
    with pytest.raises(DataError) as info:
        evaluate(
            ckpt, **settings, retrain_classifier=True, classifier_epochs=1, classifier_max_steps=1
        )
    message = str(info.value)
    assert message.startswith(
        "the FID classifier just trained on mnist (classifier_epochs=1, classifier_max_steps=1) "
        "reaches 0."
    )
    assert message.endswith(
        f"so no FID was computed, and the cached one in {weights} was kept. Train it longer (more "
        "classifier_epochs, classifier_max_steps=null), or lower classifier_min_accuracy for "
        "images that cannot be classified better"
    )
    assert weights.read_bytes() == cached
    assert not (vae_run / "eval.json").exists() and not (vae_run / "eval").exists()


def test_cli_refuses_a_device_it_does_not_have_before_loading(tmp_path):
    missing = tmp_path / "missing.ckpt"  # never reached: the device is checked first
    message = run_evaluate(f"ckpt={missing}", "device=gpu0")
    assert message == (
        "device must be one of cpu, cuda, cuda:<index>, mps, or null (CUDA when available, "
        "else the CPU); got 'gpu0'"
    )
    if torch.cuda.is_available():
        return
    message = run_evaluate(f"ckpt={missing}", "device=cuda")
    assert message == (
        "device is 'cuda', but no CUDA device is available here: use device=cpu, or leave "
        "device unset (CUDA when available, else the CPU)"
    )


class RunsCode:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


ADVICE = (
    "Use another checkpoint written by vae_lightning, e.g. <run folder>/checkpoints/last.ckpt "
    "or best-*.ckpt"
)


def test_cli_tells_a_checkpoint_that_would_run_code_from_a_damaged_one(tmp_path):
    real = FIXTURES / "vae.ckpt"
    marker = tmp_path / "code_ran"
    checkpoint = torch.load(real, weights_only=True)
    evil = tmp_path / "evil.ckpt"
    torch.save({**checkpoint, "extra": RunsCode(marker)}, evil)
    message = run_evaluate(f"ckpt={evil}", "device=cpu")
    assert message == (
        f"{evil} was not loaded: it holds a posix.system object, not only tensors and plain "
        f"containers, and unpickling it could run code. {ADVICE}"
    )
    assert not marker.exists()

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    # (random bytes and an empty file give the same line: tests/test_checkpoints.py, in-process)
    assert run_evaluate(f"ckpt={truncated}", "device=cpu") == (
        f"{truncated} is truncated or not a checkpoint (not a zip archive, as torch.save "
        f"writes). {ADVICE}"
    )
