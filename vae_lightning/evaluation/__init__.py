"""The evaluation: measurements of a trained model as functions of a model and data. The
embeddings, posterior moments, active units and the importance-weighted bound (``metrics``), the
latent probes (``probes``), the Fréchet distance with its dataset classifier (``fid``), a
checkpoint read with its run folder's data settings (``subject``), and the test-set measures
``vae-evaluate`` reports (``measures``; the tool itself is ``vae_lightning.evaluate``).

This floor imports the run's checkpoint reading, the steps' schedules, the models and the data;
never the views, the entry points or the studies.
"""
