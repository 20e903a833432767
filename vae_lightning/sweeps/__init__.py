"""Sweeps: what a multirun adds to its runs. The Hydra callback around every run and sweep
(``folders``: folders that can be written, one sweep per folder, the report when it ends) and
the fused launcher's group logic (``fused``: which jobs train as one stacked model, and how);
the launcher itself is Hydra plumbing in ``hydra_plugins/vae_lightning_fused``.

The top floor: it may import every floor below it (the studies' report among them); nothing in
the package imports it.
"""
