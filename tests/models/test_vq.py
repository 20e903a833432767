"""The VQ-VAE (model=vq_vae): the quantiser's updates, the PixelCNN's causality and
normalisation (what the bound needs), and a fitted prior's pricing of the codes. (Its second
stage, vae-prior: tests/studies/test_prior.py; vae-evaluate of a fitted prior:
tests/studies/test_zoo.py.)"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from vae_lightning.errors import ConfigError
from vae_lightning.models import VQVAE
from vae_lightning.models.networks import PixelCNN


def test_terms_bound_with_the_uniform_prior_and_quantise_to_the_codebook():
    torch.manual_seed(0)
    model = VQVAE(codebook_size=32).eval()
    x = torch.rand(5, 1, 28, 28)
    out = model.terms(x)
    assert float(out["kl"]) == pytest.approx(49 * math.log(32), rel=1e-6)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"])
    torch.testing.assert_close(out["objective"], out["recon"] + 0.25 * out["commitment"])
    z = model.embed(x)  # (B, 16 * 49): code vectors of the codebook
    assert z.shape == (5, 16 * 49)
    vectors = z.view(5, 16, 49).permute(0, 2, 1).reshape(-1, 16)
    assert torch.cdist(vectors, model.codebook).min(1).values.max() < 1e-5
    # decode quantises: a point near a code decodes as the code itself
    torch.testing.assert_close(model.decode(z + 1e-4), model.decode(z))


def test_the_codebook_moves_in_training_only_and_dead_codes_restart():
    torch.manual_seed(0)
    model = VQVAE(codebook_size=16, dead_code_threshold=2.0)
    x = torch.rand(32, 1, 28, 28)
    before = model.codebook.clone()
    model.eval()
    model.terms(x)
    torch.testing.assert_close(model.codebook, before)  # evaluation changes nothing
    model.train()
    model.terms(x)
    # every code unused by the first batch sits below the threshold and restarts at a vector of
    # the batch: after it, the batch's vectors reach most codes
    used = torch.unique(model.codes(x)).numel()
    assert not torch.equal(model.codebook, before)
    assert used >= 8, used


def test_the_pixelcnn_is_causal_and_its_distribution_sums_to_one():
    torch.manual_seed(0)
    prior = PixelCNN(num_codes=3, channels=8, layers=2).requires_grad_(False)
    codes = torch.randint(3, (1, 7, 7))
    base = prior(codes)
    for i, j in ((0, 0), (3, 4), (6, 6)):
        changed = codes.clone()
        changed[0, i, j] = (codes[0, i, j] + 1) % 3
        diff = (prior(changed) - base).abs().sum(1)[0]  # (7, 7)
        later = torch.zeros(7, 7, dtype=torch.bool)
        later.view(-1)[i * 7 + j + 1 :] = True  # the positions after (i, j) in raster order
        assert float(diff[~later].max()) == 0.0, (i, j)  # none before it, nor itself, moves
    # p(z) over every 2x2 map of 3 codes: the chain rule's product sums to 1, so -log p(z*) is a
    # true negative log-probability and the bound it enters is a bound
    maps = torch.tensor(list(itertools.product(range(3), repeat=4))).view(-1, 2, 2)
    log_p = -torch.nn.functional.cross_entropy(prior(maps), maps, reduction="none").sum((1, 2))
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-5)


def test_a_fitted_prior_prices_the_codes_and_samples_from_them():
    torch.manual_seed(0)
    model = VQVAE(codebook_size=8).eval()
    x = torch.rand(4, 1, 28, 28)
    model.prior_fitted.fill_(True)
    codes = model.codes(x)
    expected = torch.nn.functional.cross_entropy(model.prior(codes), codes, reduction="none")
    torch.testing.assert_close(model.terms(x)["kl"], expected.sum((1, 2)).mean())
    assert model.sample_kind == "code_prior"
    a = model.sample(3, torch.Generator().manual_seed(1))
    b = model.sample(3, torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 28, 28) and torch.equal(a, b)


def test_bad_vq_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match="codebook_size must be an integer >= 2"):
        VQVAE(codebook_size=1)
    with pytest.raises(ConfigError, match="ema_decay must be below 1"):
        VQVAE(ema_decay=1.0)
    with pytest.raises(ConfigError, match=r"channels 3 stride-2 layers need images whose side"):
        VQVAE(channels=[32, 64, 128])
    with pytest.raises(ConfigError, match="kl schedules a VAE's KL term, and a VQ-VAE has none"):
        VQVAE(kl={"name": "warmup", "length": 2})
