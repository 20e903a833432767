"""The steps: what drives a model's maths each batch, swappable without touching the maths.

``step`` holds Lightning's automatic optimization (``AutomaticStep``) and the exact epoch means
every step logs (``EpochMeans``); ``fast`` several optimizer steps per Lightning step
(``FastStep``), on ``chunks``' runner (one CUDA graph a chunk on a GPU); ``stack`` trains a
sweep's models as one stacked model; ``schedules`` the learning rate's and the KL weight's
schedules, which a step applies; ``choice`` which step the config chooses (``attach``).

This floor imports the models (through the instances it is given) and nothing above them: not
the run, the data, the views, the evaluation, the entry points or the studies.
"""

from vae_lightning.training.choice import attach, resolve_step
from vae_lightning.training.step import AutomaticStep, EpochMeans

__all__ = ["AutomaticStep", "EpochMeans", "attach", "resolve_step"]
