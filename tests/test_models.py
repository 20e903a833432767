"""The models' maths against independent formulas, their purity (the step seam), checkpoints."""

import math
import shutil
from pathlib import Path

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from vae_lightning.errors import ConfigError
from vae_lightning.models import AE, VAE, ConvVAE

FIXTURES = Path(__file__).parent / "fixtures" / "pre_redesign"


@pytest.mark.parametrize("model_cls", [VAE, ConvVAE])
def test_vae_terms_match_independent_formulas(model_cls):
    """recon = -log Bernoulli(x | logits) summed over pixels, kl = KL(N(mu, sigma) || N(0, 1))
    summed over dimensions (torch.distributions, not the project's losses), both batch means;
    loss = recon + kl (the negative ELBO, which runs compare), objective = recon + beta * kl."""
    torch.manual_seed(0)
    model = model_cls(beta=4.0)
    x = torch.rand(8, 1, 28, 28)
    torch.manual_seed(1)
    terms = model.terms(x)
    torch.manual_seed(1)  # the same reparameterisation noise
    mu, logvar = model.encode(x)
    sigma = torch.exp(0.5 * logvar)
    z = mu + sigma * torch.randn_like(mu)
    logits = model.decoder(z)
    recon = -Bernoulli(logits=logits, validate_args=False).log_prob(x).flatten(1).sum(1).mean()
    kl = kl_divergence(Normal(mu, sigma), Normal(0.0, 1.0)).sum(1).mean()
    mse = (torch.sigmoid(logits) - x).pow(2).mean()
    assert terms["recon"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert terms["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
    assert terms["loss"].item() == pytest.approx(recon.item() + kl.item(), rel=1e-5)
    assert terms["objective"].item() == pytest.approx(recon.item() + 4.0 * kl.item(), rel=1e-5)
    assert terms["mse"].item() == pytest.approx(mse.item(), rel=1e-5)
    assert set(terms) == {"loss", "objective", "recon", "kl", "mse"}


def test_ae_terms_are_its_reconstruction_and_its_codes():
    torch.manual_seed(0)
    ae = AE(latent_dim=3)
    x = torch.rand(5, 1, 28, 28)
    terms = ae.terms(x)
    z = ae.encoder(x)
    likelihood = Bernoulli(logits=ae.decoder(z), validate_args=False)
    recon = -likelihood.log_prob(x).flatten(1).sum(1).mean()
    assert terms["loss"].item() == pytest.approx(recon.item(), rel=1e-5)
    assert torch.equal(terms["loss"], terms["recon"])
    assert torch.allclose(terms["z"], z)  # for observe(), which fits the sampling Gaussian
    assert torch.equal(ae.embed(x), z)
    vae = VAE(latent_dim=3)
    assert torch.equal(vae.embed(x), vae.encode(x)[0])


@pytest.mark.parametrize("model_cls", [VAE, AE, ConvVAE])
def test_terms_is_a_pure_function_of_parameters_and_batch(model_cls):
    """The step seam: functional_call(model, params, x) computes terms without side effects,
    and vmap over stacked copies of the parameters gives each copy's terms."""
    from torch.func import functional_call, stack_module_state, vmap

    torch.manual_seed(0)
    model = model_cls(latent_dim=4)
    model.train()
    x = torch.rand(6, 1, 28, 28)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v.detach() for k, v in model.named_parameters()}
    torch.manual_seed(3)
    direct = model.terms(x)
    torch.manual_seed(3)
    functional = functional_call(model, params, (x,))
    for key in ("loss", "recon", "mse"):
        assert torch.equal(direct[key], functional[key]), key
    doubled = {k: 2 * v for k, v in params.items()}
    assert not torch.equal(functional_call(model, doubled, (x,))["recon"], direct["recon"])
    for key, value in model.state_dict().items():  # no statistics updated inside terms
        assert torch.equal(value, state_before[key]), key

    other = model_cls(latent_dim=4)
    stacked, buffers = stack_module_state([model, other])

    def loss(p, b):
        return functional_call(model, (p, b), (x,))["recon"]

    per_model = vmap(loss, randomness="same")(stacked, buffers)
    torch.manual_seed(5)
    expected = [m.terms(x)["recon"] for m in (model, other)]
    if model_cls is AE:  # deterministic: each copy's recon exactly
        assert torch.allclose(per_model, torch.stack(expected), rtol=1e-5)
    assert per_model.shape == (2,)


def test_logvar_is_clamped_so_exp_cannot_overflow():
    model = VAE(latent_dim=2)
    with torch.no_grad():
        model.encoder.net[-1].bias.fill_(1e6)  # mu and logvar huge
    terms = model.terms(torch.rand(2, 1, 28, 28))
    assert all(math.isfinite(v.item()) for v in terms.values())


def test_ae_samples_from_gaussian_fitted_to_training_codes():
    torch.manual_seed(0)
    ae = AE(latent_dim=2)
    x = torch.rand(512, 1, 28, 28)
    ae.on_train_epoch_start()
    for batch in x.split(100):  # as the step does, batch by batch
        ae.observe(ae.terms(batch))
    ae.on_train_epoch_end()
    codes = ae.encoder(x).detach()
    assert torch.allclose(ae.code_mean, codes.mean(0), atol=1e-5)
    assert torch.allclose(ae.code_cov, torch.cov(codes.T, correction=0), atol=1e-5)
    g = torch.Generator().manual_seed(0)
    assert ae.sample(16, generator=g).shape == (16, 1, 28, 28)


def test_samples_are_seeded():
    vae = VAE()
    a = vae.sample(4, generator=torch.Generator().manual_seed(3))
    b = vae.sample(4, generator=torch.Generator().manual_seed(3))
    c = vae.sample(4, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "key"),
    [
        (VAE, {"latent_dim": 0}, "latent_dim"),
        (VAE, {"latent_dim": "abc"}, "latent_dim"),
        (VAE, {"beta": -1.0}, "beta"),
        (VAE, {"beta": float("nan")}, "beta"),
        (VAE, {"lr": 0.0}, "lr"),
        (AE, {"hidden_dim": 0}, "hidden_dim"),
        (ConvVAE, {"channels": [32, 64]}, "channels"),
        (ConvVAE, {"channels": ["a"]}, "channels"),
        (ConvVAE, {"in_shape": [1, 28]}, "in_shape"),
    ],
)
def test_bad_values_name_the_key(model_cls, kwargs, key):
    with pytest.raises(ConfigError) as info:
        model_cls(**kwargs)
    assert info.value.key == key
    assert str(info.value).startswith(key)


