"""The stack (training.stack): jobs trained as one stacked model are the jobs trained alone."""

from __future__ import annotations

import pytest
import torch

from vae_lightning.errors import ConfigError
from vae_lightning.models import AE, VAE, ConvVAE
from vae_lightning.training.stack import Stack


def build(kind, seed: int, **hp):
    torch.manual_seed(seed)  # each job's own initialisation, as train.py's seed gives it
    return kind(**hp)


def batches(n_jobs: int, steps: int, size: int = 16) -> torch.Tensor:
    """A different batch per job and step, as each job's own seed would order its data."""
    g = torch.Generator().manual_seed(123)
    return torch.rand(steps, n_jobs, size, 1, 28, 28, generator=g)


def step(stack: Stack, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """One Adam step of every job on its own batch, as the stack's Trainer takes it (the sum
    of the objectives: each job's gradient is its own); their terms before the step."""
    if not hasattr(stack, "_adam"):
        stack._adam = stack.configure_optimizers()
    out = stack.terms(x, stack.draw_noise(x.size(1)))
    stack._adam.zero_grad()
    out.get("objective", out["loss"]).sum().backward()
    stack._adam.step()
    return {k: v.detach() for k, v in out.items()}


def train_alone(model, xs: torch.Tensor, seed: int) -> list[float]:
    """The job by itself: its own Adam, its own generator drawing eps at its own size."""
    optimizer = torch.optim.Adam(model.parameters(), lr=model.lr, fused=True)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for x in xs:
        noise = torch.randn(x.size(0), model.latent_dim, generator=g) if model.variational else None
        out = model.terms(x, eps=noise) if model.variational else model.terms(x)
        optimizer.zero_grad()
        out.get("objective", out["loss"]).backward()
        optimizer.step()
        losses.append(out["loss"].item())
    return losses


CASES = {
    "vae": (VAE, [{"latent_dim": 2, "beta": 1.0}, {"latent_dim": 5, "beta": 4.0},
                  {"latent_dim": 5, "beta": 0.5}]),
    "ae": (AE, [{"latent_dim": 3}, {"latent_dim": 8}]),
    "conv_vae": (ConvVAE, [{"latent_dim": 4, "beta": 2.0, "channels": [4, 8, 8]},
                           {"latent_dim": 6, "beta": 1.0, "channels": [4, 8, 8]}]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_stacked_job_trains_exactly_as_the_job_alone(case):
    kind, hps = CASES[case]
    steps = 4
    xs = batches(len(hps), steps)
    alone = [build(kind, 10 + j, **hp) for j, hp in enumerate(hps)]
    stack = Stack([build(kind, 10 + j, **hp) for j, hp in enumerate(hps)])
    expected = [train_alone(m, xs[:, j], seed=100 + j) for j, m in enumerate(alone)]

    stack.generators = [torch.Generator().manual_seed(100 + j) for j in range(len(hps))]
    stacked = []
    for x in xs:
        stacked.append(step(stack, x)["loss"].tolist())
    # the same losses at every step (float rounding only: a padded matmul sums in another order)
    for j in range(len(hps)):
        got = [row[j] for row in stacked]
        assert got == pytest.approx(expected[j], rel=1e-5), (case, j)
    # and the same weights after training, the job cut out of the stack at its own size. All
    # but a few elements agree to 1e-6; those few had a gradient near 0, where Adam's m/sqrt(v)
    # turns rounding into a step of up to lr (1e-3): measured 3.7e-5 at most, 2 of 313,600.
    for j, model in enumerate(alone):
        own = stack.unstack(j).state_dict()
        for name, value in model.state_dict().items():
            diff = (own[name] - value).abs()
            assert diff.max() < 1e-4, (name, diff.max())
            assert (diff > 1e-6).float().mean() < 1e-4, (name, (diff > 1e-6).sum())


def test_padding_stays_zero_and_unstacking_an_untrained_stack_gives_each_job_back():
    jobs = [build(VAE, j, latent_dim=d, beta=1.0) for j, d in enumerate((2, 7))]
    stack = Stack(jobs)
    for j, job in enumerate(jobs):  # the round trip is exact
        back = stack.unstack(j).state_dict()
        assert all(torch.equal(back[k], v) for k, v in job.state_dict().items())
    xs = batches(2, 3)
    for x in xs:
        step(stack, x)
    params = stack.stacked()[0]
    last = params["encoder.net.3.weight"][0]  # job 0 (latent 2) in a stack of latent 7
    rows = torch.cat([last[2:7], last[9:14]])  # mu and logvar rows beyond its 2 dimensions
    assert torch.count_nonzero(rows) == 0
    assert torch.count_nonzero(params["decoder.net.0.weight"][0][:, 2:]) == 0
    assert torch.count_nonzero(last[:2]) > 0  # while its own rows trained


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (lambda: [VAE(hidden_dim=10), VAE(hidden_dim=20)], "hidden_dim"),
        (lambda: [VAE(), AE()], "cannot stack a AE"),
        (lambda: [VAE(lr=1e-3), VAE(lr=1e-4)], "lr"),
        (lambda: [], "at least one model"),
        (lambda: [ConvVAE(batchnorm=True), ConvVAE(batchnorm=True)], "BatchNorm"),
    ],
)
def test_jobs_that_differ_in_more_than_the_stackable_keys_are_refused(models, message):
    with pytest.raises(ConfigError, match=message):
        Stack(models())
