"""The maths, and only the maths: the models (one module per family), their networks and their
losses.

``base`` holds what every model shares (``Autoencoder``: encode / decode / terms / sample, and
the hand-over of Lightning's hooks to an attached step); ``ae``, ``gaussian`` (VAE, ConvVAE),
``conditional`` (CVAE), ``hierarchical`` (HVAE) and ``vq`` (VQ-VAE) one family each;
``networks`` the plain nn.Modules (including the dataset classifier whose features FID and the
feature-matching loss use); ``losses`` the loss terms as pure functions.

This floor imports no other floor of the package (only ``errors``): the steps that drive the
maths, the run, the data, the views and the evaluation all stand above it.
"""

from vae_lightning.models.ae import AE
from vae_lightning.models.base import Autoencoder, eval_mode
from vae_lightning.models.conditional import CVAE
from vae_lightning.models.gaussian import VAE, ConvVAE, GaussianVAE
from vae_lightning.models.hierarchical import HVAE
from vae_lightning.models.vq import VQVAE

# the classes a checkpoint may name (run.checkpoints reads only these)
MODELS = {cls.__name__: cls for cls in (VAE, AE, ConvVAE, CVAE, HVAE, VQVAE)}

__all__ = [
    "AE", "CVAE", "HVAE", "MODELS", "VAE", "VQVAE", "Autoencoder", "ConvVAE", "GaussianVAE",
    "eval_mode",
]  # fmt: skip