def test_hyper_parameters_are_plain_checked_values():
    from omegaconf import OmegaConf

    model = ConvVAE(channels=OmegaConf.create([4, 4, 4]), in_shape=OmegaConf.create([1, 28, 28]))
    assert model.hparams.channels == [4, 4, 4] and type(model.hparams.channels) is list
    assert model.hparams.in_shape == (1, 28, 28)
    assert "beta" not in AE().hparams  # an AE has no KL term to weigh


@pytest.mark.parametrize("model_cls", [VAE, AE, ConvVAE])
def test_checkpoint_round_trip_without_hydra(model_cls, tmp_path):
    import lightning as L

    torch.manual_seed(0)
    model = model_cls(latent_dim=4)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(model)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = model_cls.load_from_checkpoint(path, weights_only=True)
    assert loaded.hparams == model.hparams
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded.embed(x), model.embed(x))


@pytest.mark.parametrize(("name", "model_cls"), [("vae", VAE), ("ae", AE), ("conv_vae", ConvVAE)])
def test_checkpoints_written_before_the_redesign_still_load(tmp_path, name, model_cls):
    """Checkpoints written by 259db03 (train.py before the redesign; tiny models, 3 steps)."""
    path = tmp_path / f"{name}.ckpt"
    shutil.copy(FIXTURES / f"{name}.ckpt", path)
    checkpoint = torch.load(path, weights_only=True)
    model = model_cls.load_from_checkpoint(path, weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.latent_dim == 2
    assert checkpoint["vae_lightning"]["model_class"] == model_cls.__name__


def test_a_run_continues_from_a_checkpoint_written_before_the_redesign(compose_cfg, tmp_path):
    import json

    from vae_lightning.train import train

    old = tmp_path / "old.ckpt"
    shutil.copy(FIXTURES / "vae.ckpt", old)
    cfg = compose_cfg(
        "callbacks=minimal", "logger=none", "model.hidden_dim=8", "model.latent_dim=2",
        "trainer.max_epochs=2", "trainer.limit_train_batches=3", f"resume={old}",
    )  # fmt: skip
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok" and record["epochs"] == 2  # epoch 0 from the old history
    rows = (Path(cfg.paths.output_dir) / "history.csv").read_text().splitlines()
    assert [r.split(",")[:2] for r in rows[1:]] == [["0", "3"], ["1", "6"]]


def test_the_deeper_convvae_adds_a_256_channel_layer_batchnorm_and_leaky_relu():
    from vae_lightning.config import compose

    hp = dict(compose(["model=conv_vae_deep"]).model)
    hp = {k: v for k, v in hp.items() if k not in ("_target_", "in_shape")}
    model = ConvVAE(**hp)
    plain = ConvVAE()
    extra = [m for m in model.encoder.conv if isinstance(m, torch.nn.Conv2d)][-1]
    assert (extra.out_channels, extra.kernel_size, extra.stride) == (256, (3, 3), (1, 1))
    assert model.encoder.fc.in_features == 256 * 3 * 3
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 4 + 3
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in model.modules())
    # seed 2's own model is built exactly as before: the same state_dict keys
    assert "encoder.conv.0.weight" in plain.state_dict() and not any(
        "running_mean" in k for k in plain.state_dict()
    )
    x = torch.rand(6, 1, 28, 28)
    assert model.terms(x)["loss"].isfinite()
    # evaluation uses BatchNorm's running statistics: an image's code does not depend on the
    # other images of its batch (in training it does)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x)[0][:2], model.encode(x[:2])[0])
    model.train()
    with torch.no_grad():
        assert not torch.allclose(model.encode(x)[0][:2], model.encode(x[:2])[0])


@pytest.mark.parametrize(
    ("hp", "message"),
    [
        ({"extra_channels": 0}, "extra_channels must be an integer >= 1"),
        ({"activation": "gelu"}, "activation must be one of relu, leaky_relu"),
        ({"batchnorm": "yes"}, "batchnorm must be true or false"),
    ],
)
def test_bad_deeper_convvae_options_name_the_key(hp, message):
    with pytest.raises(ConfigError, match=message):
        ConvVAE(**hp)
