"""The run: what keeps one training honest and safe, as callbacks and plain objects around
``trainer.fit``. Its record (``record``: ``metrics.json``, the one reader and writer of it), its
history (``history``: ``history.csv``), stopping safely (``stops``: on a signal, on a loss that is
not finite), the RNG state that makes a resume exact (``resume``), which folder a run may write
and which checkpoint it starts from (``folder``), reading, checking and writing checkpoints
(``checkpoints``), and closing its loggers when it ends (``loggers``).

This floor imports the models (to load a checkpoint's class) and the base modules; never the
steps, the data, the views, the evaluation, the entry points or the studies.
"""
