"""The studies: tools built on the floors below. ``report`` (``vae-report``: any folder of runs
as one report; ``runs`` reads run folders into plain data, ``plots`` draws them, ``markdown``
formats values for every study's report), ``reproduce`` (both seeds' studies, measured beside
their claims; ``reproduce_report`` renders its REPORT.md), ``claims`` (the seeds' proposals),
``zoo`` (every model at one length), ``prior`` (a VQ-VAE's second stage) and ``bench`` /
``sweep_bench`` (the performance benchmark).

They run the entry points (``train``, ``evaluate``) and read the run folders those write; no
floor below imports them.
"""
