"""The experiments' old names (after the documents the two studies came from) are aliases: each
composes to the config of the experiment that now holds its content, so every old command,
and every config, study and test naming one, keeps training the same thing."""

import pytest
from omegaconf import OmegaConf

from vae_lightning.config import compose

RENAMED = {
    "seed1_vae_mnist": "mnist_vae",
    "seed1_ae_mnist": "mnist_ae",
    "seed2_convvae_fashion": "fashion_convvae",
}
EXTRA = (
    ["paths.data_dir=/tmp/x"],
    ["paths.data_dir=/tmp/x", "model.latent_dim=5", "trainer.max_epochs=1", "seed=3"],
)


@pytest.mark.parametrize("extra", EXTRA, ids=["plain", "overridden"])
@pytest.mark.parametrize(("old", "new"), RENAMED.items())
def test_an_old_experiment_name_composes_to_the_new_one(old, new, extra):
    was = OmegaConf.to_container(compose([f"experiment={old}", *extra]), resolve=False)
    now = OmegaConf.to_container(compose([f"experiment={new}", *extra]), resolve=False)
    # task_name alone differs, on purpose: it names the run folder (outputs/<task_name>/), so
    # an old command's runs go where they always went, and every experiment's task_name is its
    # file's name (tests/test_configs.py)
    assert (was.pop("task_name"), now.pop("task_name")) == (old, new)
    assert was == now
    if "model.latent_dim=5" in extra:  # the overrides reach both alike
        assert was["model"]["latent_dim"] == 5
