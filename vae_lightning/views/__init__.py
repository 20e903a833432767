"""The views: what a researcher looks at. Plain drawing functions (``grids``: image grids;
``figures``: the latent space, the probe's confusion matrix, the KL per dimension; ``publish``:
to a PNG file and every logger that takes pictures), shared by ``vae-evaluate``; and the
Lightning callbacks that draw (``images``) and measure (``measures``) while a model trains, on
``base``'s contract.

This floor imports the evaluation's measurements, the models and the data, never the run, the
steps, the entry points or the studies.
"""
