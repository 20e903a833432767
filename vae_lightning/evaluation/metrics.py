"""Measurements on a trained model: embeddings, the posterior's moments, active units and the
importance-weighted NLL. Functions of tensors, shared by the callbacks and ``vae-evaluate``;
the latent probes are in ``probes.py``, the Fréchet distance and its classifier in ``fid.py``.
"""

from __future__ import annotations

import math

import torch

from vae_lightning.data.idx import to_unit_float
from vae_lightning.models import eval_mode
from vae_lightning.models.losses import recon_bce


def embed_images(
    model: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 1000,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """``model.embed`` of uint8 images (N, C, H, W), batched on the model device -> (N, D), cpu;
    ``labels`` (N,): what a conditional model's encoder reads beside the images."""
    device = next(model.parameters()).device
    out = []
    with eval_mode(model):
        for i in range(0, len(images), batch_size):
            x = to_unit_float(images[i : i + batch_size].to(device))
            y = None if labels is None else labels[i : i + batch_size].to(device)
            out.append(model.embed(x, y).float().cpu())
    return torch.cat(out)


class LatentMoments:
    """Running per-dimension moments of the posterior over a dataset, on the device.

    Collects what the collapse diagnostics need: the mean KL per latent dimension and the
    variance over x of E_q[z|x] = mu(x), whose count above a threshold is the number of active
    units (Burda et al. 2016, Importance Weighted Autoencoders, Sec. 5.2).
    """

    def __init__(self) -> None:
        self.n = 0
        self.sum_mu = self.sum_mu2 = self.sum_kl = None

    def update(self, mu: torch.Tensor, kl_per_dim: torch.Tensor | None = None) -> None:
        mu = mu.detach().double()  # (B, D)
        if self.sum_mu is None:
            self.sum_mu = torch.zeros(mu.size(1), dtype=torch.float64, device=mu.device)
            self.sum_mu2 = torch.zeros_like(self.sum_mu)
            self.sum_kl = torch.zeros_like(self.sum_mu)
        self.sum_mu += mu.sum(0)
        self.sum_mu2 += mu.pow(2).sum(0)
        if kl_per_dim is not None:
            self.sum_kl += kl_per_dim.detach().double().sum(0)
        self.n += mu.size(0)

    def mu_variance(self) -> torch.Tensor:
        mean = self.sum_mu / self.n
        return (self.sum_mu2 / self.n - mean.pow(2)).clamp_min(0)

    def kl_per_dim(self) -> torch.Tensor:
        return self.sum_kl / self.n


def active_units(mu_variance: torch.Tensor, threshold: float = 0.01) -> int:
    """Latent dimensions whose Cov_x(E_q[z|x]) exceeds ``threshold`` (Burda et al.: 0.01)."""
    return int((mu_variance > threshold).sum().item())


# --- importance-weighted log-likelihood ----------------------------------------------------------

_LOG_2PI = math.log(2 * math.pi)


@torch.no_grad()
def iwae_bound(
    model: torch.nn.Module,
    x: torch.Tensor,
    k: int = 1000,
    chunk: int = 100,
    generator: torch.Generator | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-weighted estimate of -log p(x) per image, in nats: (B, C, H, W) -> (B,).

    The bound of Burda, Grosse & Salakhutdinov, Importance Weighted Autoencoders (arXiv 2015,
    ICLR 2016), with k samples z_i ~ q(z|x), w_i = p(x|z_i) p(z_i) / q(z_i|x) and
    -log p(x) <= -log (1/k) sum_i w_i, computed with log-sum-exp. It is an upper bound on
    -log p(x) in expectation, decreases as k grows and reaches -log p(x) as k -> infinity;
    k = 1 is the single-sample negative ELBO (``recon + kl`` of the training loss at beta = 1) in
    expectation.

    For VAEs only (``model.variational``): ``model.encode(x, y) -> (mu, logvar)``,
    ``model.logits(z, y)`` of a Bernoulli likelihood (``-recon_bce``), prior N(0, I). On
    grey-level images the Bernoulli "likelihood" is not a normalised density; it is one on
    binarized images.

    A model with its own latent structure (``HVAE``) gives its importance weights through
    ``model.log_weights(x, m, generator)``: log p(x|z), log p(z) and log q(z|x), each (m, B).

    Cost: k decoder passes per image (k / chunk batched passes of chunk * B rows), plus one
    encoder pass; memory holds chunk * B decoded images at a time.
    """
    if not getattr(model, "variational", False):
        raise TypeError(f"iwae_bound needs a VAE; {type(model).__name__} is not variational")
    if k < 1 or chunk < 1:
        raise ValueError(f"k and chunk must be >= 1, got k={k}, chunk={chunk}")
    with eval_mode(model) if isinstance(model, torch.nn.Module) else torch.no_grad():
        mu, logvar = model.encode(x, y)  # (B, D) each
        std = torch.exp(0.5 * logvar)
        b = x.size(0)
        # log-sum-exp of each chunk's log-weights, merged at the end: the result does not depend
        # on the chunk size, only memory does.
        partial: list[torch.Tensor] = []
        for start in range(0, k, chunk):
            m = min(chunk, k - start)
            if hasattr(model, "log_weights"):  # a model with its own latent structure (HVAE)
                w = model.log_weights(x, m, generator)  # (m, B) each
                partial.append(torch.logsumexp(w["log_px"] + w["log_p"] - w["log_q"], dim=0))
                continue
            eps = torch.randn((m, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
            z = mu + std * eps  # (m, B, D)
            labels = None if y is None else y.repeat(m)  # z.reshape's order: sample-major
            logits = model.logits(z.reshape(m * b, -1), labels)  # (m*B, C, H, W)
            target = x.unsqueeze(0).expand(m, *x.shape).reshape(m * b, *x.shape[1:])
            log_px_z = -recon_bce(logits, target).view(m, b)  # (m, B)
            log_pz = -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)  # (m, B), N(0, I)
            # (z - mu) / std = eps exactly, so log q uses eps rather than a division by std
            log_qz = -0.5 * (eps.pow(2) + logvar + _LOG_2PI).sum(-1)  # (m, B)
            partial.append(torch.logsumexp(log_px_z + log_pz - log_qz, dim=0))  # (B,)
        log_px = torch.logsumexp(torch.stack(partial), dim=0) - math.log(k)  # (B,)
    return -log_px
