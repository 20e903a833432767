"""Measurements as functions of tensors (evaluation.metrics): the importance-weighted bound
against an exact log-likelihood, and active units against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from vae_lightning.evaluation.metrics import LatentMoments, active_units, iwae_bound
from vae_lightning.models.losses import recon_bce

# --- IWAE bound against an exact log-likelihood ---------------------------------------------


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


# --- active units ------------------------------------------------------------------------------


def test_active_units_match_a_hand_computed_case():
    # mu over 4 "images": per-dimension variances 0, 0.005, 0.02 and 1 (alternating +-sqrt(v))
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0]).unsqueeze(1)
    variances = torch.tensor([0.0, 0.005, 0.02, 1.0])
    mu = 5.0 + signs * variances.sqrt()  # (4, 4), an offset mean does not matter
    moments = LatentMoments()
    moments.update(mu[:3])
    moments.update(mu[3:])  # in two batches
    assert torch.allclose(moments.mu_variance().float(), variances, atol=1e-6)
    assert active_units(moments.mu_variance()) == 2
    assert active_units(moments.mu_variance(), threshold=0.001) == 3
