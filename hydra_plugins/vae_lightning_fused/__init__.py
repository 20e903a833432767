"""``hydra/launcher=fused``: vae_lightning's launcher that trains a sweep's jobs as stacks."""
