"""What every model shares (models.base): terms as a pure function of the parameters and the
batch (the step seam), checked hyper-parameters, checkpoints without Hydra and from before the
redesign, and eval_mode."""

import shutil

import pytest
import torch

from tests.conftest import FIXTURES
from vae_lightning.errors import ConfigError
from vae_lightning.models import AE, VAE, ConvVAE, eval_mode

PRE_REDESIGN = FIXTURES / "pre_redesign"


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
    shutil.copy(PRE_REDESIGN / f"{name}.ckpt", path)
    checkpoint = torch.load(path, weights_only=True)
    model = model_cls.load_from_checkpoint(path, weights_only=True)
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value), key
    assert model.latent_dim == 2
    assert checkpoint["vae_lightning"]["model_class"] == model_cls.__name__


def test_eval_mode_is_evaluation_without_gradients_and_restores_the_training_mode():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not model.training and not model[1].training and not torch.is_grad_enabled()
        raise RuntimeError("inside")
    assert model.training and model[1].training and torch.is_grad_enabled()
